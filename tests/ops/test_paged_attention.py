"""paged_attention_v1/v2 (references, checks, opcheck; CUDA kernels still to come) against a
per-sequence float64 oracle over caches written with reshape_and_cache."""

import math

import pytest
import torch

from compile_ops.attention import PARTITION_SIZE, paged_attention_ref
from compile_ops.cache import dequantize_fp8_ref
from compile_ops.testing import assert_close, assert_raises_eager_and_fake

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
            d["block_tables"], d["seq_lens"], d.get("block_size", 16), 20, d["alibi_slopes"],
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
        call(block_tables=c["block_tables"][:, :1].contiguous(),
             seq_lens=torch.tensor([3, 40], dtype=torch.int32))()


def test_reference_function_equals_the_op(gen):
    c = setup([5, 33], 4, 2, 128, 16, torch.bfloat16, gen=gen)
    ref = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], 2, c["scale"],
                              c["block_tables"], c["seq_lens"], None, "auto", c["k_scale"],
                              c["v_scale"])
    assert torch.equal(ref, v1(c))


# ---------------------------------------------------------------------------------------------
# CUDA (the kernels: partition + reduce)
# ---------------------------------------------------------------------------------------------
def to_cuda(c):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("head", [64, 80, 96, 112, 128, 192, 256])
@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (8, 8), (16, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_v1_v2(dtype, heads, kv_heads, bs, head, kv, gen):
    c = setup([1, 300, 1100], heads, kv_heads, head, bs, dtype, kv, gen=gen,
              alibi=kv_heads == 1)
    want = v1(c)  # the CPU reference
    g = to_cuda(c)
    assert_close(v1(g), want)
    out, es, ml, tmp = (t.cuda() for t in v2_buffers(c))
    ops.paged_attention_v2(out, es, ml, tmp, g["query"], g["key_cache"], g["value_cache"],
                           kv_heads, g["scale"], g["block_tables"], g["seq_lens"], bs, 1100,
                           g["alibi_slopes"], kv, g["k_scale"], g["v_scale"])
    assert_close(out, want)


@pytest.mark.cuda
@pytest.mark.parametrize("context", [1, 4096, 32768])
def test_cuda_long_contexts_and_batch(context, gen):
    lens = [context] + [max(1, context // 3)] * 3
    c = setup(lens, 32, 8, 128, 16, torch.bfloat16, gen=gen)
    assert_close(v1(to_cuda(c)), v1(c))


@pytest.mark.cuda
def test_cuda_batch_128(gen):
    c = setup([int(n) for n in torch.randint(1, 600, (128,), generator=gen)], 8, 2, 128, 16,
              torch.bfloat16, "fp8", gen=gen)
    assert_close(v1(to_cuda(c)), v1(c))
