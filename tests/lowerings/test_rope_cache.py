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
        if self.variant == "strided_q":  # heads at stride HD + 4: rotary_embedding takes it
            q = (x @ self.w[:, :NQ * (HD + 4)]).view(-1, NQ, HD + 4)[..., :HD]
        if self.variant == "inverse":
            ops.rotary_embedding(positions, q, k, HD, cache, self.is_neox, inverse=True)
        elif self.variant == "offset":  # rotary dims at the end of each head
            ops.rotary_embedding(positions, q, k, HD, cache[:, :HD // 2].contiguous(),
                                 self.is_neox, rope_dim_offset=HD // 2)
        else:
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
    # rotary_embedding's own features that the fused ops do not have (issue 25)
    ("inverse", "rotary_embedding with rope_dim_offset or inverse (the fused ops have neither)"),
    ("offset", "rotary_embedding with rope_dim_offset or inverse (the fused ops have neither)"),
    ("strided_q", "query heads are strided (the fused ops take packed heads)"),
])
def test_does_not_fuse(variant, reason):
    eager, ea, got, ca, code = run(Attn(variant=variant), inputs())
    c = counts()
    assert c.get("matched", 0) == 0, c
    assert c.get(f"near_miss: {reason}", 0) >= 1, c
    assert "fused_rope_and_cache_flash" not in code
    assert_matches(eager, ea, got, ca)


class PagedAttn(torch.nn.Module):
    """The same projection and RoPE, the rotated key into vLLM's paged (x-packed) cache with
    reshape_and_cache, in the ways model code commonly writes it (`form`)."""

    def __init__(self, form="plain", kv="auto", is_neox=True):
        super().__init__()
        self.inner = Attn()
        self.form, self.kv, self.is_neox = form, kv, is_neox

    def forward(self, x, positions, cache, kc, vc, slots, scale):
        qkv = x @ self.inner.w
        if self.form == "heads3d":  # [tokens, heads, head_size] views of the projection
            qkv3 = qkv.view(-1, NQ + 2 * NK, HD)
            q, k, v = qkv3[:, :NQ], qkv3[:, NQ:NQ + NK], qkv3[:, NQ + NK:]
        else:
            q, k, v = qkv.split([NQ * HD, NK * HD, NK * HD], dim=-1)
        if self.form == "contiguous":  # the split made contiguous first: copies
            q, k = q.contiguous(), k.contiguous()
        if self.form == "int32":
            positions = positions.int()
        ops.rotary_embedding(positions, q, k, HD, cache, self.is_neox)
        value = v.contiguous() if self.form == "value_copy" else v.reshape(-1, NK, HD)
        if self.form == "value_from_key":  # computed from the rotated key: must not fuse
            value = k.reshape(-1, NK, HD) * 0.5
        ops.reshape_and_cache(k.reshape(-1, NK, HD), value.view(-1, NK, HD), kc, vc, slots,
                              self.kv, scale, scale)
        return q * 2


def paged_inputs(kv="auto", tokens=6, seed=0):
    args = inputs(tokens=tokens, kv=kv, seed=seed)
    cdt = torch.float32 if kv == "auto" else torch.uint8
    x = 16 // torch.empty(0, dtype=cdt).element_size()
    args[3] = torch.zeros(NB, NK, HD // x, BS, x, dtype=cdt)
    args[4] = torch.zeros(NB, NK, HD, BS, dtype=cdt)
    return args


@pytest.mark.parametrize("form", ["plain", "heads3d", "contiguous", "int32", "value_copy"])
def test_paged_cache_write_fuses(form):
    eager, ea, got, ca, code = run(PagedAttn(form), paged_inputs())
    c = counts()
    assert c.get("matched") == 1, c
    assert_matches(eager, ea, got, ca)
    assert "fused_rope_and_cache.default" in code
    assert "rotary_embedding" not in code and "reshape_and_cache.default" not in code


def test_paged_value_from_the_rotated_key_does_not_fuse():
    eager, ea, got, ca, code = run(PagedAttn("value_from_key"), paged_inputs())
    c = counts()
    assert c.get("matched", 0) == 0, c
    assert c.get("near_miss: value is computed after rotary_embedding", 0) == 1, c
    assert "fused_rope_and_cache" not in code
    assert_matches(eager, ea, got, ca)


def test_paged_prefill_of_many_tokens_does_not_fuse(monkeypatch):
    """Above PAGED_MAX_TOKENS (measured: the fused paged kernel loses from 1024 tokens on) the
    pass leaves rotary_embedding + reshape_and_cache; at the limit it still fuses."""
    import lowerings.rope_cache as rc

    monkeypatch.setattr(rc, "PAGED_MAX_TOKENS", 6)
    eager, ea, got, ca, code = run(PagedAttn(), paged_inputs(tokens=6))
    assert counts().get("matched") == 1, counts()
    torch._dynamo.reset()
    lowerings.reset_counters()
    eager, ea, got, ca, code = run(PagedAttn(), paged_inputs(tokens=7))
    assert counts() == {"near_miss: paged write of more than 6 tokens (the unfused kernels are "
                        "faster there)": 1}, counts()
    assert_matches(eager, ea, got, ca)
    assert "fused_rope_and_cache" not in code and "reshape_and_cache.default" in code


@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
def test_paged_fuses_and_matches_eager(is_neox, kv):
    eager, ea, got, ca, code = run(PagedAttn(kv=kv, is_neox=is_neox), paged_inputs(kv))
    assert counts().get("matched") == 1, counts()
    assert_matches(eager, ea, got, ca)
    line = next(ln for ln in code.splitlines() if "fused_rope_and_cache.default(" in ln)
    assert f"'{kv}'" in line and line.rstrip().endswith("False)"), line


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paged_fused_matches_eager(kv, dtype):
    model = PagedAttn(kv=kv).cuda().to(dtype)
    args = [a.cuda() for a in paged_inputs(kv, tokens=33)]
    args[0] = args[0].to(dtype)
    if kv == "auto":  # caches in the model dtype
        x = 16 // dtype.itemsize
        args[3] = torch.zeros(NB, NK, HD // x, BS, x, dtype=dtype, device="cuda")
        args[4] = torch.zeros(NB, NK, HD, BS, dtype=dtype, device="cuda")
    eager, ea, got, ca, code = run(model, args)
    assert counts().get("matched") == 1
    assert "fused_rope_and_cache.default" in code
    for e, g in zip(ea[3:5], ca[3:5]):
        assert torch.equal(e.cpu(), g.cpu())
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


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
