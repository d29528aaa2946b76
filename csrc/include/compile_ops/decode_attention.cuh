// Split-KV paged decode attention (paged_attention_v1 / v2 over vLLM's paged cache), CUDA C++.
//
// One CTA of 4 warps per (sequence, KV head, slice of 16 query heads, split of the sequence)
// (or, with Args::sub, per (sequence, KV head, slice), each warp writing partials of its own
// sub-splits).
// The split's tokens are cut into chunks of 16; warp w takes chunks w, w + 4, w + 8, ... and runs
// its own pipeline: cp.async copies of a chunk's keys and values (16-byte pieces, straight from
// the pages) into one of NSTAGE shared-memory slots, NSTAGE - 1 chunks ahead of the one it
// computes, so every warp keeps several KiB in flight without waiting on the others. A chunk is
// computed with tensor-core MMAs (mma.sync m16n8k16, the GQA slice as the 16 rows of M):
// S = Q K^T (2 n-tiles of 8 tokens), online softmax in base 2 (each warp its own running max and
// sum), O += P V with P as two 16-bit parts (hi + lo: as exact as float32 weights). At the end the
// 4 warps' (max, sum, O) are merged through shared memory and the CTA writes the output (one
// split) or its float32 partial (several splits; merged by decode_attention.py's merge kernel).
//
// Layouts in shared memory (per warp and slot):
// - 16-bit caches: keys [head / 8][16 tokens][8] (the x-packed page rows as they are: an 8 x 8
//   ldmatrix reads 8 tokens' 16 bytes, 128 contiguous bytes), values [head][16 tokens] with the
//   two 8-token halves of a row swapped on every other group of 4 rows (conflict-free ldmatrix).
// - FP8 caches: keys [head / 16][16 tokens (permuted rows)][16], values [head][16]; a lane reads
//   one 32-bit word (4 codes) per fragment and converts it to two f16x2 registers (e4m3: cvt;
//   e5m2: a byte permute, the code being the top byte of the f16). The MMAs then run in f16; a
//   bf16 query is scaled per row by a power of two into f16's range (exact) and the scale undone
//   in the logits. The k (head) and n (token) orders of these fragments are permuted so that a
//   word holds what one lane needs: the dot products do not depend on the order.
//
// Bounds: a page past the block table or with a block id outside [0, num_blocks) is not read
// (cp.async with a source size of 0 fills zeros) and its tokens are masked; so are tokens past
// the split's end (values zero-filled: stale cache contents may be NaN). The last split runs to
// the sequence's end even past max_seq_len.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "compile_ops/vec.cuh"

#if defined(COMPILE_OPS_EMULATE)
#include <cmath>
#include <cstring>
#include <vector>
#endif

