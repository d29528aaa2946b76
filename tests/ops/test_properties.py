"""Property-based tests (hypothesis, issue 15): shapes, strides, dtypes, padding slots and special
values drawn at random; each op's reference (the CPU kernel) against an oracle written here
independently, and on the GPU the CUDA kernel against the reference. A failing example that
hypothesis finds is kept below as a regular test.

Kept small (tens of examples per property, no deadline) so the CPU suite stays fast on 2 cores.
"""

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
    rows = draw(st.integers(1, 6))
    hidden = draw(st.integers(1, 200))
    pad = draw(st.sampled_from([0, 0, 3, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    weighted = draw(st.booleans())
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden + pad, generator=g) * 4).to(dtype)[:, :hidden]
    r = (torch.randn(rows, hidden + pad, generator=g) * 4).to(dtype)[:, :hidden]
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
