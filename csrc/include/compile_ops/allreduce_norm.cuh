// All-reduce (sum) + residual add + RMSNorm over PyTorch symmetric memory.
// Device code only: no torch headers, raw pointers, int64 row offsets.
//
// Semantics (compile_ops/allreduce_norm.py is the oracle):
//   s        = T(x_0 + x_1 + ... + x_{n-1})     float32, in rank order, rounded once
//   z        = s + residual                     float32
//   residual <- T(z);  input <- T(T(z * rsqrt(mean(z^2) + eps)) * w)   (norm.cuh's rounding)
// Every rank computes s in the same order from the same bytes, so every rank gets the same s.
//
// Memory: `buffers[p]` is rank p's symmetric buffer as mapped in this process (rows packed,
// `hidden` elements each), `signals[p]` its signal pad (uint32 flags, zero when idle). Both tables
// are device arrays of `world` addresses.
//
// Rows: one row per warp (blockDim.x == 32, blockDim.y rows per block) or per block
// (blockDim.y == 1), as fused_add_rms_norm's kernels split them. Row r goes to block
// (r / blockDim.y) % gridDim.x on every rank (the launch is the same on every rank for the same
// shape).
//
// Synchronization is per block: block b of every rank handles the same rows, so block b only
// ever reads peer rows that block b of that peer wrote. A barrier of block b is a flag per
// (block, source rank) in each rank's signal pad: slot [b * world + src] of rank dst's pad. The
// sender waits for the flag to be 0 and sets it to 1 (compare-and-swap, release, system scope),
// the receiver waits for 1 and resets it to 0 (compare-and-swap, acquire, system scope). A flag
// is consumed by exactly one wait, so the pads are zero again after every launch and the next
// launch (any grid) can reuse them; a sender that runs a whole barrier ahead waits for its last
// flag to be consumed. The block's __syncthreads before the send makes every thread's buffer
// accesses precede the release; the one after the wait makes the acquire precede every thread's
// reads (causality order through the CTA barrier).
//
// One-shot: stage my rows in my buffer / barrier / every rank reads every peer's rows, sums,
// normalizes its own rows / barrier (no peer still reads my buffer when the next launch stages).
// Two-shot: stage / barrier / the owner of row r (rank r % world) sums it from every buffer and
// writes s over its own staged row / barrier / every rank reads s of each row from its owner and
// normalizes with its own residual / barrier. Only s travels in the gather, so each rank's
// residual stays its own (it need not be replicated).
#pragma once

#include <cstdint>
#include <cstdio>

#include "compile_ops/norm.cuh"
#include "compile_ops/vec.cuh"

namespace compile_ops {

// Ranks a launch may have: one barrier thread per rank, all in the first warp.
constexpr int kAllreduceMaxRanks = 32;

// A barrier that waited this long (a peer never arrived: a rank took another path, or died)
// traps instead of hanging the GPU forever.
constexpr uint64_t kAllreduceTimeoutNs = 600ull * 1000 * 1000 * 1000;

// Spin until *flag == from, then set it to `to`. RELEASE: a release CAS (the send); else an
// acquire CAS (the wait). System scope: the flag and the data it guards live in another GPU.
template <bool RELEASE>
__device__ __forceinline__ void flag_cas_spin(uint32_t* flag, uint32_t from, uint32_t to) {
#if defined(__CUDA_ARCH__)
  uint64_t start = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    uint32_t old;
    if constexpr (RELEASE)
      asm volatile("atom.release.sys.global.cas.b32 %0, [%1], %2, %3;"
                   : "=r"(old) : "l"(flag), "r"(from), "r"(to) : "memory");
    else
      asm volatile("atom.acquire.sys.global.cas.b32 %0, [%1], %2, %3;"
                   : "=r"(old) : "l"(flag), "r"(from), "r"(to) : "memory");
    if (old == from) return;
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > kAllreduceTimeoutNs) {
      printf("compile_ops.fused_allreduce_add_rms_norm: barrier timed out (block %d): a peer "
             "rank never reached it\n", static_cast<int>(blockIdx.x));
      __trap();
    }
  }
#else  // host emulation: the compiler's atomic builtins with the same orderings (std::atomic_ref
       // is C++20; nvcc's host pass of this header runs as C++17 under torch 2.11)
  for (;;) {
    uint32_t expected = from;
    if (__atomic_compare_exchange_n(flag, &expected, to, /*weak=*/true,
                                    RELEASE ? __ATOMIC_RELEASE : __ATOMIC_ACQUIRE,
                                    __ATOMIC_RELAXED))
      return;
  }
#endif
}

// Barrier of block blockIdx.x across the ranks: returns when every rank's block blockIdx.x has
// called it as often as this one, with every access of theirs before their call visible to
// every thread of this block. Thread p < world signals rank p and waits for rank p's signal.
__device__ __forceinline__ void block_barrier(const int64_t* signals, int rank, int world) {
  __syncthreads();
  const int p = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  if (p < world) {
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * world;
    uint32_t* to_peer = reinterpret_cast<uint32_t*>(signals[p]) + slot + rank;
    uint32_t* from_peer = reinterpret_cast<uint32_t*>(signals[rank]) + slot + p;
    flag_cas_spin<true>(to_peer, 0u, 1u);
    flag_cas_spin<false>(from_peer, 1u, 0u);
  }
  __syncthreads();
}

// The first row of this thread's warp (or block) and the step to its next row.
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ int64_t row_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.y;
}

