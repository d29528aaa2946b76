// Launcher of fused_allreduce_add_rms_norm's symmetric-memory kernels: argument checks, device
// guard, current stream, dtype and vector-width dispatch, the grid. The Python layer
// (compile_ops/allreduce_norm.py) owns the workspace (one symmetric buffer per rank, set up by
// torch.distributed._symmetric_memory) and picks one-shot or two-shot; this file only launches.
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "compile_ops/allreduce_norm.cuh"
#include "launch_utils.h"
#include "row_plan.h"

namespace compile_ops {
namespace {

constexpr const char* kOp = "fused_allreduce_add_rms_norm";

// The block: fused_add_rms_norm's split of the same rows (row_plan.h: a warp per row, 4 rows
// per block, for short rows; a block per row otherwise; the two-pass kernel's thread count for
// rows too long for registers). Thread t then accumulates the sum of squares over the same
// packs in the same order and the row reduces it the same way, so the result is bit for bit
// the NCCL fallback's (all_reduce + fused_add_rms_norm), except for misaligned rows of
// kShiftMinRows and more, where fused_add_rms_norm shifts the rows instead.
dim3 row_block(int64_t n, int64_t rows) {
  const RowPlan p = plan_rows(n, rows);
  if (p.v != 0) return p.block;
  return dim3(static_cast<unsigned>(std::min<int64_t>(1024, ceil_div(n, 32) * 32)));
}

// The grid, the same on every rank for the same shape (block b of every rank handles the same
// rows; the barriers pair block b with block b). At most one block per SM, so that every block
// gets resident without waiting for another block of this grid to finish (a block waits for its
// peers, never for a sibling); at most the blocks the signal pad has flags for.
int64_t grid_blocks(int64_t rows, unsigned rows_per_block, int world, int64_t signal_pad_bytes,
                    int dev) {
  const int64_t flags = signal_pad_bytes / static_cast<int64_t>(sizeof(uint32_t));
  const int64_t by_pad = flags / world;
  return std::min<int64_t>(
      {ceil_div(rows, rows_per_block), by_pad, static_cast<int64_t>(sm_count(dev))});
}

template <typename T, int W>
void launch(const AllreduceNormArgs<T>& a, int64_t signal_pad_bytes, bool two_shot, int dev) {
  const dim3 block = row_block(a.hidden / W, a.rows);
  const int64_t blocks = grid_blocks(a.rows, block.y, a.world, signal_pad_bytes, dev);
  auto kernel =
      two_shot ? allreduce_norm_twoshot_kernel<T, W> : allreduce_norm_oneshot_kernel<T, W>;
  // No programmatic dependent launch: the kernel stages its input at once, so it must start
  // after the previous kernel on the stream has finished writing it.
  C10_CUDA_CHECK(launch_ex(kernel, dim3(static_cast<unsigned>(blocks)), block, 0,
                           current_stream(), /*pdl=*/false, a));
}

template <typename T>
void dispatch(const AllreduceNormArgs<T>& a, const RowView& in, const RowView& res,
              const at::Tensor& weight, int64_t signal_pad_bytes, bool two_shot, int dev) {
  constexpr int VW = kVecWidth<T>;
  // The symmetric buffers hold packed rows: aligned when the base is and hidden % VW == 0.
  const bool aligned = a.hidden % VW == 0 && in.aligned(VW) && res.aligned(VW) &&
                       is_aligned(weight.data_ptr(), 16);
  if (aligned)
    launch<T, VW>(a, signal_pad_bytes, two_shot, dev);
  else
    launch<T, 1>(a, signal_pad_bytes, two_shot, dev);
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& input,
                 int64_t world) {
  TORCH_CHECK(t.scalar_type() == at::kLong, kOp, ": ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_cuda() && t.device() == input.device(), kOp, ": ", name, " must be on ",
              input.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == world && t.is_contiguous(), kOp, ": ", name,
              " must be a contiguous 1-D tensor of world_size (", num(world),
              ") addresses, got shape ", dims(t.sizes()));
}

}  // namespace

void fused_allreduce_add_rms_norm(at::Tensor& input, at::Tensor& residual,
                                  const at::Tensor& weight, double epsilon,
                                  const at::Tensor& buffer_ptrs,
                                  const at::Tensor& signal_pad_ptrs, int64_t rank,
                                  int64_t world_size, int64_t buffer_bytes,
                                  int64_t signal_pad_bytes, int64_t mode) {
  check_float_type(kOp, "input", input);
  check_same_device(kOp, "input", input, input);
  check_same_type(kOp, "residual", residual, input);
  check_same_device(kOp, "residual", residual, input);
  check_same_type(kOp, "weight", weight, input);
  check_same_device(kOp, "weight", weight, input);
  TORCH_CHECK(input.dim() >= 1, kOp, ": input must have at least one dimension");
  TORCH_CHECK(residual.sizes() == input.sizes(), kOp, ": residual must have the shape of input ",
              dims(input.sizes()), ", got ", dims(residual.sizes()));
  const int64_t hidden64 = input.size(-1);
  TORCH_CHECK(hidden64 <= std::numeric_limits<int>::max(), kOp, ": hidden size too large");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden64 &&
                  (hidden64 <= 1 || weight.stride(0) == 1),
              kOp, ": weight must be a contiguous 1-D tensor of size ", num(hidden64), ", got shape ",
              dims(weight.sizes()));
  TORCH_CHECK(std::isfinite(epsilon) && epsilon >= 0, kOp, ": epsilon must be finite and >= 0");
  TORCH_CHECK(world_size >= 1 && world_size <= kAllreduceMaxRanks, kOp,
              ": world_size must be in [1, ", num(kAllreduceMaxRanks), "], got ", num(world_size));
  TORCH_CHECK(rank >= 0 && rank < world_size, kOp, ": rank ", num(rank),
              " out of range for world_size ", num(world_size));
  TORCH_CHECK(mode == 0 || mode == 1, kOp, ": mode must be 0 (one-shot) or 1 (two-shot), got ",
              num(mode));
  check_table("buffer_ptrs", buffer_ptrs, input, world_size);
  check_table("signal_pad_ptrs", signal_pad_ptrs, input, world_size);
  const RowView in = row_view(kOp, "input", input, /*writable=*/true);
  const RowView res = row_view(kOp, "residual", residual, /*writable=*/true);
  const int64_t rows = in.rows;
  if (rows == 0 || hidden64 == 0) return;
  const int64_t bytes = rows * hidden64 * static_cast<int64_t>(input.element_size());
  TORCH_CHECK(bytes <= buffer_bytes, kOp, ": input (", num(bytes),
              " bytes) does not fit the symmetric buffer (", num(buffer_bytes), " bytes)");
  TORCH_CHECK(signal_pad_bytes >= static_cast<int64_t>(sizeof(uint32_t)) * world_size, kOp,
              ": the signal pad (", num(signal_pad_bytes), " bytes) has no flags for ",
              num(world_size), " ranks");
  const DeviceGuard guard(input.device());
  const int dev = input.get_device();
  const bool two_shot = mode == 1;

  const auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    AllreduceNormArgs<T> a;
    a.input = static_cast<T*>(in.ptr);
    a.in_stride = in.stride;
    a.residual = static_cast<T*>(res.ptr);
    a.res_stride = res.stride;
    a.weight = static_cast<const T*>(weight.data_ptr());
    a.buffers = buffer_ptrs.data_ptr<int64_t>();
    a.signals = signal_pad_ptrs.data_ptr<int64_t>();
    a.rows = rows;
    a.hidden = static_cast<int>(hidden64);
    a.eps = static_cast<float>(epsilon);
    a.rank = static_cast<int>(rank);
    a.world = static_cast<int>(world_size);
    dispatch<T>(a, in, res, weight, signal_pad_bytes, two_shot, dev);
  };
  switch (input.scalar_type()) {
    case at::ScalarType::Float:
      fill(static_cast<float*>(nullptr));
      break;
    case at::ScalarType::Half:
      fill(static_cast<__half*>(nullptr));
      break;
    case at::ScalarType::BFloat16:
      fill(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, kOp, ": unsupported dtype ", input.scalar_type());
  }
}

}  // namespace compile_ops
