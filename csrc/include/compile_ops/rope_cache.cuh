// Fused RoPE + paged KV-cache write: one CTA per token rotates the token's query heads in place,
// rotates its key heads and stores them into the cache (and back in place when asked), and copies
// its value heads into the cache. Two cache layouts (PAGED): flash ([blocks, page, heads, head]
// for both, any block/page/head strides) and vLLM's paged one (keys x-packed: [blocks, heads,
// head / X, page, X] with X = 16 bytes of the cache type; values [blocks, heads, head, page]).
// 128-bit accesses of the inputs only: the launcher sends other layouts to the two separate
// kernels. A W-vector of the input (W = 16 bytes of T) is W contiguous cache elements in both
// key layouts (X is a multiple of W); paged values are stored element by element (stride: the
// page size).
#pragma once

#include "compile_ops/fp8.cuh"
#include "compile_ops/rotary.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

struct RopeCacheArgs {
  const int64_t* positions;
  void* query;
  int64_t q_stride;
  int nq;
  void* key;
  int64_t k_stride;
  int nk;
  const void* value;  // [tokens, nk, hv], heads packed
  int64_t v_stride;
  int hv;
  const void* cos_sin;  // [max_pos, rot_dim]: cos half then sin half
  int64_t max_pos;
  int rot_dim, head_size;
  void* key_cache;
  int64_t kc_block, kc_page, kc_head, kc_dim;  // kc_dim: paged, the stride of the head / X dim
  void* value_cache;
  int64_t vc_block, vc_page, vc_head, vc_dim;  // vc_dim: paged, the stride of the head dim
  const int64_t* slots;
  int64_t num_mapped;  // len(slot_mapping): tokens past it are rotated, not cached
  int64_t num_slots;   // num_blocks * block_size
  int block_size;
  const float* k_scale;
  int k_per_head;
  const float* v_scale;
  int v_per_head;
  int write_key;
};

