// FP8 KV-cache element conversions (vLLM's semantics): a write stores fp8(x / scale) with an IEEE
// float32 division, saturated to the largest finite value and rounded to nearest even; a read
// returns float(code) * scale. kAuto is a plain copy (the cache has the model dtype).
#pragma once

#include <cuda_fp8.h>

#include "compile_ops/vec.cuh"

namespace compile_ops {

// Must match compile_ops/cache.py:_KV_KIND.
enum KvKind : int { kKvAuto = 0, kKvE4M3 = 1, kKvE5M2 = 2 };

template <int KV>
constexpr __nv_fp8_interpretation_t fp8_interp() {
  return KV == kKvE5M2 ? __NV_E5M2 : __NV_E4M3;
}

template <int KV>
__device__ __forceinline__ uint8_t fp8_encode(float x, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, fp8_interp<KV>()));
}

template <int KV>
__device__ __forceinline__ float fp8_decode(uint8_t code, float scale) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code),
                                               fp8_interp<KV>());
  return __half2float(__half(h)) * scale;
}

// One element from the model dtype T into the cache type C (T itself for kAuto, uint8 for FP8).
template <int KV, typename C, typename T>
__device__ __forceinline__ C cache_encode(T v, float scale) {
  if constexpr (KV == kKvAuto) {
    return v;
  } else {
    return fp8_encode<KV>(to_float(v), scale);
  }
}

// One element from the cache type C back into T.
template <int KV, typename T, typename C>
__device__ __forceinline__ T cache_decode(C v, float scale) {
  if constexpr (KV == kKvAuto) {
    return v;
  } else {
    return from_float<T>(fp8_decode<KV>(v, scale));
  }
}

}  // namespace compile_ops
