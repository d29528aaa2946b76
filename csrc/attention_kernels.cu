// Launcher of merge_attn_states: checks, device guard, current stream, dtype dispatch, 128-bit
// accesses when every head start is 16-byte aligned and element accesses otherwise.
#include <torch/all.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "compile_ops/merge_attn.cuh"
#include "compile_ops/paged_attention.cuh"
#include "launch_utils.h"

namespace compile_ops {

void merge_attn_states(at::Tensor& output, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse, const std::optional<at::Tensor>& output_lse) {
  constexpr const char* op = "merge_attn_states";
  check_float_type(op, "output", output);
  check_same_type(op, "prefix_output", prefix_output, output);
  check_same_type(op, "suffix_output", suffix_output, output);
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
  a.tokens = tokens;
  a.heads = static_cast<int>(heads);
  a.head_size = static_cast<int>(hs);
  auto run = [&](auto t) {
    using T = decltype(t);
    constexpr int W = kVecWidth<T>;
    bool vec = hs % W == 0;
    for (const at::Tensor* x : outs)
      vec = vec && is_aligned(x->data_ptr(), 16) && x->stride(0) % W == 0 && x->stride(1) % W == 0;
    const int w = vec ? W : 1;
    const int64_t items = tokens * heads * (hs / w);
    const int64_t ctas = std::min<int64_t>(ceil_div(items, 256), int64_t(sm_count(dev)) * 16);
    const dim3 grid(static_cast<unsigned>(std::max<int64_t>(ctas, 1))), block(256);
    if (vec)
      launch_kernel(merge_attn_states_kernel<T, W>, grid, block, stream, dev, a);
    else
      launch_kernel(merge_attn_states_kernel<T, 1>, grid, block, stream, dev, a);
  };
  switch (output.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(__half{}); break;
    case at::kBFloat16: run(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype");
  }
}

// paged_attention_v1/v2: the partition kernel then the reduce kernel (v1 passes buffers the
// Python side allocated). kind: 0 auto, 1 e4m3, 2 e5m2.
void paged_attention(at::Tensor& out, at::Tensor& exp_sums, at::Tensor& max_logits,
                     at::Tensor& tmp_out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, int64_t num_kv_heads, double scale,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     const std::optional<at::Tensor>& alibi_slopes, int64_t kind,
                     const at::Tensor& k_scale, const at::Tensor& v_scale) {
  constexpr const char* op = "paged_attention";
  check_float_type(op, "query", query);
  check_same_type(op, "out", out, query);
  check_same_type(op, "tmp_out", tmp_out, query);
  const at::Tensor* on_dev[] = {&out,         &exp_sums,     &max_logits, &tmp_out,
                                &key_cache,   &value_cache,  &block_tables, &seq_lens,
                                &k_scale,     &v_scale};
  for (const at::Tensor* t : on_dev) check_same_device(op, "argument", *t, query);
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes() && query.stride(2) == 1 &&
                  out.stride(2) == 1,
              op, ": query/out must be [seqs, heads, head_size] with head_size contiguous");
  const int64_t seqs = query.size(0), heads = query.size(1), hs = query.size(2);
  TORCH_CHECK(num_kv_heads > 0 && heads % num_kv_heads == 0, op, ": bad num_kv_heads");
  TORCH_CHECK(hs <= kMaxHead, op, ": head_size above ", num(kMaxHead));
  const int64_t x = 16 / key_cache.element_size();
  TORCH_CHECK(key_cache.dim() == 5 && key_cache.size(1) == num_kv_heads &&
                  key_cache.size(2) * x == hs && key_cache.size(4) == x &&
                  key_cache.stride(4) == 1,
              op, ": key_cache must be [blocks, kv_heads, head_size / x, block_size, x]");
  TORCH_CHECK(value_cache.dim() == 4 && value_cache.size(0) == key_cache.size(0) &&
                  value_cache.size(1) == num_kv_heads && value_cache.size(2) == hs &&
                  value_cache.size(3) == key_cache.size(3),
              op, ": value_cache must be [blocks, kv_heads, head_size, block_size]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == seqs &&
                  (block_tables.size(1) <= 1 || block_tables.stride(1) == 1),
              op, ": block_tables must be int32 [seqs, max_blocks] with contiguous rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == seqs && seq_lens.is_contiguous(),
              op, ": seq_lens must be a contiguous int32 [seqs] tensor");
  TORCH_CHECK(max_logits.scalar_type() == at::kFloat && exp_sums.scalar_type() == at::kFloat &&
                  max_logits.dim() == 3 && max_logits.sizes() == exp_sums.sizes() &&
                  max_logits.strides() == exp_sums.strides() && max_logits.size(0) == seqs &&
                  max_logits.size(1) == heads && max_logits.stride(2) == 1 &&
                  max_logits.size(2) >= 1,
              op, ": exp_sums/max_logits must be float32 [seqs, heads, parts], same strides");
  TORCH_CHECK(tmp_out.dim() == 4 && tmp_out.size(0) == seqs && tmp_out.size(1) == heads &&
                  tmp_out.size(2) == max_logits.size(2) && tmp_out.size(3) == hs &&
                  tmp_out.stride(3) == 1,
              op, ": tmp_out must be [seqs, heads, parts, head_size]");
  if (alibi_slopes) {
    check_same_device(op, "alibi_slopes", *alibi_slopes, query);
    TORCH_CHECK(alibi_slopes->scalar_type() == at::kFloat && alibi_slopes->numel() == heads &&
                    alibi_slopes->is_contiguous(),
                op, ": alibi_slopes must be a contiguous float32 [heads] tensor");
  }
  const int kv = kv_kind(op, kind, key_cache, query);
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat &&
                  k_scale.numel() == 1 && v_scale.numel() == 1,
              op, ": k_scale/v_scale must be one float32 value each");
  if (seqs == 0 || heads == 0) return;
  const DeviceGuard guard(query.device());
  const auto stream = current_stream();
  const int dev = query.get_device();
  PagedAttnArgs a;
  a.query = query.data_ptr();
  a.q_seq = query.stride(0);
  a.q_head = query.stride(1);
  a.key_cache = key_cache.data_ptr();
  a.kc_block = key_cache.stride(0);
  a.kc_head = key_cache.stride(1);
  a.kc_chunk = key_cache.stride(2);
  a.kc_page = key_cache.stride(3);
  a.value_cache = value_cache.data_ptr();
  a.vc_block = value_cache.stride(0);
  a.vc_head = value_cache.stride(1);
  a.vc_dim = value_cache.stride(2);
  a.vc_page = value_cache.stride(3);
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.bt_stride = block_tables.stride(0);
  a.bt_cols = block_tables.size(1);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.alibi = alibi_slopes ? alibi_slopes->data_ptr<float>() : nullptr;
  a.scale = static_cast<float>(scale);
  a.k_scale = k_scale.data_ptr<float>();
  a.v_scale = v_scale.data_ptr<float>();
  a.heads = static_cast<int>(heads);
  a.kv_heads = static_cast<int>(num_kv_heads);
  a.head_size = static_cast<int>(hs);
  a.block_size = static_cast<int>(key_cache.size(3));
  a.num_blocks = key_cache.size(0);
  a.max_logits = max_logits.data_ptr<float>();
  a.exp_sums = exp_sums.data_ptr<float>();
  a.ml_seq = max_logits.stride(0);
  a.ml_head = max_logits.stride(1);
  a.tmp_out = tmp_out.data_ptr();
  a.tmp_seq = tmp_out.stride(0);
  a.tmp_head = tmp_out.stride(1);
  a.tmp_part = tmp_out.stride(2);
  a.out = out.data_ptr();
  a.out_seq = out.stride(0);
  a.out_head = out.stride(1);
  a.parts = static_cast<int>(max_logits.size(2));
  TORCH_CHECK(is_aligned(a.key_cache, 16) && key_cache.stride(2) % x == 0 &&
                  key_cache.stride(3) % x == 0 && key_cache.stride(1) % x == 0 &&
                  key_cache.stride(0) % x == 0,
              op, ": key_cache chunks must be 16-byte aligned");
  const int group = static_cast<int>(heads / num_kv_heads);
  const int slices = (group + kMaxGroup - 1) / kMaxGroup;
  const dim3 grid(static_cast<unsigned>(num_kv_heads * slices), static_cast<unsigned>(seqs),
                  static_cast<unsigned>(a.parts));
  const dim3 rgrid(static_cast<unsigned>(heads), static_cast<unsigned>(seqs));
  auto run = [&](auto t, auto c, auto kvc) {
    using T = decltype(t);
    using C = decltype(c);
    constexpr int KV = decltype(kvc)::value;
    constexpr int64_t VT = 16 / sizeof(C);
    const bool vec = value_cache.stride(3) == 1 && a.block_size % VT == 0 &&
                     is_aligned(a.value_cache, 16) && a.vc_block % VT == 0 &&
                     a.vc_head % VT == 0 && a.vc_dim % VT == 0;
    if (vec)
      launch_kernel(paged_attention_kernel<T, C, KV, true>, grid, dim3(kAttnThreads), stream, dev,
                    a);
    else
      launch_kernel(paged_attention_kernel<T, C, KV, false>, grid, dim3(kAttnThreads), stream,
                    dev, a);
    launch_kernel(paged_attention_reduce_kernel<T>, rgrid, dim3(128), stream, dev, a);
  };
  auto with_kind = [&](auto t) {
    using T = decltype(t);
    switch (kv) {
      case kKvAuto: run(t, T{}, std::integral_constant<int, kKvAuto>{}); break;
      case kKvE4M3: run(t, uint8_t{}, std::integral_constant<int, kKvE4M3>{}); break;
      default: run(t, uint8_t{}, std::integral_constant<int, kKvE5M2>{}); break;
    }
  };
  switch (query.scalar_type()) {
    case at::kFloat: with_kind(float{}); break;
    case at::kHalf: with_kind(__half{}); break;
    case at::kBFloat16: with_kind(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype");
  }
}

}  // namespace compile_ops
