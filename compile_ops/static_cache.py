"""Decode attention over a static (dense) KV cache: ``static_cache_attention`` (issues 16, 24).

Not one of vLLM's ops: the layout is Hugging Face's ``StaticCache`` (and gpt-fast's ``KVCache``),
one ``[batch, kv_heads, max_cache_len, head_size]`` tensor for keys and one for values, token t of
sequence b at ``[b, :, t]``. ``lowerings/static_cache_attention.py`` puts this op in place of the
``repeat_kv`` copy + SDPA over the whole cache that such models run at decode, and
``compile_ops.hf`` registers it with transformers' ``AttentionInterface`` as
``attn_implementation="compile_ops"``; it can also be called directly::

    torch.ops.compile_ops.static_cache_attention(out, query, key_cache, value_cache, seq_lens,
                                                 scale, attn_mask=None, seq_starts=None,
                                                 mask_dense=None) -> None

- ``query``, ``out``: ``[batch, num_heads, head_size]`` (one query token per sequence), float32 /
  float16 / bfloat16, one dtype; any strides (``out`` is written through its strides).
- ``key_cache``, ``value_cache``: ``[batch, num_kv_heads, max_cache_len, head_size]``, the query's
  dtype and device, contiguous in ``head_size`` (any other strides); ``num_heads`` a multiple of
  ``num_kv_heads`` (grouped-query attention: query head h reads KV head ``h // (num_heads /
  num_kv_heads)``, which is what ``repeat_kv`` spells out); head sizes up to 256.
- ``seq_lens``: int32 or int64 ``[batch]``: sequence b reads cache slots below ``seq_lens[b]``,
  clamped into ``[0, max_cache_len]`` (a length past the cache reads the whole cache, as a causal
  mask over ``max_cache_len`` slots does; 0 or less gives zeros). The clamp runs in the kernel, so
  no host sync and CUDA graphs capture the op.
- ``seq_starts`` (optional): int32 or int64 ``[batch]``: sequence b reads slots from
  ``seq_starts[b]`` on, clamped into ``[0, seq_lens[b]]`` (a sliding window, left padding).
  Slots outside ``[seq_starts[b], seq_lens[b])`` are never read and take no part.
- ``attn_mask`` (optional): the attention mask as SDPA takes it, for the one query token: boolean
  (True: attend) or float (added to the scaled logits; float32 or the query's dtype), any shape
  that broadcasts to ``[batch, num_heads, 1, max_cache_len]`` (e.g. Hugging Face's
  ``[batch, 1, 1, max_cache_len]``), any strides. It is read per tile of slots inside the
  range above, a few bytes per slot against the kilobytes of K/V.
- ``mask_dense`` (optional): bool ``[batch]``: True where the caller knows that the mask lets
  every slot of ``[seq_starts[b], seq_lens[b])`` through for every head (a causal mask, left
  padding or a sliding window, within the range ``mask_ranges`` gives): the op then does not
  read the mask for that sequence (the reference ignores it there too, so the two agree even
  if the claim is false).
- ``scale``: the logit scale (``1 / sqrt(head_size)`` for SDPA's default).
- Softmax in float32, output rounded once to the query dtype. A sequence with no slot to attend
  (an empty range, or every slot of it masked with False / -inf) gives zeros, as SDPA does.
  Masked slots inside the range are still read (a NaN there meets a zero weight, as in SDPA);
  the CUDA kernel clamps float mask values at -1e38 (a finite minimum such as float32's stays
  finite once in base-2 units), which changes nothing unless every slot of a row lies below it.

With a mask, the op is exact for any mask as long as the range covers every slot the mask lets
through: ``mask_bounds(attn_mask, batch, max_cache_len)`` computes that range (first and last
live slot of each sequence, on the device), which is what the pass and the attention interface
use, so slots before a sliding window or a left padding and after the current position are not
read at all; ``mask_ranges`` adds ``mask_dense``, so that the common masks are not read either.

CUDA: the split-KV Triton kernels of ``compile_ops/decode_attention.py`` (``static_split_kernel``
then, when a sequence is cut into several splits, the paged kernels' merge): one program per
(sequence, KV head, split), every query head of the GQA group in one tensor-core dot, so each K/V
byte of the range is read once; slots outside the range are never read.
"""

