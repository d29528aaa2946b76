"""MLA (multi-head latent attention) and sparse-indexer cache ops, vLLM's schemas and semantics.

Registered ops (all mutate their cache / destination arguments and return nothing)::

    concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)
    concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox,
                                    slot_mapping, kv_cache, kv_cache_dtype, kv_cache_scale)
    cp_gather_and_upconvert_fp8_kv_cache(src_cache, dst, block_table, workspace_starts,
                                         batch_size, seq_starts=None)
    indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)
    cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)

MLA cache entries (``kv_cache [num_blocks, block_size, entry]``, one entry per token, the entry
contiguous, block and token strides free)
    ``auto``: ``[kv_c | k_pe]`` in the model dtype (``entry = kv_lora_rank + pe_dim``, DeepSeek:
    512 + 64). ``fp8`` / ``fp8_e4m3`` / ``fp8_e5m2``: the same, each value stored as
    ``fp8(x / scale)`` (one float32 scale for the tensor; uint8 or float8 storage).
    ``fp8_ds_mla`` (DeepSeek's FlashMLA format, 656 bytes per token, uint8 or float8_e4m3fn
    storage; kv_lora_rank 512, pe_dim 64, 16-bit inputs): bytes 0-511 the e4m3 codes of kv_c in
    four tiles of 128 values, bytes 512-527 the four float32 tile scales
    ``max(amax(|tile|) / 448, FLT_MIN)``, bytes 528-655 the 64 k_pe values bit for bit. The
    ``scale`` argument is not used in this format (as in vLLM). The rope bits keep the input's
    dtype while ``cp_gather_and_upconvert_fp8_kv_cache`` reads them as bf16 (FlashMLA's dtype; vLLM
    does the same): write this format from bf16 inputs if it is read back by the upconvert. The
    upconvert computes ``bf16(float(code) * scale)``; a NaN there (a 0x7F code, or any code of a
    tile whose scale is +inf) is stored as 0x7FFF, CUDA's canonical bf16 NaN.

Indexer cache (``kv_cache`` uint8 ``[num_blocks, block_size, head_dim + head_dim // Q * 4]``,
``Q = quant_block_size``, each block contiguous). Block-major, as vLLM lays it out: a block holds
first the e4m3 codes of all its tokens (token ``o`` at bytes ``o * head_dim ...``), then their
float32 scales (token ``o``, group ``g`` at byte ``block_size * head_dim + (o * head_dim / Q + g)
* 4``). A group's scale is ``max(amax, 1e-4) / 448``; with ``kv_cache_dtype == "ue8m0"`` it is
rounded up to a power of two (computed exactly from the float's bits; vLLM uses
``exp2f(ceilf(log2f(s)))``, the same value except where log2f rounds).

Quantization arithmetic of ``fp8_ds_mla`` and the indexer (reference, CUDA kernels and vLLM's
kernels alike), per tile / group of values x (float32 of the input):
    ``amax`` is the largest ``|x|`` over the values that are not NaN (0 when all are NaN): NaN is
    skipped, as CUDA's ``fmaxf`` does in vLLM's reductions; an infinity counts (amax = inf). The
    scale is the formula above in float32, one rounding per operation (a division, not a
    multiply by 1/448); ``ue8m0`` keeps an infinite scale infinite. A code is
    ``e4m3(x / scale)``: float32 division, saturated to +-448, round to nearest even; a NaN
    quotient is stored as 0x7F (CUDA's canonical e4m3 NaN, sign dropped; torch would keep the
    sign). So a NaN in a key leaves its tile's / group's scale and other codes as if it were
    absent and is stored as 0x7F; an infinity makes its tile's / group's scale +inf (bytes
    ``00 00 80 7f``), its finite values 0x00 / 0x80 (+0 / -0) and the infinities 0x7F
    (inf / inf). Other tiles, groups and tokens are never affected.

Slots, padding and bad indices
    As for the other cache writes (``compile_ops/cache.py``): only the first ``len(slot_mapping)``
    tokens are written, slots < 0 are padding. A slot, block id or block-table column outside
    the cache is an IndexError in the reference (the CPU path) and a skipped token in the CUDA
    kernels; ``COMPILE_OPS_VALIDATE=1`` checks on the host before the CUDA launch.

Where we differ from vLLM (documented choices)
    - ``concat_and_cache_mla_rope_fused`` computes the rotation in float32 with one rounding,
      exactly as ``rotary_embedding`` does (vLLM rounds each product to the 16-bit type), so the
      fused op equals ``rotary_embedding`` followed by ``concat_and_cache_mla`` bit for bit on
      tokens with a slot. As in vLLM, q_pe is rotated for every token and k_pe only for tokens with
      a slot (padding tokens' k_pe is left as is). cos_sin_cache may be float32 or q_pe's dtype.
    - ``cp_gather_and_upconvert_fp8_kv_cache`` takes vLLM's newest argument list (no
      ``seq_lens``; optional ``seq_starts``); rows before ``workspace_starts[0]`` are left
      untouched instead of read from an undefined request.
    - ``cp_gather_indexer_k_quant_cache`` takes ``dst_scale`` as uint8 ``[N, head_dim / Q * 4]``
      (vLLM) or float32 ``[N, head_dim / Q]``; Q is what the cache's entry size says. Rows at or
      past ``cu_seq_lens[-1]`` are left untouched.
    - ``indexer_k_quant_and_cache``: ``quant_block_size`` may be 32, 64, 128 or 256 (vLLM's kernel
      is only consistent for 128); k may also be float32 and strided by rows.
"""

