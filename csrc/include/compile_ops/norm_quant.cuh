// RMSNorm fused with FP8 / INT8 quantization (vLLM's rms_norm_static_fp8_quant,
// fused_add_rms_norm_static_fp8_quant, rms_norm_dynamic_per_token_quant, rms_norm_per_block_quant).
// Device code only: no torch headers, raw pointers, int64 row offsets.
//
// Semantics (compile_ops/norm_quant.py is the oracle):
//   z   = x                                  rms_norm_static_fp8_quant
//   z   = T(x + r); r <- z                    fused_add_rms_norm_static_fp8_quant (rounded sum)
//   z   = x (+ r, fp32, unrounded); r <- T(z) the dynamic ops (residual optional)
//   inv = rsqrtf(sum(z * z) / H + eps)        fp32, compile_ops' rms_norm order (see below)
//   n   = T(T(z * inv) * w)                   exactly our rms_norm's output
//   static:    q = fp8(n * (1 / scale))
//   dynamic:   s = max(min(amax|n|, ub) / QMAX, MIN) per token or per group of GS elements;
//              FP8 q = fp8(n / s), INT8 q = int8(n * (1 / s))
//
// The sum of squares is accumulated exactly as norm.cuh's rms_norm_reg_kernel /
// rms_norm_twopass_kernel do (the same packs per thread, the same loop order, the same row_sum),
// and the launcher picks the same pack width, packs-per-thread and block shape as rms_norm's; so
// the normalized values are bit-identical to our CUDA rms_norm (fused_add_rms_norm_out for the
// dynamic ops with a residual) on rows laid out the same way. rms_norm's shifted kernel for
// misaligned rows (>= 4096 rows) has no counterpart here: such rows take the element-wise path.
#pragma once

#include "compile_ops/norm.cuh"
#include "compile_ops/quant.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

enum NormQuantMode : int {
  kNqStatic = 0,     // rms_norm_static_fp8_quant
  kNqStaticAdd = 1,  // fused_add_rms_norm_static_fp8_quant
  kNqToken = 2,      // rms_norm_dynamic_per_token_quant
  kNqGroup = 3,      // rms_norm_per_block_quant
};

template <typename T>
struct NormQuantParams {
  uint8_t* out;  // result codes (fp8 bits or int8), contiguous rows of `hidden`
  const T* in;
  int64_t in_stride;
  T* residual;  // null: none (static fused: always set)
  int64_t res_stride;
  const T* weight;
  float* scale;           // static: read scale[0]; token: scale[row]; group: see strides
  int64_t scale_row_stride;    // group: scale[row * scale_row_stride + g * scale_group_stride]
  int64_t scale_group_stride;
  const float* scale_ub;  // null: none
  int64_t rows;
  int hidden;
  float eps;
};

// Dynamic scale from an amax (NaN already ignored by the fmaxf reductions).
template <bool INT8>
__device__ __forceinline__ float dynamic_scale(float amax, const float* ub) {
  if (ub != nullptr) amax = fminf(amax, *ub);
  return INT8 ? fmaxf(amax / kInt8Max, kInt8MinScale) : fmaxf(amax / kFp8E4M3Max, kFp8MinScale);
}

// One code from a normalized value: static (s = 1 / scale, multiply), dynamic FP8 (divide by
// the scale) or INT8 (multiply by its reciprocal `s`).
template <bool INT8, bool DIVIDE>
__device__ __forceinline__ uint8_t quant_code(float n, float s) {
  if constexpr (INT8) {
    return static_cast<uint8_t>(int8_rn_sat(n * s));
  } else if constexpr (DIVIDE) {
    return fp8_e4m3_clamped(n / s);
  } else {
    return fp8_e4m3_clamped(n * s);
  }
}

