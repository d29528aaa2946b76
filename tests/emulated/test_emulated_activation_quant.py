"""csrc/activation_quant_kernels.cu host-compiled and emulated (conftest.py) against the
references: silu_and_mul_quant (threads independent: the sequential schedule) and
silu_and_mul_per_block_quant (group amax over warp shuffles: the cooperative schedule), on the
vector (16-byte aligned rows) and the scalar (misaligned rows) paths.

The emulation evaluates expf with the host's libm and the reference with PyTorch's CPU exp; the
two may differ by an ulp, which can move a value across an FP8 / INT8 rounding boundary or a
scale by an ulp. So the outputs must be equal up to one code (and scales to 2 ulps), and the
number of differing bytes is reported (pytest -s); in practice it is zero. On the GPU the
kernels and the reference share the device's expf and must match byte for byte
(tests/ops/test_activation_quant.py).
"""

import pytest
import torch

from compile_ops.activation_quant import (silu_and_mul_per_block_quant_ref,
                                          silu_and_mul_quant_ref)
from compile_ops.testing import ordered_codes as ordered, special_gate_up_rows

FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def compare_codes(got, exp, what):
    diff = (ordered(got) - ordered(exp)).abs()
    n = int((diff != 0).sum())
    print(f"{what}: {n} of {diff.numel()} bytes differ from the reference")
    assert diff.numel() == 0 or int(diff.max()) <= 1, what
    assert n <= max(1, diff.numel() // 100), what


def compare_scales(got, exp, what):
    n = int((got != exp).sum() - ((got != got) & (exp != exp)).sum())
    print(f"{what}: {n} of {got.numel()} scales differ")
    torch.testing.assert_close(got, exp, rtol=2.5e-7, atol=0, equal_nan=True)


def rows(tokens, width, dtype, row_pad, gen, scale=1.0):
    base = (torch.randn(tokens, width + row_pad, generator=gen) * scale).to(dtype)
    return base[:, :width] if row_pad else base


# ---------------------------------------------------------------------------------------------
# silu_and_mul_quant: elementwise, sequential schedule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 24, 77, 520])
@pytest.mark.parametrize("row_pad", [0, 8, 1])  # aligned, aligned strided, misaligned (scalar)
def test_silu_and_mul_quant(emu, dtype, d, row_pad, gen):
    x = rows(5, 2 * d, dtype, row_pad, gen, scale=4.0)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    for sc in (0.02, -0.7, 0.0):
        scale = torch.tensor([sc])
        out = torch.full((5, d), 0.5).to(FP8)
        emu.silu_and_mul_quant(out, x, scale)
        compare_codes(out, silu_and_mul_quant_ref(x, scale), f"{dtype} d={d} pad={row_pad}")


def test_silu_and_mul_quant_3d_and_misaligned_out(emu, gen):
    x = rows(6, 2 * 64, torch.bfloat16, 0, gen).view(2, 3, 128)
    buf = torch.zeros(2 * 3 * 64 + 1, dtype=torch.uint8)
    out = buf[1:].view(FP8).view(2, 3, 64)  # 1-byte offset: the scalar store path
    scale = torch.tensor(0.05)
    emu.silu_and_mul_quant(out, x, scale)
    compare_codes(out, silu_and_mul_quant_ref(x, scale), "3-d, misaligned out")
    assert buf[0] == 0


def test_silu_and_mul_quant_checks(emu):
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="result must be float8_e4m3fn"):
        emu.silu_and_mul_quant(torch.empty(4, 32), x, torch.ones(1))
    with pytest.raises(RuntimeError, match="scale must hold one value"):
        emu.silu_and_mul_quant(torch.empty(4, 32, dtype=FP8), x, torch.ones(2))
    with pytest.raises(RuntimeError, match="result must be contiguous"):
        emu.silu_and_mul_quant(torch.empty(4, 64, dtype=FP8)[:, :32], x, torch.ones(1))
    emu.silu_and_mul_quant(torch.empty(0, 32, dtype=FP8), torch.empty(0, 64), torch.ones(1))


