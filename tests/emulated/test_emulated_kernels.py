"""csrc/'s launchers and kernels, host-compiled and emulated thread by thread (conftest.py),
against the references. Covers the kernels whose threads are independent: the gated
activations, rotary_embedding and the KV-cache family. The same inputs run through the real
kernels in the CUDA tests; these run anywhere, so a kernel bug shows up without a GPU.

What emulation cannot show: races, timing, the device's own fp8/math instructions (the host
uses CUDA's software fp8 conversion and libm), and anything about performance.
"""

import pytest
import torch

from compile_ops.activation import _KIND as ACT_KIND
from compile_ops.activation import act_and_mul_ref
from compile_ops.cache import _KV_KIND, quantize_fp8_ref
from compile_ops.rotary import rotary_embedding_ref
from compile_ops.testing import assert_close, rope_cos_sin_cache

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
       "fp8_e5m2": torch.float8_e5m2}


def codes(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def kv_pair(tokens, heads, hk, hv, dtype, gen, layout):
    """key/value [tokens, heads, size]; 'odd' = slices of a fused row whose stride breaks
    16-byte alignment (the element-wise path), 'qkv' = aligned slices."""
    if layout in ("qkv", "odd"):
        pad = 1 if layout == "odd" else 8
        row = torch.randn(tokens, heads * (hk + hk + hv) + pad, generator=gen).to(dtype)
        k = row[:, heads * hk:2 * heads * hk].view(tokens, heads, hk)
        v = row[:, 2 * heads * hk:2 * heads * hk + heads * hv].view(tokens, heads, hv)
        return k, v
    return (torch.randn(tokens, heads, hk, generator=gen).to(dtype),
            torch.randn(tokens, heads, hv, generator=gen).to(dtype))


def flash_caches(nb, bs, heads, hk, hv, dtype, layout):
    if layout == "HND":
        return (torch.zeros(nb, heads, bs, hk, dtype=dtype).permute(0, 2, 1, 3),
                torch.zeros(nb, heads, bs, hv, dtype=dtype).permute(0, 2, 1, 3))
    if layout == "kv_split":
        kv = torch.zeros(nb, 2, bs, heads, hk, dtype=dtype)
        return kv[:, 0], kv[:, 1]
    if layout == "kv_split_hnd":  # FlashInfer's [blocks, 2, heads, block, head], HND halves
        kv = torch.zeros(nb, 2, heads, bs, hk, dtype=dtype)
        return kv[:, 0].permute(0, 2, 1, 3), kv[:, 1].permute(0, 2, 1, 3)
    return (torch.zeros(nb, bs, heads, hk, dtype=dtype),
            torch.zeros(nb, bs, heads, hv, dtype=dtype))


def cache_dtype(kv, dtype, storage):
    if kv == "auto":
        return dtype
    return torch.uint8 if storage == "uint8" else FP8[kv]


# ---------------------------------------------------------------------------------------------
# KV-cache writes
# ---------------------------------------------------------------------------------------------
SHAPES = [(inputs, hk, hv, layout)
          for inputs, hk, hv in [("plain", 128, 128), ("odd", 64, 64), ("qkv", 80, 80),
                                 ("plain", 64, 32)]
          for layout in ["NHD", "HND", "kv_split", "kv_split_hnd"]
          if not layout.startswith("kv_split") or hk == hv]  # one [blocks, 2, ...]: equal sizes


@pytest.mark.parametrize("inputs,hk,hv,layout", SHAPES)
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_flash(emu, dtype, kv, inputs, hk, hv, layout, gen):
    heads, nb, bs, tokens = 3, 12, 16, 41
    key, value = kv_pair(tokens + 2, heads, hk, hv, dtype, gen, inputs)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    slots[::4] = -1
    cdt = cache_dtype(kv, dtype, "float8" if hk == 80 else "uint8")
    kc, vc = flash_caches(nb, bs, heads, hk, hv, cdt, layout)
    rk, rv = kc.clone(), vc.clone()
    ks = torch.tensor([0.5, 2.0, 0.25]) if kv == "fp8_e5m2" else torch.tensor([0.75])
    vs = torch.tensor([1.5])
    emu.reshape_and_cache_flash(key, value, kc, vc, slots, _KV_KIND[kv], ks, vs)
    ops.reshape_and_cache_flash(key, value, rk, rv, slots, kv, ks, vs)
    assert torch.equal(codes(kc), codes(rk)) and torch.equal(codes(vc), codes(rv))


@pytest.fixture(params=["staged", "register", "register_rows", "register_rows_256"])
def cache_kernel(request, monkeypatch):
    """reshape_and_cache through the staged kernel (from 0 tokens) or the register-only one;
    with the value rows' vector stores (COMPILE_OPS_CACHE_VROWS=1), in 256-thread CTAs
    (COMPILE_OPS_CACHE_THREADS=256)."""
    monkeypatch.setenv("COMPILE_OPS_CACHE_STAGED", "1" if request.param == "staged" else "0")
    monkeypatch.setenv("COMPILE_OPS_CACHE_VROWS", "1" if "rows" in request.param else "0")
    monkeypatch.setenv("COMPILE_OPS_CACHE_THREADS", "256" if "256" in request.param else "128")
    return request.param


@pytest.mark.parametrize("inputs", ["plain", "odd"])
@pytest.mark.parametrize("head_size", [64, 128, 256, 272])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache(coop, cache_kernel, dtype, kv, head_size, inputs, gen):
    """Scattered slots with padding, through either kernel (COMPILE_OPS_CACHE_STAGED); 256 is
    the largest head the staged kernel takes, 272 takes the register-only kernel."""
    emu = coop
    heads, nb, bs, tokens = 2, 6, 16, 29
    key, value = kv_pair(tokens, heads, head_size, head_size, dtype, gen, inputs)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    slots[1::5] = -1
    cdt = cache_dtype(kv, dtype, "uint8")
    x = 16 // torch.empty(0, dtype=cdt).element_size()
    kc = torch.zeros(nb, heads, head_size // x, bs, x, dtype=cdt)
    vc = torch.zeros(nb, heads, head_size, bs, dtype=cdt)
    rk, rv = kc.clone(), vc.clone()
    s = torch.tensor([0.5])
    emu.reshape_and_cache(key, value, kc, vc, slots, _KV_KIND[kv], s, s)
    ops.reshape_and_cache(key, value, rk, rv, slots, kv, s, s)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


@pytest.mark.parametrize("padding", [True, False], ids=["padding", "whole_runs"])
@pytest.mark.parametrize("inputs", ["plain", "odd"])
@pytest.mark.parametrize("bs,start", [(8, 0), (32, 0), (16, 3), (32, 16)])
@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_consecutive_slots(coop, cache_kernel, dtype, kv, bs, start, inputs,
                                            padding, gen):
    """A prefill's write: runs of consecutive slots in shuffled pages (the case the kernels'
    token tiles coalesce; the staged kernel hands such tiles to its register path), more tokens
    than one 32-token tile, with or without padding slots inside a run. `start`: the first
    token's page offset (3: no group of 8 or 16 tokens starts aligned in a page, the value rows'
    element stores; 16 in pages of 32: fp8's 16-token groups aligned, bf16's too)."""
    emu = coop
    heads, hs, nb, tokens = 3, 64, 12, 70
    key, value = kv_pair(tokens, heads, hs, hs, dtype, gen, inputs)
    pages = torch.randperm(nb, generator=gen)
    slots = (pages[:, None] * bs + torch.arange(bs)).flatten()[start:start + tokens].clone()
    if padding:
        slots[5] = -1
        slots[40:43] = -1
    cdt = cache_dtype(kv, dtype, "uint8")
    x = 16 // torch.empty(0, dtype=cdt).element_size()
    kc = torch.zeros(nb, heads, hs // x, bs, x, dtype=cdt)
    vc = torch.zeros(nb, heads, hs, bs, dtype=cdt)
    rk, rv = kc.clone(), vc.clone()
    s = torch.tensor([0.5, 1.0, 2.0])  # per-head scales
    emu.reshape_and_cache(key, value, kc, vc, slots, _KV_KIND[kv], s, s)
    ops.reshape_and_cache(key, value, rk, rv, slots, kv, s, s)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    assert rv.abs().sum() > 0


@pytest.mark.parametrize("inputs", ["plain", "odd"])
@pytest.mark.parametrize("dtype,kv,x", [
    (torch.float32, "auto", 1), (torch.float32, "auto", 16), (torch.float16, "auto", 2),
    (torch.bfloat16, "auto", 16), (torch.bfloat16, "fp8", 4), (torch.float16, "fp8_e5m2", 8),
    (torch.float32, "fp8", 1)])
def test_reshape_and_cache_any_x(emu, dtype, kv, x, inputs, gen):
    """x = key_cache.size(4) other than 16 bytes: the element-wise kernel (per-head scales,
    padding and out-of-range slots skipped, float8 storage for x = 1)."""
    heads, hs, nb, bs, tokens = 3, 32, 5, 8, 23
    key, value = kv_pair(tokens, heads, hs, hs, dtype, gen, inputs)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens]
    slots[1::5] = -1
    cdt = cache_dtype(kv, dtype, "float8" if x == 1 else "uint8")
    kc = torch.zeros(nb, heads, hs // x, bs, x, dtype=cdt)
    vc = torch.zeros(nb, heads, hs, bs, dtype=cdt)
    rk, rv = kc.clone(), vc.clone()
    s = torch.tensor([0.5, 1.0, 2.0])
    emu.reshape_and_cache(key, value, kc, vc, slots, _KV_KIND[kv], s, s)
    ops.reshape_and_cache(key, value, rk, rv, slots, kv, s, s)
    assert torch.equal(codes(kc), codes(rk)) and torch.equal(codes(vc), codes(rv))
    assert codes(rk).float().abs().sum() > 0
    bad = slots.clone()
    bad[0] = nb * bs  # out of range: the kernel skips the token
    before_k, before_v = codes(kc).clone(), codes(vc).clone()
    emu.reshape_and_cache(key[:1], value[:1], kc, vc, bad[:1], _KV_KIND[kv], s, s)
    assert torch.equal(codes(kc), before_k) and torch.equal(codes(vc), before_v)


def test_out_of_range_slots_are_skipped(coop, cache_kernel, gen):
    emu = coop
    heads, hs, nb, bs = 2, 64, 4, 16
    key, value = kv_pair(5, heads, hs, hs, torch.bfloat16, gen, "plain")
    kc, vc = flash_caches(nb, bs, heads, hs, hs, torch.bfloat16, "NHD")
    slots = torch.tensor([0, nb * bs, 5, 10 ** 12, -7])
    emu.reshape_and_cache_flash(key, value, kc, vc, slots, 0, torch.ones(1), torch.ones(1))
    flat = kc.view(-1, heads, hs)
    assert torch.equal(flat[0], key[0]) and torch.equal(flat[5], key[2])
    others = torch.ones(flat.shape[0], dtype=torch.bool)
    others[[0, 5]] = False
    assert flat[others].abs().sum() == 0
    x = 8
    pk = torch.zeros(nb, heads, hs // x, bs, x, dtype=torch.bfloat16)
    pv = torch.zeros(nb, heads, hs, bs, dtype=torch.bfloat16)
    emu.reshape_and_cache(key, value, pk, pv, slots, 0, torch.ones(1), torch.ones(1))
    assert torch.equal(pv[0, :, :, 5], value[2]) and torch.equal(pv[0, :, :, 0], value[0])
    assert torch.equal(pk[0, :, :, 5, :].reshape(heads, hs), key[2])
    pv[0, :, :, 5] = 0
    pv[0, :, :, 0] = 0
    pk[0, :, :, 5, :] = 0
    pk[0, :, :, 0, :] = 0
    assert pv.abs().sum() == 0 and pk.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Gathers, convert, swap
# ---------------------------------------------------------------------------------------------
def batch(lens, bs, nb, gen, starts=None):
    starts = starts or [0] * len(lens)
    cols = max((s + n + bs - 1) // bs for s, n in zip(starts, lens)) + 1
    table = torch.randperm(nb, generator=gen)[: len(lens) * cols].view(len(lens), cols)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    tts = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(torch.int32)
    return table.to(torch.int32), cu, tts, torch.tensor(starts, dtype=torch.int32)


@pytest.mark.parametrize("entry", [(4, 32), (72,), (3, 7)])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_starts", [False, True])
def test_gathers(emu, dtype, kv, entry, with_starts, gen):
    nb, bs = 48, 8
    lens = [13, 0, 1, 30, 8]
    starts = [3, 0, 7, 9, 0] if with_starts else None
    table, cu, tts, st = batch(lens, bs, nb, gen, starts)
    src = torch.randn(nb, bs, *entry, generator=gen).to(dtype)
    if kv != "auto":
        src = quantize_fp8_ref(src, 0.5, FP8[kv]).view(torch.uint8)
    scale = torch.tensor([0.5])
    st_arg = st if with_starts else None
    total = sum(lens)
    dst = torch.full((total + 3, *entry), 3.0, dtype=dtype)
    want, got = dst.clone(), dst.clone()
    ops.gather_and_maybe_dequant_cache(src, want, table, cu, tts, total - 2, kv, scale, st_arg)
    emu.gather_cache(src, got, table, cu, tts, total - 2, len(lens), _KV_KIND[kv], scale,
                     st_arg)
    assert torch.equal(got, want)
    if kv == "auto":
        want, got = dst.clone(), dst.clone()
        ops.cp_gather_cache(src, want, table, cu, len(lens), st_arg)
        emu.gather_cache(src, got, table, cu, None, got.shape[0], len(lens), 0, None, st_arg)
        assert torch.equal(got, want)


def test_gather_bad_block_ids_are_skipped(emu):
    nb, bs = 4, 16
    src = torch.randn(nb, bs, 8)
    table = torch.tensor([[0, 99], [-5, 1]], dtype=torch.int32)
    cu = torch.tensor([0, 20, 22], dtype=torch.int32)
    dst = torch.zeros(22, 8)
    emu.gather_cache(src, dst, table, cu, None, 22, 2, 0, None, None)
    assert torch.equal(dst[:16], src[0]) and dst[16:].abs().sum() == 0
    tts = torch.tensor([0] * 20 + [7, -1], dtype=torch.int32)  # sequence ids outside the batch
    dst = torch.zeros(22, 8)
    emu.gather_cache(src, dst, table, cu, tts, 22, 2, 0, torch.ones(1), None)
    assert torch.equal(dst[:16], src[0]) and dst[16:].abs().sum() == 0


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_convert_fp8(emu, dtype, kv, offset, gen):
    n = 1000
    x = (torch.randn(n + offset, generator=gen) * 100).to(dtype)[offset:]  # offset: unaligned
    x[3] = 1e6
    if kv == "auto":
        out = torch.empty(n, dtype=torch.bfloat16)
        emu.convert_fp8(out, x, 1.0, 0)
        assert torch.equal(out, x.to(torch.bfloat16))
        return
    got = torch.empty(n + offset, dtype=torch.uint8)[offset:]
    emu.convert_fp8(got, x, 0.37, _KV_KIND[kv])
    want = torch.empty(n, dtype=torch.uint8)
    ops.convert_fp8(want, x, 0.37, kv)
    assert torch.equal(got, want)
    back, ref = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    emu.convert_fp8(back, got, 0.37, _KV_KIND[kv])
    ops.convert_fp8(ref, want, 0.37, kv)
    assert torch.equal(back, ref)


def convert_block_case(case, gen):
    """(output, input, scale, kv) for convert_fp8 by blocks (vLLM: same blocks and elements per
    block, shapes free; each side's own block stride)."""
    nb, h, bs, hs = 5, 2, 8, 32
    rand = lambda shape, dt: (torch.randn(shape, generator=gen) * 4).to(dt)  # noqa: E731
    full = lambda shape, dt: torch.full(shape, 7, dtype=dt)  # noqa: E731
    if case == "x8_to_x16_flat":  # dense caches of another x: the flat kernel
        return (full((nb, h, hs // 16, bs, 16), torch.uint8),
                rand((nb, h, hs // 8, bs, 8), torch.bfloat16), 0.37, "fp8")
    if case == "kv_halves_vec":  # padded block strides on both sides, 16-byte packs
        out = full((nb, 2, h, hs // 16, bs, 16), torch.float8_e5m2)[:, 1]
        return out, rand((nb, 2, h, hs // 8, bs, 8), torch.float16)[:, 0], 2.0, "fp8_e5m2"
    if case == "dequant_padded":  # codes with padding between blocks -> bf16 of another shape
        q = quantize_fp8_ref(torch.randn(nb, 600, generator=gen), 1.0, FP8["fp8"])
        return (full((nb, h, hs // 8, bs, 8), torch.bfloat16),
                q.view(torch.uint8)[:, :512].view(nb, h, hs // 16, bs, 16), 0.25, "fp8")
    if case == "odd_strides":  # block strides not a multiple of the pack: element accesses
        return (full((nb, 77), torch.uint8)[:, 3:70], rand((nb, 70), torch.float32)[:, 1:68],
                0.37, "fp8_e4m3")
    # "auto_unaligned": a plain cast, bases off 16 bytes, padded strides
    return (full((nb, 40), torch.bfloat16)[:, 1:33].view(nb, 4, 8),
            rand((nb, 35), torch.float32)[:, 2:34], 1.0, "auto")


@pytest.mark.parametrize("case", ["x8_to_x16_flat", "kv_halves_vec", "dequant_padded",
                                  "odd_strides", "auto_unaligned"])
def test_convert_fp8_blocks(emu, case, gen):
    out, inp, scale, kv = convert_block_case(case, gen)
    base = out if out._base is None else out._base
    want_base = base.clone()
    want = want_base.as_strided(out.shape, out.stride(), out.storage_offset())
    ops.convert_fp8(want, inp, scale, kv)
    emu.convert_fp8(out, inp, scale, _KV_KIND[kv])
    assert torch.equal(codes(base), codes(want_base))  # padding between blocks untouched


def test_convert_fp8_launcher_checks(emu):
    """The launcher's own checks (a second line behind the Python layer's)."""
    x = torch.randn(4, 2, 8)
    for out, inp, fragment in [
            (torch.empty(5, 16, dtype=torch.uint8), x, "same number of blocks"),
            (torch.empty(4, 15, dtype=torch.uint8), x, "same number of elements"),
            (torch.empty(4, 16, dtype=torch.uint8), x.transpose(1, 2), "contiguous within a"),
            (torch.empty(20, dtype=torch.uint8).as_strided((4, 16), (1, 1)), x, "overlap")]:
        with pytest.raises(RuntimeError, match=fragment):
            emu.convert_fp8(out, inp, 1.0, _KV_KIND["fp8"])


@pytest.mark.parametrize("mode", ["memcpy", "kernel", "auto"])
@pytest.mark.parametrize("nbytes_div", [1, 2, 3])
def test_swap_blocks(emu, mode, nbytes_div, gen):
    src = torch.randn(64, 16, 4, 8, generator=gen).to(torch.bfloat16)
    dst = torch.zeros_like(src)
    block = src[0].numel() * 2
    nbytes = block // nbytes_div - (1 if nbytes_div == 3 else 0)  # 3: odd byte count
    srcs = torch.randperm(64, generator=gen)[:30]
    dsts = torch.randperm(64, generator=gen)[:30]
    mapping = torch.stack([srcs, dsts], dim=1)
    mapping = torch.cat([mapping[~torch.isin(mapping[:, 1], torch.arange(50, 60))],
                         torch.stack([torch.arange(10, 20), torch.arange(50, 60)], dim=1)])
    want = torch.zeros_like(src)
    ops.swap_blocks(src, want, nbytes, mapping)
    emu.swap_blocks(src, dst, nbytes, mapping, mode)
    assert torch.equal(dst.view(torch.uint8), want.view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# Activations and rotary
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_pad", [0, 64, 11])
@pytest.mark.parametrize("d", [8, 24, 77])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACT_KIND) + ["swigluoai_and_mul"])
def test_activations(emu, name, dtype, d, row_pad, gen):
    base = torch.randn(9, 2 * d + row_pad, generator=gen) * 3
    x = base.to(dtype)[:, :2 * d]
    out = torch.full((9, d), float("nan"), dtype=dtype)
    if name == "swigluoai_and_mul":
        emu.swigluoai_and_mul(out, x, 1.5, 2.5)
        want = act_and_mul_ref(name, x, alpha=1.5, limit=2.5)
    else:
        th = 0.3 if name == "fatrelu_and_mul" else 0.0
        emu.act_and_mul(out, x, ACT_KIND[name], th)
        want = act_and_mul_ref(name, x, threshold=th)
    assert_close(out, want)


@pytest.mark.parametrize("layout", ["2d", "qkv", "no_key", "odd"])
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (128, 64), (80, 32)])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(emu, dtype, is_neox, head_size, rot_dim, layout, gen):
    tokens, nq, nk, max_pos = 11, 4, 2, 64
    positions = torch.randint(0, max_pos, (tokens,), generator=gen, dtype=torch.int32)
    cache = rope_cos_sin_cache(max_pos, rot_dim)
    if layout in ("qkv", "odd"):  # odd: a token stride that is not 16-byte aligned (scalar path)
        pad = 1 if layout == "odd" else 0
        row = torch.randn(tokens, (nq + 2 * nk) * head_size + pad, generator=gen).to(dtype)
        q, k = row[:, :nq * head_size], row[:, nq * head_size:(nq + nk) * head_size]
    else:
        q = torch.randn(tokens, nq * head_size, generator=gen).to(dtype)
        k = None if layout == "no_key" else torch.randn(tokens, nk * head_size,
                                                        generator=gen).to(dtype)
    want_q, want_k = rotary_embedding_ref(positions, q, k, head_size, cache, is_neox)
    emu.rotary_embedding(positions, q, k, head_size, cache, is_neox)
    assert_close(q, want_q)
    if k is not None:
        assert_close(k, want_k)


@pytest.mark.parametrize("pad", [0, 1])  # the 128-bit and the element-wise kernel
def test_rotary_out_of_range_positions_are_skipped(emu, pad, gen):
    cache = torch.randn(8, 32)
    q = torch.randn(3, 2 * 64 + pad, generator=gen)[:, :128]
    q0 = q.clone()
    positions = torch.tensor([1, 8, -1])
    emu.rotary_embedding(positions, q, None, 64, cache, True)
    assert torch.equal(q[1:], q0[1:]) and not torch.equal(q[0], q0[0])


def _rope_bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


# Strided heads, rope_dim_offset and inverse. Heads at stride head_size + pad: a pad of 8 keeps
# each head 16-byte aligned for every dtype (the 128-bit kernels), an odd pad or offset does not
# (the element-wise kernels; UBSan's alignment check would abort a misaligned 128-bit access).
# Packed heads with inverse=False run the packed instantiation (the offset moves the pointer),
# strided heads or inverse the general one.
ROPE_CASES = {  # name: (lead, pad (None: packed [tokens, heads * head]), fused, offset, inverse)
    "padded_vec": ((5,), 8, False, 0, False),
    "padded_odd": ((5,), 1, False, 0, False),
    "bshd_fused_vec": ((2, 3), 8, True, 0, False),
    "bshd_fused_odd": ((2, 3), 3, True, 0, False),
    "offset_vec": ((5,), None, False, 16, False),
    "offset_odd": ((5,), None, False, 5, False),
    "inverse_vec": ((5,), None, False, 0, True),
    "inverse_odd": ((5,), None, False, 3, True),
    "strided_offset_inverse_vec": ((2, 3), 8, True, 32, True),
    "strided_offset_inverse_odd": ((5,), 2, False, 32, True),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_strided_offset_inverse(emu, dtype, is_neox, case, gen):
    lead, pad, fused, offset, inverse = ROPE_CASES[case]
    nq, nk, hs, rot = 4, 2, 64, 32
    positions = torch.randint(0, 64, lead, generator=gen)
    cache = rope_cos_sin_cache(64, rot)
    if pad is None:
        bufs = [torch.randn(*lead, h, hs, generator=gen).to(dtype) for h in (nq, nk)]
        q, k = (b.flatten(-2) for b in bufs)
        written = [nq, nk]
    elif fused:
        bufs = [torch.randn(*lead, nq + 2 * nk, hs + pad, generator=gen).to(dtype)]
        q, k = bufs[0][..., :nq, :hs], bufs[0][..., nq:nq + nk, :hs]
        written = [nq + nk]
    else:
        bufs = [torch.randn(*lead, h, hs + pad, generator=gen).to(dtype) for h in (nq, nk)]
        q, k = (b[..., :hs] for b in bufs)
        written = [nq, nk]
    before = [b.clone() for b in bufs]
    want_q, want_k = rotary_embedding_ref(positions, q, k, hs, cache, is_neox, offset, inverse)
    emu.rotary_embedding(positions, q, k, hs, cache, is_neox, offset, inverse)
    assert_close(q, want_q)
    assert_close(k, want_k)
    for b, b0, n in zip(bufs, before, written):  # padding, v heads, non-rotary dims untouched
        keep = torch.ones(b.shape, dtype=torch.bool)
        keep[..., :n, offset:offset + rot] = False
        assert torch.equal(_rope_bits(b)[keep], _rope_bits(b0)[keep])
    # and back: the inverse of the rotation
    emu.rotary_embedding(positions, q, k, hs, cache, is_neox, offset, not inverse)
    assert_close(q, before[0][..., :nq, :hs].reshape(q.shape))


def test_rotary_launcher_checks(emu, gen):
    """The launcher refuses what the Python checks refuse (overlapping heads or tokens, a bad
    rope_dim_offset) and takes empty inner leading dims; the fused RoPE + cache launcher keeps
    refusing strided heads (its kernel takes packed heads only)."""
    pos = torch.arange(4)
    q = torch.randn(4, 32, generator=gen)
    q0 = q.clone()
    cache = rope_cos_sin_cache(8, 8)
    for view, hs, fragment in [(q.as_strided((4, 2, 16), (32, 8, 1)), 16, "heads overlap"),
                               (q.as_strided((4, 2, 6), (6, 8, 1)), 6, "tokens overlap"),
                               (q.view(4, 16, 2).transpose(1, 2), 16, "each head contiguous")]:
        with pytest.raises(RuntimeError, match=fragment):
            emu.rotary_embedding(pos, view, None, hs, rope_cos_sin_cache(8, 6), True)
    for offset in (-1, 9):
        with pytest.raises(RuntimeError, match="rope_dim_offset"):
            emu.rotary_embedding(pos, q, None, 16, cache, True, offset, False)
    assert torch.equal(q, q0)
    for lead in [(2, 0), (0, 0)]:
        emu.rotary_embedding(torch.zeros(lead, dtype=torch.int64), torch.empty(*lead, 8), None,
                             4, rope_cos_sin_cache(8, 4), True, 0, True)
    # heads-major tokens ([heads, tokens, head] buffer seen as [tokens, heads, head]) are taken
    hm = torch.randn(2, 4, 16, generator=gen).transpose(0, 1)
    want, _ = rotary_embedding_ref(pos, hm, None, 16, cache, False, 8, True)
    emu.rotary_embedding(pos, hm, None, 16, cache, False, 8, True)
    assert_close(hm, want)
    row, _, k, v, rpos, cs, kc, vc, slots = rope_cache_case(9, 4, 2, 64, 64, torch.float32,
                                                            "auto", "NHD", gen)
    padded = torch.randn(9, 4, 72, generator=gen)[..., :64]
    with pytest.raises(RuntimeError, match="query must hold each token's heads contiguously"):
        emu.fused_rope_and_cache_flash(rpos.clamp(0, 63), padded, k, v, 64, cs, True, kc, vc,
                                       slots, 0, torch.ones(1), torch.ones(1), True)


# ---------------------------------------------------------------------------------------------
# Fused RoPE + cache write
# ---------------------------------------------------------------------------------------------
def rope_cache_case(tokens, nq, nk, hs, rot, dtype, kv, layout, gen, pad=0, n_slots=None):
    nb, bs = 12, 16
    row = torch.randn(tokens, (nq + 2 * nk) * hs + pad, generator=gen).to(dtype)
    q, k = row[:, :nq * hs], row[:, nq * hs:(nq + nk) * hs]
    v = row[:, (nq + nk) * hs:(nq + 2 * nk) * hs].view(tokens, nk, hs)
    positions = torch.randint(-2, 70, (tokens,), generator=gen)  # a few out of [0, 64)
    positions[0] = 5
    cos_sin = rope_cos_sin_cache(64, rot)
    cdt = dtype if kv == "auto" else torch.uint8
    kc, vc = flash_caches(nb, bs, nk, hs, hs, cdt, layout)
    slots = torch.randperm(nb * bs, generator=gen)[:tokens if n_slots is None else n_slots]
    slots[1::4] = -1
    return row, q, k, v, positions, cos_sin, kc, vc, slots


@pytest.mark.parametrize("write_key", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("hs,rot", [(64, 64), (128, 64), (32, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rope_and_cache_flash(emu, dtype, hs, rot, is_neox, kv, layout, write_key, gen):
    row, q, k, v, pos, cs, kc, vc, slots = rope_cache_case(9, 4, 2, hs, rot, dtype, kv, layout,
                                                           gen, n_slots=7)
    rrow, rkc, rvc = row.clone(), kc.clone(), vc.clone()
    rq, rk = rrow[:, :4 * hs], rrow[:, 4 * hs:6 * hs]
    rv = rrow[:, 6 * hs:8 * hs].view(9, 2, hs)
    s = torch.tensor([0.5, 2.0])
    # the reference raises on out-of-range positions: it gets the in-range ones, and the
    # kernel's "leave the token unrotated" is checked on those tokens below
    bad = (pos < 0) | (pos >= 64)
    ref_pos = torch.where(bad, torch.zeros_like(pos), pos)
    q0, k0 = q.clone(), k.clone()
    assert emu.fused_rope_and_cache_flash(pos, q, k, v, hs, cs, is_neox, kc, vc, slots,
                                          _KV_KIND[kv], s, s, write_key)
    ops.fused_rope_and_cache_flash(ref_pos, rq, rk, rv, hs, cs, is_neox, rkc, rvc, slots, kv, s,
                                   s, write_key)
    good = ~bad
    assert torch.equal(q[good], rq[good]) and torch.equal(k[good], rk[good])
    assert torch.equal(q[bad], q0[bad]) and torch.equal(k[bad], k0[bad])  # left unrotated
    blk, off = slots // 16, slots % 16
    for t in range(slots.numel()):
        if slots[t] < 0 or bad[t]:
            continue
        assert torch.equal(codes(kc[blk[t], off[t]]), codes(rkc[blk[t], off[t]]))
        assert torch.equal(codes(vc[blk[t], off[t]]), codes(rvc[blk[t], off[t]]))
    unused = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    unused[slots[slots >= 0]] = False
    assert codes(kc).reshape(-1, *kc.shape[2:])[unused].float().abs().sum() == 0


@pytest.mark.parametrize("write_key", [True, False])
@pytest.mark.parametrize("kv", ["auto", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("hs,rot,bs", [(64, 64, 16), (128, 64, 8), (32, 16, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rope_and_cache_paged(emu, dtype, hs, rot, bs, is_neox, kv, write_key, gen):
    """fused_rope_and_cache: vLLM's paged layout (x-packed keys, [blocks, heads, head, page]
    values), against rotary_embedding + reshape_and_cache's references."""
    nb, tokens, nq, nk = 12, 9, 4, 2
    row = torch.randn(tokens, (nq + 2 * nk) * hs, generator=gen).to(dtype)
    q, k = row[:, :nq * hs], row[:, nq * hs:(nq + nk) * hs]
    v = row[:, (nq + nk) * hs:].view(tokens, nk, hs)
    pos = torch.randint(-2, 70, (tokens,), generator=gen)
    pos[0] = 5
    cs = rope_cos_sin_cache(64, rot)
    cdt = dtype if kv == "auto" else torch.uint8
    x = 16 // torch.empty(0, dtype=cdt).element_size()
    kc = torch.zeros(nb, nk, hs // x, bs, x, dtype=cdt)
    vc = torch.zeros(nb, nk, hs, bs, dtype=cdt)
    slots = torch.randperm(nb * bs, generator=gen)[:7]
    slots[1::4] = -1
    rrow, rkc, rvc = row.clone(), kc.clone(), vc.clone()
    rq, rk = rrow[:, :nq * hs], rrow[:, nq * hs:(nq + nk) * hs]
    rv = rrow[:, (nq + nk) * hs:].view(tokens, nk, hs)
    s = torch.tensor([0.5, 2.0])
    bad = (pos < 0) | (pos >= 64)
    ref_pos = torch.where(bad, torch.zeros_like(pos), pos)
    q0, k0 = q.clone(), k.clone()
    assert emu.fused_rope_and_cache(pos, q, k, v, hs, cs, is_neox, kc, vc, slots, _KV_KIND[kv],
                                    s, s, write_key)
    ops.fused_rope_and_cache(ref_pos, rq, rk, rv, hs, cs, is_neox, rkc, rvc, slots, kv, s, s,
                             write_key)
    good = ~bad
    assert torch.equal(q[good], rq[good]) and torch.equal(k[good], rk[good])
    assert torch.equal(q[bad], q0[bad]) and torch.equal(k[bad], k0[bad])
    written = 0
    for t in range(slots.numel()):
        if slots[t] < 0 or bad[t]:
            continue
        b, o = int(slots[t]) // bs, int(slots[t]) % bs
        assert torch.equal(codes(kc[b, :, :, o]), codes(rkc[b, :, :, o]))
        assert torch.equal(codes(vc[b, :, :, o]), codes(rvc[b, :, :, o]))
        written += 1
    assert written > 0
    unused = torch.ones(nb * bs, dtype=torch.bool)
    unused[slots[slots >= 0]] = False
    kflat = codes(kc).permute(0, 3, 1, 2, 4).reshape(nb * bs, -1)
    vflat = codes(vc).permute(0, 3, 1, 2).reshape(nb * bs, -1)
    assert kflat[unused].float().abs().sum() == 0 and vflat[unused].float().abs().sum() == 0


def test_fused_rope_and_cache_flash_leaves_bad_positions_unrotated(emu, gen):
    row, q, k, v, pos, cs, kc, vc, slots = rope_cache_case(4, 2, 1, 32, 32, torch.bfloat16,
                                                           "auto", "NHD", gen)
    pos = torch.tensor([3, 64, -1, 10])
    slots = torch.tensor([0, 1, 2, 3])
    q0, k0 = q.clone(), k.clone()
    assert emu.fused_rope_and_cache_flash(pos, q, k, v, 32, cs, True, kc, vc, slots, 0,
                                          torch.ones(1), torch.ones(1), True)
    assert torch.equal(q[1:3], q0[1:3]) and torch.equal(k[1:3], k0[1:3])
    assert torch.equal(kc[0, 1].reshape(-1), k0[1]) and torch.equal(kc[0, 2].reshape(-1), k0[2])
    assert not torch.equal(q[0], q0[0])


def test_fused_rope_and_cache_flash_declines_unaligned_rows(emu, gen):
    row, q, k, v, pos, cs, kc, vc, slots = rope_cache_case(4, 2, 1, 32, 32, torch.bfloat16,
                                                           "auto", "NHD", gen, pad=1)
    q0 = q.clone()
    assert not emu.fused_rope_and_cache_flash(pos.clamp(0, 63), q, k, v, 32, cs, True, kc, vc,
                                              slots, 0, torch.ones(1), torch.ones(1), True)
    assert torch.equal(q, q0) and kc.abs().sum() == 0  # declined: nothing touched


# ---------------------------------------------------------------------------------------------
# RMSNorm family (block reductions: the cooperative schedule)
# ---------------------------------------------------------------------------------------------
def test_sequential_schedule_refuses_barriers(emu):
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="set_cooperative"):
        emu.rms_norm(torch.empty_like(x), x, torch.ones(64), 1e-6)


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("row_pad", [0, 64, 3])
@pytest.mark.parametrize("hidden", [8, 40, 769, 1024, 9000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_family(coop, fused, dtype, hidden, row_pad, weighted, gen):
    """Register-cached, warp-per-row, element-wise and (9000 fp32 = past the register budget)
    two-pass kernels; aligned, strided-aligned and strided-misaligned rows; with a weight and
    without (None: the kernels' null-weight path)."""
    from compile_ops.norm import fused_add_rms_norm_ref, rms_norm_ref

    rows = 5
    x = (torch.randn(rows, hidden + row_pad, generator=gen)).to(dtype)[:, :hidden]
    w = torch.randn(hidden, generator=gen).to(dtype) if weighted else None
    if fused:
        res = torch.randn(rows, hidden + row_pad, generator=gen).to(dtype)[:, :hidden]
        want_out, want_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
        coop.fused_add_rms_norm(x, res, w, 1e-5)
        assert_close(x, want_out)
        assert_close(res, want_res)
    else:
        out = torch.full_like(x, float("nan"))
        coop.rms_norm(out, x, w, 1e-5)
        assert_close(out, rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_shifted_rows(coop, fused, weighted, gen):
    """4096 rows whose starts share one misalignment: the shifted 128-bit kernel (its edge
    elements and its shifted weight packs, or the null-weight path)."""
    from compile_ops.norm import fused_add_rms_norm_ref, rms_norm_ref

    rows, hidden = 4096, 24
    x = torch.randn(rows, hidden + 1, generator=gen).to(torch.bfloat16)[:, 1:]
    w = torch.randn(hidden, generator=gen).to(torch.bfloat16) if weighted else None
    if fused:
        res = torch.randn(rows, hidden + 1, generator=gen).to(torch.bfloat16)[:, 1:]
        want_out, want_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
        coop.fused_add_rms_norm(x, res, w, 1e-6)
        assert_close(x, want_out)
        assert_close(res, want_res)
    else:
        out = torch.randn(rows, hidden + 1, generator=gen).to(torch.bfloat16)[:, 1:]
        coop.rms_norm(out, x, w, 1e-6)
        assert_close(out, rms_norm_ref(x, w, 1e-6))


def _out_case(layout, rows, hidden, dtype, gen):
    """(out, residual_out, input, residual) for fused_add_rms_norm_out in one layout."""
    def t(pad=0, offset=0):
        base = torch.randn(rows, hidden + pad + offset, generator=gen).to(dtype)
        return base[:, offset:offset + hidden]

    nan = float("nan")
    if layout == "padded_inputs":  # inputs strided (aligned), outputs contiguous
        return t().fill_(nan), t().fill_(nan), t(64), t(64)
    if layout == "misaligned_outputs":  # outputs off 16 bytes: the element-wise kernel
        return t(offset=1).fill_(nan), t(3).fill_(nan), t(), t()
    if layout == "aliased":  # out is input, residual_out is residual: in place through the op
        x, r = t(), t(8)
        return x, r, x, r
    # broadcast: a read-only residual row repeated (stride 0), input and residual one tensor
    x = t()
    return t().fill_(nan), t().fill_(nan), x, x[:1].expand(rows, hidden)


@pytest.mark.parametrize("layout", ["padded_inputs", "misaligned_outputs", "aliased",
                                    "broadcast"])
@pytest.mark.parametrize("hidden", [8, 769, 9000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_out(coop, dtype, hidden, layout, gen):
    """The out-of-place fused op through every kernel (8: warp per row, 128-bit; 769:
    element-wise; 9000: block per row in 16-bit types, two-pass in float32): residual read from
    one tensor, the sum written to another with its own stride and alignment; an exact alias
    (the in-place call); read-only rows that repeat."""
    from compile_ops.norm import fused_add_rms_norm_ref

    out, res_out, x, res = _out_case(layout, 5, hidden, dtype, gen)
    w = None if layout == "broadcast" else torch.randn(hidden, generator=gen).to(dtype)
    want_out, want_res = fused_add_rms_norm_ref(x.clone(), res.clone(), w, 1e-5)
    x0, r0 = x.clone(), res.clone()
    coop.fused_add_rms_norm_out(out, res_out, x, res, w, 1e-5)
    assert_close(out, want_out)
    assert_close(res_out, want_res)
    if layout != "aliased":
        assert torch.equal(x, x0) and torch.equal(res, r0), "an input was written"


def test_rms_norm_shifted_rows_out_of_place(coop, gen):
    """4096 rows whose starts share one misalignment: the shifted kernel with residual and
    residual_out different rows (each at its own address, same phase)."""
    from compile_ops.norm import fused_add_rms_norm_ref

    rows, hidden = 4096, 24

    def rows_at(phase):  # row stride 25: every row's phase moves by one, the same in all four
        flat = torch.randn(rows * (hidden + 1) + phase, generator=gen).to(torch.bfloat16)
        return flat[phase:].view(rows, hidden + 1)[:, :hidden]

    x, res, out, res_out = rows_at(1), rows_at(1), rows_at(1), rows_at(1)
    w = torch.randn(hidden, generator=gen).to(torch.bfloat16)
    want_out, want_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    x0, r0 = x.clone(), res.clone()
    coop.fused_add_rms_norm_out(out, res_out, x, res, w, 1e-6)
    assert_close(out, want_out)
    assert_close(res_out, want_res)
    assert torch.equal(x, x0) and torch.equal(res, r0)


@pytest.mark.parametrize("bad", ["out_shape", "residual_out_dtype", "residual_out_rows"])
def test_fused_add_rms_norm_out_launcher_checks(emu, bad):
    # The C++ launcher's own checks, for callers that bypass the Python layer.
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    out, res_out = torch.empty(4, 16), torch.empty(4, 16)
    if bad == "out_shape":
        out, match = torch.empty(4, 17), "out must have the shape of input"
    elif bad == "residual_out_dtype":
        res_out, match = res_out.half(), "residual_out must have dtype"
    else:
        res_out, match = torch.empty(1, 16).expand(4, 16), "residual_out rows overlap"
    with pytest.raises(RuntimeError, match=match):
        emu.fused_add_rms_norm_out(out, res_out, x, r, None, 1e-6)


# ---------------------------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["plain", "no_lse", "ctx", "fp8", "fp8_ctx"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("head", [16, 40, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attn_states(emu, dtype, head, strided, mode, gen):
    """128-bit and element paths; output_lse None; prefill_tokens_with_context (the last two
    tokens pass the suffix through: their prefix holds NaN, never read, and a raw +inf LSE);
    FP8 output with output_scale (4- or 8-byte output packs, or elements)."""
    from compile_ops.attention import FP8_OUTPUT, merge_attn_states_ref

    tokens, heads, inf = 6, 3, float("inf")
    fp8, ctx = mode.startswith("fp8"), (4 if mode.endswith("ctx") else None)
    p = torch.randn(tokens, heads, head, generator=gen).to(dtype)
    s = torch.randn(tokens, heads, head, generator=gen).to(dtype)
    pl, sl = torch.randn(heads, tokens, generator=gen) * 3, torch.randn(heads, tokens, generator=gen)
    pl[0, 0], pl[1, 1], sl[0, 2] = inf, -inf, inf
    pl[2, 3], sl[2, 3] = -inf, inf  # both empty
    if ctx is not None:
        p[ctx:], pl[:, ctx:], sl[1, 5] = float("nan"), float("nan"), inf
    scale = torch.tensor([0.05]) if fp8 else None
    out_dtype = FP8_OUTPUT if fp8 else dtype
    if strided:
        out = torch.zeros(tokens, heads, head + 5, dtype=out_dtype)[:, :, 1:head + 1]
        lse = torch.full((tokens, heads), 9.0).t()
    else:
        out, lse = torch.zeros_like(p, dtype=out_dtype), torch.full_like(pl, 9.0)
    if mode == "no_lse":
        lse = None
    emu.merge_attn_states(out, p, pl, s, sl, lse, ctx, scale)
    want_out, want_lse = merge_attn_states_ref(p, pl, s, sl, ctx, scale)
    if fp8:
        assert_close(out.float(), want_out.float(), dtype=FP8_OUTPUT)
    else:
        assert_close(out, want_out)
        assert torch.equal(out[3, 2], p[3, 2])
        if ctx is not None:
            assert torch.equal(out[ctx:], s[ctx:])
    if lse is not None:
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        assert torch.equal(lse[torch.isinf(lse)], want_lse[torch.isinf(want_lse)])
        fin = ~torch.isinf(want_lse)
        torch.testing.assert_close(lse[fin], want_lse[fin], rtol=1e-6, atol=1e-6)
        if ctx is not None:
            assert torch.equal(lse[:, ctx:], sl[:, ctx:])  # raw, +inf included


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attn_states_fp8_exact(emu, dtype):
    """The kernel's FP8 store: x * (1 / scale) in float32 (10.9375 with scale 7 gives e4m3
    1.625; a division would give the tie 1.5625 -> 1.5), saturation at +-448, NaN kept."""
    from compile_ops.attention import FP8_OUTPUT

    x = torch.tensor([10.9375] * 13 + [1e5, -1e5, float("nan")], dtype=dtype)
    x = x[None, None, :].expand(3, 2, 16).contiguous()
    pl, sl = torch.zeros(2, 3), torch.full((2, 3), -float("inf"))
    out = torch.empty_like(x, dtype=FP8_OUTPUT)
    emu.merge_attn_states(out, x, pl, torch.zeros_like(x), sl, None, None, torch.tensor([7.0]))
    got = out.float()
    assert (got[..., :13] == 1.625).all() and (got[..., 13] == 448).all()
    assert (got[..., 14] == -448).all() and torch.isnan(got[..., 15]).all()



# ---------------------------------------------------------------------------------------------
# argmax (greedy sampling)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
@pytest.mark.parametrize("rows,n", [(2, 5003), (1, 4096), (3, 37), (1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax(coop, dtype, rows, n, layout, gen):
    """One split (short rows) and several with the merge kernel (the emulated device has 132
    SMs: 2 x 5003 is 2 splits of 2504); 16-byte packs and the scalar path; ties across splits,
    a NaN, -inf and signed zeros."""
    from tests.ops.test_sampling import oracle, planted

    pad = 1 if layout == "unaligned" else 0
    wide = torch.full((rows, n + 8), -1e4).to(dtype)
    wide[:, pad:pad + n] = planted(rows, n, dtype, gen)
    x = wide[:, pad:pad + n]
    if rows >= 2 and n > 4000:
        x[1].fill_(-float("inf"))
        x[1, 4000] = float("nan")
        x[1, 10] = float("inf")
    if rows >= 3:
        x[2].fill_(-0.0)
        x[2, 5:] = 0.0
    out = torch.full((rows,), -7, dtype=torch.int64)
    coop.argmax(out, x)
    assert torch.equal(out, oracle(x))
