// Launchers of the paged KV-cache family: checks (a second line behind compile_ops/cache.py),
// device guard, current stream, dtype / kv-dtype dispatch, 16-byte accesses where every address
// is aligned and element accesses otherwise.
#include <torch/all.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "compile_ops/cache.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kCacheWriteThreads = 128;  // reshape_and_cache: 4 warps of 32 tokens
static_assert(kCacheWriteThreads <= 32 * kMaxCacheWarps, "row stage: one slot per warp");

// reshape_and_cache's register-only kernel with value rows as 16-byte stores where 8 (fp8: 16)
// tokens continue each other (ROWS, PagedSide::vec_rows): COMPILE_OPS_CACHE_VROWS=1 (A/B
// measurements, tests); off by default (measured slower, bench/NOTES.md session 8).
bool value_row_stores_enabled() {
  const char* e = std::getenv("COMPILE_OPS_CACHE_VROWS");
  return e && e[0] == '1';
}

// Threads of the register-only kernel's CTAs: 128, or 256 with COMPILE_OPS_CACHE_THREADS=256
// (a 32-token tile of a 128-wide head in one round of loads; A/B measurements).
unsigned register_cache_threads() {
  const char* e = std::getenv("COMPILE_OPS_CACHE_THREADS");
  return e && std::string(e) == "256" ? 256u : unsigned(kCacheWriteThreads);
}

// reshape_and_cache_staged_kernel (scattered slots) from this many tokens on; below it the
// register-only kernel, which is faster for a decode step's few tokens (bench/NOTES.md, session
// 7). COMPILE_OPS_CACHE_STAGED: 0 never, 1 always (tests, A/B measurements), unset: from 128.
int64_t staged_cache_min_tokens() {
  const char* e = std::getenv("COMPILE_OPS_CACHE_STAGED");
  if (e && e[0] == '0') return std::numeric_limits<int64_t>::max();
  if (e && e[0] == '1') return 0;
  return 128;
}

void check_heads(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be [tokens, num_heads, head_size]");
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, op, ": ", name,
              " must be contiguous in head_size");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == x.size(2), op, ": ", name,
              " must hold each token's heads contiguously");
}

void check_scale(const char* op, const char* name, const at::Tensor& s, const at::Tensor& ref,
                 int64_t heads) {
  check_on(op, name, s, ref);
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32");
  TORCH_CHECK(s.numel() == 1 || s.numel() == heads, op, ": ", name,
              " must hold one value or one per head");
  TORCH_CHECK(s.numel() == 1 || s.is_contiguous(), op, ": ", name, " must be contiguous");
}


// Calls f(T{}, C{}, std::integral_constant<int, KV>{}) for the model dtype, cache storage and kind.
template <typename F>
void dispatch_kv(const char* op, at::ScalarType model, int kind, F&& f) {
  auto with_kind = [&](auto t) {
    using T = decltype(t);
    switch (kind) {
      case kKvAuto: f(T{}, T{}, std::integral_constant<int, kKvAuto>{}); break;
      case kKvE4M3: f(T{}, uint8_t{}, std::integral_constant<int, kKvE4M3>{}); break;
      default: f(T{}, uint8_t{}, std::integral_constant<int, kKvE5M2>{}); break;
    }
  };
  switch (model) {
    case at::kFloat: with_kind(float{}); break;
    case at::kHalf: with_kind(__half{}); break;
    case at::kBFloat16: with_kind(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", model);
  }
}

// What both cache-write launchers check first: dtypes, devices, [tokens, heads, size] rows, the
// slot mapping.
void check_write_args(const char* op, const at::Tensor& key, const at::Tensor& value,
                      const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& slot_mapping, const at::Tensor& k_scale,
                      const at::Tensor& v_scale) {
  check_float_type(op, "key", key);
  check_same_type(op, "value", value, key);
  for (auto* p : {&value, &slot_mapping, &k_scale, &v_scale}) check_on(op, "argument", *p, key);
  check_on(op, "key_cache", key_cache, key);
  check_on(op, "value_cache", value_cache, key);
  check_heads(op, "key", key);
  check_heads(op, "value", value);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous(),
              op, ": slot_mapping must be a contiguous 1-D int64 tensor");
}

const float* scale_ptr(const at::Tensor& s) { return s.data_ptr<float>(); }

}  // namespace

