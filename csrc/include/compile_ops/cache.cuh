// Paged KV-cache kernels: writes (paged x-packed and flash NHD/HND layouts), gathers, FP8
// conversion and block copies. Device code only; launchers in csrc/cache_kernels.cu.
//
// Every index read from device memory (slot, sequence id, block-table entry) is range-checked
// before it forms an address: an out-of-range one skips its token and nothing is touched.
#pragma once

#include "compile_ops/fp8.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

// ---------------------------------------------------------------------------------------------
// reshape_and_cache_flash: cache[block, page, head, :] (any strides, last dim contiguous)
// ---------------------------------------------------------------------------------------------
struct FlashSide {
  const void* src;       // [tokens, heads, size]; heads packed, token stride src_stride
  int64_t src_stride;    // elements of T
  void* cache;           // elements of C
  int64_t block_stride;  // elements of C
  int64_t page_stride;
  int64_t head_stride;
  int size;              // head size
  int vecs_per_head;     // size / W
  const float* scale;    // one value, or one per head
  int scale_per_head;
};

// Field-wise select, so the two kernel-parameter structs stay in the constant bank (a reference
// to either would be a dynamic address into parameter space, which spills them to local memory).
__device__ __forceinline__ FlashSide select_side(bool first, const FlashSide& a,
                                                 const FlashSide& b) {
  FlashSide r;
  r.src = first ? a.src : b.src;
  r.src_stride = first ? a.src_stride : b.src_stride;
  r.cache = first ? a.cache : b.cache;
  r.block_stride = first ? a.block_stride : b.block_stride;
  r.page_stride = first ? a.page_stride : b.page_stride;
  r.head_stride = first ? a.head_stride : b.head_stride;
  r.size = first ? a.size : b.size;
  r.vecs_per_head = first ? a.vecs_per_head : b.vecs_per_head;
  r.scale = first ? a.scale : b.scale;
  r.scale_per_head = first ? a.scale_per_head : b.scale_per_head;
  return r;
}

// Items are (token, side, head, vector) of one CTA's tokens; a thread loads U items before it
// stores any, so U 16-byte requests per thread are in flight.
template <typename T, typename C, int KV, int W, int U>
__global__ void reshape_and_cache_flash_kernel(const int64_t* __restrict__ slot_mapping,
                                               int64_t num_tokens, int tokens_per_cta,
                                               int64_t num_slots, int block_size, FlashSide k,
                                               FlashSide v, int heads) {
  pdl_wait();
  const int vk = heads * k.vecs_per_head;
  const int per_token = vk + heads * v.vecs_per_head;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tokens_per_cta;
  const int64_t ntok = num_tokens - t0 < tokens_per_cta ? num_tokens - t0 : tokens_per_cta;
  const int items = static_cast<int>(ntok) * per_token;
  for (int base = threadIdx.x; base < items; base += blockDim.x * U) {
    Pack<T, W> in[U];
    C* dst[U];
    float sc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      dst[u] = nullptr;
      sc[u] = 1.0f;
      const int i = base + u * blockDim.x;
      if (i >= items) continue;
      const int64_t t = t0 + i / per_token;
      int j = i % per_token;
      const int64_t slot = slot_mapping[t];
      if (slot < 0 || slot >= num_slots) continue;
      const FlashSide s = select_side(j < vk, k, v);
      if (j >= vk) j -= vk;
      const int h = j / s.vecs_per_head;
      const int c = (j - h * s.vecs_per_head) * W;
      const int64_t blk = slot / block_size, off = slot - blk * block_size;
      in[u] = *reinterpret_cast<const Pack<T, W>*>(static_cast<const T*>(s.src) +
                                                   t * s.src_stride + h * s.size + c);
      dst[u] = static_cast<C*>(s.cache) + blk * s.block_stride + off * s.page_stride +
               h * s.head_stride + c;
      if constexpr (KV != kKvAuto) sc[u] = s.scale[s.scale_per_head ? h : 0];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] == nullptr) continue;
      Pack<C, W> out;
