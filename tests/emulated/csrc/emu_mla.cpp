// Host-compiled copy of csrc/mla_kernels.cu for the CPU emulation tests (see emulate.h).
#include "mla_kernels.cu"
