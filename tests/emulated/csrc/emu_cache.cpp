// Host-compiled copy of csrc/cache_kernels.cu for the CPU emulation tests (see emulate.h).
#include "cache_kernels.cu"
