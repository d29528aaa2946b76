// The launch plan of the RMSNorm kernels (rms_norm, fused_add_rms_norm(_out) and the norm + quant
// ops share it, so their sums of squares are accumulated in the same order and the normalized
// values agree bit for bit on rows of the same layout). Host code.
#pragma once

#include <cstdint>

#include "compile_ops/norm.cuh"
#include "launch_utils.h"

namespace compile_ops {

// Rows handled by one block when a single warp owns a row.
constexpr int kWarpRowsPerBlock = 4;
static_assert(32 * kWarpRowsPerBlock <= kRegKernelThreads, "warp-row blocks exceed the launch bound");
// Rows of up to this many packs go to one warp; longer rows get a block of threads.
constexpr int kMaxPacksPerWarpRow = 32 * 8;
// Threads per row for long rows (the register-cached kernel's launch bound). Rows longer than
// 8 packs x 256 threads (16384 bf16/fp16 elements, 8192 fp32, 2048 unaligned) use the two-pass
// kernel: holding them in registers would need more threads, capping registers at 64 and spilling.
constexpr int kMaxRowThreads = kRegKernelThreads;

// Smallest packs-per-thread V in {1, 2, 4, 8} with ceil(n / V) <= limit, or 0 if none.
inline int pick_packs_per_thread(int64_t n, int64_t limit) {
  for (int v = 1; v <= 8; v *= 2)
    if (ceil_div(n, v) <= limit) return v;
  return 0;
}

// Grid and packs-per-thread for rows of n packs (v == 0: too long for the register kernels).
struct RowPlan {
  dim3 grid, block;
  int v;
};

inline RowPlan plan_rows(int64_t n, int64_t rows) {
  RowPlan p;
  if (n <= kMaxPacksPerWarpRow) {
    p.v = pick_packs_per_thread(n, 32);
    p.block = dim3(32, kWarpRowsPerBlock);
    p.grid = dim3(static_cast<unsigned>(ceil_div(rows, kWarpRowsPerBlock)));
  } else {
    p.v = pick_packs_per_thread(n, kMaxRowThreads);
    const int64_t threads = p.v ? ceil_div(ceil_div(n, p.v), 32) * 32 : 0;
    p.block = dim3(static_cast<unsigned>(threads));
    p.grid = dim3(static_cast<unsigned>(rows));
  }
  return p;
}

// Kernel<V> for V in {1, 2, 4, 8}; false when the plan has no register variant.
template <template <int> class Kernel, typename... Args>
bool launch_by_packs(const RowPlan& p, cudaStream_t stream, int dev, Args... args) {
  switch (p.v) {
    case 1: launch_kernel(Kernel<1>::fn, p.grid, p.block, stream, dev, args...); return true;
    case 2: launch_kernel(Kernel<2>::fn, p.grid, p.block, stream, dev, args...); return true;
    case 4: launch_kernel(Kernel<4>::fn, p.grid, p.block, stream, dev, args...); return true;
    case 8: launch_kernel(Kernel<8>::fn, p.grid, p.block, stream, dev, args...); return true;
    default: return false;
  }
}

}  // namespace compile_ops
