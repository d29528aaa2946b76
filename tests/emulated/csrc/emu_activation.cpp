// Host-compiled copy of csrc/activation_kernels.cu for the CPU emulation tests (see emulate.h).
#include "activation_kernels.cu"
