"""MLA and sparse-indexer cache ops: per-token byte oracles, round trips, opcheck, errors, compile,
CUDA.

The oracles below build every cache entry byte by byte from vLLM's semantics (.scratch/mla_spec.md)
with Python floats: float32 arithmetic is emulated by rounding each double result to float32
(exact for one +, -, *, / of float32 operands), and the fp8 codes come from an encoder that
decodes every code from its bit fields and picks the nearest (ties to the even code). They share
no code with compile_ops.mla or compile_ops.cache.
"""

import bisect
import itertools
import math
import re
import struct

import pytest
import torch

from compile_ops.testing import assert_raises_eager_and_fake, rope_cos_sin_cache

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPES16 = [torch.float16, torch.bfloat16]
KV_DTYPES = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
       "fp8_e5m2": torch.float8_e5m2}
FLT_MIN = 2.0 ** -126
DS_RANK, DS_PE, DS_ENTRY = 512, 64, 656
# CPU shapes: (tokens, block_size, num_blocks); odd token counts, block sizes 1 / 16 / 64
CASES = [(1, 16, 2), (7, 1, 12), (37, 64, 2)]


# ---------------------------------------------------------------------------------------------
# Scalar helpers: float32 rounding, fp8 codes, bf16 bits
# ---------------------------------------------------------------------------------------------
def f32(v: float) -> float:
    """v rounded to float32 (round to nearest even)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_bytes(v: float) -> list:
    return list(struct.pack("<f", v))


def bf16_bits(v: float) -> int:
    """Bits of float32 value v rounded to bfloat16, nearest even; NaN is 0x7FFF (CUDA's
    __float2bfloat16_rn)."""
    if v != v:
        return 0x7FFF
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


class Fp8:
    """An fp8 format from its bit fields: codes 0..n_finite-1 are the positive finite values in
    increasing order, bit 7 is the sign."""

    def __init__(self, exp_bits: int, man_bits: int, bias: int, n_finite: int):
        self.values = []
        for code in range(n_finite):
            e, m = code >> man_bits, code & ((1 << man_bits) - 1)
            if e == 0:
                self.values.append(m * 2.0 ** (1 - bias - man_bits))
            else:
                self.values.append((1 + m / 2 ** man_bits) * 2.0 ** (e - bias))
        self.max = self.values[-1]

    def encode(self, v: float) -> int:
        """Saturate to +-max, then round to nearest, ties to the even code; sign kept (-0 too).
        NaN is 0x7F whatever its sign (CUDA's canonical NaN; vLLM's kernels store it)."""
        if v != v:
            return 0x7F
        neg = math.copysign(1.0, v) < 0
        a = min(abs(v), self.max)
        i = bisect.bisect_left(self.values, a)
        if self.values[i] != a:
            lo, hi = self.values[i - 1], self.values[i]
            if a - lo < hi - a or (a - lo == hi - a and (i - 1) % 2 == 0):
                i -= 1
        return i | (0x80 if neg else 0)

    def decode(self, code: int) -> float:
        if code & 0x7F >= len(self.values):  # e4m3's 0x7F / 0xFF (only e4m3 is decoded here)
            return math.nan
        v = self.values[code & 0x7F]
        return -v if code & 0x80 else v


E4M3 = Fp8(4, 3, 7, 0x7F)  # 0x7F / 0xFF are NaN; largest finite 448
E5M2 = Fp8(5, 2, 15, 0x7C)  # 0x7C is inf; largest finite 57344
EPS32 = f32(1e-4)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of t's storage (what t views and what lies around it) as a uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def moved_all(ts, device) -> list:
    """Copies of ts on device with the same strides and offsets; the whole storage of each is
    copied (once per storage: views that share memory still share it)."""
    copies, out = {}, []
    for t in ts:
        sb = storage_bytes(t)
        if sb.data_ptr() not in copies:
            copies[sb.data_ptr()] = sb.to(device, copy=True)
        out.append(copies[sb.data_ptr()].view(t.dtype).as_strided(t.shape, t.stride(),
                                                                  t.storage_offset()))
    return out


def moved(t: torch.Tensor, device) -> torch.Tensor:
    return moved_all([t], device)[0]


def row_bytes(x: torch.Tensor) -> list:
    return x.contiguous().view(torch.uint8).tolist()


# ---------------------------------------------------------------------------------------------
# Oracles (per-token loops; they write into a copy of the destination)
# ---------------------------------------------------------------------------------------------
def amax_skip_nan(vals) -> float:
    """max |v| over the values that are not NaN, from 0 (CUDA's fmaxf reduction: NaN skipped,
    an infinity kept)."""
    return max((abs(v) for v in vals if v == v), default=0.0)


def mla_entry(kv_c_row, k_pe_row, kv: str, scale: float) -> list:
    """The bytes of one MLA cache entry. fp8_ds_mla: NaN skipped by the amax, an infinite amax
    gives an infinite scale (finite values then code +-0, inf / inf a NaN code)."""
    if kv == "fp8_ds_mla":
        vals = kv_c_row.float().tolist()
        codes, scales = [], []
        for k in range(4):
            tile = vals[128 * k:128 * (k + 1)]
            s = max(f32(amax_skip_nan(tile) / 448.0), FLT_MIN)
            scales.append(s)
            codes += [E4M3.encode(f32(v / s)) for v in tile]
        return codes + sum((f32_bytes(s) for s in scales), []) + row_bytes(k_pe_row)
    if kv == "auto":
        return row_bytes(kv_c_row) + row_bytes(k_pe_row)
    fmt = E5M2 if kv == "fp8_e5m2" else E4M3
    vals = kv_c_row.float().tolist() + k_pe_row.float().tolist()
    return [fmt.encode(f32(v / scale)) for v in vals]


def mla_oracle(kv_c, k_pe, cache, slots, kv, scale) -> None:
    b, bs = raw(cache), cache.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            b[s // bs, s % bs] = torch.tensor(mla_entry(kv_c[t], k_pe[t], kv, scale),
                                              dtype=torch.uint8)


def rotate_row(x, cos, sin, is_neox):
    """One row rotated: each product and sum rounded to float32, then once to x's dtype."""
    v = x.float().tolist()
    out = list(v)
    half = len(v) // 2
    for j in range(half):
        a, b = (j, j + half) if is_neox else (2 * j, 2 * j + 1)
        out[a] = f32(f32(v[a] * cos[j]) - f32(v[b] * sin[j]))
        out[b] = f32(f32(v[b] * cos[j]) + f32(v[a] * sin[j]))
    return torch.tensor(out, dtype=torch.float32).to(x.dtype)


def rope_fused_oracle(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots, cache, kv, scale):
    """Expected (q_pe, k_pe); writes the expected entries into cache."""
    q, k = q_pe.clone(), k_pe.clone()
    half = k_pe.shape[1] // 2
    sl = slots.tolist()
    for t in range(q_pe.shape[0]):
        cs = cos_sin[int(positions[t])].float().tolist()
        for h in range(q_pe.shape[1]):
            q[t, h] = rotate_row(q_pe[t, h], cs[:half], cs[half:], is_neox)
        if sl[t] >= 0:
            k[t] = rotate_row(k_pe[t], cs[:half], cs[half:], is_neox)
    mla_oracle(kv_c, k, cache, slots, kv, scale)
    return q, k


