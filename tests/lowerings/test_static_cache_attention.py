"""The static-cache decode attention rewrite (lowerings/static_cache_attention.py) on compiled
graphs: Hugging Face's GQA ``repeat_kv`` + masked SDPA over a ``[B, Hkv, L, D]`` cache, one query
token -> ``compile_ops.static_cache_attention``. Two kinds of match: a mask proven to be "slot <
position + c" (the op gets only the lengths and never reads the mask), and any other mask (a
graph input as generate() passes it, padding, sliding windows, per-sequence positions, float
biases), which the op reads, within the live range that ``mask_bounds`` finds (traced into the
graph once per mask). Matches (mask and K/V forms, dtypes, GQA groups), the op list before / after
the pass, compiled vs eager outputs and caches, the graphs that must not be rewritten (each a near
miss with its reason, SDPA left in place), the GPU SDPA ops on hand-traced graphs, and a tiny
Hugging Face Llama decoding through a StaticCache."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase

import lowerings
from compile_ops.testing import assert_close
from lowerings.static_cache_attention import StaticCacheAttentionPass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "static_cache_attention"
OP = "auto_functionalized(compile_ops.static_cache_attention.default)"
SDPA_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"
B, HKV, L, D, POS = 2, 2, 32, 16, 5
NEG_INF = float("-inf")
aten = torch.ops.aten


def repeat_kv(x, groups):
    """Hugging Face's repeat_kv: [B, Hkv, L, D] -> [B, Hkv * groups, L, D] (x itself at 1)."""
    if groups == 1:
        return x
    b, hkv, length, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, groups, length, d).reshape(b, hkv * groups,
                                                                         length, d)


def attention(write="index_copy", kv="repeat_kv", mask="float", cmp="le", batch_mask=False,
              keep=0.0, fill=NEG_INF, extra=None, kv_index="arange", is_causal=False,
              dropout_p=0.0, scale=None):
    """An HF-style decode step over static caches: write the new K/V at `pos` (as StaticCache
    does), repeat_kv, mask "key slot <= position", SDPA. The keywords pick the variants:

    - write: "index_copy" (StaticCache.update), "setitem" (its fallback ``kc[:, :, pos] = k``),
      "per_batch" (one position per sequence: ``kc[arange(B), :, pos] = k``);
    - kv: "repeat_kv", "repeat_interleave", "unsqueeze(-3)", "enable_gqa" (SDPA's own GQA),
      "tile" (heads h -> h % Hkv: not repeat_kv), "transposed" (the key cache stored
      [B, Hkv, D, L], read through a transpose);
    - mask: "bool" (True = attend), "float" (``where(cond, keep, fill).to(q.dtype)``), None;
      cmp: how the condition is spelled; batch_mask: [B, 1, 1, L] instead of [1, 1, 1, L];
      extra: "padding" / "window" (and-ed with the causal condition); kv_index: the key side,
      "arange", "arange+1" / "arange-2" (HF's kv_offset: shifts the lengths), "flip",
      "step_2", "arange(1, L+1)"."""

    def fn(q, k, v, kc, vc, pos):
        if kv == "transposed":
            kc = kc.transpose(2, 3)
        if write == "index_copy":
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
        elif write == "setitem":
            kc[:, :, pos] = k
            vc[:, :, pos] = v
        else:  # per_batch
            rows = torch.arange(kc.shape[0])
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
        b, hkv, length, d = kc.shape
        groups = q.shape[1] // hkv
        gqa = False
        if kv in ("repeat_kv", "transposed"):
            key, value = repeat_kv(kc, groups), repeat_kv(vc, groups)
        elif kv == "repeat_interleave":
            key, value = kc.repeat_interleave(groups, dim=1), vc.repeat_interleave(groups, dim=1)
        elif kv == "unsqueeze(-3)":
            key = kc.unsqueeze(-3).expand(b, hkv, groups, length, d).reshape(b, -1, length, d)
            value = vc.unsqueeze(-3).expand(b, hkv, groups, length, d).reshape(b, -1, length, d)
        elif kv == "enable_gqa":
            key, value, gqa = kc, vc, True
        else:  # tile
            key = kc[:, None].expand(b, groups, hkv, length, d).reshape(b, -1, length, d)
            value = vc[:, None].expand(b, groups, hkv, length, d).reshape(b, -1, length, d)
        slots = {"arange": lambda: torch.arange(length),
                 "arange+1": lambda: torch.arange(length) + 1,
                 "arange-2": lambda: torch.arange(length) - 2,
                 "flip": lambda: torch.arange(length).flip(0),
                 "step_2": lambda: torch.arange(0, 2 * length, 2),
                 "arange(1, L+1)": lambda: torch.arange(1, length + 1)}[kv_index]()
        kv_idx = slots[None, None, None, :]
        q_idx = pos[:, None, None, None] if write == "per_batch" else pos[None, None, :, None]
        cond = {"le": lambda: kv_idx <= q_idx,
                "lt_plus_1": lambda: kv_idx < q_idx + 1,
                "ge": lambda: q_idx >= kv_idx}[cmp]()
        if extra == "padding":  # slots 1, 4, 7, ... are padding
            cond = cond & (torch.arange(length)[None, None, None, :] % 3 != 1)
        elif extra == "window":  # the last 4 positions
            cond = cond & (kv_idx > q_idx - 4)
        if batch_mask:
            cond = cond.expand(b, 1, 1, length)
        if mask == "bool":
            attn_mask = cond
        elif mask == "float":
            attn_mask = torch.where(cond, keep, fill).to(q.dtype)
        else:
            attn_mask = None
        return F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=gqa)

    return fn


