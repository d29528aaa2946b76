// Launcher of argmax (greedy sampling): checks, device guard, current stream, dtype dispatch, the
// split of long rows over CTAs (include/compile_ops/argmax.cuh).
#include <torch/all.h>

#include <algorithm>
#include <cstdlib>

#include "compile_ops/argmax.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

// Fewest elements a split gets: below this a CTA's one round trip to memory costs more than a
// second CTA saves. COMPILE_OPS_ARGMAX_MIN_CHUNK overrides (tuning; see ctas_per_sm).
int64_t min_chunk() {
  static const int64_t v = [] {
    const char* e = std::getenv("COMPILE_OPS_ARGMAX_MIN_CHUNK");
    const long long x = e ? std::atoll(e) : 0;
    return x > 0 ? static_cast<int64_t>(x) : int64_t(4096);
  }();
  return v;
}

// CTAs per SM the split aims at. H200, bf16, vocab 128256 x rows 1 / 8 / 32 / 128 (us;
// bench/NOTES.md, session 7), (CTAs per SM, min chunk): (4, 2048) 3.00 / 4.80 / 7.25 / 17.35,
// (16, 2048) 2.99 / 4.80 / 10.06 / 16.05, (16, 8192) 3.28 / 4.47 / 7.08 / 15.79, (8, 4096)
// 2.96 / 4.39 / 7.63 / 16.20: the last is within 8% of the best everywhere, vocab 32000 too.
// COMPILE_OPS_ARGMAX_CTAS_PER_SM overrides (tuning).
int64_t ctas_per_sm() {
  static const int64_t v = [] {
    const char* e = std::getenv("COMPILE_OPS_ARGMAX_CTAS_PER_SM");
    const long long x = e ? std::atoll(e) : 0;
    return x > 0 ? static_cast<int64_t>(x) : int64_t(8);
  }();
  return v;
}

template <typename T>
void launch_argmax(at::Tensor& out, const at::Tensor& x, int64_t rows, int64_t n,
                   int64_t row_stride) {
  constexpr int VW = kVecWidth<T>;
  constexpr int U = 4;
  const int dev = x.get_device();
  const auto stream = current_stream();
  const bool vec = row_stride % VW == 0 && is_aligned(x.data_ptr(), 16);
  const int64_t w = vec ? VW : 1;
  // Enough CTAs to keep every SM busy with loads in flight (ctas_per_sm() of 256 threads each),
  // but no split under min_chunk().
  const int64_t target = ctas_per_sm() * static_cast<int64_t>(sm_count(dev));
  int64_t splits = rows >= target ? 1 : ceil_div(target, rows);
  splits = std::max<int64_t>(1, std::min(splits, ceil_div(n, min_chunk())));
  const int64_t chunk = ceil_div(ceil_div(n, splits), w) * w;
  splits = ceil_div(n, chunk);
  TORCH_CHECK(splits <= 65535, "argmax: too many splits");
  at::Tensor partial;
  uint64_t* part = nullptr;
  if (splits > 1) {
    partial = at::empty({rows * splits}, x.options().dtype(at::kLong));
    part = reinterpret_cast<uint64_t*>(partial.data_ptr<int64_t>());
  }
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(splits)),
      block(kArgmaxThreads);
  const auto* xp = static_cast<const T*>(x.data_ptr());
  auto* o = out.data_ptr<int64_t>();
  if (vec)
    launch_kernel(argmax_kernel<T, VW, U>, grid, block, stream, dev, xp, row_stride, n, chunk,
                  part, o);
  else
    launch_kernel(argmax_kernel<T, 1, U>, grid, block, stream, dev, xp, row_stride, n, chunk,
                  part, o);
  if (splits > 1) {
    constexpr int kRowsPerCta = kArgmaxThreads / 32;
    launch_kernel(argmax_merge_kernel, dim3(static_cast<unsigned>(ceil_div(rows, kRowsPerCta))),
                  dim3(kArgmaxThreads), stream, dev, static_cast<const uint64_t*>(part),
                  static_cast<int>(splits), rows, o);
  }
}

}  // namespace

// out[r] = index of the first maximum of input[r, :] (NaN the largest), input [rows, n] with a
// contiguous last dimension (any row stride), out int64 [rows].
void argmax(at::Tensor& out, const at::Tensor& input) {
  constexpr const char* op = "argmax";
  check_float_type(op, "input", input);
  check_on(op, "input", input, input);
  check_on(op, "out", out, input);
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D [rows, n], got ", dims(input.sizes()));
  const int64_t rows = input.size(0), n = input.size(1);
  TORCH_CHECK(n >= 1, op, ": input's last dimension must not be empty");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op,
              ": input's last dimension must be below 2^31, got ", num(n));
  TORCH_CHECK(n == 1 || input.stride(1) == 1, op,
              ": input must be contiguous in its last dimension, got strides ",
              dims(input.strides()));
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": too many rows");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 1 && out.size(0) == rows &&
                  (rows <= 1 || out.stride(0) == 1),
              op, ": out must be a contiguous int64 tensor of shape [", num(rows), "], got ",
              dims(out.sizes()));
  if (rows == 0) return;
  const int64_t row_stride = rows > 1 ? input.stride(0) : n;
  const DeviceGuard guard(input.device());
  switch (input.scalar_type()) {
    case at::kFloat: launch_argmax<float>(out, input, rows, n, row_stride); break;
    case at::kHalf: launch_argmax<__half>(out, input, rows, n, row_stride); break;
    case at::kBFloat16: launch_argmax<__nv_bfloat16>(out, input, rows, n, row_stride); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype");
  }
}

}  // namespace compile_ops