namespace compile_ops {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 16;  // tokens per warp step
constexpr int kChunkShift = 4;
constexpr int kPartition = 512;  // vLLM's v2 partition
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Args {
  const void* q;
  const uint8_t* kc;
  const uint8_t* vc;
  const int* bt;
  const int* lens;
  const float* alibi;  // nullptr: none
  const float* ks;     // fp8 scales (nullptr for 16-bit caches)
  const float* vs;
  void* out;
  float* po;  // [seqs, heads, nsplit, head] float32 partials (nsplit > 1)
  float* pm;  // [seqs, heads, nsplit] max logit, base 2 (log2(e) x the natural-log logit)
  float* pl;  // [seqs, heads, nsplit] exp sum
  float* ml;  // v2 (one split or warp partials): max_logits / exp_sums / tmp_out
  float* es;
  void* tmp;
  float scale;
  int nsplit, split, bt_cols, num_blocks, bs_shift, group, slices, heads;
  // sub > 0: warp partials. One CTA per (sequence, KV head, slice) covers the sequence; warp w
  // takes the sub-splits j = w, w + 4, ... of `sub` tokens ([j sub, (j + 1) sub), the last of
  // the nsplit sub-splits running to the sequence's end) and writes each one's partial at
  // split index j (po / pm / pl with nsplit entries per head, a scratch); then the CTA merges
  // them itself (merge_warp_partials): the output and, for v2, each 512-token partition's
  // statistics (sub divides 512) without a merge kernel or one CTA per partition. sub is a
  // power of two >= 16 (sub_shift = log2(sub)).
  int sub, sub_shift;
  bool p_split;  // P V with P as hi + lo 16-bit parts (else one part)
  int64_t q_s, q_h, o_s, o_h;      // elements
  int64_t kc_b, kc_h, vc_b, vc_h;  // bytes
  int64_t bt_s;
  int64_t ml_s, ml_h, tmp_s, tmp_h, tmp_p;  // elements
  bool v2;
};

// Shared memory of one CTA: the warps' pipelines, reused for the final merge of the warps.
template <int D, int EB, int BUDGET = 98304>
struct Smem {
  static constexpr int kChunkBytes = kChunk * D * EB;  // keys (or values) of one chunk
  static constexpr int kSlot = 2 * kChunkBytes;
  static constexpr int kRaw = BUDGET / (kWarps * kSlot);
  static constexpr int kStages = kRaw < 2 ? 2 : (kRaw > 4 ? 4 : kRaw);
  static constexpr int kPipe = kWarps * kStages * kSlot;
  static constexpr int kMerge = kWarps * 16 * (D + 2) * 4;
  static constexpr int kBytes = kPipe > kMerge ? kPipe : kMerge;
};

// ---------------------------------------------------------------------------------------------
// Warp-level primitives. On the GPU: PTX. Under COMPILE_OPS_EMULATE (tests/emulated, cooperative
// schedule): the same results computed from the whole warp's registers, exchanged through the
// emulated warp's slots, so the kernel's fragment bookkeeping is checked on the CPU.
#if defined(COMPILE_OPS_EMULATE)
inline int lane_id() { return static_cast<int>(threadIdx.x % 32); }

inline void all_gather(uint32_t v, uint32_t (&all)[32]) {
  auto* w = ::compile_ops::emu::warp;
  if (!w) ::compile_ops::emu::needs_cooperative("decode attention");
  w->slot[lane_id()] = v;
  w->bar.arrive_and_wait();
  for (int i = 0; i < 32; ++i) all[i] = static_cast<uint32_t>(w->slot[i]);
  w->bar.arrive_and_wait();
}
inline void syncwarp() {
  uint32_t all[32];
  all_gather(0, all);
}
inline uint32_t shfl(uint32_t v, int src) {
  uint32_t all[32];
  all_gather(v, all);
  return all[src & 31];
}
inline float shfl_xor(float v, int m) {
  uint32_t u, all[32];
  std::memcpy(&u, &v, 4);
  all_gather(u, all);
  u = all[lane_id() ^ m];
  std::memcpy(&v, &u, 4);
  return v;
}
inline uint32_t ballot(bool p) {
  uint32_t all[32], r = 0;
  all_gather(p ? 1u : 0u, all);
  for (int i = 0; i < 32; ++i) r |= all[i] << i;
  return r;
}
inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p));  // unused in emulation
}
inline void cp_async16(void* dst, const void* src, int bytes) {
  std::memset(dst, 0, 16);
  if (bytes > 0) std::memcpy(dst, src, bytes);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
inline void cp_async_wait_all() {}
// ldmatrix .x4 (non-transposed): lane L gives the row address of matrix L / 8, row L % 8; each
// lane receives (row lane / 4, columns 2 (lane % 4), + 1) of every matrix.
inline void ldmatrix_x4(uint32_t (&r)[4], const uint8_t* row) {
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  uint32_t lo[32], hi[32];
  all_gather(static_cast<uint32_t>(mine), lo);
  all_gather(static_cast<uint32_t>(mine >> 32), hi);
  const int lane = lane_id();
  for (int m = 0; m < 4; ++m) {
    const int src = m * 8 + lane / 4;
    const auto* p = reinterpret_cast<const uint8_t*>((uint64_t(hi[src]) << 32) | lo[src]);
    std::memcpy(&r[m], p + 4 * (lane % 4), 4);
  }
}
inline float half_bits_to_float(uint16_t b, bool bf) {
  if (bf) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &b, 2);
  return __half2float(h);
}
// mma.sync m16n8k16 row.col, float32 accumulators, 16-bit inputs (bf: bfloat16, else float16).
inline void mma_emulated(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                         bool bf) {
  uint32_t A[4][32], B[2][32];
  for (int i = 0; i < 4; ++i) all_gather(a[i], A[i]);
  all_gather(b0, B[0]);
  all_gather(b1, B[1]);
  auto a_el = [&](int row, int k) {  // A[row][k]
    const int lane = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_bits_to_float(uint16_t(A[reg][lane] >> (16 * (k % 2))), bf);
  };
  auto b_el = [&](int k, int n) {  // B[k][n]
    const int lane = n * 4 + (k % 8) / 2;
    return half_bits_to_float(uint16_t(B[k >= 8 ? 1 : 0][lane] >> (16 * (k % 2))), bf);
  };
  const int lane = lane_id(), g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i % 2);
    double s = 0;
    for (int k = 0; k < 16; ++k) s += double(a_el(row, k)) * double(b_el(k, col));
    c[i] += static_cast<float>(s);
  }
}
inline float exp2_approx(float x) { return std::exp2(x); }
inline uint32_t movmatrix_t(uint32_t x) {
  uint32_t all[32];
  all_gather(x, all);
  const int lane = lane_id(), g = lane / 4, qd = lane % 4;
  auto el = [&](int r, int col) {  // element (r, col) of the source matrix
    return (all[r * 4 + col / 2] >> (16 * (col % 2))) & 0xffffu;
  };
  return el(2 * qd, g) | (el(2 * qd + 1, g) << 16);
}
#else
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31); }
__device__ __forceinline__ void syncwarp() { __syncwarp(); }
__device__ __forceinline__ uint32_t shfl(uint32_t v, int src) {
  return __shfl_sync(0xffffffffu, v, src);
}
__device__ __forceinline__ float shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}
__device__ __forceinline__ uint32_t ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronous; `bytes` < 16 reads only that many and zero-fills the
// rest (0: reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint8_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
// movmatrix .trans: lane (g, qd) holds (row g, columns 2qd, 2qd + 1) of an 8 x 8 16-bit matrix;
// returns (row g, columns 2qd, 2qd + 1) of its transpose.
__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ float exp2_approx(float x) {  // 2^x, 2 ulp; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif

// c += a b for one m16n8k16 tile; MT: __nv_bfloat16 or __half inputs.
template <typename MT>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
#if defined(COMPILE_OPS_EMULATE)
  mma_emulated(c, a, b0, b1, std::is_same<MT, __nv_bfloat16>::value);
#else
  if constexpr (std::is_same<MT, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Two floats -> one register of two 16-bit values (lo in the low half), round to nearest.
template <typename MT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same<MT, __nv_bfloat16>::value) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, 4);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, 4);
  }
  return r;
}
template <typename MT>
__device__ __forceinline__ void unpack2(uint32_t r, float& lo, float& hi) {
  if constexpr (std::is_same<MT, __nv_bfloat16>::value) {
    lo = __uint_as_float(r << 16);
    hi = __uint_as_float(r & 0xffff0000u);
  } else {
    __half2 v;
    memcpy(&v, &r, 4);
    const float2 f = __half22float2(v);
    lo = f.x;
    hi = f.y;
  }
}

