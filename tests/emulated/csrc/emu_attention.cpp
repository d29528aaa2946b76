// Host-compiled copy of csrc/attention_kernels.cu for the CPU emulation tests (see emulate.h).
#include "attention_kernels.cu"
