"""The paged KV-cache family: references vs per-token oracles, opcheck, errors, compile, CUDA."""

import itertools

import pytest
import torch

import compile_ops
from compile_ops.cache import dequantize_fp8_ref, quantize_fp8_ref
from compile_ops.testing import assert_close, assert_raises_eager_and_fake

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
       "fp8_e5m2": torch.float8_e5m2}
KV_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]


# ---------------------------------------------------------------------------------------------
# Inputs and per-token oracles (loops: independent of the vectorized references)
# ---------------------------------------------------------------------------------------------
def cache_dtype(kv, dtype, storage="uint8"):
    if kv == "auto":
        return dtype
    return torch.uint8 if storage == "uint8" else FP8[kv]


def encode(x, kv, scale, cache):
    """Oracle encoding of one token's [heads, size] rows into the cache dtype."""
    if kv == "auto":
        return x
    fmt = FP8[kv]
    q = quantize_fp8_ref(x, scale.reshape(-1, 1).float(), fmt)
    return q.view(torch.uint8) if cache.dtype == torch.uint8 else q


def decode(c, kv, scale, dtype):
    if kv == "auto":
        return c
    return dequantize_fp8_ref(c, scale, FP8[kv], dtype)


def kv_inputs(tokens, heads, head_size, dtype, device, *, layout="plain", pad_rows=0, gen=None,
              head_size_v=None):
    """key, value [tokens + pad_rows, heads, size]; 'qkv' = slices of one fused projection."""
    hv = head_size_v or head_size
    n = tokens + pad_rows
    if layout in ("qkv", "qkv_odd"):  # qkv_odd: a row stride that breaks 16-byte alignment
        pad = 1 if layout == "qkv_odd" else 8
        qkv = torch.randn(n, (2 * heads) * head_size + heads * hv + pad, generator=gen)
        qkv = qkv.to(dtype).to(device)
        k = qkv[:, 2 * heads * head_size - heads * head_size:][:, :heads * head_size]
        v = qkv[:, 2 * heads * head_size:][:, :heads * hv]
        return k.view(n, heads, head_size), v.view(n, heads, hv)
    k = torch.randn(n, heads, head_size, generator=gen).to(dtype).to(device)
    v = torch.randn(n, heads, hv, generator=gen).to(dtype).to(device)
    return k, v


def slots_for(tokens, num_slots, gen, *, pad=True):
    """Distinct random slots, every third one -1 (padding) when pad."""
    s = torch.randperm(num_slots, generator=gen)[:tokens].clone()
    if pad:
        s[::3] = -1
    return s


def flash_caches(nb, bs, heads, hk, hv, dtype, device, layout):
    if layout == "HND":
        k = torch.zeros(nb, heads, bs, hk, dtype=dtype, device=device).permute(0, 2, 1, 3)
        v = torch.zeros(nb, heads, bs, hv, dtype=dtype, device=device).permute(0, 2, 1, 3)
        return k, v
    if layout == "kv_split":  # the two halves of one [nb, 2, bs, heads, hd] tensor
        kv = torch.zeros(nb, 2, bs, heads, hk, dtype=dtype, device=device)
        return kv[:, 0], kv[:, 1]
    return (torch.zeros(nb, bs, heads, hk, dtype=dtype, device=device),
            torch.zeros(nb, bs, heads, hv, dtype=dtype, device=device))


