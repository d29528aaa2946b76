// Launchers for the FP8 activation quantization ops (static_scaled_fp8_quant,
// dynamic_scaled_fp8_quant, dynamic_per_token_scaled_fp8_quant, per_token_group_fp8_quant):
// argument checks (the second line of defence behind compile_ops/quant.py), device guard,
// current stream, dtype dispatch, vector-width and launch-shape choice. Kernels:
// compile_ops/quant_kernels.cuh.
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "compile_ops/quant_kernels.cuh"
#include "launch_utils.h"

namespace compile_ops {
namespace {

// Rows of at most this many packs go one per warp (4 rows per block); longer rows one per block.
constexpr int kQuantWarpRowPacks = 128;
constexpr int kQuantRowsPerBlock = 4;
constexpr int kQuantMaxThreads = 512;

template <typename F>
void dispatch_float(const char* op, at::ScalarType s, F&& f) {
  switch (s) {
    case at::ScalarType::Float: f(float{}); break;
    case at::ScalarType::Half: f(__half{}); break;
    case at::ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", s);
  }
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Smallest V in {1, 2, 4, 8} with ceil(n / V) <= limit, or 0 if none.
int packs_per_thread(int64_t n, int64_t limit) {
  for (int v = 1; v <= 8; v *= 2)
    if (ceil_div(n, v) <= limit) return v;
  return 0;
}

struct Plan {
  dim3 grid, block;
};

// A launch over `rows` rows of n packs with a thread loop: a warp per row for short rows.
Plan loop_plan(int64_t n, int64_t rows) {
  Plan p;
  if (n <= kQuantWarpRowPacks) {
    p.block = dim3(32, kQuantRowsPerBlock);
    p.grid = dim3(static_cast<unsigned>(ceil_div(rows, kQuantRowsPerBlock)));
  } else {
    p.block = dim3(static_cast<unsigned>(std::min<int64_t>(kQuantMaxThreads, round_up(n, 32))));
    p.grid = dim3(static_cast<unsigned>(rows));
  }
  return p;
}

void check_fp8_out(const char* op, const char* name, const at::Tensor& t,
                   const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == at::kFloat8_e4m3fn, op, ": ", name,
              " must be float8_e4m3fn, got ", t.scalar_type());
  check_on(op, name, t, input);
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " must have the shape of input ",
              dims(input.sizes()), ", got ", dims(t.sizes()));
}

void check_f32(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  check_on(op, name, t, input);
}

// The elements of `t` as one strided run (its dims of more than one element collapse into one
// stride); returns that stride (1 for at most one element).
int64_t single_stride(const char* op, const char* name, const at::Tensor& t) {
  int64_t stride = 1, expect = -1;
  bool first = true;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    TORCH_CHECK(expect < 0 || t.stride(d) == expect, op, ": ", name,
                " dims must collapse into one stride, got shape ", dims(t.sizes()),
                " and strides ", dims(t.strides()));
    if (first) stride = t.stride(d);
    first = false;
    expect = t.stride(d) * t.size(d);
  }
  TORCH_CHECK(t.numel() <= 1 || stride >= 1, op, ": ", name, " elements overlap in memory");
  return stride;
}

// Rows of `hidden` elements in packs of W where every row of both tensors is aligned.
template <typename T>
bool rows_aligned(const RowView& in, const RowView& out, int64_t hidden) {
  constexpr int W = kVecWidth<T>;
  return hidden % W == 0 && in.aligned(W) && out.stride % W == 0 && is_aligned(out.ptr, W);
}

struct IO {
  RowView in, out;
  int64_t rows, hidden;
};

IO quant_io(const char* op, const at::Tensor& result, const at::Tensor& input) {
  check_float_type(op, "input", input);
  TORCH_CHECK(on_device(input), op, ": input must be a CUDA tensor, got ", input.device());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  check_fp8_out(op, "result", result, input);
  IO io;
  io.in = row_view(op, "input", input, /*writable=*/false);
  io.out = row_view(op, "result", result, /*writable=*/true);
  io.rows = io.in.rows;
  io.hidden = input.size(-1);
  TORCH_CHECK(io.hidden <= std::numeric_limits<int>::max(), op, ": hidden size too large");
  TORCH_CHECK(io.rows <= std::numeric_limits<int>::max(), op, ": too many rows");
  return io;
}

