// Host-side argument checks shared by all launchers. These are a second line of defence: the
// Python layer (compile_ops/_checks.py) raises first with the same argument names.
#pragma once

#include <torch/all.h>
#if defined(COMPILE_OPS_EMULATE)
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "compile_ops/emulate.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "compile_ops/launch.cuh"
#endif

#include <cuda_runtime.h>

#include "compile_ops/fp8.cuh"

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

namespace compile_ops {

// Numbers in messages go through std::to_string, never through an ostream: streaming an integer
// from this extension crashed inside libstdc++ on the device image (torch 2.11), so a bad argument
// turned into a segfault instead of an error.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string dims(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

#if defined(COMPILE_OPS_EMULATE)
// tests/emulated: "device" tensors are CPU tensors and a launch runs every thread in turn.
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline int sm_count(int) { return 132; }

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, int,
                   Args... args) {
  emu::grid_dim = grid;
  emu::block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        emu::block_idx = dim3(bx, by, bz);
        if (!emu::cooperative) {
          for (unsigned tz = 0; tz < block.z; ++tz)
            for (unsigned ty = 0; ty < block.y; ++ty)
              for (unsigned tx = 0; tx < block.x; ++tx) {
                emu::thread_idx = dim3(tx, ty, tz);
                kernel(static_cast<Params>(args)...);
              }
          continue;
        }
        // Linear thread id t = tx + ty * bx + tz * bx * by; warps are runs of 32 ids.
        std::barrier<> cta(n);
        std::vector<std::unique_ptr<emu::Warp>> warps;
        for (unsigned w0 = 0; w0 < n; w0 += 32)
          warps.push_back(std::make_unique<emu::Warp>(std::min(32u, n - w0)));
        std::vector<std::thread> threads;
        std::exception_ptr error;
        std::mutex error_mutex;
        for (unsigned t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            emu::thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            emu::cta_bar = &cta;
            emu::warp = warps[t / 32].get();
            try {
              kernel(static_cast<Params>(args)...);
            } catch (...) {
              const std::lock_guard<std::mutex> lock(error_mutex);
              error = std::current_exception();
            }
            emu::warp->bar.arrive_and_drop();
            cta.arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        if (error) std::rethrow_exception(error);
      }
}
#else
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int count[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return 132;
  if (count[device] == 0) {
    int c = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device));
    count[device] = c;
  }
  return count[device];
}

// Programmatic dependent launch (Hopper+): our kernel may be scheduled while the previous kernel
// on the stream drains; the kernel itself waits (griddepcontrol.wait) before touching memory.
// COMPILE_OPS_PDL=0 turns it off.
inline bool pdl_enabled(int device) {
  static const bool env_on = [] {
    const char* e = std::getenv("COMPILE_OPS_PDL");
    return !(e && e[0] == '0');
  }();
  constexpr int kMaxDevices = 64;
  static int major[kMaxDevices] = {};  // 0 = not read yet
  if (!env_on || device < 0 || device >= kMaxDevices) return false;
  if (major[device] == 0) {
    int m = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device));
    major[device] = m;
  }
  return major[device] >= 9;
}

// Launch `kernel` on `stream`, with programmatic stream serialization where supported.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   int device, Args... args) {
  C10_CUDA_CHECK(launch_ex(kernel, grid, block, 0, stream, pdl_enabled(device), args...));
}
#endif  // COMPILE_OPS_EMULATE

inline bool all_multiple(std::initializer_list<int64_t> values, int64_t w) {
  for (int64_t v : values)
    if (v % w != 0) return false;
  return true;
}

// `t` is a tensor of this build's device kind on `ref`'s device.
inline void check_on(const char* op, const char* name, const at::Tensor& t,
                     const at::Tensor& ref) {
  TORCH_CHECK(on_device(t) && t.device() == ref.device(), op, ": ", name, " must be on ",
              ref.device(), ", got ", t.device());
}

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
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a CUDA tensor, got ", t.device());
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
  // Elements from the previous 16-byte boundary to the first row's start.
  int phase(int width, size_t elem_size) const {
    return static_cast<int>((reinterpret_cast<uintptr_t>(ptr) / elem_size) % width);
  }
};

// Leading dimensions must collapse into one row stride; writable rows must not overlap.
inline RowView row_view(const char* op, const char* name, const at::Tensor& t, bool writable) {
  const int64_t nd = t.dim();
  TORCH_CHECK(nd >= 1, op, ": ", name, " must have at least one dimension");
  const int64_t hidden = t.size(-1);
  TORCH_CHECK(hidden <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must be contiguous in its last dimension, got strides ", dims(t.strides()));
  RowView v;
  v.ptr = t.data_ptr();
  v.rows = hidden == 0 ? 0 : t.numel() / hidden;
  if (t.numel() == 0) {  // no rows ([2, 0, hidden] included): nothing is read or written
    v.stride = hidden;
    return v;
  }
  int64_t expect = -1;  // stride the next-outer non-trivial dim must have
  for (int64_t d = nd - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expect < 0) {
      v.stride = t.stride(d);
    } else {
      TORCH_CHECK(t.stride(d) == expect, op, ": ", name,
                  " leading dimensions must collapse into rows with one stride, got shape ",
                  dims(t.sizes()), " and strides ", dims(t.strides()));
    }
    expect = t.stride(d) * t.size(d);
  }
  if (v.rows <= 1) v.stride = hidden;
  TORCH_CHECK(!writable || v.rows <= 1 || v.stride >= hidden, op, ": ", name,
              " rows overlap in memory (row stride ", num(v.stride), " < hidden size ", num(hidden),
              ")");
  return v;
}

