// Host-compiled copy of csrc/layernorm_kernels.cu for the CPU emulation tests (see emulate.h).
#include "layernorm_kernels.cu"
