// The emulated launchers as a CPU extension (tests/emulated/conftest.py builds it with the host
// compiler and COMPILE_OPS_EMULATE). Same launchers and signatures as csrc/torch_bindings.cpp.
#include <torch/extension.h>

#include "compile_ops/emulate.h"

#include <optional>
#include <string>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_cooperative", [](bool on) { compile_ops::emu::cooperative = on; },
        "run each CTA's threads at once (barriers, shuffles, shared memory) instead of in turn");
  m.def("rms_norm", &compile_ops::rms_norm);
  m.def("fused_add_rms_norm", &compile_ops::fused_add_rms_norm);
  m.def("fused_add_rms_norm_out", &compile_ops::fused_add_rms_norm_out);
  m.def("act_and_mul", &compile_ops::act_and_mul);
  m.def("swigluoai_and_mul", &compile_ops::swigluoai_and_mul);
  m.def("rotary_embedding", &compile_ops::rotary_embedding, py::arg("positions"),
        py::arg("query"), py::arg("key"), py::arg("head_size"), py::arg("cos_sin_cache"),
        py::arg("is_neox"), py::arg("rope_dim_offset") = 0, py::arg("inverse") = false);
  m.def("reshape_and_cache", &compile_ops::reshape_and_cache);
  m.def("reshape_and_cache_flash", &compile_ops::reshape_and_cache_flash);
  m.def("gather_cache", &compile_ops::gather_cache);
  m.def("convert_fp8", &compile_ops::convert_fp8);
  m.def("swap_blocks", &compile_ops::swap_blocks);
  m.def("fused_rope_and_cache_flash", &compile_ops::fused_rope_and_cache_flash);
  m.def("fused_rope_and_cache", &compile_ops::fused_rope_and_cache);
  m.def("merge_attn_states", &compile_ops::merge_attn_states);
  m.def("paged_decode_attention", &compile_ops::paged_decode_attention);
  m.def("paged_decode_blocks_per_sm", &compile_ops::paged_decode_blocks_per_sm);
  m.def("concat_and_cache_mla", &compile_ops::concat_and_cache_mla);
  m.def("concat_and_cache_mla_rope_fused", &compile_ops::concat_and_cache_mla_rope_fused);
  m.def("cp_gather_and_upconvert_fp8_kv_cache", &compile_ops::cp_gather_and_upconvert_fp8_kv_cache);
  m.def("indexer_k_quant_and_cache", &compile_ops::indexer_k_quant_and_cache);
  m.def("cp_gather_indexer_k_quant_cache", &compile_ops::cp_gather_indexer_k_quant_cache);
  m.def("argmax", &compile_ops::argmax);
  m.def("silu_and_mul_quant", &compile_ops::silu_and_mul_quant);
  m.def("silu_and_mul_per_block_quant", &compile_ops::silu_and_mul_per_block_quant);
  m.def("static_scaled_fp8_quant", &compile_ops::static_scaled_fp8_quant, py::arg("result"),
        py::arg("input"), py::arg("scale"), py::arg("group_m"), py::arg("group_n"));
  m.def("dynamic_scaled_fp8_quant", &compile_ops::dynamic_scaled_fp8_quant, py::arg("result"),
        py::arg("input"), py::arg("scale"));
  m.def("dynamic_per_token_scaled_fp8_quant", &compile_ops::dynamic_per_token_scaled_fp8_quant,
        py::arg("result"), py::arg("input"), py::arg("scale"), py::arg("scale_ub"));
  m.def("per_token_group_fp8_quant", &compile_ops::per_token_group_fp8_quant, py::arg("input"),
        py::arg("output_q"), py::arg("output_s"), py::arg("group_size"), py::arg("eps"),
        py::arg("fp8_min"), py::arg("fp8_max"), py::arg("scale_ue8m0"));
  m.def("rms_norm_static_fp8_quant", &compile_ops::rms_norm_static_fp8_quant);
  m.def("fused_add_rms_norm_static_fp8_quant", &compile_ops::fused_add_rms_norm_static_fp8_quant);
  m.def("rms_norm_dynamic_per_token_quant", &compile_ops::rms_norm_dynamic_per_token_quant);
  m.def("rms_norm_per_block_quant", &compile_ops::rms_norm_per_block_quant);
}