struct Heads {
  void* ptr = nullptr;
  int64_t token_stride = 0;
  int heads = 0;
  int64_t head_stride = 0;  // in elements; head_size unless `strided` heads_view found otherwise
};

// query/key of the RoPE ops: shape positions.shape + (heads * head_size,) or + (heads, head_size),
// the token dims collapsible into one stride. Each token's values packed (head_stride =
// head_size), or with `strided` (rotary_embedding; the fused RoPE + cache kernels take packed
// heads only) also + (..., head_size) with each head contiguous and the head dims collapsible
// into one head stride >= head_size (t[..., :head_size] of a padded [..., heads, head_size + pad]
// tensor). Written elements must not overlap. A tensor with no elements is accepted as is.
inline Heads heads_view(const char* kOp, const char* name, const at::Tensor& x,
                        const at::Tensor& positions, int64_t head_size, bool strided = false) {
  const int64_t lead = positions.dim();
  TORCH_CHECK(x.dim() > lead && x.sizes().slice(0, lead) == positions.sizes(), kOp, ": ", name,
              " must start with the positions' shape ", dims(positions.sizes()), ", got ",
              dims(x.sizes()));
  int64_t per_token = 1, expect = 1;
  bool packed = true;
  for (int64_t d = x.dim() - 1; d >= lead; --d) {
    if (x.size(d) != 1 && x.stride(d) != expect) packed = false;
    expect *= x.size(d);
    per_token *= x.size(d);
  }
  TORCH_CHECK(packed || strided || x.numel() == 0, kOp, ": ", name,
              " must hold each token's heads contiguously, got strides ", dims(x.strides()));
  TORCH_CHECK(per_token % head_size == 0, kOp, ": ", name, " values per token (",
              num(per_token), ") not a multiple of head_size ", num(head_size));
  Heads h;
  h.ptr = x.data_ptr();
  h.heads = static_cast<int>(per_token / head_size);
  h.head_stride = head_size;
  h.token_stride = per_token;
  if (x.numel() == 0) return h;  // nothing to read or write ([2, 0, hidden] included)
  if (!packed) {
    TORCH_CHECK(x.dim() >= lead + 2 && x.size(-1) == head_size &&
                    (head_size == 1 || x.stride(-1) == 1),
                kOp, ": ", name,
                " must be positions' shape + (heads * head_size) with its values packed, or + "
                "(heads, head_size) with each head contiguous, got shape ",
                dims(x.sizes()), " and strides ", dims(x.strides()));
    int64_t next = -1;
    bool first = true;
    for (int64_t d = x.dim() - 2; d >= lead; --d) {
      if (x.size(d) == 1) continue;
      TORCH_CHECK(next < 0 || x.stride(d) == next, kOp, ": ", name,
                  " head dims must collapse into one head stride, got strides ",
                  dims(x.strides()));
      if (first) h.head_stride = x.stride(d);
      first = false;
      next = x.stride(d) * x.size(d);
    }
    TORCH_CHECK(h.heads <= 1 || h.head_stride >= head_size, kOp, ": ", name,
                " heads overlap in memory (head stride ", num(h.head_stride), " < head_size ",
                num(head_size), ")");
    h.token_stride = static_cast<int64_t>(h.heads) * h.head_stride;
  }
  int64_t next = -1;
  bool first = true;
  for (int64_t d = lead - 1; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    TORCH_CHECK(next < 0 || x.stride(d) == next, kOp, ": ", name,
                " token dims must collapse into one stride, got strides ", dims(x.strides()));
    if (first) h.token_stride = x.stride(d);
    first = false;
    next = x.stride(d) * x.size(d);
  }
  // The tokens' [heads, head_size] blocks must not run into each other or, heads-major (token
  // stride < head stride), the heads' [tokens, head_size] blocks.
  const int64_t tokens = positions.numel();
  const int64_t heads_extent = (h.heads - 1) * h.head_stride + head_size;
  const int64_t tokens_extent = (tokens - 1) * h.token_stride + head_size;
  TORCH_CHECK(tokens <= 1 || h.token_stride >= heads_extent ||
                  (h.heads > 1 && h.token_stride >= head_size &&
                   h.token_stride < h.head_stride && h.head_stride >= tokens_extent),
              kOp, ": ", name, " tokens overlap in memory");
  return h;
}

// The cache storage a kv_cache_dtype kind needs (0 auto: the data's dtype; 1/2: uint8 or the
// float8 dtype of the format); returns the kind.
inline int kv_kind(const char* op, int64_t kind, const at::Tensor& cache, const at::Tensor& src) {
  TORCH_CHECK(kind == kKvAuto || kind == kKvE4M3 || kind == kKvE5M2, op,
              ": bad kv_cache_dtype kind ", num(kind));
  if (kind == kKvAuto) {
    TORCH_CHECK(cache.scalar_type() == src.scalar_type(), op,
                ": with kv_cache_dtype 'auto' the cache must have the dtype of the data");
  } else {
    const auto want = kind == kKvE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
    TORCH_CHECK(cache.scalar_type() == at::kByte || cache.scalar_type() == want, op,
                ": an FP8 cache must be uint8 or the float8 dtype of its kv_cache_dtype");
  }
  return static_cast<int>(kind);
}

}  // namespace compile_ops