from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops import cache as _cache
from compile_ops._extension import _C

__all__ = [
    "MLA_KV_CACHE_DTYPES",
    "INDEXER_SCALE_FORMATS",
    "concat_and_cache_mla",
    "concat_and_cache_mla_rope_fused",
    "cp_gather_and_upconvert_fp8_kv_cache",
    "indexer_k_quant_and_cache",
    "cp_gather_indexer_k_quant_cache",
    "concat_and_cache_mla_ref",
]

MLA_KV_CACHE_DTYPES = (*_cache.KV_CACHE_DTYPES, "fp8_ds_mla")
DS_MLA_ENTRY_BYTES = 656  # 512 e4m3 codes + 4 float32 scales + 64 x 16-bit rope values
DS_MLA_RANK, DS_MLA_PE, DS_MLA_TILE = 512, 64, 128
FP8_E4M3_MAX = 448.0
FLT_MIN = torch.finfo(torch.float32).tiny
INDEXER_EPS = 1e-4
# "ue8m0": power-of-two scales; the others: float32 scales as computed. vLLM reads only whether
# the string is "ue8m0"; we accept the strings its callers pass and refuse anything else.
INDEXER_SCALE_FORMATS = ("ue8m0", "fp8", "fp8_e4m3", "float32")
INDEXER_QUANT_BLOCKS = (32, 64, 128, 256)
_MLA_KIND = {"auto": 0, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2, "fp8_ds_mla": 3}


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _kv_format(op: str, kv_cache_dtype, allowed=MLA_KV_CACHE_DTYPES):
    if not isinstance(kv_cache_dtype, str):
        C.fail(op, f"kv_cache_dtype must be a str, got {type(kv_cache_dtype).__name__}",
               TypeError)
    if kv_cache_dtype not in allowed:
        C.fail(op, f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of "
                   f"{', '.join(repr(s) for s in allowed)}")
    if kv_cache_dtype == "fp8_ds_mla":
        return torch.float8_e4m3fn
    return _cache._FORMATS.get(kv_cache_dtype)


