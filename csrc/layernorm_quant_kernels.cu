// Launchers for RMSNorm + FP8 / INT8 quantization (vLLM's rms_norm_static_fp8_quant,
// fused_add_rms_norm_static_fp8_quant, rms_norm_dynamic_per_token_quant,
// rms_norm_per_block_quant): argument checks (a second line of defence behind
// compile_ops/norm_quant.py), device guard, current stream, dtype dispatch and the choice between
// the register-cached and the two-pass kernel (compile_ops/norm_quant.cuh).
//
// The launch plan (pack width, packs per thread, threads per row) is rms_norm's (row_plan.h),
// so the sums of squares are accumulated in the same order
// as our rms_norm and the normalized values match it bit for bit on rows with the same layout,
// except where rms_norm takes its shifted kernel (misaligned rows whose tensors share one 16-byte
// phase, from 4096 rows on: another summation order); these kernels have no shifted variant.
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "compile_ops/norm_quant.cuh"
#include "launch_utils.h"
#include "row_plan.h"

namespace compile_ops {
namespace {

template <typename T, bool INT8, int W, int MODE, int GS>
struct NqRegKernel {
  template <int V>
  struct K {
    static constexpr auto fn = rms_norm_quant_reg_kernel<T, INT8, W, V, MODE, GS>;
  };
};

template <typename T, bool INT8, int W, int MODE, int GS>
void nq_launch(const NormQuantParams<T>& a, cudaStream_t stream, int dev) {
  const RowPlan p = plan_rows(a.hidden / W, a.rows);
  if (launch_by_packs<NqRegKernel<T, INT8, W, MODE, GS>::template K>(p, stream, dev, a)) return;
  const int64_t n = a.hidden / W;
  const int threads = static_cast<int>(std::min<int64_t>(1024, ceil_div(n, 32) * 32));
  launch_kernel(rms_norm_quant_twopass_kernel<T, INT8, W, MODE, GS>,
                dim3(static_cast<unsigned>(a.rows)), dim3(threads), stream, dev, a);
}

// 128-bit packs when every row of input (and residual), the weight and the result allow it,
// else one element per access (the same test as rms_norm's, with the result's W-byte packs).
template <typename T, bool INT8, int MODE, int GS>
void nq_dispatch_width(const NormQuantParams<T>& a, const RowView& in, const RowView* res,
                       int dev) {
  constexpr int VW = kVecWidth<T>;
  const bool aligned = a.hidden % VW == 0 && is_aligned(a.weight, 16) && in.aligned(VW) &&
                       (res == nullptr || res->aligned(VW)) && is_aligned(a.out, VW);
  const auto stream = current_stream();
  if (aligned)
    nq_launch<T, INT8, VW, MODE, GS>(a, stream, dev);
  else
    nq_launch<T, INT8, 1, MODE, GS>(a, stream, dev);
}

template <int MODE, int GS, typename T>
void nq_dispatch_quant(const NormQuantParams<T>& a, bool int8, const RowView& in,
                       const RowView* res, int dev) {
  if constexpr (MODE == kNqToken || MODE == kNqGroup) {
    if (int8) {
      nq_dispatch_width<T, true, MODE, GS>(a, in, res, dev);
      return;
    }
  }
  nq_dispatch_width<T, false, MODE, GS>(a, in, res, dev);
}

template <int MODE, typename T>
void nq_dispatch_group(const NormQuantParams<T>& a, bool int8, int64_t group_size,
                       const RowView& in, const RowView* res, int dev) {
  if constexpr (MODE == kNqGroup) {
    if (group_size == 64)
      nq_dispatch_quant<MODE, 64>(a, int8, in, res, dev);
    else
      nq_dispatch_quant<MODE, 128>(a, int8, in, res, dev);
  } else {
    nq_dispatch_quant<MODE, 0>(a, int8, in, res, dev);
  }
}

// One float32 scalar tensor (static scale, scale_ub) on input's device.
void check_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& in) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_on(op, name, t, in);
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have exactly one element, got shape ",
              dims(t.sizes()));
}

