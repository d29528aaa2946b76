// Host-side entry points of the split-KV decode attention kernels (csrc/decode_attention_*.cu).
#pragma once

#include <cuda_runtime.h>

#include "compile_ops/decode_attention.cuh"

namespace compile_ops {
namespace decode {

// Launch for query type QT (__half or __nv_bfloat16) and cache kind KV (0: 16-bit cache, 1:
// e4m3, 2: e5m2); false-free: raises for a head size without a kernel.
template <typename QT, int KV>
void launch_paged_decode(const Args& a, int head, dim3 grid, cudaStream_t stream, bool pdl);
// CTAs of the narrow kernel resident per SM (0: no kernel for this head size).
template <typename QT, int KV>
int paged_decode_blocks_per_sm(int head);

#define COMPILE_OPS_DECODE_EXTERN(QT, KV)                                                      \
  extern template void launch_paged_decode<QT, KV>(const Args&, int, dim3, cudaStream_t, bool); \
  extern template int paged_decode_blocks_per_sm<QT, KV>(int);
COMPILE_OPS_DECODE_EXTERN(__half, 0)
COMPILE_OPS_DECODE_EXTERN(__half, 1)
COMPILE_OPS_DECODE_EXTERN(__half, 2)
COMPILE_OPS_DECODE_EXTERN(__nv_bfloat16, 0)
COMPILE_OPS_DECODE_EXTERN(__nv_bfloat16, 1)
COMPILE_OPS_DECODE_EXTERN(__nv_bfloat16, 2)
#undef COMPILE_OPS_DECODE_EXTERN

}  // namespace decode
}  // namespace compile_ops
