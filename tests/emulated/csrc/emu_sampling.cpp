// Host-compiled copy of csrc/sampling_kernels.cu for the CPU emulation tests (see emulate.h).
#include "sampling_kernels.cu"
