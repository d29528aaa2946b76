"""paged_attention_v1/v2 against a per-sequence float64 oracle over caches written with
reshape_and_cache: the reference (CPU), the checks, opcheck, the split plan, the Triton kernels of
the CUDA path (compile_ops/decode_attention.py) interpreted on the CPU (TRITON_INTERPRET=1, a
child process) and on the GPU."""

import math
import os
import subprocess
import sys

import pytest
import torch

from compile_ops.attention import PARTITION_SIZE, paged_attention_ref
from compile_ops.cache import dequantize_fp8_ref, quantize_fp8_ref
from compile_ops.testing import assert_close, assert_raises_eager_and_fake, softmax_tolerance

ops = torch.ops.compile_ops
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def setup(seq_lens, heads, kv_heads, head, bs, dtype, kv="auto", gen=None, alibi=False):
    """query, caches filled through reshape_and_cache at random blocks, block tables."""
    seqs = len(seq_lens)
    max_blocks = max(math.ceil(n / bs) for n in seq_lens) + 1
    nb = seqs * max_blocks + 3
    cdt = dtype if kv == "auto" else torch.uint8
    x = 16 // torch.empty(0, dtype=cdt).element_size()
    kc = torch.zeros(nb, kv_heads, head // x, bs, x, dtype=cdt)
    vc = torch.zeros(nb, kv_heads, head, bs, dtype=cdt)
    table = torch.randperm(nb, generator=gen)[:seqs * max_blocks].view(seqs, max_blocks)
    k_scale, v_scale = torch.tensor([0.25]), torch.tensor([0.5])
    for s, n in enumerate(seq_lens):
        key = torch.randn(n, kv_heads, head, generator=gen).to(dtype)
        val = torch.randn(n, kv_heads, head, generator=gen).to(dtype)
        p = torch.arange(n)
        slots = table[s, p // bs] * bs + p % bs
        ops.reshape_and_cache(key, val, kc, vc, slots, kv, k_scale, v_scale)
    query = torch.randn(seqs, heads, head, generator=gen).to(dtype)
    # Positive slopes, as ALiBi's are: the bias slope * (t - len + 1) is <= 0 and the largest
    # logits sit near 0. (Negative slopes made early tokens' logits ~ 0.5 * len ~ 550, where one
    # float32 ulp is 6e-5: the GPU's fused multiply-add of the bias then moved float32 outputs by
    # ~3e-5 from the twice-rounded reference, a rounding effect of the test, not a kernel error.)
    slopes = torch.rand(heads, generator=gen) * 0.5 + 0.01 if alibi else None
    return dict(query=query, key_cache=kc, value_cache=vc, block_tables=table.to(torch.int32),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), alibi_slopes=slopes,
                kv_cache_dtype=kv, k_scale=k_scale, v_scale=v_scale, num_kv_heads=kv_heads,
                scale=1.0 / math.sqrt(head))


def oracle(c):
    """Loop over sequences and heads, float64, keys read token by token."""
    q, kc, vc = c["query"], c["key_cache"], c["value_cache"]
    seqs, heads, head = q.shape
    bs, x = kc.shape[3], kc.shape[4]
    group = heads // c["num_kv_heads"]
    out = torch.zeros(seqs, heads, head, dtype=torch.float64)
    for s in range(seqs):
        n = int(c["seq_lens"][s])
        ks, vs = [], []
        for t in range(n):
            b, o = int(c["block_tables"][s, t // bs]), t % bs
            ks.append(kc[b, :, :, o, :].reshape(-1, head))
            vs.append(vc[b, :, :, o])
        K, V = torch.stack(ks), torch.stack(vs)  # [n, kv_heads, head]
        if c["kv_cache_dtype"] != "auto":
            fmt = FP8[c["kv_cache_dtype"]]
            K = dequantize_fp8_ref(K, float(c["k_scale"]), fmt, torch.float32)
            V = dequantize_fp8_ref(V, float(c["v_scale"]), fmt, torch.float32)
        for h in range(heads):
            kv = h // group
            logits = (K[:, kv].double() @ q[s, h].double()) * c["scale"]
            if c["alibi_slopes"] is not None:
                logits += float(c["alibi_slopes"][h]) * (torch.arange(n) - n + 1).double()
            out[s, h] = torch.softmax(logits, 0) @ V[:, kv].double()
    return out


def v1(c, out=None):
    out = torch.empty_like(c["query"]) if out is None else out
    bs = c["key_cache"].shape[3]
    ops.paged_attention_v1(out, c["query"], c["key_cache"], c["value_cache"], c["num_kv_heads"],
                           c["scale"], c["block_tables"], c["seq_lens"], bs,
                           int(c["seq_lens"].max()), c["alibi_slopes"], c["kv_cache_dtype"],
                           c["k_scale"], c["v_scale"])
    return out


def v2_buffers(c):
    seqs, heads, head = c["query"].shape
    parts = math.ceil(int(c["seq_lens"].max()) / PARTITION_SIZE)
    return (torch.empty_like(c["query"]), torch.full((seqs, heads, parts), float("nan")),
            torch.full((seqs, heads, parts), float("nan")),
            torch.empty(seqs, heads, parts, head, dtype=c["query"].dtype))


@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("head,bs", [(64, 16), (80, 8), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v1_matches_oracle(dtype, head, bs, heads, kv_heads, kv, gen):
    c = setup([1, 17, 40], heads, kv_heads, head, bs, dtype, kv, gen=gen, alibi=heads == 8)
    assert_close(v1(c), oracle(c).to(dtype))


def test_v2_partitions_reduce_to_v1(gen):
    c = setup([PARTITION_SIZE * 2 + 37, 5, PARTITION_SIZE], 4, 2, 64, 16, torch.float32, gen=gen)
    out, exp_sums, max_logits, tmp_out = v2_buffers(c)
    ops.paged_attention_v2(out, exp_sums, max_logits, tmp_out, c["query"], c["key_cache"],
                           c["value_cache"], c["num_kv_heads"], c["scale"], c["block_tables"],
                           c["seq_lens"], 16, int(c["seq_lens"].max()), None, "auto",
                           c["k_scale"], c["v_scale"])
    assert_close(out, v1(c))
    assert_close(out, oracle(c).float())
    # vLLM's reduce: rescale each partition by its exp sum and max, normalize
    parts = [math.ceil(int(n) / PARTITION_SIZE) for n in c["seq_lens"]]
    for s, n_parts in enumerate(parts):
        m, e, o = max_logits[s, :, :n_parts], exp_sums[s, :, :n_parts], tmp_out[s, :, :n_parts]
        w = e * torch.exp(m - m.amax(-1, keepdim=True))
        merged = (o * w[..., None]).sum(1) / w.sum(-1, keepdim=True)
        assert_close(merged, out[s])
        assert torch.isnan(max_logits[s, :, n_parts:]).all()  # partitions past the sequence


def test_reference_ignores_cache_past_seq_len(gen):
    c = setup([9], 2, 2, 64, 8, torch.float32, gen=gen)
    want = v1(c)
    b = int(c["block_tables"][0, 1])
    c["key_cache"][b, :, :, 1:] = 1e4  # tokens 9.. of the second block: past the sequence
    c["value_cache"][b, :, :, 1:] = float("nan")
    assert torch.equal(v1(c), want)


def test_opcheck(gen):
    c = setup([3, 20], 4, 2, 64, 16, torch.bfloat16, "fp8", gen=gen, alibi=True)
    args = (torch.empty_like(c["query"]), c["query"], c["key_cache"], c["value_cache"], 2,
            c["scale"], c["block_tables"], c["seq_lens"], 16, 20, c["alibi_slopes"], "fp8",
            c["k_scale"], c["v_scale"])
    torch.library.opcheck(ops.paged_attention_v1.default, args)
    out, es, ml, tmp = v2_buffers(c)
    torch.library.opcheck(ops.paged_attention_v2.default, (out, es.zero_(), ml.zero_(), tmp) +
                          args[1:])


def test_errors(gen):
    c = setup([3, 20], 4, 2, 64, 16, torch.float32, gen=gen)

    def call(**over):
        d = {**c, **over}
        out = d.pop("out", torch.empty_like(d["query"]))
        return lambda: ops.paged_attention_v1(
            out, d["query"], d["key_cache"], d["value_cache"], d["num_kv_heads"], d["scale"],
            d["block_tables"], d["seq_lens"], d.get("block_size", 16), d.get("max_len", 20),
            d["alibi_slopes"],
            d["kv_cache_dtype"], d["k_scale"], d["v_scale"], 0, 0, d.get("vert", 0))

    assert_raises_eager_and_fake(call(vert=8), ValueError, "blocksparse attention .* not "
                                 "supported")
    assert_raises_eager_and_fake(call(block_size=64), ValueError, "block_size 64 is not "
                                 "supported")
    assert_raises_eager_and_fake(call(num_kv_heads=3), ValueError,
                                 "num_kv_heads must divide num_heads 4")
    assert_raises_eager_and_fake(call(query=torch.randn(2, 4, 48)), ValueError,
                                 "head_size 48 is not supported")
    assert_raises_eager_and_fake(call(block_tables=c["block_tables"].long()), TypeError,
                                 "block_tables must be int32")
    assert_raises_eager_and_fake(call(kv_cache_dtype="int4"), ValueError,
                                 "unknown kv_cache_dtype 'int4'")
    assert_raises_eager_and_fake(call(alibi_slopes=torch.zeros(3)), ValueError,
                                 r"alibi_slopes must be float32 \[4\]")
    assert_raises_eager_and_fake(call(out=torch.empty(2, 4, 64, dtype=torch.float16)),
                                 TypeError, "out must have dtype torch.float32")
    bad = c["block_tables"].clone()
    bad[1, 0] = 10 ** 6
    with pytest.raises(IndexError, match="block_tables holds block 1000000"):
        call(block_tables=bad)()
    with pytest.raises(IndexError, match="needs 3 block-table columns"):
        call(block_tables=c["block_tables"][:, :1].contiguous(), max_len=40,
             seq_lens=torch.tensor([3, 40], dtype=torch.int32))()


def test_reference_function_equals_the_op(gen):
    c = setup([5, 33], 4, 2, 128, 16, torch.bfloat16, gen=gen)
    ref = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 2, c["scale"],
                              c["block_tables"], c["seq_lens"], None, "auto", c["k_scale"],
                              c["v_scale"])
    assert torch.equal(ref, v1(c))


def test_reference_raises_before_writing(gen):
    """seq_len above max_seq_len, a bad block id, a table too short: the op raises, out and v2's
    buffers untouched."""
    c = setup([3, 40], 4, 2, 64, 16, torch.float32, gen=gen)
    out, es, ml, tmp = v2_buffers(c)
    args = (c["query"], c["key_cache"], c["value_cache"], 2, c["scale"], c["block_tables"],
            c["seq_lens"], 16)
    rest = (None, "auto", c["k_scale"], c["v_scale"])
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 40 is above max_seq_len = 39"):
        ops.paged_attention_v2(out, es, ml, tmp, *args, 39, *rest)
    with pytest.raises(ValueError, match="is above max_seq_len"):
        ops.paged_attention_v1(out, *args, 39, *rest)
    assert torch.isnan(es).all() and torch.isnan(ml).all()
    bad = c["block_tables"].clone()
    bad[1, 2] = -3
    with pytest.raises(IndexError, match="block_tables holds block -3"):
        ops.paged_attention_v2(out, es, ml, tmp, *args[:5], bad, *args[6:], 40, *rest)
    assert torch.isnan(es).all()


def test_head_size_32(gen):
    c = setup([5, 19], 4, 1, 32, 8, torch.float32, gen=gen)
    assert_close(v1(c), oracle(c).float())


def converted_fp8_case(dtype, kv, gen, device="cpu"):
    """vLLM's FP8 paged-attention tests make their caches with convert_fp8 by blocks: a random
    model-dtype key cache of x = 8 ([blocks, kv_heads, head / 8, block, 8]) converted into an
    fp8 uint8 cache of x = 16 ([blocks, kv_heads, head / 16, block, 16]): the same elements per
    block, each block in its flat order (not the same key per token: the packing differs)."""
    nb, kv_heads, heads, head, bs, lens = 12, 2, 4, 64, 16, [5, 40, 17]
    src_k = torch.randn(nb, kv_heads, head // 8, bs, 8, generator=gen).to(dtype).to(device)
    src_v = torch.randn(nb, kv_heads, head, bs, generator=gen).to(dtype).to(device)
    kc = torch.empty(nb, kv_heads, head // 16, bs, 16, dtype=torch.uint8, device=device)
    vc = torch.empty(nb, kv_heads, head, bs, dtype=torch.uint8, device=device)
    ops.convert_fp8(kc, src_k, 0.25, kv)
    ops.convert_fp8(vc, src_v, 0.5, kv)
    table = torch.randperm(nb, generator=gen)[:9].view(3, 3).to(torch.int32)
    c = dict(query=torch.randn(3, heads, head, generator=gen).to(dtype), key_cache=kc,
             value_cache=vc, block_tables=table, seq_lens=torch.tensor(lens, dtype=torch.int32),
             alibi_slopes=None, kv_cache_dtype=kv, k_scale=torch.tensor([0.25]),
             v_scale=torch.tensor([0.5]), num_kv_heads=kv_heads, scale=1.0 / math.sqrt(head))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}, \
        src_k


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache_made_by_convert_fp8_blocks(dtype, kv, gen):
    """paged_attention (v1, v2) over an fp8 cache that convert_fp8 made from a cache of another
    x (vLLM's test flow), against the oracle reading the fp8 cache token by token by its own
    layout; the fp8 -> model-dtype direction (vLLM's reference) gives the flat order back."""
    c, src_k = converted_fp8_case(dtype, kv, gen)
    nb, kc = src_k.shape[0], c["key_cache"]
    fmt = FP8[kv]
    assert torch.equal(kc.view(nb, -1),
                       quantize_fp8_ref(src_k.reshape(nb, -1), 0.25, fmt).view(torch.uint8))
    want = oracle(c).to(dtype)
    assert_close(v1(c), want)
    out, es, ml, tmp = v2_buffers(c)
    ops.paged_attention_v2(out, es, ml, tmp, c["query"], kc, c["value_cache"], 2, c["scale"],
                           c["block_tables"], c["seq_lens"], 16, 40, None, kv, c["k_scale"],
                           c["v_scale"])
    assert_close(out, want)
    back = torch.empty_like(src_k)  # x = 8 again, as vLLM's reference reads it
    ops.convert_fp8(back, kc, 0.25, kv)
    assert torch.equal(back.view(nb, -1), dequantize_fp8_ref(kc.view(nb, -1), 0.25, fmt, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_cuda_fp8_cache_made_by_convert_fp8_blocks(kv, gen):
    """The same flow on the GPU: convert_fp8's kernels make the caches, the CUDA path attends."""
    c, src_k = converted_fp8_case(torch.bfloat16, kv, gen, "cuda")
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    ref_k = torch.empty(cpu["key_cache"].shape, dtype=torch.uint8)
    ops.convert_fp8(ref_k, src_k.cpu(), 0.25, kv)
    assert torch.equal(cpu["key_cache"], ref_k)
    assert_close(v1(c).cpu(), oracle(cpu).to(torch.bfloat16))


@pytest.mark.parametrize("seqs,kv_heads,context,want", [
    (1, 8, 512, "fine"), (64, 8, 4096, 512), (128, 8, 40, "direct"), (128, 8, 512, "direct")])
def test_plan_fills_the_gpu(seqs, kv_heads, context, want):
    from compile_ops.decode_attention import PARTITION, plan

    p = plan(seqs, 4 * kv_heads, kv_heads, 128, context, 2, sms=132)
    assert p.split & (p.split - 1) == 0 and p.block_n <= p.split <= PARTITION
    assert PARTITION % p.split == 0 and p.nsplit == -(-context // p.split)
    if want == "direct":
        assert p.direct
    elif want == "fine":  # one sequence: shorter splits, up to a wave of programs
        assert p.split < PARTITION and seqs * kv_heads * p.nsplit >= 2 * 8
    else:
        assert p.split == want


@pytest.mark.parametrize("seqs,context,v2,want", [
    (1, 512, False, 128), (1, 4096, False, 512), (8, 512, True, "direct"), (8, 4096, True, 512),
    (32, 4096, False, "direct"), (32, 4096, True, "sub512"), (64, 1024, True, "sub128"),
    (128, 512, True, "direct"), (16, 16384, False, "direct"), (20, 4096, False, 512)])
def test_plan_cuda(seqs, context, v2, want):
    """The CUDA kernel's plan: one CTA per (sequence, KV head) when those spread evenly over the
    SMs (v2 beyond 512 tokens: warp partials of sub-splits dividing 512); else 512-token splits,
    shorter ones only when the batch gives fewer than 32 CTAs."""
    from compile_ops.decode_attention import PARTITION, plan_cuda

    p = plan_cuda(seqs, 32, 8, context, sms=132, v2=v2)
    assert p.backend == "cuda" and p.slices == 1 and p.nsplit == -(-context // p.split)
    if want == "direct":
        assert p.direct and not p.sub
    elif str(want).startswith("sub"):
        assert p.sub == p.split == int(want[3:]) and not p.direct
    else:
        assert p.split == want and PARTITION % p.split == 0 and not p.sub
    assert plan_cuda(2, 40, 2, 100, sms=132, v2=False).slices == 2  # 20 heads per KV head


_INTERPRETED = r"""
import torch
from compile_ops import decode_attention as da
from compile_ops.attention import PARTITION_SIZE as P, paged_attention_ref
from compile_ops.testing import assert_close
from tests.ops.test_paged_attention import setup

gen = torch.Generator().manual_seed(5)

def run(c, max_len, plan_kw, v2=False, bad=None):
    q = c["query"]
    seqs, heads, head = q.shape
    lens = [int(n) for n in c["seq_lens"]]
    want, parts = paged_attention_ref(q, c["key_cache"], c["value_cache"], c["num_kv_heads"],
                                      c["scale"], bad if bad is not None else c["block_tables"],
                                      c["seq_lens"], c["alibi_slopes"], c["kv_cache_dtype"],
                                      c["k_scale"], c["v_scale"], partition_size=P)
    p = da.plan(seqs, heads, c["num_kv_heads"], head, max_len, c["key_cache"].element_size(),
                132, **plan_kw)
    out = torch.full_like(q, float("nan"))
    n = max(1, -(-max_len // P))
    bufs = (torch.full((seqs, heads, n), float("nan")), torch.full((seqs, heads, n), float("nan")),
            torch.full((seqs, heads, n, head), float("nan"), dtype=q.dtype)) if v2 else None
    da.paged_decode(out, q, c["key_cache"], c["value_cache"], c["num_kv_heads"], c["scale"],
                    c["block_tables"], c["seq_lens"], max_len, c["alibi_slopes"],
                    c["kv_cache_dtype"], c["k_scale"], c["v_scale"], v2=bufs, the_plan=p)
    assert_close(out, want, msg=str(p))
    if v2:
        es, ml, tmp = bufs
        for i, (o, m, s) in enumerate(parts):
            has = torch.tensor([k > i * P for k in lens])
            assert_close(ml[has, :, i], m[has], dtype=torch.float32)
            torch.testing.assert_close(es[has, :, i], s[has], rtol=1e-4, atol=1e-5)
            assert_close(tmp[has, :, i], o[has].to(q.dtype))
            assert torch.isnan(ml[~has, :, i]).all() and torch.isnan(tmp[~has, :, i]).all()
    return p

# fp16 (the interpreter's bf16 dot is wrong) and fp32; fp8 caches; ALiBi; empty sequences
for dtype, kv, heads, kvh, head, bs, lens, alibi, kw in [
        (torch.float16, "auto", 8, 2, 64, 16, [1, 37, 600, 0], True, dict(split=64)),
        (torch.float32, "fp8", 4, 4, 80, 8, [70, 513], False, dict(split=32)),
        (torch.float16, "fp8_e5m2", 16, 1, 128, 32, [33, 100], False, {}),
        (torch.float16, "auto", 128, 1, 32, 16, [45, 3], False, {}),  # two slices of 64 heads
        (torch.float32, "auto", 4, 2, 120, 16, [0, 0], False, {})]:
    c = setup(lens, heads, kvh, head, bs, dtype, kv, gen=gen, alibi=alibi)
    for v2 in (False, True):
        p = run(c, max(lens), kw, v2)
    print("ok", dtype, kv, heads, kvh, head, bs, lens, p.split, p.nsplit)

# one split per sequence (the first kernel writes the output), v2's partition 0 included
c = setup([20, 64], 4, 2, 64, 16, torch.float32, gen=gen)
assert run(c, 64, dict(split=64), v2=True).direct

# a seq_len above max_seq_len: the last split runs to the sequence's end (attended in full)
c = setup([300, 90], 4, 2, 64, 16, torch.float16, gen=gen)
for kw in (dict(split=32), dict(split=512)):
    run(c, 100, kw)
print("ok longer than max_seq_len")

# a bad block id: its page is left out (read as block 0, masked), nothing outside the cache
c = setup([40], 2, 2, 64, 16, torch.float32, gen=gen)
good = c["block_tables"].clone()
c["block_tables"][0, 1] = 10 ** 6
want = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 2, c["scale"], good,
                           torch.tensor([16], dtype=torch.int32), None, "auto", c["k_scale"],
                           c["v_scale"])
c2 = dict(c, seq_lens=torch.tensor([32], dtype=torch.int32))
out = torch.empty_like(c["query"])
da.paged_decode(out, c["query"], c["key_cache"], c["value_cache"], 2, c["scale"],
                c["block_tables"], c2["seq_lens"], 32, None, "auto", c["k_scale"], c["v_scale"])
assert_close(out, want)
print("ok bad block left out")

# a value cache whose pages are not a fresh cache's (padded token dim): the strided path
c = setup([45, 3], 4, 2, 64, 16, torch.float16, "fp8", gen=gen)
vc = c["value_cache"]
padded = torch.zeros(*vc.shape[:3], vc.shape[3] + 1, dtype=vc.dtype)[..., :vc.shape[3]]
padded.copy_(vc)
assert not da._dense_pages(c["key_cache"], padded)
out = torch.empty_like(c["query"])
da.paged_decode(out, c["query"], c["key_cache"], padded, 2, c["scale"], c["block_tables"],
                c["seq_lens"], 45, None, "fp8", c["k_scale"], c["v_scale"])
want = paged_attention_ref(c["query"], c["key_cache"], vc, 2, c["scale"], c["block_tables"],
                           c["seq_lens"], None, "fp8", c["k_scale"], c["v_scale"])
assert_close(out, want)
print("triton interpreted ok")
"""


def test_triton_kernels_interpreted_on_cpu():
    """The CUDA path's Triton kernels, run by Triton's interpreter on CPU tensors (a child process:
    TRITON_INTERPRET is read at import): every split mode, v2's buffers, fp8, ALiBi, sliced GQA
    groups, empty sequences, a seq_len above max_seq_len, a bad block id, a strided value cache."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton interpreted ok" in proc.stdout


# ---------------------------------------------------------------------------------------------
# CUDA (the Triton split-KV kernels)
# ---------------------------------------------------------------------------------------------
def to_cuda(c):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}


# Every head size, block size, kv dtype, query dtype and GQA ratio (1 to 8, 16 with ALiBi) at
# least once, in varied pairs (a full cross product would compile hundreds of kernels).
CUDA_CASES = [
    (dtype, heads, kvh, bs, head, kv)
    for i, (head, bs, kv, (heads, kvh)) in enumerate([
        (32, 16, "auto", (32, 8)), (64, 8, "fp8", (8, 8)), (80, 16, "auto", (16, 1)),
        (96, 32, "fp8_e5m2", (32, 8)), (112, 8, "auto", (24, 4)), (120, 32, "auto", (12, 2)),
        (128, 16, "fp8", (32, 8)), (128, 8, "fp8_e5m2", (16, 2)), (128, 32, "auto", (64, 8)),
        (192, 16, "auto", (8, 8)), (256, 16, "fp8", (32, 8)), (256, 8, "auto", (16, 1)),
        (64, 32, "auto", (28, 4)), (128, 16, "auto", (40, 5))])
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    if not (kv != "auto" and head % 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,heads,kv_heads,bs,head,kv", CUDA_CASES)
def test_cuda_v1_v2(dtype, heads, kv_heads, bs, head, kv, gen):
    c = setup([1, 300, 1100, 0], heads, kv_heads, head, bs, dtype, kv, gen=gen,
              alibi=kv_heads == 1)
    want, parts = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], kv_heads,
                                      c["scale"], c["block_tables"], c["seq_lens"],
                                      c["alibi_slopes"], kv, c["k_scale"], c["v_scale"],
                                      partition_size=PARTITION_SIZE)
    g = to_cuda(c)
    assert_close(v1(g, torch.full_like(g["query"], float("nan"))), want)
    out, es, ml, tmp = (t.cuda() for t in v2_buffers(c))
    ops.paged_attention_v2(out, es, ml, tmp, g["query"], g["key_cache"], g["value_cache"],
                           kv_heads, g["scale"], g["block_tables"], g["seq_lens"], bs, 1100,
                           g["alibi_slopes"], kv, g["k_scale"], g["v_scale"])
    assert_close(out, want)
    lens = c["seq_lens"].tolist()
    for i, (o, m, s) in enumerate(parts):  # v2's partitions, as the reference has them
        has = torch.tensor([n > i * PARTITION_SIZE for n in lens])
        assert_close(ml.cpu()[has, :, i], m[has], dtype=torch.float32)
        torch.testing.assert_close(es.cpu()[has, :, i], s[has], rtol=1e-4, atol=1e-5)
        # A partition far from the sequence's end (ALiBi) has logits ~ -300: softmax_tolerance.
        big = float(m[has].abs().max()) if bool(has.any()) else 0.0
        torch.testing.assert_close(tmp.cpu()[has, :, i].to(o.dtype), o[has].to(dtype).to(o.dtype),
                                   **softmax_tolerance(dtype, big))
        assert torch.isnan(ml.cpu()[~has, :, i]).all()  # partitions past a sequence: untouched


@pytest.mark.cuda
@pytest.mark.parametrize("split", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_cuda_every_split(split, kv, gen):
    """Each split length (the plan picks one from the batch size) gives the reference's result,
    v2's partition statistics included (splits below 512 tokens are merged per partition)."""
    from compile_ops import decode_attention as da

    c = setup([1, 511, 513, 1500], 32, 8, 128, 16, torch.bfloat16, kv, gen=gen)
    want, parts = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 8,
                                      c["scale"], c["block_tables"], c["seq_lens"], None, kv,
                                      c["k_scale"], c["v_scale"], partition_size=PARTITION_SIZE)
    g = to_cuda(c)
    out, es, ml, tmp = (t.cuda() for t in v2_buffers(c))
    p = da.plan(4, 32, 8, 128, 1500, g["key_cache"].element_size(), 132, split=split)
    da.paged_decode(out, g["query"], g["key_cache"], g["value_cache"], 8, g["scale"],
                    g["block_tables"], g["seq_lens"], 1500, None, kv, g["k_scale"], g["v_scale"],
                    v2=(es, ml, tmp), the_plan=p)
    assert_close(out, want)
    for i, (o, m, s) in enumerate(parts):
        has = torch.tensor([n > i * PARTITION_SIZE for n in c["seq_lens"].tolist()])
        assert_close(tmp.cpu()[has, :, i], o[has].to(torch.bfloat16))
        torch.testing.assert_close(es.cpu()[has, :, i], s[has], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [32, 64, 128, 256, 512, 2048])
@pytest.mark.parametrize("kv,bs,dtype", [("auto", 8, torch.bfloat16), ("auto", 32, torch.float16),
                                         ("fp8", 16, torch.bfloat16), ("fp8_e5m2", 32,
                                                                       torch.bfloat16),
                                         ("fp8", 32, torch.float16)])
def test_cuda_kernel_every_split(split, kv, bs, dtype, gen):
    """The CUDA kernel (csrc/include/compile_ops/decode_attention.cuh) at each split length,
    one split per sequence (2048) included, v1 and v2, ALiBi, an empty sequence, 20 query heads
    per KV head (two slices of 16): the reference's results and v2 partition statistics."""
    from compile_ops import decode_attention as da

    c = setup([1, 511, 513, 1500, 0], 40, 2, 128, bs, dtype, kv, gen=gen, alibi=True)
    want, parts = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 2,
                                      c["scale"], c["block_tables"], c["seq_lens"],
                                      c["alibi_slopes"], kv, c["k_scale"], c["v_scale"],
                                      partition_size=PARTITION_SIZE)
    g = to_cuda(c)
    for v2 in ((False, True) if split <= PARTITION_SIZE else (False,)):
        p = da.plan_cuda(5, 40, 2, 1500, 132, v2, split=split)
        assert p.backend == "cuda"
        out = torch.full_like(g["query"], float("nan"))
        bufs = tuple(t.cuda() for t in v2_buffers(c))[1:] if v2 else None
        da.paged_decode(out, g["query"], g["key_cache"], g["value_cache"], 2, g["scale"],
                        g["block_tables"], g["seq_lens"], 1500, g["alibi_slopes"], kv,
                        g["k_scale"], g["v_scale"], v2=bufs, the_plan=p)
        assert_close(out, want)
        if v2:
            es, ml, tmp = bufs
            for i, (o, m, s) in enumerate(parts):
                has = torch.tensor([n > i * PARTITION_SIZE for n in c["seq_lens"].tolist()])
                assert_close(tmp.cpu()[has, :, i], o[has].to(dtype))
                torch.testing.assert_close(es.cpu()[has, :, i], s[has], rtol=1e-4, atol=1e-5)
                assert torch.isnan(ml.cpu()[~has, :, i]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("sub", [128, 256, 512])
@pytest.mark.parametrize("kv,dtype", [("auto", torch.bfloat16), ("fp8", torch.float16)])
def test_cuda_kernel_warp_partials(sub, kv, dtype, gen):
    """v2 with one CTA per (sequence, KV head) and warp partials of `sub` tokens: v2's partition
    statistics and output as the reference has them; a seq_len past max_seq_len attended in
    full (the last sub-split runs to the end)."""
    from compile_ops import decode_attention as da

    c = setup([1, 511, 513, 2500, 0], 32, 8, 128, 16, dtype, kv, gen=gen, alibi=True)
    want, parts = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 8,
                                      c["scale"], c["block_tables"], c["seq_lens"],
                                      c["alibi_slopes"], kv, c["k_scale"], c["v_scale"],
                                      partition_size=PARTITION_SIZE)
    g = to_cuda(c)
    out = torch.full_like(g["query"], float("nan"))
    es, ml, tmp = (t.cuda() for t in v2_buffers(c)[1:])
    p = da.plan_cuda(5, 32, 8, 2500, 132, True, sub=sub)
    assert p.sub == sub
    da.paged_decode(out, g["query"], g["key_cache"], g["value_cache"], 8, g["scale"],
                    g["block_tables"], g["seq_lens"], 2500, g["alibi_slopes"], kv,
                    g["k_scale"], g["v_scale"], v2=(es, ml, tmp), the_plan=p)
    assert_close(out, want)
    for i, (o, m, s) in enumerate(parts):
        has = torch.tensor([n > i * PARTITION_SIZE for n in c["seq_lens"].tolist()])
        assert_close(tmp.cpu()[has, :, i], o[has].to(dtype))
        torch.testing.assert_close(es.cpu()[has, :, i], s[has], rtol=1e-4, atol=1e-5)
        assert torch.isnan(ml.cpu()[~has, :, i]).all()
    # max_seq_len 1000 for a 2500-token sequence: the last sub-split covers the rest.
    p = da.plan_cuda(5, 32, 8, 1000, 132, False, sub=sub)
    out.fill_(float("nan"))
    da.paged_decode(out, g["query"], g["key_cache"], g["value_cache"], 8, g["scale"],
                    g["block_tables"], g["seq_lens"], 1000, g["alibi_slopes"], kv,
                    g["k_scale"], g["v_scale"], the_plan=p)
    assert_close(out, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,head,kv,bs,backend", [
    (torch.bfloat16, 128, "auto", 16, "cuda"), (torch.float16, 64, "fp8", 16, "cuda"),
    (torch.bfloat16, 256, "fp8_e5m2", 32, "cuda"), (torch.float16, 32, "auto", 8, "cuda"),
    (torch.float32, 128, "auto", 16, "triton"), (torch.bfloat16, 120, "auto", 16, "triton"),
    (torch.bfloat16, 128, "fp8", 8, "triton")])
def test_cuda_dispatch(dtype, head, kv, bs, backend, gen, monkeypatch):
    """Which kernel runs: CUDA for float16 / bfloat16 queries, head sizes that are multiples of
    16, value rows >= 16 bytes; Triton otherwise, or everywhere with
    COMPILE_OPS_DECODE_ATTENTION=triton. Same results either way."""
    from compile_ops import decode_attention as da

    c = setup([30, 300], 8, 2, head, bs, dtype, kv, gen=gen)
    want = v1(c)
    g = to_cuda(c)
    for env, expect in (("", backend), ("triton", "triton")):
        monkeypatch.setenv("COMPILE_OPS_DECODE_ATTENTION", env)
        out = torch.empty_like(g["query"])
        p = da.paged_decode(out, g["query"], g["key_cache"], g["value_cache"], 2, g["scale"],
                            g["block_tables"], g["seq_lens"], 300, None, kv, g["k_scale"],
                            g["v_scale"])
        assert p.backend == expect
        assert_close(out, want)


@pytest.mark.cuda
@pytest.mark.parametrize("context", [1, 4096, 32768])
def test_cuda_long_contexts_and_batch(context, gen):
    lens = [context] + [max(1, context // 3)] * 3
    c = setup(lens, 32, 8, 128, 16, torch.bfloat16, gen=gen)
    assert_close(v1(to_cuda(c)), v1(c))


@pytest.mark.cuda
@pytest.mark.full_tier  # 135 s on the H200 (its CPU reference): v1 with fp8 runs in quick anyway
def test_cuda_batch_128(gen):
    c = setup([int(n) for n in torch.randint(1, 600, (128,), generator=gen)], 8, 2, 128, 16,
              torch.bfloat16, "fp8", gen=gen)
    assert_close(v1(to_cuda(c)), v1(c))


@pytest.mark.cuda
def test_cuda_longer_than_max_seq_len_is_attended_in_full(gen):
    c = setup([700, 90], 8, 2, 64, 16, torch.float16, gen=gen)
    want = v1(c)  # max_seq_len = 700 on the CPU
    g = to_cuda(c)
    out = torch.empty_like(g["query"])
    ops.paged_attention_v1(out, g["query"], g["key_cache"], g["value_cache"], 2, g["scale"],
                           g["block_tables"], g["seq_lens"], 16, 100, None, "auto", g["k_scale"],
                           g["v_scale"])
    assert_close(out, want)


@pytest.mark.cuda
def test_cuda_validate_raises_before_writing(gen, monkeypatch):
    monkeypatch.setenv("COMPILE_OPS_VALIDATE", "1")
    cpu = setup([30, 70], 4, 2, 64, 16, torch.bfloat16, gen=gen)
    c = to_cuda(cpu)
    out, es, ml, tmp = (t.cuda() for t in v2_buffers(cpu))
    out.fill_(7)
    tmp.fill_(float("nan"))

    def call(block_tables=c["block_tables"], max_len=70):
        ops.paged_attention_v2(out, es, ml, tmp, c["query"], c["key_cache"], c["value_cache"], 2,
                               c["scale"], block_tables, c["seq_lens"], 16, max_len, None, "auto",
                               c["k_scale"], c["v_scale"])

    with pytest.raises(ValueError, match="is above max_seq_len = 69"):
        call(max_len=69)
    bad = c["block_tables"].clone()
    bad[1, 3] = c["key_cache"].shape[0]
    with pytest.raises(IndexError, match="outside the cache"):
        call(block_tables=bad)
    with pytest.raises(IndexError, match="block-table columns"):
        call(block_tables=c["block_tables"][:, :2].contiguous())
    assert (out == 7).all() and torch.isnan(es).all() and torch.isnan(tmp).all()
    call()  # valid input: runs
    assert_close(out, v1(cpu))


@pytest.mark.cuda
def test_cuda_bad_block_ids_are_left_out(gen):
    c = setup([40], 2, 2, 64, 16, torch.float32, gen=gen)
    good = c["block_tables"].clone()
    c["block_tables"][0, 1] = 10 ** 6  # tokens 16..31 point outside the cache
    c["block_tables"][0, 2] = -1  # tokens 32..39 too
    want = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 2, c["scale"], good,
                               torch.tensor([16], dtype=torch.int32), None, "auto",
                               c["k_scale"], c["v_scale"])
    assert_close(v1(to_cuda(c)), want)  # attention over the 16 tokens with valid blocks


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_cuda_strided_caches_and_outputs(kv, gen):
    """Value pages not laid out as a fresh cache's (padded token dim), a strided out, a
    non-contiguous block table and v2 buffers with padding: the general path, same results."""
    c = setup([45, 600], 8, 2, 128, 16, torch.bfloat16, kv, gen=gen)
    want = v1(c)
    g = to_cuda(c)
    vc = g["value_cache"]
    padded = torch.zeros(*vc.shape[:3], vc.shape[3] + 1, dtype=vc.dtype,
                         device="cuda")[..., :vc.shape[3]]
    padded.copy_(vc)
    out = torch.full((2, 8, 130), float("nan"), dtype=torch.bfloat16, device="cuda")[..., 1:129]
    table = torch.zeros(2, 2 * g["block_tables"].shape[1], dtype=torch.int32,
                        device="cuda")[:, ::2]
    table.copy_(g["block_tables"])
    es = torch.full((2, 8, 3), float("nan"), device="cuda")[..., :2]
    ml = torch.full((2, 8, 2), float("nan"), device="cuda")
    tmp = torch.full((2, 8, 2, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    ops.paged_attention_v2(out, es, ml, tmp, g["query"], g["key_cache"], padded, 2, g["scale"],
                           table, g["seq_lens"], 16, 600, None, kv, g["k_scale"], g["v_scale"])
    assert_close(out, want)
    assert not torch.isnan(es[1]).any() and torch.isnan(es[0, :, 1]).all()


@pytest.mark.cuda
def test_cuda_graph_and_compile(gen):
    """Under torch.compile(fullgraph) and CUDA-graph capture (mode="reduce-overhead")."""
    c = to_cuda(setup([33, 900], 32, 8, 128, 16, torch.bfloat16, gen=gen))
    want = v1(c)

    def f(q):
        out = torch.empty_like(q)
        ops.paged_attention_v1(out, q, c["key_cache"], c["value_cache"], 8, c["scale"],
                               c["block_tables"], c["seq_lens"], 16, 900, None, "auto",
                               c["k_scale"], c["v_scale"])
        return out * 1

    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        fn = torch.compile(f, fullgraph=True, mode=mode)
        for _ in range(3):
            got = fn(c["query"])
        assert_close(got, want)
