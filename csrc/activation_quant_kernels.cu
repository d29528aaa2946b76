// Launchers for SiLU-and-mul + quantization: checks (a second line of defence behind
// compile_ops/activation_quant.py), device guard, current stream, dtype dispatch, 128-bit packs
// when every row is 16-byte aligned and element accesses otherwise.
#include <torch/all.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "compile_ops/activation_quant.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

constexpr int kThreads = 256;

// Input [..., 2d] float, rows strided (last dim contiguous); output [..., d] contiguous.
struct SiluQuantArgs {
  RowView in;
  int d = 0;
  int dev = 0;
  cudaStream_t stream = nullptr;
};

SiluQuantArgs silu_quant_args(const char* op, const char* out_name, const at::Tensor& out,
                              const at::Tensor& input) {
  check_float_type(op, "input", input);
  check_same_device(op, "input", input, input);
  check_same_device(op, out_name, out, input);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) % 2 == 0, op,
              ": input's last dimension must be even (2 * d)");
  const int64_t d = input.size(-1) / 2;
  TORCH_CHECK(d <= std::numeric_limits<int>::max() / 2, op, ": last dimension too large");
  auto want = input.sizes().vec();
  want.back() = d;
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(want), op, ": ", out_name, " must have shape ",
              dims(want), ", got ", dims(out.sizes()));
  TORCH_CHECK(out.is_contiguous(), op, ": ", out_name, " must be contiguous");
  SiluQuantArgs a{row_view(op, "input", input, /*writable=*/false), static_cast<int>(d),
                  input.get_device(), current_stream()};
  TORCH_CHECK(a.in.rows <= std::numeric_limits<int>::max(), op, ": too many rows");
  return a;
}

void check_one_float(const char* op, const char* name, const at::Tensor& t,
                     const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_same_device(op, name, t, input);
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, op, ": ", name,
              " must hold one value (shape [1] or []), got ", dims(t.sizes()));
}

template <typename T>
void launch_silu_quant(const SiluQuantArgs& a, uint8_t* out, const float* scale) {
  constexpr int VW = kVecWidth<T>;
  const auto* x = static_cast<const T*>(a.in.ptr);
  // Vector path: 16-byte aligned input rows (gate and up: d % VW == 0) and VW-byte output packs.
  const bool aligned = a.d % VW == 0 && a.in.aligned(VW) && is_aligned(out, VW);
  const int w = aligned ? VW : 1;
  const int64_t packs = a.d / w;
  const dim3 grid(static_cast<unsigned>(a.in.rows),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(packs, kThreads), 65535)));
  const dim3 block(static_cast<unsigned>(std::min<int64_t>(kThreads, packs)));
  if (aligned)
    launch_kernel(silu_and_mul_quant_kernel<T, VW>, grid, block, a.stream, a.dev, out, x,
                  a.in.stride, a.d, scale);
  else
    launch_kernel(silu_and_mul_quant_kernel<T, 1>, grid, block, a.stream, a.dev, out, x,
                  a.in.stride, a.d, scale);
}

struct PerBlockArgs {
  void* out;
  float* scales;
  int64_t sc_tok_stride, sc_grp_stride;
  const void* in;
  int64_t in_stride;
  const float* scale_ub;
  int64_t tokens;
  int groups, d;
  bool in_aligned;  // 16-byte aligned rows
  int dev;
  cudaStream_t stream;
};

template <typename T, bool FP8, int GS>
void launch_per_block(const PerBlockArgs& a) {
  constexpr int E = kVecWidth<T>;  // elements per thread: one 128-bit pack of gate and of up
  constexpr int TPG = GS / E;
  const bool vec = a.in_aligned && is_aligned(a.out, E);
  const int64_t total = a.tokens * a.groups;
  const int64_t threads = std::min<int64_t>(kPerBlockThreads, ceil_div(total * TPG, 32) * 32);
  const int64_t blocks = ceil_div(total, threads / TPG);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "silu_and_mul_per_block_quant: ",
              "too many groups");
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  const T* x = static_cast<const T*>(a.in);
  if (vec)
    launch_kernel(silu_and_mul_per_block_quant_kernel<T, FP8, GS, E, true>, grid, block,
                  a.stream, a.dev, a.out, a.scales, a.sc_tok_stride, a.sc_grp_stride, x,
                  a.in_stride, a.scale_ub, a.tokens, a.groups, a.d);
  else
    launch_kernel(silu_and_mul_per_block_quant_kernel<T, FP8, GS, E, false>, grid, block,
                  a.stream, a.dev, a.out, a.scales, a.sc_tok_stride, a.sc_grp_stride, x,
                  a.in_stride, a.scale_ub, a.tokens, a.groups, a.d);
}

