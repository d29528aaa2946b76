"""static_cache_attention (issue 16): decode attention over a static [batch, kv_heads,
max_cache_len, head] cache. The CPU reference against a float64 oracle written here (loops over
sequences and heads, slots read one by one, repeat_kv's GQA) and against Hugging Face's repeat_kv
+ SDPA with a float mask; strided views, opcheck, the checks (nothing written on error),
torch.compile; the CUDA path's Triton kernels interpreted on the CPU (TRITON_INTERPRET=1, a child
process) and on the GPU (CUDA graphs, torch.compile). Cache slots at or past seq_len hold NaN
wherever the comparison allows it: they must never be read.

attn_mask and seq_starts: the same, against a masked float64 oracle (bool masks leave slots out,
float ones are added to the logits; every broadcast shape and layout of the mask), against SDPA
with Hugging Face's decode masks (left padding, sliding windows) over the whole cache, with
mask_bounds' range (NaN outside it); mask_bounds by hand and by brute force; the cases where the
Triton path once disagreed with the reference are regression tests (KERNEL_REGRESSIONS)."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from compile_ops.static_cache import (mask_bounds, masked_decode_attention, static_cache_attention,
                                      static_cache_attention_ref)
from compile_ops.testing import assert_close, assert_raises_eager_and_fake, softmax_tolerance

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN = float("nan")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def poison(kc, vc, lens, value=NAN):
    """Fill every slot at or past each sequence's (clamped) length with `value`, in place."""
    L = kc.shape[2]
    n = lens.to(device=kc.device, dtype=torch.int64).clamp(0, L)
    past = torch.arange(L, device=kc.device)[None, :] >= n[:, None]  # [batch, L]
    kc.masked_fill_(past[:, None, :, None], value)
    vc.masked_fill_(past[:, None, :, None], value)


def make(batch, heads, kv_heads, max_len, head, dtype, lens, gen, *, lens_dtype=torch.int32,
         fill=NAN):
    """query [batch, heads, head], caches [batch, kv_heads, max_len, head] (slots past seq_len
    set to `fill`; None keeps the random values), seq_lens."""
    q = torch.randn(batch, heads, head, generator=gen).to(dtype)
    kc = torch.randn(batch, kv_heads, max_len, head, generator=gen).to(dtype)
    vc = torch.randn(batch, kv_heads, max_len, head, generator=gen).to(dtype)
    lens = torch.tensor(lens, dtype=lens_dtype)
    if fill is not None:
        poison(kc, vc, lens, fill)
    return q, kc, vc, lens


def edge_lens(L):
    """Empty, one token, the whole cache, past the cache, negative, about half."""
    return [0, 1, L, L + 7, -3, L // 2 + 1]


def repeat_kv(x, group):
    """Hugging Face's repeat_kv: [b, kv_heads, L, d] -> [b, kv_heads * group, L, d]."""
    b, n, L, d = x.shape
    return x[:, :, None].expand(b, n, group, L, d).reshape(b, n * group, L, d)


def oracle(q, kc, vc, lens, scale):
    """float64, one sequence and one query head at a time, keys and values read slot by slot
    (slots 0 .. min(seq_len, max_cache_len) - 1 only), KV heads repeated as repeat_kv does."""
    batch, heads, head = q.shape
    kv_heads, L = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, head, dtype=torch.float64)
    for b in range(batch):
        n = min(max(int(lens[b]), 0), L)
        if n == 0:
            continue  # nothing to attend: zeros
        K = torch.stack([kc[b, :, t].double() for t in range(n)], 1)  # [kv_heads, n, head]
        V = torch.stack([vc[b, :, t].double() for t in range(n)], 1)
        K, V = repeat_kv(K[None], group)[0], repeat_kv(V[None], group)[0]  # [heads, n, head]
        for h in range(heads):
            logits = (K[h] @ q[b, h].double()) * scale
            out[b, h] = torch.softmax(logits, 0) @ V[h]
    return out


def run(q, kc, vc, lens, scale, out=None):
    out = torch.full_like(q, NAN) if out is None else out
    ops.static_cache_attention(out, q, kc, vc, lens, scale)
    return out


def hf_sdpa(q, kc, vc, lens, scale):
    """What a Hugging Face model runs at decode over a StaticCache: repeat_kv, then SDPA over the
    whole cache with a float mask (0 before seq_len, -inf from it)."""
    batch, heads, head = q.shape
    kv_heads, L = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    mask = torch.where(torch.arange(L)[None, :] < lens.long()[:, None], 0.0, float("-inf"))
    out = F.scaled_dot_product_attention(q[:, :, None], repeat_kv(kc, group),
                                         repeat_kv(vc, group),
                                         attn_mask=mask.to(q.dtype)[:, None, None, :],
                                         scale=scale)
    return out[:, :, 0]


# ---------------------------------------------------------------------------------------------
# CPU: the reference
# ---------------------------------------------------------------------------------------------
# (heads, kv_heads, head, max_cache_len): GQA groups 1, 4, 8; kv_heads 1, 2, 8; head sizes 32,
# 64, 80, 128; caches of 1, 37 and 100 slots.
SHAPES = [(8, 8, 64, 37), (8, 2, 80, 100), (16, 2, 128, 37), (8, 1, 128, 1), (4, 1, 32, 100),
          (64, 8, 64, 100), (32, 8, 128, 37)]