def inputs(groups=4, dtype=torch.float32, tokens=1, per_batch=False, transposed=False,
           batch=B, hkv=HKV, pos=POS, seed=0):
    """q [batch, hkv * groups, tokens, D], the new k / v [batch, hkv, tokens, D], caches
    [batch, hkv, L, D] full of random stale values (a slot attended past the position changes
    the result), and the positions: [tokens] from pos, or [B] (pos, pos + 3) with per_batch."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(batch, hkv * groups, tokens, D)
    k, v = randn(batch, hkv, tokens, D), randn(batch, hkv, tokens, D)
    kc = randn(batch, hkv, D, L) if transposed else randn(batch, hkv, L, D)
    vc = randn(batch, hkv, L, D)
    positions = torch.tensor([pos, pos + 3]) if per_batch else torch.arange(pos, pos + tokens)
    return [q, k, v, kc, vc, positions]


def run(fn, args):
    """Eager and compiled, each on its own copies of the inputs: (eager output, eager inputs
    after the call, compiled output, compiled inputs after the call)."""
    ea, ca = [a.clone() for a in args], [a.clone() for a in args]
    with torch.no_grad():
        eager = fn(*ea)
        got = torch.compile(fn, backend="compile_ops", fullgraph=True)(*ca)
    return eager, ea, got, ca


def counts():
    return lowerings.counters().get(NAME, {})


def ops_after():
    return lowerings.pass_manager().ops_after


def assert_same(eager, ea, got, ca, per_batch=False):
    """Output within the dtype's tolerance; the caches written exactly as eager writes them, the
    new k / v at the positions (sequence b at pos[b] with per_batch)."""
    assert_close(got, eager)
    for e, c in zip(ea[3:5], ca[3:5]):
        assert torch.equal(c, e)
    q, k, v, kc, vc, pos = ca[:6]
    kc = kc if kc.shape[2] == L else kc.transpose(2, 3)
    for cache, new in ((kc, k), (vc, v)):
        if per_batch:
            assert torch.equal(cache[torch.arange(B), :, pos], new[:, :, 0])
        else:
            assert torch.equal(cache[:, :, pos], new)


def assert_rewritten(eager, ea, got, ca, n=1):
    c = counts()
    assert c == {"matched": n}, c
    after = ops_after()
    assert after.count(OP) == n, after
    assert not any("scaled_dot_product" in o for o in after), after
    assert_same(eager, ea, got, ca)


def assert_near_miss(eager, ea, got, ca, reason, per_batch=False):
    c = counts()
    assert c == {f"near_miss: {reason}": 1}, c
    after = ops_after()
    assert SDPA_CPU in after and OP not in after, after
    assert_same(eager, ea, got, ca, per_batch)


# -- matches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_rewritten(groups, dtype, mask):
    """Both mask forms; bf16's float mask is built in float32 and cast (``.to(q.dtype)``)."""
    assert_rewritten(*run(attention(mask=mask), inputs(groups, dtype)))


