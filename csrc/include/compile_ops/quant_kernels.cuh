// FP8 activation quantization kernels: static_scaled_fp8_quant, dynamic_scaled_fp8_quant,
// dynamic_per_token_scaled_fp8_quant and per_token_group_fp8_quant (vLLM's numerics:
// csrc/quantization/w8a8/fp8/{common,per_token_group_quant}.cu). Device code only.
//
// Semantics (match compile_ops/quant.py, the oracle), all fp32, q(v) = quant.cuh's
// fp8_e4m3_clamped (fmaxf(-448, fminf(v, 448)): NaN -> +448, then RNE):
//   static       inv = 1 / s of the element's group (IEEE division); q(x * inv)
//   dynamic      scale = max over rows of amax(|row|) / 448 (fmaxf from 0: NaN ignored; an
//                atomic max on the float's bits, valid for values >= 0 in a zeroed scale),
//                then the static kernel with that scale
//   per token    a = amax(|row|), a = fminf(a, *ub), s = fmaxf(a / 448, 1 / (448 * 512));
//                q(x / s) (a division, as vLLM)
//   per group    a = max(eps, amax(|group|)), s = a / fp8_max, UE8M0: s rounded up to a power
//                of two; e4m3(fminf(fmaxf(x / s, fp8_min), fp8_max)) (NaN -> fp8_min), RNE
//                saturating
//
// Rows: `hidden` contiguous elements, one row stride per tensor (int64 offsets). Packs of W
// elements (W * sizeof(T) == 16: one 128-bit load, a W-byte fp8 store) where every row is
// aligned, W == 1 otherwise. FP8 values are stored as their uint8 codes.
#pragma once

#include <cstdint>

#if defined(COMPILE_OPS_EMULATE)
#include <atomic>
#endif

#include "compile_ops/norm.cuh"
#include "compile_ops/quant.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

// Atomic max of a float v >= 0 into *addr (which holds a float >= 0, +0 included): for such
// floats the order of the bit patterns as unsigned ints is the order of the values.
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
#if defined(COMPILE_OPS_EMULATE)
  std::atomic_ref<unsigned int> a(*reinterpret_cast<unsigned int*>(addr));
  const unsigned int x = __float_as_uint(v);
  unsigned int cur = a.load();
  while (cur < x && !a.compare_exchange_weak(cur, x)) {
  }
#else
  atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
#endif
}

template <typename T, int W>
__device__ __forceinline__ float pack_abs_max(float m, const Pack<T, W>& x) {
#pragma unroll
  for (int j = 0; j < W; ++j) m = fmaxf(m, fabsf(to_float(x.v[j])));
  return m;
}

// ---------------------------------------------------------------------------------------------
// static_scaled_fp8_quant (and the second kernel of dynamic_scaled_fp8_quant)
// ---------------------------------------------------------------------------------------------
// Element (m, n) uses scale[(m / group_m) * s_i + (n / group_n) * s_j]; per tensor: both
// strides 0. The reciprocal is taken once per group a thread meets (its columns increase).
// blockDim (32, rows per block) or (threads, 1): a thread walks its row's packs.
template <typename T, int W>
__global__ void __launch_bounds__(1024)
static_fp8_quant_kernel(uint8_t* __restrict__ out, int64_t out_stride, const T* __restrict__ in,
                        int64_t in_stride, const float* __restrict__ scale, int64_t s_i,
                        int64_t s_j, int64_t group_m, int group_n, int64_t rows, int hidden) {
  using P = Pack<T, W>;
  using O = Pack<uint8_t, W>;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  O* o_row = reinterpret_cast<O*>(out + row * out_stride);
  const float* s_row = scale + (row / group_m) * s_i;
  const int n = hidden / W;
  float inv = 1.f / s_row[0];
  int64_t hi = s_j == 0 ? hidden : group_n;  // first column past the current group
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P x = x_row[i];
    O o;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int col = i * W + j;
      if (col >= hi) {
        const int g = col / group_n;
        hi = static_cast<int64_t>(g + 1) * group_n;
        inv = 1.f / s_row[g * s_j];
      }
      o.v[j] = fp8_e4m3_clamped(to_float(x.v[j]) * inv);
    }
    o_row[i] = o;
  }
}

// ---------------------------------------------------------------------------------------------
// dynamic_scaled_fp8_quant: the scale (zeroed by zero_scale_kernel), then the static kernel
// ---------------------------------------------------------------------------------------------
__global__ void zero_scale_kernel(float* scale) {
  pdl_wait();
  *scale = 0.f;
}

// One row per warp (blockDim (32, rows per block)) or per block (blockDim.y == 1).
template <typename T, int W>
__global__ void __launch_bounds__(1024)
absmax_scale_kernel(float* __restrict__ scale, const T* __restrict__ in, int64_t in_stride,
                    int64_t rows, int hidden) {
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps (blockDim.x == 32) or whole blocks (grid == rows)
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  const int n = hidden / W;
  float m = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = pack_abs_max(m, x_row[i]);
  m = row_max(m);
  if (threadIdx.x == 0) atomic_max_nonneg(scale, m / kFp8E4M3Max);
}

