"""The paged KV-cache family (vLLM's ``_C_cache_ops`` schemas, layouts and semantics).

Registered ops (all mutate their cache / destination argument and return nothing)::

    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                      k_scale, v_scale)
    reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                            k_scale, v_scale)
    swap_blocks(src, dst, block_size_in_bytes, block_mapping)
    convert_fp8(output, input, scale=1.0, kv_dtype="fp8")        (block by block along dim 0)
    gather_and_maybe_dequant_cache(src_cache, dst, block_table, cu_seq_lens, token_to_seq,
                                   num_tokens, kv_cache_dtype, scale, seq_starts=None)
    cp_gather_cache(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None)

Layouts
    key, value: ``[tokens, num_heads, head_size]`` (head_size may differ between key and value
    for the flash layout); heads packed per token, tokens may be strided (slices of a fused qkv
    tensor are fine).
    ``reshape_and_cache``: key_cache ``[num_blocks, num_heads, head_size // x, block_size, x]``
    with ``x = key_cache.size(4)`` (as vLLM reads it: any x >= 1 that divides head_size; the
    usual x is 16 bytes, ``16 // key_cache.element_size()``, the CUDA path's vectorised case,
    other x take an element-wise kernel), value_cache ``[num_blocks, num_heads, head_size,
    block_size]``. (``fused_rope_and_cache``, which shares these checks, still takes only the
    16-byte x: its CUDA kernel assumes it.)
    ``reshape_and_cache_flash``: caches ``[num_blocks, block_size, num_heads, head_size]`` (NHD);
    the HND layout is passed as the permuted view of a ``[num_blocks, num_heads, block_size,
    head_size]`` tensor and its strides are honoured (so is any block stride, e.g. the key and
    value halves of one ``[num_blocks, 2, ...]`` tensor).
    Gathers: src_cache ``[num_blocks, block_size, *entry]`` (each token's entry contiguous),
    dst ``[tokens, *entry]``.
    ``convert_fp8``: output and input agree in size(0) (blocks) and elements per block, shapes
    otherwise free (vLLM converts e.g. a bfloat16 key cache of x = 8 into an FP8 one of x = 16):
    element i of a block, in its flat order, converts element i of the same input block; each
    side keeps its own block stride (see the op's docstring for the full rule).

Slots and FP8
    ``slot = slot_mapping[t]`` (int64) addresses block ``slot // block_size``, offset
    ``slot % block_size``; only the first ``len(slot_mapping)`` tokens are written (key may carry
    padding rows) and slots < 0 are padding, skipped.
    ``kv_cache_dtype``: ``"auto"`` (the cache has the key's dtype; plain copy), ``"fp8"`` =
    ``"fp8_e4m3"``, ``"fp8_e5m2"``. FP8 caches are stored as uint8 or as the matching
    ``torch.float8_*`` dtype. A write stores ``fp8(x / scale)`` (float32 division, saturated to
    the format's largest finite value, round to nearest even: vLLM's ``__NV_SATFINITE``
    conversion); a read returns ``float(code) * scale`` rounded to the destination dtype. Scales
    are float32 tensors: one value, or one per KV head for the writes.

Bad indices
    A slot, block id or block-table position outside the cache never writes or reads out of
    bounds: the reference (the CPU path) raises IndexError, the CUDA kernels skip the token
    (its destination is left untouched), and ``COMPILE_OPS_VALIDATE=1`` makes the CUDA path
    check the indices on the host and raise (a device sync; refused under CUDA-graph capture).
    ``swap_blocks`` takes its mapping on the CPU and always checks it.
"""

import os
from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = [
    "KV_CACHE_DTYPES",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "swap_blocks",
    "convert_fp8",
    "gather_and_maybe_dequant_cache",
    "cp_gather_cache",
    "fp8_format",
    "quantize_fp8_ref",
    "dequantize_fp8_ref",
]

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2}
_KV_KIND = {"auto": 0, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2}  # csrc/include/compile_ops/fp8.cuh


# ---------------------------------------------------------------------------------------------
# FP8 math (shared by every reference body; also the test oracle)
# ---------------------------------------------------------------------------------------------
def fp8_format(op: str, kv_cache_dtype) -> Optional[torch.dtype]:
    """The float8 dtype a kv_cache_dtype string stores (None for "auto"); raises on others."""
    if not isinstance(kv_cache_dtype, str):
        C.fail(op, f"kv_cache_dtype must be a str, got {type(kv_cache_dtype).__name__}",
               TypeError)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        C.fail(op, f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of "
                   f"{', '.join(repr(s) for s in KV_CACHE_DTYPES)}")
    return _FORMATS.get(kv_cache_dtype)


def quantize_fp8_ref(x: torch.Tensor, scale, fmt: torch.dtype) -> torch.Tensor:
    """fp8(x / scale): float32 division, saturate to the largest finite value, round to nearest
    even. A NaN quotient is stored as 0x7F, the canonical NaN that CUDA's conversion
    (``cvt.rn.satfinite``, ``__nv_cvt_float_to_fp8``) writes in both formats, sign dropped (torch's
    own conversion keeps the sign: 0xFF for -NaN, and x86's inf / inf is -NaN). ``scale`` is a
    float or a float32 tensor that broadcasts against x."""
    big = torch.finfo(fmt).max
    q = x.float() / scale
    out = q.clamp(-big, big).to(fmt)
    nan = torch.isnan(q)
    if bool(nan.any()):
        out = torch.where(nan, torch.tensor(0x7F, dtype=torch.uint8).view(fmt), out)
    return out


