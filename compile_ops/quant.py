"""FP8 activation quantization: vLLM's ``static_scaled_fp8_quant``, ``dynamic_scaled_fp8_quant``,
``dynamic_per_token_scaled_fp8_quant`` and ``per_token_group_fp8_quant`` (schemas and numerics of
vLLM's CUDA kernels, csrc/quantization/w8a8/fp8/{common,per_token_group_quant}.cu).

Registered ops (out-style, exactly as vLLM's ``torch.ops._C`` ops)::

    torch.ops.compile_ops.static_scaled_fp8_quant(result, input, scale, group_shape=None)
    torch.ops.compile_ops.dynamic_scaled_fp8_quant(result, input, scale)
    torch.ops.compile_ops.dynamic_per_token_scaled_fp8_quant(result, input, scale, scale_ub)
    torch.ops.compile_ops.per_token_group_fp8_quant(input, output_q, output_s, group_size, eps,
        fp8_min, fp8_max, scale_ue8m0, dummy_is_scale_transposed=False,
        dummy_is_tma_aligned=False)

Functional wrappers (vLLM's Python API)::

    compile_ops.scaled_fp8_quant(input, scale=None, num_token_padding=None, scale_ub=None,
                                 use_per_token_if_dynamic=False, output=None, group_shape=None)
        -> (out, scale)
    compile_ops.per_token_group_quant_fp8(x, group_size, eps=1e-10, column_major_scales=False,
                                          tma_aligned_scales=False, use_ue8m0=False) -> (q, s)

Numerics (fp32 throughout; ``q(v)`` = clamp fmaxf(-448, fminf(v, 448)), NaN -> +448, then
round to nearest even e4m3fn)::

    static:     inv = 1 / s (per group);                      q(x * inv)
    dynamic:    s = amax(|x|) / 448 over the tensor (NaN ignored, no minimum; the op zeroes the
                scale itself); inv = 1 / s;                   q(x * inv)
    per token:  a = amax(|row|) (NaN ignored), a = fminf(a, ub) with scale_ub,
                s = fmaxf(a / 448, 1 / (448 * 512));          q(x / s)
    per group:  a = max(eps, amax(|group|)), s = a / fp8_max, UE8M0: s = 2^ceil(log2(max(s,
                1e-10))); fminf(fmaxf(x / s, fp8_min), fp8_max) (NaN -> fp8_min), saturated
                to +-448, RNE

The custom-op bodies are the pure-PyTorch references (``*_ref``): the CPU kernels and the test
oracles. The CUDA kernels live in ``csrc/quant_kernels.cu``.
"""

import math
from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C
from compile_ops._fp8 import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, to_fp8

__all__ = ["scaled_fp8_quant", "per_token_group_quant_fp8", "static_scaled_fp8_quant_ref",
           "dynamic_scaled_fp8_quant_ref", "dynamic_per_token_scaled_fp8_quant_ref",
           "per_token_group_fp8_quant_ref", "resolve_group_shape", "ue8m0_round_up_ref"]

_UE8M0_FLOOR = float(torch.tensor(1e-10, dtype=torch.float32))


def _f32(v: float) -> float:
    """v rounded to float32 (what the kernels receive for a double argument)."""
    return float(torch.tensor(float(v), dtype=torch.float32))


def _div(a: torch.Tensor, d: float) -> torch.Tensor:
    """a / d, an IEEE float32 division on every device: PyTorch's CUDA ``div`` turns a Python
    scalar divisor into a multiply by its reciprocal (one ulp off at times), where the kernels
    (vLLM's) divide."""
    return a / torch.full_like(a, d)


