// Launcher of the split-KV paged decode attention (the CUDA path of paged_attention_v1 / v2 when
// compile_ops/decode_attention.py picks it): tensors -> decode::Args, dispatch on the query type.
// The Python layer has checked every argument and chosen the split; these checks only guard the
// kernel's own assumptions.
#include <torch/all.h>

#include <optional>

#include "decode_attention.h"
#include "launch_utils.h"

namespace compile_ops {

void paged_decode_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const std::optional<at::Tensor>& alibi,
                            const at::Tensor& k_scale, const at::Tensor& v_scale,
                            const std::optional<at::Tensor>& partial_out,
                            const std::optional<at::Tensor>& partial_max,
                            const std::optional<at::Tensor>& partial_sum,
                            const std::optional<at::Tensor>& max_logits,
                            const std::optional<at::Tensor>& exp_sums,
                            const std::optional<at::Tensor>& tmp_out, double scale, int64_t kind,
                            int64_t split, int64_t nsplit, int64_t num_kv_heads, int64_t sub,
                            bool p_split) {
  constexpr const char* op = "paged_decode_attention";
  const int64_t seqs = query.size(0), heads = query.size(1), head = query.size(2);
  const int64_t group = heads / num_kv_heads, slices = (group + 15) / 16;
  const int64_t eb = key_cache.element_size();
  const int64_t bs = key_cache.size(3);
  TORCH_CHECK(query.scalar_type() == at::kHalf || query.scalar_type() == at::kBFloat16, op,
              ": query must be float16 or bfloat16");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, op, ": head_size must be contiguous");
  TORCH_CHECK(key_cache.size(4) * eb == 16 && key_cache.stride(4) == 1 &&
                  key_cache.stride(3) == key_cache.size(4) &&
                  key_cache.stride(2) == bs * key_cache.size(4) && value_cache.stride(3) == 1 &&
                  value_cache.stride(2) == bs,
              op, ": pages must be dense");
  TORCH_CHECK(bs * eb >= 16 && (bs == 8 || bs == 16 || bs == 32), op,
              ": block size ", bs, " with ", eb, "-byte elements is not supported");
  for (const at::Tensor* c : {&key_cache, &value_cache})
    TORCH_CHECK(is_aligned(c->data_ptr(), 16) && (c->stride(0) * eb) % 16 == 0 &&
                    (c->stride(1) * eb) % 16 == 0,
                op, ": caches must be 16-byte aligned per page");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous() &&
                  (block_tables.size(1) <= 1 || block_tables.stride(1) == 1),
              op, ": int32 block_tables (contiguous rows) and seq_lens");
  TORCH_CHECK(split % 32 == 0 && split > 0 && nsplit >= 1, op, ": bad split");
  TORCH_CHECK(sub == 0 || (sub >= 16 && sub <= 512 && (sub & (sub - 1)) == 0 && sub == split),
              op, ": bad sub-split");
  TORCH_CHECK((nsplit == 1 && sub == 0) || (partial_out && partial_max && partial_sum), op,
              ": several splits need the partial buffers");
  if (seqs == 0 || heads == 0) return;
  decode::Args a{};
  a.q = query.data_ptr();
  a.kc = static_cast<const uint8_t*>(key_cache.data_ptr());
  a.vc = static_cast<const uint8_t*>(value_cache.data_ptr());
  a.bt = block_tables.data_ptr<int>();
  a.lens = seq_lens.data_ptr<int>();
  a.alibi = alibi ? alibi->data_ptr<float>() : nullptr;
  a.ks = kind != 0 ? k_scale.data_ptr<float>() : nullptr;
  a.vs = kind != 0 ? v_scale.data_ptr<float>() : nullptr;
  a.out = out.data_ptr();
  a.po = partial_out ? partial_out->data_ptr<float>() : nullptr;
  a.pm = partial_max ? partial_max->data_ptr<float>() : nullptr;
  a.pl = partial_sum ? partial_sum->data_ptr<float>() : nullptr;
  a.v2 = max_logits.has_value();
  a.ml = a.v2 ? max_logits->data_ptr<float>() : nullptr;
  a.es = a.v2 ? exp_sums->data_ptr<float>() : nullptr;
  a.tmp = a.v2 ? tmp_out->data_ptr() : nullptr;
  a.scale = static_cast<float>(scale);
  a.nsplit = static_cast<int>(nsplit);
  a.split = static_cast<int>(split);
  a.bt_cols = static_cast<int>(block_tables.size(1));
  a.num_blocks = static_cast<int>(key_cache.size(0));
  a.bs_shift = bs == 8 ? 3 : (bs == 16 ? 4 : 5);
  a.group = static_cast<int>(group);
  a.slices = static_cast<int>(slices);
  a.heads = static_cast<int>(heads);
  a.sub = static_cast<int>(sub);
  a.sub_shift = 0;
  while (sub > 0 && (int64_t(1) << a.sub_shift) < sub) ++a.sub_shift;
  a.p_split = p_split;
  a.q_s = query.stride(0);
  a.q_h = query.stride(1);
  a.o_s = out.stride(0);
  a.o_h = out.stride(1);
  a.kc_b = key_cache.stride(0) * eb;
  a.kc_h = key_cache.stride(1) * eb;
  a.vc_b = value_cache.stride(0) * eb;
  a.vc_h = value_cache.stride(1) * eb;
  a.bt_s = block_tables.stride(0);
  if (a.v2) {
    TORCH_CHECK(max_logits->stride(0) == exp_sums->stride(0) &&
                    max_logits->stride(1) == exp_sums->stride(1) && tmp_out->stride(3) == 1,
                op, ": v2 buffers");
    a.ml_s = max_logits->stride(0);
    a.ml_h = max_logits->stride(1);
    a.tmp_s = tmp_out->stride(0);
    a.tmp_h = tmp_out->stride(1);
    a.tmp_p = tmp_out->stride(2);
  }
  const DeviceGuard guard(query.device());
  const dim3 grid(static_cast<unsigned>(num_kv_heads * slices), static_cast<unsigned>(seqs),
                  static_cast<unsigned>(sub ? 1 : nsplit));
  const auto stream = current_stream();