@pytest.mark.parametrize("form,dtype", [
    (dict(write="setitem"), torch.float32),
    (dict(write="setitem", mask="bool"), torch.bfloat16),
    (dict(cmp="lt_plus_1"), torch.float32),
    (dict(cmp="ge"), torch.float32),
    (dict(cmp="lt_plus_1", mask="bool"), torch.bfloat16),
    (dict(batch_mask=True), torch.float32),
    (dict(batch_mask=True, mask="bool", cmp="ge"), torch.float32),
    (dict(batch_mask=True), torch.bfloat16),
    (dict(fill=-65536.0), torch.float32),  # SDPA's cuDNN path: where(mask, 0, -65536)
    (dict(fill=-65536.0, batch_mask=True), torch.bfloat16),
    (dict(fill=-1e4), torch.float32),  # the highest fill taken (MASKED_AT_MOST)
    (dict(fill=torch.finfo(torch.float32).min), torch.float32),
    (dict(kv_index="arange+1"), torch.float32),  # kv + 1 <= pos: lens = pos
    (dict(kv_index="arange(1, L+1)"), torch.float32),  # iota(start=1): the same shift
    (dict(kv_index="arange-2", mask="bool", cmp="ge"), torch.float32),  # lens = pos + 3
    (dict(kv="repeat_interleave"), torch.float32),
    (dict(kv="unsqueeze(-3)"), torch.float32),
    (dict(kv="enable_gqa", mask="bool"), torch.float32),
    (dict(scale=0.3), torch.float32),
    (dict(kv="transposed"), torch.float32),  # written by index_copy_: a contiguous copy read
], ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x))
def test_rewritten_forms(form, dtype):
    args = inputs(4, dtype, transposed=form.get("kv") == "transposed")
    assert_rewritten(*run(attention(**form), args))


@pytest.mark.parametrize("batch,hkv,groups", [(1, 1, 8), (3, 1, 4), (1, 2, 1)])
def test_rewritten_batch_and_kv_heads(batch, hkv, groups):
    """One sequence, multi-query attention (one KV head for all query heads)."""
    assert_rewritten(*run(attention(), inputs(groups, batch=batch, hkv=hkv)))


def test_one_graph_every_position():
    """The decode loop: one compiled step (the position is a tensor input: no recompile) at the
    first slot, mid-cache and the last slot, each against eager on fresh caches."""
    fn = attention(mask="bool")
    compiled = torch.compile(fn, backend="compile_ops", fullgraph=True)
    for pos in (0, POS, L - 1):
        args = inputs(pos=pos, seed=pos)
        ea, ca = [a.clone() for a in args], [a.clone() for a in args]
        with torch.no_grad():
            eager, got = fn(*ea), compiled(*ca)
        assert_same(eager, ea, got, ca)
    assert counts() == {"matched": 1}, counts()
    assert OP in ops_after()


def test_two_layers_share_one_lens():
    """Two attentions under one mask (a model's layers): both rewritten, seq_lens computed once
    (one add) and read by both ops."""
    def fn(q, k, v, kc, vc, pos):
        cond = torch.arange(L)[None, None, None, :] <= pos[None, None, :, None]
        mask = torch.where(cond, 0.0, NEG_INF)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        o = F.scaled_dot_product_attention(q, repeat_kv(kc, 4), repeat_kv(vc, 4), attn_mask=mask)
        k2, v2 = kc * 0.5, vc.flip(2)  # another layer's caches (tensors in the graph)
        return F.scaled_dot_product_attention(o * 2, repeat_kv(k2, 4), repeat_kv(v2, 4),
                                              attn_mask=mask)

    assert_rewritten(*run(fn, inputs()), n=2)
    assert ops_after().count("aten.add.Tensor") == 1, ops_after()


def test_value_cache_cast_to_the_query_dtype():
    """Caches of two dtypes cannot reach SDPA (it takes one dtype): the float32 value cache is
    cast to bf16 first, and the cast tensor is what the op reads."""
    def fn(q, k, v, kc, vc, pos):
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v.float())
        cond = torch.arange(L)[None, None, None, :] <= pos[None, None, :, None]
        return F.scaled_dot_product_attention(q, repeat_kv(kc, 4), repeat_kv(vc.to(q.dtype), 4),
                                              attn_mask=cond)

    args = inputs(4, torch.bfloat16)
    args[4] = args[4].float()
    assert_rewritten(*run(fn, args))


