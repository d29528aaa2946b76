// Activation quantization helpers shared by the quant, norm + quant and activation + quant
// kernels (vLLM's numerics: csrc/quantization/w8a8/fp8/common.cuh and fused_kernels/
// quant_conversions.cuh). Device code only.
//
//   FP8 (float8_e4m3fn): clamp to [-448, 448] as fmaxf(-448, fminf(v, 448)) -- a NaN becomes
//   +448, as in vLLM's kernels -- then round to nearest even (saturating, which the clamp makes
//   moot). per_token_group_fp8_quant clamps the other way round (NaN -> -448 there).
//   INT8: round half to even, saturate to [-128, 127], NaN -> 0 (PTX cvt.rni.sat.s8.f32).
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "compile_ops/vec.cuh"

namespace compile_ops {

constexpr float kFp8E4M3Max = 448.f;
// vLLM's min_scaling_factor: dynamic FP8 scales are at least 1 / (448 * 512).
constexpr float kFp8MinScale = 1.f / (448.f * 512.f);
constexpr float kInt8Max = 127.f;
// ... and INT8 scales at least FLT_EPSILON.
constexpr float kInt8MinScale = 1.1920928955078125e-07f;

// fp32 -> e4m3fn code, vLLM's clamp order (NaN -> +448).
__device__ __forceinline__ uint8_t fp8_e4m3_clamped(float v) {
  v = fmaxf(-kFp8E4M3Max, fminf(v, kFp8E4M3Max));
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// fp32 -> int8, round half to even, saturating, NaN -> 0.
__device__ __forceinline__ int8_t int8_rn_sat(float v) {
#if defined(COMPILE_OPS_EMULATE)
  if (v != v) return 0;
  const float r = std::nearbyint(fmaxf(-128.f, fminf(v, 127.f)));  // default mode: half to even
  return static_cast<int8_t>(r);
#else
  int16_t r;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=h"(r) : "f"(v));
  return static_cast<int8_t>(r);
#endif
}

}  // namespace compile_ops