from typing import Optional

import torch

from compile_ops import _checks as C

OP = "static_cache_attention"
MAX_HEAD = 256


def _check_lengths(name, t, batch, device):
    C.check_tensor(OP, name, t)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or t.shape[0] != batch:
        C.fail(OP, f"{name} must be int32 or int64 [{batch}], got {t.dtype} {tuple(t.shape)}",
               TypeError if t.dtype.is_floating_point else ValueError)
    if t.device != device:
        C.fail(OP, f"{name} must be on device {device} (same as query), got {t.device}")


def check_mask(op, attn_mask, batch, heads, length, dtype, device, name="attn_mask"):
    """`attn_mask` broadcasts to [batch, heads, 1, length]: bool, float32 or `dtype`."""
    C.check_tensor(op, name, attn_mask)
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (torch.float32, dtype):
        C.fail(op, f"{name} must be bool, float32 or {dtype} (the query's dtype), got "
                   f"{attn_mask.dtype}", TypeError)
    if attn_mask.device != device:
        C.fail(op, f"{name} must be on device {device} (same as query), got {attn_mask.device}")
    want = (batch, heads, 1, length)
    shape = tuple(attn_mask.shape)
    ok = 1 <= len(shape) <= 4 and all(s in (1, w) for s, w in zip(shape[::-1], want[::-1]))
    if not ok or (len(shape) >= 2 and shape[-2] != 1) or shape[-1] != length:
        C.fail(op, f"{name} must broadcast to [batch, num_heads, 1, max_cache_len] = "
                   f"{list(want)} with its last dimension max_cache_len = {length}, got "
                   f"{list(shape)}")


def _check(out, query, key_cache, value_cache, seq_lens, scale, attn_mask=None, seq_starts=None,
           mask_dense=None):
    C.check_tensor(OP, "query", query)
    C.check_float_dtype(OP, "query", query)
    if query.dim() != 3:
        C.fail(OP, f"query must be [batch, num_heads, head_size], got {tuple(query.shape)}")
    batch, heads, head = query.shape
    if not 1 <= head <= MAX_HEAD:
        C.fail(OP, f"head_size must be in [1, {MAX_HEAD}], got {head}")
    C.check_like(OP, "out", out, query, "query")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_like(OP, name, cache, query, "query", shape=False)
        if cache.dim() != 4 or cache.shape[0] != batch or cache.shape[3] != head:
            C.fail(OP, f"{name} must be [{batch}, num_kv_heads, max_cache_len, {head}] "
                       f"([batch, num_kv_heads, max_cache_len, head_size]), got "
                       f"{tuple(cache.shape)}")
        if head > 1 and cache.stride(3) != 1:
            C.fail(OP, f"{name} must be contiguous in head_size, got strides {cache.stride()}")
    if key_cache.shape != value_cache.shape:
        C.fail(OP, f"key_cache and value_cache must have one shape, got {tuple(key_cache.shape)} "
                   f"and {tuple(value_cache.shape)}")
    kv_heads = key_cache.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        C.fail(OP, f"num_heads {heads} must be a multiple of key_cache's num_kv_heads "
                   f"{kv_heads}")
    _check_lengths("seq_lens", seq_lens, batch, query.device)
    if seq_starts is not None:
        _check_lengths("seq_starts", seq_starts, batch, query.device)
    if attn_mask is not None:
        check_mask(OP, attn_mask, batch, heads, key_cache.shape[2], query.dtype, query.device)
    if mask_dense is not None:
        C.check_tensor(OP, "mask_dense", mask_dense)
        if mask_dense.dtype != torch.bool or mask_dense.dim() != 1 or \
                mask_dense.shape[0] != batch:
            C.fail(OP, f"mask_dense must be bool [{batch}], got {mask_dense.dtype} "
                       f"{tuple(mask_dense.shape)}", TypeError if mask_dense.dtype != torch.bool
                   else ValueError)
        if mask_dense.device != query.device:
            C.fail(OP, f"mask_dense must be on device {query.device} (same as query), got "
                       f"{mask_dense.device}")
    if isinstance(scale, bool) or not isinstance(scale, (float, int)):
        C.fail(OP, f"scale must be a float, got {type(scale).__name__}", TypeError)
    C.check_no_partial_overlap(OP, "out", out, "query", query, allow_same=True)
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache),
                    ("attn_mask", attn_mask), ("seq_lens", seq_lens),
                    ("seq_starts", seq_starts), ("mask_dense", mask_dense)):
        if t is not None:
            C.check_no_partial_overlap(OP, "out", out, name, t, allow_same=False)


