"""RMSNorm fused with FP8 / INT8 activation quantization (vLLM's schemas and numerics).

Registered ops (out-style, exactly vLLM's ``torch.ops._C`` schemas)::

    rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor weight, Tensor scale,
                              float epsilon) -> ()
    fused_add_rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor! residual,
                                        Tensor weight, Tensor scale, float epsilon) -> ()
    rms_norm_dynamic_per_token_quant(Tensor! result, Tensor input, Tensor weight,
                                     Tensor! scale, float epsilon, Tensor? scale_ub,
                                     Tensor!? residual) -> ()
    rms_norm_per_block_quant(Tensor! result, Tensor input, Tensor weight, Tensor! scale,
                             float epsilon, Tensor? scale_ub, Tensor!? residual,
                             int group_size, bool is_scale_transposed) -> ()

Functional wrappers (vLLM's ``_custom_ops`` ones; allocate the result and the scales)::

    rms_norm_dynamic_per_token_quant(input, weight, epsilon, quant_dtype, scale_ub=None,
                                     residual=None) -> (out, scales [T, 1])
    rms_norm_per_block_quant(input, weight, epsilon, quant_dtype, group_size, scale_ub=None,
                             residual=None, is_scale_transposed=False, tma_alignment=0)
        -> (out, scales [T, G])
    rms_norm_static_fp8_quant(input, weight, scale, epsilon) -> out
    fused_add_rms_norm_static_fp8_quant(input, residual, weight, scale, epsilon) -> out

The normalized value is exactly our ``rms_norm``'s (compile_ops/norm.py): statistics in float32,
normalize in float32, round to the input dtype T, multiply by the weight in T:
``n = T(T(z * rsqrt(mean(z^2) + eps)) * w)``. The quantization (compile_ops/_fp8.py) follows vLLM's
CUDA kernels: static ``q = fp8(n * (1 / scale))``; dynamic ``s = max(min(amax, scale_ub) / QMAX,
MIN_SCALE)`` per token or per group of ``group_size`` elements, ``q = fp8(n / s)`` for FP8 and
``q = int8(n * (1 / s))`` for INT8. FP8 clamps with fmaxf(-448, fminf(v, 448)) (NaN -> +448);
amaxes ignore NaN (fmaxf).

The ``*_ref`` functions are the pure-PyTorch references: the CPU kernels and the test oracles
(also used by the fusion passes). The CUDA kernels live in ``csrc/layernorm_quant_kernels.cu``;
they differ from the references only in the float32 reduction order and rsqrtf (as rms_norm).
"""

import math
from typing import Optional, Sequence, Union

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C
from compile_ops._fp8 import (FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, INT8_MAX, INT8_MIN_SCALE,
                              to_fp8, to_int8)
from compile_ops.norm import _normalize, rms_norm_ref

__all__ = [
    "rms_norm_static_fp8_quant", "fused_add_rms_norm_static_fp8_quant",
    "rms_norm_dynamic_per_token_quant", "rms_norm_per_block_quant",
    "rms_norm_static_fp8_quant_ref", "fused_add_rms_norm_static_fp8_quant_ref",
    "rms_norm_dynamic_per_token_quant_ref", "rms_norm_per_block_quant_ref",
    "static_fp8_quant_ref", "dynamic_quant_ref",
]

QUANT_DTYPES = (FP8_DTYPE, torch.int8)
GROUP_SIZES = (64, 128)


