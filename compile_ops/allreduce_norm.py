"""All-reduce + residual add + RMSNorm in one op (issue 27): the tensor-parallel layer's
``all_reduce(o_proj / down_proj output)`` followed by ``fused_add_rms_norm``.

Registered op (in place, as vLLM's ``fused_add_rms_norm``)::

    torch.ops.compile_ops.fused_allreduce_add_rms_norm(input, residual, weight, epsilon,
                                                       group_name) -> None

    s        = T(sum over the ranks of group_name of input, float32, in rank order)
    residual <- T(s + residual)
    input    <- rms_norm(s + residual) * weight        (fused_add_rms_norm's rounding)

Functional wrapper (copies, returns new tensors)::

    compile_ops.fused_allreduce_add_rms_norm(x, residual, weight, epsilon=1e-6, group=None)
        -> (out, residual_out)

Kernels, by device:

* CPU (and any device without the CUDA path): the reference body, an ``all_gather`` over the
  group and the rank-order float32 sum, then ``fused_add_rms_norm_ref``. Every rank gets the
  same bytes, for any world size, exactly ``fused_allreduce_add_rms_norm_ref``.
* CUDA: one kernel over PyTorch symmetric memory (``csrc/allreduce_norm_kernels.cu``), one-shot
  or two-shot (see ``_choose_mode``), when the kernels are built, the group has more than one
  rank, the input fits the workspace and symmetric memory could be set up on every rank;
  otherwise NCCL ``all_reduce`` + ``compile_ops.fused_add_rms_norm``. The symmetric-memory
  kernel sums in float32 in rank order (every rank the same bytes); NCCL's ring sums in its own
  order: the two agree bit for bit with 2 ranks (one addition, rounded once), not beyond.

``COMPILE_OPS_ALLREDUCE``: ``auto`` (default), ``nccl`` (never symmetric memory), ``oneshot`` /
``twoshot`` (force an algorithm where symmetric memory works: tests, benchmarks).
``COMPILE_OPS_ALLREDUCE_MAX_MB``: the symmetric workspace per (group, dtype, device), 8 MiB by
default (vLLM's custom all-reduce default); larger inputs go through NCCL.
"""

import os
from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C
from compile_ops.norm import _normalize

__all__ = ["fused_allreduce_add_rms_norm", "fused_allreduce_add_rms_norm_ref"]

_OP = "fused_allreduce_add_rms_norm"


# ---------------------------------------------------------------------------------------------
# Math (the oracle)
# ---------------------------------------------------------------------------------------------
def _sum_ranks(inputs_per_rank) -> torch.Tensor:
    """T(x_0 + x_1 + ... + x_{n-1}) accumulated in float32 in rank order, rounded once: what
    the symmetric-memory kernel computes on every rank. With two ranks it is also the sum in
    the dtype (one addition, rounded once: NCCL's and gloo's result)."""
    acc = inputs_per_rank[0].float()
    for x in inputs_per_rank[1:]:
        acc = acc + x.float()
    return acc.to(inputs_per_rank[0].dtype)


def fused_allreduce_add_rms_norm_ref(inputs_per_rank, residual: torch.Tensor,
                                     weight: torch.Tensor,
                                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_out, residual_out) of one rank from every rank's input (a list in rank order) and
    this rank's residual: ``s = T(sum in fp32, rank order)``, ``z = s + residual`` in fp32,
    ``(rms_norm(z) * weight, T(z))`` with ``fused_add_rms_norm_ref``'s rounding."""
    if not inputs_per_rank:
        raise ValueError("fused_allreduce_add_rms_norm_ref: inputs_per_rank is empty")
    s = _sum_ranks(list(inputs_per_rank))
    z = s.float() + residual.float()
    return _normalize(z, weight, eps, s.dtype), z.to(s.dtype)


