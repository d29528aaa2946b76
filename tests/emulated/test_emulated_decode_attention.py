"""The CUDA split-KV decode attention (csrc/include/compile_ops/decode_attention.cuh: the narrow
kernel for GQA groups up to 8, the wide one above), host-compiled
and run in the cooperative schedule: each CTA's 128 threads at once, the warp primitives
(ldmatrix, mma.sync m16n8k16, cp.async, shuffles, ballots) computed from the emulated warp's
registers as the PTX manual defines them. This checks the kernel's fragment layouts, the
k / token permutations of the FP8 path, the per-warp pipelines, the masks of tails and bad pages,
the merge of the warps and the partials' format against the reference, on the CPU. (What it
cannot check: timing, asynchrony, real bank conflicts; that is the H200's job.)

Kept small: an emulated MMA exchanges registers through barriers of OS threads.
"""

import math

import pytest
import torch

from compile_ops.attention import PARTITION_SIZE, paged_attention_ref
from compile_ops.decode_attention import _KV_CODE
from compile_ops.testing import assert_close
from tests.ops.test_paged_attention import setup


def run_kernel(emu, c, split, nsplit, v2=False, sub=0, p_split=True):
    """Call the emulated launcher with the plan (split, nsplit); merge the partials in float64
    as decode_attention.py's merge kernel does (warp partials: the kernel merges them). Returns
    (out, v2 buffers or None)."""
    q = c["query"]
    seqs, heads, head = q.shape
    kvh = c["num_kv_heads"]
    out = torch.full_like(q, float("nan"))
    direct = nsplit == 1 and not sub
    po = torch.full((seqs, heads, nsplit, head), float("nan"))
    pm = torch.full((seqs, heads, nsplit), float("nan"))
    pl = torch.full((seqs, heads, nsplit), float("nan"))
    parts = max(1, math.ceil(int(c["seq_lens"].max()) / PARTITION_SIZE))
    ml = torch.full((seqs, heads, parts), float("nan"))
    es = torch.full((seqs, heads, parts), float("nan"))
    tmp = torch.full((seqs, heads, parts, head), float("nan"), dtype=q.dtype)
    bufs = (ml, es, tmp) if (v2 and (direct or sub)) else (None, None, None)
    emu.paged_decode_attention(
        out, q, c["key_cache"], c["value_cache"], c["block_tables"], c["seq_lens"],
        c["alibi_slopes"], c["k_scale"], c["v_scale"], None if direct else po,
        None if direct else pm, None if direct else pl, *bufs, c["scale"],
        _KV_CODE[c["kv_cache_dtype"]], split, nsplit, kvh, sub, p_split)
    if direct or sub:  # warp partials: the kernel merges them itself
        return out, ((ml, es, tmp) if v2 else None)
    lens = c["seq_lens"].clamp(min=0)
    for s in range(seqs):
        n = min(math.ceil(int(lens[s]) / split), nsplit)
        if n == 0:
            out[s] = 0
            continue
        m, l, o = pm[s, :, :n].double(), pl[s, :, :n].double(), po[s, :, :n].double()
        assert not torch.isnan(o).any() and not torch.isnan(l).any()
        mm = m.max(1, keepdim=True).values
        mm = torch.where(torch.isinf(mm), 0.0, mm)
        w = l * torch.exp2(m - mm)  # partial maxima in base 2
        tot = w.sum(1)
        out[s] = ((w[..., None] * o).sum(1) / torch.where(tot > 0, tot, 1.0)[:, None]).to(q.dtype)
        assert torch.isnan(pm[s, :, n:]).all()  # splits past the sequence: not written
    return out, None


def reference(c, max_len=None):
    return paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], c["num_kv_heads"],
                               c["scale"], c["block_tables"], c["seq_lens"], c["alibi_slopes"],
                               c["kv_cache_dtype"], c["k_scale"], c["v_scale"],
                               partition_size=PARTITION_SIZE)


CASES = [
    # (dtype, heads, kv_heads, head, bs, kv, lens, split, nsplit, alibi)
    (torch.bfloat16, 8, 2, 32, 16, "auto", [37, 0, 70], 64, 2, False),
    (torch.float16, 4, 1, 64, 8, "auto", [45, 3], 32, 2, True),
    (torch.bfloat16, 2, 2, 128, 32, "auto", [81], 96, 1, False),
    (torch.bfloat16, 8, 2, 32, 16, "fp8", [37, 70], 32, 3, False),
    (torch.float16, 4, 2, 64, 32, "fp8_e5m2", [50, 1], 64, 1, True),
    (torch.bfloat16, 2, 1, 80, 16, "fp8", [33], 64, 1, False),
    (torch.float16, 18, 1, 32, 16, "auto", [20], 32, 1, False),  # two 16-head slices
    # FP8 keys read 16 bytes per lane (head / 16 a multiple of 4)
    (torch.bfloat16, 4, 2, 64, 16, "fp8", [70, 5], 64, 2, True),
    (torch.float16, 2, 1, 128, 32, "fp8_e5m2", [50], 32, 2, False),
    # groups above 8: the wide kernel (16 heads as M), FP8 keys read 16 and 4 bytes per lane
    (torch.bfloat16, 12, 1, 128, 16, "fp8", [40, 19], 32, 2, True),
    (torch.float16, 16, 1, 96, 32, "fp8_e5m2", [45], 64, 1, False),
    (torch.bfloat16, 10, 1, 64, 8, "auto", [33], 32, 2, False),
]


