"""Attention family: ``merge_attn_states`` below, and ``paged_attention_v1`` / ``_v2`` (vLLM's
schemas, references and checks at the end of this file; their CUDA path is the split-KV decode
attention of ``compile_ops/decode_attention.py``: a CUDA C++ kernel for float16 / bfloat16 queries,
Triton kernels for the rest).

``merge_attn_states`` (vLLM's semantics; the argument order of vLLM's Python wrappers
``vllm._custom_ops.merge_attn_states`` and ``vllm/v1/attention/ops/merge_attn_states.py``, which
vLLM's C++ op ``torch.ops._C.merge_attn_states`` reorders to put ``output_lse`` second)::

    torch.ops.compile_ops.merge_attn_states(output, prefix_output, prefix_lse, suffix_output,
                                            suffix_lse, output_lse=None,
                                            prefill_tokens_with_context=None,
                                            output_scale=None) -> None

Combines two partial attention results over disjoint key sets (prefix and suffix, or two KV
splits) by their log-sum-exps (section 2.2 of arXiv:2501.01005):

    m = max(p_lse, s_lse);  a = exp(p_lse - m);  b = exp(s_lse - m)
    output = prefix_output * a / (a + b) + suffix_output * b / (a + b)
    output_lse = log(a + b) + m

- ``output``, ``prefix_output``, ``suffix_output``: ``[tokens, heads, head_size]``, head_size
  contiguous (any token and head strides). The inputs are float32 / float16 / bfloat16 (one
  dtype); ``output`` has their dtype, or float8_e4m3fn with ``output_scale``.
- ``prefix_lse``, ``suffix_lse``, ``output_lse``: float32 ``[heads, tokens]``.
- An infinite LSE (+inf or -inf: an empty part; some attention kernels return +inf) counts as
  -inf. Both empty: ``output = prefix_output`` and ``output_lse = -inf`` (vLLM's choice).
- ``prefill_tokens_with_context`` (int in ``[0, tokens]``, None = tokens): only tokens
  ``t < prefill_tokens_with_context`` are merged. The others (decode tokens and prefill tokens
  without a cached prefix, placed last) take ``suffix_output`` and ``suffix_lse`` unchanged
  (the LSE as it is, +inf included); their prefix output and LSE are never read.
- ``output_scale`` (float32, one value): static FP8 output. Each value x (merged, passed through,
  or the prefix of a both-empty token) is stored as ``fp8_e4m3(clamp(x * (1 / scale), -448,
  448))``: the reciprocal in float32, one float32 multiply, saturation, round to nearest even;
  NaN stays NaN. ``output_lse`` is not scaled.
- Math in float32, one rounding to the output dtype.

CUDA: a 128-bit kernel (``csrc/attention_kernels.cu``); on a GPU without the built extension, a
Triton kernel (``_triton_merge``) with the same semantics.
"""

import warnings
from typing import Optional

import torch

from compile_ops import _checks as C
from compile_ops._extension import _C

__all__ = ["merge_attn_states", "merge_attn_states_ref"]
OP = "merge_attn_states"
FP8_OUTPUT = torch.float8_e4m3fn  # vLLM's fp8 output on CUDA (e4m3fnuz is ROCm's)
_FP8_MAX = torch.finfo(FP8_OUTPUT).max


def merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse,
                          prefill_tokens_with_context=None, output_scale=None):
    """(output, output_lse) by the formula above, float32 math; output is float8_e4m3fn with
    ``output_scale``, else prefix_output's dtype."""
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
    tokens = prefix_output.shape[0]
    if prefill_tokens_with_context is not None and prefill_tokens_with_context < tokens:
        # torch.where, not arithmetic: the prefix of these tokens may hold anything (NaN)
        no_ctx = torch.arange(tokens, device=out.device) >= prefill_tokens_with_context
        out = torch.where(no_ctx[:, None, None], suffix_output.float(), out)
        lse = torch.where(no_ctx[None, :], suffix_lse.float(), lse)
    if output_scale is None:
        return out.to(prefix_output.dtype), lse
    inv = 1.0 / output_scale.float().reshape(())  # float32 reciprocal, then one multiply
    return (out * inv).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_OUTPUT), lse