// The static kernel over io's rows with scale[(m / gm) * s_i + (n / gn) * s_j].
template <typename T>
void launch_static(const IO& io, const float* scale, int64_t s_i, int64_t s_j, int64_t gm,
                   int64_t gn, cudaStream_t stream, int dev) {
  constexpr int VW = kVecWidth<T>;
  const auto out = static_cast<uint8_t*>(io.out.ptr);
  const auto in = static_cast<const T*>(io.in.ptr);
  const int hidden = static_cast<int>(io.hidden), group_n = static_cast<int>(gn);
  if (rows_aligned<T>(io.in, io.out, io.hidden)) {
    const Plan p = loop_plan(io.hidden / VW, io.rows);
    launch_kernel(static_fp8_quant_kernel<T, VW>, p.grid, p.block, stream, dev, out,
                  io.out.stride, in, io.in.stride, scale, s_i, s_j, gm, group_n, io.rows,
                  hidden);
  } else {
    const Plan p = loop_plan(io.hidden, io.rows);
    launch_kernel(static_fp8_quant_kernel<T, 1>, p.grid, p.block, stream, dev, out,
                  io.out.stride, in, io.in.stride, scale, s_i, s_j, gm, group_n, io.rows,
                  hidden);
  }
}

template <typename T, int W>
void launch_per_token(const IO& io, float* scale, int64_t scale_stride, const float* ub,
                      cudaStream_t stream, int dev) {
  const int64_t n = io.hidden / W;
  dim3 grid, block;
  int v;
  if (n <= 32 * 8) {
    v = packs_per_thread(n, 32);
    block = dim3(32, kQuantRowsPerBlock);
    grid = dim3(static_cast<unsigned>(ceil_div(io.rows, kQuantRowsPerBlock)));
  } else {
    v = packs_per_thread(n, 256);
    const int64_t threads =
        v ? round_up(ceil_div(n, v), 32) : std::min<int64_t>(1024, round_up(n, 32));
    block = dim3(static_cast<unsigned>(threads));
    grid = dim3(static_cast<unsigned>(io.rows));
  }
  const auto args = [&](auto kernel) {
    launch_kernel(kernel, grid, block, stream, dev, static_cast<uint8_t*>(io.out.ptr),
                  io.out.stride, static_cast<const T*>(io.in.ptr), io.in.stride, scale,
                  scale_stride, ub, io.rows, static_cast<int>(io.hidden));
  };
  switch (v) {
    case 1: args(per_token_fp8_quant_kernel<T, W, 1>); break;
    case 2: args(per_token_fp8_quant_kernel<T, W, 2>); break;
    case 4: args(per_token_fp8_quant_kernel<T, W, 4>); break;
    case 8: args(per_token_fp8_quant_kernel<T, W, 8>); break;
    default: args(per_token_fp8_quant_kernel<T, W, 0>); break;
  }
}

struct GroupArgs {
  uint8_t* out;
  const void* in;
  float* out_s;
  int64_t s_t, s_g, num_groups, groups_per_row;
  int group_size, lanes, v;
  float eps, fp8_min, fp8_max;
  dim3 grid, block;
};

template <typename T, int W, bool UE8M0>
void launch_group(const GroupArgs& a, cudaStream_t stream, int dev) {
  const auto go = [&](auto kernel) {
    launch_kernel(kernel, a.grid, a.block, stream, dev, a.out, static_cast<const T*>(a.in),
                  a.out_s, a.s_t, a.s_g, a.num_groups, a.groups_per_row, a.group_size, a.lanes,
                  a.eps, a.fp8_min, a.fp8_max);
  };
  switch (a.v) {
    case 1: go(group_fp8_quant_kernel<T, W, 1, UE8M0>); break;
    case 2: go(group_fp8_quant_kernel<T, W, 2, UE8M0>); break;
    case 4: go(group_fp8_quant_kernel<T, W, 4, UE8M0>); break;
    case 8: go(group_fp8_quant_kernel<T, W, 8, UE8M0>); break;
    default: go(group_fp8_quant_kernel<T, W, 0, UE8M0>); break;
  }
}

}  // namespace