def upconvert_oracle(src, dst, table, ws, batch, starts=None) -> None:
    b, bs = raw(src), src.shape[1]
    ws = ws[:batch].tolist()
    st = starts[:batch].tolist() if starts is not None else [0] * batch
    for r in range(dst.shape[0]):
        reqs = [i for i in range(batch) if ws[i] <= r]
        if not reqs:
            continue
        q = reqs[-1]
        off = r - ws[q] + st[q]
        e = b[int(table[q, off // bs]), off % bs].tolist()
        scales = [struct.unpack("<f", bytes(e[512 + 4 * k:516 + 4 * k]))[0] for k in range(4)]
        bits = [bf16_bits(f32(E4M3.decode(e[i]) * scales[i // 128])) for i in range(512)]
        bits += list(struct.unpack("<64H", bytes(e[528:656])))
        dst[r] = torch.tensor([x - 65536 if x >= 32768 else x for x in bits],
                              dtype=torch.int16).view(torch.bfloat16)


def indexer_token(k_row, Q: int, fmt: str):
    """(e4m3 codes, float32 scales) of one token (NaN skipped by the amax; an infinite scale
    stays infinite with ue8m0)."""
    vals = k_row.float().tolist()
    codes, scales = [], []
    for g in range(len(vals) // Q):
        grp = vals[g * Q:(g + 1) * Q]
        s = f32(max(amax_skip_nan(grp), EPS32) / 448.0)
        if fmt == "ue8m0" and not math.isinf(s):
            m, e = math.frexp(s)
            s = s if m == 0.5 else math.ldexp(1.0, e)
        scales.append(s)
        codes += [E4M3.encode(f32(v / s)) for v in grp]
    return codes, scales


def indexer_oracle(k, cache, slots, Q, fmt) -> None:
    bs, D = cache.shape[1], k.shape[1]
    groups = D // Q
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        blk = raw(cache)[s // bs].view(-1)  # the block: codes of all tokens, then the scales
        o = s % bs
        codes, scales = indexer_token(k[t], Q, fmt)
        blk[o * D:(o + 1) * D] = torch.tensor(codes, dtype=torch.uint8)
        at = bs * D + o * groups * 4
        blk[at:at + groups * 4] = torch.tensor(sum((f32_bytes(x) for x in scales), []),
                                               dtype=torch.uint8)


def indexer_gather_oracle(cache, dst_k, dst_scale, table, cu) -> None:
    bs, D = cache.shape[1], dst_k.shape[1]
    sb = cache.shape[2] - D
    cu = cu.tolist()
    dk, ds = raw(dst_k), raw(dst_scale)
    for t in range(min(cu[-1], dst_k.shape[0])):
        b = [i for i in range(len(cu) - 1) if cu[i] <= t][-1]
        pos = t - cu[b]
        blk = raw(cache)[int(table[b, pos // bs])].view(-1)
        o = pos % bs
        dk[t] = blk[o * D:(o + 1) * D]
        ds[t] = blk[bs * D + o * sb:bs * D + (o + 1) * sb]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def slots_for(tokens, num_slots, gen, *, pad=True):
    """Distinct random slots; tokens 1, 4, 7, ... are padding (-1) when pad."""
    s = torch.randperm(num_slots, generator=gen)[:tokens].clone()
    if pad:
        s[1::3] = -1
    return s


def sentinel_cache(nb, bs, width, dtype, *, block_pad=1):
    """(big, cache): cache [nb, bs, width] is big[:, :bs] of a [nb, bs + block_pad, width] tensor
    (block stride larger than bs * width) filled with a byte pattern."""
    el = torch.empty(0, dtype=dtype).element_size()
    n = nb * (bs + block_pad) * width * el
    pattern = ((torch.arange(n) * 37 + 11) % 251).to(torch.uint8)
    big = pattern.view(dtype).view(nb, bs + block_pad, width).clone()
    return big, big[:, :bs]


def mla_inputs(tokens, rank, pe, dtype, gen, *, extra_rows=3, pad=8, offset=0):
    """kv_c, k_pe: column slices of one [tokens + extra_rows, offset + rank + pe + pad] tensor
    (pad=None: two separate contiguous tensors of exactly `tokens` rows)."""
    if pad is None:
        return (torch.randn(tokens, rank, generator=gen).to(dtype),
                torch.randn(tokens, pe, generator=gen).to(dtype))
    row = torch.randn(tokens + extra_rows, offset + rank + pe + pad, generator=gen).to(dtype)
    return row[:, offset:offset + rank], row[:, offset + rank:offset + rank + pe]


def plant_mla(kv_c, k_pe, kv):
    """Edge values in token 0: saturation, signed zeros, tiny values; for fp8_ds_mla an all-zero
    tile, an all -0.0 tile and a tile with one large value (most codes subnormal or zero)."""
    if kv == "fp8_ds_mla":
        kv_c[0, 128:256] = 0.0
        kv_c[0, 256:384] = -0.0
        kv_c[0, 384:512] *= 1e-3
        kv_c[0, 400] = -1e4
        return
    kv_c[0, :5] = torch.tensor([3e4, -3e4, 0.0, -0.0, 1e-5])
    k_pe[0, 0] = -2e4


def batch_table(lens, bs, gen, *, starts=None, extra_cols=2, extra_rows=1):
    """A block table (int32; a column slice of a wider table, one spare row) with distinct
    random blocks, the number of blocks it needs, and the cumulative offsets."""
    starts = starts or [0] * len(lens)
    cols = max((s + n + bs - 1) // bs for s, n in zip(starts, lens)) or 1
    rows = len(lens) + extra_rows
    nb = rows * cols + 1
    table = torch.randperm(nb, generator=gen)[:rows * cols].view(rows, cols).to(torch.int32)
    wide = torch.full((rows, cols + extra_cols), -7, dtype=torch.int32)
    wide[:, :cols] = table
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    return wide[:, :cols], nb, cu


def ds_mla_random_cache(nb, bs, gen, storage=torch.uint8):
    """Random fp8_ds_mla entries (no NaN codes, scales over many binades, a few FLT_MIN scales
    whose products are float32 / bf16 subnormals, bf16 rope) in a block-padded cache."""
    big, cache = sentinel_cache(nb, bs, DS_ENTRY, storage)
    b = raw(cache)
    codes = torch.randint(0, 256, (nb, bs, DS_RANK), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3B
    b[..., :DS_RANK] = codes
    sc = torch.rand(nb, bs, 4, generator=gen) + 0.5
    sc = sc * 2.0 ** torch.randint(-30, 20, (nb, bs, 4), generator=gen).float()
    sc.view(-1)[::7] = FLT_MIN
    b[..., DS_RANK:DS_RANK + 16] = sc.view(torch.uint8).view(nb, bs, 16)
    rope = torch.randn(nb, bs, DS_PE, generator=gen).to(torch.bfloat16)
    b[..., DS_RANK + 16:] = rope.view(torch.uint8).view(nb, bs, 2 * DS_PE)
    return big, cache


def indexer_random_cache(nb, bs, D, Q, gen, storage=torch.uint8):
    """Random e4m3 bytes and float32 scales in the block-major layout (block-padded)."""
    groups = D // Q
    big, cache = sentinel_cache(nb, bs, D + groups * 4, storage)
    for blk in range(nb):
        flat = raw(cache)[blk].view(-1)
        flat[:bs * D] = torch.randint(0, 256, (bs * D,), generator=gen, dtype=torch.uint8)
        sc = torch.rand(bs * groups, generator=gen) * 2.0 ** -5 + 2.0 ** -10
        flat[bs * D:] = sc.view(torch.uint8)
    return big, cache


def rope_inputs(tokens, heads, rank, rot, nope, dtype, gen, *, cs_dtype=torch.float32,
                sliced=True):
    """q_pe: the last rot columns of q [tokens, heads, nope + rot] (sliced) or its own tensor;
    k_pe, kv_c: column slices of one [tokens, rot + rank + 8] row (sliced) or separate."""
    if sliced:
        q = torch.randn(tokens, heads, nope + rot, generator=gen).to(dtype)
        row = torch.randn(tokens, rot + rank + 8, generator=gen).to(dtype)
        q_pe, k_pe, kv_c = q[..., nope:], row[:, :rot], row[:, rot:rot + rank]
    else:
        q_pe = torch.randn(tokens, heads, rot, generator=gen).to(dtype)
        k_pe = torch.randn(tokens, rot, generator=gen).to(dtype)
        kv_c = torch.randn(tokens, rank, generator=gen).to(dtype)
    positions = torch.randint(0, 64, (tokens + 2,), generator=gen)  # padded: longer than tokens
    cos_sin = rope_cos_sin_cache(64, rot, cs_dtype)
    return positions, q_pe, k_pe, kv_c, cos_sin


def one(value=1.0, device="cpu"):
    return torch.tensor([value], dtype=torch.float32, device=device)


def fp8_storage(kv, dtype, use_float8):
    if kv == "auto":
        return dtype
    if kv == "fp8_ds_mla":
        return torch.float8_e4m3fn if use_float8 else torch.uint8
    return FP8[kv] if use_float8 else torch.uint8


# ---------------------------------------------------------------------------------------------
# The oracle's own building blocks against torch's conversions
# ---------------------------------------------------------------------------------------------
def test_oracle_fp8_encoder_matches_torch():
    """Every finite code decodes as torch does; midpoints and near-midpoints round alike."""
    for fmt, tdt in ((E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)):
        n = len(fmt.values)
        codes = torch.tensor(list(range(n)) + [c | 0x80 for c in range(n)], dtype=torch.uint8)
        assert [fmt.decode(c) for c in codes.tolist()] == codes.view(tdt).float().tolist()
        v = torch.tensor(fmt.values)
        mids = (v[1:] + v[:-1]) / 2
        probe = torch.cat([mids, mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20), v,
                           torch.tensor([1e6, 460.0, 470.0, 1e-12, 0.0])]).float()
        probe = torch.cat([probe, -probe])
        want = probe.clamp(-fmt.max, fmt.max).to(tdt).view(torch.uint8).tolist()
        assert [fmt.encode(x) for x in probe.tolist()] == want
    x = torch.randn(1000) * 2.0 ** torch.randint(-140, 10, (1000,)).float()
    assert [bf16_bits(v) for v in x.tolist()] == \
        x.to(torch.bfloat16).view(torch.int16).int().bitwise_and(0xFFFF).tolist()


# ---------------------------------------------------------------------------------------------
# concat_and_cache_mla
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,bs,nb", CASES)
@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_and_cache_mla_matches_oracle(dtype, kv, tokens, bs, nb, gen):
    """kv_c / k_pe column slices of one tensor with 3 more rows than slots, padding slots, a
    block-padded cache prefilled with a byte pattern; fp8 stored as uint8 or the float8 dtype."""
    rank, pe = 64, 16
    kv_c, k_pe = mla_inputs(tokens, rank, pe, dtype, gen)
    plant_mla(kv_c, k_pe, kv)
    slots = slots_for(tokens, nb * bs, gen)
    big, cache = sentinel_cache(nb, bs, rank + pe, fp8_storage(kv, dtype, bs == 1))
    want = big.clone()
    scale = one(0.37)
    mla_oracle(kv_c, k_pe, want[:, :bs], slots, kv, float(scale))
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv, scale)
    assert torch.equal(raw(big), raw(want))


@pytest.mark.parametrize("storage", [torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("tokens,bs,nb", CASES)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_concat_and_cache_mla_ds_mla_matches_oracle(dtype, tokens, bs, nb, storage, gen):
    """656-byte entries: 512 e4m3 codes, 4 float32 tile scales max(amax / 448, FLT_MIN), 64 raw
    16-bit rope values; the scale argument is not used."""
    kv_c, k_pe = mla_inputs(tokens, DS_RANK, DS_PE, dtype, gen)
    plant_mla(kv_c, k_pe, "fp8_ds_mla")
    slots = slots_for(tokens, nb * bs, gen)
    big, cache = sentinel_cache(nb, bs, DS_ENTRY, storage)
    want = big.clone()
    mla_oracle(kv_c, k_pe, want[:, :bs], slots, "fp8_ds_mla", None)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", one(123.0))
    assert torch.equal(raw(big), raw(want))
    if tokens == 1:  # token 0's planted tiles, spelled out
        e = raw(cache)[slots[0] // bs, slots[0] % bs]
        sc = e[512:528].clone().view(torch.float32).tolist()
        big_val = abs(float(kv_c[0, 400]))
        assert sc[1] == FLT_MIN and sc[2] == FLT_MIN and sc[3] == f32(big_val / 448)
        assert (e[128:256] == 0).all() and (e[256:384] == 0x80).all()
        assert e[400] == 0xFE  # -448: the tile's amax maps to the largest code
        assert torch.equal(e[528:], k_pe[0].contiguous().view(torch.uint8))


def test_concat_and_cache_mla_contiguous_inputs_and_exact_token_count(gen):
    """Separate contiguous kv_c / k_pe, as many rows as slots, an unpadded cache."""
    nb, bs = 3, 4
    kv_c, k_pe = mla_inputs(9, 32, 8, torch.bfloat16, gen, pad=None)
    slots = slots_for(9, nb * bs, gen)
    cache = torch.zeros(nb, bs, 40, dtype=torch.uint8)
    want = cache.clone()
    mla_oracle(kv_c, k_pe, want, slots, "fp8_e5m2", 2.0)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_e5m2", one(2.0))
    assert torch.equal(cache, want)


# ---------------------------------------------------------------------------------------------
# concat_and_cache_mla_rope_fused
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_fused_matches_oracle(dtype, is_neox, kv, gen):
    """q_pe rotated for every token, k_pe only for tokens with a slot (written back), the cache
    gets [kv_c | rotated k_pe]; q's other columns and kv_c stay as they were."""
    tokens, heads, rank, rot, nope, nb, bs = 7, 2, 32, 16, 8, 3, 4
    cs_dtype = dtype if dtype == torch.bfloat16 else torch.float32
    positions, q_pe, k_pe, kv_c, cos_sin = rope_inputs(tokens, heads, rank, rot, nope, dtype, gen,
                                                       cs_dtype=cs_dtype)
    slots = slots_for(tokens, nb * bs, gen)
    big, cache = sentinel_cache(nb, bs, rank + rot, fp8_storage(kv, dtype, False))
    want = big.clone()
    q0, row0 = root(q_pe).clone(), root(k_pe).clone()
    scale = one(0.37)
    wq, wk = rope_fused_oracle(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots,
                               want[:, :bs], kv, float(scale))
    ops.concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots,
                                        cache, kv, scale)
    assert torch.equal(q_pe, wq) and torch.equal(k_pe, wk)
    assert torch.equal(raw(big), raw(want))
    assert torch.equal(root(q_pe)[..., :nope], q0[..., :nope])
    assert torch.equal(root(k_pe)[:, rot:], row0[:, rot:])  # kv_c and the pad
    pad = slots < 0
    assert torch.equal(k_pe[pad], row0[:, :rot][pad])
    assert not torch.equal(q_pe[pad], q0[..., nope:][pad])  # padding tokens' q_pe rotated


@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_fused_equals_rotary_embedding_then_concat(dtype, is_neox, kv, gen):
    tokens, heads, rank, rot, nope, nb, bs = 37, 3, 48, 32, 16, 4, 16

    def make():
        g = torch.Generator().manual_seed(7)
        return rope_inputs(tokens, heads, rank, rot, nope, dtype, g)

    positions, q_pe, k_pe, kv_c, cos_sin = make()
    slots = slots_for(tokens, nb * bs, gen)
    cdt = fp8_storage(kv, dtype, True)
    _, cache = sentinel_cache(nb, bs, rank + rot, cdt)
    ops.concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots,
                                        cache, kv, one(0.5))

    positions, q2, k2, kv_c2, cos_sin = make()
    k_orig = k2.clone()
    q_dense = q2.contiguous()  # rotary_embedding wants each token's heads packed
    ops.rotary_embedding(positions[:tokens], q_dense, k2, rot, cos_sin, is_neox)
    _, cache2 = sentinel_cache(nb, bs, rank + rot, cdt)
    ops.concat_and_cache_mla(kv_c2, k2, cache2, slots, kv, one(0.5))
    assert torch.equal(storage_bytes(cache), storage_bytes(cache2))
    assert torch.equal(q_pe, q_dense)  # every token, padding ones too
    has = slots >= 0
    assert torch.equal(k_pe[has], k2[has])
    assert torch.equal(k_pe[~has], k_orig[~has])


# ---------------------------------------------------------------------------------------------
# cp_gather_and_upconvert_fp8_kv_cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_starts", [False, True])
@pytest.mark.parametrize("bs", [1, 16, 64])
def test_upconvert_matches_oracle(bs, with_starts, gen):
    """Requests of lengths 5, 0, 9, 3 (a zero-length one), optional seq_starts, a block table
    with a spare row and more workspace_starts than batch_size, a row-strided dst."""
    lens = [5, 0, 9, 3]
    starts = [3, 0, 8, 1] if with_starts else None
    table, nb, cu = batch_table(lens, bs, gen, starts=starts)
    _, src = ds_mla_random_cache(nb, bs, gen, torch.float8_e4m3fn if bs == 16 else torch.uint8)
    ws = torch.cat([cu[:-1], torch.tensor([99], dtype=torch.int32)])  # one spare entry
    st = torch.tensor(starts + [5], dtype=torch.int32) if with_starts else None
    total = sum(lens)
    dst_big = torch.full((total, 600), 7.0, dtype=torch.bfloat16)
    dst = dst_big[:, :576]
    want = dst_big.clone()
    upconvert_oracle(src, want[:, :576], table, ws, len(lens), st)
    ops.cp_gather_and_upconvert_fp8_kv_cache(src, dst, table, ws, len(lens), st)
    assert torch.equal(raw(dst_big), raw(want))
    assert (dst_big[:, 576:] == 7).all()


def test_upconvert_rows_before_the_first_request_are_untouched(gen):
    bs = 4
    table, nb, _ = batch_table([3, 4], bs, gen)
    _, src = ds_mla_random_cache(nb, bs, gen)
    ws = torch.tensor([2, 5], dtype=torch.int32)
    dst = torch.full((9, 576), -3.0, dtype=torch.bfloat16)
    want = dst.clone()
    upconvert_oracle(src, want, table, ws, 2)
    ops.cp_gather_and_upconvert_fp8_kv_cache(src, dst, table, ws, 2)
    assert torch.equal(raw(dst), raw(want)) and (dst[:2] == -3).all()
    ops.cp_gather_and_upconvert_fp8_kv_cache(src, dst, table, ws, 0)  # batch 0: nothing
    assert torch.equal(raw(dst), raw(want))


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("bs", [16, 64])
def test_ds_mla_write_then_upconvert_round_trip(dtype, bs, gen):
    """The nope part comes back within e4m3's error (2^-4 of the tile's amax), the rope bits
    exactly; each request's tokens are written where its block table points."""
    lens = [7, 1, 37]
    table, nb, cu = batch_table(lens, bs, gen)
    kv_c, k_pe = mla_inputs(sum(lens), DS_RANK, DS_PE, dtype, gen)
    kv_c[3, :128] *= 100
    kv_c[4, 128:256] = 0
    slots = torch.tensor([int(table[q, p // bs]) * bs + p % bs
                          for q, n in enumerate(lens) for p in range(n)])
    _, cache = sentinel_cache(nb, bs, DS_ENTRY, torch.uint8)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", one())
    dst = torch.zeros(sum(lens), 576, dtype=torch.bfloat16)
    ops.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, table, cu[:-1].clone(), len(lens))
    x = kv_c[:sum(lens)].float().view(-1, 4, 128)
    amax = x.abs().amax(-1, keepdim=True)
    err = (dst[:, :512].float().view(-1, 4, 128) - x).abs()
    assert (err <= amax * 2.0 ** -4).all()
    assert (dst[4, 128:256] == 0).all()
    assert torch.equal(dst[:, 512:].view(torch.int16), k_pe[:sum(lens)].view(torch.int16))


# ---------------------------------------------------------------------------------------------
# indexer_k_quant_and_cache / cp_gather_indexer_k_quant_cache
# ---------------------------------------------------------------------------------------------
def plant_indexer(k, Q):
    """token 0: amax 56 (scale exactly 2^-3); token 2: amax 56.5 (ue8m0 rounds up to 2^-2);
    token 3: all zero (the 1e-4 floor); with two groups, token 0's second group is zero."""
    k[0, 0] = 56.0
    if k.shape[1] > Q:
        k[0, Q:2 * Q] = 0.0
    if k.shape[0] > 3:
        k[2, 1] = -56.5
        k[3] = 0.0


@pytest.mark.parametrize("tokens,bs,nb", CASES)
@pytest.mark.parametrize("D,Q", [(128, 128), (256, 64)])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer_k_quant_and_cache_matches_oracle(dtype, fmt, D, Q, tokens, bs, nb, gen):
    """Block-major layout; k row-strided with 3 more rows than slots; padding slots; a
    block-padded cache prefilled with a byte pattern."""
    k = torch.randn(tokens + 3, D + 8, generator=gen).to(dtype)[:, :D]
    plant_indexer(k, Q)
    slots = slots_for(tokens, nb * bs, gen)
    storage = torch.float8_e4m3fn if bs == 1 else torch.uint8
    big, cache = sentinel_cache(nb, bs, D + D // Q * 4, storage)
    want = big.clone()
    indexer_oracle(k, want[:, :bs], slots, Q, fmt)
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, fmt)
    assert torch.equal(raw(big), raw(want))
    if tokens == 1:
        blk = raw(cache)[slots[0] // bs].view(-1)
        at = bs * D + int(slots[0] % bs) * (D // Q) * 4
        assert blk[at:at + 4].clone().view(torch.float32).item() == 0.125


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "float32"])
def test_indexer_other_scale_format_names_are_plain_float32(fmt, gen):
    k = torch.randn(5, 128, generator=gen).to(torch.bfloat16)
    plant_indexer(k, 32)
    slots = slots_for(5, 8, gen)
    cache = torch.zeros(2, 4, 128 + 16, dtype=torch.uint8)
    want = cache.clone()
    indexer_oracle(k, want, slots, 32, "fp8")
    ops.indexer_k_quant_and_cache(k, cache, slots, 32, fmt)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("rows", ["more", "fewer"])  # dst rows: past cu[-1] / truncating
@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("bs", [1, 16, 64])
@pytest.mark.parametrize("D,Q", [(128, 128), (256, 64)])
def test_indexer_gather_matches_oracle(D, Q, bs, scale_dtype, rows, gen):
    lens = [5, 0, 9, 3]
    table, nb, cu = batch_table(lens, bs, gen, extra_rows=0)  # batch = block_table rows
    _, cache = indexer_random_cache(nb, bs, D, Q, gen)
    n = sum(lens) + 3 if rows == "more" else sum(lens) - 5
    groups = D // Q
    k_big = torch.full((n, D + 16), 0x5A, dtype=torch.uint8)
    dst_k = k_big[:, :D].view(torch.float8_e4m3fn) if bs == 16 else k_big[:, :D]
    sw = groups * 4 if scale_dtype == torch.uint8 else groups
    s_big = torch.full((n, sw + 3), 3, dtype=scale_dtype)
    dst_scale = s_big[:, :sw]
    want_k, want_s = k_big.clone(), s_big.clone()
    indexer_gather_oracle(cache, want_k[:, :D], want_s[:, :sw], table, cu)
    ops.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_scale, table, cu)
    assert torch.equal(k_big, want_k) and torch.equal(raw(s_big), raw(want_s))
    if rows == "more":
        assert (k_big[sum(lens):] == 0x5A).all() and (s_big[sum(lens):] == 3).all()


@pytest.mark.parametrize("D,Q", [(128, 128), (256, 64), (128, 32)])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
def test_indexer_write_then_gather_round_trip(fmt, D, Q, gen):
    """The gather returns exactly the bytes written: the oracle's codes and scales per token."""
    bs, lens = 16, [7, 0, 1, 37]
    table, nb, cu = batch_table(lens, bs, gen, extra_rows=0)
    total = sum(lens)
    k = (torch.randn(total, D, generator=gen) * 3).to(torch.bfloat16)
    plant_indexer(k, Q)
    slots = torch.tensor([int(table[q, p // bs]) * bs + p % bs
                          for q, n in enumerate(lens) for p in range(n)])
    _, cache = sentinel_cache(nb, bs, D + D // Q * 4, torch.uint8)
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, fmt)
    dst_k = torch.zeros(total, D, dtype=torch.float8_e4m3fn)
    dst_scale = torch.zeros(total, D // Q, dtype=torch.float32)
    ops.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_scale, table, cu)
    for t in range(total):
        codes, scales = indexer_token(k[t], Q, fmt)
        assert raw(dst_k[t]).tolist() == codes
        assert dst_scale[t].tolist() == scales
    # the codes times the scales give k back within e4m3's error
    back = dst_k.float().view(total, -1, Q) * dst_scale[..., None]
    x = k.float().view(total, -1, Q)
    assert ((back - x).abs() <= dst_scale[..., None] * 16.01).all()


# ---------------------------------------------------------------------------------------------
# fp8_ds_mla and indexer quantization: NaN / inf keys, exact rounding ties
# ---------------------------------------------------------------------------------------------
# vLLM's semantics (its kernels, and ours): amax = fmaxf(amax, |x|) from 0, so NaN is skipped and
# an infinity makes the scale infinite; a code is e4m3(x / scale) with NaN stored as 0x7F.
E4M3_MIDS = [(a + b) / 2 for a, b in zip(E4M3.values, E4M3.values[1:])]  # 126 rounding ties
INF_BYTES = [0x00, 0x00, 0x80, 0x7F]  # float32 +inf
NEG_NAN_BITS = {torch.float32: -0x400000, torch.float16: -0x200, torch.bfloat16: -0x40}


def put_neg_nan(t: torch.Tensor, idx) -> None:
    """t[idx] = a NaN with its sign bit set (torch writes a positive NaN for -nan in 16 bits)."""
    t.view(torch.int32 if t.element_size() == 4 else torch.int16)[idx] = NEG_NAN_BITS[t.dtype]


def plant_nan_inf(x: torch.Tensor, group: int) -> list:
    """NaN / inf in tokens 1, 2 and 4 of x [tokens >= 5, width] (groups of `group` values):
    token 1 a NaN and a -NaN in group 0, a -NaN in the last group; token 2 +inf in group 0, the
    last group -inf, +inf and NaN, group 1 all NaN (when there are 3 groups or more); token 4
    group 0 all +-inf. Returns the planted tokens; tokens 0 and 3 stay finite."""
    last = (x.shape[1] // group - 1) * group
    x[1, 3] = float("nan")
    put_neg_nan(x, (1, 7))
    put_neg_nan(x, (1, last + group - 2))
    x[2, 5] = float("inf")
    x[2, last + 1], x[2, last + 2], x[2, last + 3] = float("-inf"), float("inf"), float("nan")
    if x.shape[1] >= 3 * group:
        x[2, group:2 * group] = float("nan")
    x[4, :group] = float("inf")
    x[4, 1:group:2] = float("-inf")
    return [1, 2, 4]


def tie_values(tokens: int, width: int, group: int, dtype, gen, *, factors=(1.0, 3.0)):
    """[tokens, width] values whose every group of `group` has amax 448 s (s = 2^j or 3 * 2^j,
    so the scale is s exactly, for the indexer's ue8m0 too when s = 2^j) and whose other values
    are +-(an e4m3 midpoint) * s: each x / scale is exactly a rounding tie. Only a correctly
    rounded float32 division and a round-to-nearest-even conversion store the even code; x * (1
    / s), an approximate reciprocal, or a scale from amax * (1 / 448) moves x / scale off the
    tie (s = 3 * 2^j: 1 / s and 1 / 448 are inexact)."""
    groups = width // group
    s = 2.0 ** torch.randint(-8, 3, (tokens, groups, 1), generator=gen).float()
    s = s * torch.where(torch.rand(tokens, groups, 1, generator=gen) < 0.5, *factors)
    mids = torch.tensor(E4M3_MIDS, dtype=torch.float32)
    v = mids[torch.randint(0, len(mids), (tokens, groups, group), generator=gen)]
    v = v * torch.where(torch.rand(tokens, groups, group, generator=gen) < 0.5, -1.0, 1.0)
    at = torch.randint(0, group, (tokens, groups, 1), generator=gen)
    v.scatter_(2, at, torch.where(torch.rand(tokens, groups, 1, generator=gen) < 0.5, -448.0,
                                  448.0))
    x = (v * s).reshape(tokens, width)
    out = x.to(dtype)
    assert torch.equal(out.float(), x)  # every value exactly representable
    return out


def near_tie_values(tokens: int, width: int, group: int, gen) -> torch.Tensor:
    """float32 tie_values (scales 3 * 2^j) with every value but the amax moved by -2..2 ulps:
    each x / scale lies a few ulps from a tie, on either side, where x * (1 / scale) (even a
    correctly rounded reciprocal) lands on the other side or on the tie for some of them."""
    x = tie_values(tokens, width, group, torch.float32, gen, factors=(3.0, 3.0))
    bits = x.view(torch.int32)
    moved = torch.where(x.abs().view(tokens, -1, group)
                        == x.abs().view(tokens, -1, group).amax(-1, keepdim=True),
                        0, torch.randint(-2, 3, (tokens, width // group, group), generator=gen))
    return (bits + moved.view(tokens, width).to(torch.int32)).view(torch.float32)


def reciprocal_flips(x: torch.Tensor, group: int, scales) -> int:
    """How many codes x * (1 / scale) would get wrong (float32 reciprocal, then a product)."""
    s = torch.tensor(scales, dtype=torch.float32).repeat_interleave(group, 1)
    good = x.float() / s
    bad = x.float() * (1 / s)
    enc = lambda q: q.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)  # noqa: E731
    return int((enc(good) != enc(bad)).sum())


def count_ties(x: torch.Tensor, group: int, scales) -> int:
    """How many x / scale (scales[token][group]) are exactly e4m3 rounding ties."""
    mids = set(E4M3_MIDS)
    vals = x.float().tolist()
    return sum(abs(f32(v / scales[t][i // group])) in mids
               for t, row in enumerate(vals) for i, v in enumerate(row))


def ds_entry(cache, slot):
    """(codes [512] uint8, 4 float32 tile scales, their 16 bytes) of one fp8_ds_mla entry."""
    e = raw(cache)[slot // cache.shape[1], slot % cache.shape[1]]
    return e[:DS_RANK], e[DS_RANK:DS_RANK + 16].clone().view(torch.float32).tolist(), \
        e[DS_RANK:DS_RANK + 16].tolist()


def indexer_entry(cache, slot, D, Q):
    """(codes [D] uint8, D / Q float32 scales, their bytes) of one token in the indexer cache."""
    bs, groups = cache.shape[1], D // Q
    blk, o = raw(cache)[slot // bs].view(-1), slot % bs
    sb = blk[bs * D + o * groups * 4:bs * D + (o + 1) * groups * 4]
    return blk[o * D:(o + 1) * D], sb.clone().view(torch.float32).tolist(), sb.tolist()


def blank_tokens(cache, slots, kind, D=None, Q=None) -> torch.Tensor:
    """A byte copy of the cache storage with the bytes of the given slots zeroed."""
    out = raw(cache).clone()
    bs = cache.shape[1]
    for s in slots:
        if kind == "ds":
            out[s // bs, s % bs] = 0
        else:
            groups, blk, o = D // Q, out[s // bs].view(-1), s % bs
            blk[o * D:(o + 1) * D] = 0
            blk[bs * D + o * groups * 4:bs * D + (o + 1) * groups * 4] = 0
    return out


def check_special_groups(codes, scales, scale_bytes, x_row, group, floor_scale):
    """The spec, group by group, for a row holding NaN / inf: NaN codes 0x7F; a group with an
    infinity has scale +inf, its infinities code 0x7F and its finite values +-0; an all-NaN group
    the floor scale and 0x7F codes; otherwise the scale of the finite values' amax."""
    vals = x_row.float().tolist()
    for g, s in enumerate(scales):
        grp = vals[g * group:(g + 1) * group]
        c = codes[g * group:(g + 1) * group].tolist()
        if any(math.isinf(v) for v in grp):
            assert scale_bytes[4 * g:4 * g + 4] == INF_BYTES
            assert c == [0x7F if not math.isfinite(v) else
                         (0x80 if math.copysign(1.0, v) < 0 else 0x00) for v in grp]
        elif all(v != v for v in grp):
            assert s == floor_scale and c == [0x7F] * group
        else:
            finite = max(abs(v) for v in grp if v == v)
            assert math.isfinite(s) and s >= f32(finite / 448.0)
            assert all(cc == 0x7F for cc, v in zip(c, grp) if v != v)
            assert all(cc != 0x7F and cc != 0xFF for cc, v in zip(c, grp) if v == v)


@pytest.mark.parametrize("dtype", DTYPES16)
def test_ds_mla_nan_and_inf_follow_vllm_and_stay_in_their_tile(dtype, gen):
    """A NaN is skipped by its tile's amax and stored as 0x7F; an infinity makes its tile's scale
    +inf (its finite values +-0, the infinities 0x7F); nothing else of the token, and nothing of
    the other tokens, changes (the same bytes as without the NaN / inf tokens)."""
    tokens, nb, bs = 6, 3, 4
    kv_c, k_pe = mla_inputs(tokens, DS_RANK, DS_PE, dtype, gen)
    special = plant_nan_inf(kv_c, 128)
    put_neg_nan(k_pe, (2, 3))  # rope bits are copied as they are, NaN too
    slots = torch.tensor([5, 0, 9, 2, 11, 7])
    big, cache = sentinel_cache(nb, bs, DS_ENTRY, torch.uint8)
    want = big.clone()
    mla_oracle(kv_c, k_pe, want[:, :bs], slots, "fp8_ds_mla", None)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", one())
    assert torch.equal(big, want)
    for t in special:
        codes, scales, sb = ds_entry(cache, int(slots[t]))
        check_special_groups(codes, scales, sb, kv_c[t], 128, FLT_MIN)
    _, sc1, _ = ds_entry(cache, int(slots[1]))
    assert sc1[0] == f32(amax_skip_nan(kv_c[1, :128].float().tolist()) / 448.0)
    _, _, sb4 = ds_entry(cache, int(slots[4]))
    assert sb4[:4] == INF_BYTES
    rope = raw(cache)[slots[2] // bs, slots[2] % bs, 528:].clone().view(torch.int16)
    assert int(rope[3]) == NEG_NAN_BITS[dtype]
    # the finite tokens: the bytes of a run where the NaN / inf tokens are padding
    _, alone = sentinel_cache(nb, bs, DS_ENTRY, torch.uint8)
    pad = slots.clone()
    pad[special] = -1
    ops.concat_and_cache_mla(kv_c, k_pe, alone, pad, "fp8_ds_mla", one())
    sp = [int(slots[t]) for t in special]
    assert torch.equal(blank_tokens(cache, sp, "ds"), blank_tokens(alone, sp, "ds"))


def nan_inf_ds_cache(gen, tokens=6, bs=4):
    """(cache, kv_c, k_pe, slots): fp8_ds_mla entries of bf16 rows with NaN / inf planted
    (0x7F codes, +inf tile scales), written by the reference at slots 0..tokens-1."""
    kv_c, k_pe = mla_inputs(tokens, DS_RANK, DS_PE, torch.bfloat16, gen, pad=None)
    plant_nan_inf(kv_c, 128)
    slots = torch.arange(tokens)
    cache = torch.zeros((tokens + bs - 1) // bs, bs, DS_ENTRY, dtype=torch.uint8)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", one())
    return cache, kv_c, k_pe, slots


def test_upconvert_of_nan_codes_and_infinite_scales(gen):
    """A 0x7F code, or any code of a +inf-scale tile, upconverts to bf16 0x7FFF (CUDA's NaN);
    the finite tiles and the rope bits as usual."""
    cache, kv_c, k_pe, slots = nan_inf_ds_cache(gen)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    ws = torch.tensor([0], dtype=torch.int32)
    dst = torch.zeros(6, 576, dtype=torch.bfloat16)
    want = dst.clone()
    upconvert_oracle(cache, want, table, ws, 1)
    ops.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, table, ws, 1)
    assert torch.equal(raw(dst), raw(want))
    bits = dst.view(torch.int16)
    assert (bits[4, :128] == 0x7FFF).all()                # token 4: a tile of +-inf only
    assert int(bits[1, 3]) == 0x7FFF and int(bits[1, 7]) == 0x7FFF  # NaN and -NaN codes
    assert not torch.isnan(dst[[0, 3], :512]).any()       # finite tokens
    assert torch.equal(dst[:, 512:], k_pe)


@pytest.mark.parametrize("D,Q", [(128, 128), (384, 128), (128, 32)])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer_nan_and_inf_follow_vllm_and_stay_in_their_group(dtype, fmt, D, Q, gen):
    """As for fp8_ds_mla, per quant group (scale max(amax, 1e-4) / 448; ue8m0 keeps +inf); the
    old reference propagated NaN into the group's scale and codes and gave ue8m0 an inf group
    scale 1.0."""
    tokens, nb, bs = 6, 3, 4
    k = torch.randn(tokens + 2, D + 8, generator=gen).to(dtype)[:tokens, :D]
    special = plant_nan_inf(k, Q)
    slots = torch.tensor([5, 0, 9, 2, 11, 7])
    big, cache = sentinel_cache(nb, bs, D + D // Q * 4, torch.uint8)
    want = big.clone()
    indexer_oracle(k, want[:, :bs], slots, Q, fmt)
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, fmt)
    assert torch.equal(big, want)
    floor = f32(EPS32 / 448.0)
    if fmt == "ue8m0":
        floor = 2.0 ** math.ceil(math.log2(floor))
    for t in special:
        codes, scales, sb = indexer_entry(cache, int(slots[t]), D, Q)
        check_special_groups(codes, scales, sb, k[t], Q, floor)
    _, _, sb4 = indexer_entry(cache, int(slots[4]), D, Q)
    assert sb4[:4] == INF_BYTES
    _, alone = sentinel_cache(nb, bs, D + D // Q * 4, torch.uint8)
    pad = slots.clone()
    pad[special] = -1
    ops.indexer_k_quant_and_cache(k, alone, pad, Q, fmt)
    sp = [int(slots[t]) for t in special]
    assert torch.equal(blank_tokens(cache, sp, "ix", D, Q), blank_tokens(alone, sp, "ix", D, Q))


@pytest.mark.parametrize("dtype", DTYPES16)
def test_ds_mla_rounding_ties_go_to_even(dtype, gen):
    """Tiles whose x / scale are exact e4m3 midpoints (scales 2^j and 3 * 2^j): the reference
    stores the even code, as the oracle does; most values are ties."""
    tokens, nb, bs = 8, 2, 4
    kv_c = tie_values(tokens, DS_RANK, 128, dtype, gen)
    k_pe = torch.randn(tokens, DS_PE, generator=gen).to(dtype)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    cache = torch.zeros(nb, bs, DS_ENTRY, dtype=torch.uint8)
    want = cache.clone()
    mla_oracle(kv_c, k_pe, want, slots, "fp8_ds_mla", None)
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", one())
    assert torch.equal(cache, want)
    scales = [ds_entry(cache, int(s))[1] for s in slots]
    assert count_ties(kv_c, 128, scales) > 0.9 * tokens * DS_RANK


@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer_rounding_ties_go_to_even(dtype, fmt, gen):
    tokens, D, Q, nb, bs = 8, 256, 64, 2, 4
    k = tie_values(tokens, D, Q, dtype, gen)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    cache = torch.zeros(nb, bs, D + D // Q * 4, dtype=torch.uint8)
    want = cache.clone()
    indexer_oracle(k, want, slots, Q, fmt)
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, fmt)
    assert torch.equal(cache, want)
    scales = [indexer_entry(cache, int(s), D, Q)[1] for s in slots]
    # ue8m0 rounds 3 * 2^j scales up to 2^(j + 2): those groups' quotients are exact, not ties
    assert count_ties(k, Q, scales) > (0.3 if fmt == "ue8m0" else 0.9) * tokens * D


def test_indexer_near_ties_need_a_true_division(gen):
    """float32 keys a few ulps from e4m3 ties (scales 3 * 2^j): the reference divides, as the
    oracle does; a reciprocal multiply would get dozens of these codes wrong."""
    tokens, D, Q, nb, bs = 8, 256, 64, 2, 4
    k = near_tie_values(tokens, D, Q, gen)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    cache = torch.zeros(nb, bs, D + D // Q * 4, dtype=torch.uint8)
    want = cache.clone()
    indexer_oracle(k, want, slots, Q, "fp8")
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, "fp8")
    assert torch.equal(cache, want)
    scales = [indexer_entry(cache, int(s), D, Q)[1] for s in slots]
    assert reciprocal_flips(k, Q, scales) > 20


# ---------------------------------------------------------------------------------------------
# Errors and out-of-range indices
# ---------------------------------------------------------------------------------------------
def concat_args(**over):
    a = dict(kv_c=torch.randn(3, 32), k_pe=torch.randn(3, 16), kv_cache=torch.zeros(2, 4, 48),
             slot_mapping=torch.tensor([0, 5, 2]), kv_cache_dtype="auto", scale=one())
    a.update(over)
    return a


def ds_args(**over):
    a = dict(kv_c=torch.randn(2, 512).bfloat16(), k_pe=torch.randn(2, 64).bfloat16(),
             kv_cache=torch.zeros(2, 4, 656, dtype=torch.uint8),
             slot_mapping=torch.tensor([0, 5]), kv_cache_dtype="fp8_ds_mla", scale=one())
    a.update(over)
    return a


@pytest.mark.parametrize("args,exc,fragment", [
    (concat_args(kv_cache_dtype="fp8_e4m3fnuz"), ValueError,
     "concat_and_cache_mla: unknown kv_cache_dtype 'fp8_e4m3fnuz'"),
    (concat_args(kv_cache_dtype="bfloat16"), ValueError, "unknown kv_cache_dtype 'bfloat16'"),
    (concat_args(kv_cache=torch.zeros(2, 4, 49)), ValueError,
     r"kv_cache must be \[num_blocks, block_size, 48\]"),
    (concat_args(kv_cache=torch.zeros(2, 4, 48, dtype=torch.float16)), TypeError,
     "kv_cache must have dtype torch.float32"),
    (concat_args(kv_cache_dtype="fp8"), TypeError, "kv_cache must be uint8 or"),
    (concat_args(kv_cache=torch.zeros(2, 4, 96)[:, :, ::2]), ValueError,
     "kv_cache must hold each entry contiguously"),
    (concat_args(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError,
     "slot_mapping must be int64"),
    (concat_args(slot_mapping=torch.tensor([0, 1, 2, 3])), ValueError,
     "4 slots but kv_c has only 3 tokens"),
    (concat_args(k_pe=torch.randn(3, 16).half()), TypeError,
     r"k_pe must have dtype torch.float32 \(same as kv_c\)"),
    (concat_args(k_pe=torch.randn(2, 16)), ValueError, "k_pe must have kv_c's 3 tokens"),
    (concat_args(kv_c=torch.randn(32, 3).t()), ValueError,
     "kv_c must be contiguous in its last dim"),
    (concat_args(kv_c=torch.randn(3, 2, 16)), ValueError, r"kv_c must be 2-D \[tokens, width\]"),
    (concat_args(scale=torch.ones(1, dtype=torch.float16)), TypeError,
     "scale must be a float32 tensor"),
    (concat_args(scale=torch.ones(2)), ValueError, "scale must hold one value"),
    (ds_args(kv_c=torch.randn(2, 256).bfloat16(), kv_cache=torch.zeros(2, 4, 656,
                                                                      dtype=torch.uint8)),
     ValueError, "fp8_ds_mla' needs kv_lora_rank 512 and pe_dim 64, got kv_c width 256"),
    (ds_args(k_pe=torch.randn(2, 32).bfloat16()), ValueError, "needs kv_lora_rank 512"),
    (ds_args(kv_c=torch.randn(2, 512), k_pe=torch.randn(2, 64)), TypeError,
     "must be float16 or bfloat16, got torch.float32"),
    (ds_args(kv_cache=torch.zeros(2, 4, 656, dtype=torch.bfloat16)), TypeError,
     "kv_cache must be uint8 or torch.float8_e4m3fn for 'fp8_ds_mla'"),
    (ds_args(kv_cache=torch.zeros(2, 4, 576, dtype=torch.uint8)), ValueError,
     r"kv_cache must be \[num_blocks, block_size, 656\]"),
])
def test_concat_and_cache_mla_errors(args, exc, fragment):
    assert_raises_eager_and_fake(lambda: ops.concat_and_cache_mla(**args), exc, fragment)


def rope_args(**over):
    g = torch.Generator().manual_seed(3)
    positions, q_pe, k_pe, kv_c, cos_sin = rope_inputs(4, 2, 32, 16, 8, torch.float32, g,
                                                       sliced=False)
    a = dict(positions=positions, q_pe=q_pe, k_pe=k_pe, kv_c=kv_c, cos_sin_cache=cos_sin,
             is_neox=True, slot_mapping=torch.tensor([0, -1, 5, 2]),
             kv_cache=torch.zeros(2, 4, 48), kv_cache_dtype="auto", kv_cache_scale=one())
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,fragment", [
    (dict(kv_cache_dtype="fp8_ds_mla", kv_cache=torch.zeros(2, 4, 656, dtype=torch.uint8)),
     ValueError, "'fp8_ds_mla' is not supported by the fused RoPE op"),
    (dict(kv_cache_dtype="fp4"), ValueError, "unknown kv_cache_dtype 'fp4'"),
    (dict(slot_mapping=torch.tensor([0, 1, 2])), ValueError,
     r"slot_mapping must have one slot per token \(4\), got 3"),
    (dict(positions=torch.tensor([0, 1, 2])), ValueError,
     "positions must have at least 4 entries"),
    (dict(positions=torch.zeros(4, dtype=torch.int16)), TypeError, "positions must be int64"),
    (dict(cos_sin_cache=rope_cos_sin_cache(64, 16, torch.float16)), TypeError,
     "cos_sin_cache must be float32 or torch.float32"),
    (dict(cos_sin_cache=rope_cos_sin_cache(64, 32)), ValueError,
     r"cos_sin_cache must be \[max_position, 16\]"),
    (dict(q_pe=torch.randn(4, 2, 8)), ValueError, r"q_pe must be \[tokens, num_heads, 16\]"),
    (dict(q_pe=torch.randn(4, 2, 16).half()), TypeError, "q_pe must have dtype torch.float32"),
    (dict(kv_cache_scale=torch.ones(1, 1, dtype=torch.float64)), TypeError,
     "kv_cache_scale must be a float32 tensor"),
    (dict(kv_cache=torch.zeros(2, 4, 40)), ValueError,
     r"kv_cache must be \[num_blocks, block_size, 48\]"),
])
def test_rope_fused_errors(over, exc, fragment):
    a = rope_args(**over)
    assert_raises_eager_and_fake(lambda: ops.concat_and_cache_mla_rope_fused(**a), exc,
                                 fragment)


def upconvert_args(**over):
    a = dict(src_cache=torch.zeros(4, 4, 656, dtype=torch.uint8),
             dst=torch.zeros(6, 576, dtype=torch.bfloat16),
             block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
             workspace_starts=torch.tensor([0, 3], dtype=torch.int32), batch_size=2,
             seq_starts=None)
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,fragment", [
    (dict(block_table=torch.tensor([[0, 1], [2, 3]])), TypeError, "block_table must be int32"),
    (dict(workspace_starts=torch.tensor([0, 3])), TypeError, "workspace_starts must be int32"),
    (dict(seq_starts=torch.tensor([0, 3])), TypeError, "seq_starts must be int32"),
    (dict(dst=torch.zeros(6, 576, dtype=torch.float16)), TypeError,
     "dst must be bfloat16, got torch.float16"),
    (dict(dst=torch.zeros(6, 512, dtype=torch.bfloat16)), ValueError,
     r"dst must be \[tokens, 576\]"),
    (dict(src_cache=torch.zeros(4, 4, 656, dtype=torch.bfloat16)), TypeError,
     "src_cache must be uint8 or torch.float8_e4m3fn"),
    (dict(src_cache=torch.zeros(4, 4, 576, dtype=torch.uint8)), ValueError,
     r"src_cache must be \[num_blocks, block_size, 656\]"),
    (dict(batch_size=3), ValueError, r"block_table must have a row per request \(3\)"),
    (dict(workspace_starts=torch.tensor([0], dtype=torch.int32)), ValueError,
     "workspace_starts must have one entry per request"),
    (dict(batch_size=-1), ValueError, "batch_size must be an int >= 0"),
    (dict(block_table=torch.zeros(2, 4, dtype=torch.int32)[:, ::2]), ValueError,
     "block_table rows must be contiguous"),
])
def test_upconvert_errors(over, exc, fragment):
    a = upconvert_args(**over)
    assert_raises_eager_and_fake(lambda: ops.cp_gather_and_upconvert_fp8_kv_cache(**a), exc,
                                 fragment)


def indexer_args(**over):
    a = dict(k=torch.randn(3, 128), kv_cache=torch.zeros(2, 4, 132, dtype=torch.uint8),
             slot_mapping=torch.tensor([0, 5, -1]), quant_block_size=128,
             kv_cache_dtype="ue8m0")
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,fragment", [
    (dict(kv_cache_dtype="e8m0"), ValueError,
     re.escape("unknown kv_cache_dtype (scale format) 'e8m0'")),
    (dict(kv_cache_dtype="auto"), ValueError, "unknown kv_cache_dtype"),
    (dict(quant_block_size=100), ValueError, "quant_block_size must be one of"),
    (dict(k=torch.randn(3, 96), quant_block_size=64), ValueError,
     "head_dim 96 .* must be a multiple of quant_block_size 64"),
    (dict(kv_cache=torch.zeros(2, 4, 136, dtype=torch.uint8)), ValueError,
     r"kv_cache must be \[num_blocks, block_size, 132\]"),
    (dict(kv_cache=torch.zeros(2, 4, 132)), TypeError,
     "kv_cache must be uint8 or torch.float8_e4m3fn"),
    (dict(kv_cache=torch.zeros(2, 4, 140, dtype=torch.uint8)[:, :, :132]), ValueError,
     "kv_cache blocks must be contiguous"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError,
     "slot_mapping must be int64"),
    (dict(slot_mapping=torch.tensor([0, 1, 2, 3])), ValueError, "4 slots but k has only 3"),
    (dict(k=torch.randn(3, 128).to(torch.float64)), TypeError, "k must be"),
])
def test_indexer_write_errors(over, exc, fragment):
    a = indexer_args(**over)
    assert_raises_eager_and_fake(lambda: ops.indexer_k_quant_and_cache(**a), exc, fragment)


def indexer_gather_args(**over):
    a = dict(kv_cache=torch.zeros(4, 4, 132, dtype=torch.uint8),
             dst_k=torch.zeros(6, 128, dtype=torch.uint8),
             dst_scale=torch.zeros(6, 4, dtype=torch.uint8),
             block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
             cu_seq_lens=torch.tensor([0, 3, 6], dtype=torch.int32))
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,fragment", [
    (dict(dst_scale=torch.zeros(6, 3, dtype=torch.uint8)), ValueError,
     "dst_scale must hold one float32 per quant group"),
    (dict(dst_scale=torch.zeros(6, 3)), ValueError,
     "dst_scale must hold one float32 per quant group"),
    (dict(dst_scale=torch.zeros(6, 8, dtype=torch.uint8)), ValueError,  # Q 64: cache says 128
     r"kv_cache must be \[num_blocks, block_size, 136\]"),
    (dict(dst_scale=torch.zeros(5, 4, dtype=torch.uint8)), ValueError,
     "dst_scale must have dst_k's 6 rows"),
    (dict(dst_scale=torch.zeros(6, 4, dtype=torch.float16)), TypeError,
     "dst_scale must be uint8, float32"),
    (dict(dst_k=torch.zeros(6, 128, dtype=torch.bfloat16)), TypeError, "dst_k must be uint8"),
    (dict(cu_seq_lens=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     r"cu_seq_lens must hold batch \+ 1 = 3 offsets"),
    (dict(cu_seq_lens=torch.tensor([0, 3, 6])), TypeError, "cu_seq_lens must be int32"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3]])), TypeError, "block_table must be int32"),
    (dict(kv_cache=torch.zeros(4, 4, 132)), TypeError, "kv_cache must be uint8"),
])
def test_indexer_gather_errors(over, exc, fragment):
    a = indexer_gather_args(**over)
    assert_raises_eager_and_fake(lambda: ops.cp_gather_indexer_k_quant_cache(**a), exc,
                                 fragment)


def test_out_of_range_indices_raise_and_write_nothing(gen):
    """The CPU ops raise IndexError on a slot / block id / block-table column outside the cache
    or table, before writing anything."""
    a = concat_args(slot_mapping=torch.tensor([0, 8, 1]))
    with pytest.raises(IndexError, match="slot_mapping holds slot 8, outside the cache's 8"):
        ops.concat_and_cache_mla(**a)
    assert a["kv_cache"].abs().sum() == 0
    a = ds_args(slot_mapping=torch.tensor([1, 10 ** 9]))
    with pytest.raises(IndexError, match="slot 1000000000"):
        ops.concat_and_cache_mla(**a)
    assert (a["kv_cache"] == 0).all()

    for over, fragment in ((dict(slot_mapping=torch.tensor([0, -1, 8, 2])), "slot 8"),
                           (dict(positions=torch.tensor([0, 64, 1, 2])),
                            r"positions must be in \[0, 64\)")):
        a = rope_args(**over)
        before = {n: a[n].clone() for n in ("q_pe", "k_pe", "kv_cache")}
        with pytest.raises(IndexError, match=fragment):
            ops.concat_and_cache_mla_rope_fused(**a)
        for n, t in before.items():
            assert torch.equal(a[n], t), n

    src = torch.zeros(4, 4, 656, dtype=torch.uint8)
    for over, fragment in (
            (dict(block_table=torch.tensor([[0, 1], [4, 3]], dtype=torch.int32)),
             "block_table holds block 4, outside the cache's 4 blocks"),
            (dict(block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32)),
             "block_table holds block -1"),
            (dict(seq_starts=torch.tensor([0, 6], dtype=torch.int32)), "block-table column 2"),
            (dict(dst=torch.zeros(12, 576, dtype=torch.bfloat16)), "block-table column 2")):
        a = upconvert_args(src_cache=src, **over)
        a["dst"].fill_(5)
        with pytest.raises(IndexError, match=fragment):
            ops.cp_gather_and_upconvert_fp8_kv_cache(**a)
        assert (a["dst"] == 5).all()

    a = indexer_args(slot_mapping=torch.tensor([0, 3, 8]))
    with pytest.raises(IndexError, match="slot 8"):
        ops.indexer_k_quant_and_cache(**a)
    assert (a["kv_cache"] == 0).all()

    for over, fragment in (
            (dict(block_table=torch.tensor([[0, 1], [9, 3]], dtype=torch.int32)),
             "block_table holds block 9"),
            (dict(cu_seq_lens=torch.tensor([0, 3, 12], dtype=torch.int32),
                  dst_k=torch.zeros(12, 128, dtype=torch.uint8),
                  dst_scale=torch.zeros(12, 4, dtype=torch.uint8)), "block-table column 2")):
        a = indexer_gather_args(**over)
        a["dst_k"].fill_(9)
        with pytest.raises(IndexError, match=fragment):
            ops.cp_gather_indexer_k_quant_cache(**a)
        assert (a["dst_k"] == 9).all() and (a["dst_scale"] == 0).all()


@pytest.mark.parametrize("bad", [-1, 64, "min", "max"])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rope_fused_position_outside_the_table_raises_and_writes_nothing(pos_dtype, bad):
    """Negative positions and positions >= cos_sin_cache rows (64 here), int32 and int64: the
    reference raises IndexError before rotating or caching anything (q_pe included)."""
    info = torch.iinfo(pos_dtype)
    value = {"min": info.min, "max": info.max}.get(bad, bad)
    a = rope_args(positions=torch.tensor([3, value, 0, 5, 9], dtype=pos_dtype))
    before = {n: a[n].clone() for n in ("q_pe", "k_pe", "kv_cache")}
    with pytest.raises(IndexError, match=rf"positions must be in \[0, 64\).*got {value}"):
        ops.concat_and_cache_mla_rope_fused(**a)
    for n, t in before.items():
        assert torch.equal(a[n], t), n


def test_cuda_path_position_check():
    """The CUDA path's COMPILE_OPS_VALIDATE=1 host check of positions (CPU-testable part)."""
    from compile_ops.mla import _validate_positions

    _validate_positions("op", torch.tensor([0, 63, 7]), 64)
    _validate_positions("op", torch.zeros(0, dtype=torch.int32), 64)
    for bad, lo, hi in (([0, 64], 0, 64), ([5, -1], -1, 5), ([2 ** 40], 2 ** 40, 2 ** 40)):
        with pytest.raises(IndexError, match=rf"op: positions must be in \[0, 64\) "
                                             rf"\(cos_sin_cache rows\), got values in "
                                             rf"\[{lo}, {hi}\]"):
            _validate_positions("op", torch.tensor(bad), 64)


# ---------------------------------------------------------------------------------------------
# opcheck, compile
# ---------------------------------------------------------------------------------------------
def sample_calls(device="cpu"):
    g = torch.Generator().manual_seed(0)
    d = device
    kv_c, k_pe = (t.to(d) for t in mla_inputs(5, 32, 16, torch.bfloat16, g, pad=None))
    slots = torch.tensor([3, -1, 8, 15, 0], device=d)
    dkv, dpe = (t.to(d) for t in mla_inputs(3, DS_RANK, DS_PE, torch.bfloat16, g, pad=None))
    ds_cache = torch.zeros(4, 4, DS_ENTRY, dtype=torch.uint8, device=d)
    ops.concat_and_cache_mla(dkv, dpe, ds_cache, torch.tensor([0, 9, 14], device=d),
                             "fp8_ds_mla", one(device=d))
    positions, q_pe, rk_pe, rkv_c, cos_sin = (
        t.to(d) for t in rope_inputs(5, 2, 32, 16, 8, torch.bfloat16, g, sliced=False))
    k = torch.randn(5, 128, generator=g).to(torch.bfloat16).to(d)
    icache = torch.zeros(4, 4, 132, dtype=torch.uint8, device=d)
    ops.indexer_k_quant_and_cache(k, icache, torch.arange(5, device=d) * 3, 128, "ue8m0")
    table = torch.tensor([[2, 3], [1, 0]], dtype=torch.int32, device=d)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=d)  # noqa: E731
    return {
        "concat_and_cache_mla": (ops.concat_and_cache_mla, (
            kv_c, k_pe, torch.zeros(4, 4, 48, dtype=torch.uint8, device=d), slots, "fp8",
            one(0.5, d))),
        "concat_and_cache_mla_ds": (ops.concat_and_cache_mla, (
            dkv, dpe, torch.zeros(2, 4, DS_ENTRY, dtype=torch.uint8, device=d),
            torch.tensor([6, -1, 1], device=d), "fp8_ds_mla", one(device=d))),
        "concat_and_cache_mla_rope_fused": (ops.concat_and_cache_mla_rope_fused, (
            positions, q_pe, rk_pe, rkv_c, cos_sin, False, slots,
            torch.zeros(4, 4, 48, dtype=torch.bfloat16, device=d), "auto", one(device=d))),
        "cp_gather_and_upconvert_fp8_kv_cache": (ops.cp_gather_and_upconvert_fp8_kv_cache, (
            ds_cache, torch.zeros(7, 576, dtype=torch.bfloat16, device=d), table, i32([0, 3]),
            2, None)),
        "cp_gather_and_upconvert_fp8_kv_cache_starts": (
            ops.cp_gather_and_upconvert_fp8_kv_cache, (
                ds_cache, torch.zeros(7, 576, dtype=torch.bfloat16, device=d), table,
                i32([0, 3]), 2, i32([1, 2]))),
        "indexer_k_quant_and_cache": (ops.indexer_k_quant_and_cache, (
            k, torch.zeros(4, 4, 132, dtype=torch.uint8, device=d), slots, 128, "ue8m0")),
        "cp_gather_indexer_k_quant_cache": (ops.cp_gather_indexer_k_quant_cache, (
            icache, torch.zeros(7, 128, dtype=torch.uint8, device=d),
            torch.zeros(7, 1, device=d), table, i32([0, 3, 7]))),
    }


@pytest.mark.parametrize("name", sorted(sample_calls()))
def test_opcheck(name):
    op, args = sample_calls()[name]
    torch.library.opcheck(op, args)


def compiled_writes(kv_c, k_pe, cache, slots, k, icache, islots, scale):
    ops.concat_and_cache_mla(kv_c * 2, k_pe, cache, slots, "fp8_ds_mla", scale)
    ops.indexer_k_quant_and_cache(k + 1, icache, islots, 64, "ue8m0")
    return k_pe + 1


def compiled_case(device, gen):
    kv_c, k_pe = mla_inputs(9, DS_RANK, DS_PE, torch.bfloat16, gen)
    kv_c, k_pe = moved(kv_c, device), moved(k_pe, device)
    k = moved(torch.randn(9, 136, generator=gen)[:, :128], device)
    slots = slots_for(9, 32, gen).to(device)
    islots = slots_for(9, 24, gen).to(device)
    caches = []
    for _ in range(2):
        _, c = sentinel_cache(4, 8, DS_ENTRY, torch.uint8)
        _, ic = sentinel_cache(3, 8, 136, torch.uint8)
        caches.append((moved(c, device), moved(ic, device)))
    return (kv_c, k_pe, slots, k, islots, one(device=device)), caches


def test_compiled_graph_writes_the_callers_caches(gen):
    """torch.compile(fullgraph) of a function writing the MLA (fp8_ds_mla) and indexer caches
    (block-padded views) on graph inputs: the caller's tensors hold what eager writes."""
    from torch._inductor.utils import run_and_get_code

    (kv_c, k_pe, slots, k, islots, s), ((c1, ic1), (c2, ic2)) = compiled_case("cpu", gen)
    want = compiled_writes(kv_c, k_pe, c1, slots, k, ic1, islots, s)
    f = torch.compile(compiled_writes, fullgraph=True)
    got, codes = run_and_get_code(f, kv_c, k_pe, c2, slots, k, ic2, islots, s)
    code = "\n".join(codes)
    assert "concat_and_cache_mla" in code and "indexer_k_quant_and_cache" in code
    assert torch.equal(got, want)
    assert torch.equal(storage_bytes(c2), storage_bytes(c1))
    assert torch.equal(storage_bytes(ic2), storage_bytes(ic1))
    assert "copy_" not in code and "clone" not in code, code


# ---------------------------------------------------------------------------------------------
# CUDA (H100): the kernels against the CPU references, byte for byte
# ---------------------------------------------------------------------------------------------
CUDA_CASES = [(1, 16), (37, 64), (300, 16)]  # (tokens, block_size)


def cuda_mla_inputs(tokens, rank, pe, dtype, layout, gen):
    if layout == "contiguous":
        return mla_inputs(tokens, rank, pe, dtype, gen, pad=None)
    if layout == "slices":  # rows 16-byte aligned, stride > width, 3 extra rows
        return mla_inputs(tokens, rank, pe, dtype, gen, pad=8)
    return mla_inputs(tokens, rank, pe, dtype, gen, pad=1, offset=1)  # rows not 16-byte aligned


# fp8_ds_mla takes 16-bit inputs only (float32 is an error, tested on the CPU).
CUDA_KV_DTYPE_PAIRS = [(d, kv) for d in DTYPES for kv in KV_DTYPES + ["fp8_ds_mla"]
                       if not (kv == "fp8_ds_mla" and d == torch.float32)]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "slices", "unaligned"])
@pytest.mark.parametrize("tokens,bs", CUDA_CASES)
@pytest.mark.parametrize("dtype,kv", CUDA_KV_DTYPE_PAIRS)
def test_cuda_concat_and_cache_mla(dtype, kv, tokens, bs, layout, gen):
    rank, pe = (DS_RANK, DS_PE) if kv == "fp8_ds_mla" or tokens != 37 else (96, 32)
    kv_c, k_pe = cuda_mla_inputs(tokens, rank, pe, dtype, layout, gen)
    kv_c.mul_(2.0 ** torch.randint(-8, 8, (kv_c.shape[0], 1), generator=gen).to(dtype))
    plant_mla(kv_c, k_pe, kv)
    nb = (tokens * 3 // 2 + bs - 1) // bs + 1
    slots = slots_for(tokens, nb * bs, gen)
    width = DS_ENTRY if kv == "fp8_ds_mla" else rank + pe
    _, cache = sentinel_cache(nb, bs, width, fp8_storage(kv, dtype, bs == 64),
                              block_pad=0 if layout == "contiguous" else 3)
    scale = one(0.37)
    g_cache = moved(cache, "cuda")
    ops.concat_and_cache_mla(*moved_all((kv_c, k_pe), "cuda"), g_cache, slots.cuda(), kv,
                             scale.cuda())
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, kv, scale)
    assert torch.equal(storage_bytes(g_cache).cpu(), storage_bytes(cache))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "slices"])
@pytest.mark.parametrize("tokens,bs", CUDA_CASES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_rope_fused(dtype, kv, is_neox, tokens, bs, layout, gen):
    cs_dtype = dtype if tokens == 37 else torch.float32
    positions, q_pe, k_pe, kv_c, cos_sin = rope_inputs(
        tokens, 16, DS_RANK, DS_PE, 128, dtype, gen, cs_dtype=cs_dtype,
        sliced=layout == "slices")
    nb = (tokens * 3 // 2 + bs - 1) // bs + 1
    slots = slots_for(tokens, nb * bs, gen)
    _, cache = sentinel_cache(nb, bs, DS_RANK + DS_PE, fp8_storage(kv, dtype, bs == 64),
                              block_pad=0 if layout == "contiguous" else 3)
    scale = one(0.37)
    g = moved_all((q_pe, k_pe, kv_c, cache), "cuda")
    ops.concat_and_cache_mla_rope_fused(positions.cuda(), g[0], g[1], g[2], cos_sin.cuda(),
                                        is_neox, slots.cuda(), g[3], kv, scale.cuda())
    ops.concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots,
                                        cache, kv, scale)
    for got, want in zip(g, (q_pe, k_pe, kv_c, cache)):
        assert torch.equal(storage_bytes(got).cpu(), storage_bytes(want))


@pytest.mark.cuda
@pytest.mark.parametrize("with_starts", [False, True])
@pytest.mark.parametrize("lens", [[1], [37], [300], [5, 0, 37, 300, 16]])
@pytest.mark.parametrize("bs", [16, 64])
def test_cuda_upconvert(bs, lens, with_starts, gen):
    starts = [(7 * i + 3) % 20 for i in range(len(lens))] if with_starts else None
    table, nb, cu = batch_table(lens, bs, gen, starts=starts)
    _, src = ds_mla_random_cache(nb, bs, gen, torch.float8_e4m3fn if bs == 64 else torch.uint8)
    ws = cu[:-1].clone()
    st = torch.tensor(starts, dtype=torch.int32) if with_starts else None
    total = sum(lens)
    dst = torch.full((total, 600), 7.0, dtype=torch.bfloat16)[:, :576]
    g_dst = moved(dst, "cuda")
    ops.cp_gather_and_upconvert_fp8_kv_cache(moved(src, "cuda"), g_dst, moved(table, "cuda"),
                                             ws.cuda(), len(lens),
                                             st.cuda() if with_starts else None)
    ops.cp_gather_and_upconvert_fp8_kv_cache(src, dst, table, ws, len(lens), st)
    assert torch.equal(storage_bytes(g_dst).cpu(), storage_bytes(dst))


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,bs", CUDA_CASES)
@pytest.mark.parametrize("D,Q", [(128, 128), (256, 128), (128, 64), (512, 32), (256, 256)])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_indexer_k_quant_and_cache(dtype, fmt, D, Q, tokens, bs, gen):
    k = torch.randn(tokens + 3, D + 8, generator=gen)
    k = (k * 2.0 ** torch.randint(-12, 12, (tokens + 3, 1), generator=gen)).to(dtype)[:, :D]
    plant_indexer(k, Q)
    nb = (tokens * 3 // 2 + bs - 1) // bs + 1
    slots = slots_for(tokens, nb * bs, gen)
    _, cache = sentinel_cache(nb, bs, D + D // Q * 4,
                              torch.float8_e4m3fn if bs == 64 else torch.uint8)
    g_cache = moved(cache, "cuda")
    ops.indexer_k_quant_and_cache(moved(k, "cuda"), g_cache, slots.cuda(), Q, fmt)
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, fmt)
    assert torch.equal(storage_bytes(g_cache).cpu(), storage_bytes(cache))


def special_kv_c(kind, tokens, dtype, layout, gen):
    """kv_c / k_pe for the fp8_ds_mla twins: "nan_inf" (random rows over many binades, NaN / inf
    planted in tokens 1, 2, 4) or "ties" (every x / scale an exact e4m3 rounding tie)."""
    kv_c, k_pe = cuda_mla_inputs(tokens, DS_RANK, DS_PE, dtype, layout, gen)
    rows = kv_c.shape[0]  # the unaligned layout has 3 rows past the tokens
    if kind == "ties":
        kv_c.copy_(tie_values(rows, DS_RANK, 128, dtype, gen))
    else:
        kv_c.mul_(2.0 ** torch.randint(-8, 8, (rows, 1), generator=gen).to(dtype))
        plant_nan_inf(kv_c, 128)
    return kv_c, k_pe


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])  # 16-byte and element paths
@pytest.mark.parametrize("kind", ["nan_inf", "ties"])
@pytest.mark.parametrize("dtype", DTYPES16)
def test_cuda_ds_mla_nan_inf_and_ties(dtype, kind, layout, gen):
    """Every byte as the CPU reference: NaN skipped by the tile amax and stored 0x7F, infinite
    tile scales, other tokens untouched by them; exact ties rounded to even (a contracted,
    approximate or reciprocal division, or a scale from amax * (1 / 448), would miss some)."""
    tokens, bs = 37, 16
    kv_c, k_pe = special_kv_c(kind, tokens, dtype, layout, gen)
    nb = (tokens * 3 // 2 + bs - 1) // bs + 1
    slots = slots_for(tokens, nb * bs, gen, pad=False)
    slots[[0, 6]] = -1
    _, cache = sentinel_cache(nb, bs, DS_ENTRY, torch.uint8,
                              block_pad=0 if layout == "contiguous" else 3)
    g_cache = moved(cache, "cuda")
    ops.concat_and_cache_mla(*moved_all((kv_c, k_pe), "cuda"), g_cache, slots.cuda(),
                             "fp8_ds_mla", one(device="cuda"))
    ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", one())
    got, want = storage_bytes(g_cache).cpu(), storage_bytes(cache)
    assert torch.equal(got, want), f"{int((got != want).sum())} bytes differ"


@pytest.mark.cuda
def test_cuda_upconvert_of_nan_codes_and_infinite_scales(gen):
    """bf16 0x7FFF for NaN codes and +inf-scale tiles, every byte as the CPU reference."""
    cache, _, _, _ = nan_inf_ds_cache(gen, tokens=37, bs=16)
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    ws = torch.tensor([0], dtype=torch.int32)
    dst = torch.full((40, 600), 7.0, dtype=torch.bfloat16)[:, :576]
    g_dst = moved(dst, "cuda")
    ops.cp_gather_and_upconvert_fp8_kv_cache(moved(cache, "cuda"), g_dst, table.cuda(),
                                             ws.cuda(), 1)
    ops.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, table, ws, 1)
    assert torch.equal(storage_bytes(g_dst).cpu(), storage_bytes(dst))


# near ties need float32 keys (16-bit values are too short to lie a few ulps from a tie)
INDEXER_SPECIAL_KINDS = [(d, k) for d in DTYPES for k in ("nan_inf", "ties")] + [
    (torch.float32, "near_ties")]


@pytest.mark.cuda
@pytest.mark.parametrize("D,Q", [(128, 128), (384, 128), (256, 64), (128, 32), (256, 256)])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("dtype,kind", INDEXER_SPECIAL_KINDS)
def test_cuda_indexer_nan_inf_and_ties(dtype, kind, fmt, D, Q, gen):
    """indexer_k_quant_and_cache against the CPU reference, every byte: NaN / inf keys next to
    finite ones (several tokens' groups share a warp), exact ties, and float32 keys a few ulps
    from ties (where only a true division gives the reference's codes)."""
    tokens, bs = 37, 16
    if kind == "nan_inf":
        k = torch.randn(tokens, D, generator=gen)
        k = (k * 2.0 ** torch.randint(-12, 12, (tokens, 1), generator=gen)).to(dtype)
        plant_nan_inf(k, Q)
    elif kind == "ties":
        k = tie_values(tokens, D, Q, dtype, gen)
    else:
        k = near_tie_values(tokens, D, Q, gen)
    k = torch.cat((k, torch.zeros(tokens, 8, dtype=dtype)), 1)[:, :D]  # row-strided
    nb = (tokens * 3 // 2 + bs - 1) // bs + 1
    slots = slots_for(tokens, nb * bs, gen, pad=False)
    slots[[0, 6]] = -1
    _, cache = sentinel_cache(nb, bs, D + D // Q * 4, torch.uint8)
    g_cache = moved(cache, "cuda")
    ops.indexer_k_quant_and_cache(moved(k, "cuda"), g_cache, slots.cuda(), Q, fmt)
    ops.indexer_k_quant_and_cache(k, cache, slots, Q, fmt)
    got, want = storage_bytes(g_cache).cpu(), storage_bytes(cache)
    assert torch.equal(got, want), f"{int((got != want).sum())} bytes differ"


def poisoned_cos_sin(max_pos, rot, dtype, poison, rows=4):
    """A [max_pos, rot] RoPE table that is a row slice of a larger tensor whose `rows` rows
    before and after hold `poison`: a read outside the table picks it up."""
    big = torch.full((max_pos + 2 * rows, rot), poison, dtype=dtype)
    big[rows:rows + max_pos] = rope_cos_sin_cache(max_pos, rot, dtype)
    return big[rows:rows + max_pos]


BAD_POSITIONS = [3, -1, 64, 10, "min", 63, 0, "max", -64, 7]  # max_pos 64


def bad_positions(pos_dtype):
    info = torch.iinfo(pos_dtype)
    return torch.tensor([{"min": info.min, "max": info.max}.get(p, p) for p in BAD_POSITIONS],
                        dtype=pos_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("kv,dtype,cs_model_dtype", [
    ("auto", torch.bfloat16, False), ("fp8", torch.float16, True), ("auto", torch.float32, False)])
def test_cuda_rope_fused_skips_positions_outside_the_table(kv, dtype, cs_model_dtype, is_neox,
                                                           pos_dtype, gen, monkeypatch):
    """Negative positions and positions >= max_pos: the kernel skips the token (its q_pe, k_pe
    and cache entry keep their bytes) and reads nothing outside cos_sin_cache (two poisons
    around the table, NaN and 1e4, give the same bytes); the other tokens are the CPU
    reference's. COMPILE_OPS_VALIDATE=1 raises IndexError and writes nothing."""
    monkeypatch.delenv("COMPILE_OPS_VALIDATE", raising=False)
    positions = bad_positions(pos_dtype)
    tokens, heads, nb, bs = positions.shape[0], 4, 2, 16
    _, q_pe, k_pe, kv_c, _ = rope_inputs(tokens, heads, DS_RANK, DS_PE, 32, dtype, gen)
    cs_dtype = dtype if cs_model_dtype else torch.float32
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]  # every token has a slot
    _, cache = sentinel_cache(nb, bs, DS_RANK + DS_PE, fp8_storage(kv, dtype, False))
    results = []
    for poison in (float("nan"), 1e4):
        g = moved_all((q_pe, k_pe, kv_c, cache), "cuda")
        table = moved(poisoned_cos_sin(64, DS_PE, cs_dtype, poison), "cuda")  # poison moves too
        ops.concat_and_cache_mla_rope_fused(positions.cuda(), g[0], g[1], g[2], table, is_neox,
                                            slots.cuda(), g[3], kv, one(0.37, "cuda"))
        results.append([storage_bytes(t).cpu() for t in g])
    for a, b in zip(*results):
        assert torch.equal(a, b)  # nothing read from outside the table
    got_q, got_k = (r.view(dtype) for r in results[0][:2])
    good = ((positions >= 0) & (positions < 64)).nonzero().squeeze(1)
    bad = ((positions < 0) | (positions >= 64)).nonzero().squeeze(1)
    q_all = got_q.as_strided(q_pe.shape, q_pe.stride(), q_pe.storage_offset())
    k_all = got_k.as_strided(k_pe.shape, k_pe.stride(), k_pe.storage_offset())
    assert torch.equal(q_all[bad], q_pe[bad]) and torch.equal(k_all[bad], k_pe[bad])
    wq, wk, wkv = q_pe[good].clone(), k_pe[good].clone(), kv_c[good].clone()
    want = moved(cache, "cpu")  # a copy of the whole block-padded storage
    ops.concat_and_cache_mla_rope_fused(positions[good], wq, wk, wkv,
                                        rope_cos_sin_cache(64, DS_PE, cs_dtype), is_neox,
                                        slots[good], want, kv, one(0.37))
    assert torch.equal(q_all[good], wq) and torch.equal(k_all[good], wk)
    # the cache: the reference's entries for the good tokens, the sentinel bytes elsewhere
    assert torch.equal(results[0][3], storage_bytes(want))

    monkeypatch.setenv("COMPILE_OPS_VALIDATE", "1")
    g = moved_all((q_pe, k_pe, kv_c, cache), "cuda")
    before = [storage_bytes(t).cpu() for t in g]
    with pytest.raises(IndexError, match=r"positions must be in \[0, 64\)"):
        ops.concat_and_cache_mla_rope_fused(
            positions.cuda(), g[0], g[1], g[2], rope_cos_sin_cache(64, DS_PE, cs_dtype).cuda(),
            is_neox, slots.cuda(), g[3], kv, one(0.37, "cuda"))
    for t, b in zip(g, before):
        assert torch.equal(storage_bytes(t).cpu(), b)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", ["more", "fewer"])
@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("D,Q", [(128, 128), (256, 64), (512, 128)])
def test_cuda_indexer_gather(D, Q, bs, scale_dtype, rows, gen):
    lens = [5, 0, 37, 300, 16]
    table, nb, cu = batch_table(lens, bs, gen, extra_rows=0)
    _, cache = indexer_random_cache(nb, bs, D, Q, gen)
    n = sum(lens) + 5 if rows == "more" else sum(lens) - 3
    groups = D // Q
    sw = groups * 4 if scale_dtype == torch.uint8 else groups
    dst_k = torch.full((n, D + 16), 0x5A, dtype=torch.uint8)[:, :D]
    if bs == 64:
        dst_k = dst_k.view(torch.float8_e4m3fn)
    dst_scale = torch.full((n, sw + 3), 3, dtype=scale_dtype)[:, :sw]
    g = moved_all((cache, dst_k, dst_scale, table), "cuda")
    ops.cp_gather_indexer_k_quant_cache(g[0], g[1], g[2], g[3], cu.cuda())
    ops.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_scale, table, cu)
    assert torch.equal(storage_bytes(g[1]).cpu(), storage_bytes(dst_k))
    assert torch.equal(storage_bytes(g[2]).cpu(), storage_bytes(dst_scale))


@pytest.mark.cuda
def test_cuda_out_of_range_indices_are_skipped(gen, monkeypatch):
    """The kernels skip a token / row whose slot, block id or block-table column is outside the
    cache or table (its destination stays as it was); COMPILE_OPS_VALIDATE=1 raises instead."""
    monkeypatch.delenv("COMPILE_OPS_VALIDATE", raising=False)
    nb, bs = 4, 16
    bad_slots = torch.tensor([0, nb * bs, 5, 10 ** 12, -1, 7])
    good_slots = torch.tensor([0, -1, 5, -1, -1, 7])

    # concat_and_cache_mla, every format
    for kv, dtype in (("auto", torch.bfloat16), ("fp8", torch.float16),
                      ("fp8_ds_mla", torch.bfloat16)):
        kv_c, k_pe = mla_inputs(6, DS_RANK, DS_PE, dtype, gen)
        width = DS_ENTRY if kv == "fp8_ds_mla" else DS_RANK + DS_PE
        _, cache = sentinel_cache(nb, bs, width, fp8_storage(kv, dtype, False))
        g_cache = moved(cache, "cuda")
        ops.concat_and_cache_mla(moved(kv_c, "cuda"), moved(k_pe, "cuda"), g_cache,
                                 bad_slots.cuda(), kv, one(device="cuda"))
        ops.concat_and_cache_mla(kv_c, k_pe, cache, good_slots, kv, one())
        assert torch.equal(storage_bytes(g_cache).cpu(), storage_bytes(cache)), kv

    # rope fused: the cache and the k_pe of tokens with a good slot
    positions, q_pe, k_pe, kv_c, cos_sin = rope_inputs(6, 2, DS_RANK, DS_PE, 32,
                                                       torch.bfloat16, gen)
    _, cache = sentinel_cache(nb, bs, DS_RANK + DS_PE, torch.bfloat16)
    g = moved_all((q_pe, k_pe, kv_c, cache), "cuda")
    ops.concat_and_cache_mla_rope_fused(positions.cuda(), g[0], g[1], g[2], cos_sin.cuda(), True,
                                        bad_slots.cuda(), g[3], "auto", one(device="cuda"))
    ops.concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin, True, good_slots,
                                        cache, "auto", one())
    assert torch.equal(storage_bytes(g[3]).cpu(), storage_bytes(cache))
    good = good_slots >= 0
    assert torch.equal(g[1].cpu()[good], k_pe[good])

    # upconvert: request 0 reads column 1 -> block 99 (rows 16..19); request 1 a block -5
    _, src = ds_mla_random_cache(nb, bs, gen)
    table = torch.tensor([[2, 99], [-5, 1]], dtype=torch.int32)
    ws = torch.tensor([0, 20], dtype=torch.int32)
    dst = torch.full((24, 576), 7.0, dtype=torch.bfloat16)
    g_dst = dst.cuda()
    ops.cp_gather_and_upconvert_fp8_kv_cache(src.cuda(), g_dst, table.cuda(), ws.cuda(), 2)
    ops.cp_gather_and_upconvert_fp8_kv_cache(src, dst[:16], table, ws, 1)
    got = g_dst.cpu()
    assert torch.equal(raw(got[:16]), raw(dst[:16])) and (got[16:] == 7).all()
    # a seq_starts past the table's columns: every row of that request skipped
    g_dst = torch.full((24, 576), 7.0, dtype=torch.bfloat16, device="cuda")
    ops.cp_gather_and_upconvert_fp8_kv_cache(src.cuda(), g_dst, table.cuda(), ws.cuda(), 1,
                                             torch.tensor([40], dtype=torch.int32,
                                                          device="cuda"))
    assert (g_dst == 7).all()

    # indexer write and gather
    k = torch.randn(6, 128, generator=gen).to(torch.bfloat16)
    _, icache = sentinel_cache(nb, bs, 132, torch.uint8)
    g_icache = moved(icache, "cuda")
    ops.indexer_k_quant_and_cache(k.cuda(), g_icache, bad_slots.cuda(), 128, "ue8m0")
    ops.indexer_k_quant_and_cache(k, icache, good_slots, 128, "ue8m0")
    assert torch.equal(storage_bytes(g_icache).cpu(), storage_bytes(icache))
    cu = torch.tensor([0, 20, 24], dtype=torch.int32)
    dk = torch.full((24, 128), 0x5A, dtype=torch.uint8, device="cuda")
    dsc = torch.full((24, 4), 3, dtype=torch.uint8, device="cuda")
    ops.cp_gather_indexer_k_quant_cache(g_icache, dk, dsc, table.cuda(), cu.cuda())
    wk, wsc = torch.full((16, 128), 0x5A, dtype=torch.uint8), torch.zeros(16, 4, dtype=torch.uint8)
    ops.cp_gather_indexer_k_quant_cache(icache, wk, wsc, table[:1], cu[:2].clone())
    assert torch.equal(dk[:16].cpu(), wk) and torch.equal(dsc[:16].cpu(), wsc)
    assert (dk[16:] == 0x5A).all() and (dsc[16:] == 3).all()

    monkeypatch.setenv("COMPILE_OPS_VALIDATE", "1")
    kv_c, k_pe = mla_inputs(6, DS_RANK, DS_PE, torch.bfloat16, gen)
    with pytest.raises(IndexError, match="slot"):
        ops.concat_and_cache_mla(kv_c.cuda(), k_pe.cuda(), g_cache, bad_slots.cuda(),
                                 "fp8_ds_mla", one(device="cuda"))
    with pytest.raises(IndexError, match="slot"):
        ops.concat_and_cache_mla_rope_fused(positions.cuda(), g[0], g[1], g[2], cos_sin.cuda(),
                                            True, bad_slots.cuda(), g[3], "auto",
                                            one(device="cuda"))
    with pytest.raises(IndexError, match="block"):
        ops.cp_gather_and_upconvert_fp8_kv_cache(src.cuda(), g_dst, table.cuda(), ws.cuda(), 2)
    with pytest.raises(IndexError, match="slot"):
        ops.indexer_k_quant_and_cache(k.cuda(), g_icache, bad_slots.cuda(), 128, "ue8m0")
    with pytest.raises(IndexError, match="block"):
        ops.cp_gather_indexer_k_quant_cache(g_icache, dk, dsc, table.cuda(), cu.cuda())


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(sample_calls("cpu")))
def test_cuda_opcheck(name):
    op, args = sample_calls("cuda")[name]
    torch.library.opcheck(op, args)


@pytest.mark.cuda
def test_cuda_compiled_graph(gen):
    (kv_c, k_pe, slots, k, islots, s), ((c1, ic1), (c2, ic2)) = compiled_case("cuda", gen)
    want = compiled_writes(kv_c, k_pe, c1, slots, k, ic1, islots, s)
    got = torch.compile(compiled_writes, fullgraph=True)(kv_c, k_pe, c2, slots, k, ic2, islots, s)
    assert torch.equal(got, want)
    assert torch.equal(storage_bytes(c2), storage_bytes(c1))
    assert torch.equal(storage_bytes(ic2), storage_bytes(ic1))


# vLLM's argument names and order (csrc/libtorch_stable/torch_bindings.cpp, _custom_ops.py), so
# vLLM-style callers port by changing the namespace.
VLLM_ARGS = {
    "concat_and_cache_mla": ["kv_c", "k_pe", "kv_cache", "slot_mapping", "kv_cache_dtype",
                             "scale"],
    "concat_and_cache_mla_rope_fused": ["positions", "q_pe", "k_pe", "kv_c", "cos_sin_cache",
                                        "is_neox", "slot_mapping", "kv_cache", "kv_cache_dtype",
                                        "kv_cache_scale"],
    "cp_gather_and_upconvert_fp8_kv_cache": ["src_cache", "dst", "block_table",
                                             "workspace_starts", "batch_size", "seq_starts"],
    "indexer_k_quant_and_cache": ["k", "kv_cache", "slot_mapping", "quant_block_size",
                                  "kv_cache_dtype"],
    "cp_gather_indexer_k_quant_cache": ["kv_cache", "dst_k", "dst_scale", "block_table",
                                        "cu_seq_lens"],
}
MUTATED = {"concat_and_cache_mla": {"kv_cache"},
           "concat_and_cache_mla_rope_fused": {"q_pe", "k_pe", "kv_cache"},
           "cp_gather_and_upconvert_fp8_kv_cache": {"dst"},
           "indexer_k_quant_and_cache": {"kv_cache"},
           "cp_gather_indexer_k_quant_cache": {"dst_k", "dst_scale"}}


@pytest.mark.parametrize("name", sorted(VLLM_ARGS))
def test_schema_follows_vllm(name):
    schema = getattr(torch.ops.compile_ops, name).default._schema
    assert [a.name for a in schema.arguments] == VLLM_ARGS[name]
    written = {a.name for a in schema.arguments if a.alias_info is not None
               and a.alias_info.is_write}
    assert written == MUTATED[name]
    assert len(schema.returns) == 0
