// Launcher of merge_attn_states: checks, device guard, current stream, dtype dispatch (inputs;
// output the same dtype or e4m3 codes with output_scale), 128-bit input accesses when every head
// start is aligned and element accesses otherwise.
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "compile_ops/merge_attn.cuh"
#include "launch_utils.h"

namespace compile_ops {

void merge_attn_states(at::Tensor& output, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse, const std::optional<at::Tensor>& output_lse,
                       std::optional<int64_t> prefill_tokens_with_context,
                       const std::optional<at::Tensor>& output_scale) {
  constexpr const char* op = "merge_attn_states";
  check_float_type(op, "prefix_output", prefix_output);
  check_same_type(op, "suffix_output", suffix_output, prefix_output);
  const bool fp8 = output_scale.has_value();
  if (fp8) {
    TORCH_CHECK(output.scalar_type() == at::kFloat8_e4m3fn, op,
                ": output must be float8_e4m3fn when output_scale is given, got ",
                output.scalar_type());
    check_same_device(op, "output_scale", *output_scale, output);
    TORCH_CHECK(output_scale->scalar_type() == at::kFloat && output_scale->numel() == 1, op,
                ": output_scale must be a float32 tensor holding one value");
  } else {
    check_same_type(op, "output", output, prefix_output);
  }
  check_same_device(op, "output", output, output);
  for (const at::Tensor* t : {&prefix_output, &suffix_output, &prefix_lse, &suffix_lse})
    check_same_device(op, "argument", *t, output);
  TORCH_CHECK(output.dim() == 3 && prefix_output.sizes() == output.sizes() &&
                  suffix_output.sizes() == output.sizes(),
              op, ": outputs must all be [tokens, heads, head_size]");
  const int64_t tokens = output.size(0), heads = output.size(1), hs = output.size(2);
  const at::Tensor* outs[] = {&output, &prefix_output, &suffix_output};
  for (const at::Tensor* t : outs)
    TORCH_CHECK(hs <= 1 || t->stride(2) == 1, op, ": head_size must be contiguous");
  auto check_lse = [&](const char* name, const at::Tensor& l) {
    TORCH_CHECK(l.scalar_type() == at::kFloat && l.dim() == 2 && l.size(0) == heads &&
                    l.size(1) == tokens,
                op, ": ", name, " must be a float32 [heads, tokens] tensor");
  };
  check_lse("prefix_lse", prefix_lse);
  check_lse("suffix_lse", suffix_lse);
  if (output_lse) {
    check_same_device(op, "output_lse", *output_lse, output);
    check_lse("output_lse", *output_lse);
  }
  const int64_t ctx = prefill_tokens_with_context.value_or(tokens);
  TORCH_CHECK(ctx >= 0 && ctx <= tokens, op, ": prefill_tokens_with_context must be in [0, ",
              num(tokens), "], got ", num(ctx));
  TORCH_CHECK(heads <= std::numeric_limits<int>::max() && hs <= std::numeric_limits<int>::max(),
              op, ": sizes out of range");
  if (tokens == 0 || heads == 0 || hs == 0) return;
  const DeviceGuard guard(output.device());
  const auto stream = current_stream();
  const int dev = output.get_device();
  MergeArgs a;
  a.out = output.data_ptr();
  a.out_t = output.stride(0);
  a.out_h = output.stride(1);
  a.pre = prefix_output.data_ptr();
  a.pre_t = prefix_output.stride(0);
  a.pre_h = prefix_output.stride(1);
  a.suf = suffix_output.data_ptr();
  a.suf_t = suffix_output.stride(0);
  a.suf_h = suffix_output.stride(1);
  a.pre_lse = prefix_lse.data_ptr<float>();
  a.pre_lse_h = prefix_lse.stride(0);
  a.pre_lse_t = prefix_lse.stride(1);
  a.suf_lse = suffix_lse.data_ptr<float>();
  a.suf_lse_h = suffix_lse.stride(0);
  a.suf_lse_t = suffix_lse.stride(1);
  a.out_lse = output_lse ? output_lse->data_ptr<float>() : nullptr;
  a.out_lse_h = output_lse ? output_lse->stride(0) : 0;
  a.out_lse_t = output_lse ? output_lse->stride(1) : 0;
  a.out_scale = fp8 ? output_scale->data_ptr<float>() : nullptr;
  a.tokens = tokens;
  a.ctx_tokens = ctx;
  a.heads = static_cast<int>(heads);
  a.head_size = static_cast<int>(hs);
  // T: the inputs' element type; O: the output's (T, or uint8_t for e4m3 codes). Inputs move in
  // 16-byte packs, the output in packs of the same element count (4 or 8 bytes for FP8).
  auto run = [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    constexpr int W = kVecWidth<T>;
    bool vec = hs % W == 0;
    for (const at::Tensor* x : outs) {
      const uintptr_t bytes = x == &output ? W * sizeof(O) : 16;
      vec = vec && is_aligned(x->data_ptr(), bytes) && x->stride(0) % W == 0 &&
            x->stride(1) % W == 0;
    }
    const int w = vec ? W : 1;
    const int64_t items = tokens * heads * (hs / w);
    const int64_t ctas = std::min<int64_t>(ceil_div(items, 256), int64_t(sm_count(dev)) * 16);
    const dim3 grid(static_cast<unsigned>(std::max<int64_t>(ctas, 1))), block(256);
    if (vec)
      launch_kernel(merge_attn_states_kernel<T, O, W>, grid, block, stream, dev, a);
    else
      launch_kernel(merge_attn_states_kernel<T, O, 1>, grid, block, stream, dev, a);
  };
  auto dispatch = [&](auto t) {
    if (fp8)
      run(t, uint8_t{});
    else
      run(t, t);
  };
  switch (prefix_output.scalar_type()) {
    case at::kFloat: dispatch(float{}); break;
    case at::kHalf: dispatch(__half{}); break;
    case at::kBFloat16: dispatch(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype");
  }
}

}  // namespace compile_ops
