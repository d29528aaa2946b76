"""csrc/mla_kernels.cu, host-compiled and emulated thread by thread (conftest.py), against the
CPU ops (compile_ops/mla.py's references). Bytes must match exactly: the kernels and the
references do the same float32 math and the same fp8 conversion (saturate, round to nearest
even). Warp-reduction kernels (fp8_ds_mla, the indexer quantization) run in the cooperative
schedule. Every layout runs twice: 16-byte aligned (vector accesses) and with an odd row padding
(element accesses). NaN / inf keys (vLLM's semantics, compile_ops/mla.py), exact rounding ties
and positions outside the RoPE table (poison rows around it) have tests of their own; their
CUDA twins are in tests/ops/test_mla.py.
"""

import pytest
import torch

from compile_ops.mla import _MLA_KIND
from compile_ops.testing import rope_cos_sin_cache
from tests.ops.test_mla import (bad_positions, moved_all, nan_inf_ds_cache, near_tie_values,
                                plant_nan_inf, poisoned_cos_sin, storage_bytes, tie_values)

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rows(tokens, widths, dtype, gen, pad):
    """Column slices of one [tokens, sum(widths) + pad] tensor (pad 0 keeps 16-byte alignment
    for 16-bit types when the widths are multiples of 8; an odd pad breaks it)."""
    base = torch.randn(tokens, sum(widths) + pad, generator=gen).to(dtype)
    out, c = [], 0
    for w in widths:
        out.append(base[:, c:c + w])
        c += w
    return out


def slots_for(tokens, num_slots, gen, pad_every=3):
    s = torch.randperm(num_slots, generator=gen)[:tokens].long()
    s[::pad_every] = -1
    return s


def u8(t):
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


# ---------------------------------------------------------------------------------------------
# concat_and_cache_mla
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_and_cache_mla(emu, dtype, kv, pad, gen):
    kv_c, k_pe = rows(9, [64, 16], dtype, gen, pad)
    nb, bs = 4, 5
    cdt = dtype if kv == "auto" else torch.uint8
    cache = torch.full((nb + 1, bs, 80), 7, dtype=torch.float32).to(cdt)[1:]  # block stride
    slots = slots_for(9, nb * bs, gen)
    want = cache.clone()
    scale = torch.tensor([0.3])
    ops.concat_and_cache_mla(kv_c, k_pe, want, slots, kv, scale)
    emu.concat_and_cache_mla(kv_c, k_pe, cache, slots, _MLA_KIND[kv], scale)
    assert torch.equal(u8(cache), u8(want))


