// RMSNorm and fused residual-add + RMSNorm kernels.
// Device code only: no torch headers, raw pointers, int64 row offsets.
//
// Semantics (match compile_ops/norm.py, which is the oracle):
//   z   = x (+ residual)                       accumulated in fp32
//   inv = rsqrt(mean(z * z) + eps)             fp32, over the unrounded z
//   out = T(T(z * inv) * w)                    normalize, round, then scale by the weight
//   residual <- T(z)                           fused variant only
//
// Rows are `hidden` elements, last dimension contiguous; each tensor has its own row stride.
#pragma once

#include "compile_ops/vec.cuh"

namespace compile_ops {

// Sum over the blockDim.x threads that own one row. blockDim.x == 32 means one warp per row
// (blockDim.y rows per block) and needs no shared memory; otherwise blockDim.y == 1 and the
// warps of the block combine their partial sums through shared memory.
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x == 32) return v;
  __shared__ float partial[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One pass over the data: each thread keeps its V packs of W elements in registers between the
// reduction and the write, so input and residual are read once and every output written once.
// Requires hidden / W <= V * blockDim.x. `out` may alias `in` (fused: in place on the input).
// At most kRegKernelThreads threads per block, which leaves up to 255 registers per thread.
constexpr int kRegKernelThreads = 256;
template <typename T, int W, int V, bool FUSED>
__global__ void __launch_bounds__(kRegKernelThreads)
rms_norm_reg_kernel(T* out, int64_t out_stride, const T* in, int64_t in_stride, T* residual,
                    int64_t res_stride, const T* __restrict__ weight, int64_t rows, int hidden,
                    float eps) {
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps only: a row never spans a partial warp
  const int n = hidden / W;
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  P* r_row = FUSED ? reinterpret_cast<P*>(residual + row * res_stride) : nullptr;
  P* o_row = reinterpret_cast<P*>(out + row * out_stride);
  const P* w_vec = reinterpret_cast<const P*>(weight);

  P x[V], r[V], w[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n) {
      x[k] = x_row[i];
      if constexpr (FUSED) r[k] = r_row[i];
      w[k] = w_vec[i];
    }
  }

  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float z = to_float(x[k].v[j]);
        if constexpr (FUSED) z += to_float(r[k].v[j]);
        ss += z * z;
      }
    }
  }
  const float inv = rsqrtf(row_sum(ss) / static_cast<float>(hidden) + eps);
  pdl_launch_dependents();  // only stores remain

#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n) {
      P o, s;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float z = to_float(x[k].v[j]);
        if constexpr (FUSED) {
          z += to_float(r[k].v[j]);
          s.v[j] = from_float<T>(z);
        }
        o.v[j] = from_float<T>(to_float(from_float<T>(z * inv)) * to_float(w[k].v[j]));
      }
      if constexpr (FUSED) r_row[i] = s;
      o_row[i] = o;
    }
  }
}

// Fallback for rows too long to keep in registers: one block per row, a first pass computes the
// sum of squares, a second pass re-reads (mostly from L2) and writes. Every element is read and
// written by the same thread, so the in-place fused variant stays race free.
template <typename T, int W, bool FUSED>
__global__ void __launch_bounds__(1024)
rms_norm_twopass_kernel(T* out, int64_t out_stride, const T* in, int64_t in_stride, T* residual,
                        int64_t res_stride, const T* __restrict__ weight, int hidden, float eps) {
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int n = hidden / W;
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  P* r_row = FUSED ? reinterpret_cast<P*>(residual + row * res_stride) : nullptr;
  P* o_row = reinterpret_cast<P*>(out + row * out_stride);
  const P* w_vec = reinterpret_cast<const P*>(weight);

  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P xv = x_row[i];
    P rv;
    if constexpr (FUSED) rv = r_row[i];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float z = to_float(xv.v[j]);
      if constexpr (FUSED) z += to_float(rv.v[j]);
      ss += z * z;
    }
  }
  const float inv = rsqrtf(row_sum(ss) / static_cast<float>(hidden) + eps);

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P xv = x_row[i];
    const P wv = w_vec[i];
    P rv, o;
    if constexpr (FUSED) rv = r_row[i];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float z = to_float(xv.v[j]);
      if constexpr (FUSED) {
        z += to_float(rv.v[j]);
        rv.v[j] = from_float<T>(z);
      }
      o.v[j] = from_float<T>(to_float(from_float<T>(z * inv)) * to_float(wv.v[j]));
    }
    if constexpr (FUSED) r_row[i] = rv;
    o_row[i] = o;
  }
}

}  // namespace compile_ops