@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("heads,kv_heads,head,max_len", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(dtype, heads, kv_heads, head, max_len, lens_dtype, gen):
    lens = edge_lens(max_len)
    q, kc, vc, seq_lens = make(6, heads, kv_heads, max_len, head, dtype, lens, gen,
                               lens_dtype=lens_dtype)
    scale = 1.3 / math.sqrt(head)
    out = run(q, kc, vc, seq_lens, scale)
    want = oracle(q, kc, vc, seq_lens, scale)
    assert_close(out, want.to(dtype))
    assert (out[0] == 0).all() and (out[4] == 0).all()  # seq_len 0 and -3: zeros
    # a seq_len past the cache is the whole cache, exactly
    clamped = seq_lens.clone()
    clamped[3] = max_len
    assert torch.equal(out, run(q, kc, vc, clamped, scale))


@pytest.mark.parametrize("lens,lens_dtype", [([2 ** 31 - 1, -2 ** 31, 5], torch.int32),
                                             ([2 ** 40, -2 ** 40, 5], torch.int64)])
def test_extreme_seq_lens(lens, lens_dtype, gen):
    """seq_lens at the ends of their dtype's range clamp into [0, max_cache_len]."""
    q, kc, vc, seq_lens = make(3, 8, 2, 20, 64, torch.float32, lens, gen, lens_dtype=lens_dtype)
    out = run(q, kc, vc, seq_lens, 0.125)
    assert_close(out, oracle(q, kc, vc, seq_lens, 0.125).float())
    assert (out[1] == 0).all()


def test_large_logits_and_scale(gen):
    """Logits of magnitude ~ 100 (a large scale): the softmax's max subtraction; tolerance
    widened by the logits' float32 ulps (softmax_tolerance)."""
    q, kc, vc, lens = make(2, 4, 2, 50, 64, torch.float32, [50, 13], gen)
    scale = 4.0
    out = run(q, kc, vc, lens, scale)
    want = oracle(q, kc, vc, lens, scale)
    big = float((q[:, :, None, :].double() @ kc.nan_to_num().double().repeat_interleave(
        2, 1).transpose(-1, -2)).abs().max()) * scale
    assert big > 50
    torch.testing.assert_close(out.double(), want, **softmax_tolerance(torch.float32, big))


def test_reference_function_wrapper_and_default_scale(gen):
    """The op is static_cache_attention_ref written into out; the Python wrapper's scale
    defaults to 1 / sqrt(head_size)."""
    q, kc, vc, lens = make(3, 8, 2, 30, 80, torch.bfloat16, [4, 30, 0], gen)
    ref = static_cache_attention_ref(q, kc, vc, lens, 80 ** -0.5)
    assert torch.equal(run(q, kc, vc, lens, 80 ** -0.5), ref)
    out = torch.full_like(q, NAN)
    static_cache_attention(out, q, kc, vc, lens)
    assert torch.equal(out, ref)


def test_slots_past_seq_len_are_never_read(gen):
    """Whatever the slots past seq_len (or the whole cache for seq_len <= 0) hold, NaN, inf or
    huge values, the result is the same."""
    q, kc, vc, lens = make(4, 8, 4, 40, 64, torch.float16, [3, 40, 0, 17], gen, fill=None)
    want = run(q, kc, vc, lens, 0.125)
    for value in (NAN, float("inf"), float("-inf"), 6e4):
        k2, v2 = kc.clone(), vc.clone()
        poison(k2, v2, lens, value)
        assert torch.equal(run(q, k2, v2, lens, 0.125), want), value


def test_in_place_and_empty_shapes(gen):
    """out may be the query itself; batch 0, max_cache_len 0 and zero heads run (zeros)."""
    q, kc, vc, lens = make(3, 8, 2, 30, 64, torch.float32, [4, 30, 1], gen)
    want = run(q, kc, vc, lens, 0.125)
    ops.static_cache_attention(q, q, kc, vc, lens, 0.125)
    assert torch.equal(q, want)
    for (b, h, kvh, L, d) in [(0, 8, 2, 30, 64), (3, 8, 2, 0, 64), (3, 0, 2, 30, 64)]:
        q, kc, vc, lens = make(b, h, kvh, L, d, torch.float32, [5] * b, gen)
        out = run(q, kc, vc, lens, 0.125)
        assert out.shape == (b, h, d) and (out == 0).all()


@pytest.mark.parametrize("heads,kv_heads,head,max_len", [(32, 8, 128, 64), (8, 2, 80, 37),
                                                         (4, 4, 64, 100)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_repeat_kv_sdpa(dtype, heads, kv_heads, head, max_len, gen):
    """The op equals what it replaces: repeat_kv + SDPA with a 0 / -inf float mask over the whole
    cache (seq_lens >= 1: SDPA gives NaN for a fully masked row, the op zeros). Slots past
    seq_len hold finite garbage (a NaN key would make SDPA's masked logits NaN).

    Checked twice: SDPA on the float32-upcast inputs, rounded once (the op's contract: a float32
    softmax, one rounding), at the dtype's tolerance; and SDPA run in the dtype itself, as the
    model does, also at the dtype's tolerance (SDPA in a 16-bit dtype rounds on its own terms;
    measured within two ulps of the op on these inputs)."""
    lens = [1, max_len, max_len // 2, max_len + 5]
    q, kc, vc, seq_lens = make(4, heads, kv_heads, max_len, head, dtype, lens, gen, fill=3.0)
    scale = head ** -0.5
    out = run(q, kc, vc, seq_lens, scale)
    exact = hf_sdpa(q.float(), kc.float(), vc.float(), seq_lens, scale)
    assert_close(out, exact.to(dtype))
    assert_close(out, hf_sdpa(q, kc, vc, seq_lens, scale))


# ---------------------------------------------------------------------------------------------
# Strided views
# ---------------------------------------------------------------------------------------------
def query_views(batch, heads, kv_heads, head, dtype, gen, device="cpu"):
    """name -> a [batch, heads, head] query in some layout (drawn on the CPU, viewed on
    `device`)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    return {
        "contiguous": rnd(batch, heads, head),
        # HF: [batch, 1, heads, head] projections transposed to [batch, heads, 1, head]
        "from [b, 1, h, d] transposed": rnd(batch, 1, heads, head).transpose(1, 2)[:, :, 0],
        "[h, b, d] transposed": rnd(heads, batch, head).transpose(0, 1),
        "slice of a fused qkv": rnd(batch, heads + 2 * kv_heads, head)[:, :heads],
        "head stride 2": rnd(batch, heads, 2 * head)[..., ::2],
    }


CACHE_KINDS = ["contiguous", "slice of a longer cache", "padded head stride", "misaligned base",
               "NHD storage"]


def cache_views(batch, kv_heads, L, head, dtype, gen, device="cpu"):
    """name -> (key_cache, value_cache) [batch, kv_heads, L, head] in some layout, each a view
    of a larger buffer on `device` whose memory outside the view is NaN: reading it would
    show."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    def one(kind):
        if kind == "contiguous":
            return rnd(batch, kv_heads, L, head)
        if kind == "slice of a longer cache":
            big = rnd(batch, kv_heads, L + 24, head)
            big[:, :, L:] = NAN
            return big[:, :, :L]
        if kind == "padded head stride":
            big = rnd(batch, kv_heads, L, head + 8)
            big[..., head:] = NAN
            return big[..., :head]
        if kind == "misaligned base":
            big = rnd(batch, kv_heads, L, head + 1)
            big[..., 0] = NAN
            return big[..., 1:]
        if kind == "NHD storage":
            return rnd(batch, L, kv_heads, head).transpose(1, 2)
        raise AssertionError(kind)

    return {k: (one(k), one(k)) for k in CACHE_KINDS}


def out_views(batch, heads, head, dtype, device="cpu"):
    """name -> (base filled with 7 on `device`, function base -> the [batch, heads, head] out
    view)."""
    def base(*shape):
        return torch.full(shape, 7.0, dtype=dtype, device=device)

    return {
        "contiguous": (base(batch, heads, head), lambda t: t),
        "slice of a wider row": (base(batch, heads, head + 16), lambda t: t[..., 8:8 + head]),
        "[h, b, d] transposed": (base(heads, batch, head), lambda t: t.transpose(0, 1)),
        "head stride 2": (base(batch, heads, 2 * head), lambda t: t[..., ::2]),
        "from [b, 1, h, d] transposed": (base(batch, 1, heads, head),
                                         lambda t: t.transpose(1, 2)[:, :, 0]),
    }


def check_out_view(base, view, want, msg):
    """The view holds `want`; every element of base outside it still holds 7."""
    assert_close(view(base), want, msg=msg)
    rest = base.clone()
    view(rest).fill_(7.0)
    assert (rest == 7).all(), f"{msg}: wrote outside the out view"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views(dtype, gen):
    batch, heads, kv_heads, L, head = 3, 8, 2, 40, 64
    lens = torch.tensor([5, L + 100, 0], dtype=torch.int64)
    scale = head ** -0.5
    qs = query_views(batch, heads, kv_heads, head, dtype, gen)
    caches = cache_views(batch, kv_heads, L, head, dtype, gen)
    outs = out_views(batch, heads, head, dtype)
    # each layout of one argument with the others contiguous, then all strided at once
    combos = [(k, "contiguous", "contiguous") for k in qs] + \
        [("contiguous", k, "contiguous") for k in caches] + \
        [("contiguous", "contiguous", k) for k in outs] + \
        [("[h, b, d] transposed", "NHD storage", "slice of a wider row"),
         ("head stride 2", "slice of a longer cache", "head stride 2")]
    for qn, cn, on in combos:
        q, (kc, vc) = qs[qn], caches[cn]
        base, view = outs[on]
        base = base.clone()
        ops.static_cache_attention(view(base), q, kc, vc, lens, scale)
        want = oracle(q, kc, vc, lens, scale).to(dtype)
        check_out_view(base, view, want, f"query {qn}, caches {cn}, out {on}")


# ---------------------------------------------------------------------------------------------
# opcheck, checks
# ---------------------------------------------------------------------------------------------
def test_opcheck(gen):
    q, kc, vc, lens = make(3, 8, 2, 20, 64, torch.float32, [0, 3, 24], gen, fill=5.0)
    torch.library.opcheck(ops.static_cache_attention.default,
                          (torch.empty_like(q), q, kc, vc, lens, 0.125))
    # bfloat16, int64 lengths, a strided out, NHD-stored caches
    q, _, _, lens = make(2, 4, 4, 16, 80, torch.bfloat16, [16, 7], gen,
                         lens_dtype=torch.int64, fill=None)
    kc = torch.randn(2, 16, 4, 80, generator=gen).to(torch.bfloat16).transpose(1, 2)
    vc = torch.randn(2, 16, 4, 80, generator=gen).to(torch.bfloat16).transpose(1, 2)
    out = torch.zeros(2, 4, 96, dtype=torch.bfloat16)[..., :80]
    torch.library.opcheck(ops.static_cache_attention.default, (out, q, kc, vc, lens, 0.1))


def test_errors_name_the_argument_and_write_nothing(gen):
    q, kc, vc, lens = make(2, 4, 2, 10, 64, torch.float32, [3, 10], gen, fill=None)
    sentinel = torch.full_like(q, 7.0)
    outs = [sentinel]

    def call(out=None, query=q, key_cache=kc, value_cache=vc, seq_lens=lens, scale=0.125):
        out = sentinel if out is None else out
        outs.append(out)
        return lambda: ops.static_cache_attention(out, query, key_cache, value_cache, seq_lens,
                                                  scale)

    def raises(exc, fragment, **kw):
        assert_raises_eager_and_fake(call(**kw), exc, fragment)

    f16 = torch.float16
    raises(ValueError, r"query must be \[batch, num_heads, head_size\], got \(8, 64\)",
           query=q.view(8, 64), out=sentinel.view(8, 64))
    raises(ValueError, r"query must be \[batch, num_heads, head_size\]",
           query=q[None], out=sentinel[None])
    raises(TypeError, "query must be float32, float16 or bfloat16, got torch.int32",
           query=q.int(), out=sentinel.int())
    raises(ValueError, r"head_size must be in \[1, 256\], got 300",
           query=torch.randn(2, 4, 300), out=torch.full((2, 4, 300), 7.0))
    raises(TypeError, r"out must have dtype torch.float32 \(same as query\), got torch.float16",
           out=torch.full((2, 4, 64), 7.0, dtype=f16))
    raises(ValueError, r"out must have the shape of query \(2, 4, 64\), got \(2, 4, 32\)",
           out=torch.full((2, 4, 32), 7.0))
    raises(TypeError, "key_cache must have dtype torch.float32 .*got torch.float16",
           key_cache=kc.to(f16))
    raises(TypeError, "value_cache must have dtype torch.float32 .*got torch.bfloat16",
           value_cache=vc.bfloat16())
    raises(ValueError, r"key_cache must be \[2, num_kv_heads, max_cache_len, 64\].*"
                       r"got \(3, 2, 10, 64\)", key_cache=torch.randn(3, 2, 10, 64))
    raises(ValueError, r"value_cache must be \[2, num_kv_heads, max_cache_len, 64\].*"
                       r"got \(2, 2, 10, 32\)", value_cache=torch.randn(2, 2, 10, 32))
    raises(ValueError, r"key_cache must be \[2, num_kv_heads, max_cache_len, 64\].*"
                       r"got \(2, 20, 64\)", key_cache=torch.randn(2, 20, 64))
    raises(ValueError, "num_heads 4 must be a multiple of key_cache's num_kv_heads 3",
           key_cache=torch.randn(2, 3, 10, 64), value_cache=torch.randn(2, 3, 10, 64))
    raises(ValueError, "num_heads 4 must be a multiple of key_cache's num_kv_heads 0",
           key_cache=torch.randn(2, 0, 10, 64), value_cache=torch.randn(2, 0, 10, 64))
    raises(ValueError, r"key_cache and value_cache must have one shape, got \(2, 2, 10, 64\) "
                       r"and \(2, 2, 12, 64\)", value_cache=torch.randn(2, 2, 12, 64))
    raises(ValueError, r"key_cache and value_cache must have one shape",
           value_cache=torch.randn(2, 1, 10, 64))
    raises(TypeError, r"seq_lens must be int32 or int64 \[2\], got torch.float32",
           seq_lens=lens.float())
    raises(ValueError, r"seq_lens must be int32 or int64 \[2\], got torch.int32 \(3,\)",
           seq_lens=torch.tensor([1, 2, 3], dtype=torch.int32))
    raises(ValueError, r"seq_lens must be int32 or int64 \[2\], got torch.int32 \(2, 1\)",
           seq_lens=lens[:, None])
    raises(ValueError, r"seq_lens must be int32 or int64 \[2\], got torch.int16",
           seq_lens=lens.short())
    raises(ValueError, "key_cache must be contiguous in head_size",
           key_cache=torch.randn(2, 2, 64, 10).transpose(2, 3))
    raises(ValueError, "value_cache must be contiguous in head_size",
           value_cache=torch.randn(2, 2, 10, 128)[..., ::2])
    # The dispatcher types scale (schema `float`) before the op's checks run...
    with pytest.raises(RuntimeError, match="'scale'"):
        call(scale="a")()
    with pytest.raises(RuntimeError, match="'scale'"):
        call(scale=None)()
    # ... which hold for direct callers of the check as well.
    from compile_ops.static_cache import _check
    for bad in ("a", None, True, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="scale must be a float"):
            _check(sentinel, q, kc, vc, lens, bad)
    # seq_lens on another device than query (meta: the only other device of a CPU machine)
    with pytest.raises(ValueError, match="seq_lens must be on device cpu"):
        call(seq_lens=torch.zeros(2, dtype=torch.int32, device="meta"))()
    assert len(outs) == 25
    for o in outs:  # nothing written on any error
        assert (o == 7).all()
    # Overlaps: checked on real tensors only (fake tensors have no addresses), so eager only.
    kv4 = torch.randn(2, 4, 10, 64)  # kv_heads = heads: [:, :, t] is an out-shaped view
    buf = torch.randn(2 * 4 * 64 + 1)
    before = kv4.clone(), buf.clone()
    with pytest.raises(ValueError, match="out and key_cache overlap in memory"):
        call(out=kv4[:, :, 0], key_cache=kv4, value_cache=kv4.clone())()
    with pytest.raises(ValueError, match="out and value_cache overlap in memory"):
        call(out=kv4[:, :, 3], key_cache=kv4.clone(), value_cache=kv4)()
    with pytest.raises(ValueError, match="out and query overlap in memory"):
        call(out=buf[1:].view(2, 4, 64), query=buf[:-1].view(2, 4, 64))()
    assert torch.equal(kv4, before[0]) and torch.equal(buf, before[1])


# ---------------------------------------------------------------------------------------------
# torch.compile (CPU)
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_cpu(gen):
    """Inductor, fullgraph: an out allocated in the graph, and an out that is a graph input
    (mutated in place), both as eager computes them."""
    q, kc, vc, lens = make(3, 8, 2, 40, 64, torch.float32, [5, 40, 0], gen)

    def alloc(q, kc, vc, lens):
        out = torch.empty_like(q)
        ops.static_cache_attention(out, q * 2, kc, vc, lens, 0.125)
        return out + 1

    def into(out, q, kc, vc, lens):
        ops.static_cache_attention(out, q, kc, vc, lens, 0.125)

    torch._dynamo.reset()
    try:
        got = torch.compile(alloc, backend="inductor", fullgraph=True)(q, kc, vc, lens)
        assert torch.equal(got, alloc(q, kc, vc, lens))
        out = torch.full_like(q, NAN)
        torch.compile(into, backend="inductor", fullgraph=True)(out, q, kc, vc, lens)
        assert torch.equal(out, run(q, kc, vc, lens, 0.125))
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# attn_mask and seq_starts (CPU): the reference against a masked float64 oracle, against SDPA as
# Hugging Face runs it, mask_bounds, masked_decode_attention, checks, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
NEG = float("-inf")


def clamped(lens, starts, b, L):
    """Sequence b's slot range (start, end) as the contract has it: seq_lens clamped into
    [0, L], seq_starts into [0, end] (0 without seq_starts)."""
    n = min(max(int(lens[b]), 0), L)
    s = 0 if starts is None else min(max(int(starts[b]), 0), n)
    return s, n


def poison_outside(kc, vc, lens, starts, value=NAN):
    """Fill every slot outside each sequence's (clamped) range [start, len) with `value`, in
    place: the op must never read them."""
    L = kc.shape[2]
    for b in range(kc.shape[0]):
        s, n = clamped(lens, starts, b, L)
        for c in (kc, vc):
            c[b, :, :s] = value
            c[b, :, n:] = value


def mask_row(mask, b, h):
    """The [max_cache_len] row of `mask` that query head h of sequence b sees, by SDPA's
    broadcast: `mask`'s dimensions right-aligned with [batch, heads, 1, max_cache_len], a
    dimension of size 1 repeated."""
    lead = (b, h, 0)[4 - mask.dim():]
    return mask[tuple(i if size > 1 else 0 for i, size in zip(lead, mask.shape[:-1]))]


def masked_oracle(q, kc, vc, lens, scale, mask=None, starts=None):
    """float64, one sequence and one query head at a time, keys and values read slot by slot over
    [start, len) only (repeat_kv's GQA); a bool mask leaves slots out, a float mask is added to
    the logits (-inf: left out). Returns (out, empty): empty[b, h] when nothing is attended
    (then out is 0)."""
    batch, heads, head = q.shape
    kv_heads, L = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, head, dtype=torch.float64)
    empty = torch.ones(batch, heads, dtype=torch.bool)
    for b in range(batch):
        s, n = clamped(lens, starts, b, L)
        if n == s:
            continue
        K = torch.stack([kc[b, :, t].double() for t in range(s, n)], 1)  # [kv_heads, n-s, d]
        V = torch.stack([vc[b, :, t].double() for t in range(s, n)], 1)
        for h in range(heads):
            kvh = h // group  # what repeat_kv spells out
            logits, vals = (K[kvh] @ q[b, h].double()) * scale, V[kvh]
            if mask is not None:
                row = mask_row(mask, b, h)[s:n]
                if row.dtype == torch.bool:
                    logits, vals = logits[row], vals[row]
                else:
                    logits = logits + row.double()
            live = logits != NEG
            logits, vals = logits[live], vals[live]
            if logits.numel():
                out[b, h] = torch.softmax(logits, 0) @ vals
                empty[b, h] = False
    return out, empty


def run_masked(q, kc, vc, lens, scale, mask=None, starts=None, out=None):
    out = torch.full_like(q, NAN) if out is None else out
    ops.static_cache_attention(out, q, kc, vc, lens, scale, mask, starts)
    return out


def additive(keep, mdtype, gen, fill=NEG):
    """bool -> float mask of dtype `mdtype`: finite random biases (N(0, 2)) where `keep`, `fill`
    elsewhere."""
    return torch.where(keep, torch.randn(keep.shape, generator=gen) * 2, fill).to(mdtype)


# Masks of every supported kind: bool / float32 / the query's dtype; shapes [B,1,1,L] (HF's),
# [1,1,1,L], [B,H,1,L] (per head), [H,1,L], [1,L], [L]; -inf and finfo.min fills; a slice of a
# wider tensor, an expanded one (stride 0), one every other element, a per-head mask stored
# [L, H, B]. Rows with nothing to attend: sequence 1 of "bool [B,1,1,L]", head 1 of sequence 0
# in "bool [B,H,1,L]", sequence 2 of "dtype [B,1,1,L]" (all -inf).
MASK_KINDS = ["bool [B,1,1,L]", "bool [1,1,1,L]", "bool [B,H,1,L]", "bool [L]", "float32 [1,L]",
              "dtype [B,1,1,L]", "float32 [H,1,L] finfo.min", "dtype [B,H,1,L] finfo.min",
              "bool slice of [B,1,1,L+9]", "float32 [B,H,1,L] stored [L,H,B]",
              "bool [1,1,1,L] expanded to [B,H,1,L]", "dtype [B,1,1,L] every other element",
              "none"]


def make_mask(kind, batch, heads, L, dtype, gen, lens):
    """The mask of `kind` (MASK_KINDS). finfo.min fills keep slot len - 1 of every sequence
    live (a row of finite minima only is not empty: SDPA averages it)."""
    if kind == "none":
        return None
    B, H = batch, heads
    mdtype = torch.float32 if kind.startswith("float32") else dtype
    rnd = torch.rand

    def last_live(keep, per_batch):
        for b in range(batch):
            n = min(max(int(lens[b]), 0), L)
            if n:
                keep[(b if per_batch else slice(None), ..., n - 1)] = True
        return keep

    if kind == "bool [B,1,1,L]":
        m = rnd(B, 1, 1, L, generator=gen) < 0.7
        m[1] = False
        return m
    if kind == "bool [1,1,1,L]":
        return rnd(1, 1, 1, L, generator=gen) < 0.6
    if kind == "bool [B,H,1,L]":
        m = rnd(B, H, 1, L, generator=gen) < 0.5
        m[0, 1] = False
        return m
    if kind == "bool [L]":
        return rnd(L, generator=gen) < 0.7
    if kind == "float32 [1,L]":
        return additive(rnd(1, L, generator=gen) < 0.8, mdtype, gen)
    if kind == "dtype [B,1,1,L]":
        keep = rnd(B, 1, 1, L, generator=gen) < 0.7
        keep[2] = False
        return additive(keep, mdtype, gen)
    if kind == "float32 [H,1,L] finfo.min":
        keep = last_live(rnd(H, 1, L, generator=gen) < 0.5, False)
        return torch.where(keep, 0.0, torch.finfo(mdtype).min).to(mdtype)
    if kind == "dtype [B,H,1,L] finfo.min":
        keep = last_live(rnd(B, H, 1, L, generator=gen) < 0.5, True)
        return additive(keep, mdtype, gen, torch.finfo(mdtype).min)
    if kind == "bool slice of [B,1,1,L+9]":
        return (rnd(B, 1, 1, L + 9, generator=gen) < 0.7)[..., 4:4 + L]
    if kind == "float32 [B,H,1,L] stored [L,H,B]":
        m = additive(rnd(L, H, B, generator=gen) < 0.7, mdtype, gen)
        return m.permute(2, 1, 0)[:, :, None]
    if kind == "bool [1,1,1,L] expanded to [B,H,1,L]":
        return (rnd(L, generator=gen) < 0.7)[None, None, None].expand(B, H, 1, L)
    if kind == "dtype [B,1,1,L] every other element":
        return additive(rnd(B, 1, 1, 2 * L, generator=gen) < 0.7, mdtype, gen)[..., ::2]
    raise AssertionError(kind)


# (heads, kv_heads, head, max_cache_len): GQA groups 1, 4, 8; head sizes 64, 80, 96 (Phi-3),
# 256 (Gemma)
MASK_SHAPES = [(8, 8, 64, 37), (8, 2, 80, 50), (16, 2, 96, 37), (8, 1, 256, 20)]


@pytest.mark.parametrize("heads,kv_heads,head,max_len", MASK_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_matches_oracle(dtype, heads, kv_heads, head, max_len, gen):
    """Every mask kind, each with seq_starts None or one of two sets of starts (in range,
    negative, past the length; int64, int32), in turn over the shapes; NaN in every slot outside
    [start, len); rows with nothing to attend (an empty range, all False, all -inf) exactly
    zero."""
    L = max_len
    lens = torch.tensor([L, L // 2 + 1, L + 7, 3, 0, L - 2], dtype=torch.int32)
    starts_sets = [None, torch.tensor([L // 3, -4, L // 2, 5, 0, 1], dtype=torch.int64),
                   torch.tensor([0, 2, L, 1, -1, L - 3], dtype=torch.int32)]
    q, kc0, vc0, _ = make(6, heads, kv_heads, L, head, dtype, [L] * 6, gen, fill=None)
    caches = []
    for starts in starts_sets:
        kc, vc = kc0.clone(), vc0.clone()
        poison_outside(kc, vc, lens, starts)
        caches.append((kc, vc))
    scale = 1.3 / math.sqrt(head)
    turn = MASK_SHAPES.index((heads, kv_heads, head, max_len))
    for i, kind in enumerate(MASK_KINDS):
        mask = make_mask(kind, 6, heads, L, dtype, gen, lens)
        starts, (kc, vc) = starts_sets[(i + turn) % 3], caches[(i + turn) % 3]
        msg = f"{kind}, seq_starts {None if starts is None else starts.tolist()}"
        out = run_masked(q, kc, vc, lens, scale, mask, starts)
        want, empty = masked_oracle(q, kc, vc, lens, scale, mask, starts)
        assert_close(out, want.to(dtype), msg=msg)
        assert (out[empty] == 0).all(), msg
        assert empty[4].all() and not empty[0].all(), msg  # seq_len 0; a full row
        if kind == "bool [B,1,1,L]":
            assert empty[1].all(), msg
        if kind == "dtype [B,1,1,L]":
            assert empty[2].all(), msg
        if kind == "bool [B,H,1,L]":
            assert empty[0, 1], msg


def test_mask_of_batch_size_heads_is_per_head(gen):
    """A 3-d mask [n, 1, L] right-aligns as [1, n, 1, L]: with batch == heads == n it is one row
    per head (not per sequence), as SDPA reads it."""
    q, kc, vc, lens = make(4, 4, 2, 30, 64, torch.float32, [30, 20, 9, 25], gen)
    m3 = torch.rand(4, 1, 30, generator=gen) < 0.6
    out = run_masked(q, kc, vc, lens, 0.125, m3)
    assert torch.equal(out, run_masked(q, kc, vc, lens, 0.125, m3[None]))
    assert_close(out, masked_oracle(q, kc, vc, lens, 0.125, m3[None])[0].float())
    per_seq = run_masked(q, kc, vc, lens, 0.125, m3[:, None])  # [B, 1, 1, L]: per sequence
    assert not torch.equal(out, per_seq)


def test_masked_slots_outside_the_range_are_never_read(gen):
    """With a mask (bool, or its 0 / -inf float twin) and seq_starts, whatever the slots
    outside [start, len) hold (NaN, inf, huge), the result is the same."""
    q, kc, vc, _ = make(3, 8, 2, 40, 64, torch.float16, [40] * 3, gen, fill=None)
    lens = torch.tensor([40, 17, 30], dtype=torch.int64)
    starts = torch.tensor([5, 0, 29], dtype=torch.int64)
    mask = torch.rand(3, 1, 1, 40, generator=gen) < 0.7
    mask[:, :, :, 29] = True
    want = run_masked(q, kc, vc, lens, 0.125, mask, starts)
    for value in (NAN, float("inf"), NEG, 6e4):
        k2, v2 = kc.clone(), vc.clone()
        poison_outside(k2, v2, lens, starts, value)
        assert torch.equal(run_masked(q, k2, v2, lens, 0.125, mask, starts), want), value
        float_mask = torch.where(mask, 0.0, NEG)
        assert torch.equal(run_masked(q, k2, v2, lens, 0.125, float_mask, starts), want), value
    # seq_starts only moves the range: with the mask False before each start, the same result
    # without seq_starts (finite slots there)
    cut = mask & (torch.arange(40) >= starts[:, None, None, None])
    assert_close(run_masked(q, kc, vc, lens, 0.125, cut),
                 run_masked(q, kc, vc, lens, 0.125, cut, starts))


def test_finite_minimum_row_is_not_empty(gen):
    """A row masked everywhere by a finite minimum (HF's finfo.min fill) is not empty: like
    SDPA, the softmax of equal (shifted) logits, not zeros; -inf everywhere gives zeros."""
    q, kc, vc, lens = make(2, 8, 2, 24, 64, torch.float32, [24, 24], gen)
    mask = torch.full((2, 1, 1, 24), torch.finfo(torch.float32).min)
    mask[0, ..., 3:9] = 0.0
    out = run_masked(q, kc, vc, lens, 0.125, mask)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], repeat_kv(kc, 4), repeat_kv(vc, 4),
                                          attn_mask=mask, scale=0.125)[:, :, 0]
    assert_close(out, sdpa)
    assert_close(out[1], vc[1].mean(1).repeat_interleave(4, 0))  # uniform weights
    mask[1] = NEG
    out = run_masked(q, kc, vc, lens, 0.125, mask)
    assert (out[1] == 0).all()


def test_masked_empty_shapes(gen):
    """Batch 0, max_cache_len 0 and zero heads with a mask and seq_starts: zeros."""
    for (b, h, kvh, L, d) in [(0, 8, 2, 30, 64), (3, 8, 2, 0, 64), (3, 0, 2, 30, 64)]:
        q, kc, vc, lens = make(b, h, kvh, L, d, torch.float32, [5] * b, gen)
        for mask in (torch.ones(b, 1, 1, L, dtype=torch.bool), torch.zeros(b, h, 1, L)):
            out = run_masked(q, kc, vc, lens, 0.125, mask, torch.zeros(b, dtype=torch.int32))
            assert out.shape == (b, h, d) and (out == 0).all()


# ---------------------------------------------------------------------------------------------
# What Hugging Face runs: repeat_kv + SDPA with the mask over the whole cache
# ---------------------------------------------------------------------------------------------
def sdpa_masked(q, kc, vc, mask, scale=None):
    """repeat_kv, then SDPA over the whole cache with `mask` (bool or float, as given)."""
    group = q.shape[1] // kc.shape[1]
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
    while m is not None and m.dim() < 4:  # SDPA broadcasts from 2 dimensions up
        m = m[None]
    return F.scaled_dot_product_attention(q[:, :, None], repeat_kv(kc, group),
                                          repeat_kv(vc, group), attn_mask=m,
                                          scale=scale)[:, :, 0]


def hf_decode_mask(scenario, L):
    """A batch of 4 at decode as Hugging Face masks it: bool [4, 1, 1, L], slot j live iff
    causal (j <= pos), not left padding (j >= pad) and in the sliding window (j > pos - W).
    Returns (mask, pos, pad, W) and the bounds a hand computes: (first live, pos + 1)."""
    if scenario == "left padding":
        pos, pad, W = [L - 5] * 4, [0, 3, L // 2, L - 5], None
    elif scenario == "sliding window":
        pos, pad, W = [L - 1, L // 2, 4, 20], [0] * 4, 12
    elif scenario == "window and padding":
        pos, pad, W = [L - 1, L // 2, 4, 20], [0, 5, 0, 10], 12
    else:
        raise AssertionError(scenario)
    j = torch.arange(L)
    rows = []
    for p, a in zip(pos, pad):
        live = (j <= p) & (j >= a)
        if W is not None:
            live &= j > p - W
        rows.append(live)
    first = [max(a, 0 if W is None else max(p - W + 1, 0)) for p, a in zip(pos, pad)]
    bounds = (torch.tensor(first, dtype=torch.int32),
              torch.tensor([p + 1 for p in pos], dtype=torch.int32))
    return torch.stack(rows)[:, None, None, :], bounds


@pytest.mark.parametrize("fill", ["bool", "-inf", "finfo.min"])
@pytest.mark.parametrize("scenario", ["left padding", "sliding window", "window and padding"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_matches_hf_sdpa(dtype, scenario, fill, gen):
    """The op with mask_bounds' range equals repeat_kv + SDPA with the same mask over the whole
    cache (the mask bool, or 0 / -inf, or 0 / finfo.min in the query dtype as HF's eager masks):
    against SDPA on float32-upcast inputs rounded once, and SDPA in the dtype, both at the
    dtype's tolerance. Slots outside the bounds hold NaN for the op (finite garbage for SDPA),
    except for finfo.min fills, whose bounds are the whole cache (finfo.min is live)."""
    for heads, kv_heads, head, L in [(16, 4, 128, 64), (8, 2, 80, 48)]:
        q, kc, vc, _ = make(4, heads, kv_heads, L, head, dtype, [L] * 4, gen, fill=None)
        keep, (first, end) = hf_decode_mask(scenario, L)
        mask = keep if fill == "bool" else \
            torch.where(keep, 0.0, NEG if fill == "-inf" else torch.finfo(dtype).min).to(dtype)
        starts, lens = mask_bounds(mask, 4, L)
        if fill == "finfo.min":
            assert starts.tolist() == [0] * 4 and lens.tolist() == [L] * 4
        else:
            assert torch.equal(starts, first) and torch.equal(lens, end)
        kp, vp = kc.clone(), vc.clone()
        poison_outside(kp, vp, lens, starts)
        scale = head ** -0.5
        out = run_masked(q, kp, vp, lens, scale, mask, starts)
        msg = f"{tuple(q.shape)} L {L}"
        exact = sdpa_masked(q.float(), kc.float(), vc.float(), mask, scale)
        assert_close(out, exact.to(dtype), msg=msg)
        assert_close(out, sdpa_masked(q, kc, vc, mask, scale), msg=msg)
        assert torch.equal(masked_decode_attention(q, kp, vp, mask, scale), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_decode_attention_matches_sdpa(dtype, gen):
    """masked_decode_attention against SDPA directly: no mask (every slot), a per-head bool
    mask (one head of a sequence masked everywhere: zeros, as SDPA gives here), a float mask
    in the query dtype with a 1-d shape, an expanded [1, 1, 1, L] one; default scale; bounds
    passed in give the very same result; a contiguous [batch, heads, head] out."""
    q, kc, vc, _ = make(3, 8, 2, 40, 96, dtype, [40] * 3, gen, fill=None)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # a strided query
    per_head = torch.rand(3, 8, 1, 40, generator=gen) < 0.3
    per_head[2, 5] = False
    masks = [None, per_head, additive(torch.rand(40, generator=gen) < 0.7, dtype, gen),
             (torch.rand(1, 1, 1, 40, generator=gen) < 0.5).expand(3, 8, 1, 40)]
    for mask in masks:
        got = masked_decode_attention(q, kc, vc, mask)
        assert got.shape == q.shape and got.is_contiguous()
        exact = sdpa_masked(q.float(), kc.float(), vc.float(), mask)
        assert_close(got, exact.to(dtype))
        assert_close(got, sdpa_masked(q, kc, vc, mask))
        if mask is not None:
            bounds = mask_bounds(mask, 3, 40)
            assert torch.equal(masked_decode_attention(q, kc, vc, mask, 0.1, bounds),
                               masked_decode_attention(q, kc, vc, mask, 0.1))
    assert (masked_decode_attention(q, kc, vc, per_head)[2, 5] == 0).all()


# ---------------------------------------------------------------------------------------------
# mask_bounds
# ---------------------------------------------------------------------------------------------
def bounds_of(mask, batch, L):
    starts, lens = mask_bounds(mask, batch, L)
    for t in (starts, lens):
        assert t.dtype == torch.int32 and t.shape == (batch,) and t.is_contiguous()
    return starts.tolist(), lens.tolist()


def test_mask_bounds_hand_checked():
    T, F_ = True, False
    # left padding (2 pads) at position 5 of 8; a window of 3 ending at 6; all False; all True
    m = torch.tensor([[F_, F_, T, T, T, T, F_, F_], [F_, F_, F_, F_, T, T, T, F_],
                      [F_] * 8, [T] * 8])[:, None, None]
    assert bounds_of(m, 4, 8) == ([2, 4, 0, 0], [6, 7, 0, 8])
    # holes inside the range do not cut it
    assert bounds_of(torch.tensor([F_, T, F_, F_, T, F_]), 1, 6) == ([1], [5])
    # float: -inf is dead, any finite value (finfo.min included) live; all -inf: (0, 0)
    for dt in DTYPES:
        lo = torch.finfo(dt).min
        f = torch.tensor([[NEG, NEG, 0.0, -1e9 if dt != torch.float16 else -6e4, lo, NEG],
                          [NEG] * 6, [lo] * 6, [NEG, 3.0, NEG, NEG, NEG, NEG]], dtype=dt)
        assert bounds_of(f[:, None, None], 4, 6) == ([2, 0, 0, 1], [5, 0, 6, 2]), dt
    # per head: the union over heads (sequence 0: head 0 {1}, head 1 {5, 6}; sequence 1:
    # head 0 nothing, head 1 {0}; sequence 2: nothing)
    ph = torch.zeros(3, 2, 1, 8, dtype=torch.bool)
    ph[0, 0, 0, 1] = ph[0, 1, 0, 5] = ph[0, 1, 0, 6] = ph[1, 1, 0, 0] = True
    assert bounds_of(ph, 3, 8) == ([1, 0, 0], [7, 1, 0])
    assert bounds_of(torch.where(ph, 0.5, NEG), 3, 8) == ([1, 0, 0], [7, 1, 0])
    # [H, 1, L] (no batch dimension): the union over heads, for every sequence
    assert bounds_of(ph[0], 5, 8) == ([1] * 5, [7] * 5)
    # batch 1 broadcast to the batch: [1, 1, 1, L], [1, L], [L], an expanded one
    row = torch.tensor([F_, F_, T, F_, T, F_, F_])
    for m in (row[None, None, None], row[None], row, row[None, None, None].expand(3, 4, 1, 7)):
        assert bounds_of(m, 3, 7) == ([2] * 3, [5] * 3), tuple(m.shape)
    # a strided mask: a slice of a wider row
    wide = torch.tensor([T, F_, F_, F_, T, T, F_, F_, T, T])  # [1::2]: F, F, T, F, T
    assert bounds_of(wide[1::2][None, None, None], 2, 5) == ([2, 2], [5, 5])


@pytest.mark.parametrize("mdtype", [torch.bool, torch.float32, torch.bfloat16])
def test_mask_bounds_matches_brute_force(mdtype, gen):
    """Random sparse masks of every shape against a loop over sequences, heads and slots."""
    B, H, L = 5, 4, 23
    for shape in [(B, 1, 1, L), (B, H, 1, L), (1, H, 1, L), (H, 1, L), (1, L), (L,),
                  (1, 1, 1, L)]:
        keep = torch.rand(shape, generator=gen) < 0.08
        mask = keep if mdtype == torch.bool else additive(keep, mdtype, gen)
        want_s, want_e = [], []
        for b in range(B):
            live = [j for h in range(H) for j in range(L) if bool(mask_row(keep, b, h)[j])]
            want_s.append(min(live) if live else 0)
            want_e.append(max(live) + 1 if live else 0)
        assert bounds_of(mask, B, L) == (want_s, want_e), shape


def test_mask_bounds_empty_cache(gen):
    """max_cache_len 0: (0, 0) for every sequence, and masked_decode_attention gives zeros, as
    the op does."""
    assert bounds_of(torch.ones(2, 1, 1, 0, dtype=torch.bool), 2, 0) == ([0, 0], [0, 0])
    q = torch.randn(2, 4, 64, generator=gen)
    kc = torch.zeros(2, 2, 0, 64)
    out = masked_decode_attention(q, kc, kc, torch.ones(2, 1, 1, 0, dtype=torch.bool))
    assert (out == 0).all()


# ---------------------------------------------------------------------------------------------
# attn_mask and seq_starts: checks, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_mask_errors_name_the_argument_and_write_nothing(gen):
    q, kc, vc, lens = make(2, 4, 2, 10, 64, torch.float32, [3, 10], gen, fill=None)
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    outs = []

    def call(attn_mask=None, seq_starts=None, bf16=False):
        out = torch.full_like(qb if bf16 else q, NAN)
        outs.append(out)
        args = (qb, kb, vb) if bf16 else (q, kc, vc)
        return lambda: ops.static_cache_attention(out, *args, lens, 0.125, attn_mask,
                                                  seq_starts)

    def raises(exc, fragment, **kw):
        assert_raises_eager_and_fake(call(**kw), exc, fragment)

    ok = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    raises(TypeError, r"attn_mask must be bool, float32 or torch.float32 \(the query's dtype\), "
                      r"got torch.int64", attn_mask=ok.long())
    raises(TypeError, r"attn_mask must be bool, float32 or torch.float32 .*got torch.uint8",
           attn_mask=ok.to(torch.uint8))
    raises(TypeError, r"attn_mask must be bool, float32 or torch.float32 .*got torch.float64",
           attn_mask=ok.double())
    raises(TypeError, r"attn_mask must be bool, float32 or torch.bfloat16 \(the query's "
                      r"dtype\), got torch.float16", attn_mask=ok.half(), bf16=True)
    shape = r"attn_mask must broadcast to \[batch, num_heads, 1, max_cache_len\] = " \
            r"\[2, 4, 1, 10\] with its last dimension max_cache_len = 10, got "
    for bad in [(2, 1, 1, 9), (2, 1, 1, 11), (9,), (2, 1, 2, 10), (1, 2, 1, 1, 10),
                (3, 1, 1, 10), (2, 3, 1, 10), (2, 10), (2, 1, 10), (3, 1, 10), (0, 1, 1, 10),
                (2, 4, 0, 10), ()]:
        raises(ValueError, shape + re.escape(str(list(bad))), attn_mask=torch.ones(bad))
    raises(TypeError, r"seq_starts must be int32 or int64 \[2\], got torch.float32",
           attn_mask=ok, seq_starts=torch.zeros(2))
    raises(ValueError, r"seq_starts must be int32 or int64 \[2\], got torch.int32 \(3,\)",
           seq_starts=torch.zeros(3, dtype=torch.int32))
    raises(ValueError, r"seq_starts must be int32 or int64 \[2\], got torch.int64 \(2, 1\)",
           seq_starts=torch.zeros(2, 1, dtype=torch.int64))
    raises(ValueError, r"seq_starts must be int32 or int64 \[2\], got torch.int16",
           seq_starts=torch.zeros(2, dtype=torch.int16))
    raises(ValueError, r"seq_starts must be int32 or int64 \[2\], got torch.int32 \(\)",
           seq_starts=torch.tensor(0, dtype=torch.int32))
    # on another device than query (meta: the only other device of a CPU machine); eager only
    with pytest.raises(ValueError, match="attn_mask must be on device cpu"):
        call(attn_mask=ok.to("meta"))()
    with pytest.raises(ValueError, match="seq_starts must be on device cpu"):
        call(seq_starts=torch.zeros(2, dtype=torch.int32, device="meta"))()
    # overlaps with out (real tensors only, so eager only)
    buf = torch.zeros(2 * 4 * 64 + 10)
    with pytest.raises(ValueError, match="out and attn_mask overlap in memory"):
        ops.static_cache_attention(buf[:512].view(2, 4, 64), q, kc, vc, lens, 0.125,
                                   buf[505:515])
    with pytest.raises(ValueError, match="out and seq_starts overlap in memory"):
        ops.static_cache_attention(buf[:512].view(2, 4, 64), q, kc, vc, lens, 0.125, None,
                                   buf.view(torch.int32)[510:512])
    assert (buf == 0).all()
    assert len(outs) == 24
    for o in outs:  # nothing written on any error
        assert torch.isnan(o).all()


def test_masked_opcheck(gen):
    """opcheck with a bool mask and int32 seq_starts, a per-head float mask in the query dtype
    with int64 seq_starts (NaN outside the range), an expanded float32 mask."""
    q, kc, vc, lens = make(3, 8, 2, 20, 64, torch.float32, [20, 3, 24], gen, fill=None)
    starts = torch.tensor([4, -1, 30], dtype=torch.int32)
    poison_outside(kc, vc, lens, starts)
    mask = torch.rand(3, 1, 1, 20, generator=gen) < 0.7
    torch.library.opcheck(ops.static_cache_attention.default,
                          (torch.empty_like(q), q, kc, vc, lens, 0.125, mask, starts))
    q, kc, vc, lens = make(2, 4, 4, 16, 80, torch.bfloat16, [16, 7], gen,
                           lens_dtype=torch.int64, fill=None)
    starts = torch.tensor([2, 0], dtype=torch.int64)
    poison_outside(kc, vc, lens, starts)
    mask = additive(torch.rand(2, 4, 1, 16, generator=gen) < 0.7, torch.bfloat16, gen)
    torch.library.opcheck(ops.static_cache_attention.default,
                          (torch.empty_like(q), q, kc, vc, lens, 0.1, mask, starts))
    mask = additive(torch.rand(16, generator=gen) < 0.7, torch.float32, gen)
    torch.library.opcheck(ops.static_cache_attention.default,
                          (torch.empty_like(q), q, kc, vc, lens, 0.1,
                           mask[None, None, None].expand(2, 4, 1, 16), None))


def test_masked_torch_compile_fullgraph_cpu(gen):
    """Inductor, fullgraph, one graph: the op with a float mask and seq_starts into an out that
    is a graph input, and mask_bounds + the op with a bool mask (masked_decode_attention, as the
    pass and the attention interface run it) into an out allocated in the graph: as eager
    computes them."""
    q, kc, vc, _ = make(3, 8, 2, 40, 64, torch.float32, [40] * 3, gen, fill=None)
    keep = hf_decode_mask("window and padding", 40)[0][:3]
    fmask = torch.where(keep, torch.randn(keep.shape, generator=gen), NEG)
    starts = torch.tensor([30, -2, 1], dtype=torch.int64)
    lens = torch.tensor([40, 21, 5], dtype=torch.int32)

    def f(out, q, kc, vc, lens, keep, fmask, starts):
        ops.static_cache_attention(out, q, kc, vc, lens, 0.125, fmask, starts)
        return masked_decode_attention(q * 2, kc, vc, keep, 0.125) + 1

    torch._dynamo.reset()
    try:
        out = torch.full_like(q, NAN)
        got = torch.compile(f, backend="inductor", fullgraph=True)(out, q, kc, vc, lens, keep,
                                                                   fmask, starts)
        eager = torch.full_like(q, NAN)
        assert torch.equal(got, f(eager, q, kc, vc, lens, keep, fmask, starts))
        assert torch.equal(out, eager)
        assert torch.equal(out, run_masked(q, kc, vc, lens, 0.125, fmask, starts))
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# The CUDA path's Triton kernels, interpreted on the CPU
# ---------------------------------------------------------------------------------------------
_INTERPRETED = r"""
import torch
from compile_ops import decode_attention as da
from compile_ops.static_cache import static_cache_attention_ref as ref
from compile_ops.testing import assert_close
from tests.ops.test_static_cache import make, poison

gen = torch.Generator().manual_seed(7)
seen = set()

def run(q, kc, vc, lens, split, out=None):
    batch, heads, head = q.shape
    kvh, L = kc.shape[1], kc.shape[2]
    p = None if split is None else da.plan(batch, heads, kvh, head, L, kc.element_size(), 132,
                                           split=split)
    out = torch.full_like(q, float("nan")) if out is None else out
    got = da.static_decode(out, q, kc, vc, lens, head ** -0.5, p)
    if split is not None:
        assert got is p
    assert_close(out, ref(q, kc, vc, lens, head ** -0.5),
                 msg=f"{q.dtype} {tuple(q.shape)} {tuple(kc.shape)} {lens.tolist()} {got}")
    seen.add(("direct" if got.direct else "merged", got.slices))
    return got

# fp16 and fp32 (the interpreter's bf16 dot is wrong); NaN in every slot past seq_len
for dtype in (torch.float16, torch.float32):
    for batch, heads, kvh, L, head, lens, ldt in [
            (4, 8, 8, 100, 64, [0, 1, 100, 1000], torch.int32),  # group 1; 0, 1, full, past
            (3, 8, 2, 70, 80, [37, -5, 70], torch.int64),        # group 4, head 80 (padded)
            (2, 16, 2, 45, 64, [45, 20], torch.int32),           # group 8
            (2, 128, 1, 40, 32, [33, 2 ** 31 - 1], torch.int32),  # two slices of 64; INT_MAX
            (2, 4, 2, 20, 64, [20, 3], torch.int64)]:            # one split even at split=32
        q, kc, vc, seq_lens = make(batch, heads, kvh, L, head, dtype, lens, gen, lens_dtype=ldt)
        for split in (32, 64, None):
            p = run(q, kc, vc, seq_lens, split)
            assert p.nsplit == -(-L // p.split)
    # int64 lengths beyond int32
    q, kc, vc, seq_lens = make(2, 8, 2, 70, 64, dtype, [2 ** 40, 9], gen, lens_dtype=torch.int64)
    run(q, kc, vc, seq_lens, 32)
    print("ok", dtype)
assert seen >= {("direct", 1), ("merged", 1), ("direct", 2), ("merged", 2)}, seen

# strided query, out and caches: one split and merged
batch, heads, kvh, L, head = 3, 8, 2, 100, 64
for dtype in (torch.float16, torch.float32):
    q, kc, vc, lens = make(batch, heads, kvh, L, head, dtype, [7, 1000, 64], gen)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)       # strides (head, batch*head, 1)
    q_2 = torch.zeros(batch, heads, 2 * head, dtype=dtype)[..., ::2]  # head stride 2
    q_2.copy_(q)
    big = torch.full((batch, kvh, L + 30, head), float("nan"), dtype=dtype)
    kc_s = big[:, :, :L]
    kc_s.copy_(kc)                                             # a slice of a longer cache
    vc_n = torch.empty(batch, L, kvh, head, dtype=dtype).transpose(1, 2)  # NHD storage
    vc_n.copy_(vc)
    vc_p = torch.full((batch, kvh, L, head + 1), float("nan"), dtype=dtype)[..., 1:]
    vc_p.copy_(vc)                                             # misaligned, padded head stride
    want = ref(q, kc, vc, lens, head ** -0.5)
    for split in (32, 128):
        wide = torch.full((batch, heads, head + 16), float("nan"), dtype=dtype)
        run(q_t, kc_s, vc_n, lens, split, out=wide[..., 8:8 + head])
        assert torch.isnan(wide[..., :8]).all() and torch.isnan(wide[..., 8 + head:]).all()
        every2 = torch.full((batch, heads, 2 * head), float("nan"), dtype=dtype)
        run(q_2, kc, vc_p, lens, split, out=every2[..., ::2])
        assert_close(every2[..., ::2], want)
        assert torch.isnan(every2[..., 1::2]).all()
        out_t = torch.full((heads, batch, head), float("nan"), dtype=dtype).transpose(0, 1)
        run(q, kc_s, vc, lens, split, out=out_t)

# max_cache_len 0: zeros
q = torch.randn(2, 4, 64)
out = torch.full_like(q, float("nan"))
assert da.static_decode(out, q, torch.zeros(2, 2, 0, 64), torch.zeros(2, 2, 0, 64),
                        torch.tensor([3, 0]), 0.125) is None
assert (out == 0).all()
print("static interpreted ok")
"""


def test_triton_kernels_interpreted_on_cpu():
    """static_decode's Triton kernels (static_split_kernel, then the merge) run by Triton's
    interpreter on CPU tensors (a child process: TRITON_INTERPRET is read at import): one split
    and merged splits, GQA groups 1 / 4 / 8 / 128 (two slices), a padded head size, NaN past
    seq_len, seq_lens 0, negative, past the cache, INT_MAX (int32) and 2**40 (int64), strided
    query, out and caches."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "static interpreted ok" in proc.stdout


_INTERPRETED_MASKS = r"""
import time

import torch
from compile_ops import decode_attention as da
from compile_ops.static_cache import mask_bounds, static_cache_attention_ref as ref
from compile_ops.testing import assert_close
from tests.ops.test_static_cache import NAN, NEG, additive, make, poison_outside

t_start = time.time()
gen = torch.Generator().manual_seed(11)
seen = set()
launches = 0

def run(q, kc, vc, lens, split, mask=None, starts=None, msg=""):
    global launches
    batch, heads, head = q.shape
    kvh, L = kc.shape[1], kc.shape[2]
    p = None if split is None else da.plan(batch, heads, kvh, head, L, kc.element_size(), 132,
                                           split=split)
    out = torch.full_like(q, NAN)
    got = da.static_decode(out, q, kc, vc, lens, head ** -0.5, p, attn_mask=mask,
                           seq_starts=starts)
    launches += 1
    want = ref(q, kc, vc, lens, head ** -0.5, mask, starts)
    msg = f"{msg} {q.dtype} {tuple(q.shape)} L {L} {got}"
    assert_close(out, want, msg=msg)
    zero = (want == 0).all(-1)  # rows with nothing to attend
    assert (out[zero] == 0).all(), msg
    seen.add(("direct" if got.direct else "merged", split))
    return out, zero

def rnd(*shape):
    return torch.rand(shape, generator=gen)

# group 4, L 70: the default plan merges 2 splits of 64; group 1 with head 80 (padded), L 45:
# the default plan is one split (direct). float32 (the IEEE dots) on the second only: the masks
# are read the same way.
A, B_ = (3, 8, 2, 70, 64), (2, 4, 4, 45, 80)
for dtype, shapes in ((torch.float16, [A, B_]), (torch.float32, [B_])):
    for B, H, KVH, L, D in shapes:
        q, kc, vc, _ = make(B, H, KVH, L, D, dtype, [L] * B, gen, fill=None)
        lo = torch.finfo(dtype).min
        live = rnd(B, 1, 1, L) < 0.6
        live[1] = False                                     # sequence 1: nothing
        ph = rnd(B, H, 1, L) < 0.4
        ph[0, 3] = False                                    # head 3 of sequence 0: nothing
        keep = rnd(B, 1, 1, L) < 0.7
        keep[0] = False                                     # sequence 0: all -inf
        fin = rnd(B, H, 1, L) < 0.3
        fin[..., L // 2] = True
        masks = {
            "bool [B,1,1,L]": live,
            "float32 [B,1,1,L], sequence 0 all -inf": additive(keep, torch.float32, gen),
            "bool per head [B,H,1,L]": ph,
            "dtype per head [H,1,L]": additive(rnd(H, 1, L) < 0.5, dtype, gen),
            "bool [L]": rnd(L) < 0.5,
            "float32 slice of [B,1,1,L+9]": additive(rnd(B, 1, 1, L + 9) < 0.7, torch.float32,
                                                     gen)[..., 4:4 + L],
            "bool [1,1,1,L] expanded": (rnd(1, 1, 1, L) < 0.5).expand(B, H, 1, L),
            "float32 per head stored [L,H,B]": additive(rnd(L, H, B) < 0.5, torch.float32,
                                                        gen).permute(2, 1, 0)[:, :, None],
            "dtype per head, finfo.min fill": additive(fin, dtype, gen, lo),
        }
        for i, (name, mask) in enumerate(masks.items()):
            split = (32, 64, None)[i % 3]
            # the bounds mask_bounds gives, NaN outside them
            starts, lens = mask_bounds(mask, B, L)
            kp, vp = kc.clone(), vc.clone()
            poison_outside(kp, vp, lens, starts)
            _, zero = run(q, kp, vp, lens, split, mask, starts, name)
            if name == "bool [B,1,1,L]":
                assert lens[1] == 0 and zero[1].all()
            if name.startswith("float32 [B,1,1,L]"):
                assert lens[0] == 0 and zero[0].all()
            if name == "bool per head [B,H,1,L]":
                assert zero[0, 3] and not zero[0].all()
        # explicit ranges: starts in range, negative, past the length; the whole cache
        lens = torch.tensor([L, L // 2, L + 100][:B], dtype=torch.int64)
        starts = torch.tensor([L // 3, -7, L][:B], dtype=torch.int32)
        kp, vp = kc.clone(), vc.clone()
        poison_outside(kp, vp, lens, starts)
        run(q, kp, vp, lens, 32, masks["dtype per head [H,1,L]"], starts, "explicit starts")
        run(q, kp, vp, lens, None, None, starts, "seq_starts without a mask")
        full = torch.full((B,), L, dtype=torch.int32)
        run(q, kc, vc, full, 64, masks["bool per head [B,H,1,L]"], None, "whole cache")
    print("ok", dtype, round(time.time() - t_start, 1))
assert seen >= {("direct", 64), ("direct", None), ("merged", 32), ("merged", 64),
                ("merged", None)}, seen

# group 128 (two slices of 64 heads) with a per-head mask
q, kc, vc, _ = make(2, 128, 1, 40, 32, torch.float16, [40] * 2, gen, fill=None)
mask = rnd(2, 128, 1, 40) < 0.3
mask[1, 100] = False
starts, lens = mask_bounds(mask, 2, 40)
poison_outside(kc, vc, lens, starts)
_, zero = run(q, kc, vc, lens, None, mask, starts, "group 128")
assert zero[1, 100] and zero.sum() == 1
print("static masked interpreted ok", launches, round(time.time() - t_start, 1))
"""


@pytest.mark.parametrize("merge", ["fused", "kernel"])
def test_triton_masked_kernels_interpreted_on_cpu(merge):
    """static_decode with attn_mask and seq_starts, its Triton kernels interpreted on the CPU (a
    child process): bool masks and float ones (float32, the query's dtype, -inf and finfo.min
    fills), per-head masks ([B,H,1,L], [H,1,L], stored [L,H,B]), a 1-d mask, a slice of a
    wider mask, an expanded one (stride 0); the bounds mask_bounds gives, explicit seq_starts
    (negative, past the length) with and without a mask, a mask over the whole cache; forced
    splits of 32 and 64 and the default plan (merged and direct); GQA groups 1, 4 and 128 (two
    slices), head 80 (padded); rows with nothing to attend (an empty range, all False, all
    -inf, one head of a group) zeros; NaN in every slot outside the range. float16 and float32
    (the interpreter's bfloat16 dot is wrong). Split partials merged by the last split program
    (fused, the default up to 16 splits) and by the merge kernel (COMPILE_OPS_STATIC_MERGE)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, COMPILE_OPS_STATIC_MERGE=merge)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_MASKS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "static masked interpreted ok" in proc.stdout


_INTERPRETED_REGRESSIONS = r"""
import torch
from compile_ops import decode_attention as da
from compile_ops.static_cache import static_cache_attention_ref as ref
from tests.ops.test_static_cache import regression_inputs

for case in ("finfo.min row", "strided seq_lens and seq_starts"):
    q, kc, vc, lens, mask, starts = regression_inputs(case, "cpu")
    out = torch.full_like(q, float("nan"))
    da.static_decode(out, q, kc, vc, lens, 0.125, attn_mask=mask, seq_starts=starts)
    want = ref(q, kc, vc, lens, 0.125, mask, starts)
    err = float((out - want).abs().max())
    print(case, "ok" if err < 1e-5 else f"differs: {err:.3g}")
"""


def regression_inputs(case, device):
    """Inputs on which the Triton path and the reference disagree (fp32, batch 3, 8 / 2 heads
    of 64, 40 slots): (q, kc, vc, seq_lens, attn_mask, seq_starts)."""
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, lens = make(3, 8, 2, 40, 64, torch.float32, [40] * 3, gen)
    mask = starts = None
    if case == "finfo.min row":
        # sequence 1: every slot at float32's finite minimum (not -inf): SDPA's uniform
        # average, the reference's too
        mask = torch.full((3, 1, 1, 40), torch.finfo(torch.float32).min)
        mask[0, ..., 3:9] = 0.0
        mask[2, ..., 39] = 0.0
    elif case == "strided seq_lens and seq_starts":
        pairs = torch.tensor([[40, 5], [20, 9], [33, 1]], dtype=torch.int32, device=device)
        lens, starts = pairs[:, 0], pairs[:, 1]  # views of stride 2
    else:
        raise AssertionError(case)
    move = (lambda t: None if t is None else t.to(device))
    return move(q), move(kc), move(vc), move(lens), move(mask), move(starts)


KERNEL_REGRESSIONS = {  # found by these tests, fixed: what the kernel did wrong
    "finfo.min row": "static_split_kernel multiplies a float mask by log2(e): float32's (and "
                     "bfloat16's) finite minimum overflows to -inf, so a row masked everywhere "
                     "by it gives zeros, not SDPA's (and the reference's) average",
    "strided seq_lens and seq_starts": "static_decode hands seq_lens / seq_starts to the "
                                       "kernels without .contiguous(): they read element b "
                                       "at offset b",
}


def test_triton_kernels_interpreted_regressions():
    """Cases where the Triton path once disagreed with the reference (KERNEL_REGRESSIONS), in
    one child process (it prints which one differs)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_REGRESSIONS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in KERNEL_REGRESSIONS:
        assert f"{case} ok" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
def cuda_inputs(batch, heads, kv_heads, max_len, head, dtype, lens, *, seed=0,
                lens_dtype=torch.int32, fill=NAN):
    """make() on the GPU (random numbers drawn there: a Llama-sized cache at batch 32 is 268 MB),
    slots past seq_len set to `fill`."""
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    q = torch.randn(batch, heads, head, generator=g, device="cuda").to(dtype)
    kc = torch.randn(batch, kv_heads, max_len, head, generator=g, device="cuda").to(dtype)
    vc = torch.randn(batch, kv_heads, max_len, head, generator=g, device="cuda").to(dtype)
    lens = torch.tensor(lens, dtype=lens_dtype, device="cuda")
    if fill is not None:
        poison(kc, vc, lens, fill)
    return q, kc, vc, lens


def cpu_ref(q, kc, vc, lens, scale):
    """The CPU reference of CUDA inputs."""
    return static_cache_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), scale)


def around_half(batch, L):
    return [L // 2 + (37 * i) % 101 - 50 for i in range(batch)]


# Llama-3-8B (32 heads, 8 KV heads, head 128) at batch 1 / 8 / 32 and max_cache_len 512 / 4096
# (seq_lens around half), every dtype at least twice; then odd shapes: GQA groups 1 / 4 / 8 /
# 16 / 128, head sizes 32, 64, 80, 112 (padded), 256, empty / one-token / past-the-cache /
# negative / INT_MAX lengths, a cache of one slot.
CUDA_CASES = [
    (torch.bfloat16, 1, 32, 8, 512, 128, around_half(1, 512)),
    (torch.float16, 1, 32, 8, 4096, 128, around_half(1, 4096)),
    (torch.float32, 8, 32, 8, 512, 128, around_half(8, 512)),
    (torch.bfloat16, 8, 32, 8, 4096, 128, around_half(8, 4096)),
    (torch.float16, 32, 32, 8, 512, 128, around_half(32, 512)),
    (torch.bfloat16, 32, 32, 8, 4096, 128, around_half(32, 4096)),
    (torch.float32, 32, 32, 8, 4096, 128, around_half(32, 4096)),
    (torch.bfloat16, 4, 8, 8, 100, 64, [0, 1, 100, 1000]),
    (torch.float16, 3, 8, 2, 777, 80, [777, -5, 300]),
    (torch.float32, 3, 16, 1, 300, 112, [1, 299, 2 ** 31 - 1]),
    (torch.bfloat16, 2, 128, 1, 333, 32, [333, 40]),
    (torch.float16, 2, 16, 4, 1000, 256, [999, 17]),
    (torch.bfloat16, 3, 16, 2, 1, 128, [1, 0, 5]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,max_len,head,lens", CUDA_CASES)
def test_cuda_matches_reference(dtype, batch, heads, kv_heads, max_len, head, lens):
    q, kc, vc, seq_lens = cuda_inputs(batch, heads, kv_heads, max_len, head, dtype, lens)
    scale = head ** -0.5
    out = torch.full_like(q, NAN)
    ops.static_cache_attention(out, q, kc, vc, seq_lens, scale)
    assert out.is_cuda
    assert_close(out, cpu_ref(q, kc, vc, seq_lens, scale))
    # int64 lengths: the same kernels, the same result
    out64 = torch.full_like(q, NAN)
    ops.static_cache_attention(out64, q, kc, vc, seq_lens.long(), scale)
    assert torch.equal(out64, out)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [32, 64, 128, 256, 512, 1024, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_every_split(split, dtype):
    """static_decode with each split forced (2048: one split, the first kernel writes out)."""
    from compile_ops import decode_attention as da

    lens = [1, 511, 513, 1500, 0, -1, 5000]
    q, kc, vc, seq_lens = cuda_inputs(7, 32, 8, 1500, 128, dtype, lens, seed=1)
    p = da.plan(7, 32, 8, 128, 1500, kc.element_size(), 132, split=split)
    out = torch.full_like(q, NAN)
    assert da.static_decode(out, q, kc, vc, seq_lens, 128 ** -0.5, p) is p
    assert p.direct == (split >= 1500)
    assert_close(out, cpu_ref(q, kc, vc, seq_lens, 128 ** -0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_strided_views(dtype):
    """Query, out and caches in other layouts (each alone, then together): the same results; out
    written through its strides, nothing outside it."""
    batch, heads, kv_heads, L, head = 3, 32, 8, 600, 128
    gen = torch.Generator().manual_seed(3)
    lens = torch.tensor([5, L + 100, 0], dtype=torch.int64)
    scale = head ** -0.5
    qs = query_views(batch, heads, kv_heads, head, dtype, gen, "cuda")
    caches = cache_views(batch, kv_heads, L, head, dtype, gen, "cuda")
    outs = out_views(batch, heads, head, dtype, "cuda")
    combos = [(k, "contiguous", "contiguous") for k in qs] + \
        [("contiguous", k, "contiguous") for k in caches] + \
        [("contiguous", "contiguous", k) for k in outs] + \
        [("[h, b, d] transposed", "NHD storage", "slice of a wider row"),
         ("head stride 2", "slice of a longer cache", "head stride 2"),
         ("slice of a fused qkv", "misaligned base", "[h, b, d] transposed")]
    g_lens = lens.cuda()
    for qn, cn, on in combos:
        q, (kc, vc) = qs[qn], caches[cn]
        base, view = outs[on]
        base = base.clone()
        assert q.is_cuda and kc.is_cuda and vc.is_cuda and base.is_cuda
        ops.static_cache_attention(view(base), q, kc, vc, g_lens, scale)
        want = static_cache_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), lens, scale)
        check_out_view(base.cpu(), view, want, f"query {qn}, caches {cn}, out {on}")


@pytest.mark.cuda
def test_cuda_in_place_and_device_checks():
    q, kc, vc, lens = cuda_inputs(4, 32, 8, 300, 128, torch.bfloat16, [1, 150, 300, 0])
    want = cpu_ref(q, kc, vc, lens, 0.1)
    ops.static_cache_attention(q, q, kc, vc, lens, 0.1)  # out is the query
    assert_close(q, want)
    out = torch.full_like(q, 7.0)
    with pytest.raises(ValueError, match="seq_lens must be on device cuda"):
        ops.static_cache_attention(out, q, kc, vc, lens.cpu(), 0.1)
    with pytest.raises(ValueError, match="key_cache must be on device cuda"):
        ops.static_cache_attention(out, q, kc.cpu(), vc, lens, 0.1)
    with pytest.raises(ValueError, match="out must be on device cuda"):
        ops.static_cache_attention(out.cpu(), q, kc, vc, lens, 0.1)
    assert (out == 7).all()


@pytest.mark.cuda
@pytest.mark.parametrize("batch,max_len", [(1, 4096), (8, 512)])
def test_cuda_graph_replay_with_new_seq_lens(batch, max_len):
    """Captured once, replayed with seq_lens (and the query) changed in place: the plan depends
    only on shapes, the lengths are read on the device."""
    heads, kv_heads, head, dtype = 32, 8, 128, torch.bfloat16
    rounds = [around_half(batch, max_len), [max_len - 1 - 3 * i for i in range(batch)],
              [(0, 1, max_len + 9, 17)[i % 4] for i in range(batch)]]
    q, kc, vc, lens = cuda_inputs(batch, heads, kv_heads, max_len, head, dtype, rounds[0],
                                  fill=None)
    # NaN past the longest length any replay reads
    longest = torch.tensor(rounds, dtype=torch.int64).amax(0)
    poison(kc, vc, longest)
    scale = head ** -0.5
    out = torch.full_like(q, NAN)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles) outside the capture
        ops.static_cache_attention(out, q, kc, vc, lens, scale)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.static_cache_attention(out, q, kc, vc, lens, scale)
    gen = torch.Generator().manual_seed(4)
    for new in rounds + [rounds[0]]:
        lens.copy_(torch.tensor(new, dtype=lens.dtype))
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, cpu_ref(q, kc, vc, lens, scale), msg=f"seq_lens {new}")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_torch_compile(mode):
    """torch.compile(fullgraph=True) (and with CUDA graphs): the op in the graph, new seq_lens
    on each call, as the reference has them."""
    q, kc, vc, lens = cuda_inputs(8, 32, 8, 1024, 128, torch.bfloat16, around_half(8, 1024),
                                  fill=None)
    poison(kc, vc, torch.full((8,), 1024 - 200))

    def f(q, kc, vc, lens):
        out = torch.empty_like(q)
        ops.static_cache_attention(out, q * 2, kc, vc, lens, 0.0625)
        return out * 1

    torch._dynamo.reset()
    try:
        fn = torch.compile(f, fullgraph=True, mode=mode)
        for i in range(4):
            lens_i = torch.tensor(around_half(8, 1024), dtype=torch.int32, device="cuda") + \
                17 * i
            got = fn(q, kc, vc, lens_i)
            assert got.is_cuda
            assert_close(got, cpu_ref(q * 2, kc, vc, lens_i, 0.0625), msg=f"call {i}")
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# CUDA: attn_mask and seq_starts
# ---------------------------------------------------------------------------------------------
def cuda_masked_ref(q, kc, vc, lens, scale, mask=None, starts=None):
    """The CPU reference of CUDA inputs, with a mask and seq_starts."""
    def cpu(t):
        return None if t is None else t.cpu()

    return static_cache_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), scale, cpu(mask),
                                      cpu(starts))


def decode_mask(kind, batch, heads, L, dtype, seed=0):
    """A decode step's mask, built on the CPU: (mask or None, seq_starts, seq_lens) with the
    bounds mask_bounds gives for it (explicit ones for "explicit starts", no mask).
    left padding: every sequence at position L - 8, pads of up to L / 2 (the last sequence is
    all padding but its current token); sliding window: positions around L / 2, windows of
    L / 4; per head: windows of L / 8 .. L / 2 by head, with random holes; "1-d window": one
    [L] window for every sequence and head."""
    g = torch.Generator().manual_seed(seed)
    j = torch.arange(L)
    if kind == "explicit starts":
        lens = torch.tensor(around_half(batch, L), dtype=torch.int64)
        lens[0] = L + 9
        starts = lens - L // 4 + 10 * torch.arange(batch)
        starts[1], starts[-1] = -5, L + 3  # negative; past the length (nothing)
        return None, starts, lens
    if kind.startswith("left padding"):
        pos = torch.full((batch, 1), L - 8)
        pad = torch.tensor([(97 * b) % (L // 2) for b in range(batch)])[:, None]
        pad[-1] = L - 8
        keep = ((j <= pos) & (j >= pad))[:, None, None]
    elif kind.startswith("sliding window"):
        pos = torch.tensor(around_half(batch, L))[:, None]
        keep = ((j <= pos) & (j > pos - L // 4))[:, None, None]
    elif kind.startswith("per head"):
        pos = torch.tensor(around_half(batch, L))[:, None, None, None]
        win = (L // 8) * (1 + torch.arange(heads) % 4)[None, :, None, None]
        keep = (j <= pos) & (j > pos - win) & (torch.rand(batch, heads, 1, L, generator=g) < 0.9)
        keep[0, 1] = False  # one head of one sequence: nothing
    elif kind == "1-d window":
        keep = (j >= L // 3) & (j < L // 2)
    else:
        raise AssertionError(kind)
    if kind.endswith("bool") or kind in ("per head windows", "1-d window"):
        mask = keep
    elif kind.endswith("float32"):
        mask = torch.where(keep, 0.0, NEG)
    elif kind.endswith("finfo.min"):
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    else:  # "... dtype": random finite biases where kept, -inf elsewhere, the query's dtype
        mask = torch.where(keep, torch.randn(keep.shape, generator=g) * 2, NEG).to(dtype)
    starts, lens = mask_bounds(mask, batch, L)
    return mask, starts, lens


# Batch 32 x 4096 slots (Llama-3-8B's heads) with a left-padded and a sliding-window mask in
# every dtype; per-head masks; float masks (float32 -inf, the query's dtype with biases,
# finfo.min: bounds over the whole cache); head 256 (Gemma), head 96 (Phi-3), GQA group 128;
# explicit seq_starts without a mask.
CUDA_MASK_CASES = [
    (torch.bfloat16, 32, 32, 8, 4096, 128, "left padding bool"),
    (torch.float16, 32, 32, 8, 4096, 128, "left padding bool"),
    (torch.float32, 32, 32, 8, 4096, 128, "left padding bool"),
    (torch.bfloat16, 32, 32, 8, 4096, 128, "sliding window bool"),
    (torch.float16, 32, 32, 8, 4096, 128, "sliding window dtype"),
    (torch.float32, 32, 32, 8, 4096, 128, "sliding window bool"),
    (torch.bfloat16, 8, 32, 8, 4096, 128, "per head windows"),
    (torch.float16, 8, 32, 8, 512, 128, "left padding float32"),
    (torch.bfloat16, 8, 32, 8, 512, 128, "left padding finfo.min"),
    (torch.float16, 5, 32, 8, 4096, 128, "explicit starts"),
    (torch.bfloat16, 4, 8, 1, 1000, 256, "sliding window bool"),
    (torch.float16, 4, 16, 16, 1000, 256, "per head dtype"),
    (torch.float32, 2, 8, 4, 1000, 256, "1-d window"),
    (torch.bfloat16, 3, 32, 32, 777, 96, "left padding bool"),
    (torch.float16, 3, 32, 32, 777, 96, "sliding window dtype"),
    (torch.float32, 3, 32, 32, 777, 96, "explicit starts"),
    (torch.bfloat16, 2, 128, 1, 333, 32, "per head windows"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,max_len,head,kind", CUDA_MASK_CASES)
def test_cuda_masked_matches_reference(dtype, batch, heads, kv_heads, max_len, head, kind):
    """The op with a mask and its bounds (or explicit seq_starts) on the GPU against the CPU
    reference; NaN outside each sequence's range (finite everywhere for finfo.min, whose bounds
    are the whole cache); rows with nothing to attend exactly zero; masked_decode_attention
    gives the same."""
    q, kc, vc, _ = cuda_inputs(batch, heads, kv_heads, max_len, head, dtype, [max_len] * batch,
                               fill=None)
    mask, starts, lens = decode_mask(kind, batch, heads, max_len, dtype)
    if not kind.endswith("finfo.min"):
        poison_outside(kc, vc, lens, starts)
    mask = None if mask is None else mask.cuda()
    starts, lens = starts.cuda(), lens.cuda()
    scale = head ** -0.5
    out = torch.full_like(q, NAN)
    ops.static_cache_attention(out, q, kc, vc, lens, scale, mask, starts)
    assert out.is_cuda
    want = cuda_masked_ref(q, kc, vc, lens, scale, mask, starts)
    assert_close(out, want)
    zero = (want == 0).all(-1)  # rows with nothing to attend
    assert (out.cpu()[zero] == 0).all()
    if kind.startswith("per head"):
        assert zero[0, 1] and not zero[0].all()
    if kind == "explicit starts":
        assert zero[-1].all()
    if mask is not None:  # mask_ranges' dense claim: a code path of its own, not bit-equal
        assert_close(masked_decode_attention(q, kc, vc, mask, scale), want)


@pytest.mark.cuda
@pytest.mark.parametrize("bounds_in_graph", [False, True])
def test_cuda_graph_replay_with_new_masks(bounds_in_graph):
    """Captured once with a bool mask (and its bounds: tensors written before each replay, or
    mask_bounds captured in the graph), replayed with new masks written into the captured one:
    sliding windows moving, left padding, a sequence with nothing to attend. NaN outside each
    replay's ranges (the caches rewritten between replays)."""
    batch, heads, kv_heads, L, head, dtype = 8, 32, 8, 2048, 128, torch.bfloat16
    q, kc0, vc0, _ = cuda_inputs(batch, heads, kv_heads, L, head, dtype, [L] * batch,
                                 fill=None)
    kc, vc = kc0.clone(), vc0.clone()
    rounds = [decode_mask("sliding window bool", batch, heads, L, dtype)[0],
              decode_mask("left padding bool", batch, heads, L, dtype)[0]]
    j = torch.arange(L)
    moved = torch.tensor([[100 + 250 * b] for b in range(batch)])
    rounds.append(((j <= moved) & (j > moved - 300))[:, None, None])
    rounds[-1][3] = False  # sequence 3: nothing
    mask = rounds[0].cuda()
    starts, lens = mask_bounds(mask, batch, L)
    scale = head ** -0.5
    out = torch.full_like(q, NAN)

    def step():
        s, n = mask_bounds(mask, batch, L) if bounds_in_graph else (starts, lens)
        ops.static_cache_attention(out, q, kc, vc, n, scale, mask, s)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(6)
    for i, new in enumerate(rounds + [rounds[0]]):
        new_s, new_n = mask_bounds(new, batch, L)
        mask.copy_(new)
        if not bounds_in_graph:
            starts.copy_(new_s)
            lens.copy_(new_n)
        kc.copy_(kc0)
        vc.copy_(vc0)
        poison_outside(kc, vc, new_n, new_s)
        q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        want = cuda_masked_ref(q, kc, vc, new_n, scale, new, new_s)
        assert_close(out, want, msg=f"round {i}")
        if i == 2:
            assert (out[3] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_masked_torch_compile(mode):
    """torch.compile(fullgraph=True) (and with CUDA graphs) of masked_decode_attention: a new
    sliding-window mask on each call, as the reference has it; NaN outside the union of the
    calls' windows."""
    batch, L, W = 8, 1024, 256
    q, kc, vc, _ = cuda_inputs(batch, 32, 8, L, 128, torch.bfloat16, [L] * batch, fill=None)
    j = torch.arange(L)
    pos = [torch.tensor([[L // 2 + (37 * b) % 101 - 50 + 17 * i] for b in range(batch)])
           for i in range(4)]
    masks = [((j <= p) & (j > p - W))[:, None, None] for p in pos]
    first = mask_bounds(masks[0], batch, L)[0]
    last = mask_bounds(masks[-1], batch, L)[1]
    poison_outside(kc, vc, last, first)

    def f(q, kc, vc, mask):
        return masked_decode_attention(q * 2, kc, vc, mask, 0.0625) * 1

    torch._dynamo.reset()
    try:
        fn = torch.compile(f, fullgraph=True, mode=mode)
        for i, m in enumerate(masks):
            got = fn(q, kc, vc, m.cuda())
            assert got.is_cuda
            starts, lens = mask_bounds(m, batch, L)
            assert_close(got, cuda_masked_ref(q * 2, kc, vc, lens, 0.0625, m, starts),
                         msg=f"call {i}")
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(KERNEL_REGRESSIONS))
def test_cuda_regressions(case):
    """test_triton_kernels_interpreted_regressions' cases on the GPU, one by one."""
    q, kc, vc, lens, mask, starts = regression_inputs(case, "cuda")
    out = torch.full_like(q, NAN)
    ops.static_cache_attention(out, q, kc, vc, lens, 0.125, mask, starts)
    assert_close(out, cuda_masked_ref(q, kc, vc, lens, 0.125, mask, starts))


@pytest.mark.cuda
@pytest.mark.parametrize("merge", ["fused", "kernel"])
@pytest.mark.parametrize("batch,max_len,split", [(1, 4096, 256), (8, 512, 64), (3, 2048, 128)])
def test_cuda_merge_modes_repeated(merge, batch, max_len, split, monkeypatch):
    """Split partials merged by the last split program (its counters reset for the next call)
    or by the merge kernel: 40 calls in a row with new lengths, starts and masks each time (a
    counter left non-zero, or a partial read before it is written, shows as a wrong row), the
    plan forced to several splits."""
    from compile_ops import decode_attention as da
    from compile_ops.static_cache import mask_bounds

    monkeypatch.setenv("COMPILE_OPS_STATIC_MERGE", merge)
    heads, kv_heads, head = 32, 8, 128
    p = da.plan(batch, heads, kv_heads, head, max_len, 2, 132, split=split)
    assert p.nsplit > 1
    q, kc, vc, _ = cuda_inputs(batch, heads, kv_heads, max_len, head, torch.bfloat16,
                               [max_len] * batch, fill=None)
    g = torch.Generator(device="cuda").manual_seed(3)
    j = torch.arange(max_len, device="cuda")
    for i in range(40):
        pos = torch.randint(0, max_len, (batch,), device="cuda", generator=g)
        pad = torch.randint(0, max_len // 4 + 1, (batch,), device="cuda", generator=g)
        if i % 4 == 3:
            pos[0] = -1  # an empty row: zeros
        mask = ((j[None] <= pos[:, None]) & (j[None] >= pad[:, None]))[:, None, None]
        starts, lens = mask_bounds(mask, batch, max_len)
        out = torch.full_like(q, NAN)
        da.static_decode(out, q, kc, vc, lens, head ** -0.5, p, attn_mask=mask,
                         seq_starts=starts)
        assert_close(out, cuda_masked_ref(q, kc, vc, lens, head ** -0.5, mask, starts),
                     msg=f"call {i}")


# ---------------------------------------------------------------------------------------------
# mask_dense: sequences whose mask lets the whole range through are computed without reading it
# ---------------------------------------------------------------------------------------------
def test_mask_ranges_dense_hand_checked():
    """Dense: True (or a float 0) on every slot of the range, for every head; a hole, a bias or
    a finite fill inside the range, or a head that differs, is not."""
    from compile_ops.static_cache import mask_ranges

    L = 12
    j = torch.arange(L)
    causal = (j[None] <= torch.tensor([7, 9, 11, 5])[:, None])
    pad = j[None] >= torch.tensor([0, 2, 4, 0])[:, None]
    m = causal & pad
    m[3, 1] = False  # a hole in sequence 3
    starts, lens, dense = mask_ranges(m[:, None, None], 4, L)
    assert (starts.tolist(), lens.tolist(), dense.tolist()) == \
        ([0, 2, 4, 0], [8, 10, 12, 6], [True, True, True, False])
    assert dense.dtype == torch.bool and dense.shape == (4,)
    f = torch.where(m, 0.0, float("-inf"))[:, None, None]
    f[1, 0, 0, 5] = 0.5  # a bias inside sequence 1's range: read
    f[2, 0, 0, 0] = torch.finfo(torch.float32).min  # a finite fill: live, so read
    assert mask_ranges(f, 4, L)[2].tolist() == [True, False, False, False]
    heads = m[:, None, None].expand(4, 2, 1, L).clone()
    heads[0, 1, 0, 3] = False  # one head of sequence 0 differs
    assert mask_ranges(heads, 4, L)[2].tolist() == [False, True, True, False]
    one = m[:1, None, None]  # a batch-1 mask broadcast over 3 sequences
    assert mask_ranges(one, 3, L)[2].tolist() == [True, True, True]
    assert mask_ranges(torch.ones(2, 1, 1, 0, dtype=torch.bool), 2, 0)[2].tolist() == [True, True]


def test_mask_dense_skips_the_mask_in_the_reference_too(gen):
    """mask_dense True: the mask is not applied to that sequence (so the kernel, which does not
    read it, and the reference agree even for a false claim); with mask_ranges' own claim the
    result is the masked attention's."""
    from compile_ops.static_cache import mask_ranges

    q, kc, vc, _ = make(3, 8, 2, 40, 64, torch.float32, [40, 40, 40], gen, fill=None)
    j = torch.arange(40)
    m = ((j[None] <= torch.tensor([30, 20, 39])[:, None]) &
         (j[None] % 7 != torch.tensor([9, 3, 9])[:, None]))[:, None, None]  # hole in row 1
    starts, lens, dense = mask_ranges(m, 3, 40)
    assert dense.tolist() == [True, False, True]
    out = run_dense(q, kc, vc, lens, 0.125, m, starts, dense)
    assert_close(out, static_cache_attention_ref(q, kc, vc, torch.full((3,), 40), 0.125, m))
    lie = torch.ones(3, dtype=torch.bool)
    got = static_cache_attention_ref(q, kc, vc, lens, 0.125, m, starts, lie)
    assert_close(got[1], static_cache_attention_ref(q, kc, vc, lens, 0.125, None, starts)[1])


def run_dense(q, kc, vc, lens, scale, mask, starts, dense):
    out = torch.full_like(q, NAN)
    ops.static_cache_attention(out, q, kc, vc, lens, scale, mask, starts, dense)
    return out


@pytest.mark.parametrize("bad,exc,fragment", [
    (torch.ones(3, dtype=torch.int32), TypeError, r"mask_dense must be bool \[3\]"),
    (torch.ones(2, dtype=torch.bool), ValueError, r"mask_dense must be bool \[3\]"),
    (torch.ones(3, 1, dtype=torch.bool), ValueError, r"mask_dense must be bool \[3\]"),
])
def test_mask_dense_errors(bad, exc, fragment, gen):
    q, kc, vc, lens = make(3, 8, 2, 16, 32, torch.float32, [5, 6, 7], gen)
    m = torch.ones(3, 1, 1, 16, dtype=torch.bool)
    out = torch.full_like(q, NAN)
    assert_raises_eager_and_fake(
        lambda: ops.static_cache_attention(out, q, kc, vc, lens, 0.1, m, None, bad), exc,
        fragment)
    assert torch.isnan(out).all()


def test_mask_dense_opcheck(gen):
    from compile_ops.static_cache import mask_ranges

    q, kc, vc, _ = make(2, 8, 2, 24, 32, torch.float32, [24, 24], gen, fill=None)
    m = (torch.arange(24)[None] <= torch.tensor([10, 20])[:, None])[:, None, None]
    starts, lens, dense = mask_ranges(m, 2, 24)
    torch.library.opcheck(torch.ops.compile_ops.static_cache_attention.default,
                          (torch.empty_like(q), q, kc, vc, lens, 0.2, m, starts, dense))


_INTERPRETED_HEAD_INF = r"""
import torch
from compile_ops import decode_attention as da
from compile_ops.static_cache import static_cache_attention_ref as ref, mask_ranges
from compile_ops.testing import assert_close

g = torch.Generator().manual_seed(11)
for dtype in (torch.float16, torch.float32):
    B, H, Hkv, L, D = 2, 8, 8, 70, 64
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    m = torch.where(torch.rand(B, H, 1, L, generator=g) > 0.3, torch.randn(B, H, 1, L,
                    generator=g), float("-inf")).to(dtype)
    m[0, 1] = float("-inf")  # a head masked everywhere inside the others' range: zeros
    s, l, dn = mask_ranges(m, B, L)
    for split in (32, None):
        p = None if split is None else da.plan(B, H, Hkv, D, L, kc.element_size(), 132,
                                               split=split)
        out = torch.full_like(q, float("nan"))
        da.static_decode(out, q, kc, vc, l, D ** -0.5, p, attn_mask=m, seq_starts=s,
                         mask_dense=dn)
        want = ref(q, kc, vc, l, D ** -0.5, m, s, dn)
        assert (want[0, 1] == 0).all()
        assert_close(out, want)
print("head inf interpreted ok")
"""


def test_triton_head_masked_everywhere_interpreted():
    """A float mask of -inf over one head's whole row while the other heads attend (found on the
    H100, session 10: the clamp of finite minimums turned -inf into -1e38, so that head averaged
    V instead of giving zeros)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_HEAD_INF], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "head inf interpreted ok" in proc.stdout


_INTERPRETED_DENSE = r"""
import torch
from compile_ops import decode_attention as da
from compile_ops.static_cache import static_cache_attention_ref as ref, mask_ranges
from compile_ops.testing import assert_close

g = torch.Generator().manual_seed(5)
for dtype in (torch.float16, torch.float32):
    B, H, Hkv, L, D = 4, 8, 2, 130, 64
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    j = torch.arange(L)
    m = (j[None] <= torch.tensor([100, 50, 129, 7])[:, None]) & \
        (j[None] >= torch.tensor([3, 0, 20, 0])[:, None])
    m[3, 2] = False  # a hole: read
    m = m[:, None, None]
    s, l, dn = mask_ranges(m, B, L)
    assert dn.tolist() == [True, True, True, False], dn
    for split in (32, None):
        p = None if split is None else da.plan(B, H, Hkv, D, L, kc.element_size(), 132,
                                               split=split)
        for dense in (dn, torch.ones(B, dtype=torch.bool)):  # the true claim, then a false one
            out = torch.full_like(q, float("nan"))
            da.static_decode(out, q, kc, vc, l, D ** -0.5, p, attn_mask=m, seq_starts=s,
                             mask_dense=dense)
            assert_close(out, ref(q, kc, vc, l, D ** -0.5, m, s, dense))
        assert_close(out[:3], ref(q, kc, vc, torch.full((B,), L), D ** -0.5, m)[:3])
print("dense interpreted ok")
"""


def test_triton_mask_dense_interpreted_on_cpu():
    """The kernel's dense branch (mask not read) and masked branch per sequence, interpreted."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_DENSE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dense interpreted ok" in proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_mask_dense(dtype):
    """Left-padded causal masks (dense within their ranges) and one with holes, on the GPU, with
    mask_ranges' claim: equal to the reference over the whole cache."""
    from compile_ops.static_cache import mask_ranges

    B, L = 8, 2048
    q, kc, vc, _ = cuda_inputs(B, 32, 8, L, 128, dtype, [L] * B, fill=None)
    j = torch.arange(L, device="cuda")
    pos = torch.tensor([2047, 1000, 5, 1500, 700, 2000, 64, 1024], device="cuda")
    pad = torch.tensor([0, 17, 0, 300, 0, 1, 0, 9], device="cuda")
    m = (j[None] <= pos[:, None]) & (j[None] >= pad[:, None])
    m[3, 400:420] = False  # holes: read
    m = m[:, None, None]
    starts, lens, dense = mask_ranges(m, B, L)
    assert dense.tolist() == [True, True, True, False, True, True, True, True]
    out = run_dense(q, kc, vc, lens, 128 ** -0.5, m, starts, dense)
    assert_close(out, cuda_masked_ref(q, kc, vc, torch.full((B,), L, device="cuda"),
                                      128 ** -0.5, m))