__device__ __forceinline__ uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t sel) {
#if defined(COMPILE_OPS_EMULATE)
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#else
  return __byte_perm(x, y, sel);
#endif
}
__device__ __forceinline__ int imin(int x, int y) { return x < y ? x : y; }
__device__ __forceinline__ int imax(int x, int y) { return x > y ? x : y; }
__device__ __forceinline__ uint32_t lds32(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Four FP8 codes (one 32-bit word, code i in byte i) -> f16x2 of codes (0, 1) and of (2, 3).
// KV 1: e4m3, 2: e5m2. Exact.
template <int KV>
__device__ __forceinline__ void fp8x4_to_f16(uint32_t w, uint32_t& r01, uint32_t& r23) {
  if constexpr (KV == 2) {  // an e5m2 code is the high byte of the f16 with the same value
    r01 = byte_perm(w, 0u, 0x1404);
    r23 = byte_perm(w, 0u, 0x3424);
  } else {
#if defined(COMPILE_OPS_EMULATE)
    uint16_t h[4];
    for (int i = 0; i < 4; ++i) {
      __nv_fp8_e4m3 c;
      c.__x = static_cast<__nv_fp8_storage_t>((w >> (8 * i)) & 0xff);
      __half v = __half(static_cast<float>(c));
      std::memcpy(&h[i], &v, 2);
    }
    r01 = uint32_t(h[0]) | (uint32_t(h[1]) << 16);
    r23 = uint32_t(h[2]) | (uint32_t(h[3]) << 16);
#else
    asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n"
        " cvt.rn.f16x2.e4m3x2 %1, hi;\n}\n"
        : "=r"(r01), "=r"(r23)
        : "r"(w));
#endif
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    return __bfloat162float(v);
  else
    return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    return __float2bfloat16(v);
  else
    return __float2half(v);
}

// ---------------------------------------------------------------------------------------------
// What both kernels share: the CTA's place in the grid, each warp's chunk pipeline, and the final
// merge of the 4 warps' (max, sum, O) per query head.
struct Cta {
  int slice, kvh, split, length, start, end;
  int64_t seq;
  bool direct, skip;
};

template <bool WP>
__device__ __forceinline__ Cta cta_setup(const Args& a) {
  Cta c;
  c.slice = blockIdx.x % a.slices;
  c.kvh = blockIdx.x / a.slices;
  c.seq = blockIdx.y;
  c.split = blockIdx.z;
  c.length = imax(a.lens[c.seq], 0);
  c.direct = a.nsplit == 1 && !WP;
  c.start = WP ? 0 : c.split * a.split;
  // Nothing for this CTA (uniform); a CTA that writes the output runs for empty sequences too.
  c.skip = c.start >= c.length + ((c.direct || WP) ? 1 : 0);
  c.end = (WP || c.split == a.nsplit - 1) ? c.length : imin(c.length, c.start + a.split);
  return c;
}

// One warp's pipeline: chunk k of the warp starts at token chunk_t0(k) (interleaved, w + 4k,
// over the CTA's range; with warp partials, cps chunks per sub-split, the warp's last sub-split
// possibly longer: it runs to the sequence's end); issue(k) copies its keys and values into slot
// k % NST with cp.async and records which of its tokens are valid.
template <int KV, int D, int NST, bool WP>
struct Pipe {
  static constexpr int EB = KV == 0 ? 2 : 1;  // cache bytes per element
  static constexpr int CB = kChunk * D * EB;  // bytes of a chunk's keys (= of its values)
  // FP8 keys with head / 16 a multiple of 4: one 16-byte shared load gives a lane the words
  // of 4 k-steps (k-step 4m + i takes word i of d-chunk 4m + qd; the query's fragments follow
  // the same order); rows swizzled by 2 (chunk % 4) so that those loads are conflict-free.
  static constexpr bool K128 = KV != 0 && (D / 16) % 4 == 0;

  const Args& a;
  uint8_t* wbase;
  const uint8_t* kc;
  const uint8_t* vc;
  const int* bt_row;
  int warp, lane, start, end, bs, E, KPR, nk, n_sub, cps_shift, blkreg;
  uint64_t masks;  // token validity of each slot's chunk, 16 bits per slot

  __device__ __forceinline__ Pipe(const Args& args, const Cta& c, uint8_t* smem, int w, int l)
      : a(args), warp(w), lane(l), start(c.start), end(c.end), n_sub(0), cps_shift(0), blkreg(-1),
        masks(0) {
    wbase = smem + warp * NST * 2 * CB;
    kc = a.kc + int64_t(c.kvh) * a.kc_h;
    vc = a.vc + int64_t(c.kvh) * a.vc_h;
    bt_row = a.bt + c.seq * a.bt_s;
    bs = 1 << a.bs_shift;
    // Block ids, 32 entries per round: lane l holds the page of warp chunk (round * KPR +
    // l / E), sub-page l % E (E = 2 for blocks of 8 tokens: a chunk spans two pages).
    E = bs == 8 ? 2 : 1;
    KPR = 32 / E;
    if constexpr (WP) {
      cps_shift = a.sub_shift - kChunkShift;  // sub-splits are powers of two: no division
      const int nsub = imin(a.nsplit, (c.length + a.sub - 1) >> a.sub_shift);
      n_sub = nsub > warp ? (nsub - warp + kWarps - 1) / kWarps : 0;
      if (n_sub > 0) {
        const int j_last = warp + kWarps * (n_sub - 1);
        const int e_last =
            j_last == a.nsplit - 1 ? c.length : imin(c.length, (j_last + 1) * a.sub);
        nk = ((n_sub - 1) << cps_shift) + (e_last - j_last * a.sub + kChunk - 1) / kChunk;
      } else {
        nk = 0;
      }
    } else {
      const int n_ch = (end - start + kChunk - 1) / kChunk;
      nk = n_ch > warp ? (n_ch - warp + kWarps - 1) / kWarps : 0;
    }
  }
  __device__ __forceinline__ int sub_of(int k) const { return imin(k >> cps_shift, n_sub - 1); }
  __device__ __forceinline__ int chunk_t0(int k) const {
    if constexpr (WP) {
      const int i = sub_of(k);
      return ((warp + kWarps * i) << a.sub_shift) + kChunk * (k - (i << cps_shift));
    }
    return start + kChunk * (warp + kWarps * k);
  }
  // Warp partials: whether chunk k is the last of one of the warp's sub-splits.
  __device__ __forceinline__ bool sub_ends(int k) const {
    return k == nk - 1 ||
           (((k + 1) & ((1 << cps_shift) - 1)) == 0 && (k >> cps_shift) < n_sub - 1);
  }
  __device__ __forceinline__ void load_round(int k0) {
    const int k = k0 + lane / E, sub = lane % E;
    const int t = chunk_t0(k) + sub * 8;
    const int col = t >> a.bs_shift;
    blkreg = (k < nk && t < end && col < a.bt_cols) ? bt_row[col] : -1;
  }
  __device__ __forceinline__ uint8_t* keys(int slot) const { return wbase + slot * 2 * CB; }
  __device__ __forceinline__ uint32_t mask(int slot) const {
    return static_cast<uint32_t>(masks >> (16 * slot)) & 0xffffu;
  }
  // Lane roles in the copies: 16-bit keys take (d-chunk i / 16, token i % 16) for i = lane +
  // 32 r: token lane % 16; values take (row i / 2, half i % 2): half lane % 2. FP8 keys: token
  // lane % 16; values: row i, whole 16-token rows.
  __device__ __forceinline__ void issue(int k) {
    const int tok_k = lane & 15;
    const int half_v = lane & 1;
    const int slot = k % NST;
    const int kr = k & (KPR - 1);  // KPR: 16 or 32
    if (kr == 0 && k > 0) load_round(k);
    const int t0 = chunk_t0(k);
    const int base = kr * E;
    const int blk_k = static_cast<int>(shfl(uint32_t(blkreg), base + (E == 2 ? tok_k >> 3 : 0)));
    const bool ok_k = blk_k >= 0 && blk_k < a.num_blocks;
    const uint32_t m = ballot(ok_k && t0 + tok_k < end) & 0xffffu;
    masks = (masks & ~(uint64_t(0xffff) << (16 * slot))) | (uint64_t(m) << (16 * slot));
    uint8_t* sk = keys(slot);
    uint8_t* sv = sk + CB;
    const int within = t0 & (bs - 1);  // chunk start inside its page (0 unless blocks of 32)
    if constexpr (KV == 0) {
      const int o = (within + tok_k) & (bs - 1);
      const uint8_t* src = kc + int64_t(ok_k ? blk_k : 0) * a.kc_b + int64_t(o) * 16;
      const int bytes = (ok_k && t0 + tok_k < end) ? 16 : 0;
#pragma unroll
      for (int r = 0; r < D / 16; ++r) {
        const int c = (lane + 32 * r) >> 4;
        cp_async16(sk + (c * 16 + tok_k) * 16, src + int64_t(c) * bs * 16, bytes);
      }
      const int blk_v = static_cast<int>(shfl(uint32_t(blkreg), base + (E == 2 ? half_v : 0)));
      const bool ok_v = blk_v >= 0 && blk_v < a.num_blocks;
      const int tv = t0 + 8 * half_v;
      const int left = end - tv;
      const int vbytes = ok_v ? 2 * (left < 0 ? 0 : (left > 8 ? 8 : left)) : 0;
      const uint8_t* vsrc = vc + int64_t(ok_v ? blk_v : 0) * a.vc_b +
                            int64_t((within + 8 * half_v) & (bs - 1)) * 2;
#pragma unroll
      for (int r = 0; r < D / 16; ++r) {
        const int d = (lane + 32 * r) >> 1;
        cp_async16(sv + d * 32 + ((half_v ^ ((d >> 2) & 1)) << 4), vsrc + int64_t(d) * bs * 2,
                   vbytes);
      }
    } else {
      // FP8: blocks of 16 or 32 tokens (a chunk is inside one page).
      const int o = within + tok_k;
      const uint8_t* src = kc + int64_t(ok_k ? blk_k : 0) * a.kc_b + int64_t(o) * 16;
      const int bytes = (ok_k && t0 + tok_k < end) ? 16 : 0;
#pragma unroll
      for (int r = 0; r < (D + 31) / 32; ++r) {
        const int i = lane + 32 * r;
        if (i < D) {
          const int c = i >> 4;
          // conflict-free fragment reads (see K128)
          const int row = K128 ? tok_k ^ (2 * (c & 3)) : tok_k ^ ((tok_k >> 3) << 1);
          cp_async16(sk + (c * 16 + row) * 16, src + int64_t(c) * bs * 16, bytes);
        }
      }
      const int left = end - t0;
      const int vbytes = ok_k ? (left < 0 ? 0 : (left > 16 ? 16 : left)) : 0;
      const uint8_t* vsrc = vc + int64_t(ok_k ? blk_k : 0) * a.vc_b + within;
#pragma unroll
      for (int r = 0; r < (D + 31) / 32; ++r) {
        const int d = lane + 32 * r;
        if (d < D) cp_async16(sv + d * 16, vsrc + int64_t(d) * bs, vbytes);
      }
    }
  }
  // The first NST - 1 chunks' copies (one commit group each, empty ones too).
  __device__ __forceinline__ void prologue() {
#pragma unroll 1
    for (int s = 0; s < NST - 1; ++s) {
      if (s < nk) issue(s);
      cp_async_commit();
    }
  }
  // Chunk k + NST - 1 in, chunk k's data visible to the whole warp.
  __device__ __forceinline__ void next(int k) {
    if (k + NST - 1 < nk) issue(k + NST - 1);
    cp_async_commit();
    cp_async_wait<NST - 1>();
    syncwarp();
  }
};

// The k-slot order of the fragments that meet the keys (A of S = Q K^T in the wide kernel, B of
// S^T = K Q^T in the narrow one): the head dims of k-step ks, half h (k-slots 2qd, 2qd + 1 for
// h = 0, 2qd + 8, 2qd + 9 for h = 1).
template <int KV, bool K128>
__device__ __forceinline__ int q_dim(int ks, int qd, int h) {
  if constexpr (KV == 0) return 16 * ks + 2 * qd + 8 * h;                   // as laid out
  if constexpr (K128) return 16 * (4 * (ks / 4) + qd) + 4 * (ks % 4) + 2 * h;  // 16-byte reads
  return 16 * ks + 4 * qd + 2 * h;                                           // 4-byte reads
}

// bf16 query with FP8 keys (f16 MMAs): 2^(15 - e) brings a row whose largest |q| is in
// [2^(e-1), 2^e) into [2^14, 2^15), f16's range; exact (a power of two), undone in the logits.
template <typename QT, int KV>
__device__ __forceinline__ float q_scale(float amax) {
  if constexpr (KV != 0 && std::is_same<QT, __nv_bfloat16>::value) {
    if (amax > 0.f && amax <= 3.0e38f) {
      int e;
      frexpf(amax, &e);
      return ldexpf(1.f, imin(imax(15 - e, -120), 120));
    }
  }
  return 1.f;
}

// After every warp wrote its (max in base 2, sum, unnormalized O) per query head into red_m,
// red_l, red_o ([warps][16] and [warps][16][D]) and a __syncthreads: merge the warps, normalize,
// write the output (one split) or the CTA's float32 partial.
template <typename QT, int KV, int D>
__device__ __forceinline__ void store_merged(const Args& a, const Cta& c, const float* red_o,
                                             const float* red_m, const float* red_l, int rows,
                                             int64_t head0) {
  const float vsc = KV != 0 ? *a.vs : 1.f;
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int row = idx / D, d = idx % D;
    float mm = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, red_m[w * 16 + row]);
    const float mu = mm == -INFINITY ? 0.f : mm;
    float l = 0.f, o = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2_approx(red_m[w * 16 + row] - mu);
      l += wt * red_l[w * 16 + row];
      o += wt * red_o[(w * 16 + row) * D + d];
    }
    o = o * vsc / (l > 0.f ? l : 1.f);
    const int64_t head = head0 + row;
    if (c.direct) {
      static_cast<QT*>(a.out)[c.seq * a.o_s + head * a.o_h + d] = from_float<QT>(o);
      if (a.v2 && c.length > 0) {
        static_cast<QT*>(a.tmp)[c.seq * a.tmp_s + head * a.tmp_h + d] = from_float<QT>(o);
        if (d == 0) {
          a.ml[c.seq * a.ml_s + head * a.ml_h] = mm == -INFINITY ? 0.f : mm * kLn2;
          a.es[c.seq * a.ml_s + head * a.ml_h] = l;
        }
      }
    } else {
      const int64_t prow = (c.seq * a.heads + head) * a.nsplit + c.split;
      a.po[prow * D + d] = o;
      if (d == 0) {
        a.pm[prow] = mm;  // base 2 (merged with exp2: no rounding of ln 2)
        a.pl[prow] = l;
      }
    }
  }
}