template <int MODE>
void norm_quant_impl(const char* op, at::Tensor& result, const at::Tensor& input,
                     const at::Tensor* residual, const at::Tensor& weight, at::Tensor& scale,
                     double epsilon, const std::optional<at::Tensor>& scale_ub_opt,
                     int64_t group_size, bool is_scale_transposed) {
  constexpr bool DYN = MODE == kNqToken || MODE == kNqGroup;
  check_float_type(op, "input", input);
  TORCH_CHECK(on_device(input), op, ": input must be a CUDA tensor, got ", input.device());
  check_same_type(op, "weight", weight, input);
  check_same_device(op, "weight", weight, input);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  const int64_t hidden64 = input.size(-1);
  TORCH_CHECK(hidden64 <= std::numeric_limits<int>::max(), op, ": hidden size too large");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden64 &&
                  (hidden64 <= 1 || weight.stride(0) == 1),
              op, ": weight must be a contiguous 1-D tensor of size ", num(hidden64),
              ", got shape ", dims(weight.sizes()));
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0, op, ": epsilon must be finite and >= 0");
  const auto rt = result.scalar_type();
  const bool int8 = rt == at::kChar;
  TORCH_CHECK(rt == at::kFloat8_e4m3fn || (DYN && int8), op, ": result must have dtype ",
              DYN ? "float8_e4m3fn or int8" : "float8_e4m3fn", ", got ", rt);
  check_on(op, "result", result, input);
  TORCH_CHECK(result.sizes() == input.sizes(), op, ": result must have the shape of input ",
              dims(input.sizes()), ", got ", dims(result.sizes()));
  TORCH_CHECK(result.is_contiguous(), op, ": result must be contiguous, got strides ",
              dims(result.strides()));
  const RowView in = row_view(op, "input", input, /*writable=*/false);
  RowView rv{};
  if (residual) {
    check_same_type(op, "residual", *residual, input);
    check_same_device(op, "residual", *residual, input);
    TORCH_CHECK(residual->sizes() == input.sizes(), op,
                ": residual must have the shape of input ", dims(input.sizes()), ", got ",
                dims(residual->sizes()));
    rv = row_view(op, "residual", *residual, /*writable=*/true);
  }
  const int64_t rows = in.rows;
  const at::Tensor* ub =
      scale_ub_opt.has_value() && scale_ub_opt->defined() ? &*scale_ub_opt : nullptr;
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ",
              scale.scalar_type());
  check_on(op, "scale", scale, input);
  int64_t srs = 0, sgs = 0;
  if constexpr (!DYN) {
    check_scalar(op, "scale", scale, input);
  } else {
    if (ub) {
      check_scalar(op, "scale_ub", *ub, input);
      TORCH_CHECK(!int8, op, ": scale_ub is only supported with a float8_e4m3fn result");
    }
    int64_t t = 1;  // tokens: the product of the leading dims (rows even when hidden is 0)
    for (int64_t d = 0; d + 1 < input.dim(); ++d) t *= input.size(d);
    if constexpr (MODE == kNqToken) {
      TORCH_CHECK(scale.numel() == t && scale.is_contiguous(), op,
                  ": scale must be a contiguous float32 tensor of ", num(t),
                  " elements (one per token), got shape ", dims(scale.sizes()));
    } else {
      TORCH_CHECK(group_size == 64 || group_size == 128, op,
                  ": group_size must be 64 or 128, got ", num(group_size));
      TORCH_CHECK(hidden64 % group_size == 0, op, ": hidden size ", num(hidden64),
                  " must be a multiple of group_size ", num(group_size));
      const int64_t g = hidden64 / group_size;
      TORCH_CHECK(scale.dim() == 2 && scale.size(0) == t && scale.size(1) == g, op,
                  ": scale must have shape [", num(t), ", ", num(g), "], got ",
                  dims(scale.sizes()));
      if (!is_scale_transposed) {
        TORCH_CHECK(scale.is_contiguous(), op,
                    ": scale must be contiguous when is_scale_transposed is false, got strides ",
                    dims(scale.strides()));
      } else {
        TORCH_CHECK((t <= 1 || scale.stride(0) == 1) && (g <= 1 || scale.stride(1) >= t), op,
                    ": with is_scale_transposed, scale must be a column-major [tokens, groups] "
                    "view with strides (1, S), S >= tokens, got strides ",
                    dims(scale.strides()));
      }
      srs = scale.stride(0);
      sgs = scale.stride(1);
    }
  }
  if (rows == 0) return;
  const DeviceGuard guard(input.device());
  if (hidden64 == 0) {  // empty rows: amax 0, the minimum scale (per-group: no groups)
    if constexpr (MODE == kNqToken) scale.fill_(int8 ? kInt8MinScale : kFp8MinScale);
    return;
  }
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), op, ": too many rows");
  const int dev = input.get_device();
  const auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    NormQuantParams<T> a;
    a.out = static_cast<uint8_t*>(result.data_ptr());
    a.in = static_cast<const T*>(in.ptr);
    a.in_stride = in.stride;
    a.residual = residual ? static_cast<T*>(rv.ptr) : nullptr;
    a.res_stride = residual ? rv.stride : 0;
    a.weight = static_cast<const T*>(weight.data_ptr());
    a.scale = scale.data_ptr<float>();
    a.scale_row_stride = srs;
    a.scale_group_stride = sgs;
    a.scale_ub = ub ? ub->data_ptr<float>() : nullptr;
    a.rows = rows;
    a.hidden = static_cast<int>(hidden64);
    a.eps = static_cast<float>(epsilon);
    nq_dispatch_group<MODE>(a, int8, group_size, in, residual ? &rv : nullptr, dev);
  };
  switch (input.scalar_type()) {
    case at::ScalarType::Float:
      fill(static_cast<float*>(nullptr));
      break;
    case at::ScalarType::Half:
      fill(static_cast<__half*>(nullptr));
      break;
    case at::ScalarType::BFloat16:
      fill(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", input.scalar_type());
  }
}

}  // namespace