#pragma unroll
      for (int w = 0; w < W; ++w) out.v[w] = cache_encode<KV, C>(in[u].v[w], sc[u]);
      *reinterpret_cast<Pack<C, W>*>(dst[u]) = out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// reshape_and_cache: key_cache[block, head, d / X, page, X], value_cache[block, head, d, page]
// ---------------------------------------------------------------------------------------------
struct PagedSide {
  const void* src;     // [tokens, heads, head_size]; heads packed
  int64_t src_stride;  // elements of T between tokens
  void* cache;
  int64_t s_block, s_head, s_dim, s_page;  // key: s_dim is the stride of the d / X dim
  const float* scale;
  int scale_per_head;
  int vec_rows;  // value side: 16-byte row stores allowed (s_page 1; 16-byte aligned rows)
};

constexpr int kMaxCacheWarps = 8;  // reshape_and_cache's CTAs: 128 or 256 threads

// One warp: lane l holds token l's X values of one value chunk (`slot` -1: not written); `dst`
// is that chunk's first row in block 0; `stage` and `slots` are the warp's shared memory.
// Collective: every lane of the warp calls it (the shuffle, ballot and barriers are not in
// divergent code).
template <typename T, typename C, int KV, int X>
__device__ __forceinline__ void store_value_rows(const T* vals, int64_t slot, float scale,
                                                 int block_size, C* stage, int64_t* slots,
                                                 C* dst, int64_t s_block, int64_t s_dim) {
  constexpr int G = 32 / X;  // 16-byte groups of X tokens in a row of 32
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int w = 0; w < X; ++w)
    stage[w * 32 + lane] = slot >= 0 ? cache_encode<KV, C>(vals[w], scale) : C();
  slots[lane] = slot;
  // a group stores as one vector when its X slots run on from an X-aligned page offset
  const int64_t prev = __shfl_up_sync(0xffffffffu, slot, 1);
  const int64_t off = slot >= 0 ? slot % block_size : 0;
  const bool ok = slot >= 0 && (lane % X == 0 ? off % X == 0 && off + X <= block_size
                                              : slot == prev + 1);
  const unsigned good = __ballot_sync(0xffffffffu, ok);
  __syncwarp();
  const int w = lane / G, g = lane % G;  // this lane's row (dim) and group of tokens
  constexpr unsigned kGroup = X == 32 ? 0xffffffffu : (1u << X) - 1;
  const int64_t first = slots[g * X];
  if (((good >> (g * X)) & kGroup) == kGroup) {
    const int64_t blk = first / block_size;
    *reinterpret_cast<Pack<C, X>*>(dst + blk * s_block + w * s_dim + (first - blk * block_size)) =
        *reinterpret_cast<const Pack<C, X>*>(stage + w * 32 + g * X);
  } else {
#pragma unroll
    for (int j = 0; j < X; ++j) {
      const int64_t s = slots[g * X + j];
      if (s < 0) continue;
      const int64_t blk = s / block_size;
      dst[blk * s_block + w * s_dim + (s - blk * block_size)] = stage[w * 32 + g * X + j];
    }
  }
  __syncwarp();
}

