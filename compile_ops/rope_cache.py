"""Fused RoPE + paged KV-cache write (our ops; what ``rotary_embedding`` followed by
``reshape_and_cache_flash`` / ``reshape_and_cache`` on the rotated key computes, in one pass over
the data)::

    torch.ops.compile_ops.fused_rope_and_cache_flash(
        positions, query, key, value, head_size, cos_sin_cache, is_neox,
        key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale,
        write_key=True) -> None
    torch.ops.compile_ops.fused_rope_and_cache(...same arguments...) -> None

``fused_rope_and_cache_flash`` writes the flash layout (``reshape_and_cache_flash``'s caches),
``fused_rope_and_cache`` vLLM's paged layout (``reshape_and_cache``'s: keys x-packed
``[num_blocks, num_kv_heads, head_size / x, block_size, x]``, values ``[num_blocks, num_kv_heads,
head_size, block_size]``; the value's head size is the key's).

- ``positions``, ``query``, ``key``, ``head_size``, ``cos_sin_cache``, ``is_neox``: exactly as
  ``rotary_embedding`` (``compile_ops/rotary.py``): query is rotated in place; key is rotated and,
  when ``write_key``, written back in place too (``write_key=False`` when nothing else reads the
  rotated key: the fusion pass decides; the key is then only read).
- ``value``: ``[tokens, num_kv_heads, head_size_v]`` as ``reshape_and_cache_flash`` takes it.
- ``key_cache``, ``value_cache``, ``slot_mapping``, ``kv_cache_dtype``, ``k_scale``,
  ``v_scale``: exactly as the cache write (``compile_ops/cache.py``), the key seen as
  ``[tokens, num_kv_heads, head_size]``; only the first ``len(slot_mapping)`` tokens are written,
  slots < 0 are padding.

One kernel reads each query element once and writes it once, reads each key element once and
writes it to the cache (and back, with ``write_key``), and copies each value element to the cache.
Layouts it does not take with 16-byte accesses (unaligned rows, odd rotary splits) run the two
separate kernels instead, with the same results. Out-of-range positions and slots behave as in
the two separate ops (the reference raises; the CUDA kernel leaves the token unrotated / skips
its cache write; ``COMPILE_OPS_VALIDATE=1`` checks on the host).
"""

import math
from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops import cache as _cache
from compile_ops import rotary as _rotary
from compile_ops._extension import _C

__all__ = ["fused_rope_and_cache_flash", "fused_rope_and_cache_flash_ref", "fused_rope_and_cache",
           "fused_rope_and_cache_ref"]
OP = "fused_rope_and_cache_flash"
OP_PAGED = "fused_rope_and_cache"


def _key_rows(key: torch.Tensor, positions: torch.Tensor, head_size: int) -> torch.Tensor:
    """The key as [tokens, num_kv_heads, head_size] (a view: heads are packed per token)."""
    tokens = math.prod(positions.shape)
    lead = positions.dim()  # heads explicitly: with 0 tokens a -1 would be ambiguous
    return key.reshape(tokens, math.prod(key.shape[lead:]) // head_size, head_size)


def _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
           value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key, op=OP):
    if key is None:
        C.fail(op, "key is required (its rotated rows are what the cache receives)")
    if not isinstance(write_key, bool):
        C.fail(op, f"write_key must be a bool, got {type(write_key).__name__}", TypeError)
    _rotary._check(positions, query, key, head_size, cos_sin_cache, is_neox)
    k3 = _key_rows(key, positions, head_size)
    fmt = _cache._check_write(op, k3, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                              k_scale, v_scale, flash=op == OP)
    if value.shape[0] != k3.shape[0]:
        C.fail(op, f"value must have one row per position ({k3.shape[0]}), got "
                   f"{tuple(value.shape)}")
    for name, t in (("query", query), ("key", key)):
        C.check_no_partial_overlap(op, name, t, "value", value, allow_same=False)
    return fmt


def _ref(write, positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
         value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key):
    """rotary_embedding's reference, then `write` (a cache-write op) of the rotated key; mutates
    like the fused ops."""
    q, k = _rotary.rotary_embedding_ref(positions, query, key, head_size, cos_sin_cache, is_neox)
    write(_key_rows(k, positions, head_size), value, key_cache, value_cache, slot_mapping,
          kv_cache_dtype, k_scale, v_scale)
    query.copy_(q)
    if write_key:
        key.copy_(k)


def fused_rope_and_cache_flash_ref(positions, query, key, value, head_size, cos_sin_cache,
                                   is_neox, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                   k_scale, v_scale, write_key=True):
    """The reference: the two ops' references, one after the other (mutates like the op)."""
    _ref(torch.ops.compile_ops.reshape_and_cache_flash, positions, query, key, value, head_size,
         cos_sin_cache, is_neox, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
         v_scale, write_key)


@torch.library.custom_op(
    "compile_ops::fused_rope_and_cache_flash",
    mutates_args=("query", "key", "key_cache", "value_cache"),
    schema="(Tensor positions, Tensor(a1!) query, Tensor(a2!) key, Tensor value, int head_size, "
           "Tensor cos_sin_cache, bool is_neox, Tensor(a3!) key_cache, Tensor(a4!) value_cache, "
           "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale, "
           "bool write_key=True) -> ()")