def _check_rows2d(op: str, name: str, t, *, dtypes=C.FLOAT_DTYPES) -> None:
    """[tokens, width], width contiguous, any token stride."""
    C.check_tensor(op, name, t)
    if t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        C.fail(op, f"{name} must be {want}, got {t.dtype}", TypeError)
    if t.dim() != 2:
        C.fail(op, f"{name} must be 2-D [tokens, width], got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        C.fail(op, f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_entry_cache(op: str, name: str, cache, width: int) -> None:
    """[num_blocks, block_size, width], entries contiguous, no self-overlap."""
    C.check_tensor(op, name, cache)
    if cache.dim() != 3 or cache.shape[2] != width:
        C.fail(op, f"{name} must be [num_blocks, block_size, {width}], got shape "
                   f"{tuple(cache.shape)}")
    if width > 1 and cache.stride(2) != 1:
        C.fail(op, f"{name} must hold each entry contiguously, got strides {cache.stride()}")
    _cache._check_no_self_overlap(op, name, cache)


def _check_one_scale(op: str, name: str, scale, ref, ref_name: str) -> None:
    C.check_tensor(op, name, scale)
    if scale.dtype != torch.float32:
        C.fail(op, f"{name} must be a float32 tensor, got {scale.dtype}", TypeError)
    if scale.numel() != 1:
        C.fail(op, f"{name} must hold one value, got shape {tuple(scale.shape)}")
    _cache._check_device(op, name, scale, ref, ref_name)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _amax_skip_nan(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, NaN skipped (0 if all NaN), infinities kept: CUDA's
    ``amax = fmaxf(amax, fabsf(v))`` from 0, which the kernels (and vLLM's) compute."""
    a = x.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(-1)


def _e4m3_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 codes of x / scale (float32 division, saturate, nearest even); a NaN quotient
    is 0x7F, CUDA's canonical NaN (torch's conversion keeps the NaN's sign: 0xFF for -NaN, and
    x86's inf / inf is -NaN)."""
    q = x.float() / scale
    codes = _cache.quantize_fp8_ref(x, scale, torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(q), torch.full_like(codes, 0x7F), codes)


def _mla_entries(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, fmt,
                 kv_cache_dtype: str, scale: torch.Tensor) -> torch.Tensor:
    """The cache entries of the given tokens, in the cache's storage dtype."""
    if kv_cache_dtype == "fp8_ds_mla":
        n = kv_c.shape[0]
        tiles = kv_c.float().reshape(n, DS_MLA_RANK // DS_MLA_TILE, DS_MLA_TILE)
        sc = (_amax_skip_nan(tiles) / FP8_E4M3_MAX).clamp_min(FLT_MIN)  # [n, 4] float32
        codes = _e4m3_codes(tiles, sc[..., None])
        entry = torch.cat((codes.reshape(n, DS_MLA_RANK),
                           sc.contiguous().view(torch.uint8).reshape(n, 16),
                           k_pe.contiguous().view(torch.uint8).reshape(n, 2 * DS_MLA_PE)), 1)
        return entry if kv_cache.dtype == torch.uint8 else entry.view(kv_cache.dtype)
    both = torch.cat((kv_c, k_pe), 1)
    return _cache._encode(both, kv_cache, fmt, scale.reshape(()).float())


# ---------------------------------------------------------------------------------------------
# concat_and_cache_mla
# ---------------------------------------------------------------------------------------------
def _check_concat(op, kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, *,
                  allowed=MLA_KV_CACHE_DTYPES, scale_name="scale"):
    fmt = _kv_format(op, kv_cache_dtype, allowed)
    _check_rows2d(op, "kv_c", kv_c)
    _check_rows2d(op, "k_pe", k_pe)
    C.check_like(op, "k_pe", k_pe, kv_c, "kv_c", shape=False)
    if k_pe.shape[0] != kv_c.shape[0]:
        C.fail(op, f"k_pe must have kv_c's {kv_c.shape[0]} tokens, got {k_pe.shape[0]}")
    _cache._check_index(op, "slot_mapping", slot_mapping)
    _cache._check_device(op, "slot_mapping", slot_mapping, kv_c, "kv_c")
    if slot_mapping.shape[0] > kv_c.shape[0]:
        C.fail(op, f"slot_mapping has {slot_mapping.shape[0]} slots but kv_c has only "
                   f"{kv_c.shape[0]} tokens")
    rank, pe = kv_c.shape[1], k_pe.shape[1]
    C.check_tensor(op, "kv_cache", kv_cache)
    _cache._check_device(op, "kv_cache", kv_cache, kv_c, "kv_c")
    if kv_cache_dtype == "fp8_ds_mla":
        if rank != DS_MLA_RANK or pe != DS_MLA_PE:
            C.fail(op, f"kv_cache_dtype 'fp8_ds_mla' needs kv_lora_rank {DS_MLA_RANK} and "
                       f"pe_dim {DS_MLA_PE}, got kv_c width {rank} and k_pe width {pe}")
        if kv_c.dtype == torch.float32:
            C.fail(op, "kv_cache_dtype 'fp8_ds_mla' stores k_pe as 16-bit values: kv_c and k_pe "
                       "must be float16 or bfloat16, got torch.float32", TypeError)
        if kv_cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
            C.fail(op, f"kv_cache must be uint8 or torch.float8_e4m3fn for 'fp8_ds_mla', got "
                       f"{kv_cache.dtype}", TypeError)
        _check_entry_cache(op, "kv_cache", kv_cache, DS_MLA_ENTRY_BYTES)
    else:
        _cache._check_cache_storage(op, "kv_cache", kv_cache, fmt, kv_c.dtype, "kv_c")
        _check_entry_cache(op, "kv_cache", kv_cache, rank + pe)
    _check_one_scale(op, scale_name, scale, kv_c, "kv_c")
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        C.check_no_partial_overlap(op, "kv_cache", kv_cache, name, t, allow_same=False)
    return fmt


def concat_and_cache_mla_ref(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale,
                             op: str = "concat_and_cache_mla") -> None:
    """The reference body (writes kv_cache in place); raises IndexError on a slot outside it."""
    fmt = _kv_format(op, kv_cache_dtype)
    nb, bs = kv_cache.shape[:2]
    idx, s = _cache._slots(op, slot_mapping, nb * bs)
    entries = _mla_entries(kv_c.index_select(0, idx), k_pe.index_select(0, idx), kv_cache, fmt,
                           kv_cache_dtype, scale)
    kv_cache[s // bs, s % bs] = entries


@torch.library.custom_op("compile_ops::concat_and_cache_mla", mutates_args=("kv_cache",))
def _concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, kv_cache_dtype: str,
                          scale: torch.Tensor) -> None:
    """kv_cache[slot] = [kv_c | k_pe] (quantized per kv_cache_dtype) for each token's slot."""
    _check_concat("concat_and_cache_mla", kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype,
                  scale)
    concat_and_cache_mla_ref(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)


@_concat_and_cache_mla.register_fake
def _(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    _check_concat("concat_and_cache_mla", kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype,
                  scale)


# ---------------------------------------------------------------------------------------------
# concat_and_cache_mla_rope_fused
# ---------------------------------------------------------------------------------------------
_ROPE_OP = "concat_and_cache_mla_rope_fused"


def _check_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping,
                      kv_cache, kv_cache_dtype, kv_cache_scale):
    op = _ROPE_OP
    if kv_cache_dtype == "fp8_ds_mla":
        C.fail(op, "kv_cache_dtype 'fp8_ds_mla' is not supported by the fused RoPE op (nor by "
                   "vLLM's); rotate with rotary_embedding, then call concat_and_cache_mla")
    fmt = _check_concat(op, kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, kv_cache_scale,
                        allowed=_cache.KV_CACHE_DTYPES, scale_name="kv_cache_scale")
    if not isinstance(is_neox, bool):
        C.fail(op, f"is_neox must be a bool, got {type(is_neox).__name__}", TypeError)
    C.check_tensor(op, "q_pe", q_pe)
    C.check_like(op, "q_pe", q_pe, kv_c, "kv_c", shape=False)
    tokens, rot = k_pe.shape
    if q_pe.dim() != 3 or q_pe.shape[0] != tokens or q_pe.shape[2] != rot:
        C.fail(op, f"q_pe must be [tokens, num_heads, {rot}] ({tokens} tokens and rot_dim as "
                   f"k_pe), got shape {tuple(q_pe.shape)}")
    if rot % 2:
        C.fail(op, f"rot_dim (k_pe width) must be even, got {rot}")
    if rot > 1 and q_pe.stride(2) != 1:
        C.fail(op, f"q_pe must be contiguous in its last dim, got strides {q_pe.stride()}")
    _cache._check_no_self_overlap(op, "q_pe", q_pe)
    _cache._check_index(op, "positions", positions, (torch.int64, torch.int32))
    _cache._check_device(op, "positions", positions, kv_c, "kv_c")
    if positions.shape[0] < tokens:
        C.fail(op, f"positions must have at least {tokens} entries (one per token), got "
                   f"{positions.shape[0]}")
    if slot_mapping.shape[0] != tokens:
        C.fail(op, f"slot_mapping must have one slot per token ({tokens}), got "
                   f"{slot_mapping.shape[0]}")
    C.check_tensor(op, "cos_sin_cache", cos_sin_cache)
    if cos_sin_cache.dtype not in (torch.float32, q_pe.dtype):
        C.fail(op, f"cos_sin_cache must be float32 or {q_pe.dtype} (the q_pe dtype), got "
                   f"{cos_sin_cache.dtype}", TypeError)
    _cache._check_device(op, "cos_sin_cache", cos_sin_cache, kv_c, "kv_c")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rot:
        C.fail(op, f"cos_sin_cache must be [max_position, {rot}] (rot_dim = k_pe width), got "
                   f"shape {tuple(cos_sin_cache.shape)}")
    for a, b, x, y in (("q_pe", "k_pe", q_pe, k_pe), ("q_pe", "kv_c", q_pe, kv_c),
                       ("k_pe", "kv_c", k_pe, kv_c), ("kv_cache", "q_pe", kv_cache, q_pe)):
        C.check_no_partial_overlap(op, a, x, b, y, allow_same=False)
    return fmt


def _rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool):
    """x [..., rot] rotated with cos/sin [..., rot/2] (broadcast): float32 math, one rounding."""
    v = x.float()
    half = v.shape[-1] // 2
    if is_neox:
        x1, x2 = v[..., :half], v[..., half:]
        r = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    else:
        x1, x2 = v[..., 0::2], v[..., 1::2]
        r = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    return r.to(x.dtype)


@torch.library.custom_op("compile_ops::concat_and_cache_mla_rope_fused",
                         mutates_args=("q_pe", "k_pe", "kv_cache"))
def _concat_and_cache_mla_rope_fused(positions: torch.Tensor, q_pe: torch.Tensor,
                                     k_pe: torch.Tensor, kv_c: torch.Tensor,
                                     cos_sin_cache: torch.Tensor, is_neox: bool,
                                     slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                                     kv_cache_dtype: str, kv_cache_scale: torch.Tensor) -> None:
    """Rotate q_pe (every token) and k_pe (tokens with a slot) in place, then write
    [kv_c | rotated k_pe] into kv_cache at the slots (as concat_and_cache_mla)."""
    op = _ROPE_OP
    _check_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping,
                      kv_cache, kv_cache_dtype, kv_cache_scale)
    tokens = q_pe.shape[0]
    pos = positions[:tokens].long()
    max_pos = cos_sin_cache.shape[0]
    if tokens and (int(pos.min()) < 0 or int(pos.max()) >= max_pos):
        bad = int(pos[(pos < 0) | (pos >= max_pos)][0])
        C.fail(op, f"positions must be in [0, {max_pos}) (cos_sin_cache rows), got {bad}",
               IndexError)
    nb, bs = kv_cache.shape[:2]
    idx, s = _cache._slots(op, slot_mapping, nb * bs)  # raises before anything is written
    cs = cos_sin_cache.index_select(0, pos).float()
    half = cs.shape[1] // 2
    cos, sin = cs[:, :half], cs[:, half:]
    q_pe.copy_(_rotate_rows(q_pe, cos[:, None], sin[:, None], is_neox))
    k_rot = _rotate_rows(k_pe.index_select(0, idx), cos[idx], sin[idx], is_neox)
    k_pe[idx] = k_rot
    fmt = _kv_format(op, kv_cache_dtype)
    kv_cache[s // bs, s % bs] = _mla_entries(kv_c.index_select(0, idx), k_rot, kv_cache, fmt,
                                             kv_cache_dtype, kv_cache_scale)


@_concat_and_cache_mla_rope_fused.register_fake
def _(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping, kv_cache,
      kv_cache_dtype, kv_cache_scale):
    _check_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping,
                      kv_cache, kv_cache_dtype, kv_cache_scale)


def _validate_positions(op: str, positions: torch.Tensor, max_pos: int) -> None:
    """The CUDA path's COMPILE_OPS_VALIDATE=1 check. The kernel skips a token whose position is
    outside [0, max_pos) (no cos/sin read, nothing rotated or cached); this host check (a device
    sync, refused under graph capture) raises IndexError instead, before anything is written, as
    the CPU reference does."""
    if positions.numel() == 0:
        return
    if positions.is_cuda:
        _cache._refuse_capture(op, "positions")
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= max_pos:
        C.fail(op, f"positions must be in [0, {max_pos}) (cos_sin_cache rows), got values in "
                   f"[{lo}, {hi}]", IndexError)


# ---------------------------------------------------------------------------------------------
# cp_gather_and_upconvert_fp8_kv_cache
# ---------------------------------------------------------------------------------------------
_UPCONVERT_OP = "cp_gather_and_upconvert_fp8_kv_cache"
_UPCONVERT_WIDTH = DS_MLA_RANK + DS_MLA_PE  # 576 bf16 values per row


def _check_batch_size(op, batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, torch.SymInt)) \
            or batch_size < 0:
        C.fail(op, f"batch_size must be an int >= 0, got {batch_size!r}")