// A CTA takes `tile` consecutive entries of slot_mapping (a power of two <= 32; lane l of a warp
// is token l % tile) and one head (blockIdx.y). Its items are (chunk, token): chunks of X head
// dims (one 16-byte key chunk of the cache), keys first, then values; a thread loads U items
// before it stores any. Consecutive lanes are consecutive tokens, so when their slots are
// consecutive in a page (a prefill's write) a warp's key stores are one contiguous run of 16-byte
// chunks and each value store instruction fills whole runs of a value row ([head, d, page]: the
// page's tokens are adjacent there), instead of one 2-byte store per 32-byte sector per token.
// VEC: 16-byte loads of the input and one 16-byte store per key chunk (the launcher checked the
// alignment of every address); otherwise element accesses.
// ROWS (with VEC, 32-token tiles and `v.vec_rows`; an A/B option, off by default: it measured
// 5-10% slower on an H200, bench/NOTES.md session 8): a warp's 32 tokens x X dims of one chunk are
// transposed through 512 bytes of shared memory, and each lane stores X tokens of one dim's row
// with one 16-byte store where those tokens' slots run on from an X-aligned page offset (a
// prefill); other groups store their elements one by one. Element stores put 32 tokens' 2 bytes
// per instruction in the rows (8 instructions per chunk); the row stores, 512 bytes (one).
// The register path's body: `slot_of(t)` gives token t's slot (or -1 to skip it).
template <typename T, typename C, int KV, bool VEC, int U, bool ROWS = false, typename SlotOf>
__device__ __forceinline__ void write_tile_in_lanes(SlotOf slot_of, int64_t num_tokens,
                                                    int block_size, int head_size, int tile_shift,
                                                    const PagedSide& k, const PagedSide& v) {
  constexpr int X = 16 / static_cast<int>(sizeof(C));  // elements per key-cache chunk
  constexpr int VW = VEC ? kVecWidth<T> : 1;            // input elements per load
  static_assert(X % kVecWidth<T> == 0 || !VEC, "a chunk is whole 16-byte input vectors");
  const int tile = 1 << tile_shift;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) << tile_shift;
  const int h = blockIdx.y;
  const int chunks = head_size / X;
  const int items = (2 * chunks) << tile_shift;
  const float ksc = KV != kKvAuto ? k.scale[k.scale_per_head ? h : 0] : 1.0f;
  const float vsc = KV != kKvAuto ? v.scale[v.scale_per_head ? h : 0] : 1.0f;
  // CTA-uniform; with 32-token tiles every warp holds one chunk of 32 tokens (items % 32 == 0)
  const bool rows = ROWS && VEC && v.vec_rows && tile_shift == 5 && blockDim.x % 32 == 0 &&
                    blockDim.x <= 32 * kMaxCacheWarps;
  for (int base = threadIdx.x; base < items; base += blockDim.x * U) {
    Pack<T, X> in[U];
    int64_t slot[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      slot[u] = -1;
      const int i = base + u * blockDim.x;
      const int64_t t = t0 + (i & (tile - 1));
      if (i >= items || t >= num_tokens) continue;
      const int64_t s = slot_of(i & (tile - 1));
      if (s < 0) continue;
      slot[u] = s;
      const int c = i >> tile_shift;
      const bool key = c < chunks;
      const T* src = static_cast<const T*>(key ? k.src : v.src) +
                     t * (key ? k.src_stride : v.src_stride) + h * head_size +
                     (key ? c : c - chunks) * X;
#pragma unroll
      for (int p = 0; p < X / VW; ++p)
        *reinterpret_cast<Pack<T, VW>*>(&in[u].v[p * VW]) =
            *reinterpret_cast<const Pack<T, VW>*>(src + p * VW);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = (base + u * blockDim.x) >> tile_shift;
      if constexpr (ROWS && VEC) {
        alignas(16) __shared__ C row_stage[kMaxCacheWarps][X * 32];
        __shared__ int64_t row_slots[kMaxCacheWarps][32];
        if (rows && base + u * blockDim.x < items && c >= chunks) {  // warp-uniform
          store_value_rows<T, C, KV, X>(in[u].v, slot[u], vsc, block_size,
                                        row_stage[threadIdx.x >> 5], row_slots[threadIdx.x >> 5],
                                        static_cast<C*>(v.cache) + h * v.s_head +
                                            int64_t(c - chunks) * X * v.s_dim,
                                        v.s_block, v.s_dim);
          continue;
        }
      }
      if (slot[u] < 0) continue;
      const int64_t blk = slot[u] / block_size, off = slot[u] - blk * block_size;
      if (c < chunks) {
        Pack<C, X> out;
#pragma unroll
        for (int w = 0; w < X; ++w) out.v[w] = cache_encode<KV, C>(in[u].v[w], ksc);
        C* dst = static_cast<C*>(k.cache) + blk * k.s_block + h * k.s_head + c * k.s_dim +
                 off * k.s_page;
        if constexpr (VEC) {
          *reinterpret_cast<Pack<C, X>*>(dst) = out;
        } else {
#pragma unroll
          for (int w = 0; w < X; ++w) dst[w] = out.v[w];
        }
      } else {
        C* dst = static_cast<C*>(v.cache) + blk * v.s_block + h * v.s_head +
                 int64_t(c - chunks) * X * v.s_dim + off * v.s_page;
#pragma unroll
        for (int w = 0; w < X; ++w) dst[w * v.s_dim] = cache_encode<KV, C>(in[u].v[w], vsc);
      }
    }
  }
}

