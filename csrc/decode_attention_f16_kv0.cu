// Split-KV decode attention kernels for __half queries over 16-bit caches (see
// compile_ops/decode_attention.cuh).
#include "decode_attention_impl.cuh"

namespace compile_ops {
namespace decode {
template void launch_paged_decode<__half, 0>(const Args&, int, dim3, cudaStream_t, bool);
template int paged_decode_blocks_per_sm<__half, 0>(int);
}  // namespace decode
}  // namespace compile_ops