def _check_block_table(op, block_table, ref, ref_name, rows_needed=None):
    _cache._check_index(op, "block_table", block_table, (torch.int32,), dim=2)
    _cache._check_device(op, "block_table", block_table, ref, ref_name)
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        C.fail(op, f"block_table rows must be contiguous, got strides {block_table.stride()}")
    if rows_needed is not None and block_table.shape[0] < rows_needed:
        C.fail(op, f"block_table must have a row per request ({rows_needed}), got "
                   f"{block_table.shape[0]}")


def _check_upconvert(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts):
    op = _UPCONVERT_OP
    C.check_tensor(op, "src_cache", src_cache)
    if src_cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
        C.fail(op, f"src_cache must be uint8 or torch.float8_e4m3fn (fp8_ds_mla entries), got "
                   f"{src_cache.dtype}", TypeError)
    _check_entry_cache(op, "src_cache", src_cache, DS_MLA_ENTRY_BYTES)
    _check_rows2d(op, "dst", dst, dtypes=(torch.bfloat16,))
    _cache._check_device(op, "dst", dst, src_cache, "src_cache")
    if dst.shape[1] != _UPCONVERT_WIDTH:
        C.fail(op, f"dst must be [tokens, {_UPCONVERT_WIDTH}] (512 + 64), got shape "
                   f"{tuple(dst.shape)}")
    _cache._check_no_self_overlap(op, "dst", dst)
    C.check_no_partial_overlap(op, "dst", dst, "src_cache", src_cache, allow_same=False)
    _check_batch_size(op, batch_size)
    _check_block_table(op, block_table, src_cache, "src_cache", batch_size)
    for name, t in (("workspace_starts", workspace_starts), ("seq_starts", seq_starts)):
        if t is None:
            continue
        _cache._check_index(op, name, t, (torch.int32,))
        _cache._check_device(op, name, t, src_cache, "src_cache")
        if t.shape[0] < batch_size:
            C.fail(op, f"{name} must have one entry per request ({batch_size}), got "
                       f"{t.shape[0]}")