// reshape_and_cache with a key cache whose x (key_cache.size(4)) is not 16 bytes: one CTA per
// token, a thread per (head, dim) element, key and value stored element by element (the
// x-packed key address: chunk d / x, lane d % x; the caller checked x divides head_size).
// Threads are independent (no barriers): emulated in tests/emulated like the real launch.
template <typename T, typename C, int KV>
__global__ void reshape_and_cache_any_x_kernel(const int64_t* __restrict__ slot_mapping,
                                               int64_t num_slots, int block_size, int heads,
                                               int head_size, int x, PagedSide k, PagedSide v) {
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0 || slot >= num_slots) return;
  const int64_t blk = slot / block_size, off = slot - blk * block_size;
  const int n = heads * head_size;
  const T* ksrc = static_cast<const T*>(k.src) + t * k.src_stride;  // heads packed per token
  const T* vsrc = static_cast<const T*>(v.src) + t * v.src_stride;
  C* kc = static_cast<C*>(k.cache) + blk * k.s_block + off * k.s_page;
  C* vc = static_cast<C*>(v.cache) + blk * v.s_block + off * v.s_page;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / head_size, d = i - h * head_size;
    const float ksc = KV != kKvAuto ? k.scale[k.scale_per_head ? h : 0] : 1.0f;
    const float vsc = KV != kKvAuto ? v.scale[v.scale_per_head ? h : 0] : 1.0f;
    const int c = d / x;
    kc[h * k.s_head + c * k.s_dim + (d - c * x)] = cache_encode<KV, C>(ksrc[i], ksc);
    vc[h * v.s_head + d * v.s_dim] = cache_encode<KV, C>(vsrc[i], vsc);
  }
}

// convert_fp8 over blocks (dim 0) with their own strides on each side: block b's `per_block`
// elements (one dense run, flat order) at in + b * in_stride and out + b * out_stride. grid.y
// strides over the blocks, grid.x over a block's W-element packs (no division per element).
// W > 1: per_block and both strides are multiples of W and the bases W-element aligned.
template <typename In, typename Out, int MODE, int KV, int W>
__global__ void convert_fp8_blocks_kernel(const In* __restrict__ in, Out* __restrict__ out,
                                          int64_t blocks, int64_t per_block, int64_t in_stride,
                                          int64_t out_stride, float scale) {
  pdl_wait();
  const int64_t packs = per_block / W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < blocks; b += gridDim.y) {
    const In* src = in + b * in_stride;
    Out* dst = out + b * out_stride;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs;
         i += step) {
      const auto a = reinterpret_cast<const Pack<In, W>*>(src)[i];
      Pack<Out, W> r;
#pragma unroll
      for (int w = 0; w < W; ++w) r.v[w] = convert_one<MODE, KV, Out>(a.v[w], scale);
      reinterpret_cast<Pack<Out, W>*>(dst)[i] = r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
void reshape_and_cache_flash(const at::Tensor& key, const at::Tensor& value,
                             at::Tensor& key_cache, at::Tensor& value_cache,
                             const at::Tensor& slot_mapping, int64_t kind,
                             const at::Tensor& k_scale, const at::Tensor& v_scale) {
  constexpr const char* op = "reshape_and_cache_flash";
  check_write_args(op, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const int64_t n = slot_mapping.size(0), heads = key.size(1);
  TORCH_CHECK(n <= key.size(0) && n <= value.size(0) && value.size(1) == heads, op,
              ": slot_mapping longer than key/value, or head counts differ");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, op, ": caches must be 4-D");
  TORCH_CHECK(key_cache.size(2) == heads && key_cache.size(3) == key.size(2) &&
                  value_cache.size(2) == heads && value_cache.size(3) == value.size(2),
              op, ": cache [num_blocks, block_size, heads, head_size] does not match key/value");
  TORCH_CHECK(key_cache.size(0) == value_cache.size(0) && key_cache.size(1) == value_cache.size(1),
              op, ": key_cache and value_cache must have the same blocks");
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1, op,
              ": caches must be contiguous in head_size");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), op,
              ": key_cache and value_cache dtypes differ");
  const int kv = kv_kind(op, kind, key_cache, key);
  check_scale(op, "k_scale", k_scale, key, heads);
  check_scale(op, "v_scale", v_scale, key, heads);
  const int64_t block_size = key_cache.size(1), num_slots = key_cache.size(0) * block_size;
  TORCH_CHECK(block_size <= std::numeric_limits<int>::max() &&
                  heads * std::max(key.size(2), value.size(2)) <= (1 << 24),
              op, ": sizes out of range");
  if (n == 0 || heads == 0 || num_slots == 0) return;
  const DeviceGuard guard(key.device());
  const auto stream = current_stream();
  const int dev = key.get_device();

  dispatch_kv(op, key.scalar_type(), kv, [&](auto t, auto c, auto kvc) {
    using T = decltype(t);
    using C = decltype(c);
    constexpr int KV = decltype(kvc)::value;
    constexpr int VW = kVecWidth<T>;
    auto side = [&](const at::Tensor& x, at::Tensor& cache, const at::Tensor& s, int w) {
      FlashSide f;
      f.src = x.data_ptr();
      f.src_stride = x.stride(0);
      f.cache = cache.data_ptr();
      f.block_stride = cache.stride(0);
      f.page_stride = cache.stride(1);
      f.head_stride = cache.stride(2);
      f.size = static_cast<int>(x.size(2));
      f.vecs_per_head = f.size / w;
      f.scale = scale_ptr(s);
      f.scale_per_head = s.numel() > 1;
      return f;
    };
    auto aligned = [&](const at::Tensor& x, const at::Tensor& cache) {
      return x.size(2) % VW == 0 && is_aligned(x.data_ptr(), 16) &&
             is_aligned(cache.data_ptr(), VW * sizeof(C)) &&
             all_multiple({x.stride(0), cache.stride(0), cache.stride(1), cache.stride(2)}, VW);
    };
    const bool vec = aligned(key, key_cache) && aligned(value, value_cache);
    // Enough CTAs to fill the GPU at decode sizes; several tokens per CTA for prefill.
    const int64_t sms = sm_count(dev);
    const int tpc = static_cast<int>(std::clamp<int64_t>(n / (sms * 8), 1, 4));
    const dim3 grid(static_cast<unsigned>(ceil_div(n, tpc))), block(kThreads);
    auto* slots = slot_mapping.data_ptr<int64_t>();
    if (vec) {
      launch_kernel(reshape_and_cache_flash_kernel<T, C, KV, VW, 4>, grid, block, stream, dev,
                    slots, n, tpc, num_slots, static_cast<int>(block_size),
                    side(key, key_cache, k_scale, VW), side(value, value_cache, v_scale, VW),
                    static_cast<int>(heads));
    } else {
      launch_kernel(reshape_and_cache_flash_kernel<T, C, KV, 1, 4>, grid, block, stream, dev,
                    slots, n, tpc, num_slots, static_cast<int>(block_size),
                    side(key, key_cache, k_scale, 1), side(value, value_cache, v_scale, 1),
                    static_cast<int>(heads));
    }
  });
}

