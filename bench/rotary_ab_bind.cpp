// The base commit's rotary_embedding launcher as a separate op library (namespace renamed by
// -Dcompile_ops=compile_ops_base), for an A/B timing against the current build in one process.
#include <torch/all.h>
#include <torch/library.h>

#include <optional>

namespace compile_ops {
void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox);
}

TORCH_LIBRARY(rope_base, m) {
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
        "Tensor cos_sin_cache, bool is_neox) -> ()");
  m.impl("rotary_embedding", torch::kCUDA, &compile_ops::rotary_embedding);
}