def _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse,
           prefill_tokens_with_context=None, output_scale=None):
    C.check_tensor(OP, "output", output)
    if output_scale is None:
        if output.dtype == FP8_OUTPUT:
            C.fail(OP, f"output is {FP8_OUTPUT}: pass output_scale (the FP8 output scale)",
                   TypeError)
        C.check_float_dtype(OP, "output", output)
    if output.dim() != 3:
        C.fail(OP, f"output must be [tokens, heads, head_size], got shape {tuple(output.shape)}")
    tokens, heads = output.shape[0], output.shape[1]
    if output_scale is None:
        for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
            C.check_like(OP, name, t, output, "output")
    else:
        C.check_tensor(OP, "output_scale", output_scale)
        if output_scale.dtype != torch.float32:
            C.fail(OP, f"output_scale must be a float32 tensor, got {output_scale.dtype}",
                   TypeError)
        if output_scale.numel() != 1:
            C.fail(OP, f"output_scale must hold one value, got shape "
                       f"{tuple(output_scale.shape)}")
        if output_scale.device != output.device:
            C.fail(OP, f"output_scale must be on device {output.device} (same as output), got "
                       f"{output_scale.device}")
        if output.dtype != FP8_OUTPUT:
            C.fail(OP, f"output must be {FP8_OUTPUT} when output_scale is given (FP8 output), "
                       f"got {output.dtype}", TypeError)
        C.check_tensor(OP, "prefix_output", prefix_output)
        C.check_float_dtype(OP, "prefix_output", prefix_output)
        if prefix_output.device != output.device:
            C.fail(OP, f"prefix_output must be on device {output.device} (same as output), got "
                       f"{prefix_output.device}")
        if prefix_output.shape != output.shape:
            C.fail(OP, f"prefix_output must have the shape of output {tuple(output.shape)}, "
                       f"got {tuple(prefix_output.shape)}")
        C.check_like(OP, "suffix_output", suffix_output, prefix_output, "prefix_output")
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
    ctx = prefill_tokens_with_context
    if ctx is not None:
        if isinstance(ctx, bool) or not isinstance(ctx, (int, torch.SymInt)):
            C.fail(OP, f"prefill_tokens_with_context must be an int or None, got "
                       f"{type(ctx).__name__}", TypeError)
        if isinstance(ctx, int) and isinstance(tokens, int) and not 0 <= ctx <= tokens:
            C.fail(OP, f"prefill_tokens_with_context must be in [0, tokens = {tokens}], got "
                       f"{ctx}")
    from compile_ops.cache import _check_no_self_overlap

    _check_no_self_overlap(OP, "output", output)
    for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
        # exactly in place is element-wise only when the elements have the same size
        C.check_no_partial_overlap(OP, "output", output, name, t,
                                   allow_same=t.dtype == output.dtype)
    if output_lse is not None:
        for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
            C.check_no_partial_overlap(OP, "output_lse", output_lse, name, t, allow_same=True)


@torch.library.custom_op("compile_ops::merge_attn_states", mutates_args=("output", "output_lse"))
def _merge_attn_states(output: torch.Tensor, prefix_output: torch.Tensor,
                       prefix_lse: torch.Tensor, suffix_output: torch.Tensor,
                       suffix_lse: torch.Tensor, output_lse: Optional[torch.Tensor] = None,
                       prefill_tokens_with_context: Optional[int] = None,
                       output_scale: Optional[torch.Tensor] = None) -> None:
    """Merge two partial attention results by their LSEs (see the module docstring)."""
    _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse,
           prefill_tokens_with_context, output_scale)
    out, lse = merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse,
                                     prefill_tokens_with_context, output_scale)
    output.copy_(out)
    if output_lse is not None:
        output_lse.copy_(lse)


