// Rotary position embedding, in place on query and key.
// Device code only: no torch headers, raw pointers, int64 token offsets.
#pragma once

#include "compile_ops/vec.cuh"

namespace compile_ops {

// One token per blockIdx.x. threadIdx.x walks the rotary pairs (cos/sin loaded once per pair),
// threadIdx.y walks the query heads then the key heads. A position outside [0, max_pos) leaves
// the token untouched: nothing outside the cache is read.
template <typename T, typename CacheT, typename PosT, bool NEOX>
__global__ void rotary_embedding_kernel(const PosT* __restrict__ positions, T* query,
                                        int64_t q_stride, int nq, T* key, int64_t k_stride,
                                        int nk, const CacheT* __restrict__ cache, int64_t max_pos,
                                        int rot_dim, int head_size) {
  pdl_wait();
  const int64_t token = blockIdx.x;
  const int64_t pos = static_cast<int64_t>(positions[token]);
  if (pos < 0 || pos >= max_pos) return;
  const int half = rot_dim / 2;
  const CacheT* cs = cache + pos * rot_dim;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float c = to_float(cs[i]);
    const float s = to_float(cs[half + i]);
    const int xi = NEOX ? i : 2 * i;
    const int yi = NEOX ? i + half : 2 * i + 1;
    for (int h = threadIdx.y; h < nq + nk; h += blockDim.y) {
      T* head = h < nq ? query + token * q_stride + static_cast<int64_t>(h) * head_size
                       : key + token * k_stride + static_cast<int64_t>(h - nq) * head_size;
      const float x = to_float(head[xi]);
      const float y = to_float(head[yi]);
      head[xi] = from_float<T>(x * c - y * s);
      head[yi] = from_float<T>(y * c + x * s);
    }
  }
}

}  // namespace compile_ops