# ---------------------------------------------------------------------------------------------
# Checks (reference body, fake kernel and CUDA kernel all call _check; group resolution only
# where the op runs: a fake trace needs no live process group)
# ---------------------------------------------------------------------------------------------
def _check(input, residual, weight, epsilon, group_name):
    C.check_tensor(_OP, "input", input)
    C.check_float_dtype(_OP, "input", input)
    C.check_like(_OP, "residual", residual, input)
    C.check_weight(_OP, weight, input)
    C.check_epsilon(_OP, epsilon)
    if not isinstance(group_name, str):
        C.fail(_OP, f"group_name must be a str (a c10d group name), got "
                    f"{type(group_name).__name__}", TypeError)
    C.check_rows(_OP, "input", input, writable=True)
    C.check_rows(_OP, "residual", residual, writable=True)
    C.check_no_partial_overlap(_OP, "input", input, "residual", residual, allow_same=False)
    C.check_no_partial_overlap(_OP, "input", input, "weight", weight, allow_same=False)
    C.check_no_partial_overlap(_OP, "residual", residual, "weight", weight, allow_same=False)


def _resolve_group(group_name: str):
    """The ProcessGroup registered under group_name, or a ValueError naming the argument."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        C.fail(_OP, f"group_name {group_name!r}: torch.distributed is not initialized "
                    "(call torch.distributed.init_process_group first)")
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name)
    except (RuntimeError, KeyError, ValueError) as e:
        C.fail(_OP, f"group_name {group_name!r} is not a registered process group ({e})")


def _group_name_of(group) -> str:
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            C.fail(_OP, "group=None needs torch.distributed to be initialized")
        return dist.group.WORLD.group_name
    if isinstance(group, str):
        return group
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        C.fail(_OP, f"group must be None, a group name or a ProcessGroup, got "
                    f"{type(group).__name__}", TypeError)
    return name


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::fused_allreduce_add_rms_norm",
                         mutates_args=("input", "residual"))
def _fused_allreduce_add_rms_norm(input: torch.Tensor, residual: torch.Tensor,
                                  weight: torch.Tensor, epsilon: float, group_name: str) -> None:
    """All-reduce (sum) + residual add + RMSNorm, in place on ``input`` and ``residual``.

    Parameters
    ----------
    input : Tensor [..., hidden], float32/float16/bfloat16, this rank's partial sum (the output
        of a row-parallel linear); last dim contiguous, leading dims collapsible into one row
        stride. Overwritten with ``rms_norm(s + residual) * weight``.
    residual : Tensor, same dtype/device/shape as ``input``; overwritten with ``T(s + residual)``.
        Each rank's own (it need not be equal across ranks). Must not share memory with
        ``input``.
    weight : Tensor [hidden], dtype and device of ``input``, contiguous.
    epsilon : float.
    group_name : str, a c10d process group name (``ProcessGroup.group_name``, as
        ``torch.ops._c10d_functional.all_reduce`` takes). Every rank of the group calls the op
        with the same shape and dtype.

    ``s`` is the sum of every rank's ``input`` accumulated in float32 in rank order and rounded
    to the dtype; then exactly ``fused_add_rms_norm(s, residual, weight, epsilon)``. Every rank
    gets the same ``s``. Nothing is written when a check fails.
    """
    _check(input, residual, weight, epsilon, group_name)
    pg = _resolve_group(group_name)
    _reference_allreduce_norm(input, residual, weight, epsilon, pg)


@_fused_allreduce_add_rms_norm.register_fake
def _(input, residual, weight, epsilon, group_name):
    _check(input, residual, weight, epsilon, group_name)


def _reference_allreduce_norm(input, residual, weight, epsilon, pg):
    import torch.distributed as dist

    mine = input.contiguous()
    if dist.get_world_size(pg) == 1:
        parts = [mine]
    else:
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
        dist.all_gather(parts, mine, group=pg)
    out, res = fused_allreduce_add_rms_norm_ref(parts, residual, weight, epsilon)
    input.copy_(out)
    residual.copy_(res)


# ---------------------------------------------------------------------------------------------
# CUDA: symmetric-memory kernel, NCCL fallback
# ---------------------------------------------------------------------------------------------
_MODES = ("auto", "nccl", "oneshot", "twoshot")
# Two-shot moves 2 (n - 1) / n of the data per rank over NVLink against one-shot's n - 1, so it
# pays from 3 ranks on, once the extra barrier is amortized; with 2 ranks both move the same and
# one-shot has one barrier less. 512 KiB: vLLM's custom all-reduce switch point (to be measured
# here on H100/H200).
_TWO_SHOT_MIN_BYTES = 512 * 1024
_DEFAULT_MAX_MB = 8
_MAX_RANKS = 32  # the kernels' barrier threads (allreduce_norm.cuh's kAllreduceMaxRanks)


def _mode() -> str:
    mode = os.environ.get("COMPILE_OPS_ALLREDUCE", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"COMPILE_OPS_ALLREDUCE must be one of {', '.join(_MODES)}, "
                         f"got {mode!r}")
    return mode


def _max_bytes() -> int:
    raw = os.environ.get("COMPILE_OPS_ALLREDUCE_MAX_MB", "").strip()
    mb = float(raw) if raw else _DEFAULT_MAX_MB
    return int(mb * 1024 * 1024)


def _choose_mode(nbytes: int, world_size: int) -> int:
    """0: one-shot, 1: two-shot. The same on every rank (it depends on shape, dtype, world
    size and the environment only)."""
    mode = _mode()
    if mode == "oneshot":
        return 0
    if mode == "twoshot":
        return 1
    return 1 if world_size > 2 and nbytes >= _TWO_SHOT_MIN_BYTES else 0


class _Workspace:
    """One symmetric buffer per rank and the device tables of every rank's buffer and signal
    pad (the kernel's view of the group)."""

    def __init__(self, handle, tensor, nbytes, device, signal_pad_bytes):
        self.handle = handle
        self.tensor = tensor  # keeps the allocation alive
        self.nbytes = nbytes
        self.rank = handle.rank
        self.world_size = handle.world_size
        # buffer_ptrs are the bases of the peers' allocations; the tensor sits at the same
        # offset in each (symmetric allocations), which is 0 unless it came from a pool.
        offset = tensor.data_ptr() - handle.buffer_ptrs[handle.rank]
        if offset < 0 or offset % 16:
            raise RuntimeError(f"unexpected symmetric buffer offset {offset}")
        self.buffer_ptrs = torch.tensor([p + offset for p in handle.buffer_ptrs],
                                        dtype=torch.int64, device=device)
        self.signal_pad_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64,
                                            device=device)
        self.signal_pad_bytes = signal_pad_bytes


