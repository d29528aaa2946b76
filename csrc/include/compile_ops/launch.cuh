// The one kernel launch of the CUDA build (no torch headers: the decode attention's kernel tables
// include it without them): cudaLaunchKernelEx with `smem` bytes of dynamic shared memory and,
// when `pdl`, programmatic stream serialization (the kernel waits with griddepcontrol.wait before
// its first global access, vec.cuh's pdl_wait).
#pragma once

#include <cuda_runtime.h>

namespace compile_ops {

template <typename... Params, typename... Args>
cudaError_t launch_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace compile_ops