class TestSnapshot(TestCase):
    def test_ops_before_and_after(self):
        """Groups of 4, float mask, index_copy_ writes: repeat_kv's two copies, the mask and
        SDPA become one op over the written caches (lens = pos + 1)."""
        run(attention(), inputs())
        self.assertEqual(counts(), {"matched": 1})
        self.assertExpectedInline("\n".join(lowerings.pass_manager().ops_before), """\
aten._scaled_dot_product_flash_attention_for_cpu.default
aten.clone.default
aten.clone.default
aten.copy_.default
aten.copy_.default
aten.expand.default
aten.expand.default
aten.full.default
aten.full.default
aten.index_put.default
aten.index_put.default
aten.le.Tensor
aten.reshape.default
aten.reshape.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.unsqueeze.default
aten.where.self
getitem
prims.iota.default""")
        self.assertExpectedInline("\n".join(ops_after()), """\
aten.add.Tensor
aten.copy_.default
aten.copy_.default
aten.empty.memory_format
aten.expand.default
aten.index_put.default
aten.index_put.default
aten.reshape.default
aten.reshape.default
aten.reshape.default
auto_functionalized(compile_ops.static_cache_attention.default)
getitem""")


# -- near misses -----------------------------------------------------------------------------
KEY_SIDE = "mask's key side is not arange(max_cache_len) + c: " \
           "unsqueeze.default(unsqueeze.default(unsqueeze.default(...)))"
MASK = "where.self(le.Tensor(unsqueeze.default(...), unsqueeze.default(...)), full.default(), " \
       "full.default())"


@pytest.mark.parametrize("form,reason", [
    (dict(mask=None), "no mask (attention over every slot of the cache)"),
    (dict(mask=None, is_causal=True), "is_causal (SDPA's top-left causal mask)"),
    (dict(kv="tile"), "key: K/V's expand is not of unsqueeze(cache, 2)"),
    # the key cache read through a transpose (D strided); (written by index_copy_ instead, it is
    # first copied back contiguous by functionalization, and rewritten: test_rewritten_forms)
    (dict(kv="transposed", write="setitem"), "cache not contiguous in head_size"),
], ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "")
def test_not_rewritten(form, reason):
    args = inputs(transposed=form.get("kv") == "transposed")
    assert_near_miss(*run(attention(**form), args), reason)


# -- any other mask: read by the op ------------------------------------------------------------
BOUNDS_OPS = ("aten.amax.default", "aten.amin.default")


def assert_rewritten_reading_mask(eager, ea, got, ca, n=1, per_batch=False):
    """Rewritten (n ops, no SDPA) with the mask handed to the op: the bounds (one amin for the
    first live slot, one amax for the last, shared by every op of the mask) are in the graph."""
    c = counts()
    assert c == {"matched": n}, c
    after = ops_after()
    assert after.count(OP) == n, after
    assert not any("scaled_dot_product" in o for o in after), after
    for op in BOUNDS_OPS:
        assert after.count(op) == 1, after
    assert_same(eager, ea, got, ca, per_batch)


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("form,dtype", [
    (dict(extra="padding"), F32),                 # causal & a padding pattern
    (dict(extra="padding"), BF16),
    (dict(extra="window", mask="bool"), F32),     # a sliding window of 4 positions
    (dict(extra="window", batch_mask=True), BF16),
    (dict(kv_index="flip"), F32),                 # not a comparison with arange: any mask
    (dict(kv_index="step_2"), F32),
    (dict(fill=-100.0), F32),                     # a finite fill above -1e4: the float mask
    (dict(keep=1.0), F32),                        # a bias on the kept slots
    (dict(write="per_batch"), F32),               # a position per sequence
    (dict(write="per_batch", mask="bool", batch_mask=True), BF16),
], ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x))
def test_any_decode_mask_rewritten(form, dtype):
    """Masks the pass cannot prove causal: the op reads them (exact for any mask)."""
    per_batch = form.get("write") == "per_batch"
    args = inputs(4, dtype, per_batch=per_batch)
    assert_rewritten_reading_mask(*run(attention(**form), args), per_batch=per_batch)


@pytest.mark.parametrize("fill", [-100.0, -1e4])
def test_bf16_fill_checked_after_the_cast(fill):
    """The fill is checked as SDPA sees it, in the mask's dtype: -100 is too high in either, and
    -1e4 (taken in float32: test_rewritten_forms) is -9984 once cast to bf16: not the lengths
    form, so the op reads the bf16 mask itself (exact)."""
    assert_rewritten_reading_mask(*run(attention(fill=fill), inputs(4, torch.bfloat16)))


