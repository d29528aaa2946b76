// Rotary position embedding, in place on query and key.
// Device code only: no torch headers, raw pointers, int64 token offsets.
#pragma once

#include "compile_ops/vec.cuh"

namespace compile_ops {

// One rotated pair: (x c - y s, y c + x s), each product and the sum rounded to float32 on its
// own, as the PyTorch reference computes it. Written with the _rn intrinsics because nvcc would
// otherwise contract a product and the sum into one FMA: one float32 ulp away from the reference,
// enough to flip the rounding of a bf16/fp16 output now and then (seen on an H100: 294 CUDA tests
// of the fused RoPE + cache op failed bit-exactness against the CPU). Memory-bound kernels: the
// two extra instructions per pair cost nothing measurable.
__device__ __forceinline__ void rotate_pair(float x, float y, float c, float s, float& rx,
                                            float& ry) {
  rx = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s));
  ry = __fadd_rn(__fmul_rn(y, c), __fmul_rn(x, s));
}

// The head a thread works on: query heads first, then key heads. Packed heads (GENERAL false)
// sit head_size apart, exactly the code of the contiguous path; GENERAL takes each tensor's own
// head stride (strided heads: t[..., :head_size] of a padded tensor).
template <bool GENERAL, typename T>
__device__ __forceinline__ T* rotary_head(T* query, int64_t q_stride, int64_t q_head_stride,
                                          int nq, T* key, int64_t k_stride,
                                          int64_t k_head_stride, int head_size, int64_t token,
                                          int h) {
  if constexpr (GENERAL)
    return h < nq ? query + token * q_stride + static_cast<int64_t>(h) * q_head_stride
                  : key + token * k_stride + static_cast<int64_t>(h - nq) * k_head_stride;
  else
    return h < nq ? query + token * q_stride + static_cast<int64_t>(h) * head_size
                  : key + token * k_stride + static_cast<int64_t>(h - nq) * head_size;
}

// sin at a pair: the cache's, negated for the inverse rotation (GENERAL only: a multiply by the
// uniform sin_sign, exact; the packed forward path compiles without it).
template <bool GENERAL>
__device__ __forceinline__ float rotary_sin(float s, float sin_sign) {
  if constexpr (GENERAL)
    return s * sin_sign;
  else
    return s;
}

// One token per blockIdx.x. threadIdx.x walks the rotary pairs (cos/sin loaded once per pair),
// threadIdx.y walks the query heads then the key heads. A position outside [0, max_pos) leaves
// the token untouched: nothing outside the cache is read. query and key point at the first
// rotary dim of their first head (the launcher adds rope_dim_offset). GENERAL: per-tensor head
// strides and sin_sign (-1 for the inverse rotation) are used; otherwise both are ignored
// (heads packed at head_size, forward), a separate instantiation with no extra work.
template <typename T, typename CacheT, typename PosT, bool NEOX, bool GENERAL>
__global__ void rotary_embedding_kernel(const PosT* __restrict__ positions, T* query,
                                        int64_t q_stride, int nq, T* key, int64_t k_stride,
                                        int nk, const CacheT* __restrict__ cache, int64_t max_pos,
                                        int rot_dim, int head_size, int64_t q_head_stride,
                                        int64_t k_head_stride, float sin_sign) {
  pdl_wait();
  const int64_t token = blockIdx.x;
  const int64_t pos = static_cast<int64_t>(positions[token]);
  if (pos < 0 || pos >= max_pos) return;
  const int half = rot_dim / 2;
  const CacheT* cs = cache + pos * rot_dim;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float c = to_float(cs[i]);
    const float s = rotary_sin<GENERAL>(to_float(cs[half + i]), sin_sign);
    const int xi = NEOX ? i : 2 * i;
    const int yi = NEOX ? i + half : 2 * i + 1;
    for (int h = threadIdx.y; h < nq + nk; h += blockDim.y) {
      T* head = rotary_head<GENERAL>(query, q_stride, q_head_stride, nq, key, k_stride,
                                     k_head_stride, head_size, token, h);
      const float x = to_float(head[xi]);
      const float y = to_float(head[yi]);
      float rx, ry;
      rotate_pair(x, y, c, s, rx, ry);
      head[xi] = from_float<T>(rx);
      head[yi] = from_float<T>(ry);
    }
  }
}

// 128-bit variant: each item is one W-element vector of one head. NeoX: W x's at [i, i + W) and
// their W y's at [half + i, half + i + W); GPT-J: W interleaved elements = W / 2 pairs. The
// launcher picks it when every head's rotary start and the rotary split are W-aligned. cos/sin
// come from L1 (the same row serves every head of the token). Arguments as the scalar kernel's.
template <typename T, typename CacheT, typename PosT, bool NEOX, bool GENERAL>
__global__ void rotary_embedding_vec_kernel(const PosT* __restrict__ positions, T* query,
                                            int64_t q_stride, int nq, T* key, int64_t k_stride,
                                            int nk, const CacheT* __restrict__ cache,
                                            int64_t max_pos, int rot_dim, int head_size,
                                            int64_t q_head_stride, int64_t k_head_stride,
                                            float sin_sign) {
  constexpr int W = kVecWidth<T>;
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t token = blockIdx.x;
  const int64_t pos = static_cast<int64_t>(positions[token]);
  if (pos < 0 || pos >= max_pos) return;
  const int half = rot_dim / 2;
  const CacheT* cs = cache + pos * rot_dim;
  const int per_head = (NEOX ? half : rot_dim) / W;
  const int items = per_head * (nq + nk);
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int h = it / per_head, j = it - h * per_head;
    T* head = rotary_head<GENERAL>(query, q_stride, q_head_stride, nq, key, k_stride,
                                   k_head_stride, head_size, token, h);
    if constexpr (NEOX) {
      const int i0 = j * W;
      P x = *reinterpret_cast<const P*>(head + i0);
      P y = *reinterpret_cast<const P*>(head + half + i0);
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float c = to_float(cs[i0 + w]);
        const float s = rotary_sin<GENERAL>(to_float(cs[half + i0 + w]), sin_sign);
        const float a = to_float(x.v[w]), b = to_float(y.v[w]);
        float rx, ry;
        rotate_pair(a, b, c, s, rx, ry);
        x.v[w] = from_float<T>(rx);
        y.v[w] = from_float<T>(ry);
      }
      *reinterpret_cast<P*>(head + i0) = x;
      *reinterpret_cast<P*>(head + half + i0) = y;
    } else {
      const int e0 = j * W;
      P v = *reinterpret_cast<const P*>(head + e0);
#pragma unroll
      for (int p = 0; p < W / 2; ++p) {
        const float c = to_float(cs[e0 / 2 + p]);
        const float s = rotary_sin<GENERAL>(to_float(cs[half + e0 / 2 + p]), sin_sign);
        const float a = to_float(v.v[2 * p]), b = to_float(v.v[2 * p + 1]);
        float rx, ry;
        rotate_pair(a, b, c, s, rx, ry);
        v.v[2 * p] = from_float<T>(rx);
        v.v[2 * p + 1] = from_float<T>(ry);
      }
      *reinterpret_cast<P*>(head + e0) = v;
    }
  }
}

}  // namespace compile_ops
