// argmax over the last dimension of [rows, n] (greedy sampling over a vocabulary): the index of
// the first maximum, NaN counting as larger than every number (torch.argmax's rules).
// Device code only: no torch headers, raw pointers, int64 indexing.
//
// A long row is cut into `splits` chunks, one CTA each (a 128k-entry vocabulary read by a single
// CTA is latency-bound: ~29 us on an H200 for 256 KB); each CTA reduces its chunk to one key and,
// with more than one split, argmax_merge_kernel reduces a row's keys.
#pragma once

#include "compile_ops/vec.cuh"

namespace compile_ops {

constexpr int kArgmaxThreads = 256;

// (value, index) as one integer whose unsigned order is argmax's order: the high word orders the
// values (sign-magnitude to two's-order; NaN, any sign, above +inf; -0 folded into +0, which
// compare equal), the low word is ~index so that of equal values the first index is larger.
// 0 is below every key (it would need a NaN high word and index 2^32 - 1): the empty key.
__device__ __forceinline__ uint64_t argmax_key(float v, int64_t i) {
  uint32_t o;
  if (v != v) {
    o = 0xFFFFFFFFu;
  } else {
    const uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
    o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(o) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

__device__ __forceinline__ int64_t argmax_index(uint64_t key) {
  return static_cast<int64_t>(static_cast<uint32_t>(~static_cast<uint32_t>(key)));
}

__device__ __forceinline__ uint64_t warp_max_key(uint64_t k) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t t = __shfl_xor_sync(0xffffffffu, k, o);
    k = t > k ? t : k;
  }
  return k;
}

// A thread's running best over increasing indices: a later element replaces it only when it is
// strictly larger, or a NaN replacing a number (so ties and later NaNs keep the first).
struct ArgmaxBest {
  float v = 0.0f;
  int64_t i = -1;
  __device__ __forceinline__ void add(float x, int64_t j) {
    if (i < 0 || x > v || (x != x && v == v)) {
      v = x;
      i = j;
    }
  }
};

// grid (rows, splits); CTA (row, s) reads elements [s * chunk, min(n, (s + 1) * chunk)) of its
// row (chunk a multiple of W; W > 1 only when every row is 16-byte aligned), U packs in flight
// per thread. One split writes out[row]; more write their key to partial[row * splits + s].
template <typename T, int W, int U>
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(const T* __restrict__ x, int64_t row_stride, int64_t n, int64_t chunk,
                  uint64_t* __restrict__ partial, int64_t* __restrict__ out) {
  __shared__ uint64_t warp_keys[kArgmaxThreads / 32];
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y, splits = gridDim.y;
  const T* xr = x + row * row_stride;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const int64_t packs = (end - begin) / W;
  const int tid = threadIdx.x, nt = blockDim.x;
  ArgmaxBest best;
  for (int64_t p0 = tid; p0 < packs; p0 += int64_t(nt) * U) {
    Pack<T, W> in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = p0 + int64_t(u) * nt;
      if (p < packs) in[u] = *reinterpret_cast<const Pack<T, W>*>(xr + begin + p * W);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = p0 + int64_t(u) * nt;
      if (p >= packs) break;
#pragma unroll
      for (int w = 0; w < W; ++w) best.add(to_float(in[u].v[w]), begin + p * W + w);
    }
  }
  // the last split's tail (< W elements): indices above all of this thread's others
  const int64_t tail = begin + packs * W + tid;
  if (tail < end) best.add(to_float(xr[tail]), tail);

  uint64_t key = warp_max_key(best.i < 0 ? 0 : argmax_key(best.v, best.i));
  if ((tid & 31) == 0) warp_keys[tid >> 5] = key;
  __syncthreads();
  if (tid < 32) {
    key = tid < (nt >> 5) ? warp_keys[tid] : 0;
    key = warp_max_key(key);
    if (tid == 0) {
      if (splits == 1) out[row] = argmax_index(key);
      else partial[row * splits + split] = key;
    }
  }
}

// One warp per row: the largest of the row's split keys.
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_merge_kernel(const uint64_t* __restrict__ partial, int splits, int64_t rows,
                        int64_t* __restrict__ out) {
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps: every lane of a warp has the same row
  uint64_t k = 0;
  for (int s = lane; s < splits; s += 32) {
    const uint64_t t = partial[row * splits + s];
    k = t > k ? t : k;
  }
  k = warp_max_key(k);
  if (lane == 0) out[row] = argmax_index(k);
}

}  // namespace compile_ops
