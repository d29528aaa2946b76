"""merge_attn_states: reference vs a float64 oracle, the op, opcheck, errors, Triton (interpreted
on the CPU), CUDA."""

import os
import subprocess
import sys

import pytest
import torch

from compile_ops.attention import merge_attn_states_ref, triton_merge_attn_states
from compile_ops.testing import assert_close, assert_raises_eager_and_fake

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = float("inf")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def oracle(p, pl, s, sl):
    """float64, written as a two-way softmax; +-inf LSEs are empty parts."""
    pl, sl = pl.double().t(), sl.double().t()  # [tokens, heads]
    pl = torch.where(torch.isinf(pl), -INF, pl)
    sl = torch.where(torch.isinf(sl), -INF, sl)
    w = torch.softmax(torch.stack([pl, sl], -1), dim=-1)  # NaN where both are -inf
    out = p.double() * w[..., :1] + s.double() * w[..., 1:]
    empty = torch.isinf(pl) & torch.isinf(sl)
    out = torch.where(empty[..., None], p.double(), out)
    lse = torch.where(empty, -INF, torch.logsumexp(torch.stack([pl, sl], -1), -1))
    return out, lse.t()


def make(tokens, heads, head, dtype, device="cpu", gen=None, specials=True):
    p = torch.randn(tokens, heads, head, generator=gen).to(dtype).to(device)
    s = torch.randn(tokens, heads, head, generator=gen).to(dtype).to(device)
    pl = (torch.randn(heads, tokens, generator=gen) * 3).to(device)
    sl = (torch.randn(heads, tokens, generator=gen) * 3).to(device)
    if specials and tokens >= 4 and heads >= 2:
        pl[0, 0], sl[0, 0] = INF, 1.0          # +inf prefix: empty
        pl[1, 1], sl[1, 1] = -INF, 2.0         # -inf prefix: empty
        pl[0, 2], sl[0, 2] = 0.5, INF          # +inf suffix: empty
        pl[1, 3], sl[1, 3] = -INF, INF         # both empty
        pl[0, 3], sl[0, 3] = 80.0, -80.0       # far apart
    return p, pl, s, sl


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_oracle(dtype, gen):
    p, pl, s, sl = make(6, 3, 40, dtype, gen=gen)
    out, lse = merge_attn_states_ref(p, pl, s, sl)
    want_out, want_lse = oracle(p, pl, s, sl)
    assert_close(out, want_out.to(dtype))
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[3, 1], p[3, 1]) and lse[1, 3] == -INF  # both empty: prefix, -inf


@pytest.mark.parametrize("with_lse", [True, False])
def test_op_in_place_with_strides(with_lse, gen):
    p, pl, s, sl = make(5, 4, 16, torch.bfloat16, gen=gen)
    big = torch.full((5, 4, 24), 7.0, dtype=torch.bfloat16)
    out = big[:, :, 4:20]                       # strided heads, offset start
    lse_store = torch.full((5, 4), 7.0)
    out_lse = lse_store.t() if with_lse else None  # [heads, tokens] as a transposed view
    ops.merge_attn_states(out, p, pl.t().contiguous().t(), s, sl, out_lse)
    want_out, want_lse = merge_attn_states_ref(p, pl, s, sl)
    assert torch.equal(out, want_out)
    assert (big[:, :, :4] == 7).all() and (big[:, :, 20:] == 7).all()
    if with_lse:
        assert torch.equal(out_lse, want_lse)


def test_opcheck(gen):
    p, pl, s, sl = make(5, 4, 16, torch.float16, gen=gen)
    torch.library.opcheck(ops.merge_attn_states.default,
                          (torch.empty_like(p), p, pl, s, sl, torch.empty_like(pl)))
    torch.library.opcheck(ops.merge_attn_states.default, (torch.empty_like(p), p, pl, s, sl))


def test_errors(gen):
    p, pl, s, sl = make(4, 2, 8, torch.float32, gen=gen)
    out = torch.empty_like(p)
    assert_raises_eager_and_fake(lambda: ops.merge_attn_states(out, p, pl.t(), s, sl), ValueError,
                                 r"prefix_lse must be \[heads, tokens\] = \[2, 4\]")
    assert_raises_eager_and_fake(lambda: ops.merge_attn_states(out, p, pl.half(), s, sl),
                                 TypeError, "prefix_lse must be float32")
    assert_raises_eager_and_fake(lambda: ops.merge_attn_states(out, p, pl, s.half(), sl),
                                 TypeError, "suffix_output must have dtype torch.float32")
    assert_raises_eager_and_fake(
        lambda: ops.merge_attn_states(out, p.transpose(1, 2).contiguous().transpose(1, 2), pl,
                                      s, sl),
        ValueError, "prefix_output must be contiguous in head_size")
    assert_raises_eager_and_fake(lambda: ops.merge_attn_states(out.view(4, 16), p, pl, s, sl),
                                 ValueError, r"output must be \[tokens, heads, head_size\]")
    buf = torch.randn(2, 5)  # output_lse one column to the right of prefix_lse (eager only:
    with pytest.raises(ValueError, match="output_lse and prefix_lse overlap"):  # fakes have
        ops.merge_attn_states(out, p, buf[:, :4], s, sl, buf[:, 1:])  # no addresses)
    ops.merge_attn_states(p, p, pl, s, sl, pl)  # exactly in place is fine (element-wise)


def test_triton_kernel_interpreted_on_cpu():
    """The Triton fallback under TRITON_INTERPRET=1 (a child process: the flag is read when the
    kernel is first built)."""
    code = r"""
import torch, sys
sys.path.insert(0, {root!r})
from tests.ops.test_attention import make, oracle
from compile_ops.attention import triton_merge_attn_states
from compile_ops.testing import assert_close
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for head in (16, 40):
        p, pl, s, sl = make(6, 3, head, dtype, gen=g)
        out, lse = torch.full_like(p, float("nan")), torch.full_like(pl, float("nan"))
        triton_merge_attn_states(out, p, pl, s, sl, lse)
        want_out, want_lse = oracle(p, pl, s, sl)
        assert_close(out, want_out.to(dtype))
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        fin = ~torch.isinf(want_lse)
        torch.testing.assert_close(lse[fin], want_lse[fin].float(), rtol=1e-5, atol=1e-5)
print("triton interpreted ok")
""".format(root=ROOT)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton interpreted ok" in proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["cuda", "triton"])
@pytest.mark.parametrize("head", [64, 128, 72, 256])
@pytest.mark.parametrize("tokens,heads", [(1, 32), (7, 8), (4099, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(dtype, tokens, heads, head, path, gen):
    p, pl, s, sl = make(tokens, heads, head, dtype, gen=gen)
    want_out, want_lse = merge_attn_states_ref(p, pl, s, sl)
    args = [t.cuda() for t in (p, pl, s, sl)]
    out = torch.full_like(args[0], float("nan"))
    lse = torch.full_like(args[1], float("nan"))
    if path == "cuda":
        ops.merge_attn_states(out, args[0], args[1], args[2], args[3], lse)
    else:
        triton_merge_attn_states(out, args[0], args[1], args[2], args[3], lse)
    assert_close(out, want_out)
    got_lse = lse.cpu()
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    fin = ~torch.isinf(want_lse)
    torch.testing.assert_close(got_lse[fin], want_lse[fin], rtol=1e-5, atol=1e-5)