# (group_name, dtype, device) -> _Workspace, or None where symmetric memory is not available
_WORKSPACES: dict = {}


def _peer_access_ok(device: torch.device) -> bool:
    """Every GPU this process sees can reach the others (NVLink or PCIe peer access). A process
    that sees one GPU cannot tell; the collective set-up in _workspace decides then."""
    n = torch.cuda.device_count()
    return all(torch.cuda.can_device_access_peer(device.index, j)
               for j in range(n) if j != device.index)


def _workspace(group_name: str, pg, dtype: torch.dtype, device: torch.device):
    """The workspace of (group, dtype, device), set up on first use: a collective over the group
    (every rank calls the op with the same shapes, so every rank gets here together). All ranks
    agree on the outcome (an all_reduce of the local success flags), so none waits in a kernel
    barrier for a rank that went to NCCL."""
    key = (group_name, dtype, device)
    if key in _WORKSPACES:
        return _WORKSPACES[key]
    if torch.cuda.is_current_stream_capturing():
        return None  # rendezvous cannot be captured: NCCL this time, set up on an eager call
    import torch.distributed as dist

    ws = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if _peer_access_ok(device):
            elem = torch.empty((), dtype=dtype).element_size()
            numel = _max_bytes() // elem
            with torch.cuda.device(device):
                # An allocation of our own, not one from symm_mem.empty's implicit pool: its
                # signal pad is then ours alone (a pooled tensor shares its segment's pad).
                alloc = getattr(symm_mem, "_SymmetricMemory", None)
                if alloc is not None and hasattr(alloc, "empty_strided_p2p"):
                    t = alloc.empty_strided_p2p((numel,), (1,), dtype, device)
                else:
                    t = symm_mem.empty(numel, dtype=dtype, device=device)
                handle = symm_mem.rendezvous(t, group_name)
            ws = _Workspace(handle, t, numel * elem, device, int(symm_mem.get_signal_pad_size()))
    except Exception:  # no symmetric memory support on this build / machine
        ws = None
    ok = torch.tensor([1 if ws is not None else 0], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=pg)
    if int(ok.item()) == 0:
        ws = None
    _WORKSPACES[key] = ws
    return ws