def dequantize_fp8_ref(q: torch.Tensor, scale, fmt: torch.dtype, dtype: torch.dtype):
    """float(q) * scale rounded to ``dtype``; q is stored as uint8 or as ``fmt``."""
    return (_as_format(q, fmt).float() * scale).to(dtype)


def _as_format(t: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    return t.view(fmt) if t.dtype == torch.uint8 else t


def _store(values: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """values (float8 or the cache dtype) as the cache's storage dtype."""
    if cache.dtype == torch.uint8 and values.dtype != torch.uint8:
        return values.view(torch.uint8)
    return values


def _encode(x: torch.Tensor, cache: torch.Tensor, fmt, scale) -> torch.Tensor:
    return _store(quantize_fp8_ref(x, scale, fmt), cache) if fmt is not None else x


# ---------------------------------------------------------------------------------------------
# Shared checks (reference body, fake kernel and CUDA binding all call these)
# ---------------------------------------------------------------------------------------------
def _check_index(op: str, name: str, t, dtypes=(torch.int64,), dim: int = 1) -> None:
    C.check_tensor(op, name, t)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        C.fail(op, f"{name} must be {want}, got {t.dtype}", TypeError)
    if t.dim() != dim:
        C.fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str):
    if t.device != ref.device:
        C.fail(op, f"{name} must be on device {ref.device} (same as {ref_name}), got {t.device}")


def _check_cache_storage(op: str, name: str, cache: torch.Tensor, fmt, src_dtype, src_name):
    if fmt is None:
        if cache.dtype != src_dtype:
            C.fail(op, f"{name} must have dtype {src_dtype} (same as {src_name}) with "
                       f"kv_cache_dtype 'auto', got {cache.dtype}", TypeError)
    elif cache.dtype not in (torch.uint8, fmt):
        C.fail(op, f"{name} must be uint8 or {fmt} for an FP8 kv_cache_dtype of that format, "
                   f"got {cache.dtype}", TypeError)


def _check_scale(op: str, name: str, scale, ref: torch.Tensor, heads: Optional[int],
                 ref_name: Optional[str] = None):
    C.check_tensor(op, name, scale)
    if scale.dtype != torch.float32:
        C.fail(op, f"{name} must be a float32 tensor, got {scale.dtype}", TypeError)
    if ref_name is None:
        ref_name = "key" if op.startswith("reshape") else "src_cache"
    _check_device(op, name, scale, ref, ref_name)
    allowed = (1,) if heads is None or heads == 1 else (1, heads)
    if scale.numel() not in allowed:
        what = "one value" if len(allowed) == 1 else f"one value or one per head ({heads})"
        C.fail(op, f"{name} must hold {what}, got shape {tuple(scale.shape)}")
    if scale.numel() > 1 and scale.reshape(-1).stride(0) != 1:
        C.fail(op, f"{name} must be contiguous")


def _check_heads(op: str, name: str, x, ref: Optional[torch.Tensor]) -> None:
    """x: [tokens, heads, head_size], each token's heads packed, tokens strided."""
    C.check_tensor(op, name, x)
    if ref is None:
        C.check_float_dtype(op, name, x)
    else:
        if x.dtype != ref.dtype:
            C.fail(op, f"{name} must have dtype {ref.dtype} (same as key), got {x.dtype}",
                   TypeError)
        _check_device(op, name, x, ref, "key")
    if x.dim() != 3:
        C.fail(op, f"{name} must be [tokens, num_heads, head_size], got shape {tuple(x.shape)}")
    heads, size = x.shape[1], x.shape[2]
    if size > 1 and x.stride(2) != 1:
        C.fail(op, f"{name} must be contiguous in head_size, got strides {x.stride()}")
    if heads > 1 and x.stride(1) != size:
        C.fail(op, f"{name} must hold each token's heads contiguously (stride(1) == head_size), "
                   f"got strides {x.stride()}")


def _check_no_self_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """A written view must not alias itself (every dim's stride covers the ones inside it)."""
    dims = sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            C.fail(op, f"{name} has overlapping elements (shape {tuple(t.shape)}, strides "
                       f"{t.stride()}); pass a cache tensor or a permuted view of one")
        span = stride * size


def _check_write(op: str, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                 k_scale, v_scale, *, flash: bool, any_x: bool = False):
    """The cache writes' checks. Paged layout (not flash): with ``any_x`` (reshape_and_cache)
    x is key_cache.size(4), any x >= 1 dividing head_size; without it (the other ops sharing
    these checks, whose CUDA kernels assume it) x must be 16 bytes of the cache dtype."""
    fmt = fp8_format(op, kv_cache_dtype)
    _check_heads(op, "key", key, None)
    _check_heads(op, "value", value, key)
    if value.shape[:2] != key.shape[:2]:
        C.fail(op, f"value must have key's tokens and heads {tuple(key.shape[:2])}, got "
                   f"{tuple(value.shape)}")
    _check_index(op, "slot_mapping", slot_mapping)
    _check_device(op, "slot_mapping", slot_mapping, key, "key")
    n = slot_mapping.shape[0]
    if n > key.shape[0]:
        C.fail(op, f"slot_mapping has {n} slots but key has only {key.shape[0]} tokens")
    heads, dk, dv = key.shape[1], key.shape[2], value.shape[2]
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_tensor(op, name, cache)
        _check_device(op, name, cache, key, "key")
        _check_cache_storage(op, name, cache, fmt, key.dtype, "key")
    if key_cache.dtype != value_cache.dtype:
        C.fail(op, f"value_cache must have key_cache's dtype {key_cache.dtype}, got "
                   f"{value_cache.dtype}", TypeError)
    if flash:
        for name, cache, size in (("key_cache", key_cache, dk), ("value_cache", value_cache, dv)):
            if cache.dim() != 4 or cache.shape[2] != heads or cache.shape[3] != size:
                C.fail(op, f"{name} must be [num_blocks, block_size, {heads}, {size}] "
                           f"(NHD, or HND as a permuted view), got shape {tuple(cache.shape)}")
            if size > 1 and cache.stride(3) != 1:
                C.fail(op, f"{name} must be contiguous in head_size, got strides "
                           f"{cache.stride()}")
        if value_cache.shape[:2] != key_cache.shape[:2]:
            C.fail(op, f"value_cache must have key_cache's [num_blocks, block_size] "
                       f"{tuple(key_cache.shape[:2])}, got {tuple(value_cache.shape)}")
    else:
        if dv != dk:
            C.fail(op, f"value must have key's head_size {dk}, got {dv}")
        if any_x:
            if key_cache.dim() != 5:
                C.fail(op, f"key_cache must be 5-D [num_blocks, {heads}, head_size // x, "
                           f"block_size, x] (x = key_cache.size(4)), got shape "
                           f"{tuple(key_cache.shape)}")
            x = key_cache.shape[4]
            if x < 1 or dk % x != 0:
                C.fail(op, f"key_cache.size(4) is x = {x}, which must be >= 1 and divide "
                           f"head_size {dk} (key_cache [num_blocks, num_heads, head_size // x, "
                           f"block_size, x]), got key_cache shape {tuple(key_cache.shape)}")
            how = f"x = key_cache.size(4) = {x}"
        else:
            x = 16 // key_cache.element_size()
            if dk % x != 0:
                C.fail(op, f"head_size {dk} must be a multiple of x = {x} (16 bytes of "
                           f"{key_cache.dtype})")
            how = "x = 16 // element size"
        nb = key_cache.shape[0] if key_cache.dim() == 5 else None
        bs = key_cache.shape[3] if key_cache.dim() == 5 else None
        want = (nb, heads, dk // x, bs, x)
        if key_cache.dim() != 5 or tuple(key_cache.shape) != want:
            C.fail(op, f"key_cache must be [num_blocks, {heads}, {dk // x}, block_size, {x}] "
                       f"({how}), got shape {tuple(key_cache.shape)}")
        if x > 1 and key_cache.stride(4) != 1:
            C.fail(op, f"key_cache must be contiguous in its last dim (x), got strides "
                       f"{key_cache.stride()}")
        want_v = (nb, heads, dk, bs)
        if tuple(value_cache.shape) != want_v:
            C.fail(op, f"value_cache must be {list(want_v)} ([num_blocks, num_heads, "
                       f"head_size, block_size]), got shape {tuple(value_cache.shape)}")
    _check_no_self_overlap(op, "key_cache", key_cache)
    _check_no_self_overlap(op, "value_cache", value_cache)
    C.check_no_partial_overlap(op, "key_cache", key_cache, "value_cache", value_cache,
                               allow_same=False)
    _check_scale(op, "k_scale", k_scale, key, heads)
    _check_scale(op, "v_scale", v_scale, key, heads)
    return fmt


def _slots(op: str, slot_mapping: torch.Tensor, num_slots: int):
    """Valid token indices and their slots; raises on a slot >= num_slots."""
    slots = slot_mapping.long()
    if slots.numel() and int(slots.max()) >= num_slots:
        bad = int(slots[slots >= num_slots][0])
        C.fail(op, f"slot_mapping holds slot {bad}, outside the cache's {num_slots} slots "
                   f"(num_blocks * block_size)", IndexError)
    idx = (slots >= 0).nonzero().squeeze(1)
    return idx, slots.index_select(0, idx)


def _head_scale(scale: torch.Tensor) -> torch.Tensor:
    """[1] or [heads] -> broadcastable against [n, heads, size]."""
    return scale.reshape(1, -1, 1).float()


# ---------------------------------------------------------------------------------------------
# reshape_and_cache / reshape_and_cache_flash
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("compile_ops::reshape_and_cache",
                         mutates_args=("key_cache", "value_cache"))
def _reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_cache_dtype: str, k_scale: torch.Tensor,
                       v_scale: torch.Tensor) -> None:
    """Write key/value rows into the paged (x-packed key) cache at their slots; x is
    key_cache.size(4) (any x >= 1 dividing head_size)."""
    op = "reshape_and_cache"
    fmt = _check_write(op, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                       k_scale, v_scale, flash=False, any_x=True)
    nb, heads, dx, bs, x = key_cache.shape
    idx, s = _slots(op, slot_mapping, nb * bs)
    blk, off = s // bs, s % bs
    k = _encode(key.index_select(0, idx), key_cache, fmt, _head_scale(k_scale))
    v = _encode(value.index_select(0, idx), value_cache, fmt, _head_scale(v_scale))
    key_cache[blk, :, :, off, :] = k.reshape(-1, heads, dx, x)
    value_cache[blk, :, :, off] = v


@_reshape_and_cache.register_fake
def _(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    _check_write("reshape_and_cache", key, value, key_cache, value_cache, slot_mapping,
                 kv_cache_dtype, k_scale, v_scale, flash=False, any_x=True)


@torch.library.custom_op("compile_ops::reshape_and_cache_flash",
                         mutates_args=("key_cache", "value_cache"))
def _reshape_and_cache_flash(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             kv_cache_dtype: str, k_scale: torch.Tensor,
                             v_scale: torch.Tensor) -> None:
    """Write key/value rows into an NHD (or permuted HND) paged cache at their slots."""
    op = "reshape_and_cache_flash"
    fmt = _check_write(op, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                       k_scale, v_scale, flash=True)
    nb, bs = key_cache.shape[:2]
    idx, s = _slots(op, slot_mapping, nb * bs)
    blk, off = s // bs, s % bs
    key_cache[blk, off] = _encode(key.index_select(0, idx), key_cache, fmt, _head_scale(k_scale))
    value_cache[blk, off] = _encode(value.index_select(0, idx), value_cache, fmt,
                                    _head_scale(v_scale))


@_reshape_and_cache_flash.register_fake
def _(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    _check_write("reshape_and_cache_flash", key, value, key_cache, value_cache, slot_mapping,
                 kv_cache_dtype, k_scale, v_scale, flash=True)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _validating() -> bool:
    return os.environ.get("COMPILE_OPS_VALIDATE", "") not in ("", "0")


def _refuse_capture(op: str, what: str) -> None:
    if torch.cuda.is_current_stream_capturing():
        C.fail(op, f"COMPILE_OPS_VALIDATE=1 checks {what} on the host, which is not possible "
                   "while capturing a CUDA graph; unset it for capture", RuntimeError)


def _validate_slots(op: str, slot_mapping: torch.Tensor, num_slots: int) -> None:
    if slot_mapping.numel() == 0:
        return
    _refuse_capture(op, "slot_mapping")
    hi = int(slot_mapping.max())
    if hi >= num_slots:
        C.fail(op, f"slot_mapping holds slot {hi}, outside the cache's {num_slots} slots "
                   f"(num_blocks * block_size)", IndexError)


if _C is not None:

    @_reshape_and_cache.register_kernel("cuda")
    def _(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
        op = "reshape_and_cache"
        _check_write(op, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                     k_scale, v_scale, flash=False, any_x=True)
        if _validating():
            _validate_slots(op, slot_mapping, key_cache.shape[0] * key_cache.shape[3])
        _C.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping.contiguous(),
                             _KV_KIND[kv_cache_dtype], k_scale, v_scale)

    @_reshape_and_cache_flash.register_kernel("cuda")
    def _(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
        op = "reshape_and_cache_flash"
        _check_write(op, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                     k_scale, v_scale, flash=True)
        if _validating():
            _validate_slots(op, slot_mapping, key_cache.shape[0] * key_cache.shape[1])
        _C.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping.contiguous(),
                                   _KV_KIND[kv_cache_dtype], k_scale, v_scale)


# ---------------------------------------------------------------------------------------------
# swap_blocks
# ---------------------------------------------------------------------------------------------
def _check_swap(src, dst, block_size_in_bytes, block_mapping) -> None:
    op = "swap_blocks"
    C.check_tensor(op, "src", src)
    C.check_tensor(op, "dst", dst)
    if isinstance(block_size_in_bytes, bool) or not isinstance(block_size_in_bytes,
                                                               (int, torch.SymInt)):
        C.fail(op, f"block_size_in_bytes must be an int, got "
                   f"{type(block_size_in_bytes).__name__}", TypeError)
    _check_index(op, "block_mapping", block_mapping, dim=2)
    if block_mapping.shape[1] != 2:
        C.fail(op, f"block_mapping must be [num_pairs, 2] (src block, dst block), got shape "
                   f"{tuple(block_mapping.shape)}")
    if block_mapping.device.type != "cpu":
        C.fail(op, f"block_mapping must be a CPU tensor (its ids are read on the host), got "
                   f"{block_mapping.device}")
    kinds = {src.device.type, dst.device.type}
    if not kinds <= {"cpu", "cuda", "meta"}:
        C.fail(op, f"src and dst must be CPU or CUDA tensors, got {src.device} and {dst.device}")
    if src.device.type == dst.device.type == "cuda" and src.device != dst.device:
        C.fail(op, f"src and dst must be on the same GPU, got {src.device} and {dst.device}")
    for name, t in (("src", src), ("dst", dst)):
        if t.dim() < 1:
            C.fail(op, f"{name} must have a block dimension (dim 0), got a 0-d tensor")
        # A block (dims after 0) is one contiguous run of bytes; blocks do not overlap.
        inner = 1
        for d in range(t.dim() - 1, 0, -1):
            if t.size(d) != 1 and t.stride(d) != inner:
                C.fail(op, f"{name} must be contiguous within a block (dims after 0), got "
                           f"shape {tuple(t.shape)} and strides {t.stride()}")
            inner *= t.size(d)
        if t.size(0) > 1 and t.stride(0) < inner:
            C.fail(op, f"{name} blocks overlap in memory (stride(0) {t.stride(0)} < {inner})")
        block_bytes = inner * t.element_size()
        if not 0 < block_size_in_bytes <= block_bytes:
            C.fail(op, f"block_size_in_bytes must be in (0, {block_bytes}] (the bytes of one "
                       f"{name} block), got {block_size_in_bytes}")
    C.check_no_partial_overlap(op, "src", src, "dst", dst, allow_same=False)


def _check_swap_ids(src, dst, block_mapping) -> None:
    """The mapping lives on the CPU: its ids are always checked (no device sync involved)."""
    if block_mapping.numel() == 0:
        return
    for col, name, t in ((0, "src", src), (1, "dst", dst)):
        ids = block_mapping[:, col]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= t.shape[0]:
            bad = lo if lo < 0 else hi
            C.fail("swap_blocks", f"block_mapping[:, {col}] holds block {bad}, outside "
                                  f"{name}'s {t.shape[0]} blocks", IndexError)


def _byte_blocks(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """[num_blocks, nbytes] uint8 view of the first nbytes of every block of t."""
    es = t.element_size()
    step = t.stride(0) * es if t.size(0) > 1 else nbytes
    raw = torch.empty(0, dtype=torch.uint8, device=t.device)
    return raw.set_(t.untyped_storage(), t.storage_offset() * es, (t.shape[0], nbytes),
                    (step, 1))


@torch.library.custom_op("compile_ops::swap_blocks", mutates_args=("dst",))
def _swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_size_in_bytes: int,
                 block_mapping: torch.Tensor) -> None:
    """Copy the first block_size_in_bytes bytes of src block i to dst block j per (i, j)."""
    _check_swap(src, dst, block_size_in_bytes, block_mapping)
    _check_swap_ids(src, dst, block_mapping)
    if block_mapping.numel() == 0:
        return
    s = _byte_blocks(src, block_size_in_bytes)
    d = _byte_blocks(dst, block_size_in_bytes)
    m = block_mapping.long()
    d[m[:, 1].to(dst.device)] = s[m[:, 0].to(src.device)].to(dst.device)


@_swap_blocks.register_fake
def _(src, dst, block_size_in_bytes, block_mapping):
    _check_swap(src, dst, block_size_in_bytes, block_mapping)


if _C is not None:

    @_swap_blocks.register_kernel("cuda")
    def _(src, dst, block_size_in_bytes, block_mapping):
        _check_swap(src, dst, block_size_in_bytes, block_mapping)
        _check_swap_ids(src, dst, block_mapping)
        if block_mapping.numel() == 0:
            return
        mode = os.environ.get("COMPILE_OPS_SWAP_MODE", "auto")
        if mode not in ("auto", "memcpy", "kernel"):
            C.fail("swap_blocks", f"COMPILE_OPS_SWAP_MODE must be auto, memcpy or kernel, got "
                                  f"{mode!r}")
        _C.swap_blocks(src, dst, int(block_size_in_bytes), block_mapping.contiguous(), mode)


# ---------------------------------------------------------------------------------------------
# convert_fp8
# ---------------------------------------------------------------------------------------------
def _block_elems(t: torch.Tensor) -> int:
    """Elements of one block of t (the product of the dims after dim 0)."""
    n = 1
    for size in t.shape[1:]:
        n *= size
    return n


def _dense_blocks(t: torch.Tensor) -> bool:
    """Whether every block of t (dims after 0) is one run of memory in row-major order (size-1
    dims ignored): then a block's flat order is its memory order, as in vLLM's kernel."""
    expect = 1
    for d in range(t.dim() - 1, 0, -1):
        if t.size(d) != 1 and t.stride(d) != expect:
            return False
        expect *= t.size(d)
    return True


def _check_convert(output, input, scale, kv_dtype):
    op = "convert_fp8"
    C.check_tensor(op, "output", output)
    C.check_tensor(op, "input", input)
    if isinstance(scale, bool) or not isinstance(scale, (float, int)):
        C.fail(op, f"scale must be a float, got {type(scale).__name__}", TypeError)
    if not (0.0 < abs(float(scale)) < float("inf")):
        C.fail(op, f"scale must be finite and non-zero, got {scale}")
    fmt = fp8_format(op, kv_dtype)
    _check_device(op, "output", output, input, "input")
    for name, t in (("input", input), ("output", output)):
        if t.dim() < 1:
            C.fail(op, f"{name} must have a block dimension (dim 0: the cache's blocks), got a "
                       f"0-d tensor")
    if output.shape[0] != input.shape[0]:
        C.fail(op, f"output must have input's number of blocks (size(0)) {input.shape[0]}, got "
                   f"{output.shape[0]} (output shape {tuple(output.shape)}, input shape "
                   f"{tuple(input.shape)})")
    e_in, e_out = _block_elems(input), _block_elems(output)
    if e_out != e_in:
        C.fail(op, f"output blocks must hold as many elements as input blocks: input "
                   f"{tuple(input.shape[1:])} = {e_in} per block, output "
                   f"{tuple(output.shape[1:])} = {e_out} per block")
    if output.shape != input.shape:
        for name, t in (("input", input), ("output", output)):
            if not _dense_blocks(t):
                C.fail(op, f"{name} must be contiguous within a block (dims after 0 packed in "
                           f"row-major order) when output and input shapes differ (blocks are "
                           f"converted in their flat order), got shape {tuple(t.shape)} and "
                           f"strides {t.stride()}")
    floats = C.FLOAT_DTYPES
    if fmt is None:
        for name, t in (("input", input), ("output", output)):
            if t.dtype not in floats:
                C.fail(op, f"{name} must be float32, float16 or bfloat16 with kv_dtype 'auto' "
                           f"(a plain conversion), got {t.dtype}", TypeError)
        direction = 0
    else:
        codes = (torch.uint8, fmt)
        if input.dtype in codes and output.dtype in floats:
            direction = -1  # dequantize
        elif input.dtype in floats and output.dtype in codes:
            direction = 1  # quantize
        else:
            C.fail(op, f"kv_dtype {kv_dtype!r} converts between float32/float16/bfloat16 and "
                       f"uint8 or {fmt}; got input {input.dtype} and output {output.dtype}",
                   TypeError)
    _check_no_self_overlap(op, "output", output)
    C.check_no_partial_overlap(op, "output", output, "input", input,
                               allow_same=output.element_size() == input.element_size())
    return fmt, direction


@torch.library.custom_op("compile_ops::convert_fp8", mutates_args=("output",))
def _convert_fp8(output: torch.Tensor, input: torch.Tensor, scale: float = 1.0,
                 kv_dtype: str = "fp8") -> None:
    """output <- fp8(input / scale) or float(input) * scale (plain cast for 'auto'), block by
    block along dim 0, as vLLM's convert_fp8 (which converts a cache into one of another dtype,
    e.g. an FP8 key cache of x = 16 into a bfloat16 one of x = 8).

    The rule implemented: output and input have the same number of blocks (size(0)) and the same
    number of elements per block (the product of the dims after 0); element i of block b of the
    output is the conversion of element i of block b of the input, i in the block's flat
    (row-major) order. Each side's block stride is its own stride(0) (a slice of a larger cache
    along dim 0, padding between blocks, the key half of a [num_blocks, 2, ...] tensor); output
    blocks must not overlap each other. When the shapes differ, both tensors' blocks must be
    dense in row-major order (then flat order = memory order, the order vLLM's kernel walks);
    with equal shapes any strides are fine (element by element).

    vLLM itself checks none of this: its kernel takes block_stride = input.stride(0) for both
    tensors and converts that many elements per block from the raw pointers, so it is defined
    only where both tensors are laid out as contiguous blocks of that stride; on those calls
    this op gives the same result.
    """
    fmt, direction = _check_convert(output, input, scale, kv_dtype)
    src = input if input.shape == output.shape else input.reshape(output.shape)
    if direction == 0:
        output.copy_(src)
    elif direction > 0:
        output.copy_(_store(quantize_fp8_ref(src, float(scale), fmt), output))
    else:
        output.copy_(dequantize_fp8_ref(src, float(scale), fmt, output.dtype))


@_convert_fp8.register_fake
def _(output, input, scale=1.0, kv_dtype="fp8"):
    _check_convert(output, input, scale, kv_dtype)


if _C is not None:

    @_convert_fp8.register_kernel("cuda")
    def _(output, input, scale=1.0, kv_dtype="fp8"):
        _check_convert(output, input, scale, kv_dtype)
        if output.numel() == 0:
            return
        # The kernel walks dense blocks with each side's own block stride (no temporary);
        # other layouts (only with equal shapes) go through contiguous copies.
        src = input if _dense_blocks(input) else input.contiguous()
        if _dense_blocks(output):
            _C.convert_fp8(output, src, float(scale), _KV_KIND[kv_dtype])
            return
        tmp = torch.empty(output.shape, dtype=output.dtype, device=output.device)
        _C.convert_fp8(tmp, src, float(scale), _KV_KIND[kv_dtype])
        output.copy_(tmp)


# ---------------------------------------------------------------------------------------------
# Gathers
# ---------------------------------------------------------------------------------------------
def _entry_numel(op: str, name: str, t: torch.Tensor, first: int) -> int:
    """Elements of one entry (dims >= first), which must be one contiguous run."""
    expect = 1
    for d in range(t.dim() - 1, first - 1, -1):
        if t.size(d) != 1 and t.stride(d) != expect:
            C.fail(op, f"{name} must hold each token's entry contiguously (dims >= {first} "
                       f"packed), got shape {tuple(t.shape)} and strides {t.stride()}")
        expect *= t.size(d)
    return expect


def _check_gather(op, src_cache, dst, block_table, cu_seq_lens, seq_starts, batch, fmt):
    C.check_tensor(op, "src_cache", src_cache)
    C.check_tensor(op, "dst", dst)
    if src_cache.dim() < 3:
        C.fail(op, f"src_cache must be [num_blocks, block_size, *entry], got shape "
                   f"{tuple(src_cache.shape)}")
    if dst.dim() < 2:
        C.fail(op, f"dst must be [tokens, *entry], got shape {tuple(dst.shape)}")
    _check_device(op, "dst", dst, src_cache, "src_cache")
    if fmt is None:
        if dst.dtype != src_cache.dtype:
            C.fail(op, f"dst must have src_cache's dtype {src_cache.dtype}, got {dst.dtype}",
                   TypeError)
    else:
        C.check_float_dtype(op, "dst", dst)
        _check_cache_storage(op, "src_cache", src_cache, fmt, dst.dtype, "dst")
    e_src = _entry_numel(op, "src_cache", src_cache, 2)
    e_dst = _entry_numel(op, "dst", dst, 1)
    if e_src != e_dst:
        C.fail(op, f"dst entries ({e_dst} elements, dims {tuple(dst.shape[1:])}) must match "
                   f"src_cache entries ({e_src} elements, dims {tuple(src_cache.shape[2:])})")
    _check_no_self_overlap(op, "dst", dst)
    C.check_no_partial_overlap(op, "dst", dst, "src_cache", src_cache, allow_same=False)
    _check_index(op, "block_table", block_table, (torch.int32,), dim=2)
    _check_index(op, "cu_seq_lens", cu_seq_lens, (torch.int32,))
    for name, t in (("block_table", block_table), ("cu_seq_lens", cu_seq_lens)):
        _check_device(op, name, t, src_cache, "src_cache")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        C.fail(op, f"block_table rows must be contiguous, got strides {block_table.stride()}")
    if cu_seq_lens.shape[0] < batch + 1:
        C.fail(op, f"cu_seq_lens must hold batch + 1 = {batch + 1} offsets, got "
                   f"{cu_seq_lens.shape[0]}")
    if block_table.shape[0] < batch:
        C.fail(op, f"block_table must have a row per sequence ({batch}), got "
                   f"{block_table.shape[0]}")
    if seq_starts is not None:
        _check_index(op, "seq_starts", seq_starts, (torch.int32,))
        _check_device(op, "seq_starts", seq_starts, src_cache, "src_cache")
        if seq_starts.shape[0] < batch:
            C.fail(op, f"seq_starts must have one offset per sequence ({batch}), got "
                       f"{seq_starts.shape[0]}")


def _gather_positions(op, src_cache, block_table, cu, seq_of, tokens, seq_starts):
    """(rows kept, block id, offset in block) for tokens; raises on out-of-range indices."""
    bs, nb = src_cache.shape[1], src_cache.shape[0]
    seq = seq_of.long()
    t = torch.arange(tokens, device=seq.device)
    start, end = cu.long()[seq], cu.long()[seq + 1]
    keep = (t >= start) & (t < end)
    t, seq, start = t[keep], seq[keep], start[keep]
    pos = t - start
    if seq_starts is not None:
        pos = pos + seq_starts.long()[seq]
    col = pos // bs
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= block_table.shape[1]):
        C.fail(op, f"a token's position maps to block-table column "
                   f"{int(col.max() if int(col.min()) >= 0 else col.min())}, outside "
                   f"block_table's {block_table.shape[1]} columns", IndexError)
    blk = block_table.long()[seq, col]
    if blk.numel() and (int(blk.min()) < 0 or int(blk.max()) >= nb):
        bad = int(blk[(blk < 0) | (blk >= nb)][0])
        C.fail(op, f"block_table holds block {bad}, outside src_cache's {nb} blocks",
               IndexError)
    return t, blk, pos % bs


def _check_dequant_gather(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens,
                          kv_cache_dtype, scale, seq_starts):
    op = "gather_and_maybe_dequant_cache"
    fmt = fp8_format(op, kv_cache_dtype)
    C.check_tensor(op, "cu_seq_lens", cu_seq_lens)
    batch = max(int(cu_seq_lens.shape[0]) - 1, 0) if cu_seq_lens.dim() == 1 else 0
    _check_gather(op, src_cache, dst, block_table, cu_seq_lens, seq_starts, batch, fmt)
    _check_index(op, "token_to_seq", token_to_seq, (torch.int32,))
    _check_device(op, "token_to_seq", token_to_seq, src_cache, "src_cache")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, torch.SymInt)):
        C.fail(op, f"num_tokens must be an int, got {type(num_tokens).__name__}", TypeError)
    if num_tokens < 0 or num_tokens > dst.shape[0] or num_tokens > token_to_seq.shape[0]:
        C.fail(op, f"num_tokens must be in [0, min(dst rows {dst.shape[0]}, token_to_seq "
                   f"length {token_to_seq.shape[0]})], got {num_tokens}")
    _check_scale(op, "scale", scale, src_cache, None)
    return fmt


