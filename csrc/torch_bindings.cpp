// Python bindings of the launchers as compile_ops._C. The ops themselves are declared in Python
// (torch.library.custom_op); these functions are their CUDA kernels.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compile_ops CUDA kernels (launchers called by the registered ops)";
  m.def("rms_norm", &compile_ops::rms_norm, "out <- rms_norm(input) * weight (weight may be None)",
        py::arg("out"), py::arg("input"), py::arg("weight"), py::arg("epsilon"));
  m.def("fused_add_rms_norm", &compile_ops::fused_add_rms_norm,
        "residual <- input + residual; input <- rms_norm(residual) * weight (weight may be None)",
        py::arg("input"), py::arg("residual"), py::arg("weight"), py::arg("epsilon"));
  m.def("fused_add_rms_norm_out", &compile_ops::fused_add_rms_norm_out,
        "residual_out <- input + residual; out <- rms_norm(input + residual) * weight (weight "
        "may be None; input and residual only read)",
        py::arg("out"), py::arg("residual_out"), py::arg("input"), py::arg("residual"),
        py::arg("weight"), py::arg("epsilon"));
  m.def("act_and_mul", &compile_ops::act_and_mul,
        "out <- act(input[..., :d]) * input[..., d:] (kind: compile_ops.activation._KIND)",
        py::arg("out"), py::arg("input"), py::arg("kind"), py::arg("threshold"));
  m.def("swigluoai_and_mul", &compile_ops::swigluoai_and_mul,
        "out <- gpt-oss clamped SwiGLU of interleaved gate/up", py::arg("out"), py::arg("input"),
        py::arg("alpha"), py::arg("limit"));
  m.def("rotary_embedding", &compile_ops::rotary_embedding,
        "rotate query (and key) in place by the cos/sin of each token's position",
        py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("head_size"),
        py::arg("cos_sin_cache"), py::arg("is_neox"), py::arg("rope_dim_offset") = 0,
        py::arg("inverse") = false);
  m.def("reshape_and_cache", &compile_ops::reshape_and_cache,
        "write key/value at their slots into the x-packed paged cache (kind: 0 auto, 1 e4m3, 2 "
        "e5m2)",
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("slot_mapping"), py::arg("kind"), py::arg("k_scale"), py::arg("v_scale"));
  m.def("reshape_and_cache_flash", &compile_ops::reshape_and_cache_flash,
        "write key/value at their slots into an NHD/HND paged cache", py::arg("key"),
        py::arg("value"), py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"),
        py::arg("kind"), py::arg("k_scale"), py::arg("v_scale"));
  m.def("gather_cache", &compile_ops::gather_cache,
        "gather (and dequantize) cached tokens by block table into rows of dst; token_to_seq "
        "None = cp_gather_cache",
        py::arg("src_cache"), py::arg("dst"), py::arg("block_table"), py::arg("cu_seq_lens"),
        py::arg("token_to_seq"), py::arg("rows"), py::arg("batch"), py::arg("kind"),
        py::arg("scale"), py::arg("seq_starts"));
  m.def("convert_fp8", &compile_ops::convert_fp8, "FP8 <-> float conversion with a scale",
        py::arg("output"), py::arg("input"), py::arg("scale"), py::arg("kind"));
  m.def("swap_blocks", &compile_ops::swap_blocks, "copy blocks by a [pairs, 2] CPU mapping",
        py::arg("src"), py::arg("dst"), py::arg("block_bytes"), py::arg("block_mapping"),
        py::arg("mode"));
  m.def("fused_rope_and_cache_flash", &compile_ops::fused_rope_and_cache_flash,
        "RoPE on query/key + rotated key and value into the flash cache in one kernel; returns "
        "false (doing nothing) for layouts it does not take",
        py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("head_size"), py::arg("cos_sin_cache"), py::arg("is_neox"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"), py::arg("kind"), py::arg("k_scale"),
        py::arg("v_scale"), py::arg("write_key"));
  m.def("fused_rope_and_cache", &compile_ops::fused_rope_and_cache,
        "RoPE on query/key + rotated key and value into vLLM's paged cache (x-packed keys) in "
        "one kernel; returns false (doing nothing) for layouts it does not take",
        py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("head_size"), py::arg("cos_sin_cache"), py::arg("is_neox"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"), py::arg("kind"), py::arg("k_scale"),
        py::arg("v_scale"), py::arg("write_key"));
  m.def("merge_attn_states", &compile_ops::merge_attn_states,
        "merge two partial attention results by their log-sum-exps", py::arg("output"),
        py::arg("prefix_output"), py::arg("prefix_lse"), py::arg("suffix_output"),
        py::arg("suffix_lse"), py::arg("output_lse"), py::arg("prefill_tokens_with_context"),
        py::arg("output_scale"));
  m.def("paged_decode_attention", &compile_ops::paged_decode_attention,
        "split-KV decode attention over the paged cache (compile_ops/decode_attention.py plans "
        "and calls it): output, or float32 partials per split",
        py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("alibi"), py::arg("k_scale"),
        py::arg("v_scale"), py::arg("partial_out"), py::arg("partial_max"),
        py::arg("partial_sum"), py::arg("max_logits"), py::arg("exp_sums"), py::arg("tmp_out"),
        py::arg("scale"), py::arg("kind"), py::arg("split"), py::arg("nsplit"),
        py::arg("num_kv_heads"), py::arg("sub"), py::arg("p_split"));
  m.def("paged_decode_blocks_per_sm", &compile_ops::paged_decode_blocks_per_sm,
        "resident CTAs per SM of the decode attention kernel (0: no kernel for the head size)",
        py::arg("head"), py::arg("kind"), py::arg("bf16"));
  m.def("concat_and_cache_mla", &compile_ops::concat_and_cache_mla,
        "MLA cache entries [kv_c | k_pe] (auto / fp8 / fp8_ds_mla) at the slots", py::arg("kv_c"),
        py::arg("k_pe"), py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("kind"),
        py::arg("scale"));
  m.def("concat_and_cache_mla_rope_fused", &compile_ops::concat_and_cache_mla_rope_fused,
        "RoPE on q_pe and k_pe in place, then the MLA cache write, in one kernel",
        py::arg("positions"), py::arg("q_pe"), py::arg("k_pe"), py::arg("kv_c"),
        py::arg("cos_sin_cache"), py::arg("is_neox"), py::arg("slot_mapping"),
        py::arg("kv_cache"), py::arg("kind"), py::arg("scale"));
  m.def("cp_gather_and_upconvert_fp8_kv_cache", &compile_ops::cp_gather_and_upconvert_fp8_kv_cache,
        "gather fp8_ds_mla entries into a bf16 workspace", py::arg("src_cache"), py::arg("dst"),
        py::arg("block_table"), py::arg("workspace_starts"), py::arg("batch_size"),
        py::arg("seq_starts"));
  m.def("indexer_k_quant_and_cache", &compile_ops::indexer_k_quant_and_cache,
        "per-group e4m3 quantization of the indexer key into the block-major cache",
        py::arg("k"), py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("quant_block_size"),
        py::arg("ue8m0"));
  m.def("cp_gather_indexer_k_quant_cache", &compile_ops::cp_gather_indexer_k_quant_cache,
        "gather the indexer cache's codes and scales", py::arg("kv_cache"), py::arg("dst_k"),
        py::arg("dst_scale"), py::arg("block_table"), py::arg("cu_seq_lens"),
        py::arg("quant_block_size"));
  m.def("argmax", &compile_ops::argmax,
        "out[r] <- index of the first maximum of input[r, :] (NaN the largest)", py::arg("out"),
        py::arg("input"));
  m.def("silu_and_mul_quant", &compile_ops::silu_and_mul_quant,
        "result <- fp8(T(T(silu(x1)) * x2) * (1 / scale)) (static per-tensor scale)",
        py::arg("result"), py::arg("input"), py::arg("scale"));
  m.def("silu_and_mul_per_block_quant", &compile_ops::silu_and_mul_per_block_quant,
        "out, scales <- per-(token, group) FP8/INT8 quantization of fp32 silu(x1) * x2",
        py::arg("out"), py::arg("input"), py::arg("scales"), py::arg("group_size"),
        py::arg("scale_ub") = py::none(), py::arg("is_scale_transposed") = false);
  m.def("static_scaled_fp8_quant", &compile_ops::static_scaled_fp8_quant, py::arg("result"),
        py::arg("input"), py::arg("scale"), py::arg("group_m"), py::arg("group_n"));
  m.def("dynamic_scaled_fp8_quant", &compile_ops::dynamic_scaled_fp8_quant, py::arg("result"),
        py::arg("input"), py::arg("scale"));
  m.def("dynamic_per_token_scaled_fp8_quant", &compile_ops::dynamic_per_token_scaled_fp8_quant,
        py::arg("result"), py::arg("input"), py::arg("scale"), py::arg("scale_ub"));
  m.def("per_token_group_fp8_quant", &compile_ops::per_token_group_fp8_quant, py::arg("input"),
        py::arg("output_q"), py::arg("output_s"), py::arg("group_size"), py::arg("eps"),
        py::arg("fp8_min"), py::arg("fp8_max"), py::arg("scale_ue8m0"));
  m.def("rms_norm_static_fp8_quant", &compile_ops::rms_norm_static_fp8_quant,
        "result <- fp8(rms_norm(input) * weight * (1 / scale))", py::arg("result"),
        py::arg("input"), py::arg("weight"), py::arg("scale"), py::arg("epsilon"));
  m.def("fused_add_rms_norm_static_fp8_quant", &compile_ops::fused_add_rms_norm_static_fp8_quant,
        "residual <- T(input + residual); result <- fp8(rms_norm(residual) * weight / scale)",
        py::arg("result"), py::arg("input"), py::arg("residual"), py::arg("weight"),
        py::arg("scale"), py::arg("epsilon"));
  m.def("rms_norm_dynamic_per_token_quant", &compile_ops::rms_norm_dynamic_per_token_quant,
        "(residual add +) rms_norm, then per-token FP8/INT8 quantization with its scales",
        py::arg("result"), py::arg("input"), py::arg("weight"), py::arg("scale"),
        py::arg("epsilon"), py::arg("scale_ub"), py::arg("residual"));
  m.def("rms_norm_per_block_quant", &compile_ops::rms_norm_per_block_quant,
        "(residual add +) rms_norm, then per-group (64/128) FP8/INT8 quantization",
        py::arg("result"), py::arg("input"), py::arg("weight"), py::arg("scale"),
        py::arg("epsilon"), py::arg("scale_ub"), py::arg("residual"), py::arg("group_size"),
        py::arg("is_scale_transposed"));
  m.def("fused_allreduce_add_rms_norm", &compile_ops::fused_allreduce_add_rms_norm,
        "s <- sum over the ranks of input (symmetric memory, fp32 in rank order); residual <- "
        "s + residual; input <- rms_norm(residual) * weight (mode 0 one-shot, 1 two-shot)",
        py::arg("input"), py::arg("residual"), py::arg("weight"), py::arg("epsilon"),
        py::arg("buffer_ptrs"), py::arg("signal_pad_ptrs"), py::arg("rank"),
        py::arg("world_size"), py::arg("buffer_bytes"), py::arg("signal_pad_bytes"),
        py::arg("mode"));
}