// Register-cached kernel: rms_norm_reg_kernel's schedule (W elements per pack, V packs per thread,
// one warp per row when blockDim.x == 32, else one block per row), plus the amax reductions and
// the quantized stores. GS: group size (kNqGroup only; L = GS / W packs per group). Requires
// hidden / W <= V * blockDim.x and, for kNqGroup, hidden % GS == 0.
template <typename T, bool INT8, int W, int V, int MODE, int GS>
__global__ void __launch_bounds__(kRegKernelThreads)
rms_norm_quant_reg_kernel(NormQuantParams<T> p) {
  using P = Pack<T, W>;
  using QP = Pack<uint8_t, W>;
  constexpr bool DYN = MODE == kNqToken || MODE == kNqGroup;
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;  // whole warps only: a row never spans a partial warp
  const int n = p.hidden / W;
  const int B = blockDim.x;
  const P* x_row = reinterpret_cast<const P*>(p.in + row * p.in_stride);
  P* r_row = p.residual ? reinterpret_cast<P*>(p.residual + row * p.res_stride) : nullptr;
  const bool has_res = r_row != nullptr;
  QP* o_row = reinterpret_cast<QP*>(p.out + row * static_cast<int64_t>(p.hidden));
  const P* w_vec = reinterpret_cast<const P*>(p.weight);

  P x[V], r[V], w[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * B;
    if (i < n) {
      x[k] = x_row[i];
      w[k] = w_vec[i];
      if (has_res) {
        r[k] = r_row[i];
        if constexpr (MODE == kNqStaticAdd) {  // the sum rounded to T is the row to normalize
#pragma unroll
          for (int j = 0; j < W; ++j)
            x[k].v[j] = from_float<T>(to_float(x[k].v[j]) + to_float(r[k].v[j]));
        }
      }
    }
  }

  // Sum of squares: rms_norm_reg_kernel's loop (FUSED: the fp32 sum of the dynamic ops).
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * B;
    if (i < n) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float z = to_float(x[k].v[j]);
        if (DYN && has_res) z += to_float(r[k].v[j]);
        ss += z * z;
      }
    }
  }
  const float inv = rsqrtf(row_sum(ss) / static_cast<float>(p.hidden) + p.eps);

  // Normalize in registers (x[k] <- n) and write the residual.
  float amax = 0.f;
  float gmax[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * B;
    gmax[k] = 0.f;
    if (i < n) {
      P nv, s;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float z = to_float(x[k].v[j]);
        if (DYN && has_res) {
          z += to_float(r[k].v[j]);
          s.v[j] = from_float<T>(z);
        }
        nv.v[j] = scale_out<T>(z * inv, w[k].v[j], true);
        gmax[k] = fmaxf(gmax[k], fabsf(to_float(nv.v[j])));
      }
      if (has_res) r_row[i] = MODE == kNqStaticAdd ? x[k] : s;
      x[k] = nv;
      amax = fmaxf(amax, gmax[k]);
    }
  }

  float sc[V];  // per pack: the static reciprocal, or the pack's token / group scale
  if constexpr (MODE == kNqStatic || MODE == kNqStaticAdd) {
    const float sinv = 1.f / p.scale[0];
#pragma unroll
    for (int k = 0; k < V; ++k) sc[k] = sinv;
  } else if constexpr (MODE == kNqToken) {
    const float s = dynamic_scale<INT8>(row_max(amax), p.scale_ub);
    if (threadIdx.x == 0) p.scale[row] = s;
#pragma unroll
    for (int k = 0; k < V; ++k) sc[k] = s;
  } else {
    constexpr int L = GS / W;  // packs per group
    constexpr int SEG = L < 32 ? L : 32;
    static_assert(L % SEG == 0 && 32 % SEG == 0, "group of a power-of-two number of packs");
    // Groups of up to 32 packs are aligned runs of lanes (blockDim.x % 32 == 0): a segmented
    // shuffle. Longer groups (element-wise path): a warp's max per run of 32 packs through
    // shared memory, then the group's runs combined.
#pragma unroll
    for (int k = 0; k < V; ++k) {
#pragma unroll
      for (int o = SEG / 2; o > 0; o >>= 1)
        gmax[k] = fmaxf(gmax[k], __shfl_xor_sync(0xffffffffu, gmax[k], o));
    }
    if constexpr (L > 32) {
      constexpr int kRunsPerRow = kRegKernelThreads * 8 / 32;  // packs <= 256 threads x 8
      static_assert(kRunsPerRow >= 4 * 8, "4 warp rows of up to 8 runs each fit");
      __shared__ float run_max[kRunsPerRow];
      // Warp rows (blockDim.x == 32): 4 rows per block of at most 8 runs each.
      const int base = blockDim.x == 32 ? static_cast<int>(threadIdx.y) * 8 : 0;
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int run = warp + k * (B / 32);
        if (lane == 0 && run * 32 < n) run_max[base + run] = gmax[k];
      }
      if (blockDim.x == 32) __syncwarp(); else __syncthreads();
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int i = threadIdx.x + k * B;
        if (i < n) {
          const int first = (i / L) * (L / 32);
          float a = 0.f;
#pragma unroll
          for (int c = 0; c < L / 32; ++c) a = fmaxf(a, run_max[base + first + c]);
          gmax[k] = a;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = threadIdx.x + k * B;
      sc[k] = 0.f;
      if (i < n) {
        const float s = dynamic_scale<INT8>(gmax[k], p.scale_ub);
        if (i % L == 0) p.scale[row * p.scale_row_stride + (i / L) * p.scale_group_stride] = s;
        sc[k] = INT8 ? 1.f / s : s;
      }
    }
  }
  if constexpr (MODE == kNqToken && INT8) {
#pragma unroll
    for (int k = 0; k < V; ++k) sc[k] = 1.f / sc[k];
  }
  pdl_launch_dependents();  // only stores remain

