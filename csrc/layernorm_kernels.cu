// Launchers for rms_norm, fused_add_rms_norm and fused_add_rms_norm_out: argument checks, device
// guard, current stream, dtype dispatch and the choice between the register-cached and the
// two-pass kernel. The two fused ops share every kernel: the in-place one passes residual as
// residual_out (and input as out).
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "compile_ops/norm.cuh"
#include "launch_utils.h"
#include "row_plan.h"

namespace compile_ops {
namespace {

// The shifted kernel for misaligned rows wins only at large batches. Measured on an H100
// (bf16, hidden 769, add + rms_norm): 4096 rows 12.6 us vs 13.8 us scalar, 16384 rows 47.6 vs
// 48.7 us; but 1 row 2.47 vs 1.24 us and 512 rows 4.62 vs 2.79 us. The cause of its fixed
// overhead is not established yet (see bench/NOTES.md); below this many rows the scalar kernel runs.
constexpr int64_t kShiftMinRows = 4096;

// Row pointers and strides of one launch. res / res_out: the fused ops' residual input and output
// (the same tensor for the in-place op), unused otherwise.
template <typename T>
struct NormArgs {
  T* out;
  int64_t os;
  const T* in;
  int64_t is;
  const T* res;
  int64_t rs;
  T* res_out;
  int64_t ros;
  const T* w;
  int64_t rows;
  int hidden;
  float eps;
};

template <typename T, int W, bool FUSED>
void launch_twopass(const NormArgs<T>& a, cudaStream_t stream, int dev) {
  const int64_t n = a.hidden / W;
  const int threads = static_cast<int>(std::min<int64_t>(1024, ceil_div(n, 32) * 32));
  launch_kernel(rms_norm_twopass_kernel<T, W, FUSED>, dim3(static_cast<unsigned>(a.rows)),
                dim3(threads), stream, dev, a.out, a.os, a.in, a.is, a.res, a.rs, a.res_out,
                a.ros, a.w, a.hidden, a.eps);
}

template <typename T, int W, bool FUSED>
struct RegKernel {
  template <int V>
  struct K {
    static constexpr auto fn = rms_norm_reg_kernel<T, W, V, FUSED>;
  };
};

template <typename T, bool FUSED>
struct ShiftKernel {
  template <int V>
  struct K {
    static constexpr auto fn = rms_norm_shift_kernel<T, V, FUSED>;
  };
};

template <typename T, int W, bool FUSED>
void launch_norm(const NormArgs<T>& a, cudaStream_t stream, int dev) {
  const RowPlan p = plan_rows(a.hidden / W, a.rows);
  if (!launch_by_packs<RegKernel<T, W, FUSED>::template K>(p, stream, dev, a.out, a.os, a.in,
                                                            a.is, a.res, a.rs, a.res_out, a.ros,
                                                            a.w, a.rows, a.hidden, a.eps))
    launch_twopass<T, W, FUSED>(a, stream, dev);
}

template <typename T, bool FUSED>
void launch_shift(const NormArgs<T>& a, cudaStream_t stream, int dev) {
  const RowPlan p = plan_rows(a.hidden / kVecWidth<T>, a.rows);
  if (!launch_by_packs<ShiftKernel<T, FUSED>::template K>(p, stream, dev, a.out, a.os, a.in, a.is,
                                                          a.res, a.rs, a.res_out, a.ros, a.w,
                                                          a.rows, a.hidden, a.eps))
    launch_twopass<T, 1, FUSED>(a, stream, dev);
}

// weight == nullptr: no weight (weightless RMSNorm); the kernels branch on it at run time.
// res / res_out: null for rms_norm; the same view twice for the in-place fused op.
template <typename T, bool FUSED>
void dispatch_width(const RowView& out, const RowView& in, const RowView* res,
                    const RowView* res_out, const at::Tensor* weight, int64_t rows, int hidden,
                    double eps, int dev) {
  constexpr int VW = kVecWidth<T>;
  const bool w_aligned = weight == nullptr || is_aligned(weight->data_ptr(), 16);
  const bool aligned = hidden % VW == 0 && w_aligned && out.aligned(VW) && in.aligned(VW) &&
                       (res == nullptr || (res->aligned(VW) && res_out->aligned(VW)));
  // Not aligned, but every row of out/in/residual/residual_out starts at the same offset from a
  // 16-byte boundary: shift each row to that boundary and keep 128-bit accesses for the body.
  const int phase = in.phase(VW, sizeof(T));
  const auto same_phase = [&](const RowView& v) {
    return v.phase(VW, sizeof(T)) == phase && v.stride % VW == in.stride % VW;
  };
  const bool shiftable = !aligned && rows >= kShiftMinRows && hidden >= 2 * VW && w_aligned &&
                         same_phase(out) &&
                         (res == nullptr || (same_phase(*res) && same_phase(*res_out)));
  NormArgs<T> a;
  a.out = static_cast<T*>(out.ptr);
  a.os = out.stride;
  a.in = static_cast<const T*>(in.ptr);
  a.is = in.stride;
  a.res = res ? static_cast<const T*>(res->ptr) : nullptr;
  a.rs = res ? res->stride : 0;
  a.res_out = res ? static_cast<T*>(res_out->ptr) : nullptr;
  a.ros = res ? res_out->stride : 0;
  a.w = weight ? static_cast<const T*>(weight->data_ptr()) : nullptr;
  a.rows = rows;
  a.hidden = hidden;
  a.eps = static_cast<float>(eps);
  const auto stream = current_stream();
  if (aligned)
    launch_norm<T, VW, FUSED>(a, stream, dev);
  else if (shiftable)
    launch_shift<T, FUSED>(a, stream, dev);
  else
    launch_norm<T, 1, FUSED>(a, stream, dev);
}

// rms_norm: FUSED false, no residual. fused_add_rms_norm: in place, out is input and
// residual_out is residual (both written). fused_add_rms_norm_out: four tensors, input and
// residual only read (their rows may repeat, stride 0), out and residual_out written.
template <bool FUSED>
void norm_impl(const char* op, const at::Tensor& out, const at::Tensor& input,
               const at::Tensor* residual, const at::Tensor* residual_out, bool in_place,
               const std::optional<at::Tensor>& weight_opt, double epsilon) {
  // None (or an undefined tensor) is no weight: vLLM's `Tensor? weight`.
  const at::Tensor* weight =
      weight_opt.has_value() && weight_opt->defined() ? &*weight_opt : nullptr;
  check_float_type(op, "input", input);
  if (weight) {
    check_same_type(op, "weight", *weight, input);
    check_same_device(op, "weight", *weight, input);
  }
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  const int64_t hidden64 = input.size(-1);
  TORCH_CHECK(hidden64 <= std::numeric_limits<int>::max(), op, ": hidden size too large");
  TORCH_CHECK(!weight || (weight->dim() == 1 && weight->size(0) == hidden64 &&
                          weight->stride(0) == 1),
              op, ": weight must be a contiguous 1-D tensor of size ", num(hidden64),
              ", got shape ", dims(weight ? weight->sizes() : at::IntArrayRef{}));
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0, op, ": epsilon must be finite and >= 0");
  // A written tensor of the input's dtype, device and shape, as rows.
  const auto written = [&](const char* name, const at::Tensor& t) {
    check_same_type(op, name, t, input);
    check_same_device(op, name, t, input);
    TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " must have the shape of input ",
                dims(input.sizes()), ", got ", dims(t.sizes()));
    return row_view(op, name, t, /*writable=*/true);
  };
  const RowView in = row_view(op, "input", input, /*writable=*/in_place);
  const RowView o = in_place ? in : written("out", out);
  RowView r{}, ro{};
  if (FUSED) {
    check_same_type(op, "residual", *residual, input);
    check_same_device(op, "residual", *residual, input);
    TORCH_CHECK(residual->sizes() == input.sizes(), op,
                ": residual must have the shape of input ", dims(input.sizes()), ", got ",
                dims(residual->sizes()));
    r = row_view(op, "residual", *residual, /*writable=*/in_place);
    ro = in_place ? r : written("residual_out", *residual_out);
  }
  const int64_t rows = in.rows;
  if (rows == 0 || hidden64 == 0) return;
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), op, ": too many rows");
  const DeviceGuard guard(input.device());
  const int dev = input.get_device();
  const RowView* rp = FUSED ? &r : nullptr;
  const RowView* rop = FUSED ? &ro : nullptr;
  switch (input.scalar_type()) {
    case at::ScalarType::Float:
      dispatch_width<float, FUSED>(o, in, rp, rop, weight, rows, hidden64, epsilon, dev);
      break;
    case at::ScalarType::Half:
      dispatch_width<__half, FUSED>(o, in, rp, rop, weight, rows, hidden64, epsilon, dev);
      break;
    case at::ScalarType::BFloat16:
      dispatch_width<__nv_bfloat16, FUSED>(o, in, rp, rop, weight, rows, hidden64, epsilon, dev);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", input.scalar_type());
  }
}

}  // namespace

void rms_norm(at::Tensor& out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
              double epsilon) {
  norm_impl<false>("rms_norm", out, input, nullptr, nullptr, /*in_place=*/false, weight, epsilon);
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                        const std::optional<at::Tensor>& weight, double epsilon) {
  norm_impl<true>("fused_add_rms_norm", input, input, &residual, &residual, /*in_place=*/true,
                  weight, epsilon);
}

void fused_add_rms_norm_out(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& input,
                            const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                            double epsilon) {
  norm_impl<true>("fused_add_rms_norm_out", out, input, &residual, &residual_out,
                  /*in_place=*/false, weight, epsilon);
}

}  // namespace compile_ops
