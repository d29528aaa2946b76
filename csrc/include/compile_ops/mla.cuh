// MLA and sparse-indexer cache kernels (compile_ops/mla.py has the layouts and semantics).
// Device code only; launchers in csrc/mla_kernels.cu.
//
// Every index read from device memory (slot, position, block-table entry, request offset) is
// range-checked before it forms an address: an out-of-range one skips its token or row.
// Float32 scales inside byte caches are stored and loaded a byte at a time (one per group of
// 128 values: no alignment requirement on the cache for them).
#pragma once

#include "compile_ops/fp8.cuh"
#include "compile_ops/quant.cuh"  // kFp8E4M3Max
#include "compile_ops/rotary.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

constexpr int kMlaThreads = 256;  // 8 warps

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
  const float* scale;
};

// One warp per token: lane l moves vectors l, l + 32, ... of the entry, issuing U loads before
// its stores (an entry of 72 16-byte vectors: 3 loads in flight per lane). Measured on an H100:
// the first version (items of a CTA's tokens spread over 256 threads, one load per thread at
// DeepSeek shapes) reached 40% of copy bandwidth at 4096 tokens where a copy of the same bytes
// reaches 61%.
template <typename T, typename C, int KV, int W, int U>
__global__ void concat_and_cache_mla_kernel(MlaWrite a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= a.num_tokens) return;
  const int64_t slot = a.slots[t];
  if (slot < 0 || slot >= a.num_slots) return;
  const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
  C* entry = static_cast<C*>(a.cache) + blk * a.block_stride + off * a.page_stride;
  const T* kv = static_cast<const T*>(a.kv_c) + t * a.kv_stride;
  const T* pe = static_cast<const T*>(a.k_pe) + t * a.pe_stride;
  const int per_token = a.rank_vecs + a.pe_vecs;
  const float sc = KV != kKvAuto ? *a.scale : 1.0f;
  for (int base = lane; base < per_token; base += 32 * U) {
    Pack<T, W> in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + 32 * u;
      if (j < a.rank_vecs)
        in[u] = *reinterpret_cast<const Pack<T, W>*>(kv + j * W);
      else if (j < per_token)
        in[u] = *reinterpret_cast<const Pack<T, W>*>(pe + (j - a.rank_vecs) * W);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + 32 * u;
      if (j >= per_token) continue;
      Pack<C, W> out;
#pragma unroll
      for (int w = 0; w < W; ++w) out.v[w] = cache_encode<KV, C>(in[u].v[w], sc);
      *reinterpret_cast<Pack<C, W>*>(entry + j * W) = out;  // kv_c then k_pe: contiguous
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

// One warp per token: lane l quantizes kv_c[16 l, 16 l + 16) (two 16-byte loads), tile l / 8;
// the tile's amax is reduced over its 8 lanes; lanes 0-7 also copy 16 bytes of rope each.
// VEC: 16-byte accesses (the launcher checked alignment), else element by element.
// Measured on an H100: the first version (a warp per tile, 8-byte loads, one per lane) reached
// 34% of copy bandwidth at 4096 tokens (a copy of the same bytes: 56%).
template <typename T, bool VEC>
__global__ void concat_and_cache_ds_mla_kernel(DsMlaWrite a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= a.num_tokens) return;
  const int64_t slot = a.slots[t];
  if (slot < 0 || slot >= a.num_slots) return;  // the whole warp leaves together
  const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
  uint8_t* entry = a.cache + blk * a.block_stride + off * a.page_stride;
  const T* src = static_cast<const T*>(a.kv_c) + t * a.kv_stride + lane * 16;
  const Pack<T, 8> x0 = load_pack<T, 8, VEC>(src);
  const Pack<T, 8> x1 = load_pack<T, 8, VEC>(src + 8);
  Pack<T, 8> rope;
  if (lane < 8)
    rope = load_pack<T, 8, VEC>(static_cast<const T*>(a.k_pe) + t * a.pe_stride + lane * 8);
  float v[16], amax = 0.0f;
#pragma unroll
  for (int w = 0; w < 8; ++w) {
    v[w] = to_float(x0.v[w]);
    v[8 + w] = to_float(x1.v[w]);
  }
#pragma unroll
  for (int w = 0; w < 16; ++w) amax = fmaxf(amax, fabsf(v[w]));
#pragma unroll
  for (int m = 4; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  const float sc = fmaxf(amax / kFp8E4M3Max, 1.17549435e-38f);  // FLT_MIN
  Pack<uint8_t, 16> q;
#pragma unroll
  for (int w = 0; w < 16; ++w) q.v[w] = fp8_encode<kKvE4M3>(v[w], sc);
  store_pack<uint8_t, 16, VEC>(entry + lane * 16, q);
  if ((lane & 7) == 0) store_f32_bytes(entry + 512 + 4 * (lane / 8), sc);
  if (lane < 8) store_pack<T, 8, VEC>(reinterpret_cast<T*>(entry + 528) + lane * 8, rope);
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
// indexer_k_quant_and_cache: LPG = Q / 8 lanes per (token, quant group), 8 values per lane
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

// A warp holds 32 / LPG consecutive (token, group) items; every lane takes part in the
// shuffles (items past the end or without a slot just skip their stores). VEC: one access of
// 8 values and one 8-byte store of codes per lane. Measured on an H100: the first version (a
// warp per group of 128, 4 values per lane) took 3.1 us at 4096 tokens (a copy of the same
// bytes: 2.3 us).
template <typename T, int LPG, bool VEC>
__global__ void indexer_k_quant_kernel(IndexerWrite a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t item = warp * (32 / LPG) + lane / LPG;
  const int64_t t = item / a.groups;
  const int g = static_cast<int>(item - t * a.groups);
  bool valid = t < a.num_tokens;
  int64_t slot = -1;
  if (valid) {
    slot = a.slots[t];
    valid = slot >= 0 && slot < a.num_slots;
  }
  const int e0 = g * LPG * 8 + (lane % LPG) * 8;
  float v[8], amax = 0.0f;
  if (valid) {
    const Pack<T, 8> x = load_pack<T, 8, VEC>(static_cast<const T*>(a.k) + t * a.k_stride + e0);
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      v[w] = to_float(x.v[w]);
      amax = fmaxf(amax, fabsf(v[w]));
    }
  }
#pragma unroll
  for (int m = LPG / 2; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  if (!valid) return;
  float sc = fmaxf(amax, 1e-4f) / kFp8E4M3Max;
  if (a.ue8m0) sc = pow2_ceil(sc);
  Pack<uint8_t, 8> q;
#pragma unroll
  for (int w = 0; w < 8; ++w) q.v[w] = fp8_encode<kKvE4M3>(v[w], sc);
  const int64_t blk = slot / a.block_size, off = slot - blk * a.block_size;
  uint8_t* block = a.cache + blk * a.block_stride;
  store_pack<uint8_t, 8, VEC>(block + off * a.head_dim + e0, q);
  if (lane % LPG == 0)
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

// LPR lanes per row (a power of two), 32 / LPR rows per warp; a lane moves 16-byte pieces of
// the codes (or single bytes without VEC) and single bytes of the scales.
template <bool VEC>
__global__ void cp_gather_indexer_kernel(IndexerGather a, int lpr) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int sub = lane % lpr;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t t = warp * (32 / lpr) + lane / lpr;
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
    for (int i = sub; i < a.head_dim / 16; i += lpr)
      store_pack<uint8_t, 16, true>(dk + i * 16, load_pack<uint8_t, 16, true>(src + i * 16));
  } else {
    for (int i = sub; i < a.head_dim; i += lpr) dk[i] = src[i];
  }
  const uint8_t* ss = block + static_cast<int64_t>(a.block_size) * a.head_dim +
                      off * a.scale_bytes;
  uint8_t* ds = a.dst_scale + t * a.ds_stride;
  for (int i = sub; i < a.scale_bytes; i += lpr) ds[i] = ss[i];
}

}  // namespace compile_ops