def _nccl_allreduce_norm(input, residual, weight, epsilon, pg):
    import torch.distributed as dist

    if input.is_contiguous():
        dist.all_reduce(input, op=dist.ReduceOp.SUM, group=pg)
    else:
        s = input.contiguous()
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=pg)
        input.copy_(s)
    torch.ops.compile_ops.fused_add_rms_norm(input, residual, weight, epsilon)


def _symm_path(input, group_name, pg):
    """The workspace to run the symmetric-memory kernel with, or None for NCCL."""
    import torch.distributed as dist

    if _C is None or not hasattr(_C, "fused_allreduce_add_rms_norm"):
        return None
    world = dist.get_world_size(pg)
    if _mode() == "nccl" or world == 1 or world > _MAX_RANKS:
        return None
    nbytes = input.numel() * input.element_size()
    if nbytes > _max_bytes():
        return None
    ws = _workspace(group_name, pg, input.dtype, input.device)
    if ws is None or nbytes > ws.nbytes:
        return None
    return ws


@_fused_allreduce_add_rms_norm.register_kernel("cuda")
def _(input, residual, weight, epsilon, group_name):
    _check(input, residual, weight, epsilon, group_name)
    pg = _resolve_group(group_name)
    if input.numel() == 0:
        return
    ws = _symm_path(input, group_name, pg)
    if ws is None:
        _nccl_allreduce_norm(input, residual, weight, epsilon, pg)
        return
    nbytes = input.numel() * input.element_size()
    _C.fused_allreduce_add_rms_norm(input, residual, weight, float(epsilon), ws.buffer_ptrs,
                                    ws.signal_pad_ptrs, ws.rank, ws.world_size, ws.nbytes,
                                    ws.signal_pad_bytes, _choose_mode(nbytes, ws.world_size))


# ---------------------------------------------------------------------------------------------
# Functional wrapper
# ---------------------------------------------------------------------------------------------
def fused_allreduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 epsilon: float = 1e-6,
                                 group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional all-reduce + residual add + RMSNorm: returns
    ``(rms_norm(s + residual) * weight, s + residual)`` with ``s`` the sum of ``x`` over the
    group, and leaves ``x`` and ``residual`` untouched. ``group``: None (the default group), a
    ``ProcessGroup`` or a group name. See ``torch.ops.compile_ops.fused_allreduce_add_rms_norm``
    for the in-place op."""
    C.check_tensor(_OP, "input", x)
    C.check_tensor(_OP, "residual", residual)
    name = _group_name_of(group)
    out = x.clone(memory_format=torch.contiguous_format)
    res = residual.clone(memory_format=torch.contiguous_format)
    torch.ops.compile_ops.fused_allreduce_add_rms_norm(out, res, weight, epsilon, name)
    return out, res
