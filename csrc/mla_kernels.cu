// Launchers of the MLA and sparse-indexer cache ops: checks (a second line behind
// compile_ops/mla.py), device guard, current stream, dtype / kind dispatch, 16-byte (or 8/4-byte)
// accesses where every address is aligned and element accesses otherwise.
#include <torch/all.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "compile_ops/mla.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

constexpr int kDsMla = 3;  // compile_ops/mla.py:_MLA_KIND["fp8_ds_mla"]

void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1), op, ": ", name,
              " must be 2-D with a contiguous last dim");
}

void check_slots(const char* op, const at::Tensor& slots, const at::Tensor& ref) {
  check_on(op, "slot_mapping", slots, ref);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(), op,
              ": slot_mapping must be a contiguous 1-D int64 tensor");
}

void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                 int64_t dim) {
  check_on(op, name, t, ref);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == dim, op, ": ", name, " must be ",
              num(dim), "-D int32");
  TORCH_CHECK(dim != 1 || t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(dim != 2 || t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " rows must be contiguous");
}

template <typename F>
void dispatch_float(const char* op, at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", s);
  }
}

// f(C{}, std::integral_constant<int, KV>{}) for the model type T's cache storage.
template <typename T, typename F>
void dispatch_cache(int kind, F&& f) {
  switch (kind) {
    case kKvAuto: f(T{}, std::integral_constant<int, kKvAuto>{}); break;
    case kKvE4M3: f(uint8_t{}, std::integral_constant<int, kKvE4M3>{}); break;
    default: f(uint8_t{}, std::integral_constant<int, kKvE5M2>{}); break;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void concat_and_cache_mla(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor& kv_cache,
                          const at::Tensor& slot_mapping, int64_t kind, const at::Tensor& scale) {
  constexpr const char* op = "concat_and_cache_mla";
  check_float_type(op, "kv_c", kv_c);
  check_same_type(op, "k_pe", k_pe, kv_c);
  check_on(op, "kv_c", kv_c, kv_c);
  check_on(op, "k_pe", k_pe, kv_c);
  check_on(op, "kv_cache", kv_cache, kv_c);
  check_on(op, "scale", scale, kv_c);
  check_rows(op, "kv_c", kv_c);
  check_rows(op, "k_pe", k_pe);
  check_slots(op, slot_mapping, kv_c);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op,
              ": scale must be a float32 tensor with one value");
  const int64_t n = slot_mapping.size(0), rank = kv_c.size(1), pe = k_pe.size(1);
  TORCH_CHECK(n <= kv_c.size(0) && n <= k_pe.size(0), op,
              ": slot_mapping longer than kv_c / k_pe");
  TORCH_CHECK(kv_cache.dim() == 3 && (kv_cache.size(2) <= 1 || kv_cache.stride(2) == 1), op,
              ": kv_cache must be [num_blocks, block_size, entry] with contiguous entries");
  TORCH_CHECK(kind >= 0 && kind <= kDsMla, op, ": bad kv_cache_dtype kind ", num(kind));
  const int64_t block_size = kv_cache.size(1), num_slots = kv_cache.size(0) * block_size;
  TORCH_CHECK(block_size <= std::numeric_limits<int>::max() && rank + pe <= (1 << 24), op,
              ": sizes out of range");
  if (n == 0 || num_slots == 0) return;
  const DeviceGuard guard(kv_c.device());
  const auto stream = current_stream();
  const int dev = kv_c.get_device();
  auto* slots = slot_mapping.data_ptr<int64_t>();

  if (kind == kDsMla) {
    TORCH_CHECK(rank == 512 && pe == 64 && kv_c.element_size() == 2 &&
                    kv_cache.element_size() == 1 && kv_cache.size(2) == 656,
                op, ": fp8_ds_mla needs 16-bit kv_c [*, 512], k_pe [*, 64] and a 1-byte cache "
                "[num_blocks, block_size, 656]");
    DsMlaWrite a;
    a.kv_c = kv_c.data_ptr();
    a.kv_stride = kv_c.stride(0);
    a.k_pe = k_pe.data_ptr();
    a.pe_stride = k_pe.stride(0);
    a.cache = static_cast<uint8_t*>(kv_cache.data_ptr());
    a.block_stride = kv_cache.stride(0);
    a.page_stride = kv_cache.stride(1);
    a.slots = slots;
    a.num_tokens = n;
    a.num_slots = num_slots;
    a.block_size = static_cast<int>(block_size);
    const bool vec = is_aligned(kv_c.data_ptr(), 16) && kv_c.stride(0) % 8 == 0 &&
                     is_aligned(k_pe.data_ptr(), 16) && k_pe.stride(0) % 8 == 0 &&
                     is_aligned(kv_cache.data_ptr(), 16) &&
                     all_multiple({kv_cache.stride(0), kv_cache.stride(1)}, 16);
    const dim3 grid(static_cast<unsigned>(ceil_div(n, kMlaThreads / 32))), block(kMlaThreads);
    dispatch_float(op, kv_c.scalar_type(), [&](auto t) {
      using T = decltype(t);
      if constexpr (sizeof(T) == 2) {
        if (vec)
          launch_kernel(concat_and_cache_ds_mla_kernel<T, true>, grid, block, stream, dev, a);
        else
          launch_kernel(concat_and_cache_ds_mla_kernel<T, false>, grid, block, stream, dev, a);
      }
    });
    return;
  }

  TORCH_CHECK(kv_cache.size(2) == rank + pe, op, ": kv_cache entries must be kv_lora_rank + "
              "pe_dim = ", num(rank + pe), " wide");
  kv_kind(op, kind, kv_cache, kv_c);
  dispatch_float(op, kv_c.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_cache<T>(static_cast<int>(kind), [&](auto c, auto kvc) {
      using C = decltype(c);
      constexpr int KV = decltype(kvc)::value;
      constexpr int VW = kVecWidth<T>;
      MlaWrite a;
      a.kv_c = kv_c.data_ptr();
      a.kv_stride = kv_c.stride(0);
      a.k_pe = k_pe.data_ptr();
      a.pe_stride = k_pe.stride(0);
      a.cache = kv_cache.data_ptr();
      a.block_stride = kv_cache.stride(0);
      a.page_stride = kv_cache.stride(1);
      a.slots = slots;
      a.num_tokens = n;
      a.num_slots = num_slots;
      a.block_size = static_cast<int>(block_size);
      a.scale = scale.data_ptr<float>();
      const bool vec = all_multiple({rank, pe, kv_c.stride(0), k_pe.stride(0),
                                     kv_cache.stride(0), kv_cache.stride(1)}, VW) &&
                       is_aligned(kv_c.data_ptr(), 16) && is_aligned(k_pe.data_ptr(), 16) &&
                       is_aligned(kv_cache.data_ptr(), VW * sizeof(C));
      const int w = vec ? VW : 1;
      a.rank_vecs = static_cast<int>(rank / w);
      a.pe_vecs = static_cast<int>(pe / w);
      const dim3 grid(static_cast<unsigned>(ceil_div(n, kMlaThreads / 32))), block(kMlaThreads);
      if (vec)
        launch_kernel(concat_and_cache_mla_kernel<T, C, KV, VW, 4>, grid, block, stream, dev, a);
      else
        launch_kernel(concat_and_cache_mla_kernel<T, C, KV, 1, 4>, grid, block, stream, dev, a);
    });
  });
}