# ---------------------------------------------------------------------------------------------
# Math: quantization of an already normalized tensor n (dtype T), and the fused references
# ---------------------------------------------------------------------------------------------
def static_fp8_quant_ref(n: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8(f32(n) * (1 / scale)): the reciprocal of the float32 scale, then a multiply (vLLM's
    static norm + quant kernels)."""
    s = scale.reshape(()).to(device=n.device, dtype=torch.float32)
    inv = torch.ones_like(s) / s
    return to_fp8(n.float() * inv)


def dynamic_quant_ref(n: torch.Tensor, quant_dtype: torch.dtype,
                      group_size: Optional[int] = None,
                      scale_ub: Optional[torch.Tensor] = None):
    """(q, scales) of vLLM's dynamic per-token (group_size None) or per-group quantization of
    the normalized ``n`` [..., H]: per token / group amax of |f32(n)| ignoring NaN,
    ``s = max(min(amax, scale_ub) / QMAX, MIN_SCALE)``, FP8 ``q = fp8(n / s)``, INT8
    ``q = int8(n * (1 / s))``. ``scales`` is float32 [T, 1] or [T, H / group_size], T the
    number of rows."""
    fp8 = quant_dtype == FP8_DTYPE
    qmax, min_sf = (FP8_MAX, FP8_MIN_SCALE) if fp8 else (INT8_MAX, INT8_MIN_SCALE)
    h = n.size(-1)
    rows = math.prod(n.shape[:-1])
    gs = group_size or h
    groups = h // gs if gs else 1  # hidden 0: one empty group per token (amax 0)
    v = n.float().reshape(rows, groups, gs)
    a = v.abs()
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)  # fmaxf ignores NaN
    amax = a.amax(-1, keepdim=True) if gs else a.sum(-1, keepdim=True)
    if scale_ub is not None:
        amax = torch.fmin(amax, scale_ub.reshape(()).to(device=n.device, dtype=torch.float32))
    s = torch.maximum(amax / torch.full_like(amax, qmax), torch.full_like(amax, min_sf))
    if fp8:
        q = to_fp8(v / s)
    else:
        q = to_int8(v * (torch.ones_like(s) / s))
    return q.reshape(n.shape), s.reshape(rows, groups if group_size else 1)


def rms_norm_static_fp8_quant_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                  epsilon: float) -> torch.Tensor:
    """fp8(rms_norm(x) * (1 / scale)) with rms_norm exactly compile_ops' rms_norm."""
    return static_fp8_quant_ref(rms_norm_ref(x, weight, epsilon), scale)


def fused_add_rms_norm_static_fp8_quant_ref(x: torch.Tensor, residual: torch.Tensor,
                                            weight: torch.Tensor, scale: torch.Tensor,
                                            epsilon: float):
    """(q, residual_out): z = T(x + residual) (the sum ROUNDED to the dtype first, as vLLM's
    static kernel), q = fp8(rms_norm(z) * (1 / scale)), residual_out = z."""
    z = (x.float() + residual.float()).to(x.dtype)
    return static_fp8_quant_ref(rms_norm_ref(z, weight, epsilon), scale), z


def _norm_with_residual(x, weight, epsilon, residual):
    """(n, residual_out or None): the sum kept in float32 (unrounded) for the norm."""
    z = x.float()
    if residual is not None:
        z = z + residual.float()
    return _normalize(z, weight, epsilon, x.dtype), (None if residual is None
                                                      else z.to(x.dtype))


def rms_norm_dynamic_per_token_quant_ref(x: torch.Tensor, weight: torch.Tensor, epsilon: float,
                                         quant_dtype: torch.dtype,
                                         scale_ub: Optional[torch.Tensor] = None,
                                         residual: Optional[torch.Tensor] = None):
    """(q, scales [T, 1], residual_out or None): n = rms_norm(x (+ residual, float32 sum)),
    then dynamic_quant_ref per token. residual_out = T(x + residual)."""
    n, res = _norm_with_residual(x, weight, epsilon, residual)
    q, s = dynamic_quant_ref(n, quant_dtype, None, scale_ub)
    return q, s, res


def rms_norm_per_block_quant_ref(x: torch.Tensor, weight: torch.Tensor, epsilon: float,
                                 quant_dtype: torch.dtype, group_size: int,
                                 scale_ub: Optional[torch.Tensor] = None,
                                 residual: Optional[torch.Tensor] = None):
    """(q, scales [T, H / group_size], residual_out or None): as the per-token reference with
    one scale per contiguous group of ``group_size`` elements of a row."""
    n, res = _norm_with_residual(x, weight, epsilon, residual)
    q, s = dynamic_quant_ref(n, quant_dtype, group_size, scale_ub)
    return q, s, res


# ---------------------------------------------------------------------------------------------
# Checks (reference body, fake kernel and CUDA binding all call these)
# ---------------------------------------------------------------------------------------------
def _tokens(input):
    return math.prod(input.shape[:-1])


def _check_float32_like(op, name, t, input):
    C.check_float32(op, name, t, input)


def _check_single(op, name, t, input):
    _check_float32_like(op, name, t, input)
    if t.numel() != 1:
        C.fail(op, f"{name} must have exactly one element, got shape {tuple(t.shape)}")


def _check_base(op, result, input, weight, epsilon, result_dtypes):
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    C.check_weight(op, weight, input)
    C.check_epsilon(op, epsilon)
    C.check_rows(op, "input", input, writable=False)
    C.check_out(op, "result", result, input, result_dtypes)
    C.check_no_partial_overlap(op, "result", result, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "result", result, "weight", weight, allow_same=False)


def _check_residual(op, residual, input, weight, result):
    C.check_like(op, "residual", residual, input)
    C.check_rows(op, "residual", residual, writable=True)
    C.check_no_partial_overlap(op, "residual", residual, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "residual", residual, "weight", weight, allow_same=False)
    C.check_no_partial_overlap(op, "result", result, "residual", residual, allow_same=False)


def _check_static(op, result, input, residual, weight, scale, epsilon):
    _check_base(op, result, input, weight, epsilon, (FP8_DTYPE,))
    if residual is not None:
        _check_residual(op, residual, input, weight, result)
    _check_single(op, "scale", scale, input)


def _check_dynamic(op, result, input, weight, scale, epsilon, scale_ub, residual):
    _check_base(op, result, input, weight, epsilon, QUANT_DTYPES)
    if residual is not None:
        _check_residual(op, residual, input, weight, result)
    _check_float32_like(op, "scale", scale, input)
    if scale_ub is not None:
        _check_single(op, "scale_ub", scale_ub, input)
        if result.dtype != FP8_DTYPE:
            C.fail(op, "scale_ub is only supported with a float8_e4m3fn result, got "
                       f"{result.dtype}")
    written = [("result", result), ("scale", scale)]
    read = [("input", input), ("weight", weight)]
    if residual is not None:
        written.append(("residual", residual))
    if scale_ub is not None:
        read.append(("scale_ub", scale_ub))
    for name, t in written[:1] + written[2:] + read:
        C.check_no_partial_overlap(op, "scale", scale, name, t, allow_same=False)


def _check_per_token_scale(op, scale, input):
    if scale.numel() != _tokens(input) or not scale.is_contiguous():
        C.fail(op, f"scale must be a contiguous float32 tensor of {_tokens(input)} elements "
                   f"(one per token, e.g. [{_tokens(input)}, 1]), got shape "
                   f"{tuple(scale.shape)} and strides {scale.stride()}")


def _check_block_scale(op, scale, input, group_size, is_scale_transposed):
    t, h = _tokens(input), input.size(-1)
    g = h // group_size
    if scale.dim() != 2 or tuple(scale.shape) != (t, g):
        C.fail(op, f"scale must have shape [{t}, {g}] (tokens, hidden / group_size), got "
                   f"{tuple(scale.shape)}")
    if not isinstance(is_scale_transposed, bool):
        C.fail(op, "is_scale_transposed must be a bool, got "
                   f"{type(is_scale_transposed).__name__}", TypeError)
    if not is_scale_transposed:
        if not scale.is_contiguous():
            C.fail(op, f"scale must be contiguous (row-major [tokens, groups]) when "
                       f"is_scale_transposed is False, got strides {scale.stride()}")
    elif (t > 1 and scale.stride(0) != 1) or (g > 1 and scale.stride(1) < t):
        C.fail(op, "with is_scale_transposed, scale must be a column-major [tokens, groups] "
                   f"view: strides (1, S) with S >= {t}, got {scale.stride()}")


def _check_group_size(op, group_size, input):
    if isinstance(group_size, bool) or not isinstance(group_size, (int, torch.SymInt)):
        C.fail(op, f"group_size must be an int, got {type(group_size).__name__}", TypeError)
    if group_size not in GROUP_SIZES:
        C.fail(op, f"group_size must be 64 or 128, got {group_size}")
    if input.dim() >= 1 and input.size(-1) % group_size:
        C.fail(op, f"hidden size {input.size(-1)} (input.size(-1)) must be a multiple of "
                   f"group_size {group_size}")


def _check_rms_norm_static_fp8_quant(result, input, weight, scale, epsilon):
    _check_static("rms_norm_static_fp8_quant", result, input, None, weight, scale, epsilon)


def _check_fused_add_rms_norm_static_fp8_quant(result, input, residual, weight, scale, epsilon):
    C.check_tensor("fused_add_rms_norm_static_fp8_quant", "residual", residual)
    _check_static("fused_add_rms_norm_static_fp8_quant", result, input, residual, weight, scale,
                  epsilon)


def _check_rms_norm_dynamic_per_token_quant(result, input, weight, scale, epsilon, scale_ub,
                                            residual):
    op = "rms_norm_dynamic_per_token_quant"
    _check_dynamic(op, result, input, weight, scale, epsilon, scale_ub, residual)
    _check_per_token_scale(op, scale, input)


def _check_rms_norm_per_block_quant(result, input, weight, scale, epsilon, scale_ub, residual,
                                    group_size, is_scale_transposed):
    op = "rms_norm_per_block_quant"
    C.check_tensor(op, "input", input)
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension, got a 0-d tensor")
    _check_group_size(op, group_size, input)
    _check_dynamic(op, result, input, weight, scale, epsilon, scale_ub, residual)
    _check_block_scale(op, scale, input, group_size, is_scale_transposed)


# ---------------------------------------------------------------------------------------------
# Registered ops (reference bodies = CPU kernels)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::rms_norm_static_fp8_quant", mutates_args=("result",))
def _rms_norm_static_fp8_quant(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                               scale: torch.Tensor, epsilon: float) -> None:
    """RMSNorm then static FP8 quantization into ``result``:
    ``result = fp8(rms_norm(input) * (1 / scale))``.

    Parameters
    ----------
    result : Tensor, float8_e4m3fn, the shape of ``input``, contiguous; written.
    input : Tensor [..., hidden], float32/float16/bfloat16; last dim contiguous, leading dims
        collapsible into one row stride.
    weight : Tensor [hidden], the dtype of ``input``, contiguous.
    scale : float32 tensor of one element ([1] or 0-d): the dequantization scale.
    epsilon : float.

    rms_norm is compile_ops' (normalized value rounded to the dtype, times the weight, rounded);
    the FP8 conversion clamps to +-448 (NaN -> +448) and rounds to nearest even.
    """
    _check_rms_norm_static_fp8_quant(result, input, weight, scale, epsilon)
    result.copy_(rms_norm_static_fp8_quant_ref(input, weight, scale, epsilon))


@_rms_norm_static_fp8_quant.register_fake
def _(result, input, weight, scale, epsilon):
    _check_rms_norm_static_fp8_quant(result, input, weight, scale, epsilon)


@torch.library.custom_op("compile_ops::fused_add_rms_norm_static_fp8_quant",
                         mutates_args=("result", "residual"))
def _fused_add_rms_norm_static_fp8_quant(result: torch.Tensor, input: torch.Tensor,
                                         residual: torch.Tensor, weight: torch.Tensor,
                                         scale: torch.Tensor, epsilon: float) -> None:
    """Residual add + RMSNorm + static FP8 quantization: ``residual <- T(input + residual)``,
    ``result = fp8(rms_norm(residual) * (1 / scale))``; ``input`` is only read.

    Parameters
    ----------
    result : Tensor, float8_e4m3fn, the shape of ``input``, contiguous; written.
    input : Tensor [..., hidden], float32/float16/bfloat16, rows as for rms_norm; read only.
    residual : Tensor, the dtype/device/shape of ``input``, rows with one stride; overwritten
        with the sum. Must not share memory with ``input``.
    weight : Tensor [hidden], the dtype of ``input``, contiguous.
    scale : float32 tensor of one element.
    epsilon : float.

    Unlike ``fused_add_rms_norm`` and ``rms_norm_dynamic_per_token_quant`` (which normalize the
    float32 sum), the sum is ROUNDED to the dtype before the mean square and the normalization,
    as vLLM's fused_add_rms_norm_static_fp8_quant kernel does: the result is exactly
    ``rms_norm_static_fp8_quant`` of the new residual.
    """
    _check_fused_add_rms_norm_static_fp8_quant(result, input, residual, weight, scale, epsilon)
    q, z = fused_add_rms_norm_static_fp8_quant_ref(input, residual, weight, scale, epsilon)
    result.copy_(q)
    residual.copy_(z)


@_fused_add_rms_norm_static_fp8_quant.register_fake
def _(result, input, residual, weight, scale, epsilon):
    _check_fused_add_rms_norm_static_fp8_quant(result, input, residual, weight, scale, epsilon)


@torch.library.custom_op("compile_ops::rms_norm_dynamic_per_token_quant",
                         mutates_args=("result", "scale", "residual"))
def _rms_norm_dynamic_per_token_quant(result: torch.Tensor, input: torch.Tensor,
                                      weight: torch.Tensor, scale: torch.Tensor, epsilon: float,
                                      scale_ub: Optional[torch.Tensor],
                                      residual: Optional[torch.Tensor]) -> None:
    """(Residual add +) RMSNorm + dynamic per-token FP8 or INT8 quantization.

    Parameters
    ----------
    result : Tensor, float8_e4m3fn or int8, the shape of ``input``, contiguous; written.
    input : Tensor [..., hidden], float32/float16/bfloat16, rows as for rms_norm; read only.
    weight : Tensor [hidden], the dtype of ``input``, contiguous.
    scale : float32, contiguous, one element per token (vLLM: [tokens, 1]); written with
        ``max(min(amax, scale_ub) / QMAX, MIN_SCALE)`` (QMAX 448 / 127, MIN_SCALE 1/(448*512) /
        FLT_EPSILON), amax the token's max |n| (NaN ignored).
    epsilon : float.
    scale_ub : float32 tensor of one element or None; caps the amax (FP8 only).
    residual : Tensor like ``input`` or None. When given, the norm is of ``input + residual``
        summed in float32 (unrounded), and ``residual`` is overwritten with the sum rounded to
        the dtype.

    FP8: ``q = fp8(n / s)`` (a division); INT8: ``q = int8(n * (1 / s))`` (round half to even,
    saturating, NaN -> 0).
    """
    _check_rms_norm_dynamic_per_token_quant(result, input, weight, scale, epsilon, scale_ub,
                                            residual)
    q, s, res = rms_norm_dynamic_per_token_quant_ref(input, weight, epsilon, result.dtype,
                                                     scale_ub, residual)
    result.copy_(q)
    scale.copy_(s.reshape(scale.shape))
    if residual is not None:
        residual.copy_(res)


@_rms_norm_dynamic_per_token_quant.register_fake
def _(result, input, weight, scale, epsilon, scale_ub, residual):
    _check_rms_norm_dynamic_per_token_quant(result, input, weight, scale, epsilon, scale_ub,
                                            residual)


@torch.library.custom_op(
    "compile_ops::rms_norm_per_block_quant", mutates_args=("result", "scale", "residual"),
    schema="(Tensor(a0!) result, Tensor input, Tensor weight, Tensor(a3!) scale, float epsilon, "
           "Tensor? scale_ub, Tensor(a6!)? residual, int group_size, bool is_scale_transposed) "
           "-> ()")
def _rms_norm_per_block_quant(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                              scale: torch.Tensor, epsilon: float,
                              scale_ub: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                              group_size: int, is_scale_transposed: bool) -> None:
    """(Residual add +) RMSNorm + dynamic per-group FP8 or INT8 quantization: one scale per
    contiguous group of ``group_size`` elements of each row (DeepSeek-style block quant).

    Parameters
    ----------
    result, input, weight, epsilon, scale_ub, residual : as rms_norm_dynamic_per_token_quant.
    scale : float32 [tokens, hidden / group_size]; written. Row-major (contiguous) when
        ``is_scale_transposed`` is False; otherwise a column-major view, strides (1, S) with
        S >= tokens (S = tokens, or TMA-aligned S = round_up(tokens, 4)).
    group_size : 64 or 128; must divide the hidden size.
    is_scale_transposed : bool, the scale layout above.

    Per group: ``s = max(min(amax, scale_ub) / QMAX, MIN_SCALE)``, FP8 ``q = fp8(n / s)``,
    INT8 ``q = int8(n * (1 / s))``.
    """
    _check_rms_norm_per_block_quant(result, input, weight, scale, epsilon, scale_ub, residual,
                                    group_size, is_scale_transposed)
    q, s, res = rms_norm_per_block_quant_ref(input, weight, epsilon, result.dtype, group_size,
                                             scale_ub, residual)
    result.copy_(q)
    scale.copy_(s)
    if residual is not None:
        residual.copy_(res)


@_rms_norm_per_block_quant.register_fake
def _(result, input, weight, scale, epsilon, scale_ub, residual, group_size,
      is_scale_transposed):
    _check_rms_norm_per_block_quant(result, input, weight, scale, epsilon, scale_ub, residual,
                                    group_size, is_scale_transposed)


# ---------------------------------------------------------------------------------------------
# CUDA kernels
# ---------------------------------------------------------------------------------------------
if _C is not None:

    @_rms_norm_static_fp8_quant.register_kernel("cuda")
    def _(result, input, weight, scale, epsilon):
        _check_rms_norm_static_fp8_quant(result, input, weight, scale, epsilon)
        _C.rms_norm_static_fp8_quant(result, input, weight, scale, float(epsilon))

    @_fused_add_rms_norm_static_fp8_quant.register_kernel("cuda")
    def _(result, input, residual, weight, scale, epsilon):
        _check_fused_add_rms_norm_static_fp8_quant(result, input, residual, weight, scale,
                                                   epsilon)
        _C.fused_add_rms_norm_static_fp8_quant(result, input, residual, weight, scale,
                                               float(epsilon))

    @_rms_norm_dynamic_per_token_quant.register_kernel("cuda")
    def _(result, input, weight, scale, epsilon, scale_ub, residual):
        _check_rms_norm_dynamic_per_token_quant(result, input, weight, scale, epsilon, scale_ub,
                                                residual)
        _C.rms_norm_dynamic_per_token_quant(result, input, weight, scale, float(epsilon),
                                            scale_ub, residual)

    @_rms_norm_per_block_quant.register_kernel("cuda")
    def _(result, input, weight, scale, epsilon, scale_ub, residual, group_size,
          is_scale_transposed):
        _check_rms_norm_per_block_quant(result, input, weight, scale, epsilon, scale_ub,
                                        residual, group_size, is_scale_transposed)
        _C.rms_norm_per_block_quant(result, input, weight, scale, float(epsilon), scale_ub,
                                    residual, int(group_size), bool(is_scale_transposed))


# ---------------------------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------------------------
def rms_norm_static_fp8_quant(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              epsilon: float = 1e-6) -> torch.Tensor:
    """Returns ``fp8(rms_norm(input) * (1 / scale))`` in a new contiguous tensor."""
    C.check_tensor("rms_norm_static_fp8_quant", "input", input)
    out = torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device)
    torch.ops.compile_ops.rms_norm_static_fp8_quant(out, input, weight, scale, epsilon)
    return out