// Warp partials: after every warp wrote its sub-splits' (normalized O, max in base 2, sum) to
// po / pm / pl and a CTA barrier made them visible, each thread takes 4 head dims of one query
// head and merges that head's sub-splits in order, online: per 512-token partition (v2:
// tmp_out, max_logits in natural-log units and exp_sums, as the reference has them) and over
// the whole sequence (the output; 0 for an empty sequence). Loads go out kU sub-splits at a
// time so that the L2 round trips overlap.
template <typename QT, int D>
__device__ __forceinline__ void merge_warp_partials(const Args& a, const Cta& c, int rows,
                                                    int64_t head0) {
  constexpr int D4 = D / 4;
  constexpr int kU = 8;
  const int nsub = imin(a.nsplit, (c.length + a.sub - 1) >> a.sub_shift);
  const int fine_mask = (kPartition >> a.sub_shift) - 1;  // sub-splits per partition - 1
  for (int idx = threadIdx.x; idx < rows * D4; idx += kThreads) {
    const int row = idx / D4, d = (idx % D4) * 4;
    const int64_t head = head0 + row;
    const int64_t prow = (c.seq * a.heads + head) * a.nsplit;
    float mp = -INFINITY, lp = 0.f, t[4] = {0.f, 0.f, 0.f, 0.f};  // the open partition
    float mg = -INFINITY, lg = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};  // the closed ones
#pragma unroll 1
    for (int j0 = 0; j0 < nsub; j0 += kU) {
      float4 v[kU];
      float mj[kU], lj[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int j = j0 + u;
        const bool ok = j < nsub;
        v[u] = ok ? *reinterpret_cast<const float4*>(a.po + (prow + j) * D + d)
                  : make_float4(0.f, 0.f, 0.f, 0.f);
        mj[u] = ok ? a.pm[prow + j] : -INFINITY;
        lj[u] = ok ? a.pl[prow + j] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int j = j0 + u;
        if (j >= nsub) break;
        const float m_new = fmaxf(mp, mj[u]);
        const float mu = m_new == -INFINITY ? 0.f : m_new;
        const float al = exp2_approx(mp - mu), w = lj[u] * exp2_approx(mj[u] - mu);
        lp = lp * al + w;
        t[0] = t[0] * al + w * v[u].x;
        t[1] = t[1] * al + w * v[u].y;
        t[2] = t[2] * al + w * v[u].z;
        t[3] = t[3] * al + w * v[u].w;
        mp = m_new;
        if (((j + 1) & fine_mask) != 0 && j != nsub - 1) continue;
        // partition j / fine is complete
        const float mup = mp == -INFINITY ? 0.f : mp;
        if (a.v2) {
          const int64_t part = j >> (9 - a.sub_shift);  // kPartition = 2^9
          const float inv = 1.f / (lp > 0.f ? lp : 1.f);
          QT* tp = static_cast<QT*>(a.tmp) + c.seq * a.tmp_s + head * a.tmp_h + part * a.tmp_p + d;
#pragma unroll
          for (int i = 0; i < 4; ++i) tp[i] = from_float<QT>(t[i] * inv);
          if (d == 0) {
            a.ml[c.seq * a.ml_s + head * a.ml_h + part] = mup * kLn2;
            a.es[c.seq * a.ml_s + head * a.ml_h + part] = lp;
          }
        }
        const float g_new = fmaxf(mg, mp);
        const float gu = g_new == -INFINITY ? 0.f : g_new;
        const float a1 = exp2_approx(mg - gu), a2 = exp2_approx(mp - gu);
        lg = lg * a1 + lp * a2;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          o[i] = o[i] * a1 + t[i] * a2;
          t[i] = 0.f;
        }
        mg = g_new;
        mp = -INFINITY;
        lp = 0.f;
      }
    }
    const float inv = 1.f / (lg > 0.f ? lg : 1.f);
    QT* op = static_cast<QT*>(a.out) + c.seq * a.o_s + head * a.o_h + d;