template <typename T, typename CosT, typename C, int KV, bool NEOX, bool PAGED>
__global__ void fused_rope_and_cache_kernel(RopeCacheArgs a) {
  constexpr int W = kVecWidth<T>;
  constexpr int X = 16 / static_cast<int>(sizeof(C));  // paged: elements per key chunk
  static_assert(X % W == 0, "a W-vector lies inside one key chunk");
  using P = Pack<T, W>;
  using PC = Pack<C, W>;
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int64_t pos = a.positions[t];
  const bool rotate = pos >= 0 && pos < a.max_pos;  // else: left as is, like rotary_embedding
  const int64_t slot = t < a.num_mapped ? a.slots[t] : -1;
  const bool cached = slot >= 0 && slot < a.num_slots;
  const int64_t blk = cached ? slot / a.block_size : 0;
  const int64_t off = cached ? slot - blk * a.block_size : 0;
  const int half = a.rot_dim / 2;
  const CosT* cs = static_cast<const CosT*>(a.cos_sin) + (rotate ? pos : 0) * a.rot_dim;
  const int per_rot = (NEOX ? half : a.rot_dim) / W;
  const int per_tail = (a.head_size - a.rot_dim) / W;
  const int q_items = a.nq * per_rot, k_items = a.nk * per_rot;
  const int kt_items = cached ? a.nk * per_tail : 0;
  const int v_items = cached ? a.nk * (a.hv / W) : 0;
  const int total = q_items + k_items + kt_items + v_items;

  // Rotates the W-vectors x (and y, NeoX) of one head in registers.
  auto rotate_vecs = [&](P& x, P& y, int j) {
    if constexpr (NEOX) {
      const int i0 = j * W;
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float c = to_float(cs[i0 + w]), s = to_float(cs[half + i0 + w]);
        const float u = to_float(x.v[w]), v = to_float(y.v[w]);
        float rx, ry;
        rotate_pair(u, v, c, s, rx, ry);
        x.v[w] = from_float<T>(rx);
        y.v[w] = from_float<T>(ry);
      }
    } else {
      const int p0 = j * W / 2;
#pragma unroll
      for (int p = 0; p < W / 2; ++p) {
        const float c = to_float(cs[p0 + p]), s = to_float(cs[half + p0 + p]);
        const float u = to_float(x.v[2 * p]), v = to_float(x.v[2 * p + 1]);
        float rx, ry;
        rotate_pair(u, v, c, s, rx, ry);
        x.v[2 * p] = from_float<T>(rx);
        x.v[2 * p + 1] = from_float<T>(ry);
      }
    }
  };
  auto encode = [&](const P& in, float sc) {
    PC out;
#pragma unroll
    for (int w = 0; w < W; ++w) out.v[w] = cache_encode<KV, C>(in.v[w], sc);
    return out;
  };
  auto k_dst = [&](int h, int e) {
    const int64_t inner = PAGED ? (e / X) * a.kc_dim + e % X : e;
    return reinterpret_cast<PC*>(static_cast<C*>(a.key_cache) + blk * a.kc_block +
                                 off * a.kc_page + h * a.kc_head + inner);
  };

  for (int it = threadIdx.x; it < total; it += blockDim.x) {
    if (it < q_items + k_items) {
      const bool is_q = it < q_items;
      const int r = is_q ? it : it - q_items;
      const int h = r / per_rot, j = r - h * per_rot;
      T* head = is_q ? static_cast<T*>(a.query) + t * a.q_stride + int64_t(h) * a.head_size
                     : static_cast<T*>(a.key) + t * a.k_stride + int64_t(h) * a.head_size;
      const int ex = NEOX ? j * W : j * W;          // x vector's first element
      const int ey = NEOX ? half + j * W : ex;      // y vector (NeoX only)
      P x = *reinterpret_cast<const P*>(head + ex);
      P y;
      if constexpr (NEOX) y = *reinterpret_cast<const P*>(head + ey);
      if (rotate) rotate_vecs(x, y, j);
      if (rotate && (is_q || a.write_key)) {
        *reinterpret_cast<P*>(head + ex) = x;
        if constexpr (NEOX) *reinterpret_cast<P*>(head + ey) = y;
      }
      if (!is_q && cached) {
        const float sc = KV != kKvAuto ? a.k_scale[a.k_per_head ? h : 0] : 1.0f;
        *k_dst(h, ex) = encode(x, sc);
        if constexpr (NEOX) *k_dst(h, ey) = encode(y, sc);
      }
    } else if (it < q_items + k_items + kt_items) {  // key dims past rot_dim: copied as they are
      const int r = it - q_items - k_items;
      const int h = r / per_tail, e = a.rot_dim + (r - h * per_tail) * W;
      const P x = *reinterpret_cast<const P*>(static_cast<const T*>(a.key) + t * a.k_stride +
                                              int64_t(h) * a.head_size + e);
      *k_dst(h, e) = encode(x, KV != kKvAuto ? a.k_scale[a.k_per_head ? h : 0] : 1.0f);
    } else {
      const int r = it - q_items - k_items - kt_items;
      const int per_v = a.hv / W;
      const int h = r / per_v, e = (r - h * per_v) * W;
      const P x = *reinterpret_cast<const P*>(static_cast<const T*>(a.value) + t * a.v_stride +
                                              int64_t(h) * a.hv + e);
      C* dst = static_cast<C*>(a.value_cache) + blk * a.vc_block + off * a.vc_page +
               h * a.vc_head;
      const PC y = encode(x, KV != kKvAuto ? a.v_scale[a.v_per_head ? h : 0] : 1.0f);
      if constexpr (PAGED) {
#pragma unroll
        for (int w = 0; w < W; ++w) dst[(e + w) * a.vc_dim] = y.v[w];
      } else {
        *reinterpret_cast<PC*>(dst + e) = y;
      }
    }
  }
}

}  // namespace compile_ops