@pytest.mark.parametrize("storage", [torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concat_and_cache_ds_mla(coop, dtype, pad, storage, gen):
    kv_c, k_pe = rows(5, [512, 64], dtype, gen, pad)
    kv_c[1, 200] = 300.0  # one tile with a large amax
    kv_c[2, :128] = 0.0   # an all-zero tile: scale FLT_MIN
    cache = torch.zeros(3, 4, 656, dtype=storage)
    slots = torch.tensor([5, -1, 0, 11, 3])
    want = cache.clone()
    ops.concat_and_cache_mla(kv_c, k_pe, want, slots, "fp8_ds_mla", torch.ones(1))
    coop.concat_and_cache_mla(kv_c, k_pe, cache, slots, _MLA_KIND["fp8_ds_mla"], torch.ones(1))
    assert torch.equal(u8(cache), u8(want))


@pytest.mark.parametrize("kind", ["nan_inf", "ties"])
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concat_and_cache_ds_mla_nan_inf_and_ties(coop, dtype, pad, kind, gen):
    """NaN / inf in tokens 1, 2, 4 (NaN skipped by the tile amax and stored 0x7F, an infinite
    tile scale) or exact rounding ties: the kernel's bytes are the reference's, and the finite
    tokens' entries are those of a run without the NaN / inf tokens."""
    tokens = 6
    kv_c, k_pe = rows(tokens, [512, 64], dtype, gen, pad)
    if kind == "ties":
        kv_c.copy_(tie_values(tokens, 512, 128, dtype, gen))
    else:
        special = plant_nan_inf(kv_c, 128)
    cache = torch.full((3, 4, 656), 0x5A, dtype=torch.uint8)
    slots = torch.tensor([5, 0, 9, 2, 11, -1])
    want = cache.clone()
    ops.concat_and_cache_mla(kv_c, k_pe, want, slots, "fp8_ds_mla", torch.ones(1))
    coop.concat_and_cache_mla(kv_c, k_pe, cache, slots, _MLA_KIND["fp8_ds_mla"], torch.ones(1))
    assert torch.equal(cache, want)
    if kind == "nan_inf":
        alone = torch.full_like(cache, 0x5A)
        finite_only = slots.clone()
        finite_only[special] = -1
        coop.concat_and_cache_mla(kv_c, k_pe, alone, finite_only, _MLA_KIND["fp8_ds_mla"],
                                  torch.ones(1))
        for t in (0, 3):
            s = int(slots[t])
            assert torch.equal(cache[s // 4, s % 4], alone[s // 4, s % 4])


def test_concat_and_cache_mla_skips_bad_slots(emu, gen):
    kv_c, k_pe = rows(3, [16, 8], torch.bfloat16, gen, 0)
    cache = torch.zeros(2, 2, 24, dtype=torch.bfloat16)
    emu.concat_and_cache_mla(kv_c, k_pe, cache, torch.tensor([4, 100, 1]), 0, torch.ones(1))
    assert torch.equal(cache[0, 1], torch.cat((kv_c[2], k_pe[2])))
    assert int((cache != 0).any(-1).sum()) == 1  # slot 4 and 100 are outside 2 x 2 slots


# ---------------------------------------------------------------------------------------------
# concat_and_cache_mla_rope_fused
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_fused(emu, dtype, kv, is_neox, pad, gen):
    T, H, R, L = 7, 3, 32, 64
    kv_c, k_pe, q_flat = rows(T, [L, R, H * R], dtype, gen, pad)
    q_pe = q_flat.view(T, H, R) if pad == 0 else q_flat.unflatten(1, (H, R))
    positions = torch.randint(0, 50, (T,), generator=gen)
    cs = rope_cos_sin_cache(50, R, torch.float32 if dtype == torch.float32 else dtype)
    cdt = dtype if kv == "auto" else torch.uint8
    cache = torch.zeros(3, 4, L + R, dtype=cdt)
    slots = slots_for(T, 12, gen)
    scale = torch.tensor([0.2])
    q2, k2, c2 = q_pe.clone(), k_pe.clone(), cache.clone()
    ops.concat_and_cache_mla_rope_fused(positions, q2, k2, kv_c, cs, is_neox, slots, c2, kv,
                                        scale)
    emu.concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cs, is_neox, slots, cache,
                                        _MLA_KIND[kv], scale)
    assert torch.equal(q_pe, q2)
    assert torch.equal(k_pe, k2)
    assert torch.equal(u8(cache), u8(c2))


def test_rope_fused_int32_positions_and_bad_position(emu, gen):
    T, H, R, L = 3, 2, 16, 16
    kv_c, k_pe, q_flat = rows(T, [L, R, H * R], torch.bfloat16, gen, 0)
    q_pe = q_flat.view(T, H, R)
    cs = rope_cos_sin_cache(10, R, torch.float32)
    cache = torch.zeros(2, 2, L + R, dtype=torch.bfloat16)
    q0, k0 = q_pe.clone(), k_pe.clone()
    pos = torch.tensor([1, 99, 2], dtype=torch.int32)  # 99: outside the table
    emu.concat_and_cache_mla_rope_fused(pos, q_pe, k_pe, kv_c, cs, True,
                                        torch.tensor([0, 1, 2]), cache, 0, torch.ones(1))
    assert torch.equal(q_pe[1], q0[1]) and torch.equal(k_pe[1], k0[1])  # token 1 untouched
    assert not cache[0, 1].any()                                        # and not cached
    good = torch.tensor([1, 2])
    q2, k2, c2 = q0[[0, 2]].clone(), k0[[0, 2]].clone(), torch.zeros_like(cache)
    ops.concat_and_cache_mla_rope_fused(good, q2, k2, kv_c[[0, 2]], cs, True,
                                        torch.tensor([0, 2]), c2, "auto", torch.ones(1))
    assert torch.equal(q_pe[[0, 2]], q2) and torch.equal(cache, c2)


@pytest.mark.parametrize("cs_model_dtype", [False, True])
@pytest.mark.parametrize("pad,kv", [(0, "auto"), (1, "fp8")])  # 16-byte / element paths
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rope_fused_positions_outside_the_table_read_and_write_nothing(emu, pos_dtype, is_neox,
                                                                        pad, kv, cs_model_dtype,
                                                                        gen):
    """Negative positions, positions >= max_pos and the int32 / int64 extremes: the token is
    skipped (q_pe, k_pe and its cache entry keep their bytes although it has a slot) and nothing
    is read outside cos_sin_cache (a row slice with poison rows around it: NaN and 1e4 poison
    give the same bytes); the other tokens are the reference's."""
    positions = bad_positions(pos_dtype)  # max_pos 64
    T, H, R, L, dtype = positions.shape[0], 2, 32, 64, torch.bfloat16
    kv_c, k_pe, q_flat = rows(T, [L, R, H * R], dtype, gen, pad)
    q_pe = q_flat.view(T, H, R) if pad == 0 else q_flat.unflatten(1, (H, R))
    cs_dtype = dtype if cs_model_dtype else torch.float32
    slots = torch.randperm(20, generator=gen)[:T]  # every token has a slot
    cache = torch.full((5, 4, L + R), 7, dtype=dtype if kv == "auto" else torch.uint8)
    runs = []
    for poison in (float("nan"), 1e4):
        q, k, kc, c = moved_all((q_pe, k_pe, kv_c, cache), "cpu")
        emu.concat_and_cache_mla_rope_fused(positions, q, k, kc,
                                            poisoned_cos_sin(64, R, cs_dtype, poison), is_neox,
                                            slots, c, _MLA_KIND[kv], torch.tensor([0.3]))
        runs.append((q, k, c))
    for a, b in zip(*runs):
        assert torch.equal(storage_bytes(a), storage_bytes(b))
    q, k, c = runs[0]
    good = ((positions >= 0) & (positions < 64)).nonzero().squeeze(1)
    bad = ((positions < 0) | (positions >= 64)).nonzero().squeeze(1)
    assert torch.equal(q[bad], q_pe[bad]) and torch.equal(k[bad], k_pe[bad])
    for s in slots[bad].tolist():
        assert torch.equal(u8(c[s // 4, s % 4]), u8(cache[s // 4, s % 4]))
    wq, wk, wc = q_pe[good].clone(), k_pe[good].clone(), cache.clone()
    ops.concat_and_cache_mla_rope_fused(positions[good], wq, wk, kv_c[good],
                                        rope_cos_sin_cache(64, R, cs_dtype), is_neox,
                                        slots[good], wc, kv, torch.tensor([0.3]))
    assert torch.equal(q[good], wq) and torch.equal(k[good], wk)
    assert torch.equal(u8(c), u8(wc))


# ---------------------------------------------------------------------------------------------
# cp_gather_and_upconvert_fp8_kv_cache
# ---------------------------------------------------------------------------------------------
def ds_cache(nb, bs, gen):
    cache = torch.zeros(nb, bs, 656, dtype=torch.uint8)
    n = nb * bs
    kv_c = torch.randn(n, 512, generator=gen).bfloat16()
    k_pe = torch.randn(n, 64, generator=gen).bfloat16()
    ops.concat_and_cache_mla(kv_c, k_pe, cache, torch.arange(n), "fp8_ds_mla", torch.ones(1))
    return cache


@pytest.mark.parametrize("dst_pad", [0, 3])
@pytest.mark.parametrize("with_starts", [False, True])
def test_upconvert(emu, with_starts, dst_pad, gen):
    nb, bs = 9, 4
    cache = ds_cache(nb, bs, gen)
    lens = [5, 0, 7]
    ws = torch.tensor([0, 5, 5], dtype=torch.int32)
    bt = torch.randperm(nb, generator=gen).view(3, 3).to(torch.int32)
    starts = torch.tensor([1, 0, 0], dtype=torch.int32) if with_starts else None
    rows_ = sum(lens) + 2  # two rows past the last request: read from it (as vLLM), in range
    if with_starts:
        rows_ = sum(lens)
    dst = torch.full((rows_, 576 + dst_pad), 5.0).bfloat16()[:, :576]
    want = dst.clone()
    ops.cp_gather_and_upconvert_fp8_kv_cache(cache, want, bt, ws, 3, starts)
    emu.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, bt, ws, 3, starts)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("dst_pad", [0, 3])
def test_upconvert_of_nan_codes_and_infinite_scales(emu, dst_pad, gen):
    """Entries holding 0x7F codes and +inf tile scales (written from NaN / inf keys): the
    kernel's bf16 NaN (0x7FFF) and every other byte as the reference's."""
    cache, _, _, _ = nan_inf_ds_cache(gen)
    bt = torch.tensor([[1, 0]], dtype=torch.int32)
    ws = torch.tensor([0], dtype=torch.int32)
    dst = torch.full((8, 576 + dst_pad), 5.0).bfloat16()[:, :576]
    want = dst.clone()
    ops.cp_gather_and_upconvert_fp8_kv_cache(cache, want, bt, ws, 1, None)
    emu.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, bt, ws, 1, None)
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))
    assert torch.isnan(dst).any()


def test_upconvert_skips_rows_it_cannot_place(emu, gen):
    cache = ds_cache(2, 4, gen)
    bt = torch.tensor([[1, 7]], dtype=torch.int32)  # block 7 is outside the cache
    ws = torch.tensor([2], dtype=torch.int32)       # rows 0, 1: before the first request
    dst = torch.zeros(9, 576).bfloat16()
    emu.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, bt, ws, 1, None)
    assert not dst[:2].any() and not dst[6:].any()  # rows 6-8 need block 7 (or column 2)
    assert dst[2:6].any(-1).all()


# ---------------------------------------------------------------------------------------------
# indexer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("Q", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_indexer_write(coop, dtype, Q, fmt, pad, gen):
    D = 256
    (k,) = rows(5, [D], dtype, gen, pad)
    k[0] *= 1e-6  # amax below the 1e-4 floor
    nb, bs = 3, 4
    cache = torch.full((nb, bs, D + D // Q * 4), 9, dtype=torch.uint8)
    slots = torch.tensor([3, -1, 8, 0, 11])
    want = cache.clone()
    ops.indexer_k_quant_and_cache(k, want, slots, Q, fmt)
    coop.indexer_k_quant_and_cache(k, cache, slots, Q, fmt == "ue8m0")
    assert torch.equal(cache, want)


@pytest.mark.parametrize("fmt", ["ue8m0", "fp8"])
@pytest.mark.parametrize("Q", [32, 128, 256])
@pytest.mark.parametrize("dtype,kind,pad", [(torch.float16, "nan_inf", 1),
                                            (torch.float32, "nan_inf", 0),
                                            (torch.bfloat16, "ties", 0),
                                            (torch.float32, "near_ties", 1)])
def test_indexer_write_nan_inf_and_ties(coop, dtype, kind, pad, Q, fmt, gen):
    """NaN / inf keys next to finite ones (Q = 32: 8 tokens' groups share a warp), exact ties,
    float32 keys a few ulps from ties: bytes as the reference's; a NaN / inf token changes no
    other token's codes or scales."""
    D, tokens, nb, bs = 256, 6, 3, 4
    (k,) = rows(tokens, [D], dtype, gen, pad)
    if kind == "ties":
        k.copy_(tie_values(tokens, D, Q, dtype, gen))
    elif kind == "near_ties":
        k.copy_(near_tie_values(tokens, D, Q, gen))
    else:
        special = plant_nan_inf(k, Q)
    cache = torch.full((nb, bs, D + D // Q * 4), 9, dtype=torch.uint8)
    slots = torch.tensor([3, 8, 0, 11, 5, -1])
    want = cache.clone()
    ops.indexer_k_quant_and_cache(k, want, slots, Q, fmt)
    coop.indexer_k_quant_and_cache(k, cache, slots, Q, fmt == "ue8m0")
    assert torch.equal(cache, want)
    if kind == "nan_inf":
        alone = torch.full_like(cache, 9)
        finite_only = slots.clone()
        finite_only[special] = -1
        coop.indexer_k_quant_and_cache(k, alone, finite_only, Q, fmt == "ue8m0")
        for t in (0, 3):
            s, g4 = int(slots[t]), D // Q * 4
            blk, o = cache[s // bs].view(-1), s % bs
            ablk = alone[s // bs].view(-1)
            assert torch.equal(blk[o * D:(o + 1) * D], ablk[o * D:(o + 1) * D])
            at = bs * D + o * g4
            assert torch.equal(blk[at:at + g4], ablk[at:at + g4])


@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float32])
def test_indexer_gather(emu, scale_dtype, pad, gen):
    D, Q, nb, bs = 128, 64, 5, 4
    cache = torch.randint(0, 255, (nb, bs, D + D // Q * 4), generator=gen, dtype=torch.uint8)
    bt = torch.tensor([[4, 0], [2, 1]], dtype=torch.int32)
    cu = torch.tensor([0, 6, 9], dtype=torch.int32)
    N = 11  # rows 9 and 10 are past the last sequence: untouched
    width = D // Q * (4 if scale_dtype == torch.uint8 else 1)
    dk = torch.full((N, D + pad), 3, dtype=torch.uint8)[:, :D]
    ds = torch.full((N, width + pad), 1, dtype=scale_dtype)[:, :width]
    wk, wsc = dk.clone(), ds.clone()
    ops.cp_gather_indexer_k_quant_cache(cache, wk, wsc, bt, cu)
    emu.cp_gather_indexer_k_quant_cache(cache, dk, ds, bt, cu, Q)
    assert torch.equal(dk, wk) and torch.equal(u8(ds), u8(wsc))
    assert (dk[9:] == 3).all()