def masked_step(groups=4, layers=1):
    """generate()'s decode step: the mask is a graph input (built outside the compiled forward);
    `layers` attentions under that one mask, each over its own caches."""
    def fn(q, k, v, kc, vc, pos, mask):
        out = q
        for i in range(layers):
            kci, vci = (kc, vc) if i == 0 else (kc * (i + 1), vc.flip(2))
            kci.index_copy_(2, pos, k)
            vci.index_copy_(2, pos, v)
            out = F.scaled_dot_product_attention(out, repeat_kv(kci, groups),
                                                 repeat_kv(vci, groups), attn_mask=mask)
        return out
    return fn


def graph_masks(dtype=torch.float32, heads=HKV * 4):
    """Masks as models build them: left padding (sequence 1 starts at slot 3) and causal over the
    slots up to POS, a sliding window of 4, every form SDPA broadcasts."""
    j = torch.arange(L)
    causal = j <= POS
    pad = torch.stack([j >= 0, j >= 3])                       # [B, L]
    window = causal & (j > POS - 4)
    boolm = (causal & pad)[:, None, None, :]                  # [B, 1, 1, L]
    fmin = torch.finfo(dtype).min
    return {
        "bool": boolm,
        "float_min": torch.where(boolm, 0.0, fmin).to(dtype),  # HF's eager-style float mask
        "float_inf": torch.where(boolm, 0.0, NEG_INF).to(dtype),
        "window_2d": window[None, :],                         # [1, L]
        "per_head": (causal & (j % heads >= 0))[None, None, None, :].expand(B, heads, 1, L) &
                    (torch.arange(heads)[None, :, None, None] <= j),  # heads differ
        "batch1": window[None, None, None, :],                # [1, 1, 1, L]
    }


@pytest.mark.parametrize("kind,dtype", [
    ("bool", F32), ("bool", BF16), ("float_min", F32), ("float_min", BF16), ("float_inf", F32),
    ("window_2d", F32), ("per_head", F32), ("batch1", BF16)])
def test_graph_input_mask(kind, dtype):
    """The mask as generate() hands it to the compiled forward: a graph input (nothing in the
    graph says what it holds): rewritten, the op reads it; numerics and caches equal eager's."""
    mask = graph_masks(dtype)[kind]
    args = inputs(4, dtype) + [mask]
    assert_rewritten_reading_mask(*run(masked_step(), args))


def test_layers_share_one_mask_bounds():
    """Two attentions under one graph-input mask: both rewritten, the bounds (one amin, one
    amax) computed once and read by both ops."""
    args = inputs(4) + [graph_masks()["bool"]]
    assert_rewritten_reading_mask(*run(masked_step(layers=2), args), n=2)


class TestMaskSnapshot(TestCase):
    def test_ops_after_graph_input_mask(self):
        """A bool graph-input mask: repeat_kv's copies and SDPA gone; the op reads the mask and
        the bounds traced from compile_ops.static_cache.mask_bounds."""
        run(masked_step(), inputs(4) + [graph_masks()["bool"]])
        self.assertEqual(counts(), {"matched": 1})
        self.assertExpectedInline("\n".join(ops_after()), """\
aten.add.Tensor
aten.amax.default
aten.amin.default
aten.copy_.default
aten.copy_.default
aten.empty.memory_format
aten.eq.Tensor
aten.expand.default
aten.expand.default
aten.expand.default
aten.index_put.default
aten.index_put.default
aten.minimum.default
aten.mul.Tensor
aten.reshape.default
aten.reshape.default
aten.scalar_tensor.default
aten.scalar_tensor.default
aten.select.int
aten.select.int
aten.sub.Tensor
aten.sum.dim_IntList
aten.where.self
aten.where.self
auto_functionalized(compile_ops.static_cache_attention.default)
getitem
prims.convert_element_type.default
prims.iota.default""")


def test_prefill_not_rewritten():
    """Four query tokens (a prefill chunk into the static cache) with the same causal mask."""
    assert_near_miss(*run(attention(), inputs(tokens=4)), "4 query tokens (prefill), not one")


def test_dropout_sdpa_is_decomposed_before_the_pass():
    """On the CPU SDPA with dropout_p > 0 is lowered to its math (matmul, softmax, dropout)
    before the post-grad passes: no SDPA op for the pass to see, nothing rewritten (the
    pass's own dropout check: TestGPUGraphs.test_dropout). Dropout is random: no numerics."""
    args = inputs()
    with torch.no_grad():
        got = torch.compile(attention(dropout_p=0.5), backend="compile_ops",
                            fullgraph=True)(*args)
    assert got.shape == (B, HKV * 4, 1, D)
    assert counts() == {}, counts()
    before, after = lowerings.pass_manager().ops_before, ops_after()
    assert not any("scaled_dot_product" in o for o in before), before
    assert OP not in after, after
    assert torch.equal(args[3][:, :, POS], args[1][:, :, 0])  # the cache write still happens