@torch.library.custom_op("compile_ops::gather_and_maybe_dequant_cache", mutates_args=("dst",))
def _gather_and_maybe_dequant_cache(src_cache: torch.Tensor, dst: torch.Tensor,
                                    block_table: torch.Tensor, cu_seq_lens: torch.Tensor,
                                    token_to_seq: torch.Tensor, num_tokens: int,
                                    kv_cache_dtype: str, scale: torch.Tensor,
                                    seq_starts: Optional[torch.Tensor] = None) -> None:
    """dst[t] = dequant(src_cache[block_table[s, p // bs], p % bs]) with s = token_to_seq[t],
    p = t - cu_seq_lens[s] (+ seq_starts[s]), for t < num_tokens; rows outside their sequence
    (t >= cu_seq_lens[s + 1]) are left untouched."""
    op = "gather_and_maybe_dequant_cache"
    fmt = _check_dequant_gather(src_cache, dst, block_table, cu_seq_lens, token_to_seq,
                                num_tokens, kv_cache_dtype, scale, seq_starts)
    seq = token_to_seq[:num_tokens]
    batch = cu_seq_lens.shape[0] - 1
    if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= batch):
        C.fail(op, f"token_to_seq holds sequence {int(seq.max())}, outside the batch of "
                   f"{batch} (cu_seq_lens)", IndexError)
    t, blk, off = _gather_positions(op, src_cache, block_table, cu_seq_lens, seq, num_tokens,
                                    seq_starts)
    rows = src_cache[blk, off].reshape(t.shape[0], *dst.shape[1:])
    if fmt is not None:
        rows = dequantize_fp8_ref(rows, scale.reshape(()).float(), fmt, dst.dtype)
    dst[t] = rows


