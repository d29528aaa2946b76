"""Gated SiLU fused with FP8 / INT8 quantization (vLLM schemas and semantics).

Registered ops (out-style, as vLLM's ``torch.ops._C`` ops)::

    torch.ops.compile_ops.silu_and_mul_quant(result, input, scale) -> None
        static per-tensor scale: result = fp8(clamp(T(T(silu(x1)) * x2) * (1 / scale)))
    torch.ops.compile_ops.silu_and_mul_per_block_quant(out, input, scales, group_size,
                                                       scale_ub=None, is_scale_transposed=False)
        dynamic per-(token, group) scales: r = silu(x1) * x2 in float32 (never rounded to the
        input dtype), s = max(min(amax(|r|) / QMAX, scale_ub), MIN_SCALE), out = q(r / s)

with ``x1, x2 = input[..., :d], input[..., d:]``.

Numerics, op for op as vLLM's CUDA kernels (csrc/libtorch_stable/quantization/
activation_kernels.cu and fused_kernels/fused_silu_mul_block_quant.cu):

* ``silu_and_mul_quant``: ``s = T(x / (1 + expf(-x)))``, ``p = T(s * y)`` (the multiply in the
  input dtype T, c10's operator*), ``q = fp8(fmaxf(-448, fminf(p * inv, 448)))`` with
  ``inv = 1.0f / scale`` in float32. A NaN becomes +448 (the clamp order), a zero scale makes
  ``inv`` infinite (0 * inf = NaN -> +448). Negative scales are allowed (vLLM's test draws one).
* ``silu_and_mul_per_block_quant``: ``sig = 1.0f / (1.0f + expf(-g))``, ``r = (g * sig) * u``,
  all float32. ``amax`` is an fmaxf reduction (NaN ignored unless the whole group is NaN, then
  NaN), ``s = amax / QMAX``, then ``s = fminf(s, *scale_ub)`` -- the SCALE is bounded, not the
  amax, unlike the other dynamic quant ops -- then ``s = fmaxf(s, MIN_SCALE)`` (1/(448*512) for
  FP8, FLT_EPSILON for INT8). ``q = fp8(clamp(r / s))`` or ``int8_rn_sat(r / s)``: a division
  for both.

Layouts: ``input`` is ``[..., 2d]`` for ``silu_and_mul_quant`` and ``[T, 2d]`` for the per-block
op; rows may be strided (last dim contiguous, leading dims collapsible into one row stride; vLLM
requires contiguous inputs), outputs are contiguous. The per-block ``scales`` is ``[T, G]``
(G = d / group_size) float32: row-major, or with ``is_scale_transposed`` a contiguous ``[G, T]``
buffer seen as ``[T, G]`` (strides ``(1, T)``: ``torch.empty(G, T).t()``).

Dtypes: input float16 / bfloat16 as vLLM, and float32 as well (a superset: vLLM's newest refuses
float32; the kernels are the same template). ``silu_and_mul_quant`` writes float8_e4m3fn; the
per-block op float8_e4m3fn or int8 (``scale_ub`` only with float8, as vLLM).

Functional wrappers::

    compile_ops.silu_and_mul_quant(x, scale) -> Tensor (float8_e4m3fn)
    compile_ops.silu_and_mul_per_block_quant(input, group_size, quant_dtype=torch.float8_e4m3fn,
                                             scale_ub=None, is_scale_transposed=False)
        -> (out, scales)

The custom-op bodies are the pure-PyTorch references (the CPU kernels and the test oracles); the
CUDA kernels live in csrc/activation_quant_kernels.cu.
"""

from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C
from compile_ops._fp8 import (FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, INT8_MAX, INT8_MIN_SCALE, to_fp8,
                              to_int8)

__all__ = ["silu_and_mul_quant", "silu_and_mul_per_block_quant", "silu_and_mul_quant_ref",
           "silu_and_mul_per_block_quant_ref"]

GROUP_SIZES = (64, 128)
QUANT_DTYPES = (FP8_DTYPE, torch.int8)


# ---------------------------------------------------------------------------------------------
# References (CPU kernels and test oracles). Every division is a tensor / tensor division:
# PyTorch's CUDA `t / python_scalar` multiplies by the scalar's reciprocal, which would not be
# the kernels' IEEE division.
# ---------------------------------------------------------------------------------------------
def _halves(x: torch.Tensor):
    d = x.shape[-1] // 2
    return x[..., :d].float(), x[..., d:].float()