void static_scaled_fp8_quant(at::Tensor& result, const at::Tensor& input,
                             const at::Tensor& scale, int64_t group_m, int64_t group_n) {
  const char* op = "static_scaled_fp8_quant";
  const IO io = quant_io(op, result, input);
  check_f32(op, "scale", scale, input);
  if (io.rows == 0 || io.hidden == 0) return;
  int64_t s_i = 0, s_j = 0, gm = io.rows, gn = io.hidden;
  if (scale.numel() != 1) {
    TORCH_CHECK(group_m >= 1 && group_n >= 1 && io.rows % group_m == 0 &&
                    io.hidden % group_n == 0,
                op, ": group sizes (", num(group_m), ", ", num(group_n),
                ") must divide the input's [", num(io.rows), ", ", num(io.hidden), "]");
    gm = group_m;
    gn = group_n;
    const int64_t ms = io.rows / gm, ns = io.hidden / gn;
    TORCH_CHECK(scale.numel() == ms * ns, op, ": scale must have ", num(ms * ns),
                " elements for groups (", num(gm), ", ", num(gn), "), got ", num(scale.numel()));
    if (scale.dim() == 1) {
      TORCH_CHECK(ms == 1 || ns == 1, op,
                  ": a 1-D scale must be per column group or per row group");
      (ms == 1 ? s_j : s_i) = scale.stride(0);
    } else {
      TORCH_CHECK(scale.dim() == 2 && scale.size(0) == ms && scale.size(1) == ns, op,
                  ": scale must be [", num(ms), ", ", num(ns), "], got ", dims(scale.sizes()));
      s_i = scale.stride(0);
      s_j = scale.stride(1);
    }
  }
  const DeviceGuard guard(input.device());
  const int dev = input.get_device();
  const auto stream = current_stream();
  const float* s = scale.data_ptr<float>();
  dispatch_float(op, input.scalar_type(), [&](auto tag) {
    launch_static<decltype(tag)>(io, s, s_i, s_j, gm, gn, stream, dev);
  });
}

void dynamic_scaled_fp8_quant(at::Tensor& result, const at::Tensor& input, at::Tensor& scale) {
  const char* op = "dynamic_scaled_fp8_quant";
  const IO io = quant_io(op, result, input);
  check_f32(op, "scale", scale, input);
  TORCH_CHECK(scale.numel() >= 1, op, ": scale must have at least one element");
  const DeviceGuard guard(input.device());
  const int dev = input.get_device();
  const auto stream = current_stream();
  float* s = scale.data_ptr<float>();
  // The atomic max needs a zeroed scale; the op sets it itself (an empty input leaves 0).
  launch_kernel(zero_scale_kernel, dim3(1), dim3(1), stream, dev, s);
  if (io.rows == 0 || io.hidden == 0) return;
  dispatch_float(op, input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VW = kVecWidth<T>;
    const auto in = static_cast<const T*>(io.in.ptr);
    const int hidden = static_cast<int>(io.hidden);
    if (hidden % VW == 0 && io.in.aligned(VW)) {
      const Plan p = loop_plan(io.hidden / VW, io.rows);
      launch_kernel(absmax_scale_kernel<T, VW>, p.grid, p.block, stream, dev, s, in,
                    io.in.stride, io.rows, hidden);
    } else {
      const Plan p = loop_plan(io.hidden, io.rows);
      launch_kernel(absmax_scale_kernel<T, 1>, p.grid, p.block, stream, dev, s, in,
                    io.in.stride, io.rows, hidden);
    }
    launch_static<T>(io, s, 0, 0, io.rows, io.hidden, stream, dev);
  });
}

void dynamic_per_token_scaled_fp8_quant(at::Tensor& result, const at::Tensor& input,
                                        at::Tensor& scale,
                                        const std::optional<at::Tensor>& scale_ub) {
  const char* op = "dynamic_per_token_scaled_fp8_quant";
  const IO io = quant_io(op, result, input);
  check_f32(op, "scale", scale, input);
  TORCH_CHECK(scale.numel() == io.rows, op, ": scale must have one element per token (",
              num(io.rows), "), got shape ", dims(scale.sizes()));
  const int64_t scale_stride = single_stride(op, "scale", scale);
  const float* ub = nullptr;
  if (scale_ub.has_value() && scale_ub->defined()) {
    check_f32(op, "scale_ub", *scale_ub, input);
    TORCH_CHECK(scale_ub->numel() == 1, op, ": scale_ub must have one element, got shape ",
                dims(scale_ub->sizes()));
    ub = scale_ub->data_ptr<float>();
  }
  if (io.rows == 0 || io.hidden == 0) return;
  const DeviceGuard guard(input.device());
  const int dev = input.get_device();
  const auto stream = current_stream();
  float* s = scale.data_ptr<float>();
  dispatch_float(op, input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (rows_aligned<T>(io.in, io.out, io.hidden))
      launch_per_token<T, kVecWidth<T>>(io, s, scale_stride, ub, stream, dev);
    else
      launch_per_token<T, 1>(io, s, scale_stride, ub, stream, dev);
  });
}