# ---------------------------------------------------------------------------------------------
# silu_and_mul_per_block_quant: group reduction by shuffles, cooperative schedule
# ---------------------------------------------------------------------------------------------
def run_block(emu, x, gs, qdtype, ub, transposed):
    tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.full((tokens, d), 3, dtype=torch.uint8).view(qdtype)
    if transposed:
        s = torch.full((d // gs, tokens), -1.0).t()
    else:
        s = torch.full((tokens, d // gs), -1.0)
    emu.silu_and_mul_per_block_quant(out, x, s, gs, ub, transposed)
    return out, s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("row_pad", [0, 8, 3])
def test_per_block(coop, dtype, gs, row_pad, gen):
    tokens, d = 3, 2 * gs
    x = rows(tokens, 2 * d, dtype, row_pad, gen, scale=2.0)
    for qdtype in (FP8, torch.int8):
        for transposed in (False, True):
            for ub in ([None, torch.tensor([0.003])] if qdtype == FP8 else [None]):
                q, s = run_block(coop, x, gs, qdtype, ub, transposed)
                eq, es = silu_and_mul_per_block_quant_ref(x, gs, qdtype, ub)
                what = f"{dtype} gs={gs} pad={row_pad} {qdtype} t={transposed} ub={ub}"
                compare_codes(q, eq, what)
                compare_scales(s, es, what)


def test_per_block_several_ctas(coop, gen):
    # 9 tokens x 5 groups of 64 in fp32: 16 lanes a group, 45 groups over 3 CTAs of 256 threads
    # (the last one partly past the end), misaligned rows: the scalar path.
    x = rows(9, 2 * 320, torch.float32, 1, gen)
    for transposed in (False, True):
        q, s = run_block(coop, x, 64, FP8, None, transposed)
        eq, es = silu_and_mul_per_block_quant_ref(x, 64)
        compare_codes(q, eq, f"several CTAs t={transposed}")
        compare_scales(s, es, "several CTAs")


@pytest.mark.parametrize("qdtype", [FP8, torch.int8])
def test_per_block_special_groups(coop, qdtype):
    gs = 64
    x = special_gate_up_rows(gs, 6, generator=torch.Generator().manual_seed(3)).bfloat16()
    for transposed in (False, True):
        for ub in ([None, torch.tensor(0.25)] if qdtype == FP8 else [None]):
            q, s = run_block(coop, x, gs, qdtype, ub, transposed)
            eq, es = silu_and_mul_per_block_quant_ref(x, gs, qdtype, ub)
            compare_codes(q, eq, f"special {qdtype} t={transposed} ub={ub}")
            compare_scales(s, es, "special")


def test_per_block_checks(coop):
    x = torch.randn(4, 256).half()
    o = torch.empty(4, 128, dtype=FP8)
    with pytest.raises(RuntimeError, match="group_size must be 64 or 128"):
        coop.silu_and_mul_per_block_quant(o, x, torch.empty(4, 4), 32, None, False)
    with pytest.raises(RuntimeError, match="scales must have strides"):
        coop.silu_and_mul_per_block_quant(o, x, torch.empty(4, 2), 64, None, True)
    with pytest.raises(RuntimeError, match="scale_ub is only supported"):
        coop.silu_and_mul_per_block_quant(o.view(torch.int8), x, torch.empty(4, 2), 64,
                                          torch.ones(1), False)
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        coop.silu_and_mul_per_block_quant(o.view(1, 4, 128), x.view(1, 4, 256),
                                          torch.empty(4, 2), 64, None, False)
    coop.silu_and_mul_per_block_quant(torch.empty(0, 128, dtype=FP8), torch.empty(0, 256),
                                      torch.empty(0, 2), 64, None, False)


def test_per_block_needs_cooperative(emu):
    with pytest.raises(RuntimeError, match="set_cooperative"):
        emu.silu_and_mul_per_block_quant(torch.empty(1, 64, dtype=FP8), torch.randn(1, 128),
                                         torch.empty(1, 1), 64, None, False)
