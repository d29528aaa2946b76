"""Property-based tests (hypothesis, issue 15): shapes, strides, dtypes, padding slots and special
values drawn at random; each op's reference (the CPU kernel) against an oracle written here
independently, and on the GPU the CUDA kernel against the reference. A failing example that
hypothesis finds is kept below as a regular test.

Covered on the CPU: argmax, rms_norm / fused_add_rms_norm, reshape_and_cache, the gated
activations, rotary_embedding, reshape_and_cache_flash, cp_gather_cache,
gather_and_maybe_dequant_cache, convert_fp8, merge_attn_states and paged_attention_v1 (FP8
against an e4m3 / e5m2 codec written from the bit layout, itself checked against torch's).

Kept small (tens of examples per property, no deadline) so the CPU suite stays fast on 2 cores.
"""

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compile_ops.testing import assert_close
from tests.ops.test_sampling import oracle as argmax_oracle

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 3.0, float("inf"), float("-inf"), float("nan")]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# argmax: first index of the maximum, NaN the largest
# ---------------------------------------------------------------------------------------------
@st.composite
def logits(draw):
    rows = draw(st.integers(0, 5))
    n = draw(st.integers(1, 300))
    pad = draw(st.integers(0, 9))
    dtype = draw(st.sampled_from(DTYPES))
    # few distinct values: ties everywhere, sometimes infinities, NaNs and signed zeros
    pool = draw(st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=4))
    vals = draw(st.lists(st.sampled_from(pool), min_size=rows * n, max_size=rows * n))
    x = torch.tensor(vals, dtype=torch.float32).view(rows, n).to(dtype)
    if pad:  # rows of a wider tensor: a row stride other than n
        wide = torch.zeros(rows, n + pad, dtype=dtype)
        wide[:, pad:] = x
        x = wide[:, pad:]
    return x


@settings(max_examples=60, deadline=None)
@given(x=logits())
def test_argmax_reference_is_torchs_rule(x):
    assert torch.equal(ops.argmax(x), argmax_oracle(x))


@pytest.mark.cuda
@settings(max_examples=60, deadline=None)
@given(x=logits())
def test_cuda_argmax_matches_the_reference(x):
    assert torch.equal(ops.argmax(x.cuda()).cpu(), ops.argmax(x))