#if defined(COMPILE_OPS_EMULATE)
  const bool pdl = false;
#else
  const bool pdl = pdl_enabled(query.get_device());
#endif
  const int hs = static_cast<int>(head);
  const bool bf16 = query.scalar_type() == at::kBFloat16;
  switch (kind) {
    case 0:
      bf16 ? decode::launch_paged_decode<__nv_bfloat16, 0>(a, hs, grid, stream, pdl)
           : decode::launch_paged_decode<__half, 0>(a, hs, grid, stream, pdl);
      break;
    case 1:
      bf16 ? decode::launch_paged_decode<__nv_bfloat16, 1>(a, hs, grid, stream, pdl)
           : decode::launch_paged_decode<__half, 1>(a, hs, grid, stream, pdl);
      break;
    case 2:
      bf16 ? decode::launch_paged_decode<__nv_bfloat16, 2>(a, hs, grid, stream, pdl)
           : decode::launch_paged_decode<__half, 2>(a, hs, grid, stream, pdl);
      break;
    default:
      TORCH_CHECK(false, op, ": cache kind must be 0, 1 or 2, got ", kind);
  }
}

int64_t paged_decode_blocks_per_sm(int64_t head, int64_t kind, bool bf16) {
  const int hs = static_cast<int>(head);
  switch (kind) {
    case 0:
      return bf16 ? decode::paged_decode_blocks_per_sm<__nv_bfloat16, 0>(hs)
                  : decode::paged_decode_blocks_per_sm<__half, 0>(hs);
    case 1:
      return bf16 ? decode::paged_decode_blocks_per_sm<__nv_bfloat16, 1>(hs)
                  : decode::paged_decode_blocks_per_sm<__half, 1>(hs);
    case 2:
      return bf16 ? decode::paged_decode_blocks_per_sm<__nv_bfloat16, 2>(hs)
                  : decode::paged_decode_blocks_per_sm<__half, 2>(hs);
    default:
      return 0;
  }
}

}  // namespace compile_ops