// ---------------------------------------------------------------------------------------------
void concat_and_cache_mla_rope_fused(const at::Tensor& positions, at::Tensor& q_pe,
                                     at::Tensor& k_pe, const at::Tensor& kv_c,
                                     const at::Tensor& cos_sin_cache, bool is_neox,
                                     const at::Tensor& slot_mapping, at::Tensor& kv_cache,
                                     int64_t kind, const at::Tensor& scale) {
  constexpr const char* op = "concat_and_cache_mla_rope_fused";
  check_float_type(op, "q_pe", q_pe);
  check_same_type(op, "k_pe", k_pe, q_pe);
  check_same_type(op, "kv_c", kv_c, q_pe);
  const at::Tensor* on_q_device[] = {&positions, &k_pe, &kv_c, &cos_sin_cache, &kv_cache, &scale};
  for (const at::Tensor* t : on_q_device) check_on(op, "argument", *t, q_pe);
  check_on(op, "q_pe", q_pe, q_pe);
  check_slots(op, slot_mapping, q_pe);
  check_rows(op, "k_pe", k_pe);
  check_rows(op, "kv_c", kv_c);
  const int64_t tokens = q_pe.size(0);
  TORCH_CHECK(q_pe.dim() == 3 && (q_pe.size(2) <= 1 || q_pe.stride(2) == 1), op,
              ": q_pe must be [tokens, heads, rot_dim] with a contiguous last dim");
  const int64_t heads = q_pe.size(1), rot = q_pe.size(2), rank = kv_c.size(1);
  TORCH_CHECK(k_pe.size(0) == tokens && k_pe.size(1) == rot && kv_c.size(0) == tokens &&
                  slot_mapping.size(0) == tokens,
              op, ": k_pe [tokens, rot_dim], kv_c [tokens, rank], slot_mapping [tokens]");
  TORCH_CHECK(rot > 0 && rot % 2 == 0, op, ": rot_dim must be even");
  TORCH_CHECK((positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt) &&
                  positions.dim() == 1 && positions.is_contiguous() &&
                  positions.size(0) == tokens,
              op, ": positions must be a contiguous int64/int32 tensor of tokens entries");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == rot &&
                  cos_sin_cache.is_contiguous() &&
                  (cos_sin_cache.scalar_type() == at::kFloat ||
                   cos_sin_cache.scalar_type() == q_pe.scalar_type()),
              op, ": cos_sin_cache must be a contiguous float32 or q_pe-dtype [max_pos, rot_dim]");
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.size(2) == rank + rot &&
                  (kv_cache.size(2) <= 1 || kv_cache.stride(2) == 1),
              op, ": kv_cache must be [num_blocks, block_size, rank + rot_dim], entries contiguous");
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": bad kv_cache_dtype kind ", num(kind));
  kv_kind(op, kind, kv_cache, q_pe);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op,
              ": kv_cache_scale must be a float32 tensor with one value");
  const int64_t block_size = kv_cache.size(1);
  TORCH_CHECK(block_size <= std::numeric_limits<int>::max() && heads * rot <= (1 << 24) &&
                  rank <= (1 << 24),
              op, ": sizes out of range");
  if (tokens == 0) return;
  const DeviceGuard guard(q_pe.device());
  const auto stream = current_stream();
  const int dev = q_pe.get_device();

  MlaRope a;
  a.positions = positions.data_ptr();
  a.q_pe = q_pe.data_ptr();
  a.q_token_stride = q_pe.stride(0);
  a.q_head_stride = q_pe.stride(1);
  a.heads = static_cast<int>(heads);
  a.k_pe = k_pe.data_ptr();
  a.pe_stride = k_pe.stride(0);
  a.kv_c = kv_c.data_ptr();
  a.kv_stride = kv_c.stride(0);
  a.cos_sin = cos_sin_cache.data_ptr();
  a.max_pos = cos_sin_cache.size(0);
  a.rot = static_cast<int>(rot);
  a.rank = static_cast<int>(rank);
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.num_slots = kv_cache.size(0) * block_size;
  a.block_size = static_cast<int>(block_size);
  a.cache = kv_cache.data_ptr();
  a.block_stride = kv_cache.stride(0);
  a.page_stride = kv_cache.stride(1);
  a.scale = scale.data_ptr<float>();
  const bool pos64 = positions.scalar_type() == at::kLong;

  dispatch_float(op, q_pe.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_cache<T>(static_cast<int>(kind), [&](auto c, auto kvc) {
      using C = decltype(c);
      constexpr int KV = decltype(kvc)::value;
      constexpr int VW = kVecWidth<T>;
      const bool vec = (is_neox ? (rot / 2) % VW == 0 : rot % VW == 0) &&
                       all_multiple({rank, q_pe.stride(0), q_pe.stride(1), k_pe.stride(0),
                                     kv_c.stride(0), kv_cache.stride(0), kv_cache.stride(1)},
                                    VW) &&
                       is_aligned(q_pe.data_ptr(), 16) && is_aligned(k_pe.data_ptr(), 16) &&
                       is_aligned(kv_c.data_ptr(), 16) &&
                       is_aligned(kv_cache.data_ptr(), VW * sizeof(C));
      const int unit = vec ? VW : (is_neox ? 1 : 2);
      const int per_rot = static_cast<int>((is_neox ? rot / 2 : rot) / unit);
      const int64_t items = heads * per_rot + per_rot + rank / (vec ? VW : 1);
      // At most 512 threads: 1024-thread CTAs (one pass over DeepSeek's 580 items) measured slower
      // on an H100 (4096 tokens, fp8: 65.6 -> 73.6 us), the bigger CTAs lowering occupancy.
      const int threads = static_cast<int>(std::clamp<int64_t>(ceil_div(items, 32) * 32, 64, 512));
      const dim3 grid(static_cast<unsigned>(tokens)), block(threads);
      auto go = [&](auto cos_tag, auto pos_tag) {
        using CosT = decltype(cos_tag);
        using PosT = decltype(pos_tag);
        if (vec) {
          if (is_neox)
            launch_kernel(concat_and_cache_mla_rope_kernel<T, C, CosT, PosT, KV, true, VW, true>,
                          grid, block, stream, dev, a);
          else
            launch_kernel(concat_and_cache_mla_rope_kernel<T, C, CosT, PosT, KV, false, VW, true>,
                          grid, block, stream, dev, a);
        } else {
          if (is_neox)
            launch_kernel(concat_and_cache_mla_rope_kernel<T, C, CosT, PosT, KV, true, 1, false>,
                          grid, block, stream, dev, a);
          else
            launch_kernel(concat_and_cache_mla_rope_kernel<T, C, CosT, PosT, KV, false, 2, false>,
                          grid, block, stream, dev, a);
        }
      };
      const bool cos_f32 = cos_sin_cache.scalar_type() == at::kFloat;
      if (cos_f32 && pos64) go(float{}, int64_t{});
      else if (cos_f32) go(float{}, int32_t{});
      else if (pos64) go(T{}, int64_t{});
      else go(T{}, int32_t{});
    });
  });
}

