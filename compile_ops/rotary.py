"""Rotary position embedding (vLLM's ``rotary_embedding`` schema and semantics).

    torch.ops.compile_ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache,
                                           is_neox) -> None

Rotates ``query`` and ``key`` in place (``key`` may be None):

- ``positions``: int64 or int32, shape ``P`` (``[tokens]``, or ``[batch, seq]``).
- ``query``: ``P + (num_heads * head_size,)`` or ``P + (num_heads, head_size)``, float32/float16/
  bfloat16; each token's heads packed contiguously, tokens may be strided (a slice of a fused
  qkv tensor is fine). ``key`` likewise with its own (GQA: fewer) heads.
- ``cos_sin_cache``: ``[max_position, rot_dim]``, the cos half then the sin half; float32 or the
  query dtype. ``rot_dim <= head_size``: only the first ``rot_dim`` dims of each head rotate
  (partial rotary), the rest are left untouched.
- ``is_neox``: rotate the two halves of the rotary dims (GPT-NeoX) or interleaved pairs (GPT-J).

For each pair (x, y) with c, s = cos, sin at the token's position::

    x' = x * c - y * s        y' = y * c + x * s

computed in float32 and rounded once to the dtype. A position outside ``[0, max_position)``
raises in the reference (CPU) path; the CUDA kernel leaves that token untouched and never reads
outside the cache (``COMPILE_OPS_VALIDATE=1`` makes the CUDA path check positions on the host and
raise, at the cost of a device sync).
"""

import math
import os
from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = ["rotary_embedding", "rotary_embedding_ref"]
OP = "rotary_embedding"


def _heads_view(x: torch.Tensor, lead: int, head_size: int) -> torch.Tensor:
    """[tokens, heads, head_size] view (or copy) of a query/key."""
    tokens = math.prod(x.shape[:lead])
    # heads explicitly: with 0 tokens a -1 would be ambiguous (nothing to infer it from)
    return x.reshape(tokens, math.prod(x.shape[lead:]) // head_size, head_size)


def rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, is_neox):
    """Rotated copies (query, key or None), float32 math, one rounding; raises on bad positions."""
    pos = positions.reshape(-1).long()
    max_pos = cos_sin_cache.shape[0]
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= max_pos):
        bad = pos[(pos < 0) | (pos >= max_pos)][0].item()
        C.fail(OP, f"positions must be in [0, {max_pos}) (cos_sin_cache rows), got {bad}",
               IndexError)
    cs = cos_sin_cache.index_select(0, pos).float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x):
        v = _heads_view(x, positions.dim(), head_size).float()
        r = v[..., : 2 * half]
        if is_neox:
            x1, x2 = r[..., :half], r[..., half:]
            rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
            rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rot, v[..., 2 * half:]), dim=-1).to(x.dtype).reshape(x.shape)

    return rotate(query), (rotate(key) if key is not None else None)


def _check_heads(name: str, x: torch.Tensor, positions: torch.Tensor, head_size: int,
                 ref: Optional[torch.Tensor]) -> None:
    C.check_tensor(OP, name, x)
    if ref is None:
        C.check_float_dtype(OP, name, x)
    else:
        C.check_like(OP, name, x, ref, "query", shape=False)
    lead = positions.dim()
    if x.dim() <= lead or tuple(x.shape[:lead]) != tuple(positions.shape):
        C.fail(OP, f"{name} must have shape {tuple(positions.shape)} + (heads * head_size,) or "
                   f"+ (heads, head_size) (leading dims = positions' shape), got {tuple(x.shape)}")
    per_token = math.prod(x.shape[lead:])
    if per_token % head_size != 0:
        C.fail(OP, f"{name}: {per_token} values per token is not a multiple of head_size "
                   f"{head_size}")
    # The values of one token must be packed: contiguous from the last dim outwards.
    expect = 1
    for d in range(x.dim() - 1, lead - 1, -1):
        if x.size(d) != 1 and x.stride(d) != expect:
            C.fail(OP, f"{name} must hold each token's heads contiguously (dims after the "
                       f"positions' dims packed), got shape {tuple(x.shape)} and strides "
                       f"{x.stride()}")
        expect *= x.size(d)
    # Tokens: leading dims collapsible into one stride, and rows must not overlap (written).
    row_stride, expect = None, None
    for d in range(lead - 1, -1, -1):
        if x.size(d) == 1:
            continue
        if expect is not None and x.stride(d) != expect:
            C.fail(OP, f"{name} token dims must collapse into one stride, got strides "
                       f"{x.stride()}")
        if row_stride is None:
            row_stride = x.stride(d)
        expect = x.stride(d) * x.size(d)
    if row_stride is not None and row_stride < per_token:
        C.fail(OP, f"{name} tokens overlap in memory (token stride {row_stride} < {per_token})")