@_gather_and_maybe_dequant_cache.register_fake
def _(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype,
      scale, seq_starts=None):
    _check_dequant_gather(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens,
                          kv_cache_dtype, scale, seq_starts)


def _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts):
    op = "cp_gather_cache"
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, torch.SymInt)) \
            or batch_size < 0:
        C.fail(op, f"batch_size must be an int >= 0, got {batch_size!r}")
    _check_gather(op, src_cache, dst, block_table, cu_seq_lens, seq_starts, batch_size, None)


def _check_cu_values(op: str, cu: torch.Tensor) -> None:
    """cu_seq_lens (the batch's offsets, int64 here) start at >= 0 and never decrease."""
    if cu.numel() and int(cu[0]) < 0:
        C.fail(op, f"cu_seq_lens[0] = {int(cu[0])} is negative", IndexError)
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        i = int(torch.argmax((cu[1:] < cu[:-1]).int()))
        C.fail(op, f"cu_seq_lens must not decrease, got cu_seq_lens[{i + 1}] = {int(cu[i + 1])} "
                   f"< cu_seq_lens[{i}] = {int(cu[i])}", IndexError)


def _seq_of_rows(cu: torch.Tensor, rows: int) -> torch.Tensor:
    """For rows 0..rows-1 of a packed batch: its sequence (rows past the end map to batch)."""
    t = torch.arange(rows, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu.long().contiguous(), t, right=True) - 1