#pragma unroll
    for (int i = 0; i < 4; ++i) op[i] = from_float<QT>(o[i] * inv);
  }
}

#if defined(COMPILE_OPS_EMULATE)
#define COMPILE_OPS_DECODE_SMEM(S)                                                      \
  static std::vector<uint8_t> smem_store(S::kBytes + 16);                               \
  uint8_t* smem = reinterpret_cast<uint8_t*>(                                           \
      (reinterpret_cast<uintptr_t>(smem_store.data()) + 15) & ~uintptr_t(15));
#else
#define COMPILE_OPS_DECODE_SMEM(S) extern __shared__ __align__(16) uint8_t smem[];
#endif

// ---------------------------------------------------------------------------------------------
// QT: the query / output type. KV: 0 = 16-bit cache (QT), 1 = e4m3, 2 = e5m2. D: head size, a
// multiple of 16 in [32, 256]. WP (narrow kernel only): warp partials (Args::sub > 0; a template
// parameter because the partial-writing epilogue costs ~40 registers where it is compiled in).
//
// The wide kernel: up to 16 query heads per CTA as the 16 rows of M (S = Q K^T, O = P V);
// GQA groups above 8 (paged_decode_narrow takes the others).
template <typename QT, int KV, int D>
__global__ void __launch_bounds__(kThreads)
    paged_decode_kernel(const Args a) {
  using MT = typename std::conditional<KV == 0, QT, __half>::type;  // MMA input type
  constexpr int EB = KV == 0 ? 2 : 1;  // cache bytes per element
  using S = Smem<D, EB>;
  constexpr int NST = S::kStages;
  constexpr int KS = D / 16;          // k-steps of S = Q K^T
  constexpr int ND = D / 8;           // n-tiles of O
  using Pp = Pipe<KV, D, NST, false>;
  constexpr int CB = Pp::CB;
  constexpr bool K128 = Pp::K128;
  COMPILE_OPS_DECODE_SMEM(S)

  pdl_wait();
  const Cta c = cta_setup<false>(a);
  if (c.skip) return;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int g = lane >> 2, qd = lane & 3;
  const int g0 = c.slice * 16;
  const int rows = imin(16, a.group - g0);  // valid query rows of this slice
  const int64_t head0 = int64_t(c.kvh) * a.group + g0;
  Pp pipe(a, c, smem, warp, lane);

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float acc[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  // Per-lane constant parts of the fragment addresses.
  const int mat = lane >> 3, mr = lane & 7;
  const int k_lds = ((mat & 1) * 16 + mr + ((mat >> 1) << 3)) * 16;  // ldmatrix rows of K
  const int v_lds = (8 * (mat >> 1) + mr) * 32 + (((mat & 1) ^ ((mr >> 2) & 1)) << 4);

  if (pipe.nk > 0) pipe.load_round(0);  // the block ids' load overlaps the query's
  // ---- query fragments (A of S = Q K^T), per-row logit scale and ALiBi slope ----
  uint32_t qa[KS][4];
  float qks[2], slope[2];
  {
    float qf[KS][4][2];
    float amax[2] = {0.f, 0.f};
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      const bool ok = row < rows;
      const int64_t head = head0 + row;
      const QT* qrow = static_cast<const QT*>(a.q) + c.seq * a.q_s + head * a.q_h;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int d = q_dim<KV, K128>(ks, qd, half);
          const float x0 = ok ? to_float(qrow[d]) : 0.f;
          const float x1 = ok ? to_float(qrow[d + 1]) : 0.f;
          qf[ks][r + 2 * half][0] = x0;
          qf[ks][r + 2 * half][1] = x1;
          amax[r] = fmaxf(amax[r], fmaxf(fabsf(x0), fabsf(x1)));
        }
      slope[r] = (a.alibi != nullptr && ok) ? a.alibi[head] * kLog2e : 0.f;
    }
    float qscale[2] = {1.f, 1.f};
    const float base = a.scale * kLog2e * (KV != 0 ? *a.ks : 1.f);
    for (int r = 0; r < 2; ++r) {
      if constexpr (KV != 0 && std::is_same<QT, __nv_bfloat16>::value) {
        float m = fmaxf(amax[r], shfl_xor(amax[r], 1));
        qscale[r] = q_scale<QT, KV>(fmaxf(m, shfl_xor(m, 2)));
      }
      qks[r] = base / qscale[r];
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float s = qscale[i & 1];
        qa[ks][i] = pack2<MT>(qf[ks][i][0] * s, qf[ks][i][1] * s);
      }
  }

  pipe.prologue();