def _check(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    C.check_tensor(OP, "positions", positions)
    if positions.dtype not in (torch.int64, torch.int32):
        C.fail(OP, f"positions must be int64 or int32, got {positions.dtype}", TypeError)
    if isinstance(head_size, bool) or not isinstance(head_size, (int, torch.SymInt)) \
            or head_size <= 0:
        C.fail(OP, f"head_size must be a positive int, got {head_size!r}")
    if not isinstance(is_neox, bool):
        C.fail(OP, f"is_neox must be a bool, got {type(is_neox).__name__}", TypeError)
    _check_heads("query", query, positions, head_size, None)
    if key is not None:
        _check_heads("key", key, positions, head_size, query)
        C.check_no_partial_overlap(OP, "query", query, "key", key, allow_same=False)
    if positions.device != query.device:
        C.fail(OP, f"positions must be on device {query.device} (same as query), got "
                   f"{positions.device}")
    C.check_tensor(OP, "cos_sin_cache", cos_sin_cache)
    if cos_sin_cache.dtype not in (torch.float32, query.dtype):
        C.fail(OP, f"cos_sin_cache must be float32 or {query.dtype} (the query dtype), got "
                   f"{cos_sin_cache.dtype}", TypeError)
    if cos_sin_cache.device != query.device:
        C.fail(OP, f"cos_sin_cache must be on device {query.device} (same as query), got "
                   f"{cos_sin_cache.device}")
    if cos_sin_cache.dim() != 2:
        C.fail(OP, f"cos_sin_cache must be [max_position, rot_dim], got shape "
                   f"{tuple(cos_sin_cache.shape)}")
    rot_dim = cos_sin_cache.size(1)
    if rot_dim % 2 != 0 or rot_dim == 0:
        C.fail(OP, f"cos_sin_cache's rot_dim must be even and > 0, got {rot_dim}")
    if rot_dim > head_size:
        C.fail(OP, f"rot_dim {rot_dim} (cos_sin_cache.size(1)) must be <= head_size {head_size}")
    if not cos_sin_cache.is_contiguous():
        C.fail(OP, "cos_sin_cache must be contiguous")


@torch.library.custom_op(
    "compile_ops::rotary_embedding", mutates_args=("query", "key"),
    schema="(Tensor positions, Tensor(a1!) query, Tensor(a2!)? key, int head_size, "
           "Tensor cos_sin_cache, bool is_neox) -> ()")
def _rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
                      head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotary embedding in place on query (and key). See the module docstring."""
    _check(positions, query, key, head_size, cos_sin_cache, is_neox)
    q, k = rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, is_neox)
    query.copy_(q)
    if key is not None:
        key.copy_(k)


@_rotary_embedding.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox):
    _check(positions, query, key, head_size, cos_sin_cache, is_neox)


def _validate_positions(positions, cos_sin_cache):
    """Opt-in host check for the CUDA path (a device sync; not allowed under graph capture)."""
    if positions.numel() == 0:
        return
    if torch.cuda.is_current_stream_capturing():
        C.fail(OP, "COMPILE_OPS_VALIDATE=1 checks positions on the host, which is not possible "
                   "while capturing a CUDA graph; unset it for capture", RuntimeError)
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= cos_sin_cache.shape[0]:
        C.fail(OP, f"positions must be in [0, {cos_sin_cache.shape[0]}) (cos_sin_cache rows), "
                   f"got values in [{lo}, {hi}]", IndexError)


if _C is not None:

    @_rotary_embedding.register_kernel("cuda")
    def _(positions, query, key, head_size, cos_sin_cache, is_neox):
        _check(positions, query, key, head_size, cos_sin_cache, is_neox)
        if os.environ.get("COMPILE_OPS_VALIDATE", "") not in ("", "0"):
            _validate_positions(positions, cos_sin_cache)
        _C.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox=True):
    """Functional form: returns rotated copies ``(query, key)`` and leaves the inputs alone."""
    q = query.clone()
    k = key.clone() if key is not None else None
    torch.ops.compile_ops.rotary_embedding(positions, q, k, head_size, cos_sin_cache, is_neox)
    return q, k