@_merge_attn_states.register_fake
def _(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None,
      prefill_tokens_with_context=None, output_scale=None):
    _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse,
           prefill_tokens_with_context, output_scale)


@_merge_attn_states.register_kernel("cuda")
def _(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse=None,
      prefill_tokens_with_context=None, output_scale=None):
    _check(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse,
           prefill_tokens_with_context, output_scale)
    if _C is not None:
        _C.merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                             output_lse, prefill_tokens_with_context, output_scale)
    else:
        triton_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                 output_lse, prefill_tokens_with_context, output_scale)


# The IndexError of issue 15. custom_op's ADInplaceOrView kernel bumps the version counter of
# every mutated argument by its schema position, but the dispatcher hands Python kernels their
# arguments without the trailing ones left at their defaults: a call with output_lse=None (and
# everything after it at its default) arrives with 5 positional arguments. A kernel that reads
# args[5] unguarded raises "IndexError: tuple index out of range", on every device: torch's
# custom_ops.py did so before it filled the defaults first (2.13.0) or checked the length
# (2.14.1); the project's GPU machine runs torch 2.11.0, where issue 15 saw it on the CUDA path.
# This op gets its own kernel for that key, doing what 2.14.1's does (bump what is there,
# redispatch below ADInplaceOrView), on every torch version.
_VERSION_BUMP_LIBS = []  # the registrations live as long as these libraries