def silu_and_mul_quant_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(clamp(T(T(g / (1 + exp(-g))) * u) * (1 / scale))) for input [..., 2d]: vLLM's
    silu_and_mul_quant, op for op (float32 inside, roundings to the input dtype T)."""
    dtype = x.dtype
    g, u = _halves(x)
    s = (g / (torch.exp(-g) + 1.0)).to(dtype).float()
    p = (s * u).to(dtype).float()
    sc = scale.reshape(()).to(device=x.device, dtype=torch.float32)
    inv = torch.ones_like(sc) / sc
    return to_fp8(p * inv)


def silu_and_mul_per_block_quant_ref(x: torch.Tensor, group_size: int,
                                     quant_dtype: torch.dtype = FP8_DTYPE,
                                     scale_ub: Optional[torch.Tensor] = None):
    """(q [T, d], scales [T, d / group_size] row-major float32) for input [T, 2d]: vLLM's
    silu_and_mul_per_block_quant, op for op (float32 throughout, never rounded to T)."""
    tokens = x.shape[0]
    g, u = _halves(x)
    d = g.shape[-1]
    groups = d // group_size
    sig = torch.ones_like(g) / (torch.exp(-g) + 1.0)
    r = ((g * sig) * u).reshape(tokens, groups, group_size)
    a = r.abs()
    # fmaxf reduction: NaNs are ignored unless the whole group is NaN (|r| >= 0 elsewhere).
    amax = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a).amax(dim=-1)
    amax = torch.where(amax < 0, torch.full_like(amax, float("nan")), amax)
    fp8 = quant_dtype == FP8_DTYPE
    qmax, min_scale = (FP8_MAX, FP8_MIN_SCALE) if fp8 else (INT8_MAX, INT8_MIN_SCALE)
    s = amax / torch.full_like(amax, qmax)
    if scale_ub is not None:
        s = torch.fmin(s, scale_ub.reshape(()).to(device=s.device, dtype=torch.float32))
    s = torch.fmax(s, torch.full_like(s, min_scale))
    y = (r / s.unsqueeze(-1)).reshape(tokens, d)
    return (to_fp8(y) if fp8 else to_int8(y)), s


# ---------------------------------------------------------------------------------------------
# Checks (reference body, fake kernel and CUDA binding all call these)
# ---------------------------------------------------------------------------------------------
def _check_input(op: str, input, *, two_d: bool) -> int:
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    if two_d and input.dim() != 2:
        C.fail(op, f"input must be 2-D [num_tokens, 2 * d], got shape {tuple(input.shape)}")
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension, got a 0-d tensor")
    if input.size(-1) % 2 != 0:
        C.fail(op, f"input's last dimension must be even (2 * d), got {input.size(-1)}")
    C.check_rows(op, "input", input, writable=False)
    return input.size(-1) // 2


def _check_out(op: str, name: str, out, input, d: int, dtypes) -> None:
    C.check_out(op, name, out, input, dtypes, shape=tuple(input.shape[:-1]) + (d,),
                shape_note=" (input.shape[:-1] + (d,))")


def _check_scalar_tensor(op: str, name: str, t, input) -> None:
    C.check_float32(op, name, t, input)
    if t.numel() != 1 or t.dim() > 1:
        C.fail(op, f"{name} must hold one value (shape [1] or []), got shape {tuple(t.shape)}")


def _check_silu_and_mul_quant(result, input, scale) -> None:
    op = "silu_and_mul_quant"
    d = _check_input(op, input, two_d=False)
    _check_out(op, "result", result, input, d, (FP8_DTYPE,))
    _check_scalar_tensor(op, "scale", scale, input)
    C.check_no_partial_overlap(op, "result", result, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "result", result, "scale", scale, allow_same=False)


def _scale_strides(tokens: int, groups: int, transposed: bool):
    return (1, tokens) if transposed else (groups, 1)


def _check_per_block(out, input, scales, group_size, scale_ub, is_scale_transposed) -> None:
    op = "silu_and_mul_per_block_quant"
    d = _check_input(op, input, two_d=True)
    _check_out(op, "out", out, input, d, QUANT_DTYPES)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        C.fail(op, f"group_size must be an int, got {type(group_size).__name__}", TypeError)
    if group_size not in GROUP_SIZES:
        C.fail(op, f"group_size must be 64 or 128, got {group_size}")
    if d % group_size != 0:
        C.fail(op, f"d = input.size(-1) / 2 = {d} must be a multiple of group_size {group_size}")
    if not isinstance(is_scale_transposed, bool):
        C.fail(op, f"is_scale_transposed must be a bool, got {type(is_scale_transposed).__name__}",
               TypeError)
    tokens, groups = input.size(0), d // group_size
    C.check_float32(op, "scales", scales, input)
    if tuple(scales.shape) != (tokens, groups):
        C.fail(op, f"scales must have shape {(tokens, groups)} (num_tokens, d / group_size), "
                   f"got {tuple(scales.shape)}")
    want = _scale_strides(tokens, groups, is_scale_transposed)
    if any(n > 1 and st != w for n, st, w in zip(scales.shape, scales.stride(), want)):
        layout = ("a contiguous [G, T] buffer seen as [T, G] (torch.empty(G, T).t())"
                  if is_scale_transposed else "contiguous [T, G]")
        C.fail(op, f"scales must be {layout} with is_scale_transposed={is_scale_transposed}: "
                   f"strides {want}, got {scales.stride()}")
    if scale_ub is not None:
        _check_scalar_tensor(op, "scale_ub", scale_ub, input)
        if out.dtype != FP8_DTYPE:
            C.fail(op, f"scale_ub is only supported with a float8_e4m3fn out, got {out.dtype}")
    C.check_no_partial_overlap(op, "out", out, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "scales", scales, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "scales", scales, "out", out, allow_same=False)
    if scale_ub is not None:
        C.check_no_partial_overlap(op, "out", out, "scale_ub", scale_ub, allow_same=False)
        C.check_no_partial_overlap(op, "scales", scales, "scale_ub", scale_ub, allow_same=False)


# ---------------------------------------------------------------------------------------------
# silu_and_mul_quant
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::silu_and_mul_quant", mutates_args=("result",))
def _silu_and_mul_quant(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor) -> None:
    """result = fp8(clamp(T(T(silu(x1)) * x2) * (1 / scale))), x1, x2 = input[..., :d], [..., d:].

    Parameters
    ----------
    result : Tensor [..., d] float8_e4m3fn, contiguous; written.
    input : Tensor [..., 2d] float16/bfloat16 (float32 accepted too); last dim contiguous,
        leading dims collapsible into one row stride.
    scale : float32 tensor of one value ([1] or []), on input's device: the static scale.
    """
    _check_silu_and_mul_quant(result, input, scale)
    if result.numel():
        result.copy_(silu_and_mul_quant_ref(input, scale))


@_silu_and_mul_quant.register_fake
def _(result, input, scale):
    _check_silu_and_mul_quant(result, input, scale)


# ---------------------------------------------------------------------------------------------
# silu_and_mul_per_block_quant
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::silu_and_mul_per_block_quant",
                         mutates_args=("out", "scales"))
def _silu_and_mul_per_block_quant(out: torch.Tensor, input: torch.Tensor, scales: torch.Tensor,
                                  group_size: int, scale_ub: Optional[torch.Tensor] = None,
                                  is_scale_transposed: bool = False) -> None:
    """SiLU(x1) * x2 in float32, quantized per (token, group of group_size) with dynamic scales.

    Parameters
    ----------
    out : Tensor [T, d] float8_e4m3fn or int8, contiguous; written.
    input : Tensor [T, 2d] float16/bfloat16 (float32 accepted too); last dim contiguous.
    scales : float32 [T, d / group_size]; written. Row-major, or with is_scale_transposed a
        contiguous [G, T] buffer seen as [T, G] (strides (1, T)).
    group_size : 64 or 128 (d must be a multiple).
    scale_ub : optional float32 tensor of one value bounding each scale (fp8 out only).
    is_scale_transposed : the scales layout above.
    """
    _check_per_block(out, input, scales, group_size, scale_ub, is_scale_transposed)
    if out.numel() == 0:
        return
    q, s = silu_and_mul_per_block_quant_ref(input, group_size, out.dtype, scale_ub)
    out.copy_(q)
    scales.copy_(s)


@_silu_and_mul_per_block_quant.register_fake
def _(out, input, scales, group_size, scale_ub=None, is_scale_transposed=False):
    _check_per_block(out, input, scales, group_size, scale_ub, is_scale_transposed)


if _C is not None:

    @_silu_and_mul_quant.register_kernel("cuda")
    def _(result, input, scale):
        _check_silu_and_mul_quant(result, input, scale)
        _C.silu_and_mul_quant(result, input, scale)

    @_silu_and_mul_per_block_quant.register_kernel("cuda")
    def _(out, input, scales, group_size, scale_ub=None, is_scale_transposed=False):
        _check_per_block(out, input, scales, group_size, scale_ub, is_scale_transposed)
        _C.silu_and_mul_per_block_quant(out, input, scales, group_size, scale_ub,
                                        is_scale_transposed)


# ---------------------------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------------------------
def silu_and_mul_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(silu(x[..., :d]) * x[..., d:] / scale) as a new float8_e4m3fn tensor [..., d]."""
    result = torch.empty(tuple(x.shape[:-1]) + (x.shape[-1] // 2,), dtype=FP8_DTYPE,
                         device=x.device)
    torch.ops.compile_ops.silu_and_mul_quant(result, x, scale)
    return result


def silu_and_mul_per_block_quant(input: torch.Tensor, group_size: int,
                                 quant_dtype: torch.dtype = FP8_DTYPE,
                                 scale_ub: Optional[torch.Tensor] = None,
                                 is_scale_transposed: bool = False):
    """(out [T, d] quant_dtype, scales [T, d / group_size] float32) as vLLM's
    ``_custom_ops.silu_and_mul_per_block_quant``: scales row-major, or with
    ``is_scale_transposed`` a [G, T] buffer returned as its [T, G] transpose (strides (1, T))."""
    tokens, d = input.shape[0], input.shape[-1] // 2
    out = torch.empty(tokens, d, dtype=quant_dtype, device=input.device)
    groups = d // group_size if isinstance(group_size, int) and group_size > 0 else 0
    if is_scale_transposed:
        scales = torch.empty(groups, tokens, dtype=torch.float32, device=input.device).t()
    else:
        scales = torch.empty(tokens, groups, dtype=torch.float32, device=input.device)
    torch.ops.compile_ops.silu_and_mul_per_block_quant(out, input, scales, group_size, scale_ub,
                                                       is_scale_transposed)
    return out, scales
