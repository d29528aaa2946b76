"""Decode attention over a static (dense) KV cache: ``static_cache_attention`` (issue 16).

Not one of vLLM's ops: the layout is Hugging Face's ``StaticCache`` (and gpt-fast's ``KVCache``),
one ``[batch, kv_heads, max_cache_len, head_size]`` tensor for keys and one for values, token t of
sequence b at ``[b, :, t]``. ``lowerings/static_cache_attention.py`` puts this op in place of the
``repeat_kv`` copy + SDPA over the whole cache that such models run at decode; it can also be
called directly::

    torch.ops.compile_ops.static_cache_attention(out, query, key_cache, value_cache, seq_lens,
                                                 scale) -> None

- ``query``, ``out``: ``[batch, num_heads, head_size]`` (one query token per sequence), float32 /
  float16 / bfloat16, one dtype; any strides (``out`` is written through its strides).
- ``key_cache``, ``value_cache``: ``[batch, num_kv_heads, max_cache_len, head_size]``, the query's
  dtype and device, contiguous in ``head_size`` (any other strides); ``num_heads`` a multiple of
  ``num_kv_heads`` (grouped-query attention: query head h reads KV head ``h // (num_heads /
  num_kv_heads)``, which is what ``repeat_kv`` spells out); head sizes up to 256.
- ``seq_lens``: int32 or int64 ``[batch]``: sequence b attends to cache positions
  ``0 .. seq_lens[b] - 1``, each clamped into ``[0, max_cache_len]`` (a length past the cache
  attends the whole cache, as a causal mask over ``max_cache_len`` slots does; 0 or less gives
  zeros). The clamp runs in the kernel, so no host sync and CUDA graphs capture the op.
- ``scale``: the logit scale (``1 / sqrt(head_size)`` for SDPA's default).
- Softmax in float32, output rounded once to the query dtype.

CUDA: the split-KV Triton kernels of ``compile_ops/decode_attention.py`` (``static_split_kernel``
then, when a sequence is cut into several splits, the paged kernels' merge): one program per
(sequence, KV head, split), every query head of the GQA group in one tensor-core dot, so each K/V
byte of the tokens so far is read once; slots past ``seq_lens`` are never read.
"""

from typing import Optional

import torch

from compile_ops import _checks as C

OP = "static_cache_attention"
MAX_HEAD = 256


def _check(out, query, key_cache, value_cache, seq_lens, scale):
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
    C.check_tensor(OP, "seq_lens", seq_lens)
    if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.dim() != 1 or \
            seq_lens.shape[0] != batch:
        C.fail(OP, f"seq_lens must be int32 or int64 [{batch}], got {seq_lens.dtype} "
                   f"{tuple(seq_lens.shape)}", TypeError if seq_lens.dtype.is_floating_point
               else ValueError)
    if seq_lens.device != query.device:
        C.fail(OP, f"seq_lens must be on device {query.device} (same as query), got "
                   f"{seq_lens.device}")
    if isinstance(scale, bool) or not isinstance(scale, (float, int)):
        C.fail(OP, f"scale must be a float, got {type(scale).__name__}", TypeError)
    C.check_no_partial_overlap(OP, "out", out, "query", query, allow_same=True)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_no_partial_overlap(OP, "out", out, name, cache, allow_same=False)


def static_cache_attention_ref(query, key_cache, value_cache, seq_lens, scale):
    """The op's result (float32 math, one rounding): the reference and the CPU kernel."""
    batch, heads, head = query.shape
    kv_heads, length = key_cache.shape[1], key_cache.shape[2]
    lens = seq_lens.long().clamp(0, length)
    n = int(lens.max()) if batch else 0
    if n == 0:
        return torch.zeros_like(query)
    group = heads // kv_heads
    # Only slots < seq_len are read: stale cache entries past it (NaN included) never count.
    valid = torch.arange(n, device=query.device)[None, :] < lens[:, None]  # [batch, n]
    keys = torch.where(valid[:, None, :, None], key_cache[:, :, :n].float(), 0.0)
    vals = torch.where(valid[:, None, :, None], value_cache[:, :, :n].float(), 0.0)
    q = query.float().view(batch, kv_heads, group, head)
    logits = torch.einsum("bngd,bnld->bngl", q, keys) * float(scale)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(logits - m)
    s = e.sum(-1, keepdim=True)
    o = torch.einsum("bngl,bnld->bngd", e, vals) / torch.where(s == 0, 1.0, s)
    return o.reshape(batch, heads, head).to(query.dtype)


@torch.library.custom_op("compile_ops::static_cache_attention", mutates_args=("out",))
def _static_cache_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float) -> None:
    """Decode attention over a static [batch, kv_heads, max_cache_len, head_size] cache."""
    _check(out, query, key_cache, value_cache, seq_lens, scale)
    out.copy_(static_cache_attention_ref(query, key_cache, value_cache, seq_lens, scale))


@_static_cache_attention.register_fake
def _(out, query, key_cache, value_cache, seq_lens, scale):
    _check(out, query, key_cache, value_cache, seq_lens, scale)


@_static_cache_attention.register_kernel("cuda")
def _(out, query, key_cache, value_cache, seq_lens, scale):
    _check(out, query, key_cache, value_cache, seq_lens, scale)
    from compile_ops import decode_attention

    decode_attention.static_decode(out, query, key_cache, value_cache, seq_lens, scale)


def static_cache_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, seq_lens: torch.Tensor,
                           scale: Optional[float] = None) -> None:
    """``torch.ops.compile_ops.static_cache_attention``; ``scale`` defaults to
    ``1 / sqrt(head_size)``."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    torch.ops.compile_ops.static_cache_attention(out, query, key_cache, value_cache, seq_lens,
                                                 float(scale))