#pragma unroll 1
  for (int k = 0; k < pipe.nk; ++k) {
    pipe.next(k);
    const int slot = k % NST;
    const uint8_t* sk = pipe.keys(slot);
    const uint8_t* sv = sk + CB;
    const uint32_t m = pipe.mask(slot);
    const int t0 = pipe.chunk_t0(k);

    // S = Q K^T, each n-tile in two accumulators (even / odd k-steps): two short dependency
    // chains of MMAs instead of one long one.
    float s2[2][2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) s2[n][h][0] = s2[n][h][1] = s2[n][h][2] = s2[n][h][3] = 0.f;
    if constexpr (KV == 0) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t b[4];
        ldmatrix_x4(b, sk + ks * 512 + k_lds);
        mma<MT>(s2[0][ks & 1], qa[ks], b[0], b[1]);
        mma<MT>(s2[1][ks & 1], qa[ks], b[2], b[3]);
      }
    } else if constexpr (K128) {
#pragma unroll
      for (int mm = 0; mm < KS / 4; ++mm)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int tok = 4 * (g >> 1) + (g & 1) + 2 * n;  // n-slot g of tile n
          const uint4 w = *reinterpret_cast<const uint4*>(
              sk + ((4 * mm + qd) * 16 + (tok ^ (2 * qd))) * 16);
          const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t b0, b1;
            fp8x4_to_f16<KV>(ws[i], b0, b1);
            mma<MT>(s2[n][i & 1], qa[4 * mm + i], b0, b1);
          }
        }
    } else {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int tok = 4 * (g >> 1) + (g & 1) + 2 * n;  // n-slot g of tile n
          const int row = tok ^ ((tok >> 3) << 1);
          const uint32_t w = lds32(sk + (ks * 16 + row) * 16 + 4 * qd);
          uint32_t b0, b1;
          fp8x4_to_f16<KV>(w, b0, b1);
          mma<MT>(s2[n][ks & 1], qa[ks], b0, b1);
        }
    }
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = s2[n][0][e] + s2[n][1][e];
    // Logits -> base-2 scaled, masked; tokens of s[n][e] (rows g: e = 0, 1; g + 8: e = 2, 3).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = KV == 0 ? 8 * n + 2 * qd + (e & 1) : 4 * qd + 2 * n + (e & 1);
        const int r = e >> 1;
        float x = s[n][e] * qks[r];
        if (a.alibi != nullptr) x += slope[r] * static_cast<float>(t0 + tok - c.length + 1);
        x = ((m >> tok) & 1u) ? x : -INFINITY;
        s[n][e] = x;
        mx[r] = fmaxf(mx[r], x);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 1));
      mx[r] = fmaxf(mx[r], shfl_xor(mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = exp2_approx(m_run[r] - m_use);
      m_run[r] = m_new;
      mx[r] = m_use;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2_approx(s[n][e] - mx[e >> 1]);
        s[n][e] = p;
        rs[e >> 1] += p;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];
    if (ballot(alpha[0] != 1.f || alpha[1] != 1.f)) {  // no row's max moved: nothing to scale
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        acc[n][0] *= alpha[0];
        acc[n][1] *= alpha[0];
        acc[n][2] *= alpha[1];
        acc[n][3] *= alpha[1];
      }
    }
    // P as A fragments (k = the chunk's 16 tokens in the order of V's B fragments), hi + lo.
    uint32_t ph[4], pl[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = i >> 1, e = (i & 1) * 2;  // a0: s[0][0..1], a1: s[0][2..3], a2: s[1][0..1]
      ph[i] = pack2<MT>(s[n][e], s[n][e + 1]);
      float h0, h1;
      unpack2<MT>(ph[i], h0, h1);
      pl[i] = pack2<MT>(s[n][e] - h0, s[n][e + 1] - h1);
    }
    if constexpr (KV == 0) {
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, sv + np * 512 + v_lds);
        mma<MT>(acc[2 * np], ph, b[0], b[1]);
        mma<MT>(acc[2 * np + 1], ph, b[2], b[3]);
        if (a.p_split) {
          mma<MT>(acc[2 * np], pl, b[0], b[1]);
          mma<MT>(acc[2 * np + 1], pl, b[2], b[3]);
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        const uint32_t w = lds32(sv + (8 * n + g) * 16 + 4 * qd);
        uint32_t b0, b1;
        fp8x4_to_f16<KV>(w, b0, b1);
        mma<MT>(acc[n], ph, b0, b1);
        if (a.p_split) mma<MT>(acc[n], pl, b0, b1);
      }
    }
    syncwarp();  // the slot is refilled by the next iteration's issue
  }
  cp_async_wait_all();
  // ---- merge the warps: (max, sum, O) per row through shared memory ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += shfl_xor(l_run[r], 1);
    l_run[r] += shfl_xor(l_run[r], 2);
  }
  __syncthreads();  // every warp is done with its slots
  float* red_o = reinterpret_cast<float*>(smem);    // [warps][16][D]
  float* red_m = red_o + kWarps * 16 * D;           // [warps][16]
  float* red_l = red_m + kWarps * 16;               // [warps][16]
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), d = 8 * n + 2 * qd + (e & 1);
      red_o[(warp * 16 + row) * D + d] = acc[n][e];
    }
  if (qd == 0) {
    for (int r = 0; r < 2; ++r) {
      red_m[warp * 16 + g + 8 * r] = m_run[r];
      red_l[warp * 16 + g + 8 * r] = l_run[r];
    }
  }
  __syncthreads();
  store_merged<QT, KV, D>(a, c, red_o, red_m, red_l, rows, head0);
}