# -- the GPU SDPA ops, on hand-traced graphs (the pass run directly) ----------------------------
def traced(fn, *args):
    """fn traced to an aten graph with fake tensors (metadata as Inductor's post-grad graph
    has it): SDPA ops that have no CPU kernel can be traced here."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args)


def float_mask(pos, length, fill=NEG_INF):
    cond = torch.arange(length)[None, None, None, :] <= pos[None, None, :, None]
    return torch.where(cond, torch.full((), 0.0), torch.full((), fill))


class TestGPUGraphs(TestCase):
    def _args(self, length=L, dv=D, v_dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(B, HKV * 4, 1, D, generator=g),
                torch.randn(B, HKV, length, D, generator=g),
                torch.randn(B, HKV, length, dv, generator=g).to(v_dtype), torch.tensor([POS]))

    def _apply(self, gm):
        n = StaticCacheAttentionPass().apply(gm.graph)
        gm.graph.lint()
        gm.recompile()
        return n

    def _want(self, q, kc, vc, pos):
        cond = torch.arange(kc.shape[2]) <= pos
        return F.scaled_dot_product_attention(q, repeat_kv(kc, 4), repeat_kv(vc, 4),
                                              attn_mask=cond[None, None, None])

    def test_efficient_attention_expanded_bias(self):
        """The efficient kernel takes the bias expanded to [B, H, 1, L] (attn_bias)."""
        def fn(q, kc, vc, pos):
            bias = float_mask(pos, L).expand(B, HKV * 4, 1, L)
            return aten._scaled_dot_product_efficient_attention(
                q, repeat_kv(kc, 4), repeat_kv(vc, 4), bias, False)[0]

        args = self._args()
        gm = traced(fn, *args)
        self.assertEqual(self._apply(gm), 1)
        self.assertEqual(counts(), {"matched": 1})
        assert_close(gm(*args), self._want(*args))

    def test_cudnn_aligned_bias(self):
        """SDPA's cuDNN path: where(mask, 0, -65536), padded to a multiple of 8 slots and sliced
        back to L (L = 30 here), expanded to [B, H, 1, L]."""
        length = 30

        def fn(q, kc, vc, pos):
            bias = F.pad(float_mask(pos, length, -65536.0), (0, 2))[..., :length]
            return aten._scaled_dot_product_cudnn_attention(
                q, repeat_kv(kc, 4), repeat_kv(vc, 4), bias.expand(B, HKV * 4, 1, length),
                False)[0]

        args = self._args(length)
        gm = traced(fn, *args)
        self.assertIn("aten.constant_pad_nd.default", lowerings.graph_ops(gm.graph))
        self.assertEqual(self._apply(gm), 1)
        self.assertEqual(counts(), {"matched": 1})
        assert_close(gm(*args), self._want(*args))

    def _near_miss(self, fn, args, reason):
        gm = traced(fn, *args)
        ops = lowerings.graph_ops(gm.graph)
        self.assertEqual(self._apply(gm), 0)
        self.assertEqual(counts(), {f"near_miss: {reason}": 1})
        self.assertEqual(lowerings.graph_ops(gm.graph), ops)  # left as it was

    def test_dropout(self):
        def fn(q, kc, vc, pos):
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, repeat_kv(kc, 4), repeat_kv(vc, 4), 0.5, attn_mask=float_mask(pos, L))[0]

        self._near_miss(fn, self._args(), "dropout")

    def test_flash_without_mask(self):
        def fn(q, kc, vc, pos):
            return aten._scaled_dot_product_flash_attention(
                q, repeat_kv(kc, 4), repeat_kv(vc, 4), is_causal=True)[0]

        self._near_miss(fn, self._args(), "flash SDPA without a mask (is_causal or no mask)")

    def test_value_head_size_or_dtype_differs(self):
        """Not reachable through F.scaled_dot_product_attention on the CPU (another value head
        size goes to SDPA's math; mixed dtypes are refused): the op form itself."""
        def fn(q, kc, vc, pos):
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, repeat_kv(kc, 4), repeat_kv(vc, 4), attn_mask=float_mask(pos, L))[0]

        reason = "key / value caches differ in shape or dtype from each other or the query"
        self._near_miss(fn, self._args(dv=2 * D), reason)
        lowerings.reset_counters()
        self._near_miss(fn, self._args(v_dtype=torch.bfloat16), reason)


