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

namespace compile_ops::emu {
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
}  // namespace compile_ops::emu

#define threadIdx (::compile_ops::emu::thread_idx)
#define blockIdx (::compile_ops::emu::block_idx)
#define blockDim (::compile_ops::emu::block_dim)
#define gridDim (::compile_ops::emu::grid_dim)
