// Split-KV decode attention kernels for __nv_bfloat16 queries over e5m2 caches (see
// compile_ops/decode_attention.cuh).
#include "decode_attention_impl.cuh"

namespace compile_ops {
namespace decode {
template void launch_paged_decode<__nv_bfloat16, 2>(const Args&, int, dim3, cudaStream_t, bool);
template int paged_decode_blocks_per_sm<__nv_bfloat16, 2>(int);
}  // namespace decode
}  // namespace compile_ops