def flash_oracle(key, value, kc, vc, slots, kv, ks, vs):
    kc, vc = kc.clone(), vc.clone()
    bs = kc.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        kc[s // bs, s % bs] = encode(key[t], kv, ks, kc)
        vc[s // bs, s % bs] = encode(value[t], kv, vs, vc)
    return kc, vc


def paged_caches(nb, bs, heads, hs, dtype, device):
    x = 16 // torch.empty(0, dtype=dtype).element_size()
    return (torch.zeros(nb, heads, hs // x, bs, x, dtype=dtype, device=device),
            torch.zeros(nb, heads, hs, bs, dtype=dtype, device=device))


def paged_oracle(key, value, kc, vc, slots, kv, ks, vs):
    kc, vc = kc.clone(), vc.clone()
    bs, x = kc.shape[3], kc.shape[4]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        k = encode(key[t], kv, ks, kc)  # [heads, hs]
        v = encode(value[t], kv, vs, vc)
        for d in range(k.shape[1]):
            kc[s // bs, :, d // x, s % bs, d % x] = k[:, d]
            vc[s // bs, :, d, s % bs] = v[:, d]
    return kc, vc


def one(device="cpu", value=1.0):
    return torch.tensor([value], dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------
# CPU: writes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHD", "HND", "kv_split"])
@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_flash_matches_oracle(dtype, kv, layout, gen):
    nb, bs, heads, hs = 5, 4, 3, 16
    key, value = kv_inputs(11, heads, hs, dtype, "cpu", layout="qkv", pad_rows=2, gen=gen)
    slots = slots_for(11, nb * bs, gen)
    cdt = cache_dtype(kv, dtype)
    kc, vc = flash_caches(nb, bs, heads, hs, hs, cdt, "cpu", layout)
    ks, vs = one(value=0.5), one(value=2.0)
    want_k, want_v = flash_oracle(key, value, kc, vc, slots, kv, ks, vs)
    ops.reshape_and_cache_flash(key, value, kc, vc, slots, kv, ks, vs)
    assert torch.equal(kc.view(torch.uint8) if kv != "auto" else kc,
                       want_k.view(torch.uint8) if kv != "auto" else want_k)
    assert torch.equal(vc.view(torch.uint8) if kv != "auto" else vc,
                       want_v.view(torch.uint8) if kv != "auto" else want_v)


@pytest.mark.parametrize("storage", ["uint8", "float8"])
@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_fp8_storage_dtypes_and_per_head_scales(kv, storage, gen):
    """FP8 caches as uint8 or the float8 dtype; one scale per KV head; different key/value head
    sizes (flash layout allows it)."""
    nb, bs, heads, hk, hv = 4, 8, 2, 32, 16
    key, value = kv_inputs(7, heads, hk, torch.bfloat16, "cpu", gen=gen, head_size_v=hv)
    slots = slots_for(7, nb * bs, gen, pad=False)
    cdt = cache_dtype(kv, torch.bfloat16, storage)
    kc, vc = flash_caches(nb, bs, heads, hk, hv, cdt, "cpu", "NHD")
    ks = torch.tensor([0.25, 4.0])
    vs = torch.tensor([1.5, 0.125])
    ops.reshape_and_cache_flash(key, value, kc, vc, slots, kv, ks, vs)
    blk, off = slots // bs, slots % bs
    got_k = decode(kc[blk, off], kv, ks.view(1, -1, 1), torch.float32)
    got_v = decode(vc[blk, off], kv, vs.view(1, -1, 1), torch.float32)
    # e4m3 keeps 4 significant bits (rel. error <= 2^-4), e5m2 3 bits (<= 2^-3); near zero the
    # subnormal step bounds the error: half of e4m3's 2^-9, times the largest scale (4)
    rel = 2.0 ** -4 if kv == "fp8" else 2.0 ** -3
    for got, want in ((got_k, key.float()), (got_v, value.float())):
        torch.testing.assert_close(got, want, rtol=rel, atol=4 * 2.0 ** -10)


@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_matches_oracle(dtype, kv, gen):
    nb, bs, heads, hs = 4, 4, 2, 32
    key, value = kv_inputs(9, heads, hs, dtype, "cpu", layout="qkv", pad_rows=1, gen=gen)
    slots = slots_for(9, nb * bs, gen)
    cdt = cache_dtype(kv, dtype)
    kc, vc = paged_caches(nb, bs, heads, hs, cdt, "cpu")
    ks, vs = one(value=0.75), one(value=1.25)
    want_k, want_v = paged_oracle(key, value, kc, vc, slots, kv, ks, vs)
    ops.reshape_and_cache(key, value, kc, vc, slots, kv, ks, vs)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


# x = key_cache.size(4), as vLLM reads it: for each dtype x values other than its 16 bytes (and
# fp32's 16 = 64 bytes); the default x of each dtype is test_reshape_and_cache_matches_oracle's.
ANY_X = [(torch.float32, "auto", 1), (torch.float32, "auto", 16), (torch.float16, "auto", 2),
         (torch.bfloat16, "auto", 16), (torch.bfloat16, "fp8", 4), (torch.float16, "fp8_e5m2", 8),
         (torch.float32, "fp8_e4m3", 1)]


def any_x_caches(nb, bs, heads, hs, x, cdt, device="cpu"):
    return (torch.zeros(nb, heads, hs // x, bs, x, dtype=cdt, device=device),
            torch.zeros(nb, heads, hs, bs, dtype=cdt, device=device))


@pytest.mark.parametrize("dtype,kv,x", ANY_X)
def test_reshape_and_cache_reads_x_from_the_cache(dtype, kv, x, gen):
    nb, bs, heads, hs = 4, 4, 2, 32
    key, value = kv_inputs(9, heads, hs, dtype, "cpu", layout="qkv", pad_rows=1, gen=gen)
    slots = slots_for(9, nb * bs, gen)
    cdt = cache_dtype(kv, dtype, "float8" if x == 1 else "uint8")
    kc, vc = any_x_caches(nb, bs, heads, hs, x, cdt)
    ks, vs = torch.tensor([0.75, 2.0]), one(value=1.25)
    want_k, want_v = paged_oracle(key, value, kc, vc, slots, kv, ks, vs)
    ops.reshape_and_cache(key, value, kc, vc, slots, kv, ks, vs)
    assert torch.equal(codes(kc), codes(want_k)) and torch.equal(codes(vc), codes(want_v))
    assert codes(kc).float().abs().sum() > 0


def test_only_len_slot_mapping_tokens_are_written(gen):
    nb, bs, heads, hs = 2, 4, 1, 8
    key, value = kv_inputs(6, heads, hs, torch.float32, "cpu", gen=gen)
    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.float32, "cpu", "NHD")
    slots = torch.tensor([0, 1, 2])
    ops.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", one(), one())
    assert torch.equal(kc.view(-1, heads, hs)[:3], key[:3])
    assert kc.view(-1, heads, hs)[3:].abs().sum() == 0


def test_fp8_quantization_semantics():
    """x / scale in float32, saturated to the largest finite value, nearest even; NaN stays."""
    x = torch.tensor([0.0, 1.0, -3.0, 1e6, -1e6, float("inf"), 0.3, 2.0 ** -8, float("nan"),
                      2.0 ** -10])
    q = quantize_fp8_ref(x, 2.0, torch.float8_e4m3fn).float()
    assert q[3] == 448 and q[4] == -448 and q[5] == 448
    assert q[1] == 0.5 and q[2] == -1.5 and torch.isnan(q[8])
    assert q[6] == 0.15625  # 0.15: between 0.140625 and 0.15625, nearer the latter
    assert q[7] == 2.0 ** -9 and q[9] == 0  # smallest e4m3 subnormal; a quarter of it -> 0
    e5 = quantize_fp8_ref(x, 1.0, torch.float8_e5m2).float()
    assert e5[3] == 57344 and e5[5] == 57344


# ---------------------------------------------------------------------------------------------
# CPU: gathers, convert, swap
# ---------------------------------------------------------------------------------------------
def batch_layout(lens, bs, nb, gen, *, starts=None):
    """block_table (int32, random distinct blocks), cu_seq_lens, token_to_seq for lens."""
    lens = list(lens)
    starts = starts or [0] * len(lens)
    cols = max((s + n + bs - 1) // bs for s, n in zip(starts, lens)) + 1
    perm = torch.randperm(nb, generator=gen)
    assert len(lens) * cols <= nb
    table = perm[: len(lens) * cols].view(len(lens), cols).to(torch.int32)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    tts = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(torch.int32)
    return table, cu, tts, torch.tensor(starts, dtype=torch.int32)


def gather_oracle(src, dst, table, cu, starts, kv, scale, limit=None):
    dst = dst.clone()
    bs = src.shape[1]
    for s in range(cu.numel() - 1):
        for i in range(int(cu[s]), int(cu[s + 1])):
            if limit is not None and i >= limit:
                continue
            p = i - int(cu[s]) + (int(starts[s]) if starts is not None else 0)
            row = src[int(table[s, p // bs]), p % bs].reshape(dst.shape[1:])
            dst[i] = decode(row, kv, scale, dst.dtype) if kv != "auto" else row
    return dst


@pytest.mark.parametrize("with_starts", [False, True])
@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_maybe_dequant_cache_matches_oracle(dtype, kv, with_starts, gen):
    nb, bs, heads, hs = 40, 4, 2, 8
    lens = [5, 0, 9, 3]
    starts = [3, 0, 8, 1] if with_starts else None
    table, cu, tts, st = batch_layout(lens, bs, nb, gen, starts=starts)
    cdt = cache_dtype(kv, dtype)
    src = torch.randn(nb, bs, heads, hs, generator=gen).to(dtype)
    if kv != "auto":
        src = quantize_fp8_ref(src, 0.5, FP8[kv])
        src = src.view(torch.uint8) if cdt == torch.uint8 else src
    scale = one(value=0.5)
    dst = torch.full((20, heads * hs), 7.0, dtype=dtype)  # entries flattened in dst
    num_tokens = 15  # the last 2 tokens of the last sequence are not gathered
    want = gather_oracle(src, dst, table, cu, st if with_starts else None, kv, scale,
                         limit=num_tokens)
    ops.gather_and_maybe_dequant_cache(src, dst, table, cu, tts, num_tokens, kv, scale,
                                       st if with_starts else None)
    assert torch.equal(dst, want)
    assert (dst[num_tokens:] == 7).all()


@pytest.mark.parametrize("with_starts", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_cp_gather_cache_matches_oracle(dtype, with_starts, gen):
    nb, bs, entry = 64, 16, 24  # an MLA-like entry: [num_blocks, block_size, entry]
    lens = [17, 1, 0, 40]
    starts = [5, 31, 0, 16] if with_starts else None
    table, cu, _, st = batch_layout(lens, bs, nb, gen, starts=starts)
    src = (torch.randn(nb, bs, entry, generator=gen) * 50).to(dtype)
    dst = torch.zeros(70, entry, dtype=dtype)
    want = gather_oracle(src, dst, table, cu, st if with_starts else None, "auto", None)
    ops.cp_gather_cache(src, dst, table, cu, len(lens), st if with_starts else None)
    assert torch.equal(dst, want)
    assert dst[sum(lens):].abs().sum() == 0


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_fp8_round_trip(dtype, kv, gen):
    x = (torch.randn(6, 33, generator=gen) * 4).to(dtype)
    if kv == "auto":
        out = torch.empty(6, 33, dtype=torch.float32)
        ops.convert_fp8(out, x, 1.0, "auto")
        assert torch.equal(out, x.float())
        return
    codes = torch.empty(6, 33, dtype=torch.uint8)
    ops.convert_fp8(codes, x, 0.5, kv)
    assert torch.equal(codes, quantize_fp8_ref(x, 0.5, FP8[kv]).view(torch.uint8))
    back = torch.empty_like(x)
    ops.convert_fp8(back, codes, 0.5, kv)
    assert torch.equal(back, dequantize_fp8_ref(codes, 0.5, FP8[kv], dtype))
    rel = 2.0 ** -4 if kv == "fp8" else 2.0 ** -3
    torch.testing.assert_close(back.float(), x.float(), rtol=rel, atol=1e-2)


def test_convert_fp8_non_contiguous_input_and_float8_dtype(gen):
    x = torch.randn(8, 10, generator=gen).t()  # [10, 8], transposed
    out = torch.empty(10, 8, dtype=torch.float8_e4m3fn)
    ops.convert_fp8(out, x, 1.0, "fp8_e4m3")
    assert torch.equal(out.view(torch.uint8), quantize_fp8_ref(x, 1.0, out.dtype).view(torch.uint8))


def convert_oracle(out, inp, scale, kv):
    """vLLM's rule, a loop over the blocks: element i (flat order) of output block b converts
    element i of input block b."""
    want = out.clone()
    for b in range(inp.shape[0]):
        flat = inp[b].reshape(-1)
        if kv == "auto":
            conv = flat.to(out.dtype)
        elif inp.dtype in DTYPES:
            conv = codes(quantize_fp8_ref(flat, scale, FP8[kv]))
            conv = conv if out.dtype == torch.uint8 else conv.view(out.dtype)
        else:
            conv = dequantize_fp8_ref(flat, scale, FP8[kv], out.dtype)
        want[b] = conv.reshape(out.shape[1:])
    return want


def fp8_codes(shape, kv, gen, storage="uint8"):
    q = quantize_fp8_ref(torch.randn(shape, generator=gen) * 3, 1.0, FP8[kv])
    return q.view(torch.uint8) if storage == "uint8" else q


def block_case(case, gen, device="cpu"):
    """(output, input, scale, kv, untouched) for convert_fp8 by blocks; `untouched` is the
    tensor the output is a view of (its other elements must keep their value, 7)."""
    nb, h, bs, hs = 6, 2, 8, 32
    full = lambda shape, dt: torch.full(shape, 7, dtype=dt)  # noqa: E731
    rand = lambda shape, dt: (torch.randn(shape, generator=gen) * 4).to(dt)  # noqa: E731
    if case == "x8_to_x16":  # vLLM's caches: a bf16 key cache into an fp8 one of another x
        out, inp, scale, kv = full((nb, h, hs // 16, bs, 16), torch.uint8), \
            rand((nb, h, hs // 8, bs, 8), torch.bfloat16), 0.37, "fp8"
    elif case == "x4_to_x16_float8":
        out, inp, scale, kv = full((nb, h, hs // 16, bs, 16), torch.float8_e5m2), \
            rand((nb, h, hs // 4, bs, 4), torch.float32), 2.0, "fp8_e5m2"
    elif case == "slice_of_cache":  # blocks 3..8 of a larger cache (an offset, flat blocks)
        out, inp, scale, kv = full((nb, h * hs * bs), torch.uint8), \
            rand((12, h, hs // 8, bs, 8), torch.float16)[3:3 + nb], 0.5, "fp8_e4m3"
    elif case == "kv_halves":  # padded block strides on both sides (halves of [nb, 2, ...])
        big = full((nb, 2, h, hs // 16, bs, 16), torch.uint8)
        out, inp, scale, kv = big[:, 1], rand((nb, 2, h, hs // 8, bs, 8),
                                               torch.bfloat16)[:, 0], 0.25, "fp8"
    elif case == "dequant_x16_to_x8":
        out, inp, scale, kv = full((nb, h, hs // 8, bs, 8), torch.bfloat16), \
            fp8_codes((nb, h, hs // 16, bs, 16), "fp8_e5m2", gen), 0.37, "fp8_e5m2"
    else:  # "auto": a plain cast, [nb, 4, 8] float32 -> [nb, 32] bf16
        out, inp, scale, kv = full((nb, 32), torch.bfloat16), rand((nb, 4, 8), torch.float32), \
            1.0, "auto"
    return on(out, device), on(inp, device), scale, kv


def on(t, device):
    """t on `device` with its strides and offset (a view: its base moves, the view is remade)."""
    if t.device.type == torch.device(device).type:
        return t
    if t._base is None:
        return t.to(device)
    return t._base.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


BLOCK_CASES = ["x8_to_x16", "x4_to_x16_float8", "slice_of_cache", "kv_halves",
               "dequant_x16_to_x8", "auto"]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_convert_fp8_by_blocks(case, gen):
    """vLLM converts block by block along dim 0: same number of blocks and elements per block,
    any shapes otherwise (a cache of another x), each side's own block stride."""
    out, inp, scale, kv = block_case(case, gen)
    base = out._base if out._base is not None else out
    before = base.clone()
    want = convert_oracle(out, inp, scale, kv)
    ops.convert_fp8(out, inp, scale, kv)
    assert torch.equal(codes(out), codes(want))
    if out._base is not None:  # the other half of the [nb, 2, ...] tensor is untouched
        assert torch.equal(codes(base[:, 0]), codes(before[:, 0]))


@pytest.mark.parametrize("kv,storage", [("fp8", "uint8"), ("fp8_e4m3", "float8"),
                                        ("fp8_e5m2", "uint8"), ("fp8_e5m2", "float8")])
def test_convert_fp8_blocks_round_trip(kv, storage, gen):
    """fp8 cache (x = 16) -> bf16 cache (x = 8) -> fp8 cache: the same codes (a power-of-two
    scale: dequantized values are exact in bf16); the bf16 cache holds the codes' values in each
    block's flat order."""
    nb, h, bs, hs = 5, 2, 16, 64
    c = fp8_codes((nb, h, hs // 16, bs, 16), kv, gen, storage)
    mid = torch.empty(nb, h, hs // 8, bs, 8, dtype=torch.bfloat16)
    ops.convert_fp8(mid, c, 0.25, kv)
    assert torch.equal(mid.view(nb, -1),
                       dequantize_fp8_ref(c.view(nb, -1), 0.25, FP8[kv], torch.bfloat16))
    again = torch.empty_like(c)
    ops.convert_fp8(again, mid, 0.25, kv)
    assert torch.equal(codes(again), codes(c))
    rel = 2.0 ** -4 if kv != "fp8_e5m2" else 2.0 ** -3
    x = torch.randn(nb, h, hs // 8, bs, 8, generator=gen).to(torch.bfloat16)
    ops.convert_fp8(c, x, 0.25, kv)
    ops.convert_fp8(mid, c, 0.25, kv)
    torch.testing.assert_close(mid.float(), x.float(), rtol=rel, atol=2.0 ** -9)


@pytest.mark.parametrize("partial", [False, True])
def test_swap_blocks_cpu(partial, gen):
    src = torch.randn(6, 4, 8, generator=gen)
    dst = torch.zeros(5, 4, 8)
    nbytes = 4 * 8 * 4 // (2 if partial else 1)
    mapping = torch.tensor([[0, 4], [5, 1], [2, 2]])
    ops.swap_blocks(src, dst, nbytes, mapping)
    n = nbytes // 4
    for s, d in mapping.tolist():
        assert torch.equal(dst[d].reshape(-1)[:n], src[s].reshape(-1)[:n])
        assert dst[d].reshape(-1)[n:].abs().sum() == 0
    assert dst[0].abs().sum() == 0 and dst[3].abs().sum() == 0


def test_swap_blocks_strided_blocks(gen):
    """Blocks with padding between them (stride(0) > block numel): only block bytes move."""
    big = torch.randn(4, 40, generator=gen)
    src = big[:, :32].view(4, 4, 8)  # stride(0) 40
    dst_big = torch.zeros(3, 48)
    dst = dst_big[:, :32].view(3, 4, 8)
    ops.swap_blocks(src, dst, 32 * 4, torch.tensor([[3, 0], [1, 2]]))
    assert torch.equal(dst[0], src[3]) and torch.equal(dst[2], src[1])
    assert dst_big[:, 32:].abs().sum() == 0 and dst[1].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# opcheck, compile, errors
# ---------------------------------------------------------------------------------------------
def sample_calls(device="cpu"):
    g = torch.Generator().manual_seed(0)
    nb, bs, heads, hs = 4, 4, 2, 16
    key, value = kv_inputs(5, heads, hs, torch.bfloat16, device, gen=g)
    slots = torch.tensor([3, -1, 8, 15, 0], device=device)
    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.uint8, device, "HND")
    pk, pv = paged_caches(nb, bs, heads, hs, torch.bfloat16, device)
    s = one(device, 0.5)
    table, cu, tts, st = batch_layout([3, 4], bs, nb, g)
    table, cu, tts, st = (t.to(device) for t in (table, cu, tts, st))
    src = torch.randn(nb, bs, heads, hs, generator=g).to(torch.bfloat16).to(device)
    return {
        "reshape_and_cache_flash": (ops.reshape_and_cache_flash,
                                    (key, value, kc, vc, slots, "fp8", s, s)),
        "reshape_and_cache": (ops.reshape_and_cache, (key, value, pk, pv, slots, "auto", s, s)),
        "gather_and_maybe_dequant_cache": (
            ops.gather_and_maybe_dequant_cache,
            (src, torch.zeros(7, heads, hs, dtype=torch.bfloat16, device=device), table, cu, tts,
             7, "auto", s, st)),
        "cp_gather_cache": (ops.cp_gather_cache,
                            (src, torch.zeros(8, heads * hs, dtype=torch.bfloat16, device=device),
                             table, cu, 2, None)),
        "convert_fp8": (ops.convert_fp8, (torch.empty(5, 8, dtype=torch.uint8, device=device),
                                          torch.randn(5, 8, generator=g).to(device), 2.0,
                                          "fp8_e5m2")),
        "swap_blocks": (ops.swap_blocks, (src, torch.zeros_like(src), bs * heads * hs * 2,
                                          torch.tensor([[0, 1], [3, 2]]))),
    }


@pytest.mark.parametrize("name", sorted(sample_calls()))
def test_opcheck(name):
    op, args = sample_calls()[name]
    torch.library.opcheck(op, args)


def test_every_cache_op_registered():
    names = set(compile_ops.registered_ops())
    for n in sample_calls():
        assert f"compile_ops::{n}" in names


def test_compiled_cache_write_mutates_the_cache_in_place(gen):
    """Under torch.compile the op writes into the caller's (HND view) cache: no copy of the
    cache appears in the generated code, and the contents match eager."""
    from torch._inductor.utils import run_and_get_code

    nb, bs, heads, hs = 64, 16, 2, 16
    key, value = kv_inputs(5, heads, hs, torch.float32, "cpu", gen=gen)
    slots = slots_for(5, nb * bs, gen)

    def f(k, v, kc, vc, slots, s):
        k = k * 2
        ops.reshape_and_cache_flash(k, v, kc, vc, slots, "auto", s, s)
        return k

    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.float32, "cpu", "HND")
    ekc, evc = flash_caches(nb, bs, heads, hs, hs, torch.float32, "cpu", "HND")
    f(key, value, ekc, evc, slots, one())
    _, codes = run_and_get_code(torch.compile(f, fullgraph=True), key, value, kc, vc, slots, one())
    code = "\n".join(codes)
    assert "reshape_and_cache_flash" in code
    assert "copy_" not in code and "clone" not in code, code
    assert torch.equal(kc, ekc) and torch.equal(vc, evc)


def test_compiled_gather_with_dynamic_tokens(gen):
    nb, bs, entry = 32, 4, 12
    src = torch.randn(nb, bs, entry, generator=gen)
    f = torch.compile(lambda s, d, t, c, n: ops.cp_gather_cache(s, d, t, c, n), fullgraph=True,
                      dynamic=True)
    for lens in ([3, 5], [7, 1, 2]):
        table, cu, _, _ = batch_layout(lens, bs, nb, gen)
        dst, want = torch.zeros(sum(lens), entry), torch.zeros(sum(lens), entry)
        f(src, dst, table, cu, len(lens))
        ops.cp_gather_cache(src, want, table, cu, len(lens))
        assert torch.equal(dst, want)


def write_args(**over):
    heads, hs = 2, 16
    a = dict(key=torch.randn(3, heads, hs), value=torch.randn(3, heads, hs),
             key_cache=torch.zeros(2, 4, heads, hs), value_cache=torch.zeros(2, 4, heads, hs),
             slot_mapping=torch.tensor([0, 1, 2]), kv_cache_dtype="auto", k_scale=one(),
             v_scale=one())
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,fragment", [
    (dict(kv_cache_dtype="fp8_e4m3fnuz"), ValueError, "unknown kv_cache_dtype 'fp8_e4m3fnuz'"),
    (dict(kv_cache_dtype="int8"), ValueError, "unknown kv_cache_dtype"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError,
     "slot_mapping must be int64"),
    (dict(slot_mapping=torch.tensor([0, 1, 2, 3])), ValueError, "4 slots but key has only 3"),
    (dict(key_cache=torch.zeros(2, 4, 2, 8)), ValueError, r"key_cache must be \[num_blocks"),
    (dict(key_cache=torch.zeros(2, 4, 2, 16, dtype=torch.float16)), TypeError,
     "key_cache must have dtype torch.float32"),
    (dict(kv_cache_dtype="fp8_e5m2", key_cache=torch.zeros(2, 4, 2, 16,
                                                           dtype=torch.float8_e4m3fn),
          value_cache=torch.zeros(2, 4, 2, 16, dtype=torch.float8_e4m3fn)), TypeError,
     "key_cache must be uint8 or torch.float8_e5m2"),
    (dict(k_scale=torch.ones(1, dtype=torch.float16)), TypeError, "k_scale must be a float32"),
    (dict(v_scale=torch.ones(3)), ValueError, r"v_scale must hold one value or one per head"),
    (dict(value=torch.randn(3, 2, 16, dtype=torch.float16)), TypeError,
     "value must have dtype torch.float32"),
    (dict(key=torch.randn(3, 16, 2).transpose(1, 2)), ValueError,
     "key must be contiguous in head_size"),
    (dict(key=torch.randn(3, 32)), ValueError, r"key must be \[tokens, num_heads, head_size\]"),
    (dict(key_cache=torch.zeros(2, 4, 2, 16).expand(2, 4, 2, 16)[:, :, :, :]
          .as_strided((2, 4, 2, 16), (16, 0, 0, 1))), ValueError, "overlapping elements"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], device="meta")), ValueError,
     "slot_mapping must be on device cpu"),
])
def test_flash_write_errors(over, exc, fragment):
    a = write_args(**over)
    assert_raises_eager_and_fake(lambda: ops.reshape_and_cache_flash(**a), exc, fragment)


def test_paged_write_errors():
    a = write_args(key_cache=torch.zeros(2, 2, 3, 4, 4), value_cache=torch.zeros(2, 2, 16, 4))
    assert_raises_eager_and_fake(lambda: ops.reshape_and_cache(**a), ValueError,
                                 r"key_cache must be \[num_blocks, 2, 4, block_size, 4\]")
    a = write_args(key_cache=torch.zeros(2, 2, 4, 4, 4), value_cache=torch.zeros(2, 2, 4, 16))
    assert_raises_eager_and_fake(lambda: ops.reshape_and_cache(**a), ValueError,
                                 r"value_cache must be \[2, 2, 16, 4\]")


def test_out_of_range_slot_raises_and_writes_nothing():
    a = write_args(slot_mapping=torch.tensor([0, 8, 1]))
    with pytest.raises(IndexError, match="slot 8, outside the cache's 8 slots"):
        ops.reshape_and_cache_flash(**a)
    assert a["key_cache"].abs().sum() == 0 and a["value_cache"].abs().sum() == 0
    a = write_args(key_cache=torch.zeros(2, 2, 4, 4, 4), value_cache=torch.zeros(2, 2, 16, 4),
                   slot_mapping=torch.tensor([0, 9, 1]))
    with pytest.raises(IndexError, match="slot 9"):
        ops.reshape_and_cache(**a)
    assert a["key_cache"].abs().sum() == 0


def test_gather_errors_and_bad_indices(gen):
    nb, bs = 8, 4
    src = torch.randn(nb, bs, 6)
    table, cu, tts, st = batch_layout([3, 2], bs, nb, gen)
    dst = torch.zeros(5, 6)
    call = lambda **o: ops.gather_and_maybe_dequant_cache(  # noqa: E731
        **{**dict(src_cache=src, dst=dst, block_table=table, cu_seq_lens=cu, token_to_seq=tts,
                  num_tokens=5, kv_cache_dtype="auto", scale=one(), seq_starts=None), **o})
    assert_raises_eager_and_fake(lambda: call(block_table=table.long()), TypeError,
                                 "block_table must be int32")
    assert_raises_eager_and_fake(lambda: call(dst=torch.zeros(5, 7)), ValueError,
                                 "dst entries")
    assert_raises_eager_and_fake(lambda: call(num_tokens=6), ValueError, "num_tokens must be")
    assert_raises_eager_and_fake(lambda: call(kv_cache_dtype="fp8"), TypeError,
                                 "src_cache must be uint8 or torch.float8_e4m3fn")
    assert_raises_eager_and_fake(lambda: call(dst=torch.zeros(5, 6, dtype=torch.float16)),
                                 TypeError, "dst must have src_cache's dtype")
    assert_raises_eager_and_fake(lambda: call(dst=torch.zeros(6, 5).t()[:5]), ValueError,
                                 "dst must hold each token's entry contiguously")
    bad = table.clone()
    bad[1, 0] = nb
    with pytest.raises(IndexError, match=f"block_table holds block {nb}, outside"):
        call(block_table=bad)
    with pytest.raises(IndexError, match="block-table column"):
        call(seq_starts=torch.tensor([0, 100], dtype=torch.int32))
    with pytest.raises(IndexError, match="token_to_seq holds sequence 2"):
        call(token_to_seq=torch.tensor([0, 0, 0, 1, 2], dtype=torch.int32))
    assert dst.abs().sum() == 0
    assert_raises_eager_and_fake(
        lambda: ops.cp_gather_cache(src, dst, table, cu, 3), ValueError,
        "cu_seq_lens must hold batch \\+ 1 = 4 offsets")
    with pytest.raises(IndexError, match="do not fit dst's 4 rows"):
        ops.cp_gather_cache(src, torch.zeros(4, 6), table, cu, 2)


def test_swap_and_convert_errors():
    src, dst = torch.randn(4, 8), torch.zeros(4, 8)
    m = torch.tensor([[0, 1]])
    assert_raises_eager_and_fake(lambda: ops.swap_blocks(src, dst, 33, m), ValueError,
                                 r"block_size_in_bytes must be in \(0, 32\]")
    assert_raises_eager_and_fake(lambda: ops.swap_blocks(src, dst, 32, m.int()), TypeError,
                                 "block_mapping must be int64")
    assert_raises_eager_and_fake(lambda: ops.swap_blocks(src, dst, 32, m.view(2)), ValueError,
                                 "block_mapping must be 2-D")
    assert_raises_eager_and_fake(lambda: ops.swap_blocks(src, dst, 32, m.to("meta")),
                                 ValueError, "block_mapping must be a CPU tensor")
    assert_raises_eager_and_fake(lambda: ops.swap_blocks(src.t(), dst, 16, m), ValueError,
                                 "src must be contiguous within a block")
    with pytest.raises(IndexError, match=r"block_mapping\[:, 1\] holds block 4, outside dst's 4"):
        ops.swap_blocks(src, dst, 32, torch.tensor([[0, 1], [2, 4]]))
    assert dst.abs().sum() == 0
    with pytest.raises(IndexError, match=r"block_mapping\[:, 0\] holds block -1"):
        ops.swap_blocks(src, dst, 32, torch.tensor([[-1, 1]]))
    x = torch.randn(4, 4)
    assert_raises_eager_and_fake(lambda: ops.convert_fp8(torch.empty(4, 4, dtype=torch.uint8),
                                                         x, 1.0, "fp9"),
                                 ValueError, "unknown kv_cache_dtype 'fp9'")
    assert_raises_eager_and_fake(lambda: ops.convert_fp8(torch.empty(4, 4), x, 1.0, "fp8"),
                                 TypeError, "converts between float32/float16/bfloat16 and uint8")
    assert_raises_eager_and_fake(lambda: ops.convert_fp8(torch.empty(4, 4, dtype=torch.uint8),
                                                         x, 0.0, "fp8"),
                                 ValueError, "scale must be finite and non-zero")
    assert_raises_eager_and_fake(lambda: ops.convert_fp8(torch.empty(4, 5, dtype=torch.uint8),
                                                         x, 1.0, "fp8"),
                                 ValueError, "output blocks must hold as many elements")


def convert_error_cases():
    """(output, input, exception, fragment): each names the argument at fault."""
    x = torch.randn(4, 2, 8)
    u8 = lambda *shape: torch.full(shape, 7, dtype=torch.uint8)  # noqa: E731
    shared = torch.zeros(256, dtype=torch.uint8)
    return [
        (u8(5, 16), x, ValueError,
         r"output must have input's number of blocks \(size\(0\)\) 4, got 5"),
        (u8(4, 2, 7), x, ValueError, r"output blocks must hold as many elements as input "
                                     r"blocks: input \(2, 8\) = 16 per block, output \(2, 7\)"),
        (u8(4, 16), torch.randn(4, 8, 2).transpose(1, 2), ValueError,
         "input must be contiguous within a block"),
        (u8(4, 32)[:, ::2], x, ValueError, "output must be contiguous within a block"),
        (u8(20).as_strided((4, 16), (1, 1)), x, ValueError, "output has overlapping elements"),
        (u8(16), torch.tensor(1.0), ValueError, "input must have a block dimension"),
        (u8(4, 16), x.to("meta"), ValueError, "output must be on device meta"),
        (shared[:64].view(4, 16), shared.view(torch.float32).view(4, 2, 8), ValueError,
         "output and input overlap in memory"),  # eager only: fake tensors have no addresses
        (u8(4, 16), x.to(torch.float16).view(torch.int16), TypeError,
         "converts between float32/float16/bfloat16 and uint8"),
        (torch.full((4, 16), 7.0, dtype=torch.float8_e5m2), x, TypeError,
         "converts between float32/float16/bfloat16 and uint8 or torch.float8_e4m3fn"),
    ]


@pytest.mark.parametrize("i", range(len(convert_error_cases())))
def test_convert_fp8_block_errors_write_nothing(i):
    out, inp, exc, fragment = convert_error_cases()[i]
    before = codes(out).clone()
    if "overlap in memory" in fragment:
        with pytest.raises(exc, match=fragment):
            ops.convert_fp8(out, inp, 0.5, "fp8")
    else:
        assert_raises_eager_and_fake(lambda: ops.convert_fp8(out, inp, 0.5, "fp8"), exc,
                                     fragment)
    assert torch.equal(codes(out), before)


def test_paged_write_x_errors():
    """reshape_and_cache reads x from key_cache.size(4): any x >= 1 dividing head_size."""
    for kc, fragment in [
            (torch.zeros(2, 2, 5, 4, 3), r"key_cache.size\(4\) is x = 3, which must be >= 1 "
                                         r"and divide head_size 16"),
            (torch.zeros(2, 2, 16, 4, 0), r"x = 0, which must be >= 1"),
            (torch.zeros(2, 2, 4, 4, 2), r"key_cache must be \[num_blocks, 2, 8, block_size, "
                                         r"2\] \(x = key_cache.size\(4\) = 2\)"),
            (torch.zeros(2, 2, 16, 4), r"key_cache must be 5-D"),
            (torch.zeros(2, 2, 8, 2, 4).transpose(3, 4), "key_cache must be contiguous in its "
                                                         "last dim")]:
        a = write_args(key_cache=kc, value_cache=torch.zeros(2, 2, 16, 4))
        assert_raises_eager_and_fake(lambda: ops.reshape_and_cache(**a), ValueError, fragment)
        assert a["key_cache"].abs().sum() == 0 and a["value_cache"].abs().sum() == 0


def new_shape_calls(device="cpu"):
    """convert_fp8 by blocks and reshape_and_cache with a non-default x, for opcheck."""
    g = torch.Generator().manual_seed(1)
    out, inp, _, _ = block_case("kv_halves", g, device)
    key, value = kv_inputs(5, 2, 16, torch.bfloat16, device, gen=g)
    kc, vc = any_x_caches(4, 4, 2, 16, 4, torch.bfloat16, device)
    slots = torch.tensor([3, -1, 8, 15, 0], device=device)
    return {"convert_fp8_blocks": (ops.convert_fp8, (out, inp, 0.5, "fp8")),
            "convert_fp8_dequant_x16_to_x8": (ops.convert_fp8, block_case(
                "dequant_x16_to_x8", g, device)[:2] + (0.37, "fp8_e5m2")),
            "reshape_and_cache_x4": (ops.reshape_and_cache,
                                     (key, value, kc, vc, slots, "auto", one(device),
                                      one(device)))}


@pytest.mark.parametrize("name", sorted(new_shape_calls()))
def test_opcheck_new_shapes(name):
    op, args = new_shape_calls()[name]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# CUDA (H100): the kernels against the references
# ---------------------------------------------------------------------------------------------
def codes(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["NHD", "HND", "kv_split"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 128, 256])
@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_reshape_and_cache_flash(dtype, kv, head_size, block_size, layout, gen):
    heads, nb, tokens = 4, 24, 97
    layout_in = "qkv_odd" if head_size == 80 else "qkv"  # 80: the element-wise path
    key, value = kv_inputs(tokens, heads, head_size, dtype, "cuda", layout=layout_in, pad_rows=3,
                           gen=gen)
    slots = slots_for(tokens, nb * block_size, gen).cuda()
    cdt = cache_dtype(kv, dtype, "float8" if head_size == 80 else "uint8")
    kc, vc = flash_caches(nb, block_size, heads, head_size, head_size, cdt, "cuda", layout)
    rk, rv = kc.cpu().clone(), vc.cpu().clone()
    ks = torch.tensor([0.5, 1.0, 2.0, 0.25], device="cuda") if kv == "fp8_e5m2" else \
        one("cuda", 0.75)
    vs = one("cuda", 1.5)
    ops.reshape_and_cache_flash(key, value, kc, vc, slots, kv, ks, vs)
    ops.reshape_and_cache_flash(key.cpu(), value.cpu(), rk, rv, slots.cpu(), kv, ks.cpu(),
                                vs.cpu())
    assert torch.equal(codes(kc.cpu()), codes(rk)) and torch.equal(codes(vc.cpu()), codes(rv))


@pytest.fixture(params=["staged", "register", "auto", "register_rows_256"])
def cache_kernel(request, monkeypatch):
    """reshape_and_cache through the staged kernel (from 0 tokens), the register-only one, or
    the launcher's choice (staged from 128 tokens); the last: register-only in 256-thread CTAs
    with the value rows' vector stores (COMPILE_OPS_CACHE_THREADS, COMPILE_OPS_CACHE_VROWS)."""
    if request.param != "auto":
        monkeypatch.setenv("COMPILE_OPS_CACHE_STAGED",
                           "1" if request.param == "staged" else "0")
    if request.param == "register_rows_256":
        monkeypatch.setenv("COMPILE_OPS_CACHE_THREADS", "256")
        monkeypatch.setenv("COMPILE_OPS_CACHE_VROWS", "1")
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_reshape_and_cache(dtype, kv, head_size, block_size, aligned, cache_kernel, gen):
    heads, nb, tokens = 4, 16, 201  # the launcher picks the staged kernel (>= 128)
    layout = "plain" if aligned else "qkv"  # qkv slices: token stride not 16-byte aligned
    key, value = kv_inputs(tokens, heads, head_size, dtype, "cuda", layout=layout, gen=gen)
    if not aligned:  # shift by one element: breaks 16-byte alignment of every token
        raw = torch.randn(tokens * heads * head_size + 1, generator=gen).to(dtype).cuda()
        key = raw[1:].view(tokens, heads, head_size)
    slots = slots_for(tokens, nb * block_size, gen).cuda()
    kc, vc = paged_caches(nb, block_size, heads, head_size, cache_dtype(kv, dtype), "cuda")
    rk, rv = kc.cpu().clone(), vc.cpu().clone()
    s = one("cuda", 0.5)
    ops.reshape_and_cache(key, value, kc, vc, slots, kv, s, s)
    ops.reshape_and_cache(key.cpu(), value.cpu(), rk, rv, slots.cpu(), kv, s.cpu(), s.cpu())
    assert torch.equal(kc.cpu(), rk) and torch.equal(vc.cpu(), rv)


@pytest.mark.cuda
@pytest.mark.parametrize("runs", ["whole", "padded", "offset"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_reshape_and_cache_runs(dtype, kv, head_size, block_size, runs, cache_kernel, gen):
    """A prefill's write: consecutive slots in shuffled pages ('whole': page-aligned runs,
    'padded': padding slots inside runs, 'offset': runs starting mid-page), 303 tokens (the
    launcher's own choice is the staged kernel, which hands such tiles to its register path)."""
    heads, nb, tokens = 4, 48, 303
    key, value = kv_inputs(tokens, heads, head_size, dtype, "cuda", gen=gen)
    pages = torch.randperm(nb, generator=gen)
    slots = (pages[:, None] * block_size + torch.arange(block_size)).flatten()
    if runs == "offset":
        slots = slots[3:]
    slots = slots[:tokens].clone()
    if runs == "padded":
        slots[7] = slots[100] = -1
    slots = slots.cuda()
    kc, vc = paged_caches(nb, block_size, heads, head_size, cache_dtype(kv, dtype), "cuda")
    rk, rv = kc.cpu().clone(), vc.cpu().clone()
    s = torch.tensor([0.5, 1.0, 2.0, 0.25], device="cuda")  # per-head scales
    ops.reshape_and_cache(key, value, kc, vc, slots, kv, s, s)
    ops.reshape_and_cache(key.cpu(), value.cpu(), rk, rv, slots.cpu(), kv, s.cpu(), s.cpu())
    assert torch.equal(codes(kc.cpu()), codes(rk)) and torch.equal(codes(vc.cpu()), codes(rv))
    assert codes(rv).abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("entry_shape", [(8, 128), (576,), (3, 7)])
@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_starts", [False, True])
def test_cuda_gathers(dtype, kv, entry_shape, with_starts, gen):
    nb, bs = 96, 16
    lens = [37, 0, 1, 80, 16]
    starts = [3, 0, 15, 17, 0] if with_starts else None
    table, cu, tts, st = batch_layout(lens, bs, nb, gen, starts=starts)
    src = torch.randn(nb, bs, *entry_shape, generator=gen).to(dtype)
    if kv != "auto":
        src = quantize_fp8_ref(src, 0.5, FP8[kv]).view(torch.uint8)
    scale = one(value=0.5)
    total = sum(lens)
    st_arg = st if with_starts else None
    dst = torch.full((total + 5, *entry_shape), 3.0, dtype=dtype)
    want = dst.clone()
    ops.gather_and_maybe_dequant_cache(src, want, table, cu, tts, total - 2, kv, scale, st_arg)
    got = dst.cuda()
    ops.gather_and_maybe_dequant_cache(src.cuda(), got, table.cuda(), cu.cuda(), tts.cuda(),
                                       total - 2, kv, scale.cuda(),
                                       st_arg.cuda() if with_starts else None)
    assert torch.equal(got.cpu(), want)
    if kv == "auto":
        want = dst.clone()
        ops.cp_gather_cache(src, want, table, cu, len(lens), st_arg)
        got = dst.cuda()
        ops.cp_gather_cache(src.cuda(), got, table.cuda(), cu.cuda(), len(lens),
                            st_arg.cuda() if with_starts else None)
        assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["fp8", "fp8_e4m3", "fp8_e5m2", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 4096 + 3])
def test_cuda_convert_fp8(dtype, kv, n, gen):
    x = (torch.randn(n, generator=gen) * 100).to(dtype)
    x[0] = 1e6 if n > 1 else x[0]  # saturates
    if kv == "auto":
        out = torch.empty(n, dtype=torch.float16, device="cuda")
        ops.convert_fp8(out, x.cuda(), 1.0, kv)
        assert torch.equal(out.cpu(), x.to(torch.float16))
        return
    c_gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    ops.convert_fp8(c_gpu, x.cuda(), 0.37, kv)
    c_cpu = torch.empty(n, dtype=torch.uint8)
    ops.convert_fp8(c_cpu, x, 0.37, kv)
    assert torch.equal(c_gpu.cpu(), c_cpu)
    back = torch.empty(n, dtype=dtype, device="cuda")
    ops.convert_fp8(back, c_gpu, 0.37, kv)
    ref = torch.empty(n, dtype=dtype)
    ops.convert_fp8(ref, c_cpu, 0.37, kv)
    assert torch.equal(back.cpu(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("case", BLOCK_CASES + ["unaligned", "many_blocks"])
def test_cuda_convert_fp8_by_blocks(case, gen):
    """The block kernel (padded block strides), the flat one (dense caches of another shape),
    unaligned bases and odd strides (element accesses), more blocks than grid.y takes at once."""
    if case == "unaligned":  # bases one element off 16 bytes, odd block strides
        inp = torch.randn(7 * 131 + 1, generator=gen).to(torch.bfloat16)[1:].view(7, 131)
        out, scale, kv = torch.full((7, 140), 7, dtype=torch.uint8)[:, 3:134], 0.37, "fp8_e5m2"
    elif case == "many_blocks":
        inp = torch.randn(70000, 2, 24, generator=gen)[:, 0]
        out, scale, kv = torch.full((70000, 3, 8), 7, dtype=torch.uint8), 0.5, "fp8"
    else:
        out, inp, scale, kv = block_case(case, gen)
    base = out if out._base is None else out._base
    got, got_inp = on(out, "cuda"), on(inp, "cuda")
    assert got.stride() == out.stride() and got_inp.stride() == inp.stride()
    ops.convert_fp8(out, inp, scale, kv)
    ops.convert_fp8(got, got_inp, scale, kv)
    got_base = got if got._base is None else got._base
    assert torch.equal(codes(got_base.cpu()), codes(base))


@pytest.mark.cuda
@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_cuda_convert_fp8_blocks_round_trip(kv, gen):
    nb, h, bs, hs = 40, 8, 16, 128
    x = torch.randn(nb, h, hs // 8, bs, 8, generator=gen).to(torch.bfloat16).cuda()
    c = torch.empty(nb, h, hs // 16, bs, 16, dtype=torch.uint8, device="cuda")
    ops.convert_fp8(c, x, 0.25, kv)
    ref = torch.empty(c.shape, dtype=torch.uint8)
    ops.convert_fp8(ref, x.cpu(), 0.25, kv)
    assert torch.equal(c.cpu(), ref)
    back = torch.empty_like(x)
    ops.convert_fp8(back, c, 0.25, kv)
    again = torch.empty_like(c)
    ops.convert_fp8(again, back, 0.25, kv)
    assert torch.equal(again, c)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [5, 201])
@pytest.mark.parametrize("dtype,kv,x", ANY_X)
def test_cuda_reshape_and_cache_any_x(dtype, kv, x, tokens, gen):
    heads, hs, nb, bs = 4, 128, 16, 16
    key, value = kv_inputs(tokens, heads, hs, dtype, "cuda", layout="qkv", pad_rows=2, gen=gen)
    slots = slots_for(tokens, nb * bs, gen).cuda()
    cdt = cache_dtype(kv, dtype, "float8" if x == 1 else "uint8")
    kc, vc = any_x_caches(nb, bs, heads, hs, x, cdt, "cuda")
    rk, rv = kc.cpu().clone(), vc.cpu().clone()
    s = torch.tensor([0.5, 1.0, 2.0, 0.25], device="cuda")
    ops.reshape_and_cache(key, value, kc, vc, slots, kv, s, s)
    ops.reshape_and_cache(key.cpu(), value.cpu(), rk, rv, slots.cpu(), kv, s.cpu(), s.cpu())
    assert torch.equal(codes(kc.cpu()), codes(rk)) and torch.equal(codes(vc.cpu()), codes(rv))


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(new_shape_calls("cpu")))
def test_cuda_opcheck_new_shapes(name):
    op, args = new_shape_calls("cuda")[name]
    torch.library.opcheck(op, args)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["auto", "memcpy", "kernel"])
@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_cuda_swap_blocks(direction, mode, block_size, gen, monkeypatch):
    monkeypatch.setenv("COMPILE_OPS_SWAP_MODE", mode)
    shape = (64, block_size, 4, 32)
    host = torch.randn(shape, generator=gen).to(torch.bfloat16).pin_memory()
    dev = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    src, dst = {"h2d": (host, dev), "d2h": (dev, host.clone().pin_memory()),
                "d2d": (dev, torch.zeros_like(dev))}[direction]
    srcs = torch.randperm(64, generator=gen)[:20]
    dsts = [i for i in torch.randperm(64, generator=gen).tolist() if i not in (50, 51, 52)][:20]
    run = torch.tensor([[40, 50], [41, 51], [42, 52]])  # consecutive on both sides: one copy
    mapping = torch.cat([torch.stack([srcs, torch.tensor(dsts)], dim=1), run])
    want = dst.cpu().clone()
    want[mapping[:, 1]] = src.cpu()[mapping[:, 0]]
    ops.swap_blocks(src, dst, src[0].numel() * 2, mapping)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), want)


@pytest.mark.cuda
def test_cuda_swap_blocks_pageable_host_memory(gen):
    host = torch.randn(8, 16, 64, generator=gen)  # not pinned: the memcpy path
    dev = torch.zeros(8, 16, 64, device="cuda")
    mapping = torch.tensor([[i, 7 - i] for i in range(8)] * 2)[:8]
    ops.swap_blocks(host, dev, 16 * 64 * 4, mapping)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), host.flip(0))


@pytest.mark.cuda
def test_cuda_out_of_range_indices_are_skipped(gen, monkeypatch):
    """Kernels never touch memory for a bad slot / block id: that token is skipped."""
    monkeypatch.delenv("COMPILE_OPS_VALIDATE", raising=False)
    heads, hs, nb, bs = 2, 64, 4, 16
    key, value = kv_inputs(4, heads, hs, torch.bfloat16, "cuda", gen=gen)
    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.bfloat16, "cuda", "NHD")
    slots = torch.tensor([0, nb * bs, 5, 10 ** 12], device="cuda")
    ops.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", one("cuda"), one("cuda"))
    flat = kc.view(-1, heads, hs).cpu()
    assert torch.equal(flat[0], key[0].cpu()) and torch.equal(flat[5], key[2].cpu())
    others = torch.ones(flat.shape[0], dtype=torch.bool)
    others[[0, 5]] = False
    assert flat[others].abs().sum() == 0
    src = torch.randn(nb, bs, 8, device="cuda")
    table = torch.tensor([[0, 99], [-5, 1]], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 20, 22], dtype=torch.int32, device="cuda")
    dst = torch.zeros(22, 8, device="cuda")
    ops.cp_gather_cache(src, dst, table, cu, 2)
    got = dst.cpu()
    assert torch.equal(got[:16], src[0].cpu()) and got[16:].abs().sum() == 0
    monkeypatch.setenv("COMPILE_OPS_VALIDATE", "1")
    with pytest.raises(IndexError, match="slot"):
        ops.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", one("cuda"), one("cuda"))
    with pytest.raises(IndexError, match="block_table holds block 99"):
        ops.cp_gather_cache(src, dst, table, cu, 2)


@pytest.mark.cuda
def test_cuda_graph_capture_and_current_stream(gen):
    heads, hs, nb, bs = 8, 128, 64, 16
    key, value = kv_inputs(32, heads, hs, torch.bfloat16, "cuda", gen=gen)
    slots = slots_for(32, nb * bs, gen, pad=False).cuda()
    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.uint8, "cuda", "NHD")
    s = one("cuda", 0.5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.reshape_and_cache_flash(key, value, kc, vc, slots, "fp8", s, s)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ops.reshape_and_cache_flash(key, value, kc, vc, slots, "fp8", s, s)
    torch.cuda.current_stream().wait_stream(stream)
    kc.zero_()
    vc.zero_()
    key.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    rk, rv = flash_caches(nb, bs, heads, hs, hs, torch.uint8, "cpu", "NHD")
    ops.reshape_and_cache_flash(key.cpu(), value.cpu(), rk, rv, slots.cpu(), "fp8", s.cpu(),
                                s.cpu())
    assert torch.equal(kc.cpu(), rk) and torch.equal(vc.cpu(), rv)


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(sample_calls("cpu")))
def test_cuda_opcheck(name):
    op, args = sample_calls("cuda")[name]
    if name == "swap_blocks":  # host source, device destination
        args = (args[0].cpu().pin_memory(),) + args[1:]
    torch.library.opcheck(op, args)


@pytest.mark.cuda
def test_cuda_compiled_cache_write(gen):
    heads, hs, nb, bs = 8, 128, 32, 16
    key, value = kv_inputs(9, heads, hs, torch.bfloat16, "cuda", gen=gen)
    slots = slots_for(9, nb * bs, gen).cuda()

    def f(k, v, kc, vc, slots, s):
        ops.reshape_and_cache_flash(k * 2, v, kc, vc, slots, "fp8_e5m2", s, s)

    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.uint8, "cuda", "HND")
    ekc, evc = flash_caches(nb, bs, heads, hs, hs, torch.uint8, "cuda", "HND")
    f(key, value, ekc, evc, slots, one("cuda"))
    torch.compile(f, fullgraph=True)(key, value, kc, vc, slots, one("cuda"))
    assert torch.equal(kc, ekc) and torch.equal(vc, evc)

