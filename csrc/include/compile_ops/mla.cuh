// MLA and sparse-indexer cache kernels (compile_ops/mla.py has the layouts and semantics).
// Device code only; launchers in csrc/mla_kernels.cu.
//
// Every index read from device memory (slot, position, block-table entry, request offset) is
// range-checked before it forms an address: an out-of-range one skips its token or row.
// Float32 scales inside byte caches are stored and loaded a byte at a time (one per group of
// 128 values: no alignment requirement on the cache for them).
#pragma once

#include "compile_ops/fp8.cuh"
#include "compile_ops/rotary.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

constexpr int kMlaThreads = 256;  // 8 warps
constexpr float kFp8E4M3Max = 448.0f;

__device__ __forceinline__ void store_f32_bytes(uint8_t* p, float v) {
  const uint32_t u = __float_as_uint(v);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(u >> (8 * i));
}

__device__ __forceinline__ float load_f32_bytes(const uint8_t* p) {
  uint32_t u = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) u |= static_cast<uint32_t>(p[i]) << (8 * i);
  return __uint_as_float(u);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// W elements at p (one access when VEC, else element by element).
template <typename T, int W, bool VEC>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  if constexpr (VEC) {
    return *reinterpret_cast<const Pack<T, W>*>(p);
  } else {
    Pack<T, W> r;
#pragma unroll
    for (int w = 0; w < W; ++w) r.v[w] = p[w];
    return r;
  }
}

template <typename T, int W, bool VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& v) {
  if constexpr (VEC) {
    *reinterpret_cast<Pack<T, W>*>(p) = v;
  } else {
#pragma unroll
    for (int w = 0; w < W; ++w) p[w] = v.v[w];
  }
}

// Largest i in [0, n) with starts[i] <= x (starts nondecreasing), or -1.
__device__ __forceinline__ int64_t last_start_at_or_below(const int32_t* starts, int64_t n,
                                                          int64_t x) {
  int64_t lo = 0, hi = n;  // first index with starts[i] > x is in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(starts[mid]) <= x) lo = mid + 1; else hi = mid;
  }
  return lo - 1;
}

// ---------------------------------------------------------------------------------------------
// concat_and_cache_mla (auto / fp8 / fp8_e5m2): entry = [kv_c | k_pe], quantized per KV
// ---------------------------------------------------------------------------------------------
struct MlaWrite {
  const void* kv_c;
  int64_t kv_stride;  // elements between tokens
  const void* k_pe;
  int64_t pe_stride;
  void* cache;        // elements of C
  int64_t block_stride, page_stride;
  const int64_t* slots;
  int64_t num_tokens, num_slots;
  int block_size;
  int rank_vecs, pe_vecs;  // rank / W, pe / W
  int tokens_per_cta;
  const float* scale;
};

