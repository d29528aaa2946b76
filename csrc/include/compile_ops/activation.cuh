// Gated activation kernels: out[..., j] = f(x[..., j], x[..., d + j]) (or interleaved pairs).
// Device code only: no torch headers, raw pointers, int64 row offsets.
// Rounding matches compile_ops/activation.py: act in fp32 -> dtype, then the multiply -> dtype;
// swigluoai wholly in fp32, one rounding.
#pragma once

#include "compile_ops/vec.cuh"

namespace compile_ops {

enum ActKind : int { kSiluMul = 0, kMulSilu = 1, kGeluMul = 2, kGeluTanhMul = 3, kFatreluMul = 4 };

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu_f(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}
// PyTorch's CUDA formula and operation order (ATen's GeluCUDAKernelImpl, float opmath):
// x_cube = x * x * x; inner = beta * (x + kappa * x_cube), where nvcc's default contraction
// (-fmad=true, how PyTorch is built) fuses `x + kappa * x_cube` into one FMA. Spelled out with
// explicitly rounded intrinsics so the result does not depend on this file's compiler flags:
// float32 output is bit-equal to torch's CUDA `gelu(x, approximate="tanh")` (tested on the GPU).
__device__ __forceinline__ float gelu_tanh_f(float x) {
  const float beta = 0.79788456080286535588f;  // sqrt(2 / pi), M_SQRT2 * M_2_SQRTPI * 0.5
  const float kappa = 0.044715f;
  const float x_cube = __fmul_rn(__fmul_rn(x, x), x);
  const float inner = __fmul_rn(beta, __fmaf_rn(kappa, x_cube, x));
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanhf(inner)));
}

template <int KIND, typename T>
__device__ __forceinline__ T act_and_mul(T a, T b, float threshold) {
  if constexpr (KIND == kMulSilu) {
    return from_float<T>(to_float(a) * to_float(from_float<T>(silu_f(to_float(b)))));
  } else {
    const float x = to_float(a);
    float act;
    if constexpr (KIND == kSiluMul) act = silu_f(x);
    else if constexpr (KIND == kGeluMul) act = gelu_f(x);
    else if constexpr (KIND == kGeluTanhMul) act = gelu_tanh_f(x);
    else act = x > threshold ? x : 0.0f;  // kFatreluMul
    return from_float<T>(to_float(from_float<T>(act)) * to_float(b));
  }
}

// One row per blockIdx.x, packs of W elements along the row over blockIdx.y * blockDim.x.
template <int KIND, typename T, int W>
__global__ void act_and_mul_kernel(T* __restrict__ out, int64_t out_stride,
                                   const T* __restrict__ in, int64_t in_stride, int d,
                                   float threshold) {
  using P = Pack<T, W>;
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= d / W) return;
  const T* x = in + row * in_stride;
  const P a = reinterpret_cast<const P*>(x)[i];
  const P b = reinterpret_cast<const P*>(x + d)[i];
  P o;
#pragma unroll
  for (int j = 0; j < W; ++j) o.v[j] = act_and_mul<KIND>(a.v[j], b.v[j], threshold);
  reinterpret_cast<P*>(out + row * out_stride)[i] = o;
}

__device__ __forceinline__ float swigluoai_f(float gate, float up, float alpha, float limit) {
  const float g = fminf(gate, limit);
  const float u = fmaxf(fminf(up, limit), -limit);
  return (u + 1.0f) * (g / (1.0f + expf(-alpha * g)));
}

// Interleaved [gate0, up0, gate1, up1, ...]: each thread reads 2*H elements and writes H.
template <typename T, int H>
__global__ void swigluoai_and_mul_kernel(T* __restrict__ out, int64_t out_stride,
                                         const T* __restrict__ in, int64_t in_stride, int d,
                                         float alpha, float limit) {
  using PIn = Pack<T, 2 * H>;
  using POut = Pack<T, H>;
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= d / H) return;
  const T* x_row = in + row * in_stride;
  PIn x;
  if constexpr (H == 1) {  // any alignment: two element loads
    x.v[0] = x_row[2 * i];
    x.v[1] = x_row[2 * i + 1];
  } else {
    x = reinterpret_cast<const PIn*>(x_row)[i];
  }
  POut o;
#pragma unroll
  for (int j = 0; j < H; ++j)
    o.v[j] = from_float<T>(swigluoai_f(to_float(x.v[2 * j]), to_float(x.v[2 * j + 1]), alpha,
                                       limit));
  reinterpret_cast<POut*>(out + row * out_stride)[i] = o;
}

}  // namespace compile_ops
