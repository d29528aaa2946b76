// Host-compiled copy of the split-KV decode attention (csrc/decode_attention_*.cu) for the CPU
// emulation tests: the cooperative schedule runs each CTA's 128 threads at once and
// decode_attention.cuh's warp primitives (ldmatrix, mma.sync, cp.async) are computed from the
// emulated warp's registers.
#include "decode_attention_kernels.cu"
#include "decode_attention_bf16_kv0.cu"
#include "decode_attention_bf16_kv1.cu"
#include "decode_attention_bf16_kv2.cu"
#include "decode_attention_f16_kv0.cu"
#include "decode_attention_f16_kv1.cu"
#include "decode_attention_f16_kv2.cu"
