// Host-side argument checks shared by all launchers. These are a second line of defence: the
// Python layer (compile_ops/_checks.py) raises first with the same argument names.
#pragma once

#include <torch/all.h>

#include <cstdint>
#include <limits>

namespace compile_ops {

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline void check_float_type(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline void check_same_type(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " (same as input), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              " (same as input), got ", t.device());
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

// A tensor seen as `rows` rows of size(-1) contiguous elements, one stride between rows.
struct RowView {
  void* ptr = nullptr;
  int64_t rows = 0;
  int64_t stride = 0;  // in elements
  // 128-bit accesses need a 16-byte aligned base and a row stride that keeps every row aligned.
  bool aligned(int width) const {
    return stride % width == 0 && is_aligned(ptr, 16);
  }
};

// Leading dimensions must collapse into one row stride; writable rows must not overlap.
inline RowView row_view(const char* op, const char* name, const at::Tensor& t, bool writable) {
  const int64_t nd = t.dim();
  TORCH_CHECK(nd >= 1, op, ": ", name, " must have at least one dimension");
  const int64_t hidden = t.size(-1);
  TORCH_CHECK(hidden <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension, got strides ", t.strides());
  RowView v;
  v.ptr = t.data_ptr();
  v.rows = hidden == 0 ? 0 : t.numel() / hidden;
  int64_t expect = -1;  // stride the next-outer non-trivial dim must have
  for (int64_t d = nd - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expect < 0) {
      v.stride = t.stride(d);
    } else {
      TORCH_CHECK(t.stride(d) == expect, op, ": ", name,
                  " leading dimensions must collapse into rows with one stride, got shape ",
                  t.sizes(), " and strides ", t.strides());
    }
    expect = t.stride(d) * t.size(d);
  }
  if (v.rows <= 1) v.stride = hidden;
  TORCH_CHECK(!writable || v.rows <= 1 || v.stride >= hidden, op, ": ", name,
              " rows overlap in memory (row stride ", v.stride, " < hidden size ", hidden, ")");
  return v;
}

}  // namespace compile_ops