void rms_norm_static_fp8_quant(at::Tensor& result, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& scale,
                               double epsilon) {
  at::Tensor s = scale;
  norm_quant_impl<kNqStatic>("rms_norm_static_fp8_quant", result, input, nullptr, weight, s,
                             epsilon, std::nullopt, 0, false);
}

void fused_add_rms_norm_static_fp8_quant(at::Tensor& result, const at::Tensor& input,
                                         at::Tensor& residual, const at::Tensor& weight,
                                         const at::Tensor& scale, double epsilon) {
  at::Tensor s = scale;
  norm_quant_impl<kNqStaticAdd>("fused_add_rms_norm_static_fp8_quant", result, input, &residual,
                                weight, s, epsilon, std::nullopt, 0, false);
}

void rms_norm_dynamic_per_token_quant(at::Tensor& result, const at::Tensor& input,
                                      const at::Tensor& weight, at::Tensor& scale,
                                      double epsilon, const std::optional<at::Tensor>& scale_ub,
                                      const std::optional<at::Tensor>& residual) {
  const at::Tensor* res = residual.has_value() && residual->defined() ? &*residual : nullptr;
  norm_quant_impl<kNqToken>("rms_norm_dynamic_per_token_quant", result, input, res, weight, scale,
                            epsilon, scale_ub, 0, false);
}

void rms_norm_per_block_quant(at::Tensor& result, const at::Tensor& input,
                              const at::Tensor& weight, at::Tensor& scale, double epsilon,
                              const std::optional<at::Tensor>& scale_ub,
                              const std::optional<at::Tensor>& residual, int64_t group_size,
                              bool is_scale_transposed) {
  const at::Tensor* res = residual.has_value() && residual->defined() ? &*residual : nullptr;
  norm_quant_impl<kNqGroup>("rms_norm_per_block_quant", result, input, res, weight, scale,
                            epsilon, scale_ub, group_size, is_scale_transposed);
}

}  // namespace compile_ops