template <typename T, typename C, int KV, bool VEC, int U, bool ROWS>
__global__ void reshape_and_cache_kernel(const int64_t* __restrict__ slot_mapping,
                                         int64_t num_tokens, int64_t num_slots, int block_size,
                                         int head_size, int tile_shift, PagedSide k,
                                         PagedSide v) {
  pdl_wait();
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) << tile_shift;
  auto slot_of = [&](int tt) -> int64_t {
    const int64_t s = slot_mapping[t0 + tt];
    return s >= 0 && s < num_slots ? s : -1;
  };
  write_tile_in_lanes<T, C, KV, VEC, U, ROWS>(slot_of, num_tokens, block_size, head_size, tile_shift,
                                        k, v);
}

// Scattered slots (head_size <= kStagedMaxHead, 16-byte aligned inputs and key chunks: the
// launcher's VEC case). A tile whose slots mostly continue each other (a prefill's pages) takes
// the register path above (write_tile_in_lanes: lanes along the tokens fill whole value sectors).
// Otherwise every value store is a partial sector whatever the order, and the order decides how
// well the memory system merges its read-modify-writes: the tile's values are encoded into
// shared memory ([token][d], a 2-element pad per row) and, after a barrier, stored per token
// with lanes along d (a token's rows are contiguous, 32 lanes cover 1 KB). The register path's
// lanes along the tokens put a warp's 32 stores in 32 pages: 2.1x slower at 4096 random slots
// on an H200 (bench/NOTES.md, session 7).
constexpr int kStagedMaxHead = 256;

