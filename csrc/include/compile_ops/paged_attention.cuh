// Paged attention for decode (one query token per sequence) over the reshape_and_cache layout:
// key_cache [blocks, kv_heads, head_size / X, block_size, X], value_cache [blocks, kv_heads,
// head_size, block_size]. One CTA = one KV head x up to kMaxGroup of its query heads x one
// partition of kPartition tokens: the keys and values are read once for the whole group.
// Partition results (max logit, exp sum, normalized partial output) go to v2's buffers; a second
// kernel merges the partitions (v1 runs the same two kernels with internal buffers).
#pragma once

#include <cmath>

#include "compile_ops/fp8.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

constexpr int kPartition = 512;    // tokens per partition (vLLM's v2 partition size)
constexpr int kMaxGroup = 8;       // query heads per CTA
constexpr int kMaxHead = 256;      // largest head size
constexpr int kAttnThreads = 128;  // 4 warps

struct PagedAttnArgs {
  const void* query;  // [seqs, heads, head_size]
  int64_t q_seq, q_head;
  const void* key_cache;
  int64_t kc_block, kc_head, kc_chunk, kc_page;
  const void* value_cache;
  int64_t vc_block, vc_head, vc_dim, vc_page;
  const int32_t* block_tables;
  int64_t bt_stride, bt_cols;
  const int32_t* seq_lens;
  const float* alibi;  // [heads] or null
  float scale;
  const float* k_scale;
  const float* v_scale;
  int heads, kv_heads, head_size, block_size;
  int64_t num_blocks;
  float* max_logits;  // [seqs, heads, parts]
  float* exp_sums;
  int64_t ml_seq, ml_head;  // strides of max_logits / exp_sums (last dim contiguous)
  void* tmp_out;  // [seqs, heads, parts, head_size]
  int64_t tmp_seq, tmp_head, tmp_part;
  void* out;  // [seqs, heads, head_size]
  int64_t out_seq, out_head;
  int parts;  // partitions allocated per (seq, head)
};

// One cached element as float: the model dtype as is, FP8 codes times the scale.
template <int KV, typename C>
__device__ __forceinline__ float cache_value(C c, float scale) {
  if constexpr (KV == kKvAuto) {
    return to_float(c);
  } else {
    return fp8_decode<KV>(c, scale);
  }
}

// Block of tokens -> cache block id, or -1 when the table entry is out of range.
__device__ __forceinline__ int64_t cache_block(const PagedAttnArgs& a, int64_t seq, int64_t t) {
  const int64_t col = t / a.block_size;
  if (col >= a.bt_cols) return -1;
  const int64_t b = a.block_tables[seq * a.bt_stride + col];
  return (b < 0 || b >= a.num_blocks) ? -1 : b;
}

// Sum (or max) of v over the CTA; every thread gets the result. `red` holds one float per warp.
template <bool MAX>
__device__ __forceinline__ float cta_reduce(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kAttnThreads / 32; ++w) v = MAX ? fmaxf(v, red[w]) : v + red[w];
  return v;
}