def _fused_rope_and_cache_flash(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, head_size: int,
                                cos_sin_cache: torch.Tensor, is_neox: bool,
                                key_cache: torch.Tensor, value_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, kv_cache_dtype: str,
                                k_scale: torch.Tensor, v_scale: torch.Tensor,
                                write_key: bool = True) -> None:
    """RoPE on query and key, then the rotated key and the value into the paged cache."""
    _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
           value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key)
    fused_rope_and_cache_flash_ref(positions, query, key, value, head_size, cos_sin_cache,
                                   is_neox, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                   k_scale, v_scale, write_key)


@_fused_rope_and_cache_flash.register_fake
def _(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache, value_cache,
      slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key=True):
    _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
           value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key)


if _C is not None:

    @_fused_rope_and_cache_flash.register_kernel("cuda")
    def _(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
          value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key=True):
        _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
               value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key)
        if _cache._validating():
            _rotary._validate_positions(positions, cos_sin_cache)
            _cache._validate_slots(OP, slot_mapping, key_cache.shape[0] * key_cache.shape[1])
        fused = _C.fused_rope_and_cache_flash(
            positions.contiguous(), query, key, value, head_size, cos_sin_cache, is_neox,
            key_cache, value_cache, slot_mapping.contiguous(), _cache._KV_KIND[kv_cache_dtype],
            k_scale, v_scale, write_key)
        if fused:
            return
        # A layout the one-pass kernel does not take: the two kernels, same results.
        k = key if write_key else key.clone()
        _C.rotary_embedding(positions, query, k, head_size, cos_sin_cache, is_neox)
        _C.reshape_and_cache_flash(_key_rows(k, positions, head_size), value, key_cache,
                                   value_cache, slot_mapping.contiguous(),
                                   _cache._KV_KIND[kv_cache_dtype], k_scale, v_scale)


def fused_rope_and_cache_flash(positions, query, key, value, head_size, cos_sin_cache, is_neox,
                               key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                               k_scale=None, v_scale=None,
                               write_key: bool = True) -> Optional[None]:
    """Calls the op (in place); scales default to 1.0 (float32 tensors on the cache's device)."""
    k_scale, v_scale = _cache._default_scales(key_cache, k_scale, v_scale)
    torch.ops.compile_ops.fused_rope_and_cache_flash(
        positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache, value_cache,
        slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key)


# ---------------------------------------------------------------------------------------------
# The paged layout (reshape_and_cache's caches)
# ---------------------------------------------------------------------------------------------
def fused_rope_and_cache_ref(positions, query, key, value, head_size, cos_sin_cache, is_neox,
                             key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
                             v_scale, write_key=True):
    """The reference: rotary_embedding's and reshape_and_cache's references, one after the other
    (mutates like the op)."""
    _ref(torch.ops.compile_ops.reshape_and_cache, positions, query, key, value, head_size,
         cos_sin_cache, is_neox, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
         v_scale, write_key)


@torch.library.custom_op(
    "compile_ops::fused_rope_and_cache",
    mutates_args=("query", "key", "key_cache", "value_cache"),
    schema="(Tensor positions, Tensor(a1!) query, Tensor(a2!) key, Tensor value, int head_size, "
           "Tensor cos_sin_cache, bool is_neox, Tensor(a3!) key_cache, Tensor(a4!) value_cache, "
           "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale, "
           "bool write_key=True) -> ()")
def _fused_rope_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, head_size: int, cos_sin_cache: torch.Tensor,
                          is_neox: bool, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, kv_cache_dtype: str, k_scale: torch.Tensor,
                          v_scale: torch.Tensor, write_key: bool = True) -> None:
    """RoPE on query and key, then the rotated key and the value into vLLM's paged cache."""
    _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
           value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key, OP_PAGED)
    fused_rope_and_cache_ref(positions, query, key, value, head_size, cos_sin_cache, is_neox,
                             key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale,
                             v_scale, write_key)


@_fused_rope_and_cache.register_fake
def _(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache, value_cache,
      slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key=True):
    _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
           value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key, OP_PAGED)


if _C is not None:

    @_fused_rope_and_cache.register_kernel("cuda")
    def _(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
          value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key=True):
        _check(positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache,
               value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key, OP_PAGED)
        if _cache._validating():
            _rotary._validate_positions(positions, cos_sin_cache)
            _cache._validate_slots(OP_PAGED, slot_mapping, key_cache.shape[0] * key_cache.shape[3])
        fused = _C.fused_rope_and_cache(
            positions.contiguous(), query, key, value, head_size, cos_sin_cache, is_neox,
            key_cache, value_cache, slot_mapping.contiguous(), _cache._KV_KIND[kv_cache_dtype],
            k_scale, v_scale, write_key)
        if fused:
            return
        k = key if write_key else key.clone()
        _C.rotary_embedding(positions, query, k, head_size, cos_sin_cache, is_neox)
        _C.reshape_and_cache(_key_rows(k, positions, head_size), value, key_cache, value_cache,
                             slot_mapping.contiguous(), _cache._KV_KIND[kv_cache_dtype], k_scale,
                             v_scale)


def fused_rope_and_cache(positions, query, key, value, head_size, cos_sin_cache, is_neox,
                         key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                         k_scale=None, v_scale=None, write_key: bool = True) -> Optional[None]:
    """Calls the paged-layout op (in place); scales default to 1.0 (float32 tensors on the
    cache's device)."""
    k_scale, v_scale = _cache._default_scales(key_cache, k_scale, v_scale)
    torch.ops.compile_ops.fused_rope_and_cache(
        positions, query, key, value, head_size, cos_sin_cache, is_neox, key_cache, value_cache,
        slot_mapping, kv_cache_dtype, k_scale, v_scale, write_key)