#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int i = threadIdx.x + k * B;
    if (i < n) {
      QP q;
#pragma unroll
      for (int j = 0; j < W; ++j) q.v[j] = quant_code<INT8, DYN>(to_float(x[k].v[j]), sc[k]);
      o_row[i] = q;
    }
  }
}

// Fallback for rows too long for registers: one block per row. Pass 1 is rms_norm_twopass_kernel's
// sum of squares; then per token: an amax pass and a write pass; per group: each warp takes whole
// groups (an amax loop, then a write loop over the same elements, same lanes); static: the write
// pass. Inputs are re-read (mostly from L2). Every element of the residual is read and written by
// the same thread, reads first.
template <typename T, bool INT8, int W, int MODE, int GS>
__global__ void __launch_bounds__(1024) rms_norm_quant_twopass_kernel(NormQuantParams<T> p) {
  using P = Pack<T, W>;
  using QP = Pack<uint8_t, W>;
  constexpr bool DYN = MODE == kNqToken || MODE == kNqGroup;
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int n = p.hidden / W;
  const T* x_elems = p.in + row * p.in_stride;
  T* r_elems = p.residual ? p.residual + row * p.res_stride : nullptr;
  const P* x_row = reinterpret_cast<const P*>(x_elems);
  P* r_row = reinterpret_cast<P*>(r_elems);
  const bool has_res = r_row != nullptr;
  uint8_t* o_elems = p.out + row * static_cast<int64_t>(p.hidden);
  QP* o_row = reinterpret_cast<QP*>(o_elems);
  const P* w_vec = reinterpret_cast<const P*>(p.weight);

  // z of one element, as the reg kernel forms it.
  const auto zval = [&](T xv, T rv) {
    if (!has_res) return to_float(xv);
    if constexpr (MODE == kNqStaticAdd) return to_float(from_float<T>(to_float(xv) + to_float(rv)));
    return to_float(xv) + to_float(rv);
  };

  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P xv = x_row[i];
    P rv{};
    if (has_res) rv = r_row[i];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      float z = to_float(xv.v[j]);
      if (has_res) {
        if constexpr (MODE == kNqStaticAdd) {
          z = to_float(from_float<T>(z + to_float(rv.v[j])));
        } else {
          z += to_float(rv.v[j]);
        }
      }
      ss += z * z;
    }
  }
  const float inv = rsqrtf(row_sum(ss) / static_cast<float>(p.hidden) + p.eps);

  if constexpr (MODE == kNqGroup) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int groups = p.hidden / GS;
    for (int g = warp; g < groups; g += warps) {
      const int e0 = g * GS;
      float a = 0.f;
      for (int e = e0 + lane; e < e0 + GS; e += 32) {
        const float z = zval(x_elems[e], has_res ? r_elems[e] : T{});
        a = fmaxf(a, fabsf(to_float(scale_out<T>(z * inv, p.weight[e], true))));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
      const float s = dynamic_scale<INT8>(a, p.scale_ub);
      if (lane == 0) p.scale[row * p.scale_row_stride + g * p.scale_group_stride] = s;
      const float sq = INT8 ? 1.f / s : s;
      for (int e = e0 + lane; e < e0 + GS; e += 32) {
        const float z = zval(x_elems[e], has_res ? r_elems[e] : T{});
        if (has_res) r_elems[e] = from_float<T>(z);
        o_elems[e] = quant_code<INT8, true>(to_float(scale_out<T>(z * inv, p.weight[e], true)), sq);
      }
    }
    return;
  } else {
    float sq;
    if constexpr (MODE == kNqToken) {
      float a = 0.f;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const P xv = x_row[i], wv = w_vec[i];
        P rv{};
        if (has_res) rv = r_row[i];
#pragma unroll
        for (int j = 0; j < W; ++j)
          a = fmaxf(a, fabsf(to_float(
                           scale_out<T>(zval(xv.v[j], rv.v[j]) * inv, wv.v[j], true))));
      }
      const float s = dynamic_scale<INT8>(row_max(a), p.scale_ub);
      if (threadIdx.x == 0) p.scale[row] = s;
      sq = INT8 ? 1.f / s : s;
    } else {
      sq = 1.f / p.scale[0];
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const P xv = x_row[i], wv = w_vec[i];
      P rv{};
      if (has_res) rv = r_row[i];
      QP q;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float z = zval(xv.v[j], rv.v[j]);
        if (has_res) rv.v[j] = from_float<T>(z);
        q.v[j] = quant_code<INT8, DYN>(to_float(scale_out<T>(z * inv, wv.v[j], true)), sq);
      }
      if (has_res) r_row[i] = rv;
      o_row[i] = q;
    }
  }
}

}  // namespace compile_ops
