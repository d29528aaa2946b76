// Declarations of every launcher in csrc/ (their Python bindings: torch_bindings.cpp, and the
// emulated build's tests/emulated/csrc/emu_bindings.cpp).
#pragma once

#include <torch/all.h>

#include <optional>
#include <string>

namespace compile_ops {
// weight: None (or undefined) = no weight, as vLLM's `Tensor? weight`.
void rms_norm(at::Tensor& out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
              double epsilon);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                        const std::optional<at::Tensor>& weight, double epsilon);
// Out of place: out <- rms_norm(input + residual) * weight, residual_out <- input + residual.
void fused_add_rms_norm_out(at::Tensor& out, at::Tensor& residual_out, const at::Tensor& input,
                            const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                            double epsilon);
void act_and_mul(at::Tensor& out, const at::Tensor& input, int64_t kind, double threshold);
void swigluoai_and_mul(at::Tensor& out, const at::Tensor& input, double alpha, double limit);
void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox, int64_t rope_dim_offset = 0,
                      bool inverse = false);
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t kind,
                       const at::Tensor& k_scale, const at::Tensor& v_scale);
void reshape_and_cache_flash(const at::Tensor& key, const at::Tensor& value,
                             at::Tensor& key_cache, at::Tensor& value_cache,
                             const at::Tensor& slot_mapping, int64_t kind,
                             const at::Tensor& k_scale, const at::Tensor& v_scale);
void gather_cache(const at::Tensor& src_cache, at::Tensor& dst, const at::Tensor& block_table,
                  const at::Tensor& cu_seq_lens, const std::optional<at::Tensor>& token_to_seq,
                  int64_t rows, int64_t batch, int64_t kind, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& seq_starts);
void convert_fp8(at::Tensor& output, const at::Tensor& input, double scale, int64_t kind);
void swap_blocks(const at::Tensor& src, at::Tensor& dst, int64_t block_bytes,
                 const at::Tensor& block_mapping, const std::string& mode);
bool fused_rope_and_cache_flash(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                const at::Tensor& value, int64_t head_size,
                                const at::Tensor& cos_sin_cache, bool is_neox,
                                at::Tensor& key_cache, at::Tensor& value_cache,
                                const at::Tensor& slot_mapping, int64_t kind,
                                const at::Tensor& k_scale, const at::Tensor& v_scale,
                                bool write_key);
bool fused_rope_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          const at::Tensor& value, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox, at::Tensor& key_cache,
                          at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t kind,
                          const at::Tensor& k_scale, const at::Tensor& v_scale, bool write_key);
void merge_attn_states(at::Tensor& output, const at::Tensor& prefix_output,
                       const at::Tensor& prefix_lse, const at::Tensor& suffix_output,
                       const at::Tensor& suffix_lse, const std::optional<at::Tensor>& output_lse,
                       std::optional<int64_t> prefill_tokens_with_context,
                       const std::optional<at::Tensor>& output_scale);
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
                            bool p_split);
int64_t paged_decode_blocks_per_sm(int64_t head, int64_t kind, bool bf16);
void concat_and_cache_mla(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor& kv_cache,
                          const at::Tensor& slot_mapping, int64_t kind, const at::Tensor& scale);
void concat_and_cache_mla_rope_fused(const at::Tensor& positions, at::Tensor& q_pe,
                                     at::Tensor& k_pe, const at::Tensor& kv_c,
                                     const at::Tensor& cos_sin_cache, bool is_neox,
                                     const at::Tensor& slot_mapping, at::Tensor& kv_cache,
                                     int64_t kind, const at::Tensor& scale);
void cp_gather_and_upconvert_fp8_kv_cache(const at::Tensor& src_cache, at::Tensor& dst,
                                          const at::Tensor& block_table,
                                          const at::Tensor& workspace_starts, int64_t batch_size,
                                          const std::optional<at::Tensor>& seq_starts);
void indexer_k_quant_and_cache(const at::Tensor& k, at::Tensor& kv_cache,
                               const at::Tensor& slot_mapping, int64_t quant_block_size,
                               bool ue8m0);
void cp_gather_indexer_k_quant_cache(const at::Tensor& kv_cache, at::Tensor& dst_k,
                                     at::Tensor& dst_scale, const at::Tensor& block_table,
                                     const at::Tensor& cu_seq_lens, int64_t quant_block_size);
void argmax(at::Tensor& out, const at::Tensor& input);
// FP8 / INT8 activation quantization (vLLM's quant ops; csrc/include/compile_ops/quant.cuh).
void silu_and_mul_quant(at::Tensor& result, const at::Tensor& input, const at::Tensor& scale);
void silu_and_mul_per_block_quant(at::Tensor& out, const at::Tensor& input, at::Tensor& scales,
                                  int64_t group_size, const std::optional<at::Tensor>& scale_ub,
                                  bool is_scale_transposed);
void static_scaled_fp8_quant(at::Tensor& result, const at::Tensor& input, const at::Tensor& scale,
                             int64_t group_m, int64_t group_n);
void dynamic_scaled_fp8_quant(at::Tensor& result, const at::Tensor& input, at::Tensor& scale);
void dynamic_per_token_scaled_fp8_quant(at::Tensor& result, const at::Tensor& input,
                                        at::Tensor& scale,
                                        const std::optional<at::Tensor>& scale_ub);
void per_token_group_fp8_quant(const at::Tensor& input, at::Tensor& output_q,
                               at::Tensor& output_s, int64_t group_size, double eps,
                               double fp8_min, double fp8_max, bool scale_ue8m0);
void rms_norm_static_fp8_quant(at::Tensor& result, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& scale, double epsilon);
void fused_add_rms_norm_static_fp8_quant(at::Tensor& result, const at::Tensor& input,
                                         at::Tensor& residual, const at::Tensor& weight,
                                         const at::Tensor& scale, double epsilon);
void rms_norm_dynamic_per_token_quant(at::Tensor& result, const at::Tensor& input,
                                      const at::Tensor& weight, at::Tensor& scale, double epsilon,
                                      const std::optional<at::Tensor>& scale_ub,
                                      const std::optional<at::Tensor>& residual);
void rms_norm_per_block_quant(at::Tensor& result, const at::Tensor& input,
                              const at::Tensor& weight, at::Tensor& scale, double epsilon,
                              const std::optional<at::Tensor>& scale_ub,
                              const std::optional<at::Tensor>& residual, int64_t group_size,
                              bool is_scale_transposed);
// All-reduce (sum, over symmetric memory) + residual add + RMSNorm, in place on input and
// residual. buffer_ptrs / signal_pad_ptrs: device int64 tables of every rank's symmetric buffer
// and signal pad (compile_ops/allreduce_norm.py sets them up); mode 0 one-shot, 1 two-shot.
void fused_allreduce_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                                  const at::Tensor& weight, double epsilon,
                                  const at::Tensor& buffer_ptrs,
                                  const at::Tensor& signal_pad_ptrs, int64_t rank,
                                  int64_t world_size, int64_t buffer_bytes,
                                  int64_t signal_pad_bytes, int64_t mode);
}  // namespace compile_ops