// ---------------------------------------------------------------------------------------------
void cp_gather_and_upconvert_fp8_kv_cache(const at::Tensor& src_cache, at::Tensor& dst,
                                          const at::Tensor& block_table,
                                          const at::Tensor& workspace_starts, int64_t batch_size,
                                          const std::optional<at::Tensor>& seq_starts) {
  constexpr const char* op = "cp_gather_and_upconvert_fp8_kv_cache";
  check_on(op, "src_cache", src_cache, src_cache);
  check_on(op, "dst", dst, src_cache);
  TORCH_CHECK(src_cache.element_size() == 1 && src_cache.dim() == 3 && src_cache.size(2) == 656 &&
                  src_cache.stride(2) == 1,
              op, ": src_cache must be a 1-byte [num_blocks, block_size, 656] tensor");
  TORCH_CHECK(dst.scalar_type() == at::kBFloat16 && dst.dim() == 2 && dst.size(1) == 576 &&
                  dst.stride(1) == 1,
              op, ": dst must be bfloat16 [tokens, 576] with contiguous rows");
  check_index(op, "block_table", block_table, src_cache, 2);
  check_index(op, "workspace_starts", workspace_starts, src_cache, 1);
  TORCH_CHECK(batch_size >= 0 && workspace_starts.size(0) >= batch_size &&
                  block_table.size(0) >= batch_size,
              op, ": batch_size larger than workspace_starts / block_table");
  if (seq_starts.has_value()) {
    check_index(op, "seq_starts", *seq_starts, src_cache, 1);
    TORCH_CHECK(seq_starts->size(0) >= batch_size, op, ": seq_starts shorter than batch_size");
  }
  TORCH_CHECK(src_cache.size(1) <= std::numeric_limits<int>::max(), op, ": block_size too large");
  if (batch_size == 0 || dst.size(0) == 0 || src_cache.size(0) == 0) return;
  const DeviceGuard guard(src_cache.device());
  Upconvert a;
  a.src = static_cast<const uint8_t*>(src_cache.data_ptr());
  a.block_stride = src_cache.stride(0);
  a.page_stride = src_cache.stride(1);
  a.num_blocks = src_cache.size(0);
  a.block_size = static_cast<int>(src_cache.size(1));
  a.dst = static_cast<__nv_bfloat16*>(dst.data_ptr());
  a.dst_stride = dst.stride(0);
  a.rows = dst.size(0);
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_stride = block_table.stride(0);
  a.bt_cols = block_table.size(1);
  a.workspace_starts = workspace_starts.data_ptr<int32_t>();
  a.seq_starts = seq_starts.has_value() ? seq_starts->data_ptr<int32_t>() : nullptr;
  a.batch = batch_size;
  const bool vec = is_aligned(a.src, 16) && all_multiple({a.block_stride, a.page_stride}, 16) &&
                   is_aligned(a.dst, 16) && a.dst_stride % 8 == 0;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, kMlaThreads / 32))), block(kMlaThreads);
  const int dev = src_cache.get_device();
  if (vec)
    launch_kernel(cp_gather_and_upconvert_kernel<true>, grid, block, current_stream(), dev, a);
  else
    launch_kernel(cp_gather_and_upconvert_kernel<false>, grid, block, current_stream(), dev, a);
}