def fused_add_rms_norm_static_fp8_quant(input: torch.Tensor, residual: torch.Tensor,
                                        weight: torch.Tensor, scale: torch.Tensor,
                                        epsilon: float = 1e-6) -> torch.Tensor:
    """Returns the FP8 result; ``residual`` is updated in place to ``input + residual`` (as the
    op, and vLLM's callers)."""
    C.check_tensor("fused_add_rms_norm_static_fp8_quant", "input", input)
    out = torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device)
    torch.ops.compile_ops.fused_add_rms_norm_static_fp8_quant(out, input, residual, weight,
                                                              scale, epsilon)
    return out


def rms_norm_dynamic_per_token_quant(input: torch.Tensor, weight: torch.Tensor, epsilon: float,
                                     quant_dtype: torch.dtype,
                                     scale_ub: Optional[torch.Tensor] = None,
                                     residual: Optional[torch.Tensor] = None):
    """vLLM's ``_custom_ops.rms_norm_dynamic_per_token_quant``: returns ``(out, scales)``,
    out of ``quant_dtype`` (float8_e4m3fn or int8) with input's shape, scales float32
    [tokens, 1]; ``residual`` (if given) is updated in place."""
    C.check_tensor("rms_norm_dynamic_per_token_quant", "input", input)
    out = torch.empty(input.shape, dtype=quant_dtype, device=input.device)
    scales = torch.empty((_tokens(input), 1), dtype=torch.float32, device=input.device)
    torch.ops.compile_ops.rms_norm_dynamic_per_token_quant(out, input, weight, scales, epsilon,
                                                           scale_ub, residual)
    return out, scales


