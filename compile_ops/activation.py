"""Gated activations (vLLM schemas and semantics): ``act(gate) * up`` over ``input = [..., 2*d]``.

Registered ops (out-style, as vLLM's ``torch.ops._C`` ops)::

    torch.ops.compile_ops.silu_and_mul(out, input) -> None        out = silu(x[..., :d]) * x[..., d:]
    torch.ops.compile_ops.mul_and_silu(out, input) -> None        out = x[..., :d] * silu(x[..., d:])
    torch.ops.compile_ops.gelu_and_mul(out, input) -> None        exact (erf) GELU
    torch.ops.compile_ops.gelu_tanh_and_mul(out, input) -> None   tanh-approximated GELU
    torch.ops.compile_ops.fatrelu_and_mul(out, input, threshold=0.0) -> None
        out = where(x1 > threshold, x1, 0) * x2
    torch.ops.compile_ops.swigluoai_and_mul(out, input, alpha=1.702, limit=7.0) -> None
        gpt-oss clamped SwiGLU on the *interleaved* layout: gate = x[..., 0::2], up = x[..., 1::2],
        out = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)

``input`` is ``[..., 2*d]`` (fp32/fp16/bf16, last dim contiguous, leading dims collapsible into one
row stride), ``out`` is ``[..., d]`` of the same dtype. Rounding follows vLLM's kernels: the
activation is computed in float32 and rounded to the dtype, then multiplied by the other half
(rounded again); swigluoai is computed wholly in float32 and rounded once.

Functional wrappers (``compile_ops.silu_and_mul(x) -> Tensor``, ...) allocate ``out``.
"""

import torch
import torch.nn.functional as F

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = ["silu_and_mul", "mul_and_silu", "gelu_and_mul", "gelu_tanh_and_mul", "fatrelu_and_mul",
           "swigluoai_and_mul", "act_and_mul_ref"]

# Kernel ids shared with csrc/activation_kernels.cu (enum ActKind).
_KIND = {"silu_and_mul": 0, "mul_and_silu": 1, "gelu_and_mul": 2, "gelu_tanh_and_mul": 3,
         "fatrelu_and_mul": 4}


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def act_and_mul_ref(name: str, x: torch.Tensor, threshold: float = 0.0, alpha: float = 1.702,
                    limit: float = 7.0) -> torch.Tensor:
    """Reference math of every op of the family (float32 inside, vLLM's roundings)."""
    dtype = x.dtype
    if name == "swigluoai_and_mul":
        gate, up = x[..., 0::2].float(), x[..., 1::2].float()
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        return ((u + 1.0) * (g * torch.sigmoid(alpha * g))).to(dtype)
    d = x.shape[-1] // 2
    a, b = x[..., :d].float(), x[..., d:].float()
    if name == "mul_and_silu":
        return (a * _round(F.silu(b), dtype)).to(dtype)
    if name == "silu_and_mul":
        act = F.silu(a)
    elif name == "gelu_and_mul":
        act = F.gelu(a)
    elif name == "gelu_tanh_and_mul":
        act = F.gelu(a, approximate="tanh")
    elif name == "fatrelu_and_mul":
        act = torch.where(a > threshold, a, torch.zeros_like(a))
    else:
        raise ValueError(f"unknown activation {name!r}")
    return (_round(act, dtype) * b).to(dtype)


