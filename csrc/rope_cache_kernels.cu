// Launchers of fused_rope_and_cache_flash (flash layout) and fused_rope_and_cache (vLLM's paged
// layout): checks, device guard, current stream, dispatch over the model dtype, the cos/sin
// dtype, the cache kind and NeoX/GPT-J. Return false (and do nothing) for layouts the one-pass
// kernel does not take; the Python side then runs the two kernels.
#include <torch/all.h>

#include <algorithm>
#include <type_traits>

#include "compile_ops/rope_cache.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

bool rope_cache(const char* kOp, bool paged, const at::Tensor& positions, at::Tensor& query,
                at::Tensor& key, const at::Tensor& value, int64_t head_size,
                const at::Tensor& cos_sin_cache, bool is_neox, at::Tensor& key_cache,
                at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t kind,
                const at::Tensor& k_scale, const at::Tensor& v_scale, bool write_key) {
  check_float_type(kOp, "query", query);
  check_same_type(kOp, "key", key, query);
  check_same_type(kOp, "value", value, query);
  const at::Tensor* on_query_device[] = {&positions,   &key,          &value,
                                         &cos_sin_cache, &key_cache,  &value_cache,
                                         &slot_mapping, &k_scale,     &v_scale};
  for (const at::Tensor* t : on_query_device) check_same_device(kOp, "argument", *t, query);
  check_same_device(kOp, "query", query, query);
  TORCH_CHECK(kind >= 0 && kind <= 2, kOp, ": bad kv_cache_dtype kind");
  if (positions.scalar_type() != at::kLong || !positions.is_contiguous()) return false;
  const int64_t tokens = positions.numel();
  TORCH_CHECK(head_size > 0 && head_size <= (1 << 16), kOp, ": bad head_size");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous() &&
                  (cos_sin_cache.scalar_type() == at::kFloat ||
                   cos_sin_cache.scalar_type() == query.scalar_type()),
              kOp, ": cos_sin_cache must be a contiguous float32 or query-dtype 2-D tensor");
  const int64_t rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size, kOp, ": bad rot_dim");
  if (tokens == 0) return true;
  const Heads qh = heads_view(kOp, "query", query, positions, head_size);
  const Heads kh = heads_view(kOp, "key", key, positions, head_size);
  const int64_t nq = qh.heads, nk = kh.heads, q_stride = qh.token_stride, k_stride = kh.token_stride;
  TORCH_CHECK(value.dim() == 3 && value.size(0) == tokens && value.size(1) == nk &&
                  (value.size(2) <= 1 || value.stride(2) == 1) &&
                  (nk <= 1 || value.stride(1) == value.size(2)),
              kOp, ": value must be [tokens, num_kv_heads, head_size_v] with heads packed");
  const int64_t hv = value.size(2);
  const int64_t cx = 16 / key_cache.element_size();  // paged: elements per key chunk
  if (paged) {
    TORCH_CHECK(key_cache.dim() == 5 && value_cache.dim() == 4 && key_cache.size(1) == nk &&
                    key_cache.size(2) * cx == head_size && key_cache.size(4) == cx &&
                    key_cache.stride(4) == 1 && value_cache.size(1) == nk &&
                    value_cache.size(2) == hv && hv == head_size &&
                    key_cache.size(0) == value_cache.size(0) &&
                    key_cache.size(3) == value_cache.size(3),
                kOp, ": caches must be [num_blocks, num_kv_heads, head_size / x, block_size, x] "
                     "and [num_blocks, num_kv_heads, head_size, block_size]");
  } else {
    TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4 && key_cache.size(2) == nk &&
                    key_cache.size(3) == head_size && value_cache.size(2) == nk &&
                    value_cache.size(3) == hv && key_cache.size(0) == value_cache.size(0) &&
                    key_cache.size(1) == value_cache.size(1) && key_cache.stride(3) == 1 &&
                    value_cache.stride(3) == 1,
                kOp, ": caches must be [num_blocks, block_size, num_kv_heads, head_size]");
  }
  const int64_t block_size = paged ? key_cache.size(3) : key_cache.size(1);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous() && slot_mapping.size(0) <= tokens,
              kOp, ": slot_mapping must be a contiguous int64 tensor of at most tokens slots");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), kOp, ": cache dtypes differ");
  kv_kind(kOp, kind, key_cache, query);
  const at::Tensor* scales[] = {&k_scale, &v_scale};
  for (const at::Tensor* s : scales)
    TORCH_CHECK(s->scalar_type() == at::kFloat && (s->numel() == 1 || s->numel() == nk) &&
                    s->is_contiguous(),
                kOp, ": scales must be float32 with one value or one per KV head");
  TORCH_CHECK(nq + nk <= (1 << 16) && block_size <= std::numeric_limits<int>::max(), kOp,
              ": sizes out of range");

  const int64_t esize = query.element_size();
  const int64_t W = 16 / esize, cw = W * key_cache.element_size();
  auto all_mult = [&](std::initializer_list<int64_t> v) {
    for (int64_t x : v)
      if (x % W) return false;
    return true;
  };
  // Flash: every cache stride but the head's keeps a W-vector's store aligned; paged: the key
  // chunks' strides (a W-vector is inside one chunk), values are stored element by element.
  const bool cache_ok =
      paged ? all_mult({key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                        key_cache.stride(3)})
            : all_mult({key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2)});
  const bool eligible =
      (is_neox ? (rot_dim / 2) % W == 0 : rot_dim % W == 0) &&
      all_mult({head_size, hv, q_stride, k_stride, value.stride(0)}) && cache_ok &&
      is_aligned(query.data_ptr(), 16) && is_aligned(key.data_ptr(), 16) &&
      is_aligned(value.data_ptr(), 16) && is_aligned(key_cache.data_ptr(), cw) &&
      is_aligned(value_cache.data_ptr(), cw);
  if (!eligible) return false;

  const DeviceGuard guard(query.device());
  const auto stream = current_stream();
  const int dev = query.get_device();
  RopeCacheArgs a;
  a.positions = positions.data_ptr<int64_t>();
  a.query = query.data_ptr();
  a.q_stride = q_stride;
  a.nq = static_cast<int>(nq);
  a.key = key.data_ptr();
  a.k_stride = k_stride;
  a.nk = static_cast<int>(nk);
  a.value = value.data_ptr();
  a.v_stride = value.stride(0);
  a.hv = static_cast<int>(hv);
  a.cos_sin = cos_sin_cache.data_ptr();
  a.max_pos = cos_sin_cache.size(0);
  a.rot_dim = static_cast<int>(rot_dim);
  a.head_size = static_cast<int>(head_size);
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.kc_block = key_cache.stride(0);
  a.vc_block = value_cache.stride(0);
  if (paged) {
    a.kc_head = key_cache.stride(1);
    a.kc_dim = key_cache.stride(2);
    a.kc_page = key_cache.stride(3);
    a.vc_head = value_cache.stride(1);
    a.vc_dim = value_cache.stride(2);
    a.vc_page = value_cache.stride(3);
  } else {
    a.kc_page = key_cache.stride(1);
    a.kc_head = key_cache.stride(2);
    a.kc_dim = 0;
    a.vc_page = value_cache.stride(1);
    a.vc_head = value_cache.stride(2);
    a.vc_dim = 1;
  }
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.num_mapped = slot_mapping.size(0);
  a.block_size = static_cast<int>(block_size);
  a.num_slots = key_cache.size(0) * block_size;
  a.k_scale = k_scale.data_ptr<float>();
  a.k_per_head = k_scale.numel() > 1;
  a.v_scale = v_scale.data_ptr<float>();
  a.v_per_head = v_scale.numel() > 1;
  a.write_key = write_key;

  const int64_t per_rot = (is_neox ? rot_dim / 2 : rot_dim) / W;
  const int64_t items = (nq + nk) * per_rot + nk * ((head_size - rot_dim) / W + hv / W);
  const dim3 grid(static_cast<unsigned>(tokens)),
      block(static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, 32) * 32, 32, 512)));

  auto run = [&](auto t, auto cos_t, auto c, auto kv) {
    using T = decltype(t);
    using CosT = decltype(cos_t);
    using C = decltype(c);
    constexpr int KV = decltype(kv)::value;
    if (paged) {
      if (is_neox)
        launch_kernel(fused_rope_and_cache_kernel<T, CosT, C, KV, true, true>, grid, block,
                      stream, dev, a);
      else
        launch_kernel(fused_rope_and_cache_kernel<T, CosT, C, KV, false, true>, grid, block,
                      stream, dev, a);
    } else {
      if (is_neox)
        launch_kernel(fused_rope_and_cache_kernel<T, CosT, C, KV, true, false>, grid, block,
                      stream, dev, a);
      else
        launch_kernel(fused_rope_and_cache_kernel<T, CosT, C, KV, false, false>, grid, block,
                      stream, dev, a);
    }
  };
  auto with_kind = [&](auto t, auto cos_t) {
    using T = decltype(t);
    switch (kind) {
      case 0: run(t, cos_t, T{}, std::integral_constant<int, kKvAuto>{}); break;
      case 1: run(t, cos_t, uint8_t{}, std::integral_constant<int, kKvE4M3>{}); break;
      default: run(t, cos_t, uint8_t{}, std::integral_constant<int, kKvE5M2>{}); break;
    }
  };
  auto with_cos = [&](auto t) {
    if (cos_sin_cache.scalar_type() == at::kFloat)
      with_kind(t, float{});
    else
      with_kind(t, t);
  };
  switch (query.scalar_type()) {
    case at::kFloat: with_cos(float{}); break;
    case at::kHalf: with_cos(__half{}); break;
    case at::kBFloat16: with_cos(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype");
  }
  return true;
}

}  // namespace

bool fused_rope_and_cache_flash(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                const at::Tensor& value, int64_t head_size,
                                const at::Tensor& cos_sin_cache, bool is_neox,
                                at::Tensor& key_cache, at::Tensor& value_cache,
                                const at::Tensor& slot_mapping, int64_t kind,
                                const at::Tensor& k_scale, const at::Tensor& v_scale,
                                bool write_key) {
  return rope_cache("fused_rope_and_cache_flash", false, positions, query, key, value, head_size,
                    cos_sin_cache, is_neox, key_cache, value_cache, slot_mapping, kind, k_scale,
                    v_scale, write_key);
}

bool fused_rope_and_cache(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          const at::Tensor& value, int64_t head_size,
                          const at::Tensor& cos_sin_cache, bool is_neox, at::Tensor& key_cache,
                          at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t kind,
                          const at::Tensor& k_scale, const at::Tensor& v_scale, bool write_key) {
  return rope_cache("fused_rope_and_cache", true, positions, query, key, value, head_size,
                    cos_sin_cache, is_neox, key_cache, value_cache, slot_mapping, kind, k_scale,
                    v_scale, write_key);
}

}  // namespace compile_ops
