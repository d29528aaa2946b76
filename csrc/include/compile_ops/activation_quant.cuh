// SiLU-and-mul fused with FP8 / INT8 quantization (vLLM's silu_and_mul_quant and
// silu_and_mul_per_block_quant). Device code only: no torch headers, raw pointers, int64 row
// offsets. compile_ops/activation_quant.py is the oracle; the numerics, op for op:
//
//   silu_and_mul_quant (static per-tensor scale, input [rows, 2d]):
//     s = T(x / (1 + expf(-x)))   p = T(s * y)   q = fp8(fmaxf(-448, fminf(p * (1 / scale), 448)))
//   silu_and_mul_per_block_quant (dynamic per-(token, group) scales):
//     r = (g * (1 / (1 + expf(-g)))) * u   in fp32, never rounded to T
//     s = fmaxf(fminf(fmaxf_{group} |r| / QMAX, *scale_ub), MIN_SCALE)      (the SCALE is bounded)
//     q = fp8(clamp(r / s))  or  int8_rn_sat(r / s)                          (a division for both)
#pragma once

#include "compile_ops/activation.cuh"  // silu_f: x / (1 + expf(-x)), the silu_and_mul formula
#include "compile_ops/quant.cuh"
#include "compile_ops/vec.cuh"

#include <type_traits>

namespace compile_ops {

// One output element of silu_and_mul_quant: the two roundings to T, then the FP8 code.
template <typename T>
__device__ __forceinline__ uint8_t silu_mul_fp8(T x, T y, float inv_scale) {
  const T s = from_float<T>(silu_f(to_float(x)));
  const T p = from_float<T>(to_float(s) * to_float(y));
  return fp8_e4m3_clamped(to_float(p) * inv_scale);
}

// One row per blockIdx.x; packs of W elements (W * sizeof(T) == 16 bytes on the vector path,
// W == 1 the scalar path) over a grid-stride loop on blockIdx.y * blockDim.x. `out` is
// contiguous: row stride d.
template <typename T, int W>
__global__ void silu_and_mul_quant_kernel(uint8_t* __restrict__ out, const T* __restrict__ in,
                                          int64_t in_stride, int d,
                                          const float* __restrict__ scale) {
  using P = Pack<T, W>;
  using O = Pack<uint8_t, W>;
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int n = d / W;
  const float inv = 1.0f / *scale;
  const P* gate = reinterpret_cast<const P*>(in + row * in_stride);
  const P* up = reinterpret_cast<const P*>(in + row * in_stride + d);
  O* o_row = reinterpret_cast<O*>(out + row * static_cast<int64_t>(d));
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < n; i += gridDim.y * blockDim.x) {
    const P a = gate[i];
    const P b = up[i];
    O o;
#pragma unroll
    for (int j = 0; j < W; ++j) o.v[j] = silu_mul_fp8<T>(a.v[j], b.v[j], inv);
    o_row[i] = o;
  }
}

// silu_and_mul_per_block_quant: one group of GS elements per TPG = GS / E consecutive threads
// (8, 16 or 32: an aligned run of lanes inside one warp), E elements per thread kept in
// registers between the amax and the write (one pass). The group amax is an fmaxf butterfly over
// the TPG lanes (fmaxf ignores NaN; an all-NaN group gives NaN, as vLLM's fmaxf tree). Every
// thread of the block takes part in the shuffles (none returns early: blockDim.x is a multiple of
// 32 and the full mask is exact); threads past the last group only skip their loads and stores.
// VEC: 128-bit loads of gate and up and one E-byte store; otherwise element accesses.
// Scales go to scales[t * sc_tok_stride + g * sc_grp_stride] (row-major [T, G]: (G, 1);
// transposed, a [G, T] buffer: (1, T)).
constexpr int kPerBlockThreads = 256;
template <typename T, bool FP8, int GS, int E, bool VEC>
__global__ void __launch_bounds__(kPerBlockThreads)
silu_and_mul_per_block_quant_kernel(void* __restrict__ out_ptr, float* __restrict__ scales,
                                    int64_t sc_tok_stride, int64_t sc_grp_stride,
                                    const T* __restrict__ in, int64_t in_stride,
                                    const float* __restrict__ scale_ub, int64_t tokens,
                                    int groups, int d) {
  constexpr int TPG = GS / E;
  static_assert(TPG >= 1 && TPG <= 32 && (TPG & (TPG - 1)) == 0, "group lanes: a power of 2");
  using Q = std::conditional_t<FP8, uint8_t, int8_t>;
  using P = Pack<T, E>;
  using O = Pack<Q, E>;
  constexpr float kQMax = FP8 ? kFp8E4M3Max : kInt8Max;
  constexpr float kMinScale = FP8 ? kFp8MinScale : kInt8MinScale;
  pdl_wait();
  const int64_t gid =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / TPG) + threadIdx.x / TPG;
  const int lane = threadIdx.x % TPG;
  const bool valid = gid < tokens * groups;
  const int64_t t = valid ? gid / groups : 0;
  const int g = valid ? static_cast<int>(gid % groups) : 0;
  const int col = g * GS + lane * E;  // first output column of this thread

  float r[E];
  float m = 0.f;
  if (valid) {
    const T* gate = in + t * in_stride + col;
    const T* up = gate + d;
    P a, b;
    if constexpr (VEC) {
      a = *reinterpret_cast<const P*>(gate);
      b = *reinterpret_cast<const P*>(up);
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        a.v[j] = gate[j];
        b.v[j] = up[j];
      }
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float x = to_float(a.v[j]);
      const float sig = 1.0f / (1.0f + expf(-x));
      r[j] = (x * sig) * to_float(b.v[j]);
    }
    m = fabsf(r[0]);
#pragma unroll
    for (int j = 1; j < E; ++j) m = fmaxf(m, fabsf(r[j]));
  }
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!valid) return;  // after the last shuffle: only this thread's stores remain

  float s = m / kQMax;
  if (scale_ub != nullptr) s = fminf(s, *scale_ub);
  s = fmaxf(s, kMinScale);
  pdl_launch_dependents();
  if (lane == 0) scales[t * sc_tok_stride + g * sc_grp_stride] = s;
  O q;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    if constexpr (FP8) q.v[j] = fp8_e4m3_clamped(r[j] / s);
    else q.v[j] = int8_rn_sat(r[j] / s);
  }
  Q* o_ptr = static_cast<Q*>(out_ptr) + t * static_cast<int64_t>(d) + col;
  if constexpr (VEC) {
    *reinterpret_cast<O*>(o_ptr) = q;
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) o_ptr[j] = q.v[j];
  }
}

}  // namespace compile_ops
