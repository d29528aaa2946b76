// Scalar conversions and packed vector types shared by all kernels.
// Device code only: no torch headers, raw pointers, int64 indexing.
#pragma once

#include <cstdint>
#if defined(COMPILE_OPS_EMULATE)
#include "compile_ops/emulate.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace compile_ops {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// W consecutive elements moved as one access. With W * sizeof(T) == 16 the alignment makes the
// compiler emit a single 128-bit load/store; W == 1 is the plain scalar path for unaligned rows.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// Elements per 128-bit access.
template <typename T>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(T));

// Programmatic dependent launch. Every kernel calls pdl_wait() before its first global memory
// access (the previous grid on the stream may still be running when it starts), and may call
// pdl_launch_dependents() once its remaining work no longer needs the SM slots to itself.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace compile_ops
