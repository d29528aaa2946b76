"""The RoPE + KV-cache-write fusion on compiled graphs: matches, snapshots, numerics (outputs
and cache contents), generated code, dynamic tokens, and the cases that must not fuse."""

import pytest
import torch
from expecttest import TestCase

import lowerings
from compile_ops.testing import rope_cos_sin_cache

ops = torch.ops.compile_ops
NQ, NK, HD, NB, BS = 4, 2, 16, 8, 4


def cos_sin(rot=HD, max_pos=64):
    return rope_cos_sin_cache(max_pos, rot)


class Attn(torch.nn.Module):
    """vLLM-style: qkv projection, split, RoPE in place, rotated key and value into the cache.
    `variant` switches to shapes of the graph that must not fuse."""

    def __init__(self, variant="plain", kv="auto", is_neox=True, return_key=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(32, (NQ + 2 * NK) * HD, generator=g) / 6,
                                    requires_grad=False)
        self.variant, self.kv, self.is_neox, self.return_key = variant, kv, is_neox, return_key

    def forward(self, x, positions, cache, kc, vc, slots, scale):
        qkv = x @ self.w
        if self.variant == "heads3d":  # [tokens, heads, head_size] views of the projection
            qkv3 = qkv.view(-1, NQ + 2 * NK, HD)
            q, k, v = qkv3[:, :NQ], qkv3[:, NQ:NQ + NK], qkv3[:, NQ + NK:]
        else:
            q, k, v = qkv.split([NQ * HD, NK * HD, NK * HD], dim=-1)
        ops.rotary_embedding(positions, q, k, HD, cache, self.is_neox)
        key = k.view(-1, NK, HD)
        value = v.reshape(-1, NK, HD)
        extra = None
        if self.variant == "copy":
            key = key.clone()
        elif self.variant == "query_as_key":
            key = q.view(-1, NQ, HD)[:, :NK]
        elif self.variant == "mutate_key":
            k.mul_(2)
            key = k.view(-1, NK, HD)
        elif self.variant == "read_cache_between":
            extra = kc.float().sum()
        elif self.variant == "value_is_key":
            value = key
        ops.reshape_and_cache_flash(key, value, kc, vc, slots, self.kv, scale, scale)
        out = q * 2
        if self.return_key:
            return out, k * 1
        return (out, extra) if extra is not None else out


def inputs(tokens=6, kv="auto", layout="NHD", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    cdt = torch.float32 if kv == "auto" else torch.uint8
    if layout == "HND":
        kc = torch.zeros(NB, NK, BS, HD, dtype=cdt).permute(0, 2, 1, 3)
        vc = torch.zeros(NB, NK, BS, HD, dtype=cdt).permute(0, 2, 1, 3)
    else:
        kc = torch.zeros(NB, BS, NK, HD, dtype=cdt)
        vc = torch.zeros(NB, BS, NK, HD, dtype=cdt)
    slots = torch.randperm(NB * BS, generator=g)[:tokens]
    slots[::3] = -1
    return [x, positions, cos_sin(), kc, vc, slots, torch.tensor([0.5])]


def clone_inputs(args):
    out = []
    for a in args:
        base = a._base if a._base is not None else a
        out.append(base.clone().as_strided(a.shape, a.stride()))
    return out


def run(model, args, **kw):
    """Eager and compiled on separate copies: (eager outputs, eager args, compiled ..., code)."""
    from torch._inductor.utils import run_and_get_code

    ea, ca = clone_inputs(args), clone_inputs(args)
    with torch.no_grad():
        eager = model(*ea)
        got, codes = run_and_get_code(
            torch.compile(model, backend="compile_ops", fullgraph=True, **kw), *ca)
    return eager, ea, got, ca, "\n".join(codes)


def assert_matches(eager, ea, got, ca):
    for e, g in zip(eager if isinstance(eager, tuple) else (eager,),
                    got if isinstance(got, tuple) else (got,)):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    for e, g in zip(ea[3:5], ca[3:5]):  # the caches
        if e.dtype == torch.uint8:
            assert torch.equal(e, g)
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def counts():
    return lowerings.counters().get("rope_cache", {})


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
def test_fuses_and_matches_eager(is_neox, kv, layout):
    eager, ea, got, ca, code = run(Attn(kv=kv, is_neox=is_neox), inputs(kv=kv, layout=layout))
    assert counts().get("matched") == 1, counts()
    assert_matches(eager, ea, got, ca)
    assert "fused_rope_and_cache_flash" in code
    assert "rotary_embedding" not in code and "reshape_and_cache_flash.default" not in code
    # in place on the projection output and the caller's caches: nothing is copied
    assert "clone" not in code and ".copy_(" not in code, code
    line = next(ln for ln in code.splitlines() if "fused_rope_and_cache_flash.default(" in ln)
    assert f"'{kv}'" in line, line  # the graph's kv_cache_dtype, carried over
    assert line.rstrip().endswith("False)"), line  # write_key=False: only the cache reads k


def test_three_d_head_views_fuse():
    eager, ea, got, ca, code = run(Attn(variant="heads3d"), inputs())
    assert counts().get("matched") == 1, counts()
    assert_matches(eager, ea, got, ca)
    assert "clone" not in code


def test_key_read_elsewhere_keeps_write_key():
    eager, ea, got, ca, code = run(Attn(return_key=True), inputs())
    assert counts().get("matched") == 1
    assert_matches(eager, ea, got, ca)
    line = next(ln for ln in code.splitlines() if "fused_rope_and_cache_flash.default(" in ln)
    assert line.rstrip().endswith("True)"), line


def test_dynamic_tokens():
    model = Attn()
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True, dynamic=True)
    for tokens in (5, 9):
        args = inputs(tokens, seed=tokens)
        ea, ca = clone_inputs(args), clone_inputs(args)
        with torch.no_grad():
            eager, got = model(*ea), compiled(*ca)
        assert_matches(eager, ea, got, ca)
    assert counts().get("matched", 0) >= 1


