// Launch of the split-KV decode attention kernel for one query type (included by
// decode_attention_bf16.cu and decode_attention_f16.cu, which instantiate it: the two halves of
// the kernel table compile in parallel).
#pragma once

#include "compile_ops/decode_attention.cuh"
#include "decode_attention.h"
#include "launch_utils.h"

namespace compile_ops {
namespace decode {

template <typename QT, int KV, int D, bool WP>
void launch_mode(const Args& a, dim3 grid, cudaStream_t stream, int dev) {
  constexpr int smem = Smem<D, KV == 0 ? 2 : 1>::kBytes;
#if !defined(COMPILE_OPS_EMULATE)
  static bool attr_set = [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(paged_decode_kernel<QT, KV, D, WP>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)attr_set;
#endif
  launch_kernel_smem(paged_decode_kernel<QT, KV, D, WP>, grid, dim3(kThreads), smem, stream,
                     dev, a);
}

template <typename QT, int KV, int D>
void launch_one(const Args& a, dim3 grid, cudaStream_t stream, int dev) {
  if (a.sub > 0)
    launch_mode<QT, KV, D, true>(a, grid, stream, dev);
  else
    launch_mode<QT, KV, D, false>(a, grid, stream, dev);
}

template <typename QT, int KV, int D>
int blocks_per_sm_one() {
  constexpr int smem = Smem<D, KV == 0 ? 2 : 1>::kBytes;
#if defined(COMPILE_OPS_EMULATE)
  return 2;
#else
  static const int n = [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(paged_decode_kernel<QT, KV, D, false>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &b, paged_decode_kernel<QT, KV, D, false>, kThreads, smem));
    return b;
  }();
  return n;
#endif
}

// Calls f.template operator()<KV, D>() for the runtime (kv, head); false if not compiled.
template <typename F>
bool dispatch(int kv, int head, const F& f) {
  auto by_head = [&](auto kvc) {
    constexpr int KV = decltype(kvc)::value;
    switch (head) {
      case 32: f.template operator()<KV, 32>(); return true;
      case 64: f.template operator()<KV, 64>(); return true;
      case 80: f.template operator()<KV, 80>(); return true;
      case 96: f.template operator()<KV, 96>(); return true;
      case 112: f.template operator()<KV, 112>(); return true;
      case 128: f.template operator()<KV, 128>(); return true;
      case 192: f.template operator()<KV, 192>(); return true;
      case 256: f.template operator()<KV, 256>(); return true;
      default: return false;
    }
  };
  switch (kv) {
    case 0: return by_head(std::integral_constant<int, 0>{});
    case 1: return by_head(std::integral_constant<int, 1>{});
    case 2: return by_head(std::integral_constant<int, 2>{});
    default: return false;
  }
}

template <typename QT>
struct Launcher {
  const Args& a;
  dim3 grid;
  cudaStream_t stream;
  int dev;
  template <int KV, int D>
  void operator()() const {
    launch_one<QT, KV, D>(a, grid, stream, dev);
  }
};
template <typename QT>
struct Occupancy {
  int* n;
  template <int KV, int D>
  void operator()() const {
    *n = blocks_per_sm_one<QT, KV, D>();
  }
};

template <typename QT>
void launch_paged_decode(const Args& a, int kv, int head, dim3 grid, cudaStream_t stream,
                         int dev) {
  const bool ok = dispatch(kv, head, Launcher<QT>{a, grid, stream, dev});
  TORCH_CHECK(ok, "paged decode attention: no kernel for head size ", head, ", cache kind ", kv);
}

template <typename QT>
int paged_decode_blocks_per_sm(int kv, int head) {
  int n = 0;
  dispatch(kv, head, Occupancy<QT>{&n});
  return n;
}

}  // namespace decode
}  // namespace compile_ops