// The narrow kernel: GQA groups of up to 8 query heads, which go in as the N = 8 columns of the
// MMAs instead of padding M = 16 rows: S^T = K Q^T (M = the chunk's 16 token slots, K = head
// dims) and O^T = V^T P^T (M = head dims, K = the 16 token slots), P^T brought from the
// accumulator layout into a B fragment by movmatrix (an 8 x 8 transpose in registers). Half the
// MMAs of the wide kernel and half its accumulator and query registers. Token slots are the
// chunk's tokens in order for 16-bit caches; for FP8 slot s < 8 is token 4 (s / 2) + s % 2 and
// slot 8 + s is token 4 (s / 2) + 2 + s % 2, so that a 4-byte word of a value row holds the 4
// tokens one lane needs.
template <typename QT, int KV, int D, bool WP>
__global__ void __launch_bounds__(kThreads, KV != 0 && D <= 128 ? 4 : 1)  // FP8: 4 CTAs per SM
    paged_decode_narrow(const Args a) {
  using MT = typename std::conditional<KV == 0, QT, __half>::type;  // MMA input type
  constexpr int EB = KV == 0 ? 2 : 1;
  using S = Smem<D, EB, KV == 0 ? 98304 : 57344>;  // FP8: 4 CTAs per SM
  constexpr int NST = S::kStages;
  constexpr int KS = D / 16;  // k-steps of S^T; also the m-tiles of O^T
  using Pp = Pipe<KV, D, NST, WP>;
  constexpr int CB = Pp::CB;
  constexpr bool K128 = Pp::K128;
  COMPILE_OPS_DECODE_SMEM(S)

  pdl_wait();
  const Cta c = cta_setup<WP>(a);
  if (c.skip) return;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int g = lane >> 2, qd = lane & 3;
  const int rows = a.group;  // <= 8: one slice
  const int64_t head0 = int64_t(c.kvh) * a.group;
  Pp pipe(a, c, smem, warp, lane);
  if (pipe.nk > 0) pipe.load_round(0);  // the block ids' load overlaps the query's

  // ---- Q^T as B fragments (head g), the logit scale and ALiBi slope of heads 2qd, 2qd + 1 ----
  uint32_t qb[KS][2];
  float qks[2], slope[2];
  {
    const bool ok = g < rows;
    const QT* qrow = static_cast<const QT*>(a.q) + c.seq * a.q_s + (head0 + g) * a.q_h;
    float qf[KS][2][2];
    float amax = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int d = q_dim<KV, K128>(ks, qd, h);
        qf[ks][h][0] = ok ? to_float(qrow[d]) : 0.f;
        qf[ks][h][1] = ok ? to_float(qrow[d + 1]) : 0.f;
        amax = fmaxf(amax, fmaxf(fabsf(qf[ks][h][0]), fabsf(qf[ks][h][1])));
      }
    float qscale = 1.f;  // of head g
    if constexpr (KV != 0 && std::is_same<QT, __nv_bfloat16>::value) {
      float m = fmaxf(amax, shfl_xor(amax, 1));
      qscale = q_scale<QT, KV>(fmaxf(m, shfl_xor(m, 2)));
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        qb[ks][h] = pack2<MT>(qf[ks][h][0] * qscale, qf[ks][h][1] * qscale);
    const float base = a.scale * kLog2e * (KV != 0 ? *a.ks : 1.f);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = 2 * qd + e;  // its scale lives in lane 4h (g = h)
      qks[e] = base / __uint_as_float(shfl(__float_as_uint(qscale), 4 * h));
      slope[e] = (a.alibi != nullptr && h < rows) ? a.alibi[head0 + h] * kLog2e : 0.f;
    }
  }

  float m_run[2] = {-INFINITY, -INFINITY};  // heads 2qd, 2qd + 1
  float l_run[2] = {0.f, 0.f};              // this lane's tokens only (summed over g at the end)
  float acc[KS][4];  // O^T: (head dim 16 mt + g (+ 8), heads 2qd, 2qd + 1)
