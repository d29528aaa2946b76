"""Attention family. So far: ``merge_attn_states`` (vLLM's schema and semantics)::

    torch.ops.compile_ops.merge_attn_states(output, prefix_output, prefix_lse, suffix_output,
                                            suffix_lse, output_lse=None) -> None

Combines two partial attention results over disjoint key sets (prefix and suffix, or two KV
splits) by their log-sum-exps (section 2.2 of arXiv:2501.01005):

    m = max(p_lse, s_lse);  a = exp(p_lse - m);  b = exp(s_lse - m)
    output = prefix_output * a / (a + b) + suffix_output * b / (a + b)
    output_lse = log(a + b) + m

- ``output``, ``prefix_output``, ``suffix_output``: ``[tokens, heads, head_size]`` float32 /
  float16 / bfloat16, one dtype, head_size contiguous (any token and head strides).
- ``prefix_lse``, ``suffix_lse``, ``output_lse``: float32 ``[heads, tokens]``.
- An infinite LSE (+inf or -inf: an empty part; some attention kernels return +inf) counts as
  -inf. Both empty: ``output = prefix_output`` and ``output_lse = -inf`` (vLLM's choice).
- Math in float32, one rounding to the output dtype.

CUDA: a 128-bit kernel (``csrc/attention_kernels.cu``); on a GPU without the built extension, a
Triton kernel (``_triton_merge``) with the same semantics.
"""

from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = ["merge_attn_states", "merge_attn_states_ref"]
OP = "merge_attn_states"


def merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse):
    """(output, output_lse) by the formula above, float32 math."""
    inf = float("inf")
    p = prefix_lse.float()
    s = suffix_lse.float()
    p = torch.where(torch.isinf(p), -inf, p)
    s = torch.where(torch.isinf(s), -inf, s)
    m = torch.maximum(p, s)
    empty = torch.isinf(m)
    m0 = torch.where(empty, 0.0, m)
    a, b = torch.exp(p - m0), torch.exp(s - m0)
    total = a + b
    pa = (a / total).t()[..., None]  # [tokens, heads, 1]
    sb = (b / total).t()[..., None]
    out = prefix_output.float() * pa + suffix_output.float() * sb
    out = torch.where(empty.t()[..., None], prefix_output.float(), out)
    lse = torch.where(empty, m, torch.log(total) + m0)
    return out.to(prefix_output.dtype), lse


def _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse):
    C.check_tensor(OP, "output", output)
    C.check_float_dtype(OP, "output", output)
    if output.dim() != 3:
        C.fail(OP, f"output must be [tokens, heads, head_size], got shape {tuple(output.shape)}")
    tokens, heads = output.shape[0], output.shape[1]
    for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
        C.check_like(OP, name, t, output, "output")
    for name, t in (("output", output), ("prefix_output", prefix_output),
                    ("suffix_output", suffix_output)):
        if t.shape[2] > 1 and t.stride(2) != 1:
            C.fail(OP, f"{name} must be contiguous in head_size, got strides {t.stride()}")
    lses = [("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)]
    if output_lse is not None:
        lses.append(("output_lse", output_lse))
    for name, t in lses:
        C.check_tensor(OP, name, t)
        if t.dtype != torch.float32:
            C.fail(OP, f"{name} must be float32, got {t.dtype}", TypeError)
        if t.device != output.device:
            C.fail(OP, f"{name} must be on device {output.device} (same as output), got "
                       f"{t.device}")
        if tuple(t.shape) != (heads, tokens):
            C.fail(OP, f"{name} must be [heads, tokens] = {[heads, tokens]}, got "
                       f"{list(t.shape)}")
    from compile_ops.cache import _check_no_self_overlap

    _check_no_self_overlap(OP, "output", output)
    for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
        C.check_no_partial_overlap(OP, "output", output, name, t, allow_same=True)
    if output_lse is not None:
        for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
            C.check_no_partial_overlap(OP, "output_lse", output_lse, name, t, allow_same=True)


@torch.library.custom_op("compile_ops::merge_attn_states", mutates_args=("output", "output_lse"))
def _merge_attn_states(output: torch.Tensor, prefix_output: torch.Tensor,
                       prefix_lse: torch.Tensor, suffix_output: torch.Tensor,
                       suffix_lse: torch.Tensor, output_lse: Optional[torch.Tensor] = None) -> None:
    """Merge two partial attention results by their LSEs (see the module docstring)."""
    _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
    out, lse = merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse)
    output.copy_(out)
    if output_lse is not None:
        output_lse.copy_(lse)


@_merge_attn_states.register_fake
def _(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None):
    _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)


