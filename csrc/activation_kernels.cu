// Launchers for the gated activations: checks, device guard, current stream, dtype dispatch,
// 128-bit packs when every row is 16-byte aligned and a scalar path otherwise.
#include <torch/all.h>

#include <algorithm>

#include "compile_ops/activation.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

constexpr int kThreads = 256;

struct ActArgs {
  RowView out, in;
  int d;
  int dev;
  cudaStream_t stream;
};

ActArgs act_args(const char* op, const at::Tensor& out, const at::Tensor& input) {
  check_float_type(op, "input", input);
  check_same_type(op, "out", out, input);
  check_same_device(op, "out", out, input);
  check_same_device(op, "input", input, input);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) % 2 == 0, op,
              ": input's last dimension must be even (2*d)");
  const int64_t d = input.size(-1) / 2;
  TORCH_CHECK(d <= std::numeric_limits<int>::max() / 2, op, ": last dimension too large");
  auto want = input.sizes().vec();
  want.back() = d;
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(want), op, ": out must have shape ", dims(want),
              ", got ", dims(out.sizes()));
  ActArgs a{row_view(op, "out", out, /*writable=*/true), row_view(op, "input", input, false),
            static_cast<int>(d), input.get_device(), current_stream()};
  TORCH_CHECK(a.in.rows <= std::numeric_limits<int>::max(), op, ": too many rows");
  return a;
}

dim3 grid_for(int64_t rows, int64_t packs) {
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(packs, kThreads)));
}

template <int KIND, typename T>
void launch_act(const ActArgs& a, float threshold) {
  constexpr int VW = kVecWidth<T>;
  auto* o = static_cast<T*>(a.out.ptr);
  auto* x = static_cast<const T*>(a.in.ptr);
  const bool aligned = a.d % VW == 0 && a.out.aligned(VW) && a.in.aligned(VW);
  const int w = aligned ? VW : 1;
  const dim3 grid = grid_for(a.in.rows, a.d / w), block(std::min<int64_t>(kThreads, a.d / w));
  if (aligned)
    launch_kernel(act_and_mul_kernel<KIND, T, VW>, grid, block, a.stream, a.dev, o, a.out.stride,
                  x, a.in.stride, a.d, threshold);
  else
    launch_kernel(act_and_mul_kernel<KIND, T, 1>, grid, block, a.stream, a.dev, o, a.out.stride,
                  x, a.in.stride, a.d, threshold);
}

template <typename T>
void dispatch_kind(const ActArgs& a, int kind, float threshold) {
  switch (kind) {
    case kSiluMul: launch_act<kSiluMul, T>(a, threshold); break;
    case kMulSilu: launch_act<kMulSilu, T>(a, threshold); break;
    case kGeluMul: launch_act<kGeluMul, T>(a, threshold); break;
    case kGeluTanhMul: launch_act<kGeluTanhMul, T>(a, threshold); break;
    case kFatreluMul: launch_act<kFatreluMul, T>(a, threshold); break;
    default: TORCH_CHECK(false, "act_and_mul: unknown activation kind ", num(kind));
  }
}

template <typename T>
void launch_swiglu(const ActArgs& a, float alpha, float limit) {
  constexpr int H = kVecWidth<T> / 2;  // outputs per thread on the vector path
  auto* o = static_cast<T*>(a.out.ptr);
  auto* x = static_cast<const T*>(a.in.ptr);
  // Input packs of 2H elements need 16-byte aligned rows; output packs of H need 8-byte ones.
  const bool aligned = a.d % H == 0 && a.in.aligned(2 * H) && a.out.stride % H == 0 &&
                       is_aligned(a.out.ptr, H * sizeof(T));
  const int h = aligned ? H : 1;
  const dim3 grid = grid_for(a.in.rows, a.d / h), block(std::min<int64_t>(kThreads, a.d / h));
  if (aligned)
    launch_kernel(swigluoai_and_mul_kernel<T, H>, grid, block, a.stream, a.dev, o, a.out.stride, x,
                  a.in.stride, a.d, alpha, limit);
  else
    launch_kernel(swigluoai_and_mul_kernel<T, 1>, grid, block, a.stream, a.dev, o, a.out.stride,
                  x, a.in.stride, a.d, alpha, limit);
}

}  // namespace

void act_and_mul(at::Tensor& out, const at::Tensor& input, int64_t kind, double threshold) {
  const ActArgs a = act_args("act_and_mul", out, input);
  if (a.in.rows == 0 || a.d == 0) return;
  const DeviceGuard guard(input.device());
  const float th = static_cast<float>(threshold);
  switch (input.scalar_type()) {
    case at::kFloat: dispatch_kind<float>(a, static_cast<int>(kind), th); break;
    case at::kHalf: dispatch_kind<__half>(a, static_cast<int>(kind), th); break;
    case at::kBFloat16: dispatch_kind<__nv_bfloat16>(a, static_cast<int>(kind), th); break;
    default: TORCH_CHECK(false, "act_and_mul: unsupported dtype");
  }
}

void swigluoai_and_mul(at::Tensor& out, const at::Tensor& input, double alpha, double limit) {
  const ActArgs a = act_args("swigluoai_and_mul", out, input);
  if (a.in.rows == 0 || a.d == 0) return;
  const DeviceGuard guard(input.device());
  const float al = static_cast<float>(alpha), li = static_cast<float>(limit);
  switch (input.scalar_type()) {
    case at::kFloat: launch_swiglu<float>(a, al, li); break;
    case at::kHalf: launch_swiglu<__half>(a, al, li); break;
    case at::kBFloat16: launch_swiglu<__nv_bfloat16>(a, al, li); break;
    default: TORCH_CHECK(false, "swigluoai_and_mul: unsupported dtype");
  }
}

}  // namespace compile_ops