@pytest.mark.parametrize("variant,reason", [
    ("copy", "cache key is not a view of a rotary_embedding result"),
    ("query_as_key", "cache key is not exactly the rotated key rows"),
    ("mutate_key", "cache key is not a view of a rotary_embedding result"),
    ("read_cache_between", "a cache is used between rotary_embedding and the write"),
    ("value_is_key", "value overlaps the rotated query or key"),
])
def test_does_not_fuse(variant, reason):
    eager, ea, got, ca, code = run(Attn(variant=variant), inputs())
    c = counts()
    assert c.get("matched", 0) == 0, c
    assert c.get(f"near_miss: {reason}", 0) >= 1, c
    assert "fused_rope_and_cache_flash" not in code
    assert_matches(eager, ea, got, ca)


class PagedAttn(torch.nn.Module):
    """The same projection and RoPE, but the rotated key goes to the paged (x-packed)
    reshape_and_cache: there is no fused kernel for that layout; the pass says so."""

    def __init__(self):
        super().__init__()
        self.inner = Attn()

    def forward(self, x, positions, cache, kc, vc, slots, scale):
        q, k, v = (x @ self.inner.w).split([NQ * HD, NK * HD, NK * HD], dim=-1)
        ops.rotary_embedding(positions, q, k, HD, cache, True)
        ops.reshape_and_cache(k.view(-1, NK, HD), v.reshape(-1, NK, HD), kc, vc, slots, "auto",
                              scale, scale)
        return q * 2


def test_paged_cache_write_is_a_near_miss():
    args = inputs()
    x = 16 // 4  # float32 elements per 16 bytes
    args[3] = torch.zeros(NB, NK, HD // x, BS, x)
    args[4] = torch.zeros(NB, NK, HD, BS)
    eager, ea, got, ca, code = run(PagedAttn(), args)
    c = counts()
    assert c.get("matched", 0) == 0, c
    assert c.get("near_miss: the rotated key goes to the paged reshape_and_cache (the fused op "
                 "takes the flash layout only)", 0) == 1, c
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for e, g in zip(ea[3:5], ca[3:5]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert "fused_rope_and_cache_flash" not in code


class TestSnapshots(TestCase):
    def test_post_pass_ops(self):
        run(Attn(), inputs())
        self.assertExpectedInline("\n".join(lowerings.pass_manager().ops_before), """\
aten.copy_.default
aten.copy_.default
aten.mm.default
aten.mul.Tensor
aten.reshape.default
aten.reshape.default
aten.split_with_sizes.default
aten.split_with_sizes.default
aten.split_with_sizes.default
auto_functionalized(compile_ops.reshape_and_cache_flash.default)
auto_functionalized(compile_ops.rotary_embedding.default)
getitem
getitem
getitem
getitem
getitem
getitem""")
        self.assertExpectedInline("\n".join(lowerings.pass_manager().ops_after), """\
aten.copy_.default
aten.copy_.default
aten.mm.default
aten.mul.Tensor
aten.reshape.default
aten.split_with_sizes.default
aten.split_with_sizes.default
auto_functionalized(compile_ops.fused_rope_and_cache_flash.default)
getitem
getitem
getitem
getitem
getitem""")


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_cuda_fused_matches_eager(kv):
    model = Attn(kv=kv).cuda()
    args = [a.cuda() if a._base is None else a._base.cuda().as_strided(a.shape, a.stride())
            for a in inputs(tokens=33, kv=kv, layout="HND")]
    eager, ea, got, ca, code = run(model, args)
    assert counts().get("matched") == 1
    assert "fused_rope_and_cache_flash" in code
    for e, g in zip(ea[3:5], ca[3:5]):
        assert torch.equal(e.cpu(), g.cpu()) if kv != "auto" else \
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5) is None
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
