// COMPILE_OPS_EMULATE: compile the launchers and kernels with a host C++ compiler and run every
// CUDA thread of a launch one after another on the CPU (tests/emulated). Only kernels whose
// threads never talk to each other (no __syncthreads, shuffles or shared memory) are emulated:
// then a sequential order is one valid schedule, and index math, bounds checks, vector widths,
// alignment choices and conversions are exercised exactly as written, without a GPU.
#pragma once

#if defined(__CUDACC__)
#error "COMPILE_OPS_EMULATE is for host C++ compilers (tests/emulated), not nvcc"
#endif

// Everything that may spell these names as identifiers comes in before the macros below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <torch/all.h>
#include <vector_types.h>

#include <cstdint>
#include <string>

#include <array>
#include <barrier>
#include <cmath>
#include <cstring>
#include <stdexcept>

// Two schedules. Sequential (the default): the threads of a launch run one after another on the
// calling thread; kernels whose threads never talk to each other. Cooperative (set_cooperative):
// each CTA runs its threads as OS threads at once, __syncthreads is a barrier of the CTA, warp
// shuffles exchange through a barrier of the warp, __shared__ variables are one static instance
// (CTAs run one after another). A thread that returns drops out of both barriers, as an exited
// CUDA thread does. Slow (OS threads), so tests use small grids.
namespace compile_ops::emu {
inline thread_local dim3 thread_idx;
inline dim3 block_idx, block_dim, grid_dim;
inline bool cooperative = false;

struct Warp {
  explicit Warp(std::ptrdiff_t n) : bar(n) {}
  std::barrier<> bar;
  std::array<uint64_t, 32> slot{};
};
inline thread_local std::barrier<>* cta_bar = nullptr;
inline thread_local Warp* warp = nullptr;

[[noreturn]] inline void needs_cooperative(const char* what) {
  throw std::runtime_error(std::string(what) +
                           " in a kernel emulated sequentially: call set_cooperative(True)");
}
}  // namespace compile_ops::emu

#define threadIdx (::compile_ops::emu::thread_idx)
#define blockIdx (::compile_ops::emu::block_idx)
#define blockDim (::compile_ops::emu::block_dim)
#define gridDim (::compile_ops::emu::grid_dim)

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline void __syncthreads() {
  if (!::compile_ops::emu::cta_bar) ::compile_ops::emu::needs_cooperative("__syncthreads");
  ::compile_ops::emu::cta_bar->arrive_and_wait();
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  auto* w = ::compile_ops::emu::warp;
  if (!w) ::compile_ops::emu::needs_cooperative("__shfl_xor_sync");
  const int lane = static_cast<int>(threadIdx.x % 32);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slot[lane] = bits;
  w->bar.arrive_and_wait();
  const int src = (lane ^ lane_mask) < width ? (lane ^ lane_mask) : lane;
  T r;
  std::memcpy(&r, &w->slot[src], sizeof(T));
  w->bar.arrive_and_wait();
  return r;
}

// Lane `src(lane)`'s value (its own when src is out of range), through the warp's slots.
template <typename T, typename Src>
inline T emulated_shuffle(T v, Src src_of, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  auto* w = ::compile_ops::emu::warp;
  if (!w) ::compile_ops::emu::needs_cooperative(what);
  const int lane = static_cast<int>(threadIdx.x % 32);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slot[lane] = bits;
  w->bar.arrive_and_wait();
  const int src = src_of(lane);
  T r;
  std::memcpy(&r, &w->slot[src >= 0 && src < 32 ? src : lane], sizeof(T));
  w->bar.arrive_and_wait();
  return r;
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  return emulated_shuffle(v, [&](int lane) { return (lane / width) * width + src_lane % width; },
                          "__shfl_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return emulated_shuffle(
      v, [&](int lane) { return lane % width >= static_cast<int>(delta) ? lane - delta : lane; },
      "__shfl_up_sync");
}
inline void __syncwarp(unsigned = 0xffffffffu) { (void)__shfl_sync(0xffffffffu, 0, 0); }
inline unsigned __ballot_sync(unsigned, int p) {
  auto* w = ::compile_ops::emu::warp;
  if (!w) ::compile_ops::emu::needs_cooperative("__ballot_sync");
  const int lane = static_cast<int>(threadIdx.x % 32);
  w->slot[lane] = p ? 1 : 0;
  w->bar.arrive_and_wait();
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= static_cast<unsigned>(w->slot[i] & 1) << i;
  w->bar.arrive_and_wait();
  return r;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Round-to-nearest float32 arithmetic, one rounding per operation (the host compiler is not asked
// to contract these: no FMA target flags in tests/emulated).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
