"""Rotary position embedding (vLLM's ``rotary_embedding`` schema and semantics).

    torch.ops.compile_ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache,
                                           is_neox, rope_dim_offset=0, inverse=False) -> None

Rotates ``query`` and ``key`` in place (``key`` may be None):

- ``positions``: int64 or int32, shape ``P`` (``[tokens]``, or ``[batch, seq]``).
- ``query``: ``P + (num_heads * head_size,)`` or ``P + (num_heads, head_size)``, float32/float16/
  bfloat16; ``key`` likewise with its own (GQA: fewer) heads. Within a head the values are
  contiguous. The heads of a token are at one head stride: ``head_size`` in the flat form (and in
  any packed layout), ``stride(-2)`` in the ``(num_heads, head_size)`` form, which may be larger
  (``t[..., :head_size]`` of a ``[..., heads, head_size + pad]`` tensor: only the ``head_size``
  values of each head are read and written, never the padding). The token dims collapse into one
  token stride (a slice of a fused qkv tensor is fine, with ``[tokens]`` or ``[batch, seq]``
  positions). Written elements must not overlap: head stride >= ``head_size``, and the tokens'
  heads may not run into each other (token stride >= heads' extent, or, heads-major, head stride
  >= tokens' extent). Query and key must not share elements. A tensor with no elements (any
  leading dim 0, e.g. ``[2, 0, hidden]``) is a no-op.
- ``cos_sin_cache``: ``[max_position, rot_dim]``, the cos half then the sin half; float32 or the
  query dtype. ``rot_dim`` is even, and ``rope_dim_offset + rot_dim <= head_size``.
- ``is_neox``: rotate the two halves of the rotary dims (GPT-NeoX) or interleaved pairs (GPT-J).
- ``rope_dim_offset`` (int >= 0, default 0): the rotary dims of each head are
  ``[rope_dim_offset, rope_dim_offset + rot_dim)``; the rest of the head is left untouched
  (partial rotary: vLLM's layer passes ``head_size - rot_dim``, the rotary part at the end).
- ``inverse`` (default False): rotate by the negative angle (sin negated), undoing the forward
  rotation: inverse after forward gives back the input within rounding.

For each pair (x, y) with c, s = cos, sin at the token's position (s = -sin with ``inverse``)::

    x' = x * c - y * s        y' = y * c + x * s

computed in float32 and rounded once to the dtype; the dims outside the rotary ones keep their
bits. A position outside ``[0, max_position)`` raises in the reference (CPU) path; the CUDA kernel
leaves that token untouched and never reads outside the cache (``COMPILE_OPS_VALIDATE=1`` makes
the CUDA path check positions on the host and raise, at the cost of a device sync).

The CUDA kernels: contiguous heads and ``inverse=False`` take the packed kernels (the offset only
moves the base pointer); strided heads or ``inverse`` a separate instantiation with per-tensor
head strides and the sign of sin as arguments. Both have a 128-bit path, taken whenever the base
pointers (offset included), token and head strides and the rotary split allow it.
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


def rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, is_neox,
                         rope_dim_offset=0, inverse=False):
    """Rotated copies (query, key or None; contiguous, the inputs' shapes), float32 math, one
    rounding; the dims outside [rope_dim_offset, rope_dim_offset + rot_dim) keep their bits.
    Takes any strided query/key (a copy is made). Raises on bad positions."""
    pos = positions.reshape(-1).long()
    max_pos = cos_sin_cache.shape[0]
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= max_pos):
        bad = pos[(pos < 0) | (pos >= max_pos)][0].item()
        C.fail(OP, f"positions must be in [0, {max_pos}) (cos_sin_cache rows), got {bad}",
               IndexError)
    cs = cos_sin_cache.index_select(0, pos).float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    if inverse:
        sin = -sin
    lo, hi = rope_dim_offset, rope_dim_offset + 2 * half

    def rotate(x):
        out = x.clone(memory_format=torch.contiguous_format)
        r = _heads_view(out, positions.dim(), head_size)[..., lo:hi]  # a view of out
        v = r.float()
        if is_neox:
            x1, x2 = v[..., :half], v[..., half:]
            rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = v[..., 0::2], v[..., 1::2]
            rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        r.copy_(rot)  # the one rounding to the dtype
        return out

    return rotate(query), (rotate(key) if key is not None else None)


def _collapsed_stride(x: torch.Tensor, dims, what: str) -> Optional[int]:
    """The one stride of `dims` (innermost first) taken as one flat dim: each dim of size > 1
    must sit at the previous one's stride * size. None when every dim has size 1."""
    stride, expect = None, None
    for d in dims:
        if x.size(d) == 1:
            continue
        if expect is not None and x.stride(d) != expect:
            C.fail(OP, f"{what}, got shape {tuple(x.shape)} and strides {x.stride()}")
        if stride is None:
            stride = x.stride(d)
        expect = x.stride(d) * x.size(d)
    return stride


def _heads_layout(name: str, x: torch.Tensor, lead: int, head_size: int, strided: bool):
    """(tokens, heads, token stride, head stride) of a query/key; raises when the heads or the
    tokens are not at one stride each or would overlap when written. `strided`: the heads may
    be at a stride larger than head_size (rotary_embedding); else they must be packed (the fused
    RoPE + cache ops, whose kernels take packed heads only)."""
    per_token = math.prod(x.shape[lead:])
    if per_token % head_size != 0:
        C.fail(OP, f"{name}: {per_token} values per token is not a multiple of head_size "
                   f"{head_size}")
    tokens, heads = math.prod(x.shape[:lead]), per_token // head_size
    if x.numel() == 0:  # nothing to read or write ([2, 0, hidden] included)
        return tokens, heads, heads * head_size, head_size
    # Heads: packed (every per-token layout whose values are contiguous), or with `strided` the
    # form P + (..., head_size) with the head dims at one stride and each head contiguous.
    packed, expect = True, 1
    for d in range(x.dim() - 1, lead - 1, -1):
        if x.size(d) != 1 and x.stride(d) != expect:
            packed = False
        expect *= x.size(d)
    head_stride = head_size
    if not packed:
        if not strided:
            C.fail(OP, f"{name} must hold each token's heads contiguously (dims after the "
                       f"positions' dims packed), got shape {tuple(x.shape)} and strides "
                       f"{x.stride()}")
        if x.dim() < lead + 2 or x.size(-1) != head_size or \
                (head_size > 1 and x.stride(-1) != 1):
            C.fail(OP, f"{name} must be {tuple(x.shape[:lead])} + (heads * head_size,) with "
                       f"its values packed, or + (heads, head_size) with each head contiguous "
                       f"(last dim of size head_size {head_size} and stride 1); got shape "
                       f"{tuple(x.shape)} and strides {x.stride()}")
        head_stride = _collapsed_stride(x, range(x.dim() - 2, lead - 1, -1),
                                        f"{name} head dims must collapse into one head stride")
        if head_stride is None:  # one head: its stride is never used
            head_stride = head_size
    if heads > 1 and head_stride < head_size:
        C.fail(OP, f"{name} heads overlap in memory (head stride {head_stride} < head_size "
                   f"{head_size})")
    # Tokens: leading dims collapsible into one stride.
    token_stride = _collapsed_stride(x, range(lead - 1, -1, -1),
                                     f"{name} token dims must collapse into one stride")
    if token_stride is None:  # one token
        return tokens, heads, heads * head_stride, head_stride
    # Written elements must not overlap: the tokens' heads ([heads, head_size] blocks at the
    # token stride) or, heads-major (token stride < head stride), the heads' tokens.
    heads_extent = (heads - 1) * head_stride + head_size
    tokens_extent = (tokens - 1) * token_stride + head_size
    if not (token_stride >= heads_extent or
            (heads > 1 and head_size <= token_stride < head_stride and
             head_stride >= tokens_extent)):
        C.fail(OP, f"{name} tokens overlap in memory (token stride {token_stride}, {heads} heads "
                   f"of {head_size} at head stride {head_stride})")
    return tokens, heads, token_stride, head_stride


def _check_heads(name: str, x: torch.Tensor, positions: torch.Tensor, head_size: int,
                 ref: Optional[torch.Tensor], strided: bool) -> None:
    C.check_tensor(OP, name, x)
    if ref is None:
        C.check_float_dtype(OP, name, x)
    else:
        C.check_like(OP, name, x, ref, "query", shape=False)
    lead = positions.dim()
    if x.dim() <= lead or tuple(x.shape[:lead]) != tuple(positions.shape):
        C.fail(OP, f"{name} must have shape {tuple(positions.shape)} + (heads * head_size,) or "
                   f"+ (heads, head_size) (leading dims = positions' shape), got {tuple(x.shape)}")
    _heads_layout(name, x, lead, head_size, strided)


def _check(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0,
           inverse=False, strided_heads=False) -> None:
    """rotary_embedding's checks (strided_heads=True); the fused RoPE + cache ops call it with
    the default False: their kernels take packed heads only."""
    C.check_tensor(OP, "positions", positions)
    if positions.dtype not in (torch.int64, torch.int32):
        C.fail(OP, f"positions must be int64 or int32, got {positions.dtype}", TypeError)
    if isinstance(head_size, bool) or not isinstance(head_size, (int, torch.SymInt)) \
            or head_size <= 0:
        C.fail(OP, f"head_size must be a positive int, got {head_size!r}")
    if not isinstance(is_neox, bool):
        C.fail(OP, f"is_neox must be a bool, got {type(is_neox).__name__}", TypeError)
    if isinstance(rope_dim_offset, bool) or not isinstance(rope_dim_offset, (int, torch.SymInt)):
        C.fail(OP, f"rope_dim_offset must be an int, got {type(rope_dim_offset).__name__}",
               TypeError)
    if rope_dim_offset < 0:
        C.fail(OP, f"rope_dim_offset must be >= 0, got {rope_dim_offset}")
    if not isinstance(inverse, bool):
        C.fail(OP, f"inverse must be a bool, got {type(inverse).__name__}", TypeError)
    _check_heads("query", query, positions, head_size, None, strided_heads)
    if key is not None:
        _check_heads("key", key, positions, head_size, query, strided_heads)
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
    if rope_dim_offset + rot_dim > head_size:
        C.fail(OP, f"rope_dim_offset {rope_dim_offset} + rot_dim {rot_dim} "
                   f"(cos_sin_cache.size(1)) must be <= head_size {head_size}")
    if not cos_sin_cache.is_contiguous():
        C.fail(OP, "cos_sin_cache must be contiguous")


@torch.library.custom_op(
    "compile_ops::rotary_embedding", mutates_args=("query", "key"),
    schema="(Tensor positions, Tensor(a1!) query, Tensor(a2!)? key, int head_size, "
           "Tensor cos_sin_cache, bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()")
def _rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
                      head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool,
                      rope_dim_offset: int = 0, inverse: bool = False) -> None:
    """Rotary embedding in place on query (and key). See the module docstring."""
    _check(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset, inverse,
           True)
    q, k = rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, is_neox,
                                rope_dim_offset, inverse)
    # copy_ into the views: only their elements are written (a padded head's padding is not)
    query.copy_(q)
    if key is not None:
        key.copy_(k)


@_rotary_embedding.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0,
      inverse=False):
    _check(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset, inverse,
           True)


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
    def _(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0,
          inverse=False):
        _check(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset,
               inverse, True)
        if os.environ.get("COMPILE_OPS_VALIDATE", "") not in ("", "0"):
            _validate_positions(positions, cos_sin_cache)
        _C.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox,
                            rope_dim_offset, inverse)


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox=True,
                     rope_dim_offset=0, inverse=False):
    """Functional form: returns rotated copies ``(query, key)`` and leaves the inputs alone."""
    q = query.clone()
    k = key.clone() if key is not None else None
    torch.ops.compile_ops.rotary_embedding(positions, q, k, head_size, cos_sin_cache, is_neox,
                                           rope_dim_offset, inverse)
    return q, k