// grid: (kv_heads * ceil(group / kMaxGroup), seqs, parts)
template <typename T, typename C, int KV, bool VEC>
__global__ void __launch_bounds__(kAttnThreads) paged_attention_kernel(PagedAttnArgs a) {
  constexpr int X = 16 / static_cast<int>(sizeof(C));  // key elements per chunk
  __shared__ float q_s[kMaxGroup][kMaxHead];
  __shared__ float logits[kMaxGroup][kPartition];
  __shared__ float red[kAttnThreads / 32];
  pdl_wait();
  const int group = a.heads / a.kv_heads;
  const int slices = (group + kMaxGroup - 1) / kMaxGroup;
  const int kvh = blockIdx.x / slices;
  const int g0 = (blockIdx.x % slices) * kMaxGroup;
  const int ng = group - g0 < kMaxGroup ? group - g0 : kMaxGroup;
  const int64_t seq = blockIdx.y;
  const int part = blockIdx.z;
  const int64_t len = a.seq_lens[seq];
  const int64_t t0 = static_cast<int64_t>(part) * kPartition;
  if (t0 >= len && !(part == 0 && len <= 0)) return;  // partition past the sequence
  const int n = static_cast<int>(len - t0 < kPartition ? (len > t0 ? len - t0 : 0) : kPartition);
  const int D = a.head_size;
  const int h0 = kvh * group + g0;  // first query head of this CTA
  const float ks = KV != kKvAuto ? *a.k_scale : 1.0f;
  const float vs = KV != kKvAuto ? *a.v_scale : 1.0f;

  for (int i = threadIdx.x; i < ng * D; i += blockDim.x) {
    const int g = i / D, d = i - g * D;
    q_s[g][d] = to_float(static_cast<const T*>(a.query)[seq * a.q_seq + (h0 + g) * a.q_head + d]);
  }
  __syncthreads();

  // Phase 1: logits. A token's key is D / X chunks of X contiguous elements; LPT lanes (a power
  // of two) share a token, each taking chunks lane, lane + LPT, ...; 32 / LPT tokens per step.
  const int chunks = D / X;
  int lpt = 1;
  while (lpt < chunks && lpt < 32) lpt <<= 1;
  const int tpw = 32 / lpt;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane / lpt, cl = lane % lpt;
  for (int base = warp * tpw; base < n; base += (kAttnThreads / 32) * tpw) {
    const int ti = base + sub;  // token index within the partition
    float dot[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) dot[g] = 0.0f;
    int64_t blk = -1;
    if (ti < n) blk = cache_block(a, seq, t0 + ti);
    if (blk >= 0) {
      const int64_t off = (t0 + ti) % a.block_size;
      const C* kp = static_cast<const C*>(a.key_cache) + blk * a.kc_block + kvh * a.kc_head +
                    off * a.kc_page;
      for (int c = cl; c < chunks; c += lpt) {
        const Pack<C, X> k = *reinterpret_cast<const Pack<C, X>*>(kp + c * a.kc_chunk);
#pragma unroll
        for (int e = 0; e < X; ++e) {
          const float kv = cache_value<KV>(k.v[e], ks);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < ng) dot[g] += q_s[g][c * X + e] * kv;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      for (int o = lpt / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
    }
    if (cl == 0 && ti < n) {
      for (int g = 0; g < ng; ++g) {
        float l = blk >= 0 ? dot[g] * a.scale : -INFINITY;  // a bad block id: token left out
        if (a.alibi != nullptr && blk >= 0)
          l += a.alibi[h0 + g] * static_cast<float>(t0 + ti - len + 1);
        logits[g][ti] = l;
      }
    }
  }
  __syncthreads();

  // Phase 2: per query head, max and sum of exp over the partition; logits become exp weights.
  float m[kMaxGroup], s[kMaxGroup];
  for (int g = 0; g < ng; ++g) {
    float v = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v = fmaxf(v, logits[g][i]);
    m[g] = cta_reduce<true>(v, red);
    const float mg = m[g] == -INFINITY ? 0.0f : m[g];
    float e = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float w = expf(logits[g][i] - mg);
      logits[g][i] = w;
      e += w;
    }
    s[g] = cta_reduce<false>(e, red);
  }
  __syncthreads();

  // Phase 3: partial output per dimension: sum_t w[g][t] * v[t][d] / sum_t w[g][t]. A
  // partition starts on a block boundary (block_size divides kPartition), and a value row holds
  // a block's pages contiguously: VT pages per load when VEC (the launcher checked alignment).
  constexpr int VT = VEC ? 16 / static_cast<int>(sizeof(C)) : 1;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.0f;
    for (int b0 = 0; b0 < n; b0 += a.block_size) {
      const int64_t blk = cache_block(a, seq, t0 + b0);
      if (blk < 0) continue;
      const C* row = static_cast<const C*>(a.value_cache) + blk * a.vc_block + kvh * a.vc_head +
                     d * a.vc_dim;
      for (int j = 0; j < a.block_size && b0 + j < n; j += VT) {
        Pack<C, VT> pk;
        if constexpr (VEC) {
          pk = *reinterpret_cast<const Pack<C, VT>*>(row + j);  // pages past n: read, not used
        } else {
          pk.v[0] = row[j * a.vc_page];
        }
#pragma unroll
        for (int e = 0; e < VT; ++e) {
          const int ti = b0 + j + e;
          if (ti >= n) break;
          const float v = cache_value<KV>(pk.v[e], vs);
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g)
            if (g < ng) acc[g] += logits[g][ti] * v;
        }
      }
    }
    for (int g = 0; g < ng; ++g) {
      const int64_t h = h0 + g;
      const float o = s[g] > 0.0f ? acc[g] / s[g] : 0.0f;
      static_cast<T*>(a.tmp_out)[seq * a.tmp_seq + h * a.tmp_head + part * a.tmp_part + d] =
          from_float<T>(o);
    }
  }
  if (threadIdx.x == 0) {
    for (int g = 0; g < ng; ++g) {
      const int64_t i = seq * a.ml_seq + (h0 + g) * a.ml_head + part;
      a.max_logits[i] = m[g];
      a.exp_sums[i] = s[g];
    }
  }
}

// grid: (heads, seqs). out = sum_p tmp_p * e_p * exp(m_p - M) / sum_p e_p * exp(m_p - M).
template <typename T>
__global__ void paged_attention_reduce_kernel(PagedAttnArgs a) {
  pdl_wait();
  const int64_t h = blockIdx.x, seq = blockIdx.y;
  const int64_t len = a.seq_lens[seq];
  // Tokens past the allocated partitions (a seq_len above the caller's max_seq_len) are left out.
  const int64_t need = len <= 0 ? 1 : (len + kPartition - 1) / kPartition;
  const int parts = static_cast<int>(need < a.parts ? need : a.parts);
  const float* ml = a.max_logits + seq * a.ml_seq + h * a.ml_head;
  const float* es = a.exp_sums + seq * a.ml_seq + h * a.ml_head;
  float mx = -INFINITY;
  for (int p = 0; p < parts; ++p) mx = fmaxf(mx, ml[p]);
  const float m0 = mx == -INFINITY ? 0.0f : mx;
  float total = 0.0f;
  for (int p = 0; p < parts; ++p) total += es[p] * expf(ml[p] - m0);
  for (int d = threadIdx.x; d < a.head_size; d += blockDim.x) {
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) {
      const float w = es[p] * expf(ml[p] - m0);
      acc += w * to_float(static_cast<const T*>(a.tmp_out)[seq * a.tmp_seq + h * a.tmp_head +
                                                           p * a.tmp_part + d]);
    }
    static_cast<T*>(a.out)[seq * a.out_seq + h * a.out_head + d] =
        from_float<T>(total > 0.0f ? acc / total : 0.0f);
  }
}

}  // namespace compile_ops
