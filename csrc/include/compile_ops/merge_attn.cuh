// merge_attn_states: combine two partial attention results by their log-sum-exps (section 2.2 of
// arXiv:2501.01005), vLLM's semantics: an infinite LSE (+inf or -inf) means "empty" and counts
// as -inf; when both are empty the prefix output and -inf are passed through. Tokens from
// ctx_tokens on (no prefix context) take the suffix output and LSE unchanged. With an FP8 output
// each value is stored as e4m3(x * (1 / scale)), saturated, rounded to nearest even.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "compile_ops/fp8.cuh"
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
  const float* out_scale;  // one value, FP8 output only
  int64_t tokens;
  int64_t ctx_tokens;  // tokens [ctx_tokens, tokens) have no prefix: the suffix passes through
  int heads, head_size;
};

__device__ __forceinline__ bool is_inf(float x) { return x == INFINITY || x == -INFINITY; }
__device__ __forceinline__ float empty_as_neg_inf(float x) { return is_inf(x) ? -INFINITY : x; }

// One output element from its float32 value: the input dtype T, or (O = uint8_t) an e4m3 code of
// v * inv_scale. SATFINITE saturates to +-448 as vLLM's clamp does (NaN stays NaN here; vLLM's
// fminf/fmaxf clamp turns it into 448).
template <typename O>
__device__ __forceinline__ O merge_out(float v, float inv_scale) {
  if constexpr (std::is_same_v<O, uint8_t>) {
    return static_cast<uint8_t>(
        __nv_cvt_float_to_fp8(v * inv_scale, __NV_SATFINITE, fp8_interp<kKvE4M3>()));
  } else {
    return from_float<O>(v);
  }
}

// A pack passed through unchanged: a bit copy into the same dtype, else converted.
template <typename O, typename T, int W>
__device__ __forceinline__ Pack<O, W> pass_through(const Pack<T, W>& x, float inv_scale) {
  if constexpr (std::is_same_v<O, T>) {
    return x;
  } else {
    Pack<O, W> o;
#pragma unroll
    for (int w = 0; w < W; ++w) o.v[w] = merge_out<O>(to_float(x.v[w]), inv_scale);
    return o;
  }
}

// One item = W elements of one (token, head); the LSE pair is re-read per item (L1 hits).
// T: the inputs' dtype; O: the output's (T, or uint8_t for e4m3 codes).
template <typename T, typename O, int W>
__global__ void merge_attn_states_kernel(MergeArgs a) {
  using P = Pack<T, W>;
  using Q = Pack<O, W>;
  pdl_wait();
  float inv_scale = 1.0f;
  if constexpr (!std::is_same_v<O, T>) inv_scale = 1.0f / *a.out_scale;  // as vLLM: 1 / s, then *
  const int per_head = a.head_size / W;
  const int64_t items = a.tokens * a.heads * per_head;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += stride) {
    const int64_t th = i / per_head;
    const int j = static_cast<int>(i - th * per_head);
    const int64_t t = th / a.heads;
    const int h = static_cast<int>(th - t * a.heads);
    const P* suf = reinterpret_cast<const P*>(static_cast<const T*>(a.suf) + t * a.suf_t +
                                              h * a.suf_h);
    Q o;
    float out_lse;
    if (t >= a.ctx_tokens) {  // no prefix context: neither prefix_output nor prefix_lse is read
      o = pass_through<O>(suf[j], inv_scale);
      out_lse = a.out_lse != nullptr && j == 0 ? a.suf_lse[h * a.suf_lse_h + t * a.suf_lse_t]
                                               : 0.0f;
    } else {
      const float p_lse = empty_as_neg_inf(a.pre_lse[h * a.pre_lse_h + t * a.pre_lse_t]);
      const float s_lse = empty_as_neg_inf(a.suf_lse[h * a.suf_lse_h + t * a.suf_lse_t]);
      const float m = fmaxf(p_lse, s_lse);
      const P p = reinterpret_cast<const P*>(static_cast<const T*>(a.pre) + t * a.pre_t +
                                             h * a.pre_h)[j];
      if (is_inf(m)) {  // both empty
        o = pass_through<O>(p, inv_scale);
        out_lse = m;
      } else {
        const P s = suf[j];
        const float pe = expf(p_lse - m), se = expf(s_lse - m);
        const float sum = pe + se;
        const float ps = pe / sum, ss = se / sum;
#pragma unroll
        for (int w = 0; w < W; ++w)
          o.v[w] = merge_out<O>(to_float(p.v[w]) * ps + to_float(s.v[w]) * ss, inv_scale);
        out_lse = logf(sum) + m;
      }
    }
    reinterpret_cast<Q*>(static_cast<O*>(a.out) + t * a.out_t + h * a.out_h)[j] = o;
    if (a.out_lse != nullptr && j == 0) a.out_lse[h * a.out_lse_h + t * a.out_lse_t] = out_lse;
  }
}

}  // namespace compile_ops
