// Launch of the split-KV decode attention kernels for one query type and cache kind (included by
// decode_attention_{bf16,f16}_kv{0,1,2}.cu, which instantiate it: the six parts of the kernel
// table compile in parallel).
#pragma once

// Kept free of torch's headers (c10's exception macros only): each of the six files compiles in
// a fraction of the time a torch include costs.
#include "compile_ops/decode_attention.cuh"
#include "decode_attention.h"
#if defined(COMPILE_OPS_EMULATE)
#include "launch_utils.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "compile_ops/launch.cuh"
#endif

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
      return paged_decode_kernel<QT, KV, D>;
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
  static void launch(const Args& a, dim3 grid, cudaStream_t stream, bool pdl) {
    prepare();
#if defined(COMPILE_OPS_EMULATE)
    (void)pdl;
    launch_kernel(fn(), grid, dim3(kThreads), stream, 0, a);
#else
    C10_CUDA_CHECK(launch_ex(fn(), grid, dim3(kThreads), kSmem, stream, pdl, a));
#endif
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
void launch_one(const Args& a, dim3 grid, cudaStream_t stream, bool pdl) {
  TORCH_CHECK(a.group <= 8 || a.sub == 0, "paged decode attention: warp partials need GQA "
              "groups of at most 8 query heads");
  if (a.group > 8)
    Kernel<QT, KV, D, false, false>::launch(a, grid, stream, pdl);
  else if (a.sub > 0)
    Kernel<QT, KV, D, true, true>::launch(a, grid, stream, pdl);
  else
    Kernel<QT, KV, D, true, false>::launch(a, grid, stream, pdl);
}

template <typename QT, int KV, int D>
int blocks_per_sm_one() {  // of the narrow kernel (GQA groups <= 8), without warp partials
  static const int n = Kernel<QT, KV, D, true, false>::blocks_per_sm();
  return n;
}

// Calls f.template operator()<D>() for the runtime head size; false if not compiled.
template <typename F>
bool dispatch_head(int head, const F& f) {
  switch (head) {
    case 32: f.template operator()<32>(); return true;
    case 64: f.template operator()<64>(); return true;
    case 80: f.template operator()<80>(); return true;
    case 96: f.template operator()<96>(); return true;
    case 112: f.template operator()<112>(); return true;
    case 128: f.template operator()<128>(); return true;
    case 192: f.template operator()<192>(); return true;
    case 256: f.template operator()<256>(); return true;
    default: return false;
  }
}

template <typename QT, int KV>
struct Launcher {
  const Args& a;
  dim3 grid;
  cudaStream_t stream;
  bool pdl;
  template <int D>
  void operator()() const {
    launch_one<QT, KV, D>(a, grid, stream, pdl);
  }
};
template <typename QT, int KV>
struct Occupancy {
  int* n;
  template <int D>
  void operator()() const {
    *n = blocks_per_sm_one<QT, KV, D>();
  }
};

template <typename QT, int KV>
void launch_paged_decode(const Args& a, int head, dim3 grid, cudaStream_t stream, bool pdl) {
  const bool ok = dispatch_head(head, Launcher<QT, KV>{a, grid, stream, pdl});
  TORCH_CHECK(ok, "paged decode attention: no kernel for head size ", head);
}

template <typename QT, int KV>
int paged_decode_blocks_per_sm(int head) {
  int n = 0;
  dispatch_head(head, Occupancy<QT, KV>{&n});
  return n;
}

}  // namespace decode
}  // namespace compile_ops