// ---------------------------------------------------------------------------------------------
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t kind,
                       const at::Tensor& k_scale, const at::Tensor& v_scale) {
  constexpr const char* op = "reshape_and_cache";
  check_write_args(op, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const int64_t n = slot_mapping.size(0), heads = key.size(1), hs = key.size(2);
  TORCH_CHECK(n <= key.size(0) && n <= value.size(0) && value.size(1) == heads &&
                  value.size(2) == hs,
              op, ": value must match key, and slot_mapping must not be longer than key");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), op,
              ": key_cache and value_cache dtypes differ");
  const int kv = kv_kind(op, kind, key_cache, key);
  TORCH_CHECK(key_cache.dim() == 5, op,
              ": key_cache must be 5-D [num_blocks, heads, head_size / x, block_size, x]");
  const int64_t x = key_cache.size(4);  // as vLLM reads it; 16 bytes: the vectorised kernels
  TORCH_CHECK(x >= 1 && hs % x == 0, op, ": key_cache.size(4) (x = ", num(x),
              ") must be >= 1 and divide head_size ", num(hs));
  TORCH_CHECK(key_cache.size(1) == heads && key_cache.size(2) * x == hs &&
                  (x == 1 || key_cache.stride(4) == 1),
              op, ": key_cache must be [num_blocks, heads, head_size / x, block_size, x]");
  TORCH_CHECK(value_cache.dim() == 4 && value_cache.size(0) == key_cache.size(0) &&
                  value_cache.size(1) == heads && value_cache.size(2) == hs &&
                  value_cache.size(3) == key_cache.size(3),
              op, ": value_cache must be [num_blocks, heads, head_size, block_size]");
  check_scale(op, "k_scale", k_scale, key, heads);
  check_scale(op, "v_scale", v_scale, key, heads);
  const int64_t block_size = key_cache.size(3), num_slots = key_cache.size(0) * block_size;
  TORCH_CHECK(block_size <= std::numeric_limits<int>::max() && heads * hs <= (1 << 24) &&
                  heads <= 65535,
              op, ": sizes out of range");
  if (n == 0 || heads == 0 || num_slots == 0) return;
  const DeviceGuard guard(key.device());
  const auto stream = current_stream();
  const int dev = key.get_device();

  dispatch_kv(op, key.scalar_type(), kv, [&](auto t, auto c, auto kvc) {
    using T = decltype(t);
    using C = decltype(c);
    constexpr int KV = decltype(kvc)::value;
    constexpr int VW = kVecWidth<T>;
    const bool x16 = x * static_cast<int64_t>(sizeof(C)) == 16;  // the chunk the kernels take
    auto side = [&](const at::Tensor& src, at::Tensor& cache, const at::Tensor& s) {
      PagedSide p;
      p.src = src.data_ptr();
      p.src_stride = src.stride(0);
      p.cache = cache.data_ptr();
      p.s_block = cache.stride(0);
      p.s_head = cache.stride(1);
      p.s_dim = cache.stride(2);
      p.s_page = cache.stride(3);
      p.scale = scale_ptr(s);
      p.scale_per_head = s.numel() > 1;
      p.vec_rows = cache.dim() == 4 && cache.stride(3) == 1 && is_aligned(cache.data_ptr(), 16) &&
                   all_multiple({cache.stride(0), cache.stride(1), cache.stride(2)}, x) &&
                   value_row_stores_enabled();
      return p;
    };
    const bool vec = hs % VW == 0 && is_aligned(key.data_ptr(), 16) &&
                     is_aligned(value.data_ptr(), 16) &&
                     all_multiple({key.stride(0), value.stride(0)}, VW) &&
                     is_aligned(key_cache.data_ptr(), 16) &&
                     all_multiple({key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                                   key_cache.stride(3)},
                                  x);
    // Tiles of up to 32 consecutive tokens (fewer for short calls: a decode step's few
    // tokens keep every lane busy), one head per CTA row.
    int tile_shift = 0;
    while (tile_shift < 5 && (int64_t(1) << tile_shift) < n) ++tile_shift;
    const dim3 grid(static_cast<unsigned>((n + (int64_t(1) << tile_shift) - 1) >> tile_shift),
                    static_cast<unsigned>(heads)),
        block(kCacheWriteThreads);
    auto* slots = slot_mapping.data_ptr<int64_t>();
    const auto ks = side(key, key_cache, k_scale), vs = side(value, value_cache, v_scale);
    if (!x16) {  // any other x: element by element, a CTA per token
      TORCH_CHECK(n <= std::numeric_limits<int>::max(), op, ": too many tokens");
      launch_kernel(reshape_and_cache_any_x_kernel<T, C, KV>, dim3(static_cast<unsigned>(n)),
                    dim3(static_cast<unsigned>(std::min<int64_t>(kThreads, heads * hs))),
                    stream, dev, slots, num_slots, static_cast<int>(block_size),
                    static_cast<int>(heads), static_cast<int>(hs), static_cast<int>(x), ks, vs);
    } else if (vec && hs <= kStagedMaxHead && n >= staged_cache_min_tokens())
      // 8 (fp8: 4) 16-byte items in flight per thread: a 32-token tile of a 128-wide head is
      // one round trip; fp8's 32-byte input items at 8 would cost 179 registers (2 CTAs / SM)
      launch_kernel(reshape_and_cache_staged_kernel<T, C, KV, sizeof(C) == 1 ? 4 : 8>, grid,
                    block, stream, dev, slots, n, num_slots, static_cast<int>(block_size),
                    static_cast<int>(hs), tile_shift, ks, vs);
    else if (vec && vs.vec_rows)
      launch_kernel(reshape_and_cache_kernel<T, C, KV, true, 4, true>, grid,
                    dim3(register_cache_threads()), stream, dev, slots, n, num_slots,
                    static_cast<int>(block_size), static_cast<int>(hs), tile_shift, ks, vs);
    else if (vec)
      launch_kernel(reshape_and_cache_kernel<T, C, KV, true, 4, false>, grid,
                    dim3(register_cache_threads()), stream, dev, slots,
                    n, num_slots, static_cast<int>(block_size), static_cast<int>(hs),
                    tile_shift, ks, vs);
    else
      launch_kernel(reshape_and_cache_kernel<T, C, KV, false, 4, false>, grid, block, stream, dev,
                    slots, n, num_slots, static_cast<int>(block_size), static_cast<int>(hs),
                    tile_shift, ks, vs);
  });
}

