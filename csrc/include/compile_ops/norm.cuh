// RMSNorm and fused residual-add + RMSNorm kernels.
// Device code only: no torch headers, raw pointers, int64 row offsets.
//
// Semantics (match compile_ops/norm.py, which is the oracle):
//   z   = x (+ residual)                       accumulated in fp32
//   inv = rsqrt(mean(z * z) + eps)             fp32, over the unrounded z
//   out = T(T(z * inv) * w)                    normalize, round, then scale by the weight
//   out = T(z * inv)                           weight == nullptr (weightless RMSNorm)
//   residual_out <- T(z)                       fused variants only
//
// The fused kernels read `residual` and write `residual_out`, each with its own row stride: the
// in-place fused_add_rms_norm passes the same pointer twice (residual_out == residual), the
// out-of-place fused_add_rms_norm_out two tensors. Either may alias its own input exactly
// (out == in, residual_out == residual): every element is read and then written by the same
// thread, loads before stores, so an exact alias is race free; partial overlaps are refused by
// the Python layer. The two pointers cost a second row offset, no run-time branch.
//
// Rows are `hidden` elements, last dimension contiguous; each tensor has its own row stride.
// A null weight is a run-time branch, uniform over the grid: the weight loads are skipped and
// the multiply dropped, with no extra instantiations.
#pragma once

#include "compile_ops/vec.cuh"

namespace compile_ops {

// One output element from the normalized fp32 value zn = z * inv: T(T(zn) * w[i]), or T(zn)
// when there is no weight (what a weight of ones gives, without relying on x * 1 == x). The
// weight register is read only when there is a weight: it is not loaded otherwise.
template <typename T>
__device__ __forceinline__ T scale_out(float zn, const T& w, bool has_weight) {
  const T y = from_float<T>(zn);
  return has_weight ? from_float<T>(to_float(y) * to_float(w)) : y;
}

// Reduce over the blockDim.x threads that own one row. blockDim.x == 32 means one warp per row
// (blockDim.y rows per block) and needs no shared memory; otherwise blockDim.y == 1 and the
// warps of the block combine their partial results through shared memory (one array per
// operation). Lanes past the block's warps contribute 0: the identity of a sum, and of a max over
// non-negative values (row_max reduces absolute values; fmaxf ignores NaN).
template <typename Op>
__device__ __forceinline__ float row_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (blockDim.x == 32) return v;
  __shared__ float partial[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ float row_sum(float v) { return row_reduce(v, SumOp{}); }
__device__ __forceinline__ float row_max(float v) { return row_reduce(v, MaxOp{}); }

// One pass over the data: each thread keeps its V packs of W elements in registers between the
// reduction and the write, so input and residual are read once and every output written once.
// Requires hidden / W <= V * blockDim.x. `out` may alias `in` and `residual_out` `residual`
// (fused_add_rms_norm: in place on both).
// At most kRegKernelThreads threads per block, which leaves up to 255 registers per thread.
constexpr int kRegKernelThreads = 256;
template <typename T, int W, int V, bool FUSED>
__global__ void __launch_bounds__(kRegKernelThreads)
rms_norm_reg_kernel(T* out, int64_t out_stride, const T* in, int64_t in_stride,
                    const T* residual, int64_t res_stride, T* residual_out,
                    int64_t res_out_stride, const T* __restrict__ weight, int64_t rows,
                    int hidden, float eps) {
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps only: a row never spans a partial warp
  const int n = hidden / W;
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  const P* r_row = FUSED ? reinterpret_cast<const P*>(residual + row * res_stride) : nullptr;
  P* s_row = FUSED ? reinterpret_cast<P*>(residual_out + row * res_out_stride) : nullptr;
  P* o_row = reinterpret_cast<P*>(out + row * out_stride);
  const P* w_vec = reinterpret_cast<const P*>(weight);
  const bool has_w = weight != nullptr;

  P x[V], r[V], w[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < n) {
      x[k] = x_row[i];
      if constexpr (FUSED) r[k] = r_row[i];
      if (has_w) w[k] = w_vec[i];
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
        o.v[j] = scale_out<T>(z * inv, w[k].v[j], has_w);
      }
      if constexpr (FUSED) s_row[i] = s;
      o_row[i] = o;
    }
  }
}

// Pack of elements [S, S + W) of the 2W elements a ++ b (compile-time S: stays in registers).
template <int S, typename T, int W>
__device__ __forceinline__ Pack<T, W> concat_shift(const Pack<T, W>& a, const Pack<T, W>& b) {
  if constexpr (S == 0) {
    return a;
  } else {
    Pack<T, W> o;
#pragma unroll
    for (int j = 0; j < W; ++j) o.v[j] = j + S < W ? a.v[j + S] : b.v[j + S - W];
    return o;
  }
}

// The same with a run-time shift s in [0, W): one switch, uniform across the row.
template <typename T, int W>
__device__ __forceinline__ Pack<T, W> concat_shift(const Pack<T, W>& a, const Pack<T, W>& b,
                                                   int s) {
  static_assert(W <= 8, "at most 8 elements per pack");
  switch (s) {
    case 1: if constexpr (W > 1) return concat_shift<1>(a, b); break;
    case 2: if constexpr (W > 2) return concat_shift<2>(a, b); break;
    case 3: if constexpr (W > 3) return concat_shift<3>(a, b); break;
    case 4: if constexpr (W > 4) return concat_shift<4>(a, b); break;
    case 5: if constexpr (W > 5) return concat_shift<5>(a, b); break;
    case 6: if constexpr (W > 6) return concat_shift<6>(a, b); break;
    case 7: if constexpr (W > 7) return concat_shift<7>(a, b); break;
    default: break;
  }
  return a;
}