@torch.library.custom_op("compile_ops::cp_gather_cache", mutates_args=("dst",))
def _cp_gather_cache(src_cache: torch.Tensor, dst: torch.Tensor, block_table: torch.Tensor,
                     cu_seq_lens: torch.Tensor, batch_size: int,
                     seq_starts: Optional[torch.Tensor] = None) -> None:
    """dst[cu_seq_lens[s] + i] = src_cache[block_table[s, p // bs], p % bs] with
    p = i (+ seq_starts[s]) for i < seq len, s < batch_size; bit copy, no dtype conversion."""
    op = "cp_gather_cache"
    _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts)
    if batch_size == 0:
        return
    cu = cu_seq_lens[: batch_size + 1].long()
    _check_cu_values(op, cu)
    total = int(cu[-1])
    if total > dst.shape[0]:
        C.fail(op, f"cu_seq_lens[batch_size] = {total} tokens do not fit dst's "
                   f"{dst.shape[0]} rows", IndexError)
    seq = _seq_of_rows(cu, total).clamp(0, batch_size - 1)
    t, blk, off = _gather_positions(op, src_cache, block_table, cu, seq, total, seq_starts)
    dst[t] = src_cache[blk, off].reshape(t.shape[0], *dst.shape[1:])


@_cp_gather_cache.register_fake
def _(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None):
    _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts)


