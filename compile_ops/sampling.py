"""Greedy sampling: argmax over the vocabulary.

Registered op (functional: vLLM samples greedily with ``torch.argmax`` in Python, so there is no
vLLM schema to follow; the semantics are torch's)::

    torch.ops.compile_ops.argmax(Tensor input) -> Tensor
        out[...] = index of the first maximum of input[..., :], int64, shape input.shape[:-1]

Same result as ``torch.argmax(input, dim=-1)``: of equal values the first index wins (``-0.0`` and
``+0.0`` are equal), a NaN is larger than every number (the first NaN wins), ``inf`` is an
ordinary maximum. ``input`` is float32/float16/bfloat16 with at least one dimension and a
non-empty last dimension (below 2^31 entries).

Why an op: Inductor reduces each row of ``logits.argmax(-1)`` in one CTA, which for a 128k-entry
vocabulary is latency-bound (~29 us per decode step on an H200 at every batch up to 128, the
step's largest kernel after the GEMMs and attention). The CUDA kernel splits long rows over CTAs
and merges their (value, index) keys. The ``argmax`` pass of the ``compile_ops`` backend
(lowerings/argmax.py) puts it in place of ``aten.argmax`` where it wins.

Functional wrapper: ``compile_ops.argmax(x) -> Tensor``.
"""

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = ["argmax"]


def _check_argmax(input) -> None:
    op = "argmax"
    C.check_tensor(op, "input", input)
    C.check_float_dtype(op, "input", input)
    if input.dim() < 1:
        C.fail(op, "input must have at least one dimension (the vocabulary), got a 0-d tensor")
    n = input.size(-1)
    if n == 0:
        C.fail(op, f"input's last dimension must not be empty, got shape {tuple(input.shape)}")
    if n >= 2 ** 31:
        C.fail(op, f"input's last dimension must be below 2^31, got {n}")


@torch.library.custom_op("compile_ops::argmax", mutates_args=())
def _argmax(input: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum over the last dimension (NaN the largest), as
    ``torch.argmax(input, dim=-1)``.

    Parameters
    ----------
    input : Tensor [..., n], float32/float16/bfloat16, n >= 1; any strides.

    Returns
    -------
    Tensor [...], int64, on input's device.
    """
    _check_argmax(input)
    return torch.argmax(input, dim=-1)


@_argmax.register_fake
def _(input):
    _check_argmax(input)
    return input.new_empty(input.shape[:-1], dtype=torch.int64)


if _C is not None:

    @_argmax.register_kernel("cuda")
    def _(input):
        _check_argmax(input)
        n = input.size(-1)
        out = torch.empty(input.shape[:-1], dtype=torch.int64, device=input.device)
        x = input.reshape(-1, n)  # a view where the leading dimensions collapse, else a copy
        if n > 1 and x.stride(-1) != 1:
            x = x.contiguous()
        _C.argmax(out.view(-1), x)
        return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.ops.compile_ops.argmax(x)``: the index of the first maximum of each last-dim row."""
    return torch.ops.compile_ops.argmax(x)
