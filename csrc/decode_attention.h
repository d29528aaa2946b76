// Host-side entry points of the split-KV decode attention kernels (csrc/decode_attention_*.cu).
#pragma once

#include <cuda_runtime.h>

#include "compile_ops/decode_attention.cuh"

namespace compile_ops {
namespace decode {

// Launch for query type QT (__half or __nv_bfloat16); kv: 0 16-bit cache, 1 e4m3, 2 e5m2.
template <typename QT>
void launch_paged_decode(const Args& a, int kv, int head, dim3 grid, cudaStream_t stream, int dev);
// CTAs of that kernel resident per SM (0: no kernel for this head size).
template <typename QT>
int paged_decode_blocks_per_sm(int kv, int head);

extern template void launch_paged_decode<__half>(const Args&, int, int, dim3, cudaStream_t, int);
extern template void launch_paged_decode<__nv_bfloat16>(const Args&, int, int, dim3,
                                                        cudaStream_t, int);
extern template int paged_decode_blocks_per_sm<__half>(int, int);
extern template int paged_decode_blocks_per_sm<__nv_bfloat16>(int, int);

}  // namespace decode
}  // namespace compile_ops