if _C is not None:

    @_gather_and_maybe_dequant_cache.register_kernel("cuda")
    def _(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype,
          scale, seq_starts=None):
        op = "gather_and_maybe_dequant_cache"
        _check_dequant_gather(src_cache, dst, block_table, cu_seq_lens, token_to_seq,
                              num_tokens, kv_cache_dtype, scale, seq_starts)
        if num_tokens == 0 or cu_seq_lens.shape[0] < 2:
            return
        if _validating():
            _refuse_capture(op, "token_to_seq, cu_seq_lens and block_table")
            seq = token_to_seq[:num_tokens]
            batch = cu_seq_lens.shape[0] - 1
            if int(seq.min()) < 0 or int(seq.max()) >= batch:
                C.fail(op, f"token_to_seq holds a sequence outside the batch of {batch}",
                       IndexError)
            _gather_positions(op, src_cache, block_table, cu_seq_lens, seq, num_tokens,
                              seq_starts)
        _C.gather_cache(src_cache, dst, block_table, cu_seq_lens.contiguous(),
                        token_to_seq.contiguous(), int(num_tokens),
                        int(cu_seq_lens.shape[0]) - 1, _KV_KIND[kv_cache_dtype], scale,
                        _contiguous(seq_starts))

    @_cp_gather_cache.register_kernel("cuda")
    def _(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None):
        op = "cp_gather_cache"
        _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts)
        if batch_size == 0 or dst.shape[0] == 0:
            return
        if _validating():
            _refuse_capture(op, "cu_seq_lens and block_table")
            cu = cu_seq_lens[: batch_size + 1].long()
            _check_cu_values(op, cu)
            total = int(cu[-1])
            if total > dst.shape[0]:
                C.fail(op, f"cu_seq_lens[batch_size] = {total} tokens do not fit dst's "
                           f"{dst.shape[0]} rows", IndexError)
            seq = _seq_of_rows(cu, total).clamp(0, batch_size - 1)
            _gather_positions(op, src_cache, block_table, cu, seq, total, seq_starts)
        _C.gather_cache(src_cache, dst, block_table, cu_seq_lens.contiguous(), None,
                        int(dst.shape[0]), int(batch_size), 0, None, _contiguous(seq_starts))


