"""static_cache_attention (issue 16): decode attention over a static [batch, kv_heads,
max_cache_len, head] cache. The CPU reference against a float64 oracle written here (loops over
sequences and heads, slots read one by one, repeat_kv's GQA) and against Hugging Face's repeat_kv
+ SDPA with a float mask; strided views, opcheck, the checks (nothing written on error),
torch.compile; the CUDA path's Triton kernels interpreted on the CPU (TRITON_INTERPRET=1, a child
process) and on the GPU (CUDA graphs, torch.compile). Cache slots at or past seq_len hold NaN
wherever the comparison allows it: they must never be read."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from compile_ops.static_cache import static_cache_attention, static_cache_attention_ref
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
