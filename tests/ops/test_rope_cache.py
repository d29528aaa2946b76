"""fused_rope_and_cache_flash (flash layout) and fused_rope_and_cache (vLLM's paged layout):
reference vs the two separate ops, opcheck, errors, CUDA."""

import pytest
import torch

from compile_ops.testing import assert_raises_eager_and_fake, rope_cos_sin_cache

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cache(max_pos, rot_dim, dtype=torch.float32, device="cpu"):
    return rope_cos_sin_cache(max_pos, rot_dim, dtype, device)


def case(tokens, nq, nk, hs, rot, dtype, device, *, kv="auto", layout="NHD", gen=None,
         pad=0, n_slots=None, nb=16, bs=16):
    """One fused-qkv row per token (query, key, value are column slices, as after the qkv
    projection), a cos/sin cache, paged caches and slots (every third one padding)."""
    row = torch.randn(tokens, (nq + 2 * nk) * hs + pad, generator=gen).to(dtype).to(device)
    q = row[:, :nq * hs]
    k = row[:, nq * hs:(nq + nk) * hs]
    v = row[:, (nq + nk) * hs:(nq + 2 * nk) * hs].view(tokens, nk, hs)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(device)
    cos_sin = make_cache(64, rot, device=device)
    cdt = dtype if kv == "auto" else torch.uint8
    if layout == "paged":  # reshape_and_cache's: x-packed keys, [blocks, heads, head, page]
        x = 16 // torch.empty(0, dtype=cdt).element_size()
        kc = torch.zeros(nb, nk, hs // x, bs, x, dtype=cdt, device=device)
        vc = torch.zeros(nb, nk, hs, bs, dtype=cdt, device=device)
    elif layout == "HND":
        kc = torch.zeros(nb, nk, bs, hs, dtype=cdt, device=device).permute(0, 2, 1, 3)
        vc = torch.zeros(nb, nk, bs, hs, dtype=cdt, device=device).permute(0, 2, 1, 3)
    else:
        kc = torch.zeros(nb, bs, nk, hs, dtype=cdt, device=device)
        vc = torch.zeros(nb, bs, nk, hs, dtype=cdt, device=device)
    n = tokens if n_slots is None else n_slots
    slots = torch.randperm(nb * bs, generator=gen)[:n]
    slots[::3] = -1
    scale = torch.tensor([0.5], device=device)
    return dict(positions=positions, query=q, key=k, value=v, head_size=hs,
                cos_sin_cache=cos_sin, key_cache=kc, value_cache=vc,
                slot_mapping=slots.to(device), kv_cache_dtype=kv, k_scale=scale, v_scale=scale)


def clone_case(c):
    """Deep copy: a new qkv row buffer (so q, k, v stay slices of one tensor) and new caches."""
    row_base = c["query"]._base if c["query"]._base is not None else c["query"]
    new_row = row_base.clone()
    off = lambda t: t.storage_offset() - row_base.storage_offset()  # noqa: E731
    d = dict(c)
    for name in ("query", "key", "value"):
        t = c[name]
        d[name] = new_row.as_strided(t.shape, t.stride(), new_row.storage_offset() + off(t))
    for name in ("key_cache", "value_cache"):
        t = c[name]
        base = (t._base if t._base is not None else t).clone()
        d[name] = base.as_strided(t.shape, t.stride())
    return d


def unfused(c, is_neox):
    """The pair of separate ops, on a copy."""
    d = clone_case(c)
    ops.rotary_embedding(d["positions"], d["query"], d["key"], d["head_size"],
                         d["cos_sin_cache"], is_neox)
    k3 = d["key"].view(d["key"].shape[0], -1, d["head_size"])
    write = ops.reshape_and_cache if paged(d) else ops.reshape_and_cache_flash
    write(k3, d["value"], d["key_cache"], d["value_cache"], d["slot_mapping"],
          d["kv_cache_dtype"], d["k_scale"], d["v_scale"])
    return d


def paged(c):
    return c["key_cache"].dim() == 5


def fused(c, is_neox, write_key=True):
    d = clone_case(c)
    op = ops.fused_rope_and_cache if paged(d) else ops.fused_rope_and_cache_flash
    op(d["positions"], d["query"], d["key"], d["value"], d["head_size"], d["cos_sin_cache"],
       is_neox, d["key_cache"], d["value_cache"], d["slot_mapping"], d["kv_cache_dtype"],
       d["k_scale"], d["v_scale"], write_key)
    return d


def assert_same(a, b, *, key=True):
    """Bit-exact: the fused kernel does the same float32 math per element as the two ops."""
    for name in ("query", "value", "key_cache", "value_cache") + (("key",) if key else ()):
        assert torch.equal(a[name].cpu(), b[name].cpu()), name


@pytest.mark.parametrize("layout", ["NHD", "HND", "paged"])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_two_ops(dtype, is_neox, kv, layout, gen):
    c = case(7, 4, 2, 32, 16, dtype, "cpu", kv=kv, layout=layout, gen=gen, n_slots=5)
    assert_same(fused(c, is_neox), unfused(c, is_neox))


def test_write_key_false_leaves_the_key(gen):
    c = case(5, 2, 1, 16, 16, torch.bfloat16, "cpu", gen=gen)
    f = fused(c, True, write_key=False)
    u = unfused(c, True)
    assert torch.equal(f["key"], c["key"])
    assert_same(f, u, key=False)


@pytest.mark.parametrize("layout", ["HND", "paged"])
def test_opcheck(layout, gen):
    c = case(5, 2, 1, 16, 8, torch.bfloat16, "cpu", kv="fp8", layout=layout, gen=gen)
    args = (c["positions"], c["query"], c["key"], c["value"], 16, c["cos_sin_cache"], True,
            c["key_cache"], c["value_cache"], c["slot_mapping"], "fp8", c["k_scale"],
            c["v_scale"], False)
    op = ops.fused_rope_and_cache if layout == "paged" else ops.fused_rope_and_cache_flash
    torch.library.opcheck(op.default, args)


def test_paged_errors(gen):
    c = case(4, 2, 1, 16, 16, torch.float32, "cpu", layout="paged", gen=gen)

    def call(**over):
        d = {**c, **over}
        return lambda: ops.fused_rope_and_cache(
            d["positions"], d["query"], d["key"], d["value"], d["head_size"],
            d["cos_sin_cache"], True, d["key_cache"], d["value_cache"], d["slot_mapping"],
            d["kv_cache_dtype"], d["k_scale"], d["v_scale"], True)

    assert_raises_eager_and_fake(call(key_cache=torch.zeros(16, 16, 1, 16)), ValueError,
                                 r"fused_rope_and_cache: key_cache must be \[num_blocks, 1, 4, "
                                 r"block_size, 4\]")
    assert_raises_eager_and_fake(call(kv_cache_dtype="fp16"), ValueError,
                                 "fused_rope_and_cache: unknown kv_cache_dtype 'fp16'")
    with pytest.raises(IndexError, match="slot 9999"):
        call(slot_mapping=torch.tensor([0, 9999, 1, 2]))()


def test_errors(gen):
    c = case(4, 2, 1, 16, 16, torch.float32, "cpu", gen=gen)

    def call(**over):
        d = {**c, **over}
        return lambda: ops.fused_rope_and_cache_flash(
            d["positions"], d["query"], d["key"], d["value"], d["head_size"],
            d["cos_sin_cache"], d.get("is_neox", True), d["key_cache"], d["value_cache"],
            d["slot_mapping"], d["kv_cache_dtype"], d["k_scale"], d["v_scale"],
            d.get("write_key", True))

    assert_raises_eager_and_fake(call(kv_cache_dtype="fp16"), ValueError,
                                 "fused_rope_and_cache_flash: unknown kv_cache_dtype 'fp16'")
    assert_raises_eager_and_fake(call(value=torch.randn(4, 2, 16)), ValueError,
                                 "value must have key's tokens and heads")
    assert_raises_eager_and_fake(call(slot_mapping=torch.arange(5)), ValueError,
                                 "5 slots but key has only 4 tokens")
    assert_raises_eager_and_fake(call(head_size=12), ValueError, "not a multiple of head_size")
    assert_raises_eager_and_fake(call(cos_sin_cache=make_cache(64, 32)), ValueError,
                                 "rot_dim 32 .* must be <= head_size 16")
    with pytest.raises(IndexError, match="slot 9999"):
        call(slot_mapping=torch.tensor([0, 9999, 1, 2]))()


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("pad", [0, 1])  # 1: unaligned rows -> the two-kernel path
@pytest.mark.parametrize("layout", ["NHD", "HND", "paged"])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("hs,rot", [(128, 128), (64, 32), (256, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("write_key", [True, False])
def test_cuda_matches_cpu(dtype, hs, rot, is_neox, kv, layout, pad, write_key, gen):
    c = case(37, 8, 2, hs, rot, dtype, "cpu", kv=kv, layout=layout, gen=gen, pad=pad,
             n_slots=33)
    want = fused(c, is_neox, write_key)
    g = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()
         if k in ("positions", "cos_sin_cache", "slot_mapping", "k_scale", "v_scale")}
    g.update(head_size=hs, kv_cache_dtype=kv)
    row = c["query"]._base.cuda()  # q, k, v stay slices of one device row buffer
    for name in ("query", "key", "value"):
        t = c[name]
        g[name] = row.as_strided(t.shape, t.stride(), t.storage_offset())
    for name in ("key_cache", "value_cache"):
        t = c[name]
        g[name] = (t._base if t._base is not None else t).cuda().as_strided(t.shape, t.stride())
    got = fused(g, is_neox, write_key)
    assert_same(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("bs", [8, 32])
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_cuda_paged_block_sizes(bs, kv, gen):
    """The paged kernel at other block sizes (the page stride of the value rows)."""
    c = case(40, 4, 2, 64, 64, torch.bfloat16, "cpu", kv=kv, layout="paged", gen=gen, bs=bs)
    want = fused(c, True)
    g = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    row = c["query"]._base.cuda()
    for name in ("query", "key", "value"):
        t = c[name]
        g[name] = row.as_strided(t.shape, t.stride(), t.storage_offset())
    assert_same(fused(g, True), want)