# ---------------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------------
def _rows_of(t: torch.Tensor) -> tuple[int, int]:
    hidden = t.size(-1)
    return (t.numel() // hidden if hidden else 0), hidden


def _check_quant_io(op: str, result, input) -> None:
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension, got a 0-d tensor")
    C.check_out(op, "result", result, input, (FP8_DTYPE,), contiguous=False)
    C.check_rows(op, "input", input, writable=False)
    C.check_rows(op, "result", result, writable=True)
    C.check_no_partial_overlap(op, "result", result, "input", input, allow_same=False)


def _check_scale_tensor(op: str, name: str, scale, input) -> None:
    C.check_float32(op, name, scale, input)


def _check_not_overlapping(op: str, name: str, t: torch.Tensor) -> None:
    """The elements of a written tensor `t` are at distinct addresses."""
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1)
    extent = 1
    for st, s in dims:
        if st < extent:
            C.fail(op, f"{name} elements overlap in memory (shape {tuple(t.shape)}, strides "
                       f"{t.stride()})")
        extent = st * (s - 1) + extent


def resolve_group_shape(op: str, input_shape, scale: torch.Tensor,
                        group_shape) -> tuple[int, int]:
    """(group_m, group_n) of static_scaled_fp8_quant: rows and columns per scale group (vLLM's
    rules: per-tensor for a 0-d or one-element scale, 1-D scales need group_shape (-1 = full
    extent) and must be per-column-group or per-row-group, 2-D [Ms, Ns] scales divide the
    [M, N] input evenly and any explicit group_shape must agree)."""
    n = int(input_shape[-1])
    m = 1
    for s in input_shape[:-1]:
        m *= int(s)
    if group_shape is not None:
        if len(group_shape) != 2 or any(isinstance(g, bool) or not isinstance(g, int)
                                        for g in group_shape):
            C.fail(op, f"group_shape must be two ints (rows, columns), got {group_shape}",
                   TypeError)
        if any(g == 0 or g < -1 for g in group_shape):
            C.fail(op, f"group_shape entries must be positive or -1, got {tuple(group_shape)}")
    if scale.numel() == 1:
        return m, n
    if m == 0 or n == 0:
        C.fail(op, f"scale must have one element for an empty input, got shape "
                   f"{tuple(scale.shape)}")
    if scale.dim() == 1:
        if group_shape is None:
            C.fail(op, "a 1-D scale of more than one element needs group_shape")
        gm = m if group_shape[0] == -1 else group_shape[0]
        gn = n if group_shape[1] == -1 else group_shape[1]
        if m % gm or n % gn:
            C.fail(op, f"group_shape {tuple(group_shape)} must divide the input's [{m}, {n}]")
        if scale.numel() != (m // gm) * (n // gn):
            C.fail(op, f"scale must have {(m // gm) * (n // gn)} elements for group_shape "
                       f"{tuple(group_shape)} and input [{m}, {n}], got {scale.numel()}")
        if m // gm != 1 and n // gn != 1:
            C.fail(op, "a 1-D scale must be per column group (group_shape[0] == rows) or per "
                       f"row group (group_shape[1] == columns), got group_shape "
                       f"{tuple(group_shape)} for input [{m}, {n}]")
        return gm, gn
    if scale.dim() == 2:
        ms, ns = scale.shape
        if ms == 0 or ns == 0 or m % ms or n % ns:
            C.fail(op, f"a 2-D scale's shape {tuple(scale.shape)} must divide the input's "
                       f"[{m}, {n}]")
        gm, gn = m // ms, n // ns
        if group_shape is not None:
            want = (m if group_shape[0] == -1 else group_shape[0],
                    n if group_shape[1] == -1 else group_shape[1])
            if want != (gm, gn):
                C.fail(op, f"group_shape {tuple(group_shape)} does not match the scale's "
                           f"groups ({gm}, {gn}) for input [{m}, {n}]")
        return gm, gn
    C.fail(op, f"scale must be 0-d, one element, 1-D or 2-D, got shape {tuple(scale.shape)}")


def _check_static(result, input, scale, group_shape):
    op = "static_scaled_fp8_quant"
    _check_quant_io(op, result, input)
    _check_scale_tensor(op, "scale", scale, input)
    C.check_no_partial_overlap(op, "result", result, "scale", scale, allow_same=False)
    return resolve_group_shape(op, input.shape, scale, group_shape)


def _check_dynamic(result, input, scale):
    op = "dynamic_scaled_fp8_quant"
    _check_quant_io(op, result, input)
    _check_scale_tensor(op, "scale", scale, input)
    if scale.numel() < 1:
        C.fail(op, "scale must have at least one element (element 0 is written)")
    C.check_no_partial_overlap(op, "scale", scale, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "scale", scale, "result", result, allow_same=False)


def _check_per_token(result, input, scale, scale_ub):
    op = "dynamic_per_token_scaled_fp8_quant"
    _check_quant_io(op, result, input)
    _check_scale_tensor(op, "scale", scale, input)
    rows, _ = _rows_of(input)
    if scale.numel() != rows:
        C.fail(op, f"scale must have one element per token ({rows}), got shape "
                   f"{tuple(scale.shape)}")
    C.check_rows(op, "scale", scale.unsqueeze(-1), writable=True)  # one stride between tokens
    C.check_no_partial_overlap(op, "scale", scale, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "scale", scale, "result", result, allow_same=False)
    if scale_ub is not None:
        _check_scale_tensor(op, "scale_ub", scale_ub, input)
        if scale_ub.numel() != 1:
            C.fail(op, f"scale_ub must have one element, got shape {tuple(scale_ub.shape)}")
        C.check_no_partial_overlap(op, "scale", scale, "scale_ub", scale_ub, allow_same=False)


def _check_finite(op: str, name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (float, int)):
        C.fail(op, f"{name} must be a float, got {type(v).__name__}", TypeError)
    if not math.isfinite(float(v)):
        C.fail(op, f"{name} must be finite, got {v}")


def _check_group(input, output_q, output_s, group_size, eps, fp8_min, fp8_max):
    op = "per_token_group_fp8_quant"
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension, got a 0-d tensor")
    if not input.is_contiguous():
        C.fail(op, f"input must be contiguous, got strides {input.stride()}")
    C.check_out(op, "output_q", output_q, input, (FP8_DTYPE,))
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        C.fail(op, f"group_size must be an int, got {type(group_size).__name__}", TypeError)
    k = input.size(-1)
    if group_size <= 0 or k % group_size:
        C.fail(op, f"group_size must be positive and divide the last dimension {k}, got "
                   f"{group_size}")
    _check_finite(op, "eps", eps)
    if eps < 0:
        C.fail(op, f"eps must be >= 0, got {eps}")
    _check_finite(op, "fp8_min", fp8_min)
    _check_finite(op, "fp8_max", fp8_max)
    if not fp8_min < fp8_max:
        C.fail(op, f"fp8_min must be less than fp8_max, got {fp8_min} and {fp8_max}")
    _check_scale_tensor(op, "output_s", output_s, input)
    tokens, g = _rows_of(input)[0], k // group_size
    shapes = [tuple(input.shape[:-1]) + (g,), (tokens, g)]
    if tuple(output_s.shape) not in shapes:
        C.fail(op, f"output_s must have shape {shapes[0]} or {shapes[1]}, got "
                   f"{tuple(output_s.shape)}")
    if output_s.dim() > 2 and output_s.numel():  # the token dims collapse into one stride
        C.check_rows(op, "output_s", output_s[..., :1], writable=False)
    _check_not_overlapping(op, "output_s", output_s)
    C.check_no_partial_overlap(op, "output_q", output_q, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "output_s", output_s, "input", input, allow_same=False)
    C.check_no_partial_overlap(op, "output_s", output_s, "output_q", output_q,
                               allow_same=False)


# ---------------------------------------------------------------------------------------------
# References (the CPU kernels and the oracles)
# ---------------------------------------------------------------------------------------------
def _abs_nan_as_zero(x: torch.Tensor) -> torch.Tensor:
    """|x| in float32 with NaN as 0: the kernels' fmaxf(acc, |x|) from acc = 0 ignores NaN."""
    a = x.float().abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)