// ---------------------------------------------------------------------------------------------
void indexer_k_quant_and_cache(const at::Tensor& k, at::Tensor& kv_cache,
                               const at::Tensor& slot_mapping, int64_t quant_block_size,
                               bool ue8m0) {
  constexpr const char* op = "indexer_k_quant_and_cache";
  check_float_type(op, "k", k);
  check_on(op, "k", k, k);
  check_on(op, "kv_cache", kv_cache, k);
  check_rows(op, "k", k);
  check_slots(op, slot_mapping, k);
  const int64_t n = slot_mapping.size(0), D = k.size(1), Q = quant_block_size;
  TORCH_CHECK(Q == 32 || Q == 64 || Q == 128 || Q == 256, op,
              ": quant_block_size must be 32, 64, 128 or 256");
  TORCH_CHECK(D > 0 && D % Q == 0 && D <= (1 << 20), op,
              ": head_dim must be a positive multiple of quant_block_size");
  TORCH_CHECK(n <= k.size(0), op, ": slot_mapping longer than k");
  TORCH_CHECK(kv_cache.element_size() == 1 && kv_cache.dim() == 3 &&
                  kv_cache.size(2) == D + D / Q * 4 &&
                  (kv_cache.size(1) <= 1 || kv_cache.stride(1) == kv_cache.size(2)) &&
                  kv_cache.stride(2) == 1,
              op, ": kv_cache must be a 1-byte [num_blocks, block_size, head_dim + head_dim / "
              "quant_block_size * 4] tensor with contiguous blocks");
  const int64_t block_size = kv_cache.size(1);
  TORCH_CHECK(block_size <= std::numeric_limits<int>::max(), op, ": block_size too large");
  if (n == 0 || kv_cache.size(0) * block_size == 0) return;
  const DeviceGuard guard(k.device());
  IndexerWrite a;
  a.k = k.data_ptr();
  a.k_stride = k.stride(0);
  a.head_dim = static_cast<int>(D);
  a.groups = static_cast<int>(D / Q);
  a.cache = static_cast<uint8_t*>(kv_cache.data_ptr());
  a.block_stride = kv_cache.stride(0);
  a.block_size = static_cast<int>(block_size);
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.num_tokens = n;
  a.num_slots = kv_cache.size(0) * block_size;
  a.ue8m0 = ue8m0 ? 1 : 0;
  const int lpg = static_cast<int>(Q / 8);  // lanes per (token, group), 8 values each
  const bool vec = is_aligned(a.k, 8 * k.element_size()) && a.k_stride % 8 == 0 &&
                   is_aligned(a.cache, 8) && a.block_stride % 8 == 0;
  const int64_t items_per_cta = (kMlaThreads / 32) * (32 / lpg);
  const dim3 grid(static_cast<unsigned>(ceil_div(n * a.groups, items_per_cta))),
      block(kMlaThreads);
  const auto stream = current_stream();
  const int dev = k.get_device();
  dispatch_float(op, k.scalar_type(), [&](auto t) {
    using T = decltype(t);
    auto go = [&](auto lpg_c) {
      constexpr int L = decltype(lpg_c)::value;
      if (vec)
        launch_kernel(indexer_k_quant_kernel<T, L, true>, grid, block, stream, dev, a);
      else
        launch_kernel(indexer_k_quant_kernel<T, L, false>, grid, block, stream, dev, a);
    };
    switch (lpg) {
      case 4: go(std::integral_constant<int, 4>{}); break;
      case 8: go(std::integral_constant<int, 8>{}); break;
      case 16: go(std::integral_constant<int, 16>{}); break;
      default: go(std::integral_constant<int, 32>{}); break;
    }
  });
}

