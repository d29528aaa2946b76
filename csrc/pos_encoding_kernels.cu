// Launcher for rotary_embedding: checks, device guard, current stream, dispatch over the query
// dtype, the cache dtype (float32 or the query dtype), the position dtype, the style and the
// instantiation (packed heads + forward: the packed kernels; strided heads or inverse: the
// general ones). rope_dim_offset only moves the base pointers.
#include <torch/all.h>

#include <algorithm>
#include <tuple>
#include <optional>

#include "compile_ops/rotary.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

constexpr const char* kOp = "rotary_embedding";


// One rotary_embedding call, resolved: the heads' pointers already moved to the first rotary
// dim (rope_dim_offset), so the kernels see rotary dims [0, rot_dim) of each head.
struct Call {
  const at::Tensor* positions;
  const at::Tensor* cache;
  Heads q;
  Heads k;  // k.heads == 0 and k.ptr == nullptr without a key (q likewise without heads)
  int head_size;
  bool is_neox;
  bool inverse;
};

template <typename T, typename CacheT, typename PosT, bool NEOX, bool GENERAL>
void launch_style(const Call& a) {
  const int rot_dim = static_cast<int>(a.cache->size(1));
  const int half = rot_dim / 2;
  const auto stream = current_stream();
  const int dev = a.positions->get_device();
  constexpr int W = kVecWidth<T>;
  const Heads& q = a.q;
  const Heads& k = a.k;
  // 128-bit path: every head's rotary start (base pointer, token and head strides) and the NeoX
  // split (half) or GPT-J's pair groups W-aligned. Packed heads: head stride = head_size. A
  // tensor without heads (nullptr, strides 0) passes.
  const bool vec = (NEOX ? half % W == 0 : rot_dim % W == 0) &&
                   all_multiple({q.head_stride, q.token_stride, k.head_stride, k.token_stride},
                                W) &&
                   is_aligned(q.ptr, 16) && is_aligned(k.ptr, 16);
  const float sin_sign = a.inverse ? -1.0f : 1.0f;
  const dim3 grid(static_cast<unsigned>(a.positions->numel()));
  auto args = std::make_tuple(a.positions->data_ptr<PosT>(), static_cast<T*>(q.ptr),
                              q.token_stride, q.heads, static_cast<T*>(k.ptr), k.token_stride,
                              k.heads, static_cast<const CacheT*>(a.cache->data_ptr()),
                              a.cache->size(0), rot_dim, a.head_size, q.head_stride,
                              k.head_stride, sin_sign);
  auto go = [&](auto kernel, dim3 block) {
    std::apply([&](auto... v) { launch_kernel(kernel, grid, block, stream, dev, v...); }, args);
  };
  if (vec) {
    const int heads = q.heads + k.heads;
    const int64_t items = static_cast<int64_t>((NEOX ? half : rot_dim) / W) * heads;
    go(rotary_embedding_vec_kernel<T, CacheT, PosT, NEOX, GENERAL>,
       dim3(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, 32) * 32, 32, 256))));
    return;
  }
  const int bx = std::min(128, static_cast<int>(ceil_div(half, 32) * 32));
  const int by = std::max(1, std::min(256 / bx, q.heads + k.heads));
  go(rotary_embedding_kernel<T, CacheT, PosT, NEOX, GENERAL>, dim3(bx, by));
}

// Packed heads and the forward rotation take the packed instantiation (GENERAL false: no head
// stride, no sign; the contiguous path as before); strided heads or inverse the general one.
template <typename T, typename CacheT, typename PosT>
void launch(const Call& a) {
  auto strided = [&](const Heads& h) { return h.heads > 1 && h.head_stride != a.head_size; };
  const bool general = a.inverse || strided(a.q) || strided(a.k);
  if (a.is_neox)
    general ? launch_style<T, CacheT, PosT, true, true>(a)
            : launch_style<T, CacheT, PosT, true, false>(a);
  else
    general ? launch_style<T, CacheT, PosT, false, true>(a)
            : launch_style<T, CacheT, PosT, false, false>(a);
}

template <typename T, typename CacheT>
void dispatch_pos(const Call& a) {
  if (a.positions->scalar_type() == at::kLong)
    launch<T, CacheT, int64_t>(a);
  else
    launch<T, CacheT, int32_t>(a);
}

template <typename T>
void dispatch_cache(const Call& a) {
  if (a.cache->scalar_type() == at::kFloat)
    dispatch_pos<T, float>(a);
  else
    dispatch_pos<T, T>(a);
}

}  // namespace

void rotary_embedding(const at::Tensor& positions, at::Tensor& query,
                      const std::optional<at::Tensor>& key, int64_t head_size,
                      const at::Tensor& cos_sin_cache, bool is_neox, int64_t rope_dim_offset,
                      bool inverse) {
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
  TORCH_CHECK(rope_dim_offset >= 0 && rope_dim_offset <= head_size - rot_dim, kOp,
              ": rope_dim_offset must be >= 0 and rope_dim_offset + rot_dim <= head_size, got ",
              num(rope_dim_offset));
  TORCH_CHECK(positions.numel() <= std::numeric_limits<int>::max(), kOp, ": too many tokens");
  Call a{&positions, &cos_sin_cache, heads_view(kOp, "query", query, positions, head_size, true),
         Heads{}, static_cast<int>(head_size), is_neox, inverse};
  if (key.has_value()) {
    check_same_type(kOp, "key", *key, query);
    check_same_device(kOp, "key", *key, query);
    a.k = heads_view(kOp, "key", *key, positions, head_size, true);
  }
  if (positions.numel() == 0) return;
  // The rotary dims start rope_dim_offset into each head: move the base pointers there. A tensor
  // without heads is not touched (a key without heads is as no key); one head's stride is never
  // used (taken as head_size).
  const int64_t offset_bytes = rope_dim_offset * static_cast<int64_t>(query.element_size());
  for (Heads* h : {&a.q, &a.k}) {
    if (h->heads == 0) {
      *h = Heads{};
      continue;
    }
    h->ptr = static_cast<char*>(h->ptr) + offset_bytes;
    if (h->heads == 1) h->head_stride = head_size;
  }
  const DeviceGuard guard(query.device());
  switch (query.scalar_type()) {
    case at::kFloat: dispatch_cache<float>(a); break;
    case at::kHalf: dispatch_cache<__half>(a); break;
    case at::kBFloat16: dispatch_cache<__nv_bfloat16>(a); break;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype");
  }
}

}  // namespace compile_ops