def _group_scale_grid(scale: torch.Tensor, m: int, n: int, gm: int, gn: int) -> torch.Tensor:
    """The scale as an [M / gm, N / gn] grid (vLLM indexes it with scale.stride(0/1))."""
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    if scale.dim() == 2:
        return scale
    return scale.reshape(1, -1) if m // gm == 1 else scale.reshape(-1, 1)


def static_scaled_fp8_quant_ref(input: torch.Tensor, scale: torch.Tensor,
                                group_shape=None) -> torch.Tensor:
    """q(x * (1 / s)): the reciprocal once per scale group in float32, then a float32 multiply
    (vLLM's scaled_fp8_conversion<true>)."""
    if input.numel() == 0:
        return torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device)
    gm, gn = resolve_group_shape("static_scaled_fp8_quant", input.shape, scale, group_shape)
    n = input.size(-1)
    m = input.numel() // n
    inv = 1.0 / _group_scale_grid(scale, m, n, gm, gn).float()
    inv = inv.repeat_interleave(gm if inv.size(0) > 1 else 1, 0)
    inv = inv.repeat_interleave(gn if inv.size(1) > 1 else 1, 1)
    y = input.reshape(m, n).float() * inv
    return to_fp8(y).reshape(input.shape)


def dynamic_scaled_fp8_quant_ref(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(x * (1 / s)), s[1]) with s = amax(|x|) / 448 over the whole tensor (NaN ignored, no
    minimum: an all-zero input gives s = 0 and every byte +448, as vLLM's kernel)."""
    if input.numel() == 0:
        return (torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device),
                torch.zeros(1, dtype=torch.float32, device=input.device))
    s = _div(_abs_nan_as_zero(input).amax(), FP8_MAX)
    inv = 1.0 / s
    return to_fp8(input.float() * inv), s.reshape(1)


