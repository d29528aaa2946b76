// Host-compiled copy of csrc/rope_cache_kernels.cu for the CPU emulation tests (see emulate.h).
#include "rope_cache_kernels.cu"
