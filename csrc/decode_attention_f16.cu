// Split-KV decode attention kernels for __half queries (see compile_ops/decode_attention.cuh).
#include "decode_attention_impl.cuh"

namespace compile_ops {
namespace decode {
template void launch_paged_decode<__half>(const Args&, int, int, dim3, cudaStream_t, int);
template int paged_decode_blocks_per_sm<__half>(int, int);
}  // namespace decode
}  // namespace compile_ops