// ---------------------------------------------------------------------------------------------
// gather_and_maybe_dequant_cache (token_to_seq given) and cp_gather_cache (token_to_seq null,
// kind auto: a bit copy)
void gather_cache(const at::Tensor& src_cache, at::Tensor& dst, const at::Tensor& block_table,
                  const at::Tensor& cu_seq_lens, const std::optional<at::Tensor>& token_to_seq,
                  int64_t rows, int64_t batch, int64_t kind, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& seq_starts) {
  const char* op = token_to_seq ? "gather_and_maybe_dequant_cache" : "cp_gather_cache";
  TORCH_CHECK(on_device(src_cache), op, ": src_cache must be a CUDA tensor");
  check_on(op, "dst", dst, src_cache);
  check_on(op, "block_table", block_table, src_cache);
  check_on(op, "cu_seq_lens", cu_seq_lens, src_cache);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  (block_table.size(1) <= 1 || block_table.stride(1) == 1),
              op, ": block_table must be a 2-D int32 tensor with contiguous rows");
  TORCH_CHECK(cu_seq_lens.scalar_type() == at::kInt && cu_seq_lens.dim() == 1 &&
                  cu_seq_lens.size(0) >= batch + 1 && cu_seq_lens.is_contiguous(),
              op, ": cu_seq_lens must be a contiguous int32 tensor of batch + 1 offsets");
  TORCH_CHECK(block_table.size(0) >= batch, op, ": block_table needs a row per sequence");
  TORCH_CHECK(batch >= 0 && batch <= std::numeric_limits<int>::max() && rows >= 0 &&
                  rows <= dst.size(0),
              op, ": bad batch or row count");
  if (token_to_seq) {
    check_on(op, "token_to_seq", *token_to_seq, src_cache);
    TORCH_CHECK(token_to_seq->scalar_type() == at::kInt && token_to_seq->dim() == 1 &&
                    token_to_seq->is_contiguous() && token_to_seq->size(0) >= rows,
                op, ": token_to_seq must be a contiguous int32 tensor of num_tokens entries");
  }
  if (seq_starts) {
    check_on(op, "seq_starts", *seq_starts, src_cache);
    TORCH_CHECK(seq_starts->scalar_type() == at::kInt && seq_starts->dim() == 1 &&
                    seq_starts->is_contiguous() && seq_starts->size(0) >= batch,
                op, ": seq_starts must be a contiguous int32 tensor of batch entries");
  }
  TORCH_CHECK(src_cache.dim() >= 3 && dst.dim() >= 2, op, ": bad src_cache or dst rank");
  int64_t entry = 1, dst_entry = 1;
  for (int64_t d = 2; d < src_cache.dim(); ++d) entry *= src_cache.size(d);
  for (int64_t d = 1; d < dst.dim(); ++d) dst_entry *= dst.size(d);
  TORCH_CHECK(dst_entry == entry, op, ": dst entries must match src_cache entries");
  // Entries are contiguous runs: checked in Python; re-check the strides used here.
  int64_t expect = 1;
  for (int64_t d = src_cache.dim() - 1; d >= 2; --d) {
    TORCH_CHECK(src_cache.size(d) == 1 || src_cache.stride(d) == expect, op,
                ": src_cache entries must be contiguous");
    expect *= src_cache.size(d);
  }
  expect = 1;
  for (int64_t d = dst.dim() - 1; d >= 1; --d) {
    TORCH_CHECK(dst.size(d) == 1 || dst.stride(d) == expect, op, ": dst entries must be contiguous");
    expect *= dst.size(d);
  }
  int kv = kKvAuto;
  if (kind != kKvAuto) {
    TORCH_CHECK(scale.has_value(), op, ": an FP8 gather needs a scale");
    check_on(op, "scale", *scale, src_cache);
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == 1, op,
                ": scale must be one float32 value");
    check_float_type(op, "dst", dst);
    kv = kv_kind(op, kind, src_cache, dst);
  } else {
    TORCH_CHECK(src_cache.scalar_type() == dst.scalar_type(), op,
                ": dst must have src_cache's dtype");
  }
  if (rows == 0 || batch == 0 || entry == 0) return;
  const DeviceGuard guard(src_cache.device());
  const auto stream = current_stream();
  const int dev = src_cache.get_device();

  GatherArgs a;
  a.src = src_cache.data_ptr();
  a.block_stride = src_cache.stride(0);
  a.page_stride = src_cache.stride(1);
  TORCH_CHECK(src_cache.size(1) <= std::numeric_limits<int>::max(), op, ": block size too large");
  a.block_size = static_cast<int>(src_cache.size(1));
  a.num_blocks = src_cache.size(0);
  a.dst = dst.data_ptr();
  a.dst_stride = dst.stride(0);
  a.entry = entry;
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_stride = block_table.stride(0);
  a.bt_cols = block_table.size(1);
  a.cu_seq_lens = cu_seq_lens.data_ptr<int32_t>();
  a.token_to_seq = token_to_seq ? token_to_seq->data_ptr<int32_t>() : nullptr;
  a.seq_starts = seq_starts ? seq_starts->data_ptr<int32_t>() : nullptr;
  a.rows = rows;
  a.batch = static_cast<int>(batch);
  a.scale = kind != kKvAuto ? scale->data_ptr<float>() : nullptr;
  if (a.block_size == 0 || a.bt_cols == 0) return;

  constexpr int kWarps = kThreads / 32;
  const int64_t max_ctas = static_cast<int64_t>(sm_count(dev)) * 16;
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(rows, kWarps), max_ctas))),
      block(kThreads);
  // The widest access that keeps every row of both sides aligned: W elements of the wider type.
  auto run = [&](auto t, auto c, auto kvc) {
    using T = decltype(t);
    using C = decltype(c);
    constexpr int KV = decltype(kvc)::value;
    constexpr int W = 16 / static_cast<int>(sizeof(T) > sizeof(C) ? sizeof(T) : sizeof(C));
    const bool vec = entry % W == 0 && is_aligned(a.src, W * sizeof(C)) &&
                     is_aligned(a.dst, W * sizeof(T)) &&
                     all_multiple({a.block_stride, a.page_stride, a.dst_stride}, W);
    if (vec)
      launch_kernel(gather_cache_kernel<T, C, KV, W, 4>, grid, block, stream, dev, a);
    else
      launch_kernel(gather_cache_kernel<T, C, KV, 1, 4>, grid, block, stream, dev, a);
  };
  if (kv == kKvAuto) {
    switch (src_cache.element_size()) {  // a bit copy: move raw words
      case 1: run(uint8_t{}, uint8_t{}, std::integral_constant<int, kKvAuto>{}); break;
      case 2: run(uint16_t{}, uint16_t{}, std::integral_constant<int, kKvAuto>{}); break;
      case 4: run(uint32_t{}, uint32_t{}, std::integral_constant<int, kKvAuto>{}); break;
      case 8: run(uint64_t{}, uint64_t{}, std::integral_constant<int, kKvAuto>{}); break;
      default: TORCH_CHECK(false, op, ": unsupported element size");
    }
  } else {
    dispatch_kv(op, dst.scalar_type(), kv, run);
  }
}