def dynamic_per_token_scaled_fp8_quant_ref(
        input: torch.Tensor, scale_ub: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(x / s), s [tokens, 1]) with s = fmaxf(fminf(amax(|row|), ub) / 448, 1 / (448 * 512))
    per row (NaN ignored; a division, not a reciprocal multiply)."""
    rows = input.numel() // input.size(-1) if input.size(-1) else 0
    if input.numel() == 0:
        return (torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device),
                torch.empty(rows, 1, dtype=torch.float32, device=input.device))
    a = _abs_nan_as_zero(input).amax(dim=-1, keepdim=True)
    if scale_ub is not None:
        a = torch.fmin(a, scale_ub.reshape(()).float())
    s = torch.fmax(_div(a, FP8_MAX), torch.tensor(FP8_MIN_SCALE, device=a.device))
    q = to_fp8(input.float() / s)
    return q, s.reshape(rows, 1)


def ue8m0_round_up_ref(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(|s|, 1e-10))) exactly (the smallest power of two >= the value; inf
    stays inf): vLLM's exp2f(ceilf(log2f(fmaxf(fabsf(s), 1e-10f))))."""
    v = torch.clamp(s.float().abs(), min=_UE8M0_FLOOR)
    mant, exp = torch.frexp(v)  # v = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)
    p = torch.ldexp(torch.ones_like(v), e)
    return torch.where(torch.isinf(v), v, p)