@_merge_attn_states.register_kernel("cuda")
def _(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None):
    _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse)
    if _C is not None:
        _C.merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                             output_lse)
    else:
        triton_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                 output_lse)


# ---------------------------------------------------------------------------------------------
# Triton kernel (the CUDA path when compile_ops._C is not built; also runs under
# TRITON_INTERPRET=1 on CPU tensors, which is how the CPU suite tests it)
# ---------------------------------------------------------------------------------------------
_TRITON_KERNEL = None


def _triton_kernel():
    global _TRITON_KERNEL
    if _TRITON_KERNEL is not None:
        return _TRITON_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(out, pre, suf, p_lse, s_lse, o_lse, tokens,
                     out_t, out_h, pre_t, pre_h, suf_t, suf_h,
                     pl_h, pl_t, sl_h, sl_t, ol_h, ol_t,
                     HEAD: tl.constexpr, BLOCK: tl.constexpr, HAS_LSE: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        pl = tl.load(p_lse + h * pl_h + t * pl_t)
        sl = tl.load(s_lse + h * sl_h + t * sl_t)
        neg_inf = float("-inf")
        pl = tl.where((pl == float("inf")) | (pl == neg_inf), neg_inf, pl)
        sl = tl.where((sl == float("inf")) | (sl == neg_inf), neg_inf, sl)
        m = tl.maximum(pl, sl)
        empty = m == neg_inf
        m0 = tl.where(empty, 0.0, m)
        a = tl.exp(pl - m0)
        b = tl.exp(sl - m0)
        total = a + b
        pa = tl.where(empty, 1.0, a / total)
        sb = tl.where(empty, 0.0, b / total)
        d = tl.arange(0, BLOCK)
        mask = d < HEAD
        p = tl.load(pre + t * pre_t + h * pre_h + d, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(suf + t * suf_t + h * suf_h + d, mask=mask, other=0.0).to(tl.float32)
        o = tl.where(empty, p, p * pa + s * sb)
        tl.store(out + t * out_t + h * out_h + d, o.to(out.dtype.element_ty), mask=mask)
        if HAS_LSE:
            tl.store(o_lse + h * ol_h + t * ol_t, tl.where(empty, m, tl.log(total) + m0))

    _TRITON_KERNEL = merge_kernel
    return merge_kernel


def triton_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                             output_lse=None):
    """The op's Triton implementation (no checks: the op's wrapper ran them)."""
    import triton

    tokens, heads, head = output.shape
    if tokens == 0 or heads == 0:
        return
    kernel = _triton_kernel()
    ol = output_lse if output_lse is not None else prefix_lse  # unused when HAS_LSE is False
    kernel[(tokens, heads)](
        output, prefix_output, suffix_output, prefix_lse, suffix_lse, ol, tokens,
        output.stride(0), output.stride(1), prefix_output.stride(0), prefix_output.stride(1),
        suffix_output.stride(0), suffix_output.stride(1),
        prefix_lse.stride(0), prefix_lse.stride(1), suffix_lse.stride(0), suffix_lse.stride(1),
        ol.stride(0), ol.stride(1),
        HEAD=head, BLOCK=triton.next_power_of_2(head), HAS_LSE=output_lse is not None)


def merge_attn_states(prefix_output, prefix_lse, suffix_output, suffix_lse):
    """Functional form: returns ``(output, output_lse)``."""
    output = torch.empty_like(prefix_output)
    output_lse = torch.empty_like(prefix_lse, dtype=torch.float32)
    torch.ops.compile_ops.merge_attn_states(output, prefix_output, prefix_lse, suffix_output,
                                            suffix_lse, output_lse)
    return output, output_lse