// ---------------------------------------------------------------------------------------------
// dynamic_per_token_scaled_fp8_quant
// ---------------------------------------------------------------------------------------------
// V > 0: each thread keeps its V packs in registers between the reduction and the stores
// (one read of the row; needs hidden / W <= V * blockDim.x). V == 0: rows too long for that,
// read twice. blockDim (32, rows per block) or (threads, 1).
template <typename T, int W, int V>
__global__ void __launch_bounds__(V ? 256 : 1024)
per_token_fp8_quant_kernel(uint8_t* __restrict__ out, int64_t out_stride,
                           const T* __restrict__ in, int64_t in_stride,
                           float* __restrict__ scale, int64_t scale_stride,
                           const float* __restrict__ scale_ub, int64_t rows, int hidden) {
  using P = Pack<T, W>;
  using O = Pack<uint8_t, W>;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;  // whole warps or whole blocks
  const P* x_row = reinterpret_cast<const P*>(in + row * in_stride);
  O* o_row = reinterpret_cast<O*>(out + row * out_stride);
  const int n = hidden / W;
  constexpr int VR = V > 0 ? V : 1;
  P x[VR];
  float m = 0.f;
  if constexpr (V > 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < n) {
        x[k] = x_row[i];
        m = pack_abs_max(m, x[k]);
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = pack_abs_max(m, x_row[i]);
  }
  float a = row_max(m);
  if (scale_ub != nullptr) a = fminf(a, *scale_ub);
  const float s = fmaxf(a / kFp8E4M3Max, kFp8MinScale);
  if (threadIdx.x == 0) scale[row * scale_stride] = s;
  const auto store = [&](int i, const P& v) {
    O o;
#pragma unroll
    for (int j = 0; j < W; ++j) o.v[j] = fp8_e4m3_clamped(to_float(v.v[j]) / s);
    o_row[i] = o;
  };
  if constexpr (V > 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < n) store(i, x[k]);
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) store(i, x_row[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// per_token_group_fp8_quant
// ---------------------------------------------------------------------------------------------
// The smallest power of two >= max(|s|, 1e-10f) (inf stays inf): vLLM's
// exp2f(ceilf(log2f(fmaxf(fabsf(s), 1e-10f)))) done exactly on the bits (log2f may be off by an
// ulp just above a power of two, where the exact result is the next power).
__device__ __forceinline__ float ue8m0_round_up(float s) {
  unsigned int u = __float_as_uint(fmaxf(fabsf(s), 1e-10f));
  if (u & 0x7fffffu) u = (u + 0x800000u) & 0xff800000u;  // exponent 254 + 1 -> inf
  return __uint_as_float(u);
}

__device__ __forceinline__ uint8_t fp8_e4m3_clamp_lo_first(float v, float lo, float hi) {
  v = fminf(fmaxf(v, lo), hi);  // NaN -> lo
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// `lanes` (a power of two <= 32) consecutive threads own one group of `group_size` consecutive
// elements of the contiguous input; a block of blockDim.x threads (a multiple of 32) holds
// blockDim.x / lanes groups. Group gid = t * groups_per_row + g; its scale goes to
// output_s[t * s_t + g * s_g] (row-major, column-major or TMA-aligned). V > 0: the lane's V
// packs stay in registers (group_size / W <= V * lanes); V == 0: read twice.
template <typename T, int W, int V, bool UE8M0>
__global__ void __launch_bounds__(256)
group_fp8_quant_kernel(uint8_t* __restrict__ out, const T* __restrict__ in,
                       float* __restrict__ out_s, int64_t s_t, int64_t s_g, int64_t num_groups,
                       int64_t groups_per_row, int group_size, int lanes, float eps,
                       float fp8_min, float fp8_max) {
  using P = Pack<T, W>;
  using O = Pack<uint8_t, W>;
  pdl_wait();
  const int lane = threadIdx.x % lanes;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes;
  const bool valid = gid < num_groups;  // no early return: the whole warp shuffles
  const P* x_g = reinterpret_cast<const P*>(in + (valid ? gid : 0) * group_size);
  O* o_g = reinterpret_cast<O*>(out + (valid ? gid : 0) * group_size);
  const int n = group_size / W;
  constexpr int VR = V > 0 ? V : 1;
  P x[VR];
  float m = eps;
  if (valid) {
    if constexpr (V > 0) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = lane + k * lanes;
        if (i < n) {
          x[k] = x_g[i];
          m = pack_abs_max(m, x[k]);
        }
      }
    } else {
      for (int i = lane; i < n; i += lanes) m = pack_abs_max(m, x_g[i]);
    }
  }
  for (int o = lanes / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!valid) return;
  float s = m / fp8_max;
  if constexpr (UE8M0) s = ue8m0_round_up(s);
  if (lane == 0) {
    const int64_t t = gid / groups_per_row, g = gid % groups_per_row;
    out_s[t * s_t + g * s_g] = s;
  }
  const auto store = [&](int i, const P& v) {
    O o;
#pragma unroll
    for (int j = 0; j < W; ++j)
      o.v[j] = fp8_e4m3_clamp_lo_first(to_float(v.v[j]) / s, fp8_min, fp8_max);
    o_g[i] = o;
  };
  if constexpr (V > 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = lane + k * lanes;
      if (i < n) store(i, x[k]);
    }
  } else {
    for (int i = lane; i < n; i += lanes) store(i, x_g[i]);
  }
}

}  // namespace compile_ops