def _table_blocks(op, block_table, req, pos, bs, nb, hint=""):
    """(block ids, offsets) of positions ``pos`` of requests ``req`` through the block table;
    IndexError for a column or block id outside the table / cache (nothing is read then)."""
    col = pos // bs
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= block_table.shape[1]):
        bad = int(col[(col < 0) | (col >= block_table.shape[1])][0])
        C.fail(op, f"a row needs block-table column {bad}, block_table has "
                   f"{block_table.shape[1]}{hint}", IndexError)
    blk = block_table.long()[req, col]
    if blk.numel() and (int(blk.min()) < 0 or int(blk.max()) >= nb):
        bad = int(blk[(blk < 0) | (blk >= nb)][0])
        C.fail(op, f"block_table holds block {bad}, outside the cache's {nb} blocks", IndexError)
    return blk, pos % bs


def _upconvert_rows(src_cache, block_table, workspace_starts, batch_size, seq_starts, rows):
    """(rows, block ids, offsets) of the dst rows that belong to a request; raises IndexError
    for a block-table column or block id outside the table / cache."""
    op = _UPCONVERT_OP
    ws = workspace_starts[:batch_size].long().contiguous()
    r = torch.arange(rows, device=src_cache.device)
    req = torch.searchsorted(ws, r, right=True) - 1
    keep = req >= 0
    r, req = r[keep], req[keep]
    off = r - ws[req]
    if seq_starts is not None:
        off = off + seq_starts[:batch_size].long()[req]
    blk, off = _table_blocks(op, block_table, req, off, src_cache.shape[1], src_cache.shape[0],
                             " (check workspace_starts / seq_starts)")
    return r, blk, off


@torch.library.custom_op("compile_ops::cp_gather_and_upconvert_fp8_kv_cache",
                         mutates_args=("dst",))