// ---------------------------------------------------------------------------------------------
// convert_fp8, block by block along dim 0 (vLLM's convert_fp8): output and input have the same
// number of blocks and elements per block, every block of both is dense in row-major order (the
// Python layer makes it so), each side has its own block stride (stride(0)). Element i of a block
// converts element i of the same block of the input.
void convert_fp8(at::Tensor& output, const at::Tensor& input, double scale, int64_t kind) {
  constexpr const char* op = "convert_fp8";
  TORCH_CHECK(on_device(input), op, ": input must be a CUDA tensor");
  check_on(op, "output", output, input);
  TORCH_CHECK(output.dim() >= 1 && input.dim() >= 1, op,
              ": output and input must have a block dimension (dim 0)");
  TORCH_CHECK(output.size(0) == input.size(0), op,
              ": output and input must have the same number of blocks (size(0))");
  auto dense_block = [](const at::Tensor& t) {  // elements per block, or -1 when not dense
    int64_t expect = 1;
    for (int64_t d = t.dim() - 1; d >= 1; --d) {
      if (t.size(d) != 1 && t.stride(d) != expect) return int64_t(-1);
      expect *= t.size(d);
    }
    return expect;
  };
  const int64_t per_block = dense_block(input);
  TORCH_CHECK(per_block >= 0 && dense_block(output) >= 0, op,
              ": output and input must be contiguous within a block (dims after 0)");
  TORCH_CHECK(dense_block(output) == per_block, op,
              ": output and input blocks must hold the same number of elements");
  const int64_t blocks = input.size(0), n = blocks * per_block;
  const int64_t in_stride = input.stride(0), out_stride = output.stride(0);
  TORCH_CHECK(blocks <= 1 || out_stride >= per_block, op, ": output blocks overlap in memory");
  if (n == 0) return;
  // One flat run on both sides (a contiguous cache, or a slice of one along dim 0): the flat
  // kernel over all n elements; otherwise the block kernel with both strides.
  const bool flat = blocks == 1 || (in_stride == per_block && out_stride == per_block);
  const DeviceGuard guard(input.device());
  const auto stream = current_stream();
  const int dev = input.get_device();
  const float s = static_cast<float>(scale);
  auto is_float = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
  };
  auto launch = [&](auto in_t, auto out_t, auto mode_c, auto kv_c) {
    using In = decltype(in_t);
    using Out = decltype(out_t);
    constexpr int MODE = decltype(mode_c)::value;
    constexpr int KV = decltype(kv_c)::value;
    constexpr int W = 16 / static_cast<int>(sizeof(In) > sizeof(Out) ? sizeof(In) : sizeof(Out));
    const auto* ip = static_cast<const In*>(input.data_ptr());
    auto* optr = static_cast<Out*>(output.data_ptr());
    const bool aligned = is_aligned(ip, W * sizeof(In)) && is_aligned(optr, W * sizeof(Out));
    const int64_t max_ctas = int64_t(sm_count(dev)) * 16;
    if (flat) {
      const int64_t ctas = std::min(ceil_div(n, kThreads * W), max_ctas);
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(ctas, 1))), block(kThreads);
      if (aligned)
        launch_kernel(convert_fp8_kernel<In, Out, MODE, KV, W>, grid, block, stream, dev, ip,
                      optr, n, s);
      else
        launch_kernel(convert_fp8_kernel<In, Out, MODE, KV, 1>, grid, block, stream, dev, ip,
                      optr, n, s);
      return;
    }
    const bool vec = aligned && all_multiple({per_block, in_stride, out_stride}, W);
    auto blocks_grid = [&](int64_t packs) {  // CTAs along a block x CTAs along the blocks
      const int64_t gx = std::clamp<int64_t>(ceil_div(packs, kThreads), 1, 64);
      const int64_t gy = std::clamp<int64_t>(max_ctas / gx, 1, std::min<int64_t>(blocks, 65535));
      return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    };
    if (vec)
      launch_kernel(convert_fp8_blocks_kernel<In, Out, MODE, KV, W>, blocks_grid(per_block / W),
                    dim3(kThreads), stream, dev, ip, optr, blocks, per_block, in_stride,
                    out_stride, s);
    else
      launch_kernel(convert_fp8_blocks_kernel<In, Out, MODE, KV, 1>, blocks_grid(per_block),
                    dim3(kThreads), stream, dev, ip, optr, blocks, per_block, in_stride,
                    out_stride, s);
  };
  auto with_float = [&](at::ScalarType t, auto&& f) {
    switch (t) {
      case at::kFloat: f(float{}); break;
      case at::kHalf: f(__half{}); break;
      case at::kBFloat16: f(__nv_bfloat16{}); break;
      default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
    }
  };
  using Auto = std::integral_constant<int, kKvAuto>;
  if (kind == kKvAuto) {
    TORCH_CHECK(is_float(input.scalar_type()) && is_float(output.scalar_type()), op,
                ": 'auto' converts between float32, float16 and bfloat16");
    with_float(input.scalar_type(), [&](auto i) {
      with_float(output.scalar_type(), [&](auto o) {
        launch(i, o, std::integral_constant<int, 0>{}, Auto{});
      });
    });
    return;
  }
  TORCH_CHECK(kind == kKvE4M3 || kind == kKvE5M2, op, ": bad kv_dtype kind ", num(kind));
  const bool quant = is_float(input.scalar_type());
  const at::Tensor& codes = quant ? output : input;
  const at::Tensor& floats = quant ? input : output;
  TORCH_CHECK(is_float(floats.scalar_type()), op, ": one side must be float32/float16/bfloat16");
  kv_kind(op, kind, codes, floats);
  with_float(floats.scalar_type(), [&](auto f) {
    using F = decltype(f);
    if (quant) {
      if (kind == kKvE4M3)
        launch(F{}, uint8_t{}, std::integral_constant<int, 1>{},
               std::integral_constant<int, kKvE4M3>{});
      else
        launch(F{}, uint8_t{}, std::integral_constant<int, 1>{},
               std::integral_constant<int, kKvE5M2>{});
    } else {
      if (kind == kKvE4M3)
        launch(uint8_t{}, F{}, std::integral_constant<int, -1>{},
               std::integral_constant<int, kKvE4M3>{});
      else
        launch(uint8_t{}, F{}, std::integral_constant<int, -1>{},
               std::integral_constant<int, kKvE5M2>{});
    }
  });
}