def _ranges(seq_lens, seq_starts, length):
    """(starts, ends) int64 [batch]: the slot range each sequence reads, clamped."""
    ends = seq_lens.long().clamp(0, length)
    if seq_starts is None:
        return torch.zeros_like(ends), ends
    return torch.minimum(seq_starts.long().clamp(min=0), ends), ends


def static_cache_attention_ref(query, key_cache, value_cache, seq_lens, scale, attn_mask=None,
                               seq_starts=None, mask_dense=None):
    """The op's result (float32 math, one rounding): the reference and the CPU kernel."""
    batch, heads, head = query.shape
    kv_heads, length = key_cache.shape[1], key_cache.shape[2]
    starts, ends = _ranges(seq_lens, seq_starts, length)
    n = int(ends.max()) if batch else 0
    if n == 0:
        return torch.zeros_like(query)
    s0 = int(starts.min())
    group = heads // kv_heads
    # Only slots in [start, end) are read: stale cache entries outside (NaN included) never count.
    j = torch.arange(s0, n, device=query.device)
    valid = (j[None, :] < ends[:, None]) & (j[None, :] >= starts[:, None])  # [batch, n - s0]
    keys = torch.where(valid[:, None, :, None], key_cache[:, :, s0:n].float(), 0.0)
    vals = torch.where(valid[:, None, :, None], value_cache[:, :, s0:n].float(), 0.0)
    q = query.float().view(batch, kv_heads, group, head)
    logits = torch.einsum("bngd,bnld->bngl", q, keys) * float(scale)
    keep = valid[:, None, None, :]
    if attn_mask is not None:
        m = attn_mask[..., s0:n].expand(batch, heads, 1, n - s0).reshape(
            batch, kv_heads, group, n - s0)
        skip = None if mask_dense is None else mask_dense.to(query.device)[:, None, None, None]
        if m.dtype == torch.bool:
            keep = keep & (m if skip is None else (m | skip))
        else:
            logits = logits + (m.float() if skip is None else
                               torch.where(skip, 0.0, m.float()))
    logits = logits.masked_fill(~keep, float("-inf"))
    mx = logits.amax(-1, keepdim=True)
    mx = torch.where(torch.isinf(mx) & (mx < 0), 0.0, mx)
    e = torch.exp(logits - mx)
    s = e.sum(-1, keepdim=True)
    o = torch.einsum("bngl,bnld->bngd", e, vals) / torch.where(s == 0, 1.0, s)
    return o.reshape(batch, heads, head).to(query.dtype)


def mask_bounds(attn_mask: torch.Tensor, batch: int, max_cache_len: int):
    """(seq_starts, seq_lens), int32 [batch]: each sequence's first live slot and last live slot
    + 1 under `attn_mask` (any head; live: True, or a float other than -inf), (0, 0) when no slot
    is live. What the op needs so that a masked call reads only what the mask lets through: the
    pass and the attention interface compute it once per mask (plain PyTorch: Inductor makes it
    one small reduction kernel, shared by every layer)."""
    if max_cache_len == 0:
        z = torch.zeros(batch, dtype=torch.int32, device=attn_mask.device)
        return z, z.clone()
    m = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    while m.dim() < 4:
        m = m.unsqueeze(0)
    live = m.amax(dim=(1, 2)) if m.shape[1] * m.shape[2] > 1 else m[:, 0, 0]  # [B or 1, L]
    idx = torch.arange(max_cache_len, device=attn_mask.device, dtype=torch.int32)
    ends = torch.where(live, idx + 1, 0).amax(-1)
    starts = torch.where(live, idx, max_cache_len).amin(-1)
    starts = torch.minimum(starts, ends)  # no live slot: (0, 0)
    return starts.expand(batch).contiguous(), ends.expand(batch).contiguous()