def _cp_gather_and_upconvert_fp8_kv_cache(src_cache: torch.Tensor, dst: torch.Tensor,
                                          block_table: torch.Tensor,
                                          workspace_starts: torch.Tensor, batch_size: int,
                                          seq_starts: Optional[torch.Tensor] = None) -> None:
    """dst[r] = bf16(e4m3 codes * tile scales) | rope bits of the fp8_ds_mla entry of row r:
    request q = the last with workspace_starts[q] <= r, position r - workspace_starts[q]
    (+ seq_starts[q]) in its block table."""
    _check_upconvert(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)
    if batch_size == 0 or dst.shape[0] == 0:
        return
    r, blk, off = _upconvert_rows(src_cache, block_table, workspace_starts, batch_size,
                                  seq_starts, dst.shape[0])
    e = _bytes(src_cache)[blk, off]  # [n, 656]
    n = e.shape[0]
    codes = e[:, :DS_MLA_RANK].contiguous().view(torch.float8_e4m3fn).float()
    sc = e[:, DS_MLA_RANK:DS_MLA_RANK + 16].contiguous().view(torch.float32)  # [n, 4]
    vals = (codes.view(n, 4, DS_MLA_TILE) * sc[..., None]).reshape(n, DS_MLA_RANK)
    # A NaN (a 0x7F code, or 0 * an infinite scale) is bf16 0x7FFF, as CUDA's
    # __float2bfloat16_rn stores it (torch keeps the float's sign and payload bits).
    bits = vals.to(torch.bfloat16).view(torch.int16)
    bits = torch.where(torch.isnan(vals), torch.full_like(bits, 0x7FFF), bits)
    rope = e[:, DS_MLA_RANK + 16:].contiguous().view(torch.bfloat16)
    dst[r] = torch.cat((bits.view(torch.bfloat16), rope), 1)


@_cp_gather_and_upconvert_fp8_kv_cache.register_fake
def _(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts=None):
    _check_upconvert(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)


# ---------------------------------------------------------------------------------------------
# indexer_k_quant_and_cache / cp_gather_indexer_k_quant_cache
# ---------------------------------------------------------------------------------------------
_INDEXER_OP = "indexer_k_quant_and_cache"
_INDEXER_GATHER_OP = "cp_gather_indexer_k_quant_cache"


def _check_indexer_cache(op, kv_cache, head_dim: Optional[int], quant_block: Optional[int]):
    """uint8 / float8_e4m3fn [num_blocks, block_size, head_dim + head_dim / Q * 4], each block
    contiguous; returns (head_dim, Q)."""
    C.check_tensor(op, "kv_cache", kv_cache)
    if kv_cache.dtype not in (torch.uint8, torch.float8_e4m3fn):
        C.fail(op, f"kv_cache must be uint8 or torch.float8_e4m3fn, got {kv_cache.dtype}",
               TypeError)
    if kv_cache.dim() != 3:
        C.fail(op, f"kv_cache must be [num_blocks, block_size, head_dim + head_dim // "
                   f"quant_block_size * 4], got shape {tuple(kv_cache.shape)}")
    width = kv_cache.shape[2]
    if head_dim is not None and quant_block is not None:
        want = head_dim + head_dim // quant_block * 4
        if width != want:
            C.fail(op, f"kv_cache must be [num_blocks, block_size, {want}] (head_dim {head_dim} "
                       f"+ 4 bytes per {quant_block}-value group), got shape "
                       f"{tuple(kv_cache.shape)}")
    bs = kv_cache.shape[1]
    if (bs > 1 and kv_cache.stride(1) != width) or (width > 1 and kv_cache.stride(2) != 1):
        C.fail(op, f"kv_cache blocks must be contiguous (block-major layout: codes of all the "
                   f"block's tokens, then their scales), got strides {kv_cache.stride()}")
    if kv_cache.shape[0] > 1 and kv_cache.stride(0) < bs * width:
        C.fail(op, f"kv_cache blocks overlap (block stride {kv_cache.stride(0)} < "
                   f"{bs * width})")