# ---------------------------------------------------------------------------------------------
# Functional conveniences
# ---------------------------------------------------------------------------------------------
def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                      k_scale=None, v_scale=None):
    """Calls the op; scales default to 1.0 (float32 tensors on the cache's device)."""
    k_scale, v_scale = _default_scales(key_cache, k_scale, v_scale)
    torch.ops.compile_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                                            kv_cache_dtype, k_scale, v_scale)


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                            kv_cache_dtype="auto", k_scale=None, v_scale=None):
    """Calls the op; scales default to 1.0 (float32 tensors on the cache's device)."""
    k_scale, v_scale = _default_scales(key_cache, k_scale, v_scale)
    torch.ops.compile_ops.reshape_and_cache_flash(key, value, key_cache, value_cache,
                                                  slot_mapping, kv_cache_dtype, k_scale, v_scale)


def _default_scales(cache, k_scale, v_scale):
    one = None
    if k_scale is None or v_scale is None:
        one = torch.ones(1, dtype=torch.float32, device=cache.device)
    return (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)


def swap_blocks(src, dst, block_size_in_bytes, block_mapping):
    torch.ops.compile_ops.swap_blocks(src, dst, block_size_in_bytes, block_mapping)


def convert_fp8(output, input, scale=1.0, kv_dtype="fp8"):
    torch.ops.compile_ops.convert_fp8(output, input, scale, kv_dtype)


def gather_and_maybe_dequant_cache(src_cache, dst, block_table, cu_seq_lens, token_to_seq,
                                   num_tokens, kv_cache_dtype, scale, seq_starts=None):
    torch.ops.compile_ops.gather_and_maybe_dequant_cache(
        src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype,
        scale, seq_starts)


def cp_gather_cache(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None):
    torch.ops.compile_ops.cp_gather_cache(src_cache, dst, block_table, cu_seq_lens, batch_size,
                                          seq_starts)