// Sum over the threads of a row, reusable in a loop: row_sum's shared partials (a row of
// several warps, blockDim.y == 1) are read by every warp before any warp writes them again. A
// warp row needs no __syncthreads (and the warps of a block may run different row counts).
__device__ __forceinline__ float block_row_sum(float v) {
  const float s = row_sum(v);
  if (blockDim.x != 32) __syncthreads();
  return s;
}

// The arguments of one launch. input / residual: this rank's rows (own row strides); weight:
// hidden contiguous elements.
template <typename T>
struct AllreduceNormArgs {
  T* input;
  int64_t in_stride;
  T* residual;
  int64_t res_stride;
  const T* weight;
  const int64_t* buffers;
  const int64_t* signals;
  int64_t rows;
  int hidden;
  float eps;
  int rank;
  int world;
};

// Copy this block's rows of input into this rank's buffer (packed rows).
template <typename T, int W>
__device__ __forceinline__ void stage_rows(const AllreduceNormArgs<T>& a) {
  using P = Pack<T, W>;
  const int n = a.hidden / W;
  P* mine = reinterpret_cast<P*>(a.buffers[a.rank]);
  for (int64_t row = first_row(); row < a.rows; row += row_step()) {
    const P* src = reinterpret_cast<const P*>(a.input + row * a.in_stride);
    P* dst = mine + row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

// Pack i of row `row` summed over every rank's buffer: float32, rank order, rounded once.
template <typename T, int W>
__device__ __forceinline__ Pack<T, W> sum_ranks(const AllreduceNormArgs<T>& a, int64_t row,
                                                int i) {
  using P = Pack<T, W>;
  const int64_t off = row * (a.hidden / W) + i;
  float acc[W];
  {
    const P v = reinterpret_cast<const P*>(a.buffers[0])[off];
#pragma unroll
    for (int j = 0; j < W; ++j) acc[j] = to_float(v.v[j]);
  }
  for (int p = 1; p < a.world; ++p) {
    const P v = reinterpret_cast<const P*>(a.buffers[p])[off];
#pragma unroll
    for (int j = 0; j < W; ++j) acc[j] += to_float(v.v[j]);
  }
  P s;
#pragma unroll
  for (int j = 0; j < W; ++j) s.v[j] = from_float<T>(acc[j]);
  return s;
}

// Residual add + RMSNorm of one row whose reduced sum s comes from `get_s(i)` (pack i). First
// pass: s + residual in float32 for the sum of squares, s kept in the input row (its original
// is staged already); second pass: the same thread re-reads its packs and writes both outputs.
template <typename T, int W, typename GetS>
__device__ __forceinline__ void add_norm_row(const AllreduceNormArgs<T>& a, int64_t row,
                                             GetS get_s) {
  using P = Pack<T, W>;
  const int n = a.hidden / W;
  P* in_row = reinterpret_cast<P*>(a.input + row * a.in_stride);
  P* res_row = reinterpret_cast<P*>(a.residual + row * a.res_stride);
  const P* w_vec = reinterpret_cast<const P*>(a.weight);

  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P s = get_s(i);
    const P r = res_row[i];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float z = to_float(s.v[j]) + to_float(r.v[j]);
      ss += z * z;
    }
    in_row[i] = s;
  }
  const float inv = rsqrtf(block_row_sum(ss) / static_cast<float>(a.hidden) + a.eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const P s = in_row[i];
    P r = res_row[i];
    const P w = w_vec[i];
    P o;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float z = to_float(s.v[j]) + to_float(r.v[j]);
      r.v[j] = from_float<T>(z);
      o.v[j] = scale_out<T>(z * inv, w.v[j], true);
    }
    res_row[i] = r;
    in_row[i] = o;
  }
}

// One-shot: each rank reads every peer's rows. Moves (world - 1) x the input per rank over the
// links; two barriers.
template <typename T, int W>
__global__ void __launch_bounds__(1024) allreduce_norm_oneshot_kernel(AllreduceNormArgs<T> a) {
  stage_rows<T, W>(a);
  block_barrier(a.signals, a.rank, a.world);
  for (int64_t row = first_row(); row < a.rows; row += row_step())
    add_norm_row<T, W>(a, row, [&](int i) { return sum_ranks<T, W>(a, row, i); });
  block_barrier(a.signals, a.rank, a.world);
}

// Two-shot: reduce-scatter by rows (row r owned by rank r % world), then each rank gathers s
// from the owners. Moves 2 (world - 1) / world x the input per rank; three barriers.
template <typename T, int W>
__global__ void __launch_bounds__(1024) allreduce_norm_twoshot_kernel(AllreduceNormArgs<T> a) {
  using P = Pack<T, W>;
  const int n = a.hidden / W;
  stage_rows<T, W>(a);
  block_barrier(a.signals, a.rank, a.world);
  P* mine = reinterpret_cast<P*>(a.buffers[a.rank]);
  for (int64_t row = first_row(); row < a.rows; row += row_step()) {
    if (row % a.world != a.rank) continue;
    // Only this rank reads its owned rows in this phase: overwrite the staged input with s.
    for (int i = threadIdx.x; i < n; i += blockDim.x) mine[row * n + i] = sum_ranks<T, W>(a, row, i);
  }
  block_barrier(a.signals, a.rank, a.world);
  for (int64_t row = first_row(); row < a.rows; row += row_step()) {
    const P* owner = reinterpret_cast<const P*>(a.buffers[row % a.world]) + row * n;
    add_norm_row<T, W>(a, row, [&](int i) { return owner[i]; });
  }
  block_barrier(a.signals, a.rank, a.world);
}

}  // namespace compile_ops