@pytest.mark.parametrize("dtype,heads,kv_heads,head,bs,kv,lens,split,nsplit,alibi", CASES)
def test_decode_kernel_matches_reference(coop, dtype, heads, kv_heads, head, bs, kv, lens, split,
                                         nsplit, alibi):
    gen = torch.Generator().manual_seed(7)
    c = setup(lens, heads, kv_heads, head, bs, dtype, kv, gen=gen, alibi=alibi)
    want, parts = reference(c)
    got, bufs = run_kernel(coop, c, split, nsplit, v2=True)
    assert_close(got, want)
    if bufs is not None and parts:  # one split: partition 0 of v2's buffers
        ml, es, tmp = bufs
        o, m, s = parts[0]
        has = c["seq_lens"] > 0
        assert_close(tmp[has, :, 0], o[has].to(dtype))
        torch.testing.assert_close(ml[has, :, 0], m[has], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(es[has, :, 0], s[has], rtol=1e-4, atol=1e-5)
        assert torch.isnan(ml[~has]).all()


def test_decode_kernel_bad_pages_and_long_sequences(coop):
    """Block ids outside the cache (and -1) are left out, never read; a sequence longer than the
    plan's nsplit x split is attended in full by its last split."""
    gen = torch.Generator().manual_seed(3)
    c = setup([40, 40], 4, 2, 32, 8, torch.bfloat16, gen=gen)
    nb = c["key_cache"].shape[0]
    c["block_tables"][0, 1] = nb + 5  # tokens 8-15 of sequence 0
    c["block_tables"][1, 2] = -1  # tokens 16-23 of sequence 1
    q, kc, vc = c["query"], c["key_cache"], c["value_cache"]
    got, _ = run_kernel(coop, c, 32, 1)  # one split of 32 tokens: runs to the end (40)
    # The reference of the same attention without the bad pages' tokens.
    keep = [[t for t in range(40) if t // 8 != 1] for _ in range(1)] + \
        [[t for t in range(40) if t // 8 != 2]]
    for s in range(2):
        idx = torch.tensor(keep[s])
        blk = c["block_tables"][s].long()[idx // 8]
        K = kc[blk, :, :, idx % 8, :].reshape(len(idx), 2, 32).float()
        V = vc[blk, :, :, idx % 8].float()
        for h in range(4):
            lg = (K[:, h // 2] @ q[s, h].float()) * c["scale"]
            want = torch.softmax(lg, 0) @ V[:, h // 2]
            assert_close(got[s, h], want.to(torch.bfloat16))


def test_decode_kernel_stale_nan_past_the_end_is_masked(coop):
    """Values past a sequence's end (stale pages: NaN here) never reach the output."""
    gen = torch.Generator().manual_seed(5)
    c = setup([21], 2, 1, 32, 16, torch.float16, gen=gen)
    blk = int(c["block_tables"][0, 1])
    c["value_cache"][blk, :, :, 5:] = float("nan")
    c["key_cache"][blk, :, :, 5:, :] = float("nan")
    want, _ = reference(c)
    got, _ = run_kernel(coop, c, 32, 1)
    assert_close(got, want)


@pytest.mark.parametrize("kv,dtype,bs", [("auto", torch.bfloat16, 16), ("fp8", torch.float16, 32),
                                         ("auto", torch.float16, 8)])
def test_decode_kernel_warp_partials(coop, kv, dtype, bs):
    """Args::sub: one CTA per (sequence, KV head), warp w writing the partials of sub-splits
    w, w + 4, ...; the last sub-split runs to the sequence's end (here 200 tokens with
    nsplit x sub = 96: a seq_len above max_seq_len)."""
    gen = torch.Generator().manual_seed(11)
    c = setup([70, 200, 0, 33], 8, 2, 32, bs, dtype, kv, gen=gen, alibi=True)
    want, _ = reference(c)
    got, _ = run_kernel(coop, c, 32, 3, sub=32)
    assert_close(got, want)


@pytest.mark.parametrize("kv,dtype,sub", [("auto", torch.bfloat16, 128),
                                          ("fp8_e5m2", torch.float16, 256)])
def test_decode_kernel_warp_partials_v2(coop, kv, dtype, sub):
    """v2 with warp partials, merged by the CTA itself: each 512-token partition (its sub-splits
    come from several warps) gets max_logits / exp_sums / tmp_out as the reference has them,
    partitions past a sequence's end keep their values, an empty sequence's output is 0."""
    gen = torch.Generator().manual_seed(17)
    c = setup([1100, 0, 513], 4, 2, 32, 16, dtype, kv, gen=gen, alibi=True)
    want, parts = reference(c)
    got, (ml, es, tmp) = run_kernel(coop, c, sub, math.ceil(1100 / sub), v2=True, sub=sub)
    assert_close(got, want)
    assert (got[1] == 0).all()
    assert len(parts) == 3
    for i, (o, m, s) in enumerate(parts):
        has = c["seq_lens"] > i * PARTITION_SIZE
        assert_close(tmp[has, :, i], o[has].to(dtype))
        torch.testing.assert_close(ml[has, :, i], m[has], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(es[has, :, i], s[has], rtol=1e-4, atol=1e-5)
        assert torch.isnan(ml[~has, :, i]).all() and torch.isnan(tmp[~has, :, i]).all()


@pytest.mark.parametrize("kv", ["auto", "fp8_e5m2"])
def test_decode_kernel_one_part_p(coop, kv):
    """p_split off: P V with P as one 16-bit part."""
    gen = torch.Generator().manual_seed(13)
    c = setup([90, 17], 4, 1, 64, 16, torch.float16, kv, gen=gen)
    want, _ = reference(c)
    got, _ = run_kernel(coop, c, 64, 2, p_split=False)
    assert_close(got, want)
