// Python bindings of the launchers as compile_ops._C. The ops themselves are declared in Python
// (torch.library.custom_op); these functions are their CUDA kernels.
#include <torch/extension.h>

#include <optional>

namespace compile_ops {
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double epsilon);
void act_and_mul(at::Tensor& out, const at::Tensor& input, int64_t kind, double threshold);
void swigluoai_and_mul(at::Tensor& out, const at::Tensor& input, double alpha, double limit);
void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox);
}  // namespace compile_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compile_ops CUDA kernels (launchers called by the registered ops)";
  m.def("rms_norm", &compile_ops::rms_norm, "out <- rms_norm(input) * weight", py::arg("out"),
        py::arg("input"), py::arg("weight"), py::arg("epsilon"));
  m.def("fused_add_rms_norm", &compile_ops::fused_add_rms_norm,
        "residual <- input + residual; input <- rms_norm(residual) * weight", py::arg("input"),
        py::arg("residual"), py::arg("weight"), py::arg("epsilon"));
  m.def("act_and_mul", &compile_ops::act_and_mul,
        "out <- act(input[..., :d]) * input[..., d:] (kind: compile_ops.activation._KIND)",
        py::arg("out"), py::arg("input"), py::arg("kind"), py::arg("threshold"));
  m.def("swigluoai_and_mul", &compile_ops::swigluoai_and_mul,
        "out <- gpt-oss clamped SwiGLU of interleaved gate/up", py::arg("out"), py::arg("input"),
        py::arg("alpha"), py::arg("limit"));
  m.def("rotary_embedding", &compile_ops::rotary_embedding,
        "rotate query (and key) in place by the cos/sin of each token's position",
        py::arg("positions"), py::arg("query"), py::arg("key"), py::arg("head_size"),
        py::arg("cos_sin_cache"), py::arg("is_neox"));
}