// ---------------------------------------------------------------------------------------------
// swap_blocks: block_mapping is a contiguous CPU int64 [pairs, 2] (ids checked in Python).
// Runs of consecutive blocks become one cudaMemcpyAsync; many scattered blocks between device
// memory and device-visible (pinned) host memory go through one copy kernel instead of one DMA
// call per block. mode: "auto" | "memcpy" | "kernel".
namespace {

struct Run {
  int64_t src, dst, count;
};

#if defined(COMPILE_OPS_EMULATE)
void* device_address(void* p, bool) { return p; }
void copy_async(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(d, s, n);
}
at::Tensor mapping_on_device(const at::Tensor& m, const at::Device&) { return m; }
#else
// Device-visible address of a CUDA or pinned host pointer; nullptr for pageable host memory.
void* device_address(void* p, bool on_gpu) {
  if (on_gpu) return p;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  if (attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr) return nullptr;
  return attr.devicePointer;
}

void copy_async(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMemcpyAsync(d, s, n, kind, stream));
}

// Through pinned memory: the caching host allocator keeps the staging buffer alive until the
// copy has run.
at::Tensor mapping_on_device(const at::Tensor& m, const at::Device& dev) {
  return m.pin_memory().to(at::TensorOptions().device(dev).dtype(at::kLong),
                           /*non_blocking=*/true);
}
#endif

}  // namespace