def _install_version_bump(op: torch._ops.OpOverload) -> None:
    mutated = [i for i, a in enumerate(op._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    below = torch._C._after_ADInplaceOrView_keyset
    ns, name = op._schema.name.split("::")
    lib = torch.library.Library(ns, "FRAGMENT")  # noqa: TOR901
    _VERSION_BUMP_LIBS.append(lib)

    def version_bump(keyset, *args, **kwargs):
        for i in mutated:
            if i < len(args) and isinstance(args[i], torch.Tensor):
                torch.autograd.graph.increment_version(args[i])
        return op.redispatch(keyset & below, *args, **kwargs)

    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": intended
            warnings.simplefilter("ignore")
            lib.impl(name, version_bump, "ADInplaceOrView", with_keyset=True)
    except RuntimeError as exc:  # a torch that refuses the override must still import us
        warnings.warn(f"compile_ops: {op} keeps torch's version-bump kernel ({exc}); on torch "
                      "< 2.13 pass its optional mutated tensors explicitly", RuntimeWarning,
                      stacklevel=2)


_install_version_bump(torch.ops.compile_ops.merge_attn_states.default)


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
    def merge_kernel(out, pre, suf, p_lse, s_lse, o_lse, scale, tokens, ctx_tokens,
                     out_t, out_h, pre_t, pre_h, suf_t, suf_h,
                     pl_h, pl_t, sl_h, sl_t, ol_h, ol_t,
                     HEAD: tl.constexpr, BLOCK: tl.constexpr, HAS_LSE: tl.constexpr,
                     FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens * token stride > 2**31
        h = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, BLOCK)
        mask = d < HEAD
        s = tl.load(suf + t * suf_t + h * suf_h + d, mask=mask, other=0.0).to(tl.float32)
        sl_raw = tl.load(s_lse + h * sl_h + t * sl_t)
        neg_inf = float("-inf")
        if t < ctx_tokens:
            pl = tl.load(p_lse + h * pl_h + t * pl_t)
            pl = tl.where((pl == float("inf")) | (pl == neg_inf), neg_inf, pl)
            sl = tl.where((sl_raw == float("inf")) | (sl_raw == neg_inf), neg_inf, sl_raw)
            m = tl.maximum(pl, sl)
            empty = m == neg_inf
            m0 = tl.where(empty, 0.0, m)
            a = tl.exp(pl - m0)
            b = tl.exp(sl - m0)
            total = a + b
            pa = tl.where(empty, 1.0, a / total)
            sb = tl.where(empty, 0.0, b / total)
            p = tl.load(pre + t * pre_t + h * pre_h + d, mask=mask, other=0.0).to(tl.float32)
            o = tl.where(empty, p, p * pa + s * sb)
            o_lse_val = tl.where(empty, m, tl.log(total) + m0)
        else:  # no prefix context: the suffix and its LSE pass through
            o = s
            o_lse_val = sl_raw
        if FP8:
            inv = tl.math.div_rn(1.0, tl.load(scale))
            o = tl.clamp(o * inv, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out + t * out_t + h * out_h + d, o.to(out.dtype.element_ty), mask=mask)
        if HAS_LSE:
            tl.store(o_lse + h * ol_h + t * ol_t, o_lse_val)

    _TRITON_KERNEL = merge_kernel
    return merge_kernel


def triton_merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse,
                             output_lse=None, prefill_tokens_with_context=None,
                             output_scale=None):
    """The op's Triton implementation (no checks: the op's wrapper ran them)."""
    import triton

    tokens, heads, head = output.shape
    if tokens == 0 or heads == 0:
        return
    kernel = _triton_kernel()
    ol = output_lse if output_lse is not None else prefix_lse  # unused when HAS_LSE is False
    scale = output_scale if output_scale is not None else prefix_lse  # unused without FP8
    ctx = tokens if prefill_tokens_with_context is None else int(prefill_tokens_with_context)
    kernel[(tokens, heads)](
        output, prefix_output, suffix_output, prefix_lse, suffix_lse, ol, scale, tokens, ctx,
        output.stride(0), output.stride(1), prefix_output.stride(0), prefix_output.stride(1),
        suffix_output.stride(0), suffix_output.stride(1),
        prefix_lse.stride(0), prefix_lse.stride(1), suffix_lse.stride(0), suffix_lse.stride(1),
        ol.stride(0), ol.stride(1),
        HEAD=head, BLOCK=triton.next_power_of_2(head), HAS_LSE=output_lse is not None,
        FP8=output_scale is not None, FP8_MAX=_FP8_MAX)


def merge_attn_states(prefix_output, prefix_lse, suffix_output, suffix_lse,
                      prefill_tokens_with_context=None, output_scale=None):
    """Functional form: returns ``(output, output_lse)`` (output float8_e4m3fn with
    ``output_scale``)."""
    dtype = prefix_output.dtype if output_scale is None else FP8_OUTPUT
    output = torch.empty_like(prefix_output, dtype=dtype)
    output_lse = torch.empty_like(prefix_lse, dtype=torch.float32)
    torch.ops.compile_ops.merge_attn_states(output, prefix_output, prefix_lse, suffix_output,
                                            suffix_lse, output_lse, prefill_tokens_with_context,
                                            output_scale)
    return output, output_lse


# ---------------------------------------------------------------------------------------------
# Paged attention (decode): schemas, checks, references, fakes; the CUDA path runs the split-KV
# Triton kernels of compile_ops/decode_attention.py.
# ---------------------------------------------------------------------------------------------
HEAD_SIZES = (32, 64, 80, 96, 112, 120, 128, 192, 256)
BLOCK_SIZES = (8, 16, 32)
PARTITION_SIZE = 512


def _paged_check(op, out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                 seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                 v_scale, blocksparse_vert_stride, blocksparse_local_blocks):
    from compile_ops import cache as _cache

    fmt = _cache.fp8_format(op, kv_cache_dtype)
    C.check_tensor(op, "query", query)
    C.check_float_dtype(op, "query", query)
    if query.dim() != 3:
        C.fail(op, f"query must be [num_seqs, num_heads, head_size], got {tuple(query.shape)}")
    seqs, heads, head = query.shape
    if head not in HEAD_SIZES:
        C.fail(op, f"head_size {head} is not supported; supported: {list(HEAD_SIZES)}")
    if query.stride(2) != 1:
        C.fail(op, f"query must be contiguous in head_size, got strides {query.stride()}")
    C.check_like(op, "out", out, query, "query")
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads <= 0 \
            or heads % num_kv_heads:
        C.fail(op, f"num_kv_heads must divide num_heads {heads}, got {num_kv_heads!r}")
    if block_size not in BLOCK_SIZES:
        C.fail(op, f"block_size {block_size} is not supported; supported: {list(BLOCK_SIZES)}")
    if blocksparse_vert_stride > 1 or blocksparse_local_blocks != 0:
        C.fail(op, "blocksparse attention (blocksparse_vert_stride > 1 or "
                   "blocksparse_local_blocks != 0) is not supported")
    if not (isinstance(scale, (float, int)) and not isinstance(scale, bool)):
        C.fail(op, f"scale must be a float, got {type(scale).__name__}", TypeError)
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_tensor(op, name, cache)
        _cache._check_device(op, name, cache, query, "query")
        _cache._check_cache_storage(op, name, cache, fmt, query.dtype, "query")
    x = 16 // key_cache.element_size()
    if head % x:
        C.fail(op, f"head_size {head} must be a multiple of x = {x} (16 bytes of "
                   f"{key_cache.dtype}) for this cache")
    nb = key_cache.shape[0] if key_cache.dim() == 5 else -1
    if key_cache.dim() != 5 or tuple(key_cache.shape[1:]) != (num_kv_heads, head // x,
                                                              block_size, x):
        C.fail(op, f"key_cache must be [num_blocks, {num_kv_heads}, {head // x}, {block_size}, "
                   f"{x}], got {tuple(key_cache.shape)}")
    if tuple(value_cache.shape) != (nb, num_kv_heads, head, block_size):
        C.fail(op, f"value_cache must be [{nb}, {num_kv_heads}, {head}, {block_size}], got "
                   f"{tuple(value_cache.shape)}")
    _cache._check_index(op, "block_tables", block_tables, (torch.int32,), dim=2)
    _cache._check_index(op, "seq_lens", seq_lens, (torch.int32,))
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        _cache._check_device(op, name, t, query, "query")
    if block_tables.shape[0] != seqs or seq_lens.shape[0] != seqs:
        C.fail(op, f"block_tables and seq_lens need one row per sequence ({seqs}), got "
                   f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if alibi_slopes is not None:
        C.check_tensor(op, "alibi_slopes", alibi_slopes)
        if alibi_slopes.dtype != torch.float32 or tuple(alibi_slopes.shape) != (heads,):
            C.fail(op, f"alibi_slopes must be float32 [{heads}], got {alibi_slopes.dtype} "
                       f"{tuple(alibi_slopes.shape)}")
        _cache._check_device(op, "alibi_slopes", alibi_slopes, query, "query")
    _cache._check_scale(op, "k_scale", k_scale, key_cache, None, "key_cache")
    _cache._check_scale(op, "v_scale", v_scale, key_cache, None, "key_cache")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
        C.fail(op, f"max_seq_len must be an int >= 0, got {max_seq_len!r}")
    return fmt


def paged_attention_ref(query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                        seq_lens, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
                        partition_size=None, max_seq_len=None, op="paged_attention"):
    """Softmax attention of each sequence's query over its cached tokens (float32 math).

    Returns the output [seqs, heads, head] (query dtype) and, with ``partition_size``, the
    per-partition (max_logits, exp_sums, partial outputs) of paged_attention_v2.
    Raises IndexError for a block id outside the cache or a sequence longer than its table,
    and ValueError for a seq_len above ``max_seq_len`` (when given), before computing anything.
    """
    from compile_ops import cache as _cache
    from compile_ops.decode_attention import validate

    seqs, heads, head = query.shape
    nb, _, _, bs, _ = key_cache.shape
    validate(op, block_tables, seq_lens, max_seq_len, nb, bs)
    lens = seq_lens.long().clamp(min=0)
    L = int(lens.max()) if seqs else 0
    if L == 0:  # no sequence has a token: zeros, no partition
        out = torch.zeros_like(query)
        return out if partition_size is None else (out, [])
    pos = torch.arange(L, device=query.device)
    valid = pos[None, :] < lens[:, None]  # [seqs, L]
    cols = (pos // bs).clamp(max=max(block_tables.shape[1] - 1, 0))
    blk = block_tables.long()[:, cols] if L else torch.zeros(seqs, 0, dtype=torch.long)
    blk = torch.where(valid, blk, 0)
    off = (pos % bs)[None, :].expand(seqs, L)
    keys = key_cache[blk, :, :, off, :].reshape(seqs, L, num_kv_heads, head)
    vals = value_cache[blk, :, :, off]  # [seqs, L, kv_heads, head]
    fmt = _cache.fp8_format(op, kv_cache_dtype)
    if fmt is not None:
        keys = _cache.dequantize_fp8_ref(keys, k_scale.reshape(()).float(), fmt, torch.float32)
        vals = _cache.dequantize_fp8_ref(vals, v_scale.reshape(()).float(), fmt, torch.float32)
    # Values past a sequence's end (gathered from block 0 for the padded positions) get weight 0,
    # but 0 * NaN = NaN: zero them, as vLLM's kernel and ours do (stale cache cells may be NaN).
    vals = torch.where(valid[:, :, None, None], vals.float(), 0.0)
    group = heads // num_kv_heads
    q = query.float().view(seqs, num_kv_heads, group, head)
    logits = torch.einsum("sngd,slnd->sngl", q, keys.float()) * float(scale)
    if alibi_slopes is not None:
        rel = (pos[None, :] - lens[:, None] + 1).float()  # [seqs, L]
        logits = logits + alibi_slopes.float().view(1, num_kv_heads, group, 1) * \
            rel[:, None, None, :]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))

    def attend(lg, v):
        m = lg.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), 0.0, m)
        e = torch.exp(lg - m)
        s = e.sum(-1, keepdim=True)
        o = torch.einsum("sngl,slnd->sngd", e, v.float()) / torch.where(s == 0, 1.0, s)
        return o, m.squeeze(-1), s.squeeze(-1)

    out, _, _ = attend(logits, vals)
    out = out.reshape(seqs, heads, head).to(query.dtype)
    if partition_size is None:
        return out
    parts = []
    for p0 in range(0, L, partition_size):
        o, m, s = attend(logits[..., p0:p0 + partition_size], vals[:, p0:p0 + partition_size])
        parts.append((o.reshape(seqs, heads, head), m.reshape(seqs, heads),
                      s.reshape(seqs, heads)))
    return out, parts