template <typename T>
void dispatch_per_block(const PerBlockArgs& a, bool fp8, int64_t group_size) {
  if (fp8) {
    if (group_size == 64) launch_per_block<T, true, 64>(a);
    else launch_per_block<T, true, 128>(a);
  } else {
    if (group_size == 64) launch_per_block<T, false, 64>(a);
    else launch_per_block<T, false, 128>(a);
  }
}

}  // namespace

void silu_and_mul_quant(at::Tensor& result, const at::Tensor& input, const at::Tensor& scale) {
  constexpr const char* kOp = "silu_and_mul_quant";
  TORCH_CHECK(result.scalar_type() == at::kFloat8_e4m3fn, kOp,
              ": result must be float8_e4m3fn, got ", result.scalar_type());
  const SiluQuantArgs a = silu_quant_args(kOp, "result", result, input);
  check_one_float(kOp, "scale", scale, input);
  if (a.in.rows == 0 || a.d == 0) return;
  const DeviceGuard guard(input.device());
  auto* out = static_cast<uint8_t*>(result.data_ptr());
  const float* s = scale.data_ptr<float>();
  switch (input.scalar_type()) {
    case at::kFloat: launch_silu_quant<float>(a, out, s); break;
    case at::kHalf: launch_silu_quant<__half>(a, out, s); break;
    case at::kBFloat16: launch_silu_quant<__nv_bfloat16>(a, out, s); break;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype");
  }
}

void silu_and_mul_per_block_quant(at::Tensor& out, const at::Tensor& input, at::Tensor& scales,
                                  int64_t group_size, const std::optional<at::Tensor>& scale_ub,
                                  bool is_scale_transposed) {
  constexpr const char* kOp = "silu_and_mul_per_block_quant";
  const bool fp8 = out.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || out.scalar_type() == at::kChar, kOp,
              ": out must be float8_e4m3fn or int8, got ", out.scalar_type());
  TORCH_CHECK(input.dim() == 2, kOp, ": input must be 2-D [num_tokens, 2 * d], got ",
              dims(input.sizes()));
  const SiluQuantArgs a = silu_quant_args(kOp, "out", out, input);
  TORCH_CHECK(group_size == 64 || group_size == 128, kOp, ": group_size must be 64 or 128, got ",
              num(group_size));
  TORCH_CHECK(a.d % group_size == 0, kOp, ": d (", num(a.d),
              ") must be a multiple of group_size ", num(group_size));
  const int64_t tokens = input.size(0);
  const int groups = static_cast<int>(a.d / group_size);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, kOp, ": scales must be float32, got ",
              scales.scalar_type());
  check_same_device(kOp, "scales", scales, input);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == tokens && scales.size(1) == groups, kOp,
              ": scales must have shape [", num(tokens), ", ", num(groups), "], got ",
              dims(scales.sizes()));
  const int64_t want_tok = is_scale_transposed ? 1 : groups;
  const int64_t want_grp = is_scale_transposed ? tokens : 1;
  TORCH_CHECK((tokens <= 1 || scales.stride(0) == want_tok) &&
                  (groups <= 1 || scales.stride(1) == want_grp),
              kOp, ": scales must have strides [", num(want_tok), ", ", num(want_grp),
              "] with is_scale_transposed=", is_scale_transposed ? "true" : "false", ", got ",
              dims(scales.strides()));
  const float* ub = nullptr;
  if (scale_ub.has_value()) {
    TORCH_CHECK(fp8, kOp, ": scale_ub is only supported with a float8_e4m3fn out");
    check_one_float(kOp, "scale_ub", *scale_ub, input);
    ub = scale_ub->data_ptr<float>();
  }
  if (tokens == 0 || groups == 0) return;
  const DeviceGuard guard(input.device());
  const PerBlockArgs p{out.data_ptr(), scales.data_ptr<float>(), want_tok, want_grp,
                       a.in.ptr, a.in.stride, ub, tokens, groups, a.d,
                       a.in.aligned(static_cast<int>(16 / input.element_size())), a.dev,
                       a.stream};
  switch (input.scalar_type()) {
    case at::kFloat: dispatch_per_block<float>(p, fp8, group_size); break;
    case at::kHalf: dispatch_per_block<__half>(p, fp8, group_size); break;
    case at::kBFloat16: dispatch_per_block<__nv_bfloat16>(p, fp8, group_size); break;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype");
  }
}

}  // namespace compile_ops
