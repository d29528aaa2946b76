// Host-compiled copy of csrc/quant_kernels.cu for the CPU emulation tests (see emulate.h).
#include "quant_kernels.cu"