# -- a Hugging Face Llama ----------------------------------------------------------------------
def _bench_hf():
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import bench_hf

    return bench_hf


def _hf_decode(with_mask: bool):
    """Greedy decode of a tiny float32 Llama (2 layers, 4 query / 2 KV heads) over a StaticCache
    of 64 slots after a 16-token prefill, eager then compiled, as bench_hf.cpu_check runs it; with
    `with_mask`, an explicit attention_mask of ones over the whole cache is passed too (one
    shape for every step: one compile). (eager tokens, logits, cache), (compiled ...)."""
    bench_hf = _bench_hf()
    config = bench_hf.llama_config(2, tiny=True)
    model = bench_hf.build_model(config, "cpu", torch.float32)
    batch, cache_len, context, steps = 2, 64, 16, 4

    def make_step(cache):
        if not with_mask:
            return bench_hf.make_step(model, cache)
        ones = torch.ones(batch, cache_len, dtype=torch.long)

        def step(token, pos):
            out = model(input_ids=token, past_key_values=cache, use_cache=True,
                        cache_position=pos, position_ids=pos.expand(token.shape[0], 1),
                        attention_mask=ones)
            logits = out.logits[:, -1]
            return logits.argmax(-1, keepdim=True), logits
        return step

    results = []
    for variant in ("eager", "compile_ops"):
        cache, first = bench_hf.prefill(model, config, batch, cache_len, context, "cpu", seed=1)
        fn = bench_hf.compiled(make_step(cache), variant)
        tokens, logits = bench_hf.decode(fn, first, context, steps, "cpu")
        results.append((tokens, logits, cache))
    return results