void per_token_group_fp8_quant(const at::Tensor& input, at::Tensor& output_q,
                               at::Tensor& output_s, int64_t group_size, double eps,
                               double fp8_min, double fp8_max, bool scale_ue8m0) {
  const char* op = "per_token_group_fp8_quant";
  check_float_type(op, "input", input);
  TORCH_CHECK(on_device(input), op, ": input must be a CUDA tensor, got ", input.device());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous");
  check_fp8_out(op, "output_q", output_q, input);
  TORCH_CHECK(output_q.is_contiguous(), op, ": output_q must be contiguous");
  check_f32(op, "output_s", output_s, input);
  const int64_t k = input.size(-1);
  TORCH_CHECK(group_size > 0 && k % group_size == 0 &&
                  group_size <= std::numeric_limits<int>::max(),
              op, ": group_size must be positive and divide the last dimension ", num(k),
              ", got ", num(group_size));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0");
  TORCH_CHECK(std::isfinite(fp8_min) && std::isfinite(fp8_max) && fp8_min < fp8_max, op,
              ": fp8_min and fp8_max must be finite with fp8_min < fp8_max");
  const int64_t g = k / group_size;
  const int64_t t = k == 0 ? 0 : input.numel() / k;
  // output_s: [T, G] (any strides) or input.shape[:-1] + (G,) with the token dims collapsing
  // into one stride.
  int64_t s_t = 0, s_g = 0;
  const bool two_d = output_s.dim() == 2 && output_s.size(0) == t && output_s.size(1) == g;
  std::vector<int64_t> want(input.sizes().begin(), input.sizes().end());
  want.back() = g;
  TORCH_CHECK(two_d || output_s.sizes() == at::IntArrayRef(want), op,
              ": output_s must have shape ", dims(want), " or [", num(t), ", ", num(g),
              "], got ", dims(output_s.sizes()));
  if (input.numel() == 0) return;
  s_g = output_s.stride(-1);
  if (two_d) {
    s_t = output_s.stride(0);
  } else if (output_s.dim() >= 2) {
    s_t = single_stride(op, "output_s token dims",
                        output_s.narrow(-1, 0, 1).squeeze(-1));
  }
  {  // written elements at distinct addresses
    std::vector<std::pair<int64_t, int64_t>> d;  // (stride, size) of the dims of > 1 element
    if (t > 1) d.emplace_back(s_t, t);
    if (g > 1) d.emplace_back(s_g, g);
    std::sort(d.begin(), d.end());
    int64_t extent = 1;
    for (const auto& [st, sz] : d) {
      TORCH_CHECK(st >= extent, op, ": output_s elements overlap in memory (strides ",
                  dims(output_s.strides()), ")");
      extent += st * (sz - 1);
    }
  }
  const int64_t num_groups = t * g;
  const DeviceGuard guard(input.device());
  const int dev = input.get_device();
  const auto stream = current_stream();
  dispatch_float(op, input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int VW = kVecWidth<T>;
    const bool aligned = group_size % VW == 0 && is_aligned(input.data_ptr(), 16) &&
                         is_aligned(output_q.data_ptr(), VW);
    const int64_t n = aligned ? group_size / VW : group_size;
    GroupArgs a;
    a.out = static_cast<uint8_t*>(output_q.data_ptr());
    a.in = input.data_ptr();
    a.out_s = output_s.data_ptr<float>();
    a.s_t = s_t;
    a.s_g = s_g;
    a.num_groups = num_groups;
    a.groups_per_row = g;
    a.group_size = static_cast<int>(group_size);
    int lanes = 1;
    while (lanes < 32 && lanes < n) lanes *= 2;
    a.lanes = lanes;
    a.v = 0;
    for (int v = 1; v <= 8; v *= 2)
      if (static_cast<int64_t>(v) * lanes >= n) {
        a.v = v;
        break;
      }
    a.eps = static_cast<float>(eps);
    a.fp8_min = static_cast<float>(fp8_min);
    a.fp8_max = static_cast<float>(fp8_max);
    const int64_t threads = std::min<int64_t>(256, round_up(num_groups * lanes, 32));
    const int64_t blocks = ceil_div(num_groups, threads / lanes);
    TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": too many groups");
    a.block = dim3(static_cast<unsigned>(threads));
    a.grid = dim3(static_cast<unsigned>(blocks));
    if (aligned) {
      if (scale_ue8m0) launch_group<T, VW, true>(a, stream, dev);
      else launch_group<T, VW, false>(a, stream, dev);
    } else {
      if (scale_ue8m0) launch_group<T, 1, true>(a, stream, dev);
      else launch_group<T, 1, false>(a, stream, dev);
    }
  });
}

}  // namespace compile_ops
