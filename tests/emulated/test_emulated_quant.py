"""csrc/quant_kernels.cu host-compiled and emulated (conftest.py) against compile_ops/quant.py's
references, byte for byte (FP8 codes as uint8) and scale for scale (torch.equal): the static
kernel sequentially, the reduction kernels (shuffles, shared memory, the atomic max) in the
cooperative schedule. Small shapes that take every path: 128-bit packs and the scalar
fallback, warp-per-row and block-per-row launches, register-cached and two-pass rows, group
lanes below a warp and whole-warp groups."""

import pytest
import torch

from compile_ops import quant as Q
from tests.ops.test_quant import make_x, static_cases

FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def u8(t):
    return t.view(torch.uint8)


def poisoned(shape):
    return torch.full(shape, 0x55, dtype=torch.uint8).view(FP8)


# (tokens, hidden, row_pad): aligned packs, aligned strided rows, misaligned rows, an odd
# hidden size, rows longer than a warp's share (block per row).
ROWS = [(3, 64, 0), (5, 48, 64), (4, 40, 11), (3, 13, 0), (2, 1040, 0), (2, 777, 3)]


@pytest.mark.parametrize("tokens,hidden,row_pad", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_static(emu, dtype, tokens, hidden, row_pad, gen):
    x = make_x(tokens, hidden, dtype, gen, row_pad=row_pad)
    for name, s, gshape, *_ in static_cases(tokens, hidden, gen):
        gm, gn = Q.resolve_group_shape("static_scaled_fp8_quant", x.shape, s, gshape)
        out = poisoned(x.shape)
        emu.static_scaled_fp8_quant(out, x, s, gm, gn)
        assert torch.equal(u8(out), u8(Q.static_scaled_fp8_quant_ref(x, s, gshape))), name


def test_static_groups_inside_a_pack(emu, gen):
    # Column groups of 2 and 4 inside 8-element packs; a zero and a negative scale.
    x = make_x(4, 64, torch.bfloat16, gen)
    for gn in (2, 4):
        s = torch.rand(4, 64 // gn, generator=gen) - 0.3
        s[0, 0] = 0.0
        out = poisoned(x.shape)
        emu.static_scaled_fp8_quant(out, x, s, 1, gn)
        assert torch.equal(u8(out), u8(Q.static_scaled_fp8_quant_ref(x, s)))


@pytest.mark.parametrize("tokens,hidden,row_pad", ROWS + [(2, 2100, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_per_tensor(coop, dtype, tokens, hidden, row_pad, gen):
    x = make_x(tokens, hidden, dtype, gen, row_pad=row_pad)
    out, s = poisoned(x.shape), torch.full((1,), 1e9)  # not zeroed: the op does it
    coop.dynamic_scaled_fp8_quant(out, x, s)
    eq, es = Q.dynamic_scaled_fp8_quant_ref(x)
    assert torch.equal(s, es) and torch.equal(u8(out), u8(eq))


def test_dynamic_all_zero_and_empty(coop):
    out, s = poisoned((3, 16)), torch.full((2,), 5.0)
    coop.dynamic_scaled_fp8_quant(out, torch.zeros(3, 16), s)
    assert s.tolist() == [0.0, 5.0] and bool((u8(out) == 0x7E).all())
    s = torch.full((1,), 5.0)
    coop.dynamic_scaled_fp8_quant(poisoned((0, 16)), torch.empty(0, 16), s)
    assert s.item() == 0.0


@pytest.mark.parametrize("tokens,hidden,row_pad", ROWS + [(2, 2100, 1), (1, 4104, 0)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ub", [None, 1.5])
def test_dynamic_per_token(coop, dtype, tokens, hidden, row_pad, ub, gen):
    x = make_x(tokens, hidden, dtype, gen, row_pad=row_pad)
    ubt = None if ub is None else torch.tensor([ub])
    out = poisoned(x.shape)
    s = torch.full((tokens, 3), -1.0)[:, 1:2]  # a strided [tokens, 1] column
    coop.dynamic_per_token_scaled_fp8_quant(out, x, s, ubt)
    eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(x, ubt)
    assert torch.equal(s, es) and torch.equal(u8(out), u8(eq))


# (tokens, k, group_size): lanes below a warp, a whole warp, two-pass groups, the scalar path
# (group_size not a multiple of the pack), and a grid of several blocks.
GROUPS = [(3, 64, 8), (4, 256, 128), (2, 96, 32), (1, 8192, 4096), (3, 21, 7), (5, 48, 24),
          (70, 32, 16)]


@pytest.mark.parametrize("tokens,k,gs", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "col", "tma"])
def test_per_token_group(coop, dtype, tokens, k, gs, layout, gen):
    x = make_x(tokens, k, dtype, gen)
    g = k // gs
    for ue8m0, (eps, lo, hi) in [(False, (1e-10, -448.0, 448.0)), (True, (1e-4, -200.0, 300.0))]:
        q = poisoned(x.shape)
        if layout == "row":
            s = torch.full((tokens, g), -1.0)
        elif layout == "col":
            s = torch.full((g, tokens), -1.0).t()
        else:
            s = torch.full((g, (tokens + 3) // 4 * 4), -1.0).t()[:tokens]
        coop.per_token_group_fp8_quant(x, q, s, gs, eps, lo, hi, ue8m0)
        eq, es = Q.per_token_group_fp8_quant_ref(x, gs, eps, lo, hi, ue8m0)
        assert torch.equal(s, es) and torch.equal(u8(q), u8(eq)), (ue8m0, layout)


def test_per_token_group_misaligned_input(coop, gen):
    base = make_x(1, 3 * 64 + 1, torch.bfloat16, gen).reshape(-1)
    x = base[1:].reshape(3, 64)  # contiguous, not 16-byte aligned: the scalar path
    q, s = poisoned(x.shape), torch.empty(3, 4)
    coop.per_token_group_fp8_quant(x, q, s, 16, 1e-10, -448.0, 448.0, False)
    eq, es = Q.per_token_group_fp8_quant_ref(x, 16)
    assert torch.equal(s, es) and torch.equal(u8(q), u8(eq))


def test_launcher_checks(emu):
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="static_scaled_fp8_quant: group sizes"):
        emu.static_scaled_fp8_quant(poisoned((4, 16)), x, torch.rand(3), 3, 16)
    with pytest.raises(RuntimeError, match="scale must have one element per token"):
        emu.dynamic_per_token_scaled_fp8_quant(poisoned((4, 16)), x, torch.empty(3), None)
    with pytest.raises(RuntimeError, match="output_s elements overlap"):
        emu.per_token_group_fp8_quant(x, poisoned((4, 16)), torch.empty(1, 2).expand(4, 2), 8,
                                      1e-10, -448.0, 448.0, False)
    with pytest.raises(RuntimeError, match="result must be float8_e4m3fn"):
        emu.dynamic_scaled_fp8_quant(torch.empty(4, 16), x, torch.empty(1))