def _group_fp8(y: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """fminf(fmaxf(y, lo), hi) (NaN -> lo), then __nv_fp8_e4m3's RNE saturating to +-448."""
    y = torch.where(torch.isnan(y), torch.full_like(y, lo), y.clamp(lo, hi))
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def per_token_group_fp8_quant_ref(input: torch.Tensor, group_size: int, eps: float = 1e-10,
                                  fp8_min: float = -FP8_MAX, fp8_max: float = FP8_MAX,
                                  scale_ue8m0: bool = False
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s [..., K / group_size]) per group of group_size consecutive elements of a row:
    s = max(eps, amax(|g|)) / fp8_max (NaN ignored), optionally rounded up to a power of two
    (UE8M0), q = fminf(fmaxf(x / s, fp8_min), fp8_max) as e4m3fn (NaN -> fp8_min)."""
    k = input.size(-1)
    g = k // group_size
    if input.numel() == 0:
        return (torch.empty(input.shape, dtype=FP8_DTYPE, device=input.device),
                torch.empty(tuple(input.shape[:-1]) + (g,), dtype=torch.float32,
                            device=input.device))
    x = input.float().reshape(-1, g, group_size)
    amax = torch.clamp(_abs_nan_as_zero(x).amax(dim=-1), min=_f32(eps))
    s = _div(amax, _f32(fp8_max))
    if scale_ue8m0:
        s = ue8m0_round_up_ref(s)
    q = _group_fp8(x / s.unsqueeze(-1), _f32(fp8_min), _f32(fp8_max))
    return q.reshape(input.shape), s.reshape(tuple(input.shape[:-1]) + (g,))


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::static_scaled_fp8_quant", mutates_args=("result",))
def _static_scaled_fp8_quant(result: torch.Tensor, input: torch.Tensor, scale: torch.Tensor,
                             group_shape: Optional[list[int]] = None) -> None:
    """FP8 quantization with given scales: ``result = e4m3(x * (1 / scale))``.

    Parameters
    ----------
    result : Tensor, float8_e4m3fn, shape of ``input``; written. Last dim contiguous, rows with
        one stride (no overlap).
    input : Tensor [..., N] float32/float16/bfloat16; last dim contiguous, leading dims
        collapsible into one row stride (M rows).
    scale : float32. 0-d or one element: per tensor. 1-D: with ``group_shape`` (rows, columns
        per group, -1 = all): one scale per column group (group rows == M) or per row group
        (group columns == N). 2-D [Ms, Ns] (any strides): groups of [M / Ms, N / Ns].
    group_shape : optional two ints, see ``scale``.
    """
    _check_static(result, input, scale, group_shape)
    result.copy_(static_scaled_fp8_quant_ref(input, scale, group_shape))


@_static_scaled_fp8_quant.register_fake
def _(result, input, scale, group_shape=None):
    _check_static(result, input, scale, group_shape)


@torch.library.custom_op("compile_ops::dynamic_scaled_fp8_quant",
                         mutates_args=("result", "scale"))
def _dynamic_scaled_fp8_quant(result: torch.Tensor, input: torch.Tensor,
                              scale: torch.Tensor) -> None:
    """Dynamic per-tensor FP8 quantization: ``scale[0] = amax(|x|) / 448`` (NaN ignored, no
    minimum), ``result = e4m3(x * (1 / scale))``.

    Parameters
    ----------
    result : Tensor float8_e4m3fn, shape of ``input``; written.
    input : Tensor [..., N] float32/float16/bfloat16, last dim contiguous, rows with one stride.
    scale : float32 tensor of at least one element; its first element is written (the op sets
        it itself: it need not be zeroed). An empty input writes 0.
    """
    _check_dynamic(result, input, scale)
    q, s = dynamic_scaled_fp8_quant_ref(input)
    result.copy_(q)
    scale.as_strided((1,), (1,)).copy_(s)


@_dynamic_scaled_fp8_quant.register_fake
def _(result, input, scale):
    _check_dynamic(result, input, scale)


@torch.library.custom_op("compile_ops::dynamic_per_token_scaled_fp8_quant",
                         mutates_args=("result", "scale"))
def _dynamic_per_token_scaled_fp8_quant(result: torch.Tensor, input: torch.Tensor,
                                        scale: torch.Tensor,
                                        scale_ub: Optional[torch.Tensor]) -> None:
    """Dynamic per-token FP8 quantization: per row ``s = fmaxf(fminf(amax, ub) / 448,
    1 / (448 * 512))``, ``result = e4m3(x / s)``.

    Parameters
    ----------
    result : Tensor float8_e4m3fn, shape of ``input``; written.
    input : Tensor [..., N] float32/float16/bfloat16, last dim contiguous, rows with one stride.
    scale : float32 with one element per token (e.g. [M, 1]), elements laid out with one
        stride; written.
    scale_ub : optional float32 one-element tensor: upper bound on the row amax.
    """
    _check_per_token(result, input, scale, scale_ub)
    q, s = dynamic_per_token_scaled_fp8_quant_ref(input, scale_ub)
    result.copy_(q)
    if s.numel():
        scale.copy_(s.reshape(scale.shape))


@_dynamic_per_token_scaled_fp8_quant.register_fake
def _(result, input, scale, scale_ub):
    _check_per_token(result, input, scale, scale_ub)


@torch.library.custom_op("compile_ops::per_token_group_fp8_quant",
                         mutates_args=("output_q", "output_s"))
def _per_token_group_fp8_quant(input: torch.Tensor, output_q: torch.Tensor,
                               output_s: torch.Tensor, group_size: int, eps: float,
                               fp8_min: float, fp8_max: float, scale_ue8m0: bool,
                               dummy_is_scale_transposed: bool = False,
                               dummy_is_tma_aligned: bool = False) -> None:
    """Per-token-group FP8 quantization (DeepSeek-style block scales).

    Parameters
    ----------
    input : contiguous Tensor [..., K] float32/float16/bfloat16, K % group_size == 0.
    output_q : contiguous float8_e4m3fn Tensor, shape of ``input``; written.
    output_s : float32 [T, K / group_size] (T tokens) or input.shape[:-1] + (K / group_size,);
        written at its own strides: row-major, column-major and TMA-aligned column-major
        (stride (1, round_up(T, 4))) layouts all work.
    group_size, eps, fp8_min, fp8_max, scale_ue8m0 : see the module docstring.
    dummy_is_scale_transposed, dummy_is_tma_aligned : ignored (vLLM passes the layout flags for
        its fusion passes; the layout is read from output_s's strides).
    """
    _check_group(input, output_q, output_s, group_size, eps, fp8_min, fp8_max)
    q, s = per_token_group_fp8_quant_ref(input, group_size, eps, fp8_min, fp8_max, scale_ue8m0)
    output_q.copy_(q)
    if s.numel():
        output_s.copy_(s.reshape(output_s.shape))


@_per_token_group_fp8_quant.register_fake
def _(input, output_q, output_s, group_size, eps, fp8_min, fp8_max, scale_ue8m0,
      dummy_is_scale_transposed=False, dummy_is_tma_aligned=False):
    _check_group(input, output_q, output_s, group_size, eps, fp8_min, fp8_max)


# ---------------------------------------------------------------------------------------------
# CUDA kernels
# ---------------------------------------------------------------------------------------------
if _C is not None:

    @_static_scaled_fp8_quant.register_kernel("cuda")
    def _(result, input, scale, group_shape=None):
        gm, gn = _check_static(result, input, scale, group_shape)
        _C.static_scaled_fp8_quant(result, input, scale, gm, gn)

    @_dynamic_scaled_fp8_quant.register_kernel("cuda")
    def _(result, input, scale):
        _check_dynamic(result, input, scale)
        _C.dynamic_scaled_fp8_quant(result, input, scale)

    @_dynamic_per_token_scaled_fp8_quant.register_kernel("cuda")
    def _(result, input, scale, scale_ub):
        _check_per_token(result, input, scale, scale_ub)
        _C.dynamic_per_token_scaled_fp8_quant(result, input, scale, scale_ub)

    @_per_token_group_fp8_quant.register_kernel("cuda")
    def _(input, output_q, output_s, group_size, eps, fp8_min, fp8_max, scale_ue8m0,
          dummy_is_scale_transposed=False, dummy_is_tma_aligned=False):
        _check_group(input, output_q, output_s, group_size, eps, fp8_min, fp8_max)
        _C.per_token_group_fp8_quant(input, output_q, output_s, group_size, float(eps),
                                     float(fp8_min), float(fp8_max), bool(scale_ue8m0))


# ---------------------------------------------------------------------------------------------
# Functional wrappers (vLLM's Python API)
# ---------------------------------------------------------------------------------------------
def scaled_fp8_quant(input: torch.Tensor, scale: Optional[torch.Tensor] = None,
                     num_token_padding: Optional[int] = None,
                     scale_ub: Optional[torch.Tensor] = None,
                     use_per_token_if_dynamic: bool = False,
                     output: Optional[torch.Tensor] = None,
                     group_shape: Optional[tuple[int, int]] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``scaled_fp8_quant``: quantize a 2-D ``input`` [M, N] to float8_e4m3fn.

    ``scale`` given: static quantization with it (per tensor, or grouped with ``group_shape``).
    Otherwise dynamic: per token (``use_per_token_if_dynamic``, optional ``scale_ub``; scale
    [rows, 1]) or per tensor (scale [1]). ``num_token_padding`` pads the output (and a per-token
    scale) to at least that many rows; padding rows are left uninitialized, as in vLLM.
    ``output`` (optional) is the [rows, N] result buffer. Returns ``(output, scale)``.
    """
    op = "scaled_fp8_quant"
    C.check_tensor(op, "input", input)
    if input.dim() != 2:
        C.fail(op, f"input must be 2-D [tokens, hidden], got shape {tuple(input.shape)}")
    m, n = input.shape
    rows = max(num_token_padding, m) if num_token_padding else m
    if output is None:
        output = torch.empty((rows, n), dtype=FP8_DTYPE, device=input.device)
    elif tuple(output.shape) != (rows, n) or output.dtype != FP8_DTYPE:
        C.fail(op, f"output must be a float8_e4m3fn tensor of shape {(rows, n)}, got "
                   f"{output.dtype} {tuple(output.shape)}")
    result = output[:m]
    if scale is None:
        if use_per_token_if_dynamic:
            scale = torch.empty((rows, 1), dtype=torch.float32, device=input.device)
            torch.ops.compile_ops.dynamic_per_token_scaled_fp8_quant(result, input, scale[:m],
                                                                     scale_ub)
        else:
            if scale_ub is not None:
                C.fail(op, "scale_ub is only used by dynamic per-token quantization")
            scale = torch.empty(1, dtype=torch.float32, device=input.device)
            torch.ops.compile_ops.dynamic_scaled_fp8_quant(result, input, scale)
    else:
        torch.ops.compile_ops.static_scaled_fp8_quant(
            result, input, scale, None if group_shape is None else list(group_shape))
    return output, scale


def _tma_aligned_size(x: int, element_size: int) -> int:
    align = 16 // element_size
    return (x + align - 1) // align * align


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int, eps: float = 1e-10,
                              column_major_scales: bool = False,
                              tma_aligned_scales: bool = False,
                              use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``per_token_group_quant_fp8``: ``(q, s)`` with one float32 scale per group of
    ``group_size`` consecutive elements of each row; ``s`` is [..., K / group_size], row-major,
    or column-major (``column_major_scales``; TMA-aligned token stride with
    ``tma_aligned_scales``)."""
    op = "per_token_group_quant_fp8"
    C.check_tensor(op, "x", x)
    if x.dim() < 1 or group_size <= 0 or x.size(-1) % group_size:
        C.fail(op, f"the last dimension of x {tuple(x.shape)} must be divisible by group_size "
                   f"{group_size}")
    x = x.contiguous()
    g = x.size(-1) // group_size
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if column_major_scales and tma_aligned_scales:
        m = x.size(-2) if x.dim() >= 2 else 1
        if x.dim() > 2:
            C.fail(op, "tma_aligned_scales needs a 2-D x")
        s = torch.empty_strided((m, g), (1, _tma_aligned_size(m, 4)), dtype=torch.float32,
                                device=x.device)
        if x.dim() == 1:
            s = s[0]
    elif column_major_scales:
        if x.dim() > 2:
            C.fail(op, "column_major_scales needs a 1-D or 2-D x (output_s is 2-D)")
        m = x.size(-2) if x.dim() == 2 else 1
        s = torch.empty((g, m), dtype=torch.float32, device=x.device).t()
        if x.dim() == 1:
            s = s[0]
    else:
        s = torch.empty(tuple(x.shape[:-1]) + (g,), dtype=torch.float32, device=x.device)
    torch.ops.compile_ops.per_token_group_fp8_quant(x, q, s, group_size, eps, -FP8_MAX,
                                                    FP8_MAX, use_ue8m0, column_major_scales,
                                                    tma_aligned_scales)
    return q, s
