// Host-compiled copy of csrc/activation_quant_kernels.cu for the emulation tests (emulate.h).
#include "activation_quant_kernels.cu"
