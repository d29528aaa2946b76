// Launcher for rotary_embedding: checks, device guard, current stream, dispatch over the query
// dtype, the cache dtype (float32 or the query dtype), the position dtype and the style.
#include <torch/all.h>

#include <algorithm>
#include <tuple>
#include <optional>

#include "compile_ops/rotary.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

constexpr const char* kOp = "rotary_embedding";


template <typename T, typename CacheT, typename PosT>
void launch(const at::Tensor& positions, const Heads& q, const Heads* k,
            const at::Tensor& cache, int head_size, bool is_neox) {
  const int rot_dim = static_cast<int>(cache.size(1));
  const int half = rot_dim / 2;
  const auto stream = current_stream();
  const int dev = positions.get_device();
  constexpr int W = kVecWidth<T>;
  // 128-bit path: every head start, the NeoX split (half) or GPT-J's pair groups W-aligned.
  const bool vec = (is_neox ? half % W == 0 : rot_dim % W == 0) && head_size % W == 0 &&
                   q.token_stride % W == 0 && is_aligned(q.ptr, 16) &&
                   (!k || (k->token_stride % W == 0 && is_aligned(k->ptr, 16)));
  if (vec) {
    const int heads = q.heads + (k ? k->heads : 0);
    const int64_t items = static_cast<int64_t>((is_neox ? half : rot_dim) / W) * heads;
    const dim3 grid(static_cast<unsigned>(positions.numel())),
        block(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, 32) * 32, 32, 256)));
    auto args = std::make_tuple(positions.data_ptr<PosT>(), static_cast<T*>(q.ptr),
                                q.token_stride, q.heads,
                                k ? static_cast<T*>(k->ptr) : static_cast<T*>(nullptr),
                                k ? k->token_stride : int64_t(0), k ? k->heads : 0,
                                static_cast<const CacheT*>(cache.data_ptr()), cache.size(0),
                                rot_dim, head_size);
    auto go = [&](auto kernel) {
      std::apply([&](auto... a) { launch_kernel(kernel, grid, block, stream, dev, a...); }, args);
    };
    if (is_neox)
      go(rotary_embedding_vec_kernel<T, CacheT, PosT, true>);
    else
      go(rotary_embedding_vec_kernel<T, CacheT, PosT, false>);
    return;
  }
  const int bx = std::min(128, static_cast<int>(ceil_div(half, 32) * 32));
  const int by = std::max(1, std::min(256 / bx, q.heads + (k ? k->heads : 0)));
  const dim3 grid(static_cast<unsigned>(positions.numel())), block(bx, by);
  auto* pos = positions.data_ptr<PosT>();
  auto* qp = static_cast<T*>(q.ptr);
  auto* kp = k ? static_cast<T*>(k->ptr) : nullptr;
  const int64_t ks = k ? k->token_stride : 0;
  const int nk = k ? k->heads : 0;
  auto* cp = static_cast<const CacheT*>(cache.data_ptr());
  if (is_neox)
    launch_kernel(rotary_embedding_kernel<T, CacheT, PosT, true>, grid, block, stream, dev, pos,
                  qp, q.token_stride, q.heads, kp, ks, nk, cp, cache.size(0), rot_dim, head_size);
  else
    launch_kernel(rotary_embedding_kernel<T, CacheT, PosT, false>, grid, block, stream, dev, pos,
                  qp, q.token_stride, q.heads, kp, ks, nk, cp, cache.size(0), rot_dim, head_size);
}

template <typename T, typename CacheT>
void dispatch_pos(const at::Tensor& positions, const Heads& q, const Heads* k,
                  const at::Tensor& cache, int head_size, bool is_neox) {
  if (positions.scalar_type() == at::kLong)
    launch<T, CacheT, int64_t>(positions, q, k, cache, head_size, is_neox);
  else
    launch<T, CacheT, int32_t>(positions, q, k, cache, head_size, is_neox);
}

template <typename T>
void dispatch_cache(const at::Tensor& positions, const Heads& q, const Heads* k,
                    const at::Tensor& cache, int head_size, bool is_neox) {
  if (cache.scalar_type() == at::kFloat)
    dispatch_pos<T, float>(positions, q, k, cache, head_size, is_neox);
  else
    dispatch_pos<T, T>(positions, q, k, cache, head_size, is_neox);
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox) {
  check_float_type(kOp, "query", query);
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, kOp,
              ": positions must be int64 or int32");
  check_same_device(kOp, "positions", positions, query);
  check_same_device(kOp, "cos_sin_cache", cos_sin_cache, query);
  check_same_device(kOp, "query", query, query);
  TORCH_CHECK(positions.is_contiguous(), kOp, ": positions must be contiguous");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat ||
                  cos_sin_cache.scalar_type() == query.scalar_type(),
              kOp, ": cos_sin_cache must be float32 or the query dtype");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(), kOp,
              ": cos_sin_cache must be a contiguous [max_position, rot_dim] tensor");
  TORCH_CHECK(head_size > 0 && head_size <= std::numeric_limits<int>::max(), kOp,
              ": bad head_size");
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size, kOp,
              ": rot_dim must be even, > 0 and <= head_size");
  TORCH_CHECK(positions.numel() <= std::numeric_limits<int>::max(), kOp, ": too many tokens");
  const Heads q = heads_view(kOp, "query", query, positions, head_size);
  Heads k;
  if (key.has_value()) {
    check_same_type(kOp, "key", *key, query);
    check_same_device(kOp, "key", *key, query);
    k = heads_view(kOp, "key", *key, positions, head_size);
  }
  if (positions.numel() == 0) return;
  const DeviceGuard guard(query.device());
  const Heads* kp = key.has_value() ? &k : nullptr;
  const int hs = static_cast<int>(head_size);
  switch (query.scalar_type()) {
    case at::kFloat: dispatch_cache<float>(positions, q, kp, cos_sin_cache, hs, is_neox); break;
    case at::kHalf: dispatch_cache<__half>(positions, q, kp, cos_sin_cache, hs, is_neox); break;
    case at::kBFloat16:
      dispatch_cache<__nv_bfloat16>(positions, q, kp, cos_sin_cache, hs, is_neox);
      break;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype");
  }
}

}  // namespace compile_ops
