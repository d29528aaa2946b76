"""RMSNorm family: ``rms_norm`` and ``fused_add_rms_norm`` (vLLM schemas and semantics), and
our out-of-place ``fused_add_rms_norm_out``.

Registered ops (out-style / in-place, exactly as vLLM's ``torch.ops._C`` ops; the third is ours)::

    torch.ops.compile_ops.rms_norm(out, input, weight, epsilon) -> None
    torch.ops.compile_ops.fused_add_rms_norm(input, residual, weight, epsilon) -> None
    torch.ops.compile_ops.fused_add_rms_norm_out(out, residual_out, input, residual, weight,
                                                 epsilon) -> None

``fused_add_rms_norm_out`` computes what ``fused_add_rms_norm`` does into two other tensors and
only reads ``input`` and ``residual``: what the ``add_rms_norm`` pass emits when those are graph
inputs (a layer compiled on its own), which the in-place op would make Inductor copy first.

Functional wrappers (allocate their outputs)::

    compile_ops.rms_norm(x, weight, epsilon=1e-6) -> Tensor
    compile_ops.fused_add_rms_norm(x, residual, weight, epsilon=1e-6) -> (out, residual_out)
    compile_ops.fused_add_rms_norm_out(x, residual, weight, epsilon=1e-6) -> (out, residual_out)

``weight`` may be None (``Tensor? weight``, as in current vLLM): a weightless RMSNorm, the same
result as a weight of ones in the input dtype.

The custom-op bodies are the pure-PyTorch references: they are the CPU kernels and the test
oracles. The CUDA kernels live in ``csrc/layernorm_kernels.cu``.
"""

from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = ["rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_out", "rms_norm_ref",
           "fused_add_rms_norm_ref"]


# ---------------------------------------------------------------------------------------------
# Math (shared by the reference bodies and usable directly as an oracle)
# ---------------------------------------------------------------------------------------------
def _normalize(z: torch.Tensor, weight: Optional[torch.Tensor], epsilon: float,
               dtype: torch.dtype):
    # z is float32. Same rounding steps as the kernels and as vLLM's forward_native:
    # normalize in fp32, round to the model dtype, then multiply by the weight in that dtype.
    # No weight: the first rounding is the result (a multiply by 1 would not change it).
    inv = torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    y = (z * inv).to(dtype)
    return y if weight is None else y * weight


def rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], epsilon: float) -> torch.Tensor:
    """out = T(x * rsqrt(mean(x^2) + eps)) * weight (no multiply when weight is None),
    statistics in float32."""
    return _normalize(x.float(), weight, epsilon, x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor,
                           weight: Optional[torch.Tensor],
                           epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(z), T(z)) with z = x + residual summed in float32."""
    z = x.float() + residual.float()
    return _normalize(z, weight, epsilon, x.dtype), z.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Shared checks (reference body, fake kernel and CUDA binding all call these)
# ---------------------------------------------------------------------------------------------
def _check_rms_norm(out, input, weight, epsilon):
    op = "rms_norm"
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    C.check_like(op, "out", out, input)
    if weight is not None:
        C.check_weight(op, weight, input)
    C.check_epsilon(op, epsilon)
    C.check_rows(op, "input", input, writable=False)
    C.check_rows(op, "out", out, writable=True)
    C.check_no_partial_overlap(op, "out", out, "input", input, allow_same=True)
    if weight is not None:
        C.check_no_partial_overlap(op, "out", out, "weight", weight, allow_same=False)


def _check_fused_add_rms_norm(input, residual, weight, epsilon):
    op = "fused_add_rms_norm"
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    C.check_like(op, "residual", residual, input)
    if weight is not None:
        C.check_weight(op, weight, input)
    C.check_epsilon(op, epsilon)
    C.check_rows(op, "input", input, writable=True)
    C.check_rows(op, "residual", residual, writable=True)
    C.check_no_partial_overlap(op, "input", input, "residual", residual, allow_same=False)
    if weight is not None:
        C.check_no_partial_overlap(op, "input", input, "weight", weight, allow_same=False)
        C.check_no_partial_overlap(op, "residual", residual, "weight", weight, allow_same=False)


def _check_fused_add_rms_norm_out(out, residual_out, input, residual, weight, epsilon):
    op = "fused_add_rms_norm_out"
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    C.check_like(op, "residual", residual, input)
    C.check_like(op, "out", out, input)
    C.check_like(op, "residual_out", residual_out, input)
    if weight is not None:
        C.check_weight(op, weight, input)
    C.check_epsilon(op, epsilon)
    # input and residual are only read: their rows may repeat (stride 0) and they may share
    # memory with each other. Each output may be its own input exactly (the kernels read every
    # element before writing it, in the same thread), nothing else.
    C.check_rows(op, "input", input, writable=False)
    C.check_rows(op, "residual", residual, writable=False)
    C.check_rows(op, "out", out, writable=True)
    C.check_rows(op, "residual_out", residual_out, writable=True)
    C.check_no_partial_overlap(op, "out", out, "residual_out", residual_out, allow_same=False)
    C.check_no_partial_overlap(op, "out", out, "input", input, allow_same=True)
    C.check_no_partial_overlap(op, "out", out, "residual", residual, allow_same=False)
    C.check_no_partial_overlap(op, "residual_out", residual_out, "residual", residual,
                               allow_same=True)
    C.check_no_partial_overlap(op, "residual_out", residual_out, "input", input,
                               allow_same=False)
    if weight is not None:
        C.check_no_partial_overlap(op, "out", out, "weight", weight, allow_same=False)
        C.check_no_partial_overlap(op, "residual_out", residual_out, "weight", weight,
                                   allow_same=False)


# ---------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::rms_norm", mutates_args=("out",))
def _rms_norm(out: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
              epsilon: float) -> None:
    """RMSNorm into ``out``: ``out = T(x * rsqrt(mean(x^2, -1) + epsilon)) * weight``.

    Parameters
    ----------
    out : Tensor [..., hidden], same dtype/device/shape as ``input``; written (may be ``input``).
    input : Tensor [..., hidden], float32/float16/bfloat16; last dim contiguous, leading dims
        collapsible into one row stride (a row slice of a wider tensor is fine).
    weight : Tensor [hidden] or None. A tensor has the dtype and device of ``input`` and is
        contiguous; None means no scale (weightless RMSNorm, as current vLLM): the normalized
        value rounded to the dtype is the result.
    epsilon : float, added to the mean square before the reciprocal square root.

    The mean square is accumulated in float32; the normalized value is rounded to the input
    dtype before the weight multiply (vLLM's rounding).
    """
    _check_rms_norm(out, input, weight, epsilon)
    out.copy_(rms_norm_ref(input, weight, epsilon))


@_rms_norm.register_fake
def _(out, input, weight, epsilon):
    _check_rms_norm(out, input, weight, epsilon)


# ---------------------------------------------------------------------------------------------
# fused_add_rms_norm
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::fused_add_rms_norm", mutates_args=("input", "residual"))
def _fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor,
                        weight: Optional[torch.Tensor], epsilon: float) -> None:
    """Residual add + RMSNorm, in place: ``residual <- input + residual``,
    ``input <- rms_norm(input + residual) * weight``.

    Parameters
    ----------
    input : Tensor [..., hidden], float32/float16/bfloat16; overwritten with the normalized sum.
    residual : Tensor, same dtype/device/shape as ``input``; overwritten with ``input + residual``
        (rounded to the dtype). Must not share memory with ``input``.
    weight : Tensor [hidden] or None (no scale), as for ``rms_norm``.
    epsilon : float.

    The sum is formed and squared in float32 (statistics over the unrounded sum, as vLLM's
    forward_native); each tensor is read once and written once by the CUDA kernel.
    """
    _check_fused_add_rms_norm(input, residual, weight, epsilon)
    out, res = fused_add_rms_norm_ref(input, residual, weight, epsilon)
    input.copy_(out)
    residual.copy_(res)


@_fused_add_rms_norm.register_fake
def _(input, residual, weight, epsilon):
    _check_fused_add_rms_norm(input, residual, weight, epsilon)


# ---------------------------------------------------------------------------------------------
# fused_add_rms_norm_out (ours: the out-of-place form of fused_add_rms_norm)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::fused_add_rms_norm_out",
                         mutates_args=("out", "residual_out"))
def _fused_add_rms_norm_out(out: torch.Tensor, residual_out: torch.Tensor, input: torch.Tensor,
                            residual: torch.Tensor, weight: Optional[torch.Tensor],
                            epsilon: float) -> None:
    """Residual add + RMSNorm into fresh buffers: ``residual_out = T(input + residual)``,
    ``out = rms_norm(input + residual) * weight``; ``input`` and ``residual`` are only read.

    Parameters
    ----------
    out : Tensor, same dtype/device/shape as ``input``; written with the normalized sum. May be
        ``input`` itself (exactly the same view: then the op is in place on it), must not
        otherwise share memory with ``input``, ``residual``, ``residual_out`` or ``weight``.
    residual_out : Tensor, same dtype/device/shape as ``input``; written with
        ``T(input + residual)``. May be ``residual`` itself (exactly), must not otherwise share
        memory with the other tensors.
    input : Tensor [..., hidden], float32/float16/bfloat16; last dim contiguous, leading dims
        collapsible into one row stride. Read only: its rows may repeat (stride 0).
    residual : Tensor, same dtype/device/shape as ``input``, same layout rules; read only. May
        share memory with ``input`` (even be the same tensor).
    weight : Tensor [hidden] or None (no scale), as for ``rms_norm``.
    epsilon : float.

    Exactly ``fused_add_rms_norm``'s rounding: the sum is formed and squared in float32 and
    normalized unrounded; ``residual_out`` is the sum rounded once to the dtype, ``out`` the
    normalized value rounded, times the weight, rounded. The CUDA kernel reads each input once
    and writes each output once (the kernels of ``fused_add_rms_norm``, whose in-place call is
    this op with ``out is input`` and ``residual_out is residual``).
    """
    _check_fused_add_rms_norm_out(out, residual_out, input, residual, weight, epsilon)
    normed, total = fused_add_rms_norm_ref(input, residual, weight, epsilon)
    out.copy_(normed)
    residual_out.copy_(total)


@_fused_add_rms_norm_out.register_fake
def _(out, residual_out, input, residual, weight, epsilon):
    _check_fused_add_rms_norm_out(out, residual_out, input, residual, weight, epsilon)


# ---------------------------------------------------------------------------------------------
# CUDA kernels
# ---------------------------------------------------------------------------------------------
if _C is not None:

    @_rms_norm.register_kernel("cuda")
    def _(out, input, weight, epsilon):
        _check_rms_norm(out, input, weight, epsilon)
        _C.rms_norm(out, input, weight, float(epsilon))

    @_fused_add_rms_norm.register_kernel("cuda")
    def _(input, residual, weight, epsilon):
        _check_fused_add_rms_norm(input, residual, weight, epsilon)
        _C.fused_add_rms_norm(input, residual, weight, float(epsilon))

    @_fused_add_rms_norm_out.register_kernel("cuda")
    def _(out, residual_out, input, residual, weight, epsilon):
        _check_fused_add_rms_norm_out(out, residual_out, input, residual, weight, epsilon)
        _C.fused_add_rms_norm_out(out, residual_out, input, residual, weight, float(epsilon))


# ---------------------------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor],
             epsilon: float = 1e-6) -> torch.Tensor:
    """Functional RMSNorm: returns a new tensor (see ``torch.ops.compile_ops.rms_norm``)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.compile_ops.rms_norm(out, x, weight, epsilon)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional residual add + RMSNorm: returns ``(rms_norm(x + residual), x + residual)``
    and leaves ``x`` and ``residual`` untouched."""
    out = x.clone(memory_format=torch.contiguous_format)
    res = residual.clone(memory_format=torch.contiguous_format)
    torch.ops.compile_ops.fused_add_rms_norm(out, res, weight, epsilon)
    return out, res


def fused_add_rms_norm_out(x: torch.Tensor, residual: torch.Tensor,
                           weight: Optional[torch.Tensor],
                           epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional residual add + RMSNorm through the out-of-place op: returns
    ``(rms_norm(x + residual), x + residual)`` in new contiguous tensors; ``x`` and ``residual``
    are only read (no copies of them, unlike ``fused_add_rms_norm``'s wrapper)."""
    C.check_tensor("fused_add_rms_norm_out", "input", x)
    C.check_tensor("fused_add_rms_norm_out", "residual", residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    torch.ops.compile_ops.fused_add_rms_norm_out(out, res, x, residual, weight, epsilon)
    return out, res
