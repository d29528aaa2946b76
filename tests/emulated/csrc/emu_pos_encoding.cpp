// Host-compiled copy of csrc/pos_encoding_kernels.cu for the CPU emulation tests (see emulate.h).
#include "pos_encoding_kernels.cu"