// Items are (token, vector) of one CTA's tokens; U loads per thread are issued before the stores.
template <typename T, typename C, int KV, int W, int U>
__global__ void concat_and_cache_mla_kernel(MlaWrite a) {
  pdl_wait();
  const int per_token = a.rank_vecs + a.pe_vecs;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * a.tokens_per_cta;
  const int64_t ntok = a.num_tokens - t0 < a.tokens_per_cta ? a.num_tokens - t0 : a.tokens_per_cta;
  const int items = static_cast<int>(ntok) * per_token;
  const float sc = KV != kKvAuto ? *a.scale : 1.0f;
  const int rank = a.rank_vecs * W;
  for (int base = threadIdx.x; base < items; base += blockDim.x * U) {
    Pack<T, W> in[U];
    C* dst[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      dst[u] = nullptr;
      const int i = base + u * blockDim.x;
      if (i >= items) continue;
      const int64_t t = t0 + i / per_token;
      const int j = i % per_token;
      const int64_t slot = a.slots[t];
      if (slot < 0 || slot >= a.num_slots) continue;
      const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
      C* entry = static_cast<C*>(a.cache) + blk * a.block_stride + off * a.page_stride;
      if (j < a.rank_vecs) {
        in[u] = *reinterpret_cast<const Pack<T, W>*>(static_cast<const T*>(a.kv_c) +
                                                     t * a.kv_stride + j * W);
        dst[u] = entry + j * W;
      } else {
        const int e = (j - a.rank_vecs) * W;
        in[u] = *reinterpret_cast<const Pack<T, W>*>(static_cast<const T*>(a.k_pe) +
                                                     t * a.pe_stride + e);
        dst[u] = entry + rank + e;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] == nullptr) continue;
      Pack<C, W> out;
#pragma unroll
      for (int w = 0; w < W; ++w) out.v[w] = cache_encode<KV, C>(in[u].v[w], sc);
      *reinterpret_cast<Pack<C, W>*>(dst[u]) = out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// concat_and_cache_mla, fp8_ds_mla: 656-byte entries [512 e4m3 | 4 x f32 scale | 64 x 16-bit]
// ---------------------------------------------------------------------------------------------
struct DsMlaWrite {
  const void* kv_c;
  int64_t kv_stride;
  const void* k_pe;
  int64_t pe_stride;
  uint8_t* cache;
  int64_t block_stride, page_stride;  // bytes
  const int64_t* slots;
  int64_t num_tokens, num_slots;
  int block_size;
};

// One warp per (token, part): parts 0-3 quantize one 128-value tile (4 values per lane, the
// tile's amax by a warp reduction), part 4 copies the 64 rope values bit for bit.
// VEC: 8-byte loads of kv_c and 4-byte stores of codes (the launcher checked alignment).
template <typename T, bool VEC>
__global__ void concat_and_cache_ds_mla_kernel(DsMlaWrite a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (item >= a.num_tokens * 5) return;
  const int64_t t = item / 5;
  const int part = static_cast<int>(item - t * 5);
  const int64_t slot = a.slots[t];
  if (slot < 0 || slot >= a.num_slots) return;  // the whole warp leaves together
  const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
  uint8_t* entry = a.cache + blk * a.block_stride + off * a.page_stride;
  if (part == 4) {
    const T* src = static_cast<const T*>(a.k_pe) + t * a.pe_stride;
    T* dst = reinterpret_cast<T*>(entry + 528);
    for (int i = lane; i < 64; i += 32) dst[i] = src[i];
    return;
  }
  const T* src = static_cast<const T*>(a.kv_c) + t * a.kv_stride + part * 128 + lane * 4;
  const Pack<T, 4> x = load_pack<T, 4, VEC>(src);
  float v[4], amax = 0.0f;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    v[w] = to_float(x.v[w]);
    amax = fmaxf(amax, fabsf(v[w]));
  }
  amax = warp_max(amax);
  const float sc = fmaxf(amax / kFp8E4M3Max, 1.17549435e-38f);  // FLT_MIN
  Pack<uint8_t, 4> q;
#pragma unroll
  for (int w = 0; w < 4; ++w) q.v[w] = fp8_encode<kKvE4M3>(v[w], sc);
  store_pack<uint8_t, 4, VEC>(entry + part * 128 + lane * 4, q);
  if (lane == 0) store_f32_bytes(entry + 512 + 4 * part, sc);
}

// ---------------------------------------------------------------------------------------------
// concat_and_cache_mla_rope_fused: one CTA per token
// ---------------------------------------------------------------------------------------------
struct MlaRope {
  const void* positions;  // int64 or int32, [tokens]
  void* q_pe;
  int64_t q_token_stride, q_head_stride;
  int heads;
  void* k_pe;
  int64_t pe_stride;
  const void* kv_c;
  int64_t kv_stride;
  const void* cos_sin;  // [max_pos, rot]
  int64_t max_pos;
  int rot, rank;
  const int64_t* slots;
  int64_t num_slots;
  int block_size;
  void* cache;
  int64_t block_stride, page_stride;
  const float* scale;
};

// Items of a token: q rotation units (heads x per_rot), k rotation units (per_rot, only with a
// slot), kv_c vectors (rank / W, or single elements without VEC; only with a slot). A rotation unit is W x-values and their W
// y-values (NeoX) or W interleaved values = W / 2 pairs (GPT-J). VEC: every unit is one access.
template <typename T, typename C, typename CosT, typename PosT, int KV, bool NEOX, int W, bool VEC>
__global__ void concat_and_cache_mla_rope_kernel(MlaRope a) {
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int64_t pos = static_cast<int64_t>(static_cast<const PosT*>(a.positions)[t]);
  if (pos < 0 || pos >= a.max_pos) return;  // bad position: nothing rotated, nothing cached
  const int half = a.rot / 2;
  const int per_rot = (NEOX ? half : a.rot) / W;
  const CosT* cs = static_cast<const CosT*>(a.cos_sin) + pos * a.rot;
  const int64_t slot = a.slots[t];
  const bool cached = slot >= 0 && slot < a.num_slots;
  constexpr int KW = VEC ? W : 1;  // kv_c elements per item
  const int q_items = a.heads * per_rot;
  const int total = q_items + (cached ? per_rot + a.rank / KW : 0);
  C* entry = nullptr;
  if (cached) {
    const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
    entry = static_cast<C*>(a.cache) + blk * a.block_stride + off * a.page_stride;
  }
  const float sc = KV != kKvAuto ? *a.scale : 1.0f;
  for (int it = threadIdx.x; it < total; it += blockDim.x) {
    if (it < q_items + (cached ? per_rot : 0)) {
      const bool is_q = it < q_items;
      const int r = is_q ? it : it - q_items;
      const int h = is_q ? r / per_rot : 0, j = is_q ? r - h * per_rot : r;
      T* head = is_q ? static_cast<T*>(a.q_pe) + t * a.q_token_stride + h * a.q_head_stride
                     : static_cast<T*>(a.k_pe) + t * a.pe_stride;
      if constexpr (NEOX) {
        const int i0 = j * W;
        Pack<T, W> x = load_pack<T, W, VEC>(head + i0);
        Pack<T, W> y = load_pack<T, W, VEC>(head + half + i0);
#pragma unroll
        for (int w = 0; w < W; ++w) {
          float rx, ry;
          rotate_pair(to_float(x.v[w]), to_float(y.v[w]), to_float(cs[i0 + w]),
                      to_float(cs[half + i0 + w]), rx, ry);
          x.v[w] = from_float<T>(rx);
          y.v[w] = from_float<T>(ry);
        }
        store_pack<T, W, VEC>(head + i0, x);
        store_pack<T, W, VEC>(head + half + i0, y);
        if (!is_q) {
          Pack<C, W> ex, ey;
#pragma unroll
          for (int w = 0; w < W; ++w) {
            ex.v[w] = cache_encode<KV, C>(x.v[w], sc);
            ey.v[w] = cache_encode<KV, C>(y.v[w], sc);
          }
          store_pack<C, W, VEC>(entry + a.rank + i0, ex);
          store_pack<C, W, VEC>(entry + a.rank + half + i0, ey);
        }
      } else {
        const int e0 = j * W;
        Pack<T, W> v = load_pack<T, W, VEC>(head + e0);
#pragma unroll
        for (int p = 0; p < W / 2; ++p) {
          float rx, ry;
          rotate_pair(to_float(v.v[2 * p]), to_float(v.v[2 * p + 1]),
                      to_float(cs[e0 / 2 + p]), to_float(cs[half + e0 / 2 + p]), rx, ry);
          v.v[2 * p] = from_float<T>(rx);
          v.v[2 * p + 1] = from_float<T>(ry);
        }
        store_pack<T, W, VEC>(head + e0, v);
        if (!is_q) {
          Pack<C, W> ev;
#pragma unroll
          for (int w = 0; w < W; ++w) ev.v[w] = cache_encode<KV, C>(v.v[w], sc);
          store_pack<C, W, VEC>(entry + a.rank + e0, ev);
        }
      }
    } else {
      const int e = (it - q_items - per_rot) * KW;
      const Pack<T, KW> x =
          load_pack<T, KW, VEC>(static_cast<const T*>(a.kv_c) + t * a.kv_stride + e);
      Pack<C, KW> out;
#pragma unroll
      for (int w = 0; w < KW; ++w) out.v[w] = cache_encode<KV, C>(x.v[w], sc);
      store_pack<C, KW, VEC>(entry + e, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cp_gather_and_upconvert_fp8_kv_cache: one warp per dst row
// ---------------------------------------------------------------------------------------------
struct Upconvert {
  const uint8_t* src;
  int64_t block_stride, page_stride;  // bytes
  int64_t num_blocks;
  int block_size;
  __nv_bfloat16* dst;
  int64_t dst_stride;  // elements
  int64_t rows;
  const int32_t* block_table;
  int64_t bt_stride, bt_cols;
  const int32_t* workspace_starts;
  const int32_t* seq_starts;  // or null
  int64_t batch;
};

// Lane l decodes codes [16 l, 16 l + 16) of the 512 (tile l / 8); lanes 0-7 copy 16 bytes of
// rope each. VEC: 16-byte loads and stores (the launcher checked alignment).
template <bool VEC>
__global__ void cp_gather_and_upconvert_kernel(Upconvert a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= a.rows) return;
  const int64_t req = last_start_at_or_below(a.workspace_starts, a.batch, r);
  if (req < 0) return;  // before the first request: left untouched
  int64_t p = r - a.workspace_starts[req];
  if (a.seq_starts != nullptr) p += a.seq_starts[req];
  if (p < 0) return;
  const int64_t col = p / a.block_size;
  if (col >= a.bt_cols) return;
  const int64_t blk = a.block_table[req * a.bt_stride + col];
  if (blk < 0 || blk >= a.num_blocks) return;
  const uint8_t* e = a.src + blk * a.block_stride + (p - col * a.block_size) * a.page_stride;
  __nv_bfloat16* d = a.dst + r * a.dst_stride;
  const float sc = load_f32_bytes(e + 512 + 4 * (lane / 8));
  const Pack<uint8_t, 16> codes = load_pack<uint8_t, 16, VEC>(e + lane * 16);
  Pack<__nv_bfloat16, 8> lo, hi;
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    lo.v[w] = __float2bfloat16_rn(fp8_decode<kKvE4M3>(codes.v[w], sc));
    hi.v[w] = __float2bfloat16_rn(fp8_decode<kKvE4M3>(codes.v[8 + w], sc));
  }
  store_pack<__nv_bfloat16, 8, VEC>(d + lane * 16, lo);
  store_pack<__nv_bfloat16, 8, VEC>(d + lane * 16 + 8, hi);
  if (lane < 8) {
    const Pack<uint8_t, 16> rope = load_pack<uint8_t, 16, VEC>(e + 528 + lane * 16);
    store_pack<uint8_t, 16, VEC>(reinterpret_cast<uint8_t*>(d + 512) + lane * 16, rope);
  }
}

// ---------------------------------------------------------------------------------------------
// indexer_k_quant_and_cache: one warp per (token, quant group of 32 * VPL values)
// ---------------------------------------------------------------------------------------------
struct IndexerWrite {
  const void* k;
  int64_t k_stride;
  int head_dim, groups;
  uint8_t* cache;
  int64_t block_stride;  // bytes
  int block_size;
  const int64_t* slots;
  int64_t num_tokens, num_slots;
  int ue8m0;
};

// 2 ** ceil(log2(s)) for a positive normal float, exact (vLLM: exp2f(ceilf(log2f(s)))).
__device__ __forceinline__ float pow2_ceil(float s) {
  const uint32_t u = __float_as_uint(s);
  if ((u & 0x7fffffu) == 0) return s;
  return __uint_as_float(((u >> 23) + 1) << 23);
}

template <typename T, int VPL, bool VEC>
__global__ void indexer_k_quant_kernel(IndexerWrite a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (item >= a.num_tokens * a.groups) return;
  const int64_t t = item / a.groups;
  const int g = static_cast<int>(item - t * a.groups);
  const int64_t slot = a.slots[t];
  if (slot < 0 || slot >= a.num_slots) return;
  const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
  const int e0 = g * 32 * VPL + lane * VPL;
  const Pack<T, VPL> x =
      load_pack<T, VPL, VEC>(static_cast<const T*>(a.k) + t * a.k_stride + e0);
  float v[VPL], amax = 0.0f;
#pragma unroll
  for (int w = 0; w < VPL; ++w) {
    v[w] = to_float(x.v[w]);
    amax = fmaxf(amax, fabsf(v[w]));
  }
  amax = warp_max(amax);
  float sc = fmaxf(amax, 1e-4f) / kFp8E4M3Max;
  if (a.ue8m0) sc = pow2_ceil(sc);
  Pack<uint8_t, VPL> q;
#pragma unroll
  for (int w = 0; w < VPL; ++w) q.v[w] = fp8_encode<kKvE4M3>(v[w], sc);
  uint8_t* block = a.cache + blk * a.block_stride;
  store_pack<uint8_t, VPL, VEC>(block + off * a.head_dim + e0, q);
  if (lane == 0)
    store_f32_bytes(block + static_cast<int64_t>(a.block_size) * a.head_dim +
                        (off * a.groups + g) * 4, sc);
}

// ---------------------------------------------------------------------------------------------
// cp_gather_indexer_k_quant_cache: one warp per dst row
// ---------------------------------------------------------------------------------------------
struct IndexerGather {
  const uint8_t* cache;
  int64_t block_stride;  // bytes
  int64_t num_blocks;
  int block_size, head_dim, scale_bytes;  // scale_bytes = groups * 4
  uint8_t* dst_k;
  int64_t dk_stride;  // bytes
  uint8_t* dst_scale;
  int64_t ds_stride;  // bytes
  int64_t rows;
  const int32_t* block_table;
  int64_t bt_stride, bt_cols;
  const int32_t* cu;  // [batch + 1]
  int64_t batch;
};

template <bool VEC>
__global__ void cp_gather_indexer_kernel(IndexerGather a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= a.rows) return;
  const int64_t b = last_start_at_or_below(a.cu, a.batch + 1, t);
  if (b < 0 || b >= a.batch) return;  // before the first or past the last sequence
  const int64_t p = t - a.cu[b];
  const int64_t col = p / a.block_size;
  if (col >= a.bt_cols) return;
  const int64_t blk = a.block_table[b * a.bt_stride + col];
  if (blk < 0 || blk >= a.num_blocks) return;
  const int64_t off = p - col * a.block_size;
  const uint8_t* block = a.cache + blk * a.block_stride;
  const uint8_t* src = block + off * a.head_dim;
  uint8_t* dk = a.dst_k + t * a.dk_stride;
  if constexpr (VEC) {
    for (int i = lane; i < a.head_dim / 16; i += 32)
      store_pack<uint8_t, 16, true>(dk + i * 16, load_pack<uint8_t, 16, true>(src + i * 16));
  } else {
    for (int i = lane; i < a.head_dim; i += 32) dk[i] = src[i];
  }
  const uint8_t* ss = block + static_cast<int64_t>(a.block_size) * a.head_dim +
                      off * a.scale_bytes;
  uint8_t* ds = a.dst_scale + t * a.ds_stride;
  for (int i = lane; i < a.scale_bytes; i += 32) ds[i] = ss[i];
}

}  // namespace compile_ops