def _check_indexer_write(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype):
    op = _INDEXER_OP
    if not isinstance(kv_cache_dtype, str):
        C.fail(op, f"kv_cache_dtype (the scale format) must be a str, got "
                   f"{type(kv_cache_dtype).__name__}", TypeError)
    if kv_cache_dtype not in INDEXER_SCALE_FORMATS:
        C.fail(op, f"unknown kv_cache_dtype (scale format) {kv_cache_dtype!r}; expected one of "
                   f"{', '.join(repr(s) for s in INDEXER_SCALE_FORMATS)} ('ue8m0': power-of-two "
                   f"scales)")
    if isinstance(quant_block_size, bool) or not isinstance(quant_block_size, int) \
            or quant_block_size not in INDEXER_QUANT_BLOCKS:
        C.fail(op, f"quant_block_size must be one of {INDEXER_QUANT_BLOCKS}, got "
                   f"{quant_block_size!r}")
    _check_rows2d(op, "k", k)
    D = k.shape[1]
    if D % quant_block_size:
        C.fail(op, f"head_dim {D} (k width) must be a multiple of quant_block_size "
                   f"{quant_block_size}")
    _check_indexer_cache(op, kv_cache, D, quant_block_size)
    _cache._check_device(op, "kv_cache", kv_cache, k, "k")
    _cache._check_index(op, "slot_mapping", slot_mapping)
    _cache._check_device(op, "slot_mapping", slot_mapping, k, "k")
    if slot_mapping.shape[0] > k.shape[0]:
        C.fail(op, f"slot_mapping has {slot_mapping.shape[0]} slots but k has only "
                   f"{k.shape[0]} tokens")
    C.check_no_partial_overlap(op, "kv_cache", kv_cache, "k", k, allow_same=False)


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(x)) for positive normal float32 x, exact (from the float's bits); +inf
    stays +inf (vLLM's exp2f(ceilf(log2f(inf))); torch.frexp(inf) has exponent 0)."""
    m, e = torch.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    p = torch.ldexp(torch.ones_like(x), torch.where(m == 0.5, e - 1, e)).float()
    return torch.where(torch.isinf(x), x, p)


def _block_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size * width] byte view of a block-contiguous cache."""
    b = _bytes(kv_cache)
    nb, bs, width = b.shape
    return b.as_strided((nb, bs * width), (b.stride(0), 1))


@torch.library.custom_op("compile_ops::indexer_k_quant_and_cache", mutates_args=("kv_cache",))
def _indexer_k_quant_and_cache(k: torch.Tensor, kv_cache: torch.Tensor,
                               slot_mapping: torch.Tensor, quant_block_size: int,
                               kv_cache_dtype: str) -> None:
    """Quantize each token's k to e4m3 in groups of quant_block_size (scale max(amax, 1e-4) /
    448, a power of two with "ue8m0") and store codes and scales block-major at its slot."""
    op = _INDEXER_OP
    _check_indexer_write(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)
    nb, bs, _ = kv_cache.shape
    idx, s = _cache._slots(op, slot_mapping, nb * bs)
    n, D, Q = idx.shape[0], k.shape[1], quant_block_size
    groups = D // Q
    x = k.index_select(0, idx).float().reshape(n, groups, Q)
    sc = _amax_skip_nan(x).clamp_min(INDEXER_EPS) / FP8_E4M3_MAX
    if kv_cache_dtype == "ue8m0":
        sc = _pow2_ceil(sc)
    codes = _e4m3_codes(x, sc[..., None]).reshape(n, D)
    flat = _block_bytes(kv_cache)
    blk, off = s // bs, s % bs
    flat[blk[:, None], off[:, None] * D + torch.arange(D, device=k.device)] = codes
    sb = groups * 4
    flat[blk[:, None], bs * D + off[:, None] * sb + torch.arange(sb, device=k.device)] = \
        sc.contiguous().view(torch.uint8).reshape(n, sb)


@_indexer_k_quant_and_cache.register_fake
def _(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype):
    _check_indexer_write(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)


def _check_indexer_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens):
    """Returns (head_dim, Q)."""
    op = _INDEXER_GATHER_OP
    _check_rows2d(op, "dst_k", dst_k, dtypes=(torch.uint8, torch.float8_e4m3fn))
    D = dst_k.shape[1]
    _check_rows2d(op, "dst_scale", dst_scale, dtypes=(torch.uint8, torch.float32))
    if dst_scale.shape[0] != dst_k.shape[0]:
        C.fail(op, f"dst_scale must have dst_k's {dst_k.shape[0]} rows, got "
                   f"{dst_scale.shape[0]}")
    scale_bytes = dst_scale.shape[1] * dst_scale.element_size()
    if scale_bytes == 0 or scale_bytes % 4 or D % (scale_bytes // 4) \
            or D // (scale_bytes // 4) not in INDEXER_QUANT_BLOCKS:
        C.fail(op, f"dst_scale must hold one float32 per quant group of dst_k's {D} values "
                   f"(uint8 [N, {D} / Q * 4] or float32 [N, {D} / Q], Q in "
                   f"{INDEXER_QUANT_BLOCKS}), got {dst_scale.dtype} {tuple(dst_scale.shape)}")
    Q = D // (scale_bytes // 4)
    _check_indexer_cache(op, kv_cache, D, Q)
    for name, t in (("dst_k", dst_k), ("dst_scale", dst_scale)):
        _cache._check_device(op, name, t, kv_cache, "kv_cache")
        _cache._check_no_self_overlap(op, name, t)
        C.check_no_partial_overlap(op, name, t, "kv_cache", kv_cache, allow_same=False)
    C.check_no_partial_overlap(op, "dst_k", dst_k, "dst_scale", dst_scale, allow_same=False)
    _check_block_table(op, block_table, kv_cache, "kv_cache")
    _cache._check_index(op, "cu_seq_lens", cu_seq_lens, (torch.int32,))
    _cache._check_device(op, "cu_seq_lens", cu_seq_lens, kv_cache, "kv_cache")
    if cu_seq_lens.shape[0] != block_table.shape[0] + 1:
        C.fail(op, f"cu_seq_lens must hold batch + 1 = {block_table.shape[0] + 1} offsets "
                   f"(batch = block_table rows), got {cu_seq_lens.shape[0]}")
    return D, Q


def _indexer_rows(kv_cache, block_table, cu_seq_lens, rows):
    """(rows, block ids, offsets) of the dst rows inside a sequence (cu_seq_lens packing)."""
    cu = cu_seq_lens.long().contiguous()
    total = min(int(cu[-1]), rows)
    t = torch.arange(total, device=kv_cache.device)
    b = torch.searchsorted(cu, t, right=True) - 1
    keep = (b >= 0) & (b < block_table.shape[0])
    t, b = t[keep], b[keep]
    blk, off = _table_blocks(_INDEXER_GATHER_OP, block_table, b, t - cu[b], kv_cache.shape[1],
                             kv_cache.shape[0])
    return t, blk, off


@torch.library.custom_op("compile_ops::cp_gather_indexer_k_quant_cache",
                         mutates_args=("dst_k", "dst_scale"))
def _cp_gather_indexer_k_quant_cache(kv_cache: torch.Tensor, dst_k: torch.Tensor,
                                     dst_scale: torch.Tensor, block_table: torch.Tensor,
                                     cu_seq_lens: torch.Tensor) -> None:
    """Copy the e4m3 codes and float32 scales of each request's tokens (cu_seq_lens packing,
    block_table rows) into dst_k / dst_scale rows; rows >= cu_seq_lens[-1] are left untouched."""
    D, Q = _check_indexer_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
    if block_table.shape[0] == 0 or dst_k.shape[0] == 0:
        return
    t, blk, off = _indexer_rows(kv_cache, block_table, cu_seq_lens, dst_k.shape[0])
    bs = kv_cache.shape[1]
    flat = _block_bytes(kv_cache)
    dk = _bytes(dst_k)
    dk[t] = flat[blk[:, None], off[:, None] * D + torch.arange(D, device=dk.device)]
    sb = D // Q * 4
    scales = flat[blk[:, None], bs * D + off[:, None] * sb + torch.arange(sb, device=dk.device)]
    if dst_scale.dtype == torch.uint8:
        dst_scale[t] = scales
    else:
        dst_scale[t] = scales.contiguous().view(torch.float32)


@_cp_gather_indexer_k_quant_cache.register_fake
def _(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens):
    _check_indexer_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (csrc/mla_kernels.cu)
# ---------------------------------------------------------------------------------------------
if _C is not None:

    def _validate_slots(op, slot_mapping, num_slots):
        if _cache._validating():
            _cache._validate_slots(op, slot_mapping, num_slots)

    @_concat_and_cache_mla.register_kernel("cuda")
    def _(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
        op = "concat_and_cache_mla"
        _check_concat(op, kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)
        _validate_slots(op, slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
        _C.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping.contiguous(),
                                _MLA_KIND[kv_cache_dtype], scale)

    @_concat_and_cache_mla_rope_fused.register_kernel("cuda")
    def _(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping, kv_cache,
          kv_cache_dtype, kv_cache_scale):
        op = _ROPE_OP
        _check_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping,
                          kv_cache, kv_cache_dtype, kv_cache_scale)
        tokens = q_pe.shape[0]
        if _cache._validating():
            _validate_positions(op, positions[:tokens], cos_sin_cache.shape[0])
        _validate_slots(op, slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
        _C.concat_and_cache_mla_rope_fused(positions[:tokens].contiguous(), q_pe, k_pe, kv_c,
                                           cos_sin_cache.contiguous(), is_neox,
                                           slot_mapping.contiguous(), kv_cache,
                                           _MLA_KIND[kv_cache_dtype], kv_cache_scale)

    @_cp_gather_and_upconvert_fp8_kv_cache.register_kernel("cuda")
    def _(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts=None):
        op = _UPCONVERT_OP
        _check_upconvert(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)
        if batch_size == 0 or dst.shape[0] == 0:
            return
        if _cache._validating():
            _cache._refuse_capture(op, "workspace_starts, seq_starts and block_table")
            _upconvert_rows(src_cache, block_table, workspace_starts, batch_size, seq_starts,
                            dst.shape[0])
        _C.cp_gather_and_upconvert_fp8_kv_cache(
            src_cache, dst, block_table, workspace_starts[:batch_size].contiguous(),
            int(batch_size), None if seq_starts is None else seq_starts[:batch_size].contiguous())

    @_indexer_k_quant_and_cache.register_kernel("cuda")
    def _(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype):
        op = _INDEXER_OP
        _check_indexer_write(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)
        _validate_slots(op, slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
        _C.indexer_k_quant_and_cache(k, kv_cache, slot_mapping.contiguous(),
                                     int(quant_block_size), kv_cache_dtype == "ue8m0")

    @_cp_gather_indexer_k_quant_cache.register_kernel("cuda")
    def _(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens):
        op = _INDEXER_GATHER_OP
        D, Q = _check_indexer_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
        if block_table.shape[0] == 0 or dst_k.shape[0] == 0:
            return
        if _cache._validating():
            _cache._refuse_capture(op, "cu_seq_lens and block_table")
            _indexer_rows(kv_cache, block_table, cu_seq_lens, dst_k.shape[0])
        _C.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table,
                                           cu_seq_lens.contiguous(), int(Q))


# ---------------------------------------------------------------------------------------------
# Functional conveniences (vLLM's _custom_ops names and argument order)
# ---------------------------------------------------------------------------------------------
def concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    torch.ops.compile_ops.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping,
                                               kv_cache_dtype, scale)


def concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox,
                                    slot_mapping, kv_cache, kv_cache_dtype, kv_cache_scale):
    torch.ops.compile_ops.concat_and_cache_mla_rope_fused(
        positions, q_pe, k_pe, kv_c, cos_sin_cache, is_neox, slot_mapping, kv_cache,
        kv_cache_dtype, kv_cache_scale)


def cp_gather_and_upconvert_fp8_kv_cache(src_cache, dst, block_table, workspace_starts,
                                         batch_size, seq_starts=None):
    torch.ops.compile_ops.cp_gather_and_upconvert_fp8_kv_cache(
        src_cache, dst, block_table, workspace_starts, batch_size, seq_starts)


def indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype):
    torch.ops.compile_ops.indexer_k_quant_and_cache(k, kv_cache, slot_mapping,
                                                    quant_block_size, kv_cache_dtype)


def cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens):
    torch.ops.compile_ops.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale,
                                                          block_table, cu_seq_lens)