// Rows whose start is not 16-byte aligned (odd hidden sizes, odd row strides), when input, out,
// residual and residual_out share the misalignment ("phase") on every row. Each row is split at
// its first 16-byte boundary: the `head` elements before it and the `tail` after the last whole
// pack are handled one element per thread, the body in 128-bit packs held in registers as in
// rms_norm_reg_kernel. The weight (16-byte aligned) is read as two aligned packs per body pack
// and shifted by `head` in registers.
template <typename T, int V, bool FUSED>
__global__ void __launch_bounds__(kRegKernelThreads)
rms_norm_shift_kernel(T* out, int64_t out_stride, const T* in, int64_t in_stride,
                      const T* residual, int64_t res_stride, T* residual_out,
                      int64_t res_out_stride, const T* __restrict__ weight, int64_t rows,
                      int hidden, float eps) {
  constexpr int W = kVecWidth<T>;
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps only
  const T* x_row = in + row * in_stride;
  const T* r_row = FUSED ? residual + row * res_stride : nullptr;
  T* s_row = FUSED ? residual_out + row * res_out_stride : nullptr;
  T* o_row = out + row * out_stride;
  const int phase = static_cast<int>((reinterpret_cast<uintptr_t>(x_row) / sizeof(T)) % W);
  const int head = (W - phase) % W;
  const int m = (hidden - head) / W;         // whole packs in the body
  const int tail_start = head + m * W;
  const int edges = head + (hidden - tail_start);
  const P* w_vec = reinterpret_cast<const P*>(weight);
  const bool has_w = weight != nullptr;

  // Edge element of this thread (at most 2 * (W - 1) per row).
  const int t = threadIdx.x;
  const int e = t < head ? t : tail_start + (t - head);
  const bool has_edge = t < edges;
  float ze = 0.f;
  T we{};
  if (has_edge) {
    ze = to_float(x_row[e]);
    if constexpr (FUSED) ze += to_float(r_row[e]);
    if (has_w) we = weight[e];
  }

  P x[V], r[V], w[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = t + k * blockDim.x;
    if (i < m) {
      x[k] = reinterpret_cast<const P*>(x_row + head)[i];
      if constexpr (FUSED) r[k] = reinterpret_cast<const P*>(r_row + head)[i];
      if (!has_w) continue;  // the rest loads this pack's weight
      const P lo = w_vec[i];
      P hi = lo;
      if (head > 0) {
        if ((i + 2) * W <= hidden) {
          hi = w_vec[i + 1];
        } else {  // the last pack of the weight is partial: read only what exists
#pragma unroll
          for (int j = 0; j < W; ++j)
            if (j < head) hi.v[j] = weight[(i + 1) * W + j];
        }
      }
      w[k] = concat_shift<T, W>(lo, hi, head);
    }
  }

  float ss = ze * ze;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = t + k * blockDim.x;
    if (i < m) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float z = to_float(x[k].v[j]);
        if constexpr (FUSED) z += to_float(r[k].v[j]);
        ss += z * z;
      }
    }
  }
  const float inv = rsqrtf(row_sum(ss) / static_cast<float>(hidden) + eps);
  pdl_launch_dependents();

  if (has_edge) {
    if constexpr (FUSED) s_row[e] = from_float<T>(ze);
    o_row[e] = scale_out<T>(ze * inv, we, has_w);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = t + k * blockDim.x;
    if (i < m) {
      P o, sum;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float z = to_float(x[k].v[j]);
        if constexpr (FUSED) {
          z += to_float(r[k].v[j]);
          sum.v[j] = from_float<T>(z);
        }
        o.v[j] = scale_out<T>(z * inv, w[k].v[j], has_w);
      }
      if constexpr (FUSED) reinterpret_cast<P*>(s_row + head)[i] = sum;
      reinterpret_cast<P*>(o_row + head)[i] = o;
    }
  }
}

// Fallback for rows too long to keep in registers: one block per row, a first pass computes the
// sum of squares, a second pass re-reads (mostly from L2) and writes. Every element is read and
// written by the same thread, so the in-place fused variant stays race free.
template <typename T, int W, bool FUSED>
__global__ void __launch_bounds__(1024)
rms_norm_twopass_kernel(T* out, int64_t out_stride, const T* in, int64_t in_stride,
                        const T* residual, int64_t res_stride, T* residual_out,
                        int64_t res_out_stride, const T* __restrict__ weight, int hidden,
                        float eps) {
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int n = hidden / W;
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  const P* r_row = FUSED ? reinterpret_cast<const P*>(residual + row * res_stride) : nullptr;
  P* s_row = FUSED ? reinterpret_cast<P*>(residual_out + row * res_out_stride) : nullptr;
  P* o_row = reinterpret_cast<P*>(out + row * out_stride);
  const P* w_vec = reinterpret_cast<const P*>(weight);
  const bool has_w = weight != nullptr;

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
    P wv, rv, o;
    if (has_w) wv = w_vec[i];
    if constexpr (FUSED) rv = r_row[i];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float z = to_float(xv.v[j]);
      if constexpr (FUSED) {
        z += to_float(rv.v[j]);
        rv.v[j] = from_float<T>(z);
      }
      o.v[j] = scale_out<T>(z * inv, wv.v[j], has_w);
    }
    if constexpr (FUSED) s_row[i] = rv;
    o_row[i] = o;
  }
}

}  // namespace compile_ops