template <typename T, typename C, int KV, int U>
__global__ void __launch_bounds__(128)
    reshape_and_cache_staged_kernel(const int64_t* __restrict__ slot_mapping, int64_t num_tokens,
                                    int64_t num_slots, int block_size, int head_size,
                                    int tile_shift, PagedSide k, PagedSide v) {
  constexpr int X = 16 / static_cast<int>(sizeof(C));  // key chunk (elements)
  constexpr int VW = kVecWidth<T>;
  static_assert(X % VW == 0, "a chunk is whole 16-byte input vectors");
  __shared__ C vals[32 * (kStagedMaxHead + 2)];
  __shared__ int64_t slots[32];
  pdl_wait();
  const int tile = 1 << tile_shift;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) << tile_shift;
  if (threadIdx.x < tile) {
    const int64_t t = t0 + threadIdx.x;
    const int64_t s = t < num_tokens ? slot_mapping[t] : -1;
    slots[threadIdx.x] = s >= 0 && s < num_slots ? s : -1;
  }
  __syncthreads();
  int follow = 0;  // CTA-uniform: every thread counts the same shared slots
  for (int j = 1; j < tile; ++j) follow += slots[j] >= 0 && slots[j] == slots[j - 1] + 1;
  if (2 * follow >= tile) {
    write_tile_in_lanes<T, C, KV, true, 4>([&](int tt) -> int64_t { return slots[tt]; },
                                           num_tokens, block_size, head_size, tile_shift, k, v);
    return;
  }
  const int h = blockIdx.y;
  const int pitch = head_size + 2;
  const int chunks = head_size / X;
  const int items = (2 * chunks) << tile_shift;
  const float ksc = KV != kKvAuto ? k.scale[k.scale_per_head ? h : 0] : 1.0f;
  const float vsc = KV != kKvAuto ? v.scale[v.scale_per_head ? h : 0] : 1.0f;
  for (int base = threadIdx.x; base < items; base += blockDim.x * U) {
    Pack<T, X> in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * blockDim.x;
      const int tt = i & (tile - 1);
      if (i >= items || slots[tt] < 0) continue;
      const int c = i >> tile_shift;
      const bool key = c < chunks;
      const T* src = static_cast<const T*>(key ? k.src : v.src) +
                     (t0 + tt) * (key ? k.src_stride : v.src_stride) + h * head_size +
                     (key ? c : c - chunks) * X;
#pragma unroll
      for (int p = 0; p < X / VW; ++p)
        *reinterpret_cast<Pack<T, VW>*>(&in[u].v[p * VW]) =
            *reinterpret_cast<const Pack<T, VW>*>(src + p * VW);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * blockDim.x;
      const int tt = i & (tile - 1);
      if (i >= items || slots[tt] < 0) continue;
      const int c = i >> tile_shift;
      if (c < chunks) {
        const int64_t slot = slots[tt], blk = slot / block_size, off = slot - blk * block_size;
        Pack<C, X> out;
#pragma unroll
        for (int w = 0; w < X; ++w) out.v[w] = cache_encode<KV, C>(in[u].v[w], ksc);
        *reinterpret_cast<Pack<C, X>*>(static_cast<C*>(k.cache) + blk * k.s_block +
                                       h * k.s_head + c * k.s_dim + off * k.s_page) = out;
      } else {
        C* row = vals + tt * pitch + (c - chunks) * X;
#pragma unroll
        for (int w = 0; w < X; ++w) row[w] = cache_encode<KV, C>(in[u].v[w], vsc);
      }
    }
  }
  __syncthreads();
  C* vcache = static_cast<C*>(v.cache);
  for (int i = threadIdx.x; i < head_size * tile; i += blockDim.x) {
    const int tt = i / head_size, d = i - tt * head_size;
    const int64_t slot = slots[tt];
    if (slot < 0) continue;
    const int64_t blk = slot / block_size, off = slot - blk * block_size;
    vcache[blk * v.s_block + h * v.s_head + d * v.s_dim + off * v.s_page] = vals[tt * pitch + d];
  }
}

// ---------------------------------------------------------------------------------------------
// Gathers: dst[row] = decode(src[block_table[seq, pos / bs], pos % bs])
// ---------------------------------------------------------------------------------------------
struct GatherArgs {
  const void* src;  // [num_blocks, block_size, entry]
  int64_t block_stride, page_stride;
  int block_size;
  int64_t num_blocks;
  void* dst;  // [rows, entry]
  int64_t dst_stride;
  int64_t entry;  // elements per row
  const int32_t* block_table;
  int64_t bt_stride, bt_cols;
  const int32_t* cu_seq_lens;   // [batch + 1]
  const int32_t* token_to_seq;  // null: cp_gather_cache (sequence found by binary search)
  const int32_t* seq_starts;    // optional
  int64_t rows;
  int batch;
  const float* scale;
};

