// merge_attn_states: combine two partial attention results by their log-sum-exps (section 2.2 of
// arXiv:2501.01005), vLLM's semantics: an infinite LSE (+inf or -inf) means "empty" and counts
// as -inf; when both are empty the prefix output and -inf are passed through.
#pragma once

#include <cmath>

#include "compile_ops/vec.cuh"

namespace compile_ops {

struct MergeArgs {
  void* out;  // [tokens, heads, head_size], last dim contiguous
  int64_t out_t, out_h;
  const void* pre;
  int64_t pre_t, pre_h;
  const void* suf;
  int64_t suf_t, suf_h;
  const float* pre_lse;  // [heads, tokens]
  int64_t pre_lse_h, pre_lse_t;
  const float* suf_lse;
  int64_t suf_lse_h, suf_lse_t;
  float* out_lse;  // optional
  int64_t out_lse_h, out_lse_t;
  int64_t tokens;
  int heads, head_size;
};

__device__ __forceinline__ bool is_inf(float x) { return x == INFINITY || x == -INFINITY; }
__device__ __forceinline__ float empty_as_neg_inf(float x) { return is_inf(x) ? -INFINITY : x; }

// One item = W elements of one (token, head); the LSE pair is re-read per item (L1 hits).
template <typename T, int W>
__global__ void merge_attn_states_kernel(MergeArgs a) {
  using P = Pack<T, W>;
  pdl_wait();
  const int per_head = a.head_size / W;
  const int64_t items = a.tokens * a.heads * per_head;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += stride) {
    const int64_t th = i / per_head;
    const int j = static_cast<int>(i - th * per_head);
    const int64_t t = th / a.heads;
    const int h = static_cast<int>(th - t * a.heads);
    const float p_lse = empty_as_neg_inf(a.pre_lse[h * a.pre_lse_h + t * a.pre_lse_t]);
    const float s_lse = empty_as_neg_inf(a.suf_lse[h * a.suf_lse_h + t * a.suf_lse_t]);
    const float m = fmaxf(p_lse, s_lse);
    const P p = reinterpret_cast<const P*>(static_cast<const T*>(a.pre) + t * a.pre_t +
                                           h * a.pre_h)[j];
    P o;
    float out_lse;
    if (is_inf(m)) {  // both empty
      o = p;
      out_lse = m;
    } else {
      const P s = reinterpret_cast<const P*>(static_cast<const T*>(a.suf) + t * a.suf_t +
                                             h * a.suf_h)[j];
      const float pe = expf(p_lse - m), se = expf(s_lse - m);
      const float sum = pe + se;
      const float ps = pe / sum, ss = se / sum;
#pragma unroll
      for (int w = 0; w < W; ++w)
        o.v[w] = from_float<T>(to_float(p.v[w]) * ps + to_float(s.v[w]) * ss);
      out_lse = logf(sum) + m;
    }
    reinterpret_cast<P*>(static_cast<T*>(a.out) + t * a.out_t + h * a.out_h)[j] = o;
    if (a.out_lse != nullptr && j == 0) a.out_lse[h * a.out_lse_h + t * a.out_lse_t] = out_lse;
  }
}

}  // namespace compile_ops