def _check(op: str, out, input) -> None:
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    C.check_tensor(op, "out", out)
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension")
    two_d = input.size(-1)
    if two_d % 2 != 0:
        C.fail(op, f"input's last dimension must be even (2*d), got {two_d}")
    want = tuple(input.shape[:-1]) + (two_d // 2,)
    if tuple(out.shape) != want:
        C.fail(op, f"out must have shape {want} (input.shape[:-1] + (d,)), got {tuple(out.shape)}")
    C.check_like(op, "out", out, input, shape=False)
    C.check_rows(op, "input", input, writable=False)
    C.check_rows(op, "out", out, writable=True)
    C.check_no_partial_overlap(op, "out", out, "input", input, allow_same=False)


def _check_scalar(op: str, name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (float, int)):
        C.fail(op, f"{name} must be a float, got {type(v).__name__}", TypeError)
    if not (float("-inf") < float(v) < float("inf")):
        C.fail(op, f"{name} must be finite, got {v}")


def _define(name: str, doc: str):
    """Register compile_ops::<name>(Tensor! out, Tensor input) -> () with fake and CUDA kernel."""

    def body(out: torch.Tensor, input: torch.Tensor) -> None:
        _check(name, out, input)
        out.copy_(act_and_mul_ref(name, input))

    body.__name__ = name
    body.__doc__ = doc
    op = torch.library.custom_op(f"compile_ops::{name}", mutates_args=("out",))(body)

    @op.register_fake
    def _(out, input):
        _check(name, out, input)

    if _C is not None:
        kind = _KIND[name]

        @op.register_kernel("cuda")
        def _(out, input):
            _check(name, out, input)
            _C.act_and_mul(out, input, kind, 0.0)

    return op


_silu_and_mul = _define("silu_and_mul", "out = silu(input[..., :d]) * input[..., d:]")
_mul_and_silu = _define("mul_and_silu", "out = input[..., :d] * silu(input[..., d:])")
_gelu_and_mul = _define("gelu_and_mul", "out = gelu(input[..., :d]) * input[..., d:] (erf GELU)")
_gelu_tanh_and_mul = _define("gelu_tanh_and_mul",
                             "out = gelu_tanh(input[..., :d]) * input[..., d:]")


@torch.library.custom_op("compile_ops::fatrelu_and_mul", mutates_args=("out",))
def _fatrelu_and_mul(out: torch.Tensor, input: torch.Tensor, threshold: float = 0.0) -> None:
    """out = where(x1 > threshold, x1, 0) * x2 with x1, x2 = input[..., :d], input[..., d:]."""
    _check("fatrelu_and_mul", out, input)
    _check_scalar("fatrelu_and_mul", "threshold", threshold)
    out.copy_(act_and_mul_ref("fatrelu_and_mul", input, threshold=threshold))


@_fatrelu_and_mul.register_fake
def _(out, input, threshold=0.0):
    _check("fatrelu_and_mul", out, input)
    _check_scalar("fatrelu_and_mul", "threshold", threshold)


@torch.library.custom_op("compile_ops::swigluoai_and_mul", mutates_args=("out",))
def _swigluoai_and_mul(out: torch.Tensor, input: torch.Tensor, alpha: float = 1.702,
                       limit: float = 7.0) -> None:
    """gpt-oss SwiGLU on interleaved [gate0, up0, gate1, up1, ...]:
    out = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    _check("swigluoai_and_mul", out, input)
    _check_scalar("swigluoai_and_mul", "alpha", alpha)
    _check_scalar("swigluoai_and_mul", "limit", limit)
    out.copy_(act_and_mul_ref("swigluoai_and_mul", input, alpha=alpha, limit=limit))


@_swigluoai_and_mul.register_fake
def _(out, input, alpha=1.702, limit=7.0):
    _check("swigluoai_and_mul", out, input)
    _check_scalar("swigluoai_and_mul", "alpha", alpha)
    _check_scalar("swigluoai_and_mul", "limit", limit)


if _C is not None:

    @_fatrelu_and_mul.register_kernel("cuda")
    def _(out, input, threshold=0.0):
        _check("fatrelu_and_mul", out, input)
        _check_scalar("fatrelu_and_mul", "threshold", threshold)
        _C.act_and_mul(out, input, _KIND["fatrelu_and_mul"], float(threshold))

    @_swigluoai_and_mul.register_kernel("cuda")
    def _(out, input, alpha=1.702, limit=7.0):
        _check("swigluoai_and_mul", out, input)
        _check_scalar("swigluoai_and_mul", "alpha", alpha)
        _check_scalar("swigluoai_and_mul", "limit", limit)
        _C.swigluoai_and_mul(out, input, float(alpha), float(limit))


# ---------------------------------------------------------------------------------------------
# Functional wrappers
# ---------------------------------------------------------------------------------------------
def _empty_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(x.shape[:-1]) + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] as a new tensor."""
    out = _empty_out(x)
    torch.ops.compile_ops.silu_and_mul(out, x)
    return out


def mul_and_silu(x: torch.Tensor) -> torch.Tensor:
    """x[..., :d] * silu(x[..., d:]) as a new tensor."""
    out = _empty_out(x)
    torch.ops.compile_ops.mul_and_silu(out, x)
    return out


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu(x[..., :d]) * x[..., d:] (erf GELU) as a new tensor."""
    out = _empty_out(x)
    torch.ops.compile_ops.gelu_and_mul(out, x)
    return out


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x[..., :d]) * x[..., d:] as a new tensor."""
    out = _empty_out(x)
    torch.ops.compile_ops.gelu_tanh_and_mul(out, x)
    return out


def fatrelu_and_mul(x: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """where(x1 > threshold, x1, 0) * x2 as a new tensor."""
    out = _empty_out(x)
    torch.ops.compile_ops.fatrelu_and_mul(out, x, threshold)
    return out


def swigluoai_and_mul(x: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss clamped SwiGLU over interleaved gate/up as a new tensor."""
    out = _empty_out(x)
    torch.ops.compile_ops.swigluoai_and_mul(out, x, alpha, limit)
    return out