def _validate(op, key_cache, block_tables, seq_lens, max_seq_len):
    """The reference's index checks, for the CUDA path under COMPILE_OPS_VALIDATE=1 (before
    anything is written): seq_lens <= max_seq_len, table capacity, block ids."""
    from compile_ops.decode_attention import validate

    validate(op, block_tables, seq_lens, max_seq_len, key_cache.shape[0], key_cache.shape[3])


def _paged_v1_check(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                    seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                    v_scale, tp_rank, blocksparse_local_blocks, blocksparse_vert_stride,
                    blocksparse_block_size, blocksparse_head_sliding_step):
    return _paged_check("paged_attention_v1", out, query, key_cache, value_cache, num_kv_heads,
                        scale, block_tables, seq_lens, block_size, max_seq_len, alibi_slopes,
                        kv_cache_dtype, k_scale, v_scale, blocksparse_vert_stride,
                        blocksparse_local_blocks)


@torch.library.custom_op("compile_ops::paged_attention_v1", mutates_args=("out",))
def _paged_attention_v1(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, num_kv_heads: int, scale: float,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                        max_seq_len: int, alibi_slopes: Optional[torch.Tensor],
                        kv_cache_dtype: str, k_scale: torch.Tensor, v_scale: torch.Tensor,
                        tp_rank: int = 0, blocksparse_local_blocks: int = 0,
                        blocksparse_vert_stride: int = 0, blocksparse_block_size: int = 64,
                        blocksparse_head_sliding_step: int = 0) -> None:
    """Decode attention over the paged (x-packed key) cache; see paged_attention_ref."""
    _paged_v1_check(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                    seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                    v_scale, tp_rank, blocksparse_local_blocks, blocksparse_vert_stride,
                    blocksparse_block_size, blocksparse_head_sliding_step)
    out.copy_(paged_attention_ref(query, key_cache, value_cache, num_kv_heads, scale,
                                  block_tables, seq_lens, alibi_slopes, kv_cache_dtype, k_scale,
                                  v_scale, max_seq_len=max_seq_len, op="paged_attention_v1"))


