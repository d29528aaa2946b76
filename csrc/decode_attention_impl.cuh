// Launch of the split-KV decode attention kernel for one query type (included by
// decode_attention_bf16.cu and decode_attention_f16.cu, which instantiate it: the two halves of
// the kernel table compile in parallel).
#pragma once

#include "compile_ops/decode_attention.cuh"
#include "decode_attention.h"
#include "launch_utils.h"

namespace compile_ops {
namespace decode {

// The kernel of a call: narrow (GQA groups of up to 8 query heads; warp partials or not) or
// wide (larger groups, 16 heads per slice).
template <typename QT, int KV, int D, bool NARROW, bool WP>
struct Kernel {
  static constexpr int kSmem =
      NARROW ? Smem<D, KV == 0 ? 2 : 1, KV == 0 ? 98304 : 57344>::kBytes
             : Smem<D, KV == 0 ? 2 : 1>::kBytes;
  static void (*fn())(const Args) {
    if constexpr (NARROW)
      return paged_decode_narrow<QT, KV, D, WP>;
    else
      return paged_decode_kernel<QT, KV, D, false>;
  }
  static void prepare() {
#if !defined(COMPILE_OPS_EMULATE)
    static bool attr_set = [] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(fn(), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kSmem));
      return true;
    }();
    (void)attr_set;
#endif
  }
  static void launch(const Args& a, dim3 grid, cudaStream_t stream, int dev) {
    prepare();
    launch_kernel_smem(fn(), grid, dim3(kThreads), kSmem, stream, dev, a);
  }
  static int blocks_per_sm() {
#if defined(COMPILE_OPS_EMULATE)
    return 2;
#else
    prepare();
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, fn(), kThreads, kSmem));
    return b;
#endif
  }
};

template <typename QT, int KV, int D>
void launch_one(const Args& a, dim3 grid, cudaStream_t stream, int dev) {
  TORCH_CHECK(a.group <= 8 || a.sub == 0, "paged decode attention: warp partials need GQA "
              "groups of at most 8 query heads");
  if (a.group > 8)
    Kernel<QT, KV, D, false, false>::launch(a, grid, stream, dev);
  else if (a.sub > 0)
    Kernel<QT, KV, D, true, true>::launch(a, grid, stream, dev);
  else
    Kernel<QT, KV, D, true, false>::launch(a, grid, stream, dev);
}

template <typename QT, int KV, int D>
int blocks_per_sm_one() {  // of the narrow kernel (GQA groups <= 8), without warp partials
  static const int n = Kernel<QT, KV, D, true, false>::blocks_per_sm();
  return n;
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