def mask_ranges(attn_mask: torch.Tensor, batch: int, max_cache_len: int):
    """(seq_starts, seq_lens, mask_dense): ``mask_bounds`` and, per sequence, whether the mask
    lets every slot of that range through unchanged for every head (True, or a float 0; bool
    [batch]): then the op need not read it. One reduction over the mask, like
    ``mask_bounds``."""
    starts, ends = mask_bounds(attn_mask, batch, max_cache_len)
    if max_cache_len == 0:
        return starts, ends, torch.ones(batch, dtype=torch.bool, device=attn_mask.device)
    # Slots passed through unchanged: True, or a float 0 (a bias or a finite fill is read).
    # Every such slot is live, so lies inside the range: counting them over the whole row
    # tells whether the range holds nothing else.
    m = attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0
    while m.dim() < 4:
        m = m.unsqueeze(0)
    rows = m.shape[1] * m.shape[2]  # the mask's own head and query rows (1 when broadcast)
    count = m.to(torch.int32).sum(dim=(1, 2, 3))  # [B or 1]
    dense = count.expand(batch) == (ends - starts) * rows
    return starts, ends, dense


@torch.library.custom_op("compile_ops::static_cache_attention", mutates_args=("out",))
def _static_cache_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            attn_mask: Optional[torch.Tensor] = None,
                            seq_starts: Optional[torch.Tensor] = None,
                            mask_dense: Optional[torch.Tensor] = None) -> None:
    """Decode attention over a static [batch, kv_heads, max_cache_len, head_size] cache."""
    _check(out, query, key_cache, value_cache, seq_lens, scale, attn_mask, seq_starts,
           mask_dense)
    out.copy_(static_cache_attention_ref(query, key_cache, value_cache, seq_lens, scale,
                                         attn_mask, seq_starts, mask_dense))


@_static_cache_attention.register_fake
def _(out, query, key_cache, value_cache, seq_lens, scale, attn_mask=None, seq_starts=None,
      mask_dense=None):
    _check(out, query, key_cache, value_cache, seq_lens, scale, attn_mask, seq_starts,
           mask_dense)


@_static_cache_attention.register_kernel("cuda")
def _(out, query, key_cache, value_cache, seq_lens, scale, attn_mask=None, seq_starts=None,
      mask_dense=None):
    _check(out, query, key_cache, value_cache, seq_lens, scale, attn_mask, seq_starts,
           mask_dense)
    from compile_ops import decode_attention

    decode_attention.static_decode(out, query, key_cache, value_cache, seq_lens, scale,
                                   attn_mask=attn_mask, seq_starts=seq_starts,
                                   mask_dense=mask_dense)


def static_cache_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, seq_lens: torch.Tensor,
                           scale: Optional[float] = None,
                           attn_mask: Optional[torch.Tensor] = None,
                           seq_starts: Optional[torch.Tensor] = None,
                           mask_dense: Optional[torch.Tensor] = None) -> None:
    """``torch.ops.compile_ops.static_cache_attention``; ``scale`` defaults to
    ``1 / sqrt(head_size)``."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    torch.ops.compile_ops.static_cache_attention(out, query, key_cache, value_cache, seq_lens,
                                                 float(scale), attn_mask, seq_starts,
                                                 mask_dense)


def masked_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, attn_mask: Optional[torch.Tensor],
                            scale: Optional[float] = None, bounds=None) -> torch.Tensor:
    """SDPA's decode-step result for a static cache, without ``repeat_kv``: ``query``
    ``[batch, num_heads, head_size]``, caches ``[batch, kv_heads, max_cache_len, head_size]``,
    ``attn_mask`` as SDPA takes it (None: every slot). Returns ``[batch, num_heads, head_size]``.
    ``bounds``: ``mask_ranges``' (or ``mask_bounds``') result when the caller already has it."""
    batch = query.shape[0]
    length = key_cache.shape[2]
    dense = None
    if attn_mask is None:
        lens = torch.full((batch,), length, dtype=torch.int32, device=query.device)
        starts = None
    else:
        if bounds is None:
            bounds = mask_ranges(attn_mask, batch, length)
        starts, lens = bounds[0], bounds[1]
        dense = bounds[2] if len(bounds) > 2 else None
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    static_cache_attention(out, query, key_cache, value_cache, lens, scale, attn_mask, starts,
                           dense)
    return out