def _assert_hf_same(eager, got):
    assert torch.equal(got[0], eager[0]), (got[0].tolist(), eager[0].tolist())
    for a, b in zip(got[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for le, lc in zip(eager[2].layers, got[2].layers):  # the StaticCache written alike
        torch.testing.assert_close(lc.keys, le.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lc.values, le.values, atol=1e-5, rtol=1e-5)


def test_hf_llama_decode():
    """transformers' SDPA attention with its boolean causal mask: one rewrite per layer."""
    eager, got = _hf_decode(with_mask=False)
    assert counts() == {"matched": 2}, counts()
    assert ops_after().count(OP) == 2 and not any("scaled_dot_product" in o for o in ops_after())
    _assert_hf_same(eager, got)


def test_hf_llama_decode_with_attention_mask():
    """An explicit 2-d attention_mask makes transformers `and` a padding mask (from the tensor,
    unknown at compile time) into the causal one: not a form the pass can prove causal, so the op
    reads the mask (one rewrite per layer, one bounds computation); results equal eager's."""
    eager, got = _hf_decode(with_mask=True)
    assert counts() == {"matched": 2}, counts()
    after = ops_after()
    assert after.count(OP) == 2 and not any("scaled_dot_product" in o for o in after), after
    assert after.count("aten.amax.default") == 1, after
    _assert_hf_same(eager, got)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_hf_llama_decode(dtype):
    """The tiny Hugging Face Llama's decode step on the GPU under backend="compile_ops": every
    layer's attention rewritten (SDPA's CUDA forms: cuDNN / efficient attention with their mask
    preprocessing), the module-math RMSNorms rewritten and fused with the residual adds, the
    StaticCache written as eager writes it. float32: greedy tokens equal eager's over 4 steps and
    logits to float32 rounding; bfloat16: the first step's logits to bfloat16 rounding (greedy
    tokens of random bf16 weights tie within one bf16 step, so later steps may pick the other)."""
    import lowerings

    bench_hf = _bench_hf()
    config = bench_hf.llama_config(2, tiny=True)
    model = bench_hf.build_model(config, "cuda", dtype)
    batch, cache_len, context, steps = 2, 64, 16, 4
    results = []
    for variant in ("eager", "compile_ops"):
        torch._dynamo.reset()
        lowerings.reset_counters()
        cache, first = bench_hf.prefill(model, config, batch, cache_len, context, "cuda", seed=1)
        fn = bench_hf.compiled(bench_hf.make_step(model, cache), variant)
        tokens, logits = bench_hf.decode(fn, first, context, steps, "cuda")
        results.append((tokens, logits, cache))
    c = lowerings.counters()
    assert c["static_cache_attention"] == {"matched": 2}, c
    assert c["rms_norm_math"] == {"matched": 5}, c
    assert c["add_rms_norm"]["matched"] == 4, c
    (et, el, ec), (gt, gl, gc) = results
    if dtype == torch.float32:
        assert torch.equal(gt, et), (gt.tolist(), et.tolist())
        for a, b in zip(gl, el):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for le, lg in zip(ec.layers, gc.layers):
            torch.testing.assert_close(lg.keys, le.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lg.values, le.values, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(gl[0], el[0], atol=0.25, rtol=0.05)
        assert torch.equal(gt[:, 0], et[:, 0]) or \
            (el[0].topk(2).values.diff(dim=-1).abs() <= 0.0625).any()


# -- the default device policy on the CPU ------------------------------------------------------
def test_cpu_auto_policy_small_cache_left_to_inductor():
    """Under the default policy ("auto") a CPU graph whose repeat_kv copy is small stays
    Inductor's (the op's CPU body costs more than the copy it saves): a near miss saying so."""
    from lowerings.static_cache_attention import CPU_MIN_ELEMENTS

    args = inputs(4) + [graph_masks()["bool"]]
    with lowerings.pass_devices("auto"):
        eager, ea, got, ca = run(masked_step(), args)
    n = B * HKV * 4 * L * D
    assert counts() == {f"near_miss: CPU: repeat_kv copies {n} elements, below "
                        f"{CPU_MIN_ELEMENTS}: Inductor's own code is faster there": 1}, counts()
    assert OP not in ops_after()
    assert_same(eager, ea, got, ca)


def test_cpu_auto_policy_mha_left_to_inductor():
    """Multi-head attention (as many KV heads as query heads, Phi-3): no copy to save, so a
    CPU graph stays Inductor's whatever its size."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 8, 1, 128, generator=g), torch.randn(1, 8, 1, 128, generator=g),
               torch.randn(1, 8, 1, 128, generator=g))
    kc, vc = torch.randn(1, 8, 8192, 128, generator=g), torch.randn(1, 8, 8192, 128, generator=g)
    mask = (torch.arange(8192) <= 40)[None, None, None]
    with lowerings.pass_devices("auto"):
        eager, ea, got, ca = run(masked_step(groups=1), [q, k, v, kc, vc, torch.tensor([40]),
                                                         mask])
    assert counts() == {"near_miss: CPU: no repeat_kv copy to save (as many KV heads as query "
                        "heads): Inductor's own code is faster there": 1}, counts()
    assert_close(got, eager)


def test_cpu_auto_policy_large_cache_rewritten():
    """... and from CPU_MIN_ELEMENTS on (1 sequence, 32 query heads of 128, 2048 slots: 2**23)
    it is rewritten: the op reads the live slots, Inductor would copy the cache four times."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 32, 1, 128, generator=g), torch.randn(1, 8, 1, 128, generator=g),
               torch.randn(1, 8, 1, 128, generator=g))
    kc, vc = torch.randn(1, 8, 2048, 128, generator=g), torch.randn(1, 8, 2048, 128, generator=g)
    mask = (torch.arange(2048) <= 40)[None, None, None]
    with lowerings.pass_devices("auto"):
        eager, ea, got, ca = run(masked_step(), [q, k, v, kc, vc, torch.tensor([40]), mask])
    assert counts() == {"matched": 1}, counts()
    assert OP in ops_after()
    assert_close(got, eager)


def test_dynamic_shapes_are_a_near_miss():
    """A dynamic-shape compile (dynamic=True, or the automatic recompile after a second shape)
    gives symbolic sizes: left to Inductor with a near miss, never a crash (bench_static_cache's
    CPU check hit one: a SymInt in the bounds' cache key)."""
    fn = masked_step()
    args = inputs(4) + [graph_masks()["bool"]]
    ea, ca = [a.clone() for a in args], [a.clone() for a in args]
    with torch.no_grad():
        eager = fn(*ea)
        got = torch.compile(fn, backend="compile_ops", fullgraph=True, dynamic=True)(*ca)
    c = counts()
    assert len(c) == 1 and list(c)[0].startswith("near_miss: symbolic shapes"), c
    assert_same(eager, ea, got, ca)