// ---------------------------------------------------------------------------------------------
void cp_gather_indexer_k_quant_cache(const at::Tensor& kv_cache, at::Tensor& dst_k,
                                     at::Tensor& dst_scale, const at::Tensor& block_table,
                                     const at::Tensor& cu_seq_lens, int64_t quant_block_size) {
  constexpr const char* op = "cp_gather_indexer_k_quant_cache";
  check_on(op, "kv_cache", kv_cache, kv_cache);
  check_on(op, "dst_k", dst_k, kv_cache);
  check_on(op, "dst_scale", dst_scale, kv_cache);
  check_index(op, "block_table", block_table, kv_cache, 2);
  check_index(op, "cu_seq_lens", cu_seq_lens, kv_cache, 1);
  check_rows(op, "dst_k", dst_k);
  check_rows(op, "dst_scale", dst_scale);
  const int64_t D = dst_k.size(1), Q = quant_block_size;
  TORCH_CHECK(dst_k.element_size() == 1, op, ": dst_k must be a 1-byte tensor");
  TORCH_CHECK(Q > 0 && D % Q == 0 && dst_scale.size(0) == dst_k.size(0) &&
                  dst_scale.size(1) * dst_scale.element_size() == D / Q * 4,
              op, ": dst_scale must hold one float32 per quant group");
  TORCH_CHECK(kv_cache.element_size() == 1 && kv_cache.dim() == 3 &&
                  kv_cache.size(2) == D + D / Q * 4 &&
                  (kv_cache.size(1) <= 1 || kv_cache.stride(1) == kv_cache.size(2)) &&
                  kv_cache.stride(2) == 1,
              op, ": kv_cache must be a 1-byte [num_blocks, block_size, head_dim + head_dim / "
              "quant_block_size * 4] tensor with contiguous blocks");
  TORCH_CHECK(cu_seq_lens.size(0) == block_table.size(0) + 1, op,
              ": cu_seq_lens must hold block_table rows + 1 offsets");
  TORCH_CHECK(kv_cache.size(1) <= std::numeric_limits<int>::max() && D <= (1 << 20), op,
              ": sizes out of range");
  if (block_table.size(0) == 0 || dst_k.size(0) == 0 || kv_cache.size(0) == 0) return;
  const DeviceGuard guard(kv_cache.device());
  IndexerGather a;
  a.cache = static_cast<const uint8_t*>(kv_cache.data_ptr());
  a.block_stride = kv_cache.stride(0);
  a.num_blocks = kv_cache.size(0);
  a.block_size = static_cast<int>(kv_cache.size(1));
  a.head_dim = static_cast<int>(D);
  a.scale_bytes = static_cast<int>(D / Q * 4);
  a.dst_k = static_cast<uint8_t*>(dst_k.data_ptr());
  a.dk_stride = dst_k.stride(0);
  a.dst_scale = static_cast<uint8_t*>(dst_scale.data_ptr());
  a.ds_stride = dst_scale.stride(0) * dst_scale.element_size();
  a.rows = dst_k.size(0);
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_stride = block_table.stride(0);
  a.bt_cols = block_table.size(1);
  a.cu = cu_seq_lens.data_ptr<int32_t>();
  a.batch = block_table.size(0);
  const bool vec = D % 16 == 0 && is_aligned(a.cache, 16) && a.block_stride % 16 == 0 &&
                   is_aligned(a.dst_k, 16) && a.dk_stride % 16 == 0;
  // Lanes per row: the largest power of two <= the row's 16-byte pieces (at most 32).
  int lpr = 1;
  while (lpr < 32 && lpr * 2 <= D / 16) lpr *= 2;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, (kMlaThreads / 32) * (32 / lpr)))),
      block(kMlaThreads);
  const int dev = kv_cache.get_device();
  if (vec)
    launch_kernel(cp_gather_indexer_kernel<true>, grid, block, current_stream(), dev, a, lpr);
  else
    launch_kernel(cp_gather_indexer_kernel<false>, grid, block, current_stream(), dev, a, lpr);
}

}  // namespace compile_ops