// Largest s in [0, batch) with cu[s] <= row (cu is non-decreasing).
__device__ __forceinline__ int seq_of_row(const int32_t* cu, int batch, int64_t row) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cu[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// One warp per row; each lane keeps U vectors in flight.
template <typename T, typename C, int KV, int W, int U>
__global__ void gather_cache_kernel(GatherArgs a) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int warps_per_cta = blockDim.x >> 5;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * warps_per_cta;
  int64_t limit = a.rows;
  if (a.token_to_seq == nullptr) {
    const int64_t end = a.cu_seq_lens[a.batch];
    limit = end < limit ? end : limit;
  }
  const float sc = KV != kKvAuto ? *a.scale : 1.0f;
  const int64_t vecs = a.entry / W;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_cta + (threadIdx.x >> 5);
       row < limit; row += total_warps) {
    const int seq = a.token_to_seq ? a.token_to_seq[row] : seq_of_row(a.cu_seq_lens, a.batch, row);
    if (seq < 0 || seq >= a.batch) continue;
    const int64_t start = a.cu_seq_lens[seq], end = a.cu_seq_lens[seq + 1];
    if (row < start || row >= end) continue;
    const int64_t pos = row - start + (a.seq_starts ? a.seq_starts[seq] : 0);
    if (pos < 0) continue;
    const int64_t col = pos / a.block_size;
    if (col >= a.bt_cols) continue;
    const int64_t blk = a.block_table[seq * a.bt_stride + col];
    if (blk < 0 || blk >= a.num_blocks) continue;
    const C* s = static_cast<const C*>(a.src) + blk * a.block_stride +
                 (pos - col * a.block_size) * a.page_stride;
    T* d = static_cast<T*>(a.dst) + row * a.dst_stride;
    for (int64_t i = lane; i < vecs; i += 32 * U) {
      Pack<C, W> in[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (i + u * 32 < vecs) in[u] = reinterpret_cast<const Pack<C, W>*>(s)[i + u * 32];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (i + u * 32 >= vecs) continue;
        Pack<T, W> out;
#pragma unroll
        for (int w = 0; w < W; ++w) out.v[w] = cache_decode<KV, T>(in[u].v[w], sc);
        reinterpret_cast<Pack<T, W>*>(d)[i + u * 32] = out;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// convert_fp8: MODE 0 plain cast, 1 quantize (In float -> Out uint8), -1 dequantize
// ---------------------------------------------------------------------------------------------
template <int MODE, int KV, typename Out, typename In>
__device__ __forceinline__ Out convert_one(In x, float scale) {
  if constexpr (MODE == 0) {
    return from_float<Out>(to_float(x));
  } else if constexpr (MODE > 0) {
    return fp8_encode<KV>(to_float(x), scale);
  } else {
    return from_float<Out>(fp8_decode<KV>(x, scale));
  }
}

template <typename In, typename Out, int MODE, int KV, int W>
__global__ void convert_fp8_kernel(const In* __restrict__ in, Out* __restrict__ out, int64_t n,
                                   float scale) {
  pdl_wait();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / W;
  for (int64_t i = tid; i < packs; i += stride) {
    const auto a = reinterpret_cast<const Pack<In, W>*>(in)[i];
    Pack<Out, W> b;
#pragma unroll
    for (int w = 0; w < W; ++w) b.v[w] = convert_one<MODE, KV, Out>(a.v[w], scale);
    reinterpret_cast<Pack<Out, W>*>(out)[i] = b;
  }
  for (int64_t i = packs * W + tid; i < n; i += stride)
    out[i] = convert_one<MODE, KV, Out>(in[i], scale);
}

// ---------------------------------------------------------------------------------------------
// swap_blocks: grid.x = pairs, grid.y = chunks of a block; V is the access type (int4 or byte)
// ---------------------------------------------------------------------------------------------
template <typename V>
__global__ void swap_blocks_kernel(const char* src, char* dst,
                                   const int64_t* __restrict__ mapping, int64_t src_step,
                                   int64_t dst_step, int64_t bytes) {
  pdl_wait();
  const int64_t p = blockIdx.x;
  const V* s = reinterpret_cast<const V*>(src + mapping[2 * p] * src_step);
  V* d = reinterpret_cast<V*>(dst + mapping[2 * p + 1] * dst_step);
  const int64_t n = bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x)
    d[i] = s[i];
}

}  // namespace compile_ops