@_paged_attention_v1.register_fake
def _(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
      block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank=0,
      blocksparse_local_blocks=0, blocksparse_vert_stride=0, blocksparse_block_size=64,
      blocksparse_head_sliding_step=0):
    _paged_v1_check(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                    seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                    v_scale, tp_rank, blocksparse_local_blocks, blocksparse_vert_stride,
                    blocksparse_block_size, blocksparse_head_sliding_step)


def _paged_v2_check(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache,
                    num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
                    alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank,
                    blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size,
                    blocksparse_head_sliding_step):
    op = "paged_attention_v2"
    fmt = _paged_check(op, out, query, key_cache, value_cache, num_kv_heads, scale,
                       block_tables, seq_lens, block_size, max_seq_len, alibi_slopes,
                       kv_cache_dtype, k_scale, v_scale, blocksparse_vert_stride,
                       blocksparse_local_blocks)
    seqs, heads, head = query.shape
    parts = max(1, -(-max_seq_len // PARTITION_SIZE))
    for name, t in (("exp_sums", exp_sums), ("max_logits", max_logits)):
        C.check_tensor(op, name, t)
        if t.dtype != torch.float32 or t.dim() != 3 or tuple(t.shape[:2]) != (seqs, heads) \
                or t.shape[2] < parts:
            C.fail(op, f"{name} must be float32 [{seqs}, {heads}, >= {parts}] (partitions of "
                       f"{PARTITION_SIZE} tokens of max_seq_len), got {t.dtype} "
                       f"{tuple(t.shape)}")
    C.check_tensor(op, "tmp_out", tmp_out)
    if tmp_out.dtype != query.dtype or tmp_out.dim() != 4 or \
            tuple(tmp_out.shape[:2]) != (seqs, heads) or tmp_out.shape[2] < parts or \
            tmp_out.shape[3] != head:
        C.fail(op, f"tmp_out must be {query.dtype} [{seqs}, {heads}, >= {parts}, {head}], got "
                   f"{tmp_out.dtype} {tuple(tmp_out.shape)}")
    for name, t in (("exp_sums", exp_sums), ("max_logits", max_logits), ("tmp_out", tmp_out)):
        if t.device != query.device:
            C.fail(op, f"{name} must be on device {query.device} (same as query), got "
                       f"{t.device}")
    return fmt


@torch.library.custom_op("compile_ops::paged_attention_v2",
                         mutates_args=("out", "exp_sums", "max_logits", "tmp_out"))
def _paged_attention_v2(out: torch.Tensor, exp_sums: torch.Tensor, max_logits: torch.Tensor,
                        tmp_out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                        value_cache: torch.Tensor, num_kv_heads: int, scale: float,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                        max_seq_len: int, alibi_slopes: Optional[torch.Tensor],
                        kv_cache_dtype: str, k_scale: torch.Tensor, v_scale: torch.Tensor,
                        tp_rank: int = 0, blocksparse_local_blocks: int = 0,
                        blocksparse_vert_stride: int = 0, blocksparse_block_size: int = 64,
                        blocksparse_head_sliding_step: int = 0) -> None:
    """paged_attention_v1's result, computed per partition of 512 tokens then reduced; the
    partition maxima, exp sums and partial outputs land in max_logits, exp_sums, tmp_out (for
    the partitions a sequence has; the rest are left as they are)."""
    _paged_v2_check(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache,
                    num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
                    alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank,
                    blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size,
                    blocksparse_head_sliding_step)
    res, parts = paged_attention_ref(query, key_cache, value_cache, num_kv_heads, scale,
                                     block_tables, seq_lens, alibi_slopes, kv_cache_dtype,
                                     k_scale, v_scale, partition_size=PARTITION_SIZE,
                                     max_seq_len=max_seq_len, op="paged_attention_v2")
    out.copy_(res)
    lens = seq_lens.long()
    for p, (o, m, s) in enumerate(parts):
        has = (lens > p * PARTITION_SIZE)[:, None].expand_as(m)
        max_logits[:, :, p] = torch.where(has, m, max_logits[:, :, p])
        exp_sums[:, :, p] = torch.where(has, s, exp_sums[:, :, p])
        tmp_out[:, :, p] = torch.where(has[..., None], o.to(tmp_out.dtype), tmp_out[:, :, p])


@_paged_attention_v2.register_fake
def _(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache, num_kv_heads, scale,
      block_tables, seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
      v_scale, tp_rank=0, blocksparse_local_blocks=0, blocksparse_vert_stride=0,
      blocksparse_block_size=64, blocksparse_head_sliding_step=0):
    _paged_v2_check(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache,
                    num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
                    alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank,
                    blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size,
                    blocksparse_head_sliding_step)


def _paged_cuda(op, out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                seq_lens, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale, v2=None):
    """The CUDA path of both ops (the op's checks have run): decode_attention.paged_decode."""
    from compile_ops import decode_attention
    from compile_ops.cache import _refuse_capture, _validating

    if key_cache.stride(4) != 1:
        C.fail(op, f"key_cache must be contiguous in its last (x) dimension on CUDA, got strides "
                   f"{key_cache.stride()}")
    if _validating():
        _refuse_capture(op, "block_tables and seq_lens")
        _validate(op, key_cache, block_tables, seq_lens, max_seq_len)
    decode_attention.paged_decode(out, query, key_cache, value_cache, num_kv_heads, scale,
                                  block_tables, seq_lens, max_seq_len, alibi_slopes,
                                  kv_cache_dtype, k_scale, v_scale, v2=v2)


@_paged_attention_v1.register_kernel("cuda")
def _(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
      block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank=0,
      blocksparse_local_blocks=0, blocksparse_vert_stride=0, blocksparse_block_size=64,
      blocksparse_head_sliding_step=0):
    _paged_v1_check(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                    seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                    v_scale, tp_rank, blocksparse_local_blocks, blocksparse_vert_stride,
                    blocksparse_block_size, blocksparse_head_sliding_step)
    _paged_cuda("paged_attention_v1", out, query, key_cache, value_cache, num_kv_heads, scale,
                block_tables, seq_lens, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                v_scale)


@_paged_attention_v2.register_kernel("cuda")
def _(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache, num_kv_heads, scale,
      block_tables, seq_lens, block_size, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
      v_scale, tp_rank=0, blocksparse_local_blocks=0, blocksparse_vert_stride=0,
      blocksparse_block_size=64, blocksparse_head_sliding_step=0):
    _paged_v2_check(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache,
                    num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
                    alibi_slopes, kv_cache_dtype, k_scale, v_scale, tp_rank,
                    blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size,
                    blocksparse_head_sliding_step)
    _paged_cuda("paged_attention_v2", out, query, key_cache, value_cache, num_kv_heads, scale,
                block_tables, seq_lens, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale,
                v_scale, v2=(exp_sums, max_logits, tmp_out))