void swap_blocks(const at::Tensor& src, at::Tensor& dst, int64_t block_bytes,
                 const at::Tensor& block_mapping, const std::string& mode) {
  constexpr const char* op = "swap_blocks";
  const bool src_gpu = on_device(src), dst_gpu = on_device(dst);
  TORCH_CHECK(src_gpu || dst_gpu, op, ": src or dst must be a CUDA tensor");
  TORCH_CHECK(!(src_gpu && dst_gpu) || src.device() == dst.device(), op,
              ": src and dst must be on the same GPU");
  TORCH_CHECK((src.is_cuda() || src.is_cpu()) && (dst.is_cuda() || dst.is_cpu()), op,
              ": src and dst must be CPU or CUDA tensors");
  TORCH_CHECK(block_mapping.is_cpu() && block_mapping.scalar_type() == at::kLong &&
                  block_mapping.dim() == 2 && block_mapping.size(1) == 2 &&
                  block_mapping.is_contiguous(),
              op, ": block_mapping must be a contiguous CPU int64 [num_pairs, 2] tensor");
  TORCH_CHECK(mode == "auto" || mode == "memcpy" || mode == "kernel", op, ": bad mode");
  const int64_t pairs = block_mapping.size(0);
  if (pairs == 0 || block_bytes == 0) return;
  TORCH_CHECK(block_bytes > 0, op, ": block_size_in_bytes must be positive");
  const int64_t s_step = src.size(0) > 1 ? src.stride(0) * src.element_size() : block_bytes;
  const int64_t d_step = dst.size(0) > 1 ? dst.stride(0) * dst.element_size() : block_bytes;
  const int64_t* m = block_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < pairs; ++i) {
    TORCH_CHECK(m[2 * i] >= 0 && m[2 * i] < src.size(0) && m[2 * i + 1] >= 0 &&
                    m[2 * i + 1] < dst.size(0),
                op, ": block_mapping row ", num(i), " is out of range");
  }
  const at::Device cuda_dev = src_gpu ? src.device() : dst.device();
  const DeviceGuard guard(cuda_dev);
  const auto stream = current_stream();
  char* sp = static_cast<char*>(src.data_ptr());
  char* dp = static_cast<char*>(dst.data_ptr());

  // Consecutive pairs with consecutive ids on both sides and no padding between blocks.
  std::vector<Run> runs;
  const bool packed = s_step == block_bytes && d_step == block_bytes;
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t s = m[2 * i], d = m[2 * i + 1];
    if (packed && !runs.empty() && runs.back().src + runs.back().count == s &&
        runs.back().dst + runs.back().count == d)
      ++runs.back().count;
    else
      runs.push_back({s, d, 1});
  }
  const cudaMemcpyKind kind = src_gpu && dst_gpu ? cudaMemcpyDeviceToDevice
                              : src_gpu          ? cudaMemcpyDeviceToHost
                                                 : cudaMemcpyHostToDevice;
  char* s_dev = static_cast<char*>(device_address(sp, src_gpu));
  char* d_dev = static_cast<char*>(device_address(dp, dst_gpu));
  const bool kernel_possible = s_dev != nullptr && d_dev != nullptr;
  TORCH_CHECK(mode != "kernel" || kernel_possible, op,
              ": COMPILE_OPS_SWAP_MODE=kernel needs pinned (page-locked) host memory");
  // DMA calls cost a few microseconds each: worth it for few, large runs.
  const int64_t avg_run_bytes = pairs * block_bytes / static_cast<int64_t>(runs.size());
  const bool use_kernel =
      kernel_possible && (mode == "kernel" ||
                          (mode == "auto" && runs.size() > 8 && avg_run_bytes < (4 << 20)));
  if (!use_kernel) {
    for (const Run& r : runs)
      copy_async(dp + r.dst * d_step, sp + r.src * s_step, r.count * block_bytes, kind, stream);
    return;
  }
  const at::Tensor dev_map = mapping_on_device(block_mapping, cuda_dev);
  const bool v16 = block_bytes % 16 == 0 && s_step % 16 == 0 && d_step % 16 == 0 &&
                   is_aligned(s_dev, 16) && is_aligned(d_dev, 16);
  const int64_t units = v16 ? block_bytes / 16 : block_bytes;
  const int64_t chunks = std::min<int64_t>(ceil_div(units, kThreads * 4), 65535);
  TORCH_CHECK(pairs <= std::numeric_limits<int>::max(), op, ": too many pairs");
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(std::max<int64_t>(chunks, 1))),
      block(kThreads);
  const int dev = cuda_dev.index();
  const int64_t* mp = dev_map.data_ptr<int64_t>();
  if (v16)
    launch_kernel(swap_blocks_kernel<int4>, grid, block, stream, dev, s_dev, d_dev, mp, s_step,
                  d_step, block_bytes);
  else
    launch_kernel(swap_blocks_kernel<uint8_t>, grid, block, stream, dev, s_dev, d_dev, mp, s_step,
                  d_step, block_bytes);
}

}  // namespace compile_ops