def rms_norm_per_block_quant(input: torch.Tensor, weight: torch.Tensor, epsilon: float,
                             quant_dtype: torch.dtype, group_size: Union[int, Sequence[int]],
                             scale_ub: Optional[torch.Tensor] = None,
                             residual: Optional[torch.Tensor] = None,
                             is_scale_transposed: bool = False, tma_alignment: int = 0):
    """vLLM's ``_custom_ops.rms_norm_per_block_quant``: returns ``(out, scales)`` with scales
    float32 [tokens, hidden / group_size]: row-major, or (``is_scale_transposed``) column-major
    with the token stride padded to a multiple of ``tma_alignment`` (0 or 4). ``group_size`` is
    an int or vLLM's ``[1, group]`` list (its last entry is used)."""
    op = "rms_norm_per_block_quant"
    C.check_tensor(op, "input", input)
    if not isinstance(group_size, int):
        if len(group_size) != 2:
            C.fail(op, f"group_size must be an int or a [1, group] pair, got {group_size}")
        group_size = int(group_size[1])
    if tma_alignment not in (0, 4):
        C.fail(op, f"tma_alignment must be 0 or 4, got {tma_alignment}")
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension, got a 0-d tensor")
    _check_group_size(op, group_size, input)
    t, g = _tokens(input), input.size(-1) // group_size
    out = torch.empty(input.shape, dtype=quant_dtype, device=input.device)
    if not is_scale_transposed:
        scales = torch.empty((t, g), dtype=torch.float32, device=input.device)
    else:
        stride = t if tma_alignment == 0 else (t + tma_alignment - 1) // tma_alignment * \
            tma_alignment
        scales = torch.empty_strided((t, g), (1, max(stride, 1)), dtype=torch.float32,
                                     device=input.device)
    torch.ops.compile_ops.rms_norm_per_block_quant(out, input, weight, scales, epsilon, scale_ub,
                                                   residual, group_size, is_scale_transposed)
    return out, scales