#pragma unroll
  for (int mt = 0; mt < KS; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
  // ldmatrix rows: K as A (matrices: tokens 0-7 | 8-15 x d-chunk 2ks | 2ks + 1), V^T as A
  // (head dims 0-7 | 8-15 x token halves 0 | 1, halves swapped on every other group of 4 rows).
  const int mat = lane >> 3, mr = lane & 7;
  const int k_lds = ((mat >> 1) * 16 + mr + 8 * (mat & 1)) * 16;
  const int v_lds = (mr + 8 * (mat & 1)) * 32 + (((mat >> 1) ^ ((mr >> 2) & 1)) << 4);
  // Tokens of the accumulator rows (slots g and g + 8).
  const int tok_lo = KV == 0 ? g : 4 * (g >> 1) + (g & 1);
  const int tok_hi = KV == 0 ? g + 8 : 4 * (g >> 1) + 2 + (g & 1);

  pipe.prologue();
#pragma unroll 1
  for (int k = 0; k < pipe.nk; ++k) {
    pipe.next(k);
    const int slot = k % NST;
    const uint8_t* sk = pipe.keys(slot);
    const uint8_t* sv = sk + CB;
    const uint32_t m = pipe.mask(slot);
    const int t0 = pipe.chunk_t0(k);

    // S^T = K Q^T in two accumulators (even / odd k-steps): two short MMA chains.
    float s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if constexpr (KV == 0) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t ka[4];
        ldmatrix_x4(ka, sk + ks * 512 + k_lds);
        mma<MT>(s2[ks & 1], ka, qb[ks][0], qb[ks][1]);
      }
    } else if constexpr (K128) {
#pragma unroll
      for (int mm = 0; mm < KS / 4; ++mm) {
        const uint8_t* kb = sk + (4 * mm + qd) * 256;
        const uint4 wl = *reinterpret_cast<const uint4*>(kb + (tok_lo ^ (2 * qd)) * 16);
        const uint4 wh = *reinterpret_cast<const uint4*>(kb + (tok_hi ^ (2 * qd)) * 16);
        const uint32_t lo[4] = {wl.x, wl.y, wl.z, wl.w}, hi[4] = {wh.x, wh.y, wh.z, wh.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t ka[4];
          fp8x4_to_f16<KV>(lo[i], ka[0], ka[2]);
          fp8x4_to_f16<KV>(hi[i], ka[1], ka[3]);
          mma<MT>(s2[i & 1], ka, qb[4 * mm + i][0], qb[4 * mm + i][1]);
        }
      }
    } else {
      const int row_lo = tok_lo ^ ((tok_lo >> 3) << 1), row_hi = tok_hi ^ ((tok_hi >> 3) << 1);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t ka[4];
        fp8x4_to_f16<KV>(lds32(sk + (ks * 16 + row_lo) * 16 + 4 * qd), ka[0], ka[2]);
        fp8x4_to_f16<KV>(lds32(sk + (ks * 16 + row_hi) * 16 + 4 * qd), ka[1], ka[3]);
        mma<MT>(s2[ks & 1], ka, qb[ks][0], qb[ks][1]);
      }
    }
    // Logits (e: 0 = (tok_lo, head 2qd), 1 = (tok_lo, 2qd + 1), 2, 3 = tok_hi), base 2, masked.
    float s[4], mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = e < 2 ? tok_lo : tok_hi, h = e & 1;
      float x = (s2[0][e] + s2[1][e]) * qks[h];
      if (a.alibi != nullptr) x += slope[h] * static_cast<float>(t0 + tok - c.length + 1);
      x = ((m >> tok) & 1u) ? x : -INFINITY;
      s[e] = x;
      mx[h] = fmaxf(mx[h], x);
    }
    float alpha[2], mu[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // max over the 16 tokens: the 8 lanes of this qd
      mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 4));
      mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 8));
      mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 16));
      const float m_new = fmaxf(m_run[h], mx[h]);
      mu[h] = m_new == -INFINITY ? 0.f : m_new;
      alpha[h] = exp2_approx(m_run[h] - mu[h]);
      m_run[h] = m_new;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) s[e] = exp2_approx(s[e] - mu[e & 1]);
    l_run[0] = l_run[0] * alpha[0] + s[0] + s[2];
    l_run[1] = l_run[1] * alpha[1] + s[1] + s[3];
    if (ballot(alpha[0] != 1.f || alpha[1] != 1.f)) {  // no head's max moved: nothing to scale
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) {
        acc[mt][0] *= alpha[0];
        acc[mt][1] *= alpha[1];
        acc[mt][2] *= alpha[0];
        acc[mt][3] *= alpha[1];
      }
    }
    // P^T as B: transpose (token slot g | g + 8, heads 2qd, 2qd + 1) into (slots 2qd, 2qd + 1
    // (| + 8), head g); hi + lo 16-bit parts where P needs them.
    const uint32_t ph_lo = pack2<MT>(s[0], s[1]), ph_hi = pack2<MT>(s[2], s[3]);
    const uint32_t pb0 = movmatrix_t(ph_lo), pb1 = movmatrix_t(ph_hi);
    uint32_t pl0 = 0, pl1 = 0;
    if (a.p_split) {
      float h0, h1, h2, h3;
      unpack2<MT>(ph_lo, h0, h1);
      unpack2<MT>(ph_hi, h2, h3);
      pl0 = movmatrix_t(pack2<MT>(s[0] - h0, s[1] - h1));
      pl1 = movmatrix_t(pack2<MT>(s[2] - h2, s[3] - h3));
    }
    if constexpr (KV == 0) {
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) {
        uint32_t va[4];
        ldmatrix_x4(va, sv + mt * 512 + v_lds);
        mma<MT>(acc[mt], va, pb0, pb1);
        if (a.p_split) mma<MT>(acc[mt], va, pl0, pl1);
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) {
        uint32_t va[4];
        fp8x4_to_f16<KV>(lds32(sv + (16 * mt + g) * 16 + 4 * qd), va[0], va[2]);
        fp8x4_to_f16<KV>(lds32(sv + (16 * mt + g + 8) * 16 + 4 * qd), va[1], va[3]);
        mma<MT>(acc[mt], va, pb0, pb1);
        if (a.p_split) mma<MT>(acc[mt], va, pl0, pl1);
      }
    }
    if (WP && pipe.sub_ends(k)) {
      // The end of one of this warp's sub-splits: its partial, then a fresh softmax state.
      const int j = warp + kWarps * pipe.sub_of(k);
      const float vsc = KV != 0 ? *a.vs : 1.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float l = l_run[h] + shfl_xor(l_run[h], 4);
        l += shfl_xor(l, 8);
        l += shfl_xor(l, 16);
        const int head = 2 * qd + h;
        if (head < rows) {
          const int64_t prow = (c.seq * a.heads + head0 + head) * a.nsplit + j;
          const float inv = vsc / (l > 0.f ? l : 1.f);
          float* po = a.po + prow * D + g;
#pragma unroll
          for (int mt = 0; mt < KS; ++mt) {
            po[16 * mt] = acc[mt][h] * inv;
            po[16 * mt + 8] = acc[mt][2 + h] * inv;
          }
          if (g == 0) {
            a.pm[prow] = m_run[h];
            a.pl[prow] = l;
          }
        }
        m_run[h] = -INFINITY;
        l_run[h] = 0.f;
      }
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    }
    syncwarp();  // the slot is refilled by the next iteration's issue
  }
  cp_async_wait_all();
  if constexpr (WP) {
    __syncthreads();  // every warp's partials written (global memory, visible to the CTA)
    merge_warp_partials<QT, D>(a, c, rows, head0);
  } else {  // one partial per CTA, or the output
    // ---- merge the warps through shared memory ----
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += shfl_xor(l_run[h], 4);
      l_run[h] += shfl_xor(l_run[h], 8);
      l_run[h] += shfl_xor(l_run[h], 16);
    }
    __syncthreads();  // every warp is done with its slots
    float* red_o = reinterpret_cast<float*>(smem);  // [warps][16][D]
    float* red_m = red_o + kWarps * 16 * D;         // [warps][16]
    float* red_l = red_m + kWarps * 16;             // [warps][16]
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        red_o[(warp * 16 + 2 * qd + (e & 1)) * D + 16 * mt + g + 8 * (e >> 1)] = acc[mt][e];
    if (g == 0) {
      for (int h = 0; h < 2; ++h) {
        red_m[warp * 16 + 2 * qd + h] = m_run[h];
        red_l[warp * 16 + 2 * qd + h] = l_run[h];
      }
    }
    __syncthreads();
    store_merged<QT, KV, D>(a, c, red_o, red_m, red_l, rows, head0);
  }
}

}  // namespace decode
}  // namespace compile_ops
