// Host-compiled copy of csrc/layernorm_quant_kernels.cu for the CPU emulation tests (emulate.h).
#include "layernorm_quant_kernels.cu"