# ---------------------------------------------------------------------------------------------
# rms_norm / fused_add_rms_norm against a float64 formula
# ---------------------------------------------------------------------------------------------
@st.composite
def norm_case(draw):
    # rows over one or two leading dims, empty ones anywhere ([2, 0, hidden] included)
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    hidden = draw(st.integers(1, 200))
    pad = draw(st.sampled_from([0, 0, 3, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    weighted = draw(st.booleans())
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, hidden + pad, generator=g) * 4).to(dtype)[..., :hidden]
    r = (torch.randn(*lead, hidden + pad, generator=g) * 4).to(dtype)[..., :hidden]
    w = torch.randn(hidden, generator=g).to(dtype) if weighted else None
    return x, r, w, eps


def _norm64(z, w, eps, dtype):
    """float64 statistics, one rounding to the dtype before the weight (vLLM's order)."""
    z = z.double()
    y = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return y if w is None else (y.double() * w.double()).to(dtype)


@settings(max_examples=50, deadline=None)
@given(case=norm_case(), fused=st.booleans())
def test_rms_norm_family_against_float64(case, fused):
    x, r, w, eps = case
    if fused:
        xi, ri = x.clone(), r.clone()
        ops.fused_add_rms_norm(xi, ri, w, eps)
        z = x.double() + r.double()
        assert_close(xi, _norm64(z, w, eps, x.dtype))
        assert_close(ri, z.to(x.dtype))
    else:
        out = torch.empty_like(x)
        ops.rms_norm(out, x, w, eps)
        assert_close(out, _norm64(x, w, eps, x.dtype))


@pytest.mark.cuda
@settings(max_examples=50, deadline=None)
@given(case=norm_case(), fused=st.booleans())
def test_cuda_rms_norm_family_matches_the_reference(case, fused):
    x, r, w, eps = case
    wc = None if w is None else w.cuda()
    if fused:
        xi, ri, xc, rc = x.clone(), r.clone(), x.cuda(), r.cuda()
        ops.fused_add_rms_norm(xi, ri, w, eps)
        ops.fused_add_rms_norm(xc, rc, wc, eps)
        assert_close(xc.cpu(), xi)
        assert_close(rc.cpu(), ri)
    else:
        out, outc = torch.empty_like(x), torch.empty_like(x, device="cuda")
        ops.rms_norm(out, x, w, eps)
        ops.rms_norm(outc, x.cuda(), wc, eps)
        assert_close(outc.cpu(), out)


# ---------------------------------------------------------------------------------------------
# reshape_and_cache: exactly the slots named are written, with exactly the token's values
# ---------------------------------------------------------------------------------------------
@st.composite
def cache_case(draw):
    tokens = draw(st.integers(0, 40))
    heads = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    x = 16 // torch.empty(0, dtype=dtype).element_size()
    head_size = x * draw(st.integers(1, 6))
    block_size = draw(st.sampled_from([1, 8, 16, 32]))
    blocks = draw(st.integers(max(1, -(-tokens // block_size)), 6 + tokens // block_size))
    num_slots = blocks * block_size
    runs = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    if runs:  # a prefill: consecutive slots from a page boundary
        start = block_size * int(torch.randint(0, blocks - (tokens - 1) // block_size, (1,),
                                               generator=g)) if tokens else 0
        slots = torch.arange(start, start + tokens)
    else:
        slots = torch.randperm(num_slots, generator=g)[:tokens]
    pad = torch.rand(tokens, generator=g) < draw(st.sampled_from([0.0, 0.2]))
    slots = torch.where(pad, torch.full_like(slots, -1), slots)
    key = torch.randn(tokens, heads, head_size, generator=g).to(dtype)
    value = torch.randn(tokens, heads, head_size, generator=g).to(dtype)
    return key, value, slots, blocks, block_size, x


def _paged(blocks, heads, head_size, block_size, x, dtype, device="cpu"):
    return (torch.zeros(blocks, heads, head_size // x, block_size, x, dtype=dtype, device=device),
            torch.zeros(blocks, heads, head_size, block_size, dtype=dtype, device=device))


@settings(max_examples=50, deadline=None)
@given(case=cache_case())
def test_reshape_and_cache_writes_exactly_the_slots(case):
    key, value, slots, blocks, bs, x = case
    tokens, heads, hs = key.shape
    kc, vc = _paged(blocks, heads, hs, bs, x, key.dtype)
    one = torch.ones(1)
    ops.reshape_and_cache(key, value, kc, vc, slots, "auto", one, one)
    want_k, want_v = _paged(blocks, heads, hs, bs, x, key.dtype)
    for t, s in enumerate(slots.tolist()):  # the oracle: a loop over tokens
        if s < 0:
            continue
        b, o = divmod(s, bs)
        want_k[b, :, :, o, :] = key[t].view(heads, hs // x, x)
        want_v[b, :, :, o] = value[t]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.cuda
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cache_case(), staged=st.sampled_from(["0", "1", None]))
def test_cuda_reshape_and_cache_matches_the_reference(case, staged, monkeypatch_env):
    key, value, slots, blocks, bs, x = case
    monkeypatch_env(staged)
    tokens, heads, hs = key.shape
    kc, vc = _paged(blocks, heads, hs, bs, x, key.dtype)
    kg, vg = _paged(blocks, heads, hs, bs, x, key.dtype, "cuda")
    one = torch.ones(1)
    ops.reshape_and_cache(key, value, kc, vc, slots, "auto", one, one)
    ops.reshape_and_cache(key.cuda(), value.cuda(), kg, vg, slots.cuda(), "auto", one.cuda(),
                          one.cuda())
    assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)


@pytest.fixture
def monkeypatch_env(monkeypatch):
    """Set COMPILE_OPS_CACHE_STAGED per hypothesis example (None: the launcher's own choice);
    a function-scoped fixture shared by the examples of one test, so each example sets it."""
    def set_staged(value):
        if value is None:
            monkeypatch.delenv("COMPILE_OPS_CACHE_STAGED", raising=False)
        else:
            monkeypatch.setenv("COMPILE_OPS_CACHE_STAGED", value)
    return set_staged


# =============================================================================================
# The rest of the op table (CPU only): each reference against an oracle written here, in
# float64 or with plain loops. derandomize=True: CI draws the same examples on every run.
# =============================================================================================
PROPERTY = dict(deadline=None, derandomize=True)
seeds = st.integers(0, 2 ** 16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (same shape and strides): compare with torch.equal, NaN and -0
    included."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# ---------------------------------------------------------------------------------------------
# FP8 oracle: the codes' values from the bit layout, an encoder by nearest-value search
# ---------------------------------------------------------------------------------------------
FP8 = {"fp8": "e4m3", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
FP8_TORCH = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@functools.lru_cache(maxsize=None)
def _fp8_table(fmt):
    """(value of each of the 256 codes, the finite non-negative values in code order), float64.
    e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits, S.1111.111 is NaN, no infinities (max
    448). e5m2: 5 exponent bits (bias 15), 2 mantissa bits, exponent 31 is inf (mantissa 0) or
    NaN, as in IEEE (max 57344). Exponent 0: subnormal, m * 2**(1 - bias - mantissa bits)."""
    e_bits, m_bits = {"e4m3": (4, 3), "e5m2": (5, 2)}[fmt]
    bias, top = 2 ** (e_bits - 1) - 1, 2 ** e_bits - 1
    vals = []
    for code in range(256):
        e, m = (code >> m_bits) & top, code & (2 ** m_bits - 1)
        if e == top and fmt == "e5m2":
            v = math.inf if m == 0 else math.nan
        elif e == top and m == 2 ** m_bits - 1:
            v = math.nan
        elif e == 0:
            v = m * 2.0 ** (1 - bias - m_bits)
        else:
            v = (1 + m / 2 ** m_bits) * 2.0 ** (e - bias)
        vals.append(-v if code & 0x80 else v)
    table = torch.tensor(vals, dtype=torch.float64)
    finite = int(torch.isfinite(table[:128]).sum())  # the non-finite codes are the top ones
    return table, table[:finite]


def _fp8_decode(codes: torch.Tensor, fmt) -> torch.Tensor:
    return _fp8_table(fmt)[0][codes.long()]


def _fp8_encode(q: torch.Tensor, fmt) -> torch.Tensor:
    """uint8 codes of the values q: saturate to the largest finite value, then the nearest
    code, a tie to the even code (mantissa ending in 0); NaN gives a NaN code."""
    pos = _fp8_table(fmt)[1]
    a = q.double().abs().clamp(max=float(pos[-1])).nan_to_num(0.0).contiguous()
    hi = torch.searchsorted(pos, a).clamp(max=len(pos) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    code = torch.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    code = code | (torch.signbit(q).long() << 7)
    return torch.where(torch.isnan(q), 0x7F, code).to(torch.uint8)  # CUDA's NaN, sign dropped


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_oracle_agrees_with_torchs_float8(fmt):
    """The oracle itself: every code decodes to torch's value, and every float16 (saturated
    first) plus a spread of float32 values encodes to torch's code."""
    table = _fp8_table(fmt)[0]
    theirs = torch.arange(256, dtype=torch.uint8).view(FP8_TORCH[fmt]).double()
    torch.testing.assert_close(table, theirs, rtol=0, atol=0, equal_nan=True)
    big = float(_fp8_table(fmt)[1][-1])
    x = torch.cat((torch.arange(2 ** 16, dtype=torch.int32).to(torch.int16).view(
        torch.float16).float(), torch.randn(4096) * 2.0 ** torch.randint(-20, 12, (4096,))))
    x = x[~torch.isnan(x)]
    want = x.clamp(-big, big).to(FP8_TORCH[fmt]).view(torch.uint8)
    assert torch.equal(_fp8_encode(x, fmt), want)


# ---------------------------------------------------------------------------------------------
# Gated activations: float64 math with the documented roundings
# ---------------------------------------------------------------------------------------------
ACTS = ["silu_and_mul", "mul_and_silu", "gelu_and_mul", "gelu_tanh_and_mul", "fatrelu_and_mul",
        "swigluoai_and_mul"]


@st.composite
def act_case(draw, name):
    # () is a 1-D input; empty dims anywhere in the leading dims ([2, 0, 2 * d] included)
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    d = draw(st.integers(1, 70))  # odd d too
    pad, out_pad = draw(st.sampled_from([0, 0, 1, 8])), draw(st.sampled_from([0, 0, 3]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.5, 1.0, 4.0, 30.0]))
    g = torch.Generator().manual_seed(draw(seeds))
    # rows of a wider tensor: the leading dims collapse into one row stride other than 2 * d
    x = (torch.randn(*lead, 2 * d + pad, generator=g) * scale).to(dtype)[..., :2 * d]
    out = torch.full((*lead, d + out_pad), float("nan"), dtype=dtype)[..., :d]
    kw = {}
    if name == "fatrelu_and_mul":
        kw["threshold"] = draw(st.sampled_from([0.0, -1.0, 0.1, 0.5]))  # 0.1: not a float32
        # ties: x1 == the threshold (as the dtype rounds it) in about a quarter of the places
        tie = torch.rand(*lead, d, generator=g) < 0.25
        x[..., :d] = torch.where(tie, torch.tensor(kw["threshold"], dtype=dtype), x[..., :d])
    elif name == "swigluoai_and_mul":
        kw["alpha"] = draw(st.sampled_from([1.702, 0.5, 3.0]))
        kw["limit"] = draw(st.sampled_from([7.0, 0.75, 20.0]))
    return x, out, kw


def _act_bounds(name, x, threshold=0.0, alpha=1.702, limit=7.0):
    """[lo, hi]: every result the documented rounding allows, in float64.

    The op computes the activation in float32, within err of the exact one (float64 here), so
    its float32 activation lies in [act - err, act + err]; rounding and multiplying by a
    number are monotone, so rounding both ends to the dtype, multiplying by the other half
    (exact in float64: two values of at most 24 bits) and rounding again bounds what the op
    may return. err = 2**-20 (|act| + |x1|): torch's float32 silu, gelu and gelu_tanh are
    within 5.6 * 2**-24 (|act| + |x1|) of float64 (measured over 6e6 values; the |x1| term is
    gelu's 1 + erf cancelling for x1 << 0). swigluoai, rounded once from float32: err =
    2**-20 (1 + |alpha g|) |out| (float32(alpha) moves the sigmoid by |alpha g| 2**-24
    relative), plus 2**-125 |(up + 1) g| where the sigmoid underflows float32's normal range
    (2**-126: subnormal or flushed to zero). fatrelu: exact (err = 0)."""
    x64, dtype = x.double(), x.dtype

    def rnd(t):
        return t.to(dtype).double()

    def sig(t):
        return 1.0 / (1.0 + torch.exp(-t))

    if name == "swigluoai_and_mul":
        g = x64[..., 0::2].clamp(max=limit)
        u = x64[..., 1::2].clamp(min=-limit, max=limit)
        val = (u + 1.0) * g * sig(alpha * g)
        err = 2.0 ** -20 * (1.0 + (alpha * g).abs()) * val.abs() + \
            2.0 ** -125 * ((u + 1.0) * g).abs()  # sigmoid below float32's normal range
        return rnd(val - err), rnd(val + err)
    d = x.shape[-1] // 2
    a, b = x64[..., :d], x64[..., d:]
    if name == "mul_and_silu":
        a, b = b, a  # the activation is of the second half
    if name in ("silu_and_mul", "mul_and_silu"):
        act = a * sig(a)
    elif name == "gelu_and_mul":
        act = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    elif name == "gelu_tanh_and_mul":
        act = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))
    else:
        # vLLM's kernel takes the threshold as a C float: the comparison is in float32, so 0.1
        # means float32(0.1) (a float32 x1 == 0.1f is not above it, though above 0.1)
        t32 = float(torch.tensor(threshold, dtype=torch.float32))
        act = torch.where(a > t32, a, torch.zeros_like(a))
    err = 0.0 if name == "fatrelu_and_mul" else 2.0 ** -20 * (act.abs() + a.abs())
    p1, p2 = rnd(rnd(act - err) * b), rnd(rnd(act + err) * b)
    return torch.minimum(p1, p2), torch.maximum(p1, p2)


@pytest.mark.parametrize("name", ACTS)
@settings(max_examples=25, **PROPERTY)
@given(data=st.data())
def test_activations_against_float64(name, data):
    x, out, kw = data.draw(act_case(name))
    before = x.clone()
    getattr(ops, name)(out, x, *kw.values())
    lo, hi = _act_bounds(name, x, **kw)
    got = out.double()
    bad = ~((lo <= got) & (got <= hi))
    assert not bool(bad.any()), (f"{int(bad.sum())} outside the bounds, first: "
                                 f"{got[bad][0]} not in [{lo[bad][0]}, {hi[bad][0]}]")
    assert torch.equal(_bits(x), _bits(before))


def test_fatrelu_threshold_is_compared_as_a_float32():
    """The threshold is a C float in vLLM's kernel (and in ours): x1 = float32(0.1) is not above
    a threshold of 0.1, though 0.1f > 0.1 as doubles. The property draws this tie too, but
    rarely with a float32 input."""
    x = torch.tensor([[0.1, 0.2, 3.0, 5.0]])  # x1 = [0.1f, 0.2f]
    out = torch.empty(1, 2)
    ops.fatrelu_and_mul(out, x, 0.1)
    assert out.tolist() == [[0.0, float(torch.tensor(0.2) * 5.0)]]
    lo, hi = _act_bounds("fatrelu_and_mul", x, threshold=0.1)
    assert torch.equal(lo, out.double()) and torch.equal(hi, out.double())


# ---------------------------------------------------------------------------------------------
# rotary_embedding: complex multiplication in float64
# ---------------------------------------------------------------------------------------------
@st.composite
def rope_case(draw, batched):
    # positions [tokens] or [batch, seq]; seq = 0 too (q [2, 0, hs]: nothing to do)
    lead = (draw(st.integers(0, 3)), draw(st.integers(0, 4))) if batched else \
        (draw(st.integers(0, 12)),)
    hs = draw(st.sampled_from([2, 6, 16, 32, 40]))
    rot = 2 * draw(st.integers(1, hs // 2))  # rot <= hs: partial rotary too
    offset = draw(st.integers(0, hs - rot))  # rope_dim_offset
    inverse = draw(st.booleans())
    hq = draw(st.integers(1, 4))
    hk = draw(st.sampled_from([0, 1, hq]))  # 0: no key; 1: GQA
    dtype = draw(st.sampled_from(DTYPES))
    cache_dtype = draw(st.sampled_from([torch.float32, dtype]))
    heads_dim = draw(st.booleans())  # [..., H, hs] instead of [..., H * hs]
    # [..., H, hs] views of [..., H, hs + head_pad] buffers: heads at a stride > hs
    head_pad = draw(st.sampled_from([0, 0, 3, 8])) if heads_dim else 0
    # q and k as slices of one fused qkv tensor (with [tokens] or [batch, seq] positions), or
    # of separate wider tensors
    fused = draw(st.booleans())
    pos_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    max_pos = draw(st.integers(1, 64))
    bad = draw(st.sampled_from([None, None, None, "high", "negative"]))
    g = torch.Generator().manual_seed(draw(seeds))

    def wide(heads):  # token-strided when padded: a column slice of a wider tensor
        pad = draw(st.sampled_from([0, 5]))
        if heads_dim:
            return (torch.randn(*lead, heads + pad, hs + head_pad, generator=g) * 3).to(dtype)
        return (torch.randn(*lead, (heads + pad) * hs, generator=g) * 3).to(dtype)

    def heads(t, first, n):  # heads [first, first + n) of a buffer from wide()
        if heads_dim:
            return t[..., first:first + n, :hs]
        return t[..., first * hs:(first + n) * hs]

    if fused:
        bufs = [wide(hq + 2 * max(hk, 1))]
        views = lambda b: (heads(b[0], 0, hq), heads(b[0], hq, hk) if hk else None)  # noqa: E731
    else:
        bufs = [wide(hq)] + ([wide(hk)] if hk else [])
        views = lambda b: (heads(b[0], 0, hq), heads(b[1], 0, hk) if hk else None)  # noqa: E731
    q, k = views(bufs)
    # the elements the op may write: the rotary dims of the query and key heads
    marks = [torch.zeros(b.shape, dtype=torch.bool) for b in bufs]
    for m, n in zip(views(marks), (hq, hk)):
        if m is not None:
            (m if heads_dim else m.unflatten(-1, (n, hs)))[..., offset:offset + rot] = True
    positions = torch.randint(0, max_pos, lead, generator=g)
    if bad and positions.numel():
        i = int(torch.randint(0, positions.numel(), (1,), generator=g))
        positions.view(-1)[i] = max_pos + i if bad == "high" else -1 - i
    base = draw(st.sampled_from([10000.0, 10.0]))
    theta = torch.arange(max_pos, dtype=torch.float64)[:, None] / \
        base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    cache = torch.cat((theta.cos(), theta.sin()), dim=-1).to(cache_dtype)
    return q, k, positions.to(pos_dtype), hs, cache, offset, inverse, list(zip(bufs, marks))


def _rope64(x, positions, hs, cache, is_neox, offset=0, inverse=False):
    """x rotated: each pair (x, y) of the dims [offset, offset + rot) as the complex number
    x + iy times cos + i sin (cos - i sin with inverse); and the error bound of float32 math,
    2**-22 (|x| + |y|) (|cos| + |sin|): two products and a sum, each rounded (2**-24 relative),
    bound |x c| + |y s| <= (|x| + |y|) (|c| + |s|), doubled. Zero outside the rotary dims."""
    heads = math.prod(x.shape[positions.dim():]) // hs
    v = x.double().reshape(*positions.shape, heads, hs).clone()
    cs = cache.double()[positions.long()].unsqueeze(-2)  # [..., 1, rot]
    half = cache.shape[1] // 2
    w = torch.complex(cs[..., :half], -cs[..., half:] if inverse else cs[..., half:])
    r = v[..., offset:offset + 2 * half]
    if is_neox:
        re, im = r[..., :half], r[..., half:]
    else:
        re, im = r[..., 0::2], r[..., 1::2]
    z = torch.complex(re.clone(), im.clone()) * w
    err = torch.zeros_like(v)
    e = 2.0 ** -22 * (re.abs() + im.abs()) * (w.real.abs() + w.imag.abs())
    er = err[..., offset:offset + 2 * half]
    for part in ((er[..., :half], er[..., half:]) if is_neox else
                 (er[..., 0::2], er[..., 1::2])):
        part.copy_(e)
    re.copy_(z.real)
    im.copy_(z.imag)
    return v, err


@pytest.mark.parametrize("batched", [False, True], ids=["tokens", "batch-seq"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@settings(max_examples=25, **PROPERTY)
@given(data=st.data())
def test_rotary_embedding_against_complex_multiplication(batched, is_neox, data):
    q, k, positions, hs, cache, offset, inverse, owners = data.draw(rope_case(batched))
    before = [t.clone() for t, _ in owners]
    max_pos = cache.shape[0]
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= max_pos):
        with pytest.raises(IndexError, match="positions"):
            ops.rotary_embedding(positions, q, k, hs, cache, is_neox, offset, inverse)
        for (t, _), b in zip(owners, before):  # nothing written, q nor k
            assert torch.equal(_bits(t), _bits(b))
        return
    want_q = _rope64(q, positions, hs, cache, is_neox, offset, inverse)
    want_k = _rope64(k, positions, hs, cache, is_neox, offset, inverse) if k is not None else \
        (None, None)
    ops.rotary_embedding(positions, q, k, hs, cache, is_neox, offset, inverse)
    for got, (want, err) in ((q, want_q), (k, want_k)):
        if got is None:
            continue
        got = got.reshape(want.shape)
        # float32 math, one rounding to the dtype: the result lies between the roundings of
        # want -+ err (rounding is monotone); outside the rotary dims err is 0: the input
        lo, hi = (want - err).to(got.dtype), (want + err).to(got.dtype)
        assert bool(((lo <= got) & (got <= hi)).all())
        assert_close(got, want)  # and so within TOLERANCES
    # everything but the rotary dims of the query and key heads keeps its bits: the rest of the
    # heads, the heads' padding, the value heads and the columns past them
    for (t, may_write), b in zip(owners, before):
        assert torch.equal(_bits(t)[~may_write], _bits(b)[~may_write])


# Found by the property above: with [batch, seq] positions, q and k as column slices of one
# fused qkv tensor [batch, seq, (hq + 2 hk) * hs] (the module docstring: "a slice of a fused qkv
# tensor is fine") were refused as overlapping: check_no_partial_overlap's disjoint-columns test
# (_row_geometry) took dim 0 as the rows, so rows over two dims (batch and seq) counted as
# overlapping. Guards that such slices (and head slices of a padded qkv buffer) are accepted,
# and that slices sharing elements are still refused.
def test_rotary_fused_qkv_with_batched_positions():
    qkv = torch.randn(1, 2, 4)
    q, k = qkv[..., :2], qkv[..., 2:]
    want_q, want_k = q.clone(), k.clone()  # position 0: cos 1, sin 0, the identity
    ops.rotary_embedding(torch.zeros(1, 2, dtype=torch.int64), q, k, 2,
                         torch.tensor([[1.0, 0.0]]), True)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    padded = torch.randn(2, 3, 4, 2 + 1)  # [batch, seq, heads, head_size + pad]
    q, k = padded[..., :2, :2], padded[..., 2:3, :2]
    want = padded.clone()
    ops.rotary_embedding(torch.zeros(2, 3, dtype=torch.int64), q, k, 2,
                         torch.tensor([[1.0, 0.0]]), True)
    assert torch.equal(padded, want)
    qkv = torch.randn(1, 2, 6)
    with pytest.raises(ValueError, match="query and key overlap in memory"):
        ops.rotary_embedding(torch.zeros(1, 2, dtype=torch.int64), qkv[..., :4], qkv[..., 2:], 2,
                             torch.tensor([[1.0, 0.0]]), True)
    with pytest.raises(ValueError, match="query and key overlap in memory"):
        ops.rotary_embedding(torch.zeros(2, 3, dtype=torch.int64), padded[..., :2, :2],
                             padded[..., 1:3, 1:3], 2, torch.tensor([[1.0, 0.0]]), True)


# Found by the properties above (issue 25 fixed it): a tensor with no elements whose empty dim is
# not the outermost ([2, 0, 2 * d], contiguous) was refused by the row / token-dim checks. Its
# strides are contiguous (torch gives (2 * d, 2 * d, 1)), but the checks wanted stride(0) ==
# stride(1) * size(1) = 0. vLLM takes it (numel / d rows: none); so does torch's view(-1, 2 * d).
# Eager (the reference on the CPU, the kernels' launchers on CUDA) and the fake kernel alike.
@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("op", ["silu_and_mul", "rms_norm", "fused_add_rms_norm",
                                "rotary_embedding"])
@pytest.mark.parametrize("lead", [(0, 0), (2, 0), (0, 3)])
def test_empty_inner_leading_dim_is_accepted(op, lead, device, mode):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        x = torch.empty(*lead, 2, device=device)
        if op == "rotary_embedding":
            ops.rotary_embedding(torch.zeros(lead, dtype=torch.int64, device=device), x, x.clone(),
                                 2, torch.tensor([[1.0, 0.0]], device=device), True)
        elif op == "silu_and_mul":
            ops.silu_and_mul(torch.empty(*lead, 1, device=device), x)
        elif op == "rms_norm":
            ops.rms_norm(torch.empty_like(x), x, None, 1e-6)
        else:
            ops.fused_add_rms_norm(x, torch.empty_like(x), torch.ones(2, device=device), 1e-6)
        return x

    if mode == "fake":
        with FakeTensorMode():
            assert run().shape == (*lead, 2)
    else:
        assert run().shape == (*lead, 2)


# ---------------------------------------------------------------------------------------------
# reshape_and_cache_flash: NHD / HND / fused-KV caches, padding and bad slots, FP8 codes
# ---------------------------------------------------------------------------------------------
@st.composite
def flash_case(draw, fp8, layout):
    n = draw(st.integers(0, 24))  # slots
    extra = draw(st.integers(0, 3))  # key rows past the slots: never read
    heads = draw(st.integers(1, 3))
    dk = draw(st.sampled_from([1, 8, 13, 64]))
    dv = dk if layout == "KV" else draw(st.sampled_from([dk, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    kv = draw(st.sampled_from(["fp8", "fp8_e4m3", "fp8_e5m2"])) if fp8 else "auto"
    storage = dtype if kv == "auto" else draw(st.sampled_from([torch.uint8,
                                                                  FP8_TORCH[FP8[kv]]]))
    bs = draw(st.sampled_from([1, 4, 16]))
    nb = draw(st.integers(max(1, -(-n // bs)), 3 + n // bs))
    per_head = draw(st.booleans())
    pad = draw(st.sampled_from([0.0, 0.3]))
    bad = draw(st.sampled_from([False, False, False, True]))
    fused = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(seeds))
    tokens = n + extra
    width = heads * (dk + dv) + draw(st.sampled_from([0, 3]))
    qkv = (torch.randn(tokens, width, generator=g) * 4).to(dtype)
    if not fused:
        qkv = qkv[:, :heads * (dk + dv)].contiguous()
    key = qkv[:, :heads * dk].view(tokens, heads, dk)
    value = qkv[:, heads * dk:heads * (dk + dv)].view(tokens, heads, dv)
    slots = torch.randperm(nb * bs, generator=g)[:n]  # distinct: one writer per slot
    slots = torch.where(torch.rand(slots.shape, generator=g) < pad, -1, slots)
    if bad and n:
        slots[int(torch.randint(0, n, (1,), generator=g))] = nb * bs + int(
            torch.randint(0, 5, (1,), generator=g))

    def garbage(shape):  # any bit pattern, NaN included: cells not written keep it exactly
        es = torch.empty(0, dtype=storage).element_size()
        raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * es), dtype=torch.uint8,
                            generator=g)
        return raw.view(storage)

    if layout == "NHD":
        kc, vc = garbage((nb, bs, heads, dk)), garbage((nb, bs, heads, dv))
    elif layout == "HND":  # the permuted view of [nb, heads, bs, d]
        kc = garbage((nb, heads, bs, dk)).permute(0, 2, 1, 3)
        vc = garbage((nb, heads, bs, dv)).permute(0, 2, 1, 3)
    else:
        both = garbage((nb, 2, bs, heads, dk))
        kc, vc = both[:, 0], both[:, 1]
    shape = (heads,) if per_head else (1,)
    k_scale = torch.empty(shape).uniform_(0.02, 2.0, generator=g)
    v_scale = torch.empty(shape).uniform_(0.02, 2.0, generator=g)
    return key, value, kc, vc, slots, kv, k_scale, v_scale


@pytest.mark.parametrize("layout", ["NHD", "HND", "KV"])  # KV: the halves of [nb, 2, ...]
@pytest.mark.parametrize("fp8", [False, True], ids=["auto", "fp8"])
@settings(max_examples=15, **PROPERTY)
@given(data=st.data())
def test_reshape_and_cache_flash_writes_exactly_the_slots(fp8, layout, data):
    key, value, kc, vc, slots, kv, k_scale, v_scale = data.draw(flash_case(fp8, layout))
    want_k, want_v = _bits(kc).clone(), _bits(vc).clone()
    nb, bs = kc.shape[:2]
    call = functools.partial(ops.reshape_and_cache_flash, key, value, kc, vc, slots, kv,
                             k_scale, v_scale)
    if slots.numel() and int(slots.max()) >= nb * bs:
        with pytest.raises(IndexError, match="slot"):
            call()
        assert torch.equal(_bits(kc), want_k) and torch.equal(_bits(vc), want_v)
        return
    call()
    for t, s in enumerate(slots.tolist()):  # the oracle: a loop over the slots
        if s < 0:
            continue
        b, o = divmod(s, bs)
        for x, want, scale in ((key, want_k, k_scale), (value, want_v, v_scale)):
            if kv == "auto":
                want[b, o] = _bits(x[t])
            else:  # the documented float32 division, then the code
                want[b, o] = _fp8_encode(x[t].float() / scale[:, None], FP8[kv])
    assert torch.equal(_bits(kc), want_k) and torch.equal(_bits(vc), want_v)


# ---------------------------------------------------------------------------------------------
# cp_gather_cache / gather_and_maybe_dequant_cache against a loop over sequences and tokens
# ---------------------------------------------------------------------------------------------
@st.composite
def gather_case(draw, kv=None):
    batch = draw(st.integers(0, 4))
    unused = draw(st.integers(0, 2))  # sequences past the batch (cu_seq_lens, table rows)
    lens = draw(st.lists(st.integers(0, 20), min_size=batch + unused,
                         max_size=batch + unused))
    bs = draw(st.sampled_from([1, 4, 16]))
    entry = draw(st.sampled_from([(8,), (2, 5), (1, 3)]))  # MLA [D] or [heads, head_size]
    kv = kv or draw(st.sampled_from(["auto", "fp8"]))
    dtype = draw(st.sampled_from(DTYPES))
    src_dtype = dtype if kv == "auto" else draw(st.sampled_from(
        [torch.uint8, FP8_TORCH[FP8[kv]]]))
    starts = draw(st.sampled_from([None, 0, 7]))  # seq_starts: None or random offsets <= 7
    nb = draw(st.integers(1, 8))
    bad = draw(st.sampled_from([None, None, None, "block", "negative"]))
    g = torch.Generator().manual_seed(draw(seeds))
    seq_starts = None if starts is None else \
        torch.randint(0, starts + 1, (batch + unused,), generator=g, dtype=torch.int32)
    first = [0 if seq_starts is None else int(seq_starts[s]) for s in range(len(lens))]
    cols = max([-(-(f + n) // bs) for f, n in zip(first, lens)] + [0]) + draw(
        st.integers(0, 2))
    # any block, repeats allowed; columns past a sequence's end hold garbage (never read)
    table = torch.randint(0, nb, (batch + unused, cols), generator=g, dtype=torch.int32)
    for s, (f, n) in enumerate(zip(first, lens)):
        table[s, -(-(f + n) // bs):] = torch.randint(-3, nb + 9, (1,), generator=g).item()
    if bad and batch and sum(lens[:batch]):
        s = max(range(batch), key=lambda i: lens[i])
        p = first[s] + int(torch.randint(0, lens[s], (1,), generator=g))
        table[s, p // bs] = nb + 2 if bad == "block" else -1
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total = int(cu[batch])
    src = torch.randint(0, 256, (nb, bs, math.prod(entry) * torch.empty(
        0, dtype=src_dtype).element_size()), dtype=torch.uint8, generator=g)
    src = src.view(src_dtype).view(nb, bs, *entry)
    if kv == "auto":  # finite values: the rows not written are compared as bits anyway
        src = (torch.randn(nb, bs, *entry, generator=g) * 3).to(src_dtype)
    rows = total + draw(st.integers(0, 3))
    dst = (torch.randn(rows, *entry, generator=g) * 100).to(dtype)  # rows not written keep it
    scale = torch.empty(1).uniform_(0.01, 4.0, generator=g)
    return dict(src=src, dst=dst, table=table, cu=cu, batch=batch, seq_starts=seq_starts,
                kv=kv, scale=scale, first=first, g=g)


def _gather_oracle(c, tokens):
    """{dst row: (block, offset)} of the tokens to copy, or None if an index is out of range;
    ``tokens``: (row, sequence) pairs."""
    nb, bs = c["src"].shape[:2]
    rows = {}
    for t, s in tokens:
        p = t - int(c["cu"][s]) + c["first"][s]
        if not 0 <= p // bs < c["table"].shape[1]:
            return None
        blk = int(c["table"][s, p // bs])
        if not 0 <= blk < nb:
            return None
        rows[t] = (blk, p % bs)
    return rows


def _read(c, blk, off):
    """One entry as stored (auto) or its documented dequantization: float(code) * scale in
    float32 (exact products in float64, rounded once to float32), rounded to dst's dtype."""
    e = c["src"][blk, off]
    if c["kv"] == "auto":
        return e
    v = _fp8_decode(_codes(e), FP8[c["kv"]]) * float(c["scale"])
    return v.float().to(c["dst"].dtype)


def _check_gather(c, call, rows):
    before = c["dst"].clone()
    if rows is None:
        with pytest.raises(IndexError):
            call()
        assert torch.equal(_bits(c["dst"]), _bits(before))
        return
    call()
    want = before.clone()
    for t, (blk, off) in rows.items():
        want[t] = _read(c, blk, off)
    if c["kv"] == "auto":  # a bit copy
        assert torch.equal(_bits(c["dst"]), _bits(want))
    else:
        torch.testing.assert_close(c["dst"], want, rtol=0, atol=0, equal_nan=True)


@settings(max_examples=50, **PROPERTY)
@given(c=gather_case())
def test_cp_gather_cache_against_a_loop(c):
    if c["kv"] != "auto":  # cp_gather_cache copies bits: the codes into a uint8 dst
        c["dst"] = torch.randint(0, 256, c["dst"].shape, dtype=torch.uint8, generator=c["g"])
        c["kv"] = "auto"
        c["src"] = _codes(c["src"])
    tokens = [(int(c["cu"][s]) + i, s) for s in range(c["batch"])
              for i in range(int(c["cu"][s + 1] - c["cu"][s]))]
    call = functools.partial(ops.cp_gather_cache, c["src"], c["dst"], c["table"], c["cu"],
                             c["batch"], c["seq_starts"])
    _check_gather(c, call, _gather_oracle(c, tokens))


@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
@settings(max_examples=20, **PROPERTY)
@given(data=st.data())
def test_gather_and_maybe_dequant_cache_against_a_loop(kv, data):
    c = data.draw(gather_case(kv))
    cu, batch = c["cu"][:c["batch"] + 1], c["batch"]
    total = int(cu[-1])
    # token_to_seq: each packed row's sequence, then padding rows pointing at any sequence
    # (past its end: left untouched); num_tokens may stop short of the padding or the batch
    seq = [s for s in range(batch) for _ in range(int(cu[s + 1] - cu[s]))]
    seq += [data.draw(st.integers(0, max(batch - 1, 0))) for _ in range(c["dst"].shape[0]
                                                                         - total)]
    # num_tokens: all the rows, the packed ones, or a cut inside them
    num_tokens = data.draw(st.sampled_from([len(seq), total, total // 2])) if batch else 0
    bad_seq = num_tokens > total and data.draw(st.booleans())
    if bad_seq:  # a padding row read as a sequence past the batch: IndexError
        seq[num_tokens - 1] = batch + data.draw(st.integers(0, 3))
    call = functools.partial(ops.gather_and_maybe_dequant_cache, c["src"], c["dst"],
                             c["table"], cu, torch.tensor(seq, dtype=torch.int32), num_tokens,
                             c["kv"], c["scale"], c["seq_starts"])
    if bad_seq:
        _check_gather(c, call, None)
        return
    # the rows inside their sequence (t < cu_seq_lens[s + 1]); the others are left untouched
    tokens = [(t, seq[t]) for t in range(num_tokens) if t < int(cu[seq[t] + 1])]
    _check_gather(c, call, _gather_oracle(c, tokens))


# ---------------------------------------------------------------------------------------------
# convert_fp8: model dtype -> FP8 -> model dtype
# ---------------------------------------------------------------------------------------------
# Per format: (half an ulp relative to a normal value: 2**-(mantissa bits + 1), half the
# subnormal step: 2**-(bias + mantissa bits), the largest finite value)
FP8_ROUNDING = {"e4m3": (2.0 ** -4, 2.0 ** -10, 448.0), "e5m2": (2.0 ** -3, 2.0 ** -17, 57344.0)}
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@st.composite
def convert_case(draw, e5m2):
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 0]), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    kv = "fp8_e5m2" if e5m2 else draw(st.sampled_from(["fp8", "fp8_e4m3"]))
    storage = draw(st.sampled_from([torch.uint8, FP8_TORCH[FP8[kv]]]))
    # a float32 scale (the op divides in float32), either sign, 2**-6 .. 2**6
    scale = float(torch.tensor(draw(st.sampled_from([1.0, -1.0])) * 2.0 ** draw(
        st.floats(-6, 6)), dtype=torch.float32))
    mag = 2.0 ** draw(st.integers(-24, 10))  # subnormal codes up to saturation
    special = draw(st.sampled_from([0.0, 0.0, 0.2]))
    transpose = draw(st.booleans()) and len(shape) > 1
    g = torch.Generator().manual_seed(draw(seeds))
    x = torch.randn(shape, generator=g) * mag
    pick = torch.randint(0, 5, shape, generator=g)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])[pick]
    x = torch.where(torch.rand(shape, generator=g) < special, specials, x).to(dtype)
    if transpose:  # non-contiguous input and codes
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x, kv, storage, scale, transpose


@pytest.mark.parametrize("e5m2", [False, True], ids=["e4m3", "e5m2"])
@settings(max_examples=30, **PROPERTY)
@given(data=st.data())
def test_convert_fp8_round_trip(e5m2, data):
    x, kv, storage, scale, transpose = data.draw(convert_case(e5m2))
    fmt = FP8[kv]
    q = torch.empty(x.shape[::-1], dtype=storage).permute(*range(x.dim() - 1, -1, -1)) \
        if transpose else torch.empty(x.shape, dtype=storage)
    y = torch.empty_like(x)
    ops.convert_fp8(q, x, scale, kv)
    ops.convert_fp8(y, q, scale, kv)
    # the codes: float32 division, saturation, nearest even (NaN: any NaN code)
    x32 = x.float() / scale
    want = _fp8_encode(x32, fmt)
    got = _codes(q)
    nan = torch.isnan(x32)
    assert torch.equal(torch.isnan(_fp8_decode(got, fmt)), nan)
    assert torch.equal(got[~nan], want[~nan])
    # the round trip. Below saturation: |y - x| <= r |x| + s |scale| (the code's rounding:
    # r = half an ulp relative, s = half the subnormal step, both scaled back), + 2**-23 |x|
    # (the float32 quotient, then float32 product), then y's rounding to the dtype: u |y|
    # (u: the dtype's unit roundoff), |y| <= (1 + r) |x| + s |scale|; + 2**-25 for float16's
    # subnormals (step 2**-24).
    r, s, big = FP8_ROUNDING[fmt]
    u = UNIT_ROUNDOFF[x.dtype]
    ax, y64 = x.double().abs(), y.double()
    bound = (r + 2.0 ** -23) * ax + s * abs(scale)
    bound = bound + u * ((1 + r) * ax + s * abs(scale)) + 2.0 ** -25
    sat = x32.abs() >= big  # inf included
    ok = ~sat & ~nan
    assert bool(((y64 - x.double()).abs() <= bound)[ok].all())
    # saturated: exactly +-big * |scale| (float32 product, rounded to the dtype)
    top = (torch.tensor(big * abs(scale), dtype=torch.float32).to(x.dtype).double()
           * torch.where(torch.signbit(x.double()), -1.0, 1.0))
    assert torch.equal(y64[sat], top[sat])
    assert bool(torch.isnan(y[nan]).all())


# ---------------------------------------------------------------------------------------------
# merge_attn_states: float64 log-sum-exp, empty parts, prefill tokens without context
# ---------------------------------------------------------------------------------------------
@st.composite
def merge_case(draw, fp8):
    tokens, heads = draw(st.integers(0, 8)), draw(st.integers(1, 4))
    hs = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "strided", "heads-major"]))
    ctx = draw(st.one_of(st.none(), st.integers(0, tokens)))
    spread = draw(st.sampled_from([1.0, 10.0, 60.0]))  # LSE differences up to exp(-100s)
    inf_rate = draw(st.sampled_from([0.0, 0.3]))
    with_lse = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(seeds))

    def tensor(dt):
        if layout == "contiguous":
            return torch.empty(tokens, heads, hs, dtype=dt)
        if layout == "strided":  # token and head strides of a wider tensor
            return torch.empty(tokens, heads + 1, hs + 3, dtype=dt)[:, 1:, :hs]
        return torch.empty(heads, tokens, hs, dtype=dt).transpose(0, 1)

    def lse():
        v = torch.randn(heads, tokens, generator=g) * spread
        inf = torch.tensor([math.inf, -math.inf])[torch.randint(0, 2, v.shape, generator=g)]
        return torch.where(torch.rand(v.shape, generator=g) < inf_rate, inf, v)

    p_out, s_out = tensor(dtype), tensor(dtype)
    p_out.copy_(torch.randn(p_out.shape, generator=g) * 3)
    s_out.copy_(torch.randn(s_out.shape, generator=g) * 3)
    p_lse, s_lse = lse(), lse()
    if ctx is not None:  # tokens without context: their prefix is never read
        p_out[ctx:] = math.nan
        p_lse[:, ctx:] = math.nan
    out = tensor(torch.float8_e4m3fn if fp8 else dtype)
    out_scale = torch.empty(1).uniform_(0.05, 2.0, generator=g) if fp8 else None
    out_lse = torch.full((heads, tokens), 123.0) if with_lse else None
    return out, p_out, p_lse, s_out, s_lse, out_lse, ctx, out_scale


def _merge64(p_out, p_lse, s_out, s_lse, ctx):
    """A loop over (token, head): LSE = logaddexp of the parts (an infinite LSE is an empty
    part), weights exp(part - LSE); both empty: the prefix, LSE -inf; past ctx: the suffix."""
    tokens, heads, _ = p_out.shape
    out = torch.empty(p_out.shape, dtype=torch.float64)
    lse = torch.empty(heads, tokens, dtype=torch.float64)
    for t in range(tokens):
        for h in range(heads):
            pl, sl = float(p_lse[h, t]), float(s_lse[h, t])
            if ctx is not None and t >= ctx:
                out[t, h], lse[h, t] = s_out[t, h].double(), sl
                continue
            pl = -math.inf if math.isinf(pl) else pl
            sl = -math.inf if math.isinf(sl) else sl
            if pl == sl == -math.inf:
                out[t, h], lse[h, t] = p_out[t, h].double(), -math.inf
                continue
            hi, lo = max(pl, sl), min(pl, sl)
            total = hi + math.log1p(math.exp(lo - hi))
            out[t, h] = p_out[t, h].double() * math.exp(pl - total) + \
                s_out[t, h].double() * math.exp(sl - total)
            lse[h, t] = total
    return out, lse


@pytest.mark.parametrize("fp8", [False, True], ids=["out-dtype", "out-fp8"])
@settings(max_examples=30, **PROPERTY)
@given(data=st.data())
def test_merge_attn_states_against_float64_logsumexp(fp8, data):
    out, p_out, p_lse, s_out, s_lse, out_lse, ctx, out_scale = data.draw(merge_case(fp8))
    want, want_lse = _merge64(p_out, p_lse, s_out, s_lse, ctx)
    ops.merge_attn_states(out, p_out, p_lse, s_out, s_lse, out_lse, ctx, out_scale)
    if out_scale is None:
        # float32 math, one rounding: TOLERANCES
        assert_close(out, want)
    else:
        # the stored value: fp8(clamp(x * (1 / scale), +-448)); TOLERANCES' float8 entry (one
        # code, relative, as the float32 merge may sit across a rounding boundary)
        inv = float(1.0 / out_scale)  # the float32 reciprocal
        assert_close(out, (want * inv).clamp(-448, 448))
    if out_lse is not None:
        # float32 exp/log: a few float32 ulps of the LSE
        assert_close(out_lse, want_lse)
    if ctx is not None:  # exactly the suffix, passed through
        if out_scale is None:
            assert torch.equal(_bits(out[ctx:]), _bits(s_out[ctx:]))
        else:
            x32 = s_out[ctx:].float() * float(1.0 / out_scale)
            assert torch.equal(_codes(out[ctx:]), _fp8_encode(x32, "e4m3"))
        if out_lse is not None:
            assert torch.equal(_bits(out_lse[:, ctx:]), _bits(s_lse[:, ctx:]))


# ---------------------------------------------------------------------------------------------
# paged_attention_v1 (the CPU reference) against per-sequence float64 softmax attention
# ---------------------------------------------------------------------------------------------
@st.composite
def paged_case(draw, kv):
    seqs = draw(st.integers(1, 4))
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 8))  # GQA ratio 1..8
    head = draw(st.sampled_from([32, 64]))
    bs = draw(st.sampled_from([8, 16, 32]))
    dtype = draw(st.sampled_from(DTYPES))
    lens = draw(st.lists(st.sampled_from([0, 1, 7, 8, 9, 17, 33, 40]), min_size=seqs,
                         max_size=seqs))
    alibi = draw(st.booleans())
    bad = draw(st.sampled_from([False, False, False, True]))
    g = torch.Generator().manual_seed(draw(seeds))
    heads = kv_heads * group
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + draw(st.integers(1, 3))
    cols = max(need) + draw(st.integers(0, 2))
    # distinct blocks per sequence, in random order; columns past a sequence's end: garbage
    perm = torch.randperm(nb, generator=g).tolist()
    table = torch.randint(-5, nb + 5, (seqs, cols), generator=g, dtype=torch.int32)
    for s in range(seqs):
        table[s, :need[s]] = torch.tensor(perm[:need[s]], dtype=torch.int32)
        perm = perm[need[s]:]
    keys = [(torch.randn(n, kv_heads, head, generator=g) * 2).to(dtype) for n in lens]
    vals = [(torch.randn(n, kv_heads, head, generator=g) * 2).to(dtype) for n in lens]
    slots = torch.cat([table[s, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
                       for s, n in enumerate(lens)])
    k_scale = torch.empty(1).uniform_(0.02, 0.1, generator=g)  # randn * 2 / scale < 448
    v_scale = torch.empty(1).uniform_(0.02, 0.1, generator=g)
    storage = dtype if kv == "auto" else torch.uint8
    x = 16 // torch.empty(0, dtype=storage).element_size()
    # garbage in the cells no sequence writes (stale cache memory): large values, and NaN / inf
    # in some cases; none of it may reach the output
    kc = (torch.randn(nb, kv_heads, head // x, bs, x, generator=g) * 100).to(dtype)
    vc = (torch.randn(nb, kv_heads, head, bs, generator=g) * 100).to(dtype)
    if draw(st.booleans()):
        for t in (kc, vc):
            t[torch.rand(t.shape, generator=g) < 0.3] = draw(st.sampled_from(
                [float("nan"), float("inf"), float("-inf")]))
    if kv != "auto":
        kc, vc = _fp8_encode(kc, FP8[kv]), _fp8_encode(vc, FP8[kv])
    ops.reshape_and_cache(torch.cat(keys), torch.cat(vals), kc, vc, slots, kv, k_scale, v_scale)
    if bad and sum(lens):
        s = max(range(seqs), key=lambda i: lens[i])
        table[s, int(torch.randint(0, need[s], (1,), generator=g))] = \
            draw(st.sampled_from([-1, nb, nb + 3]))
    query = torch.randn(seqs, heads, head, generator=g).to(dtype)
    slopes = torch.empty(heads).uniform_(0.0, 0.5, generator=g) if alibi else None
    scale = head ** -0.5 * draw(st.sampled_from([1.0, 3.0]))
    max_len = max(lens) + draw(st.integers(0, 5))
    return dict(query=query, kc=kc, vc=vc, kv_heads=kv_heads, scale=scale, table=table,
                lens=lens, bs=bs, max_len=max_len, slopes=slopes, kv=kv, k_scale=k_scale,
                v_scale=v_scale, keys=keys, vals=vals, bad=bad and sum(lens) > 0)


def _attention64(c):
    """Per sequence and head: softmax(scale q.k + alibi) v in float64, over the tokens as
    written (FP8: the oracle's own codes of x / scale, decoded, times the scale)."""
    seqs, heads, head = c["query"].shape
    group = heads // c["kv_heads"]
    out = torch.zeros(seqs, heads, head, dtype=torch.float64)

    def stored(x, scale):
        if c["kv"] == "auto":
            return x.double()
        fmt = FP8[c["kv"]]
        return _fp8_decode(_fp8_encode(x.float() / scale, fmt), fmt) * float(scale)

    for s, n in enumerate(c["lens"]):
        if n == 0:  # no token: zeros
            continue
        K, V = stored(c["keys"][s], c["k_scale"]), stored(c["vals"][s], c["v_scale"])
        for h in range(heads):
            logits = K[:, h // group] @ c["query"][s, h].double() * c["scale"]
            if c["slopes"] is not None:
                logits = logits + float(c["slopes"][h]) * torch.arange(1 - n, 1.0,
                                                                       dtype=torch.float64)
            w = torch.exp(logits - logits.max())
            out[s, h] = (w / w.sum()) @ V[:, h // group]
    return out


def _paged_v1(c, out):
    ops.paged_attention_v1(out, c["query"], c["kc"], c["vc"], c["kv_heads"], c["scale"],
                           c["table"], torch.tensor(c["lens"], dtype=torch.int32), c["bs"],
                           c["max_len"], c["slopes"], c["kv"], c["k_scale"], c["v_scale"])


@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@settings(max_examples=15, **PROPERTY)
@given(data=st.data())
def test_paged_attention_v1_against_float64_softmax(kv, data):
    c = data.draw(paged_case(kv))
    out = torch.full_like(c["query"], 7.0)
    if c["bad"]:  # a used block id outside the cache: IndexError, nothing written
        with pytest.raises(IndexError, match="block"):
            _paged_v1(c, out)
        assert bool((out == 7.0).all())
        return
    _paged_v1(c, out)
    # float32 math, one rounding: TOLERANCES. The logits here are a few tens at most, where
    # float32's ulp (<= 2**-19) adds nothing to speak of (softmax_tolerance's widening < 1e-5)
    assert_close(out, _attention64(c))


# Found by the property above (with NaN garbage in the cache; issue 25 fixed it): the reference
# gathers every sequence to the batch's longest length, reading block 0 for the positions past a
# shorter sequence's end; their softmax weight is 0, but 0 * NaN = NaN. vLLM's kernel zeroes the
# values past the context for exactly this reason (cache memory not written may hold any bits).
def test_paged_attention_ignores_nan_outside_the_sequences():
    head, bs = 32, 8
    kc = torch.zeros(3, 1, head // 4, bs, 4)
    vc = torch.zeros(3, 1, head, bs)
    vc[0] = math.nan  # block 0: used by no sequence
    one = torch.ones(1)
    v = torch.randn(3, 1, head)
    # sequence 0: one token in block 1; sequence 1: two tokens in block 2
    ops.reshape_and_cache(torch.randn(3, 1, head), v, kc, vc, torch.tensor([8, 16, 17]), "auto",
                          one, one)
    q = torch.randn(2, 1, head)
    out = torch.empty_like(q)
    ops.paged_attention_v1(out, q, kc, vc, 1, head ** -0.5,
                           torch.tensor([[1], [2]], dtype=torch.int32),
                           torch.tensor([1, 2], dtype=torch.int32), bs, 2, None, "auto", one, one)
    assert_close(out[0], v[0])  # one token: softmax weight 1
