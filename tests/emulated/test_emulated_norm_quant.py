"""csrc/layernorm_quant_kernels.cu (RMSNorm + FP8 / INT8 quantization) host-compiled and run in
the cooperative schedule (block reductions, shuffles, shared memory), against the references.

Two kinds of byte-exact checks:
* rows whose normalization is exact (mean square a power of 4, epsilon 0: the reciprocal square
  root is a power of two whatever the reduction order or rsqrtf), against the reference;
* any rows, against the emulated rms_norm / fused_add_rms_norm_out kernels followed by the
  reference quantization: the fused kernels accumulate the sum of squares in the same order as
  our rms_norm kernels, so the normalized values must be bit-identical.
Every path is covered: a warp per row and a block per row, 128-bit packs and one element per
access (misaligned rows), the two-pass kernel for long rows, groups of up to 32 packs (segmented
shuffles) and of 64 / 128 elements on the element-wise path (shared memory).
"""

import pytest
import torch

from compile_ops import norm_quant as nq
from compile_ops._fp8 import FP8_DTYPE, FP8_MIN_SCALE, INT8_MIN_SCALE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["static", "static_add", "token", "token_res", "group64", "group128_res"]
# (hidden, row pad): warp per row 128-bit / element-wise, block per row 128-bit / element-wise
# (768 + pad 3: 192 threads, groups spanning warps), two-pass (8448: past the register budget
# in every dtype, element-wise: 2112 elements > 2048; 128-bit fp32: 2112 packs > 2048).
LAYOUTS = [(256, 0), (256, 3), (2048, 0), (768, 3), (8448, 1), (8448, 0)]


def codes(t):
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def exact_rows(rows, hidden, dtype, gen, k=0):
    """Rows of mean square exactly 4**k: per row H/16 entries of +-3, 7H/16 of +-1, the rest 0,
    shuffled, times 2**k (all representable in every dtype)."""
    assert hidden % 16 == 0
    base = torch.cat([torch.full((hidden // 16,), 3.0), torch.ones(7 * hidden // 16),
                      torch.zeros(hidden // 2)])
    out = torch.empty(rows, hidden)
    for i in range(rows):
        perm = torch.randperm(hidden, generator=gen)
        sign = torch.randint(0, 2, (hidden,), generator=gen) * 2 - 1
        out[i] = base[perm] * sign * 2.0 ** (k + i % 3)
    return out.to(dtype)


def layout_rows(x, pad):
    """x [rows, hidden] copied into a row slice of a wider tensor (row stride hidden + pad)."""
    if pad == 0:
        return x.clone()
    base = torch.randn(x.size(0), x.size(1) + pad).to(x.dtype)
    v = base[:, pad:]
    v.copy_(x)
    return v


def run_op(emu, op, x, w, r, eps, qdtype, scale_ub=None, static_scale=None, transposed=False):
    """Run one launcher; returns (q, scale, residual after)."""
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=FP8_DTYPE if op.startswith("static") else qdtype)
    if op == "static":
        emu.rms_norm_static_fp8_quant(out, x, w, static_scale, eps)
        return out, static_scale, None
    if op == "static_add":
        emu.fused_add_rms_norm_static_fp8_quant(out, x, r, w, static_scale, eps)
        return out, static_scale, r
    if op.startswith("token"):
        sc = torch.full((rows, 1), float("nan"))
        emu.rms_norm_dynamic_per_token_quant(out, x, w, sc, eps, scale_ub, r)
        return out, sc, r
    gs = 64 if op.startswith("group64") else 128
    g = hidden // gs
    sc = (torch.full((g, rows), float("nan")).t() if transposed
          else torch.full((rows, g), float("nan")))
    emu.rms_norm_per_block_quant(out, x, w, sc, eps, scale_ub, r, gs, transposed)
    return out, sc, r


def ref_op(op, x, w, r, eps, qdtype, scale_ub=None, static_scale=None):
    if op == "static":
        return nq.rms_norm_static_fp8_quant_ref(x, w, static_scale, eps), static_scale, None
    if op == "static_add":
        q, z = nq.fused_add_rms_norm_static_fp8_quant_ref(x, r, w, static_scale, eps)
        return q, static_scale, z
    if op.startswith("token"):
        return nq.rms_norm_dynamic_per_token_quant_ref(x, w, eps, qdtype, scale_ub, r)
    gs = 64 if op.startswith("group64") else 128
    return nq.rms_norm_per_block_quant_ref(x, w, eps, qdtype, gs, scale_ub, r)


def bits(t):
    """Float tensor as its bit patterns (equality that includes NaN)."""
    t = t.contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check_equal(got, want, op):
    q, s, r = got
    wq, ws, wr = want
    assert torch.equal(codes(q), codes(wq)), f"{op}: codes differ at " \
        f"{(codes(q) != codes(wq)).nonzero()[:4].tolist()}"
    assert torch.equal(bits(s), bits(ws.reshape(s.shape))), f"{op}: scales differ"
    if wr is not None:  # NaN payloads may differ (the CUDA conversions' canonical NaN)
        torch.testing.assert_close(r, wr, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{op}: residual differs")


def make_inputs(op, rows, hidden, pad, dtype, gen, exact):
    has_res = op in ("static_add", "token_res", "group128_res")
    if exact:
        z = exact_rows(rows, hidden, dtype, gen, k=-1)
        if has_res:  # x + r == z exactly (halves of representable values)
            x, r = layout_rows(z * 0.5, pad), (z * 0.5).contiguous()
        else:
            x, r = layout_rows(z, pad), None
    else:
        x = layout_rows(torch.randn(rows, hidden, generator=gen).to(dtype), pad)
        r = torch.randn(rows, hidden, generator=gen).to(dtype) if has_res else None
    w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dtype)
    return x, w, r


def test_sequential_schedule_refuses_barriers(emu):
    x, w = torch.randn(2, 64), torch.ones(64)
    with pytest.raises(RuntimeError, match="set_cooperative"):
        emu.rms_norm_dynamic_per_token_quant(torch.empty(2, 64, dtype=torch.int8), x, w,
                                             torch.empty(2, 1), 1e-6, None, None)


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("hidden,pad", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_exact_rows_bytes(coop, op, dtype, hidden, pad, qdtype, gen):
    """Exact normalization: every code, scale and residual equals the reference."""
    if op.startswith("static") and qdtype == torch.int8:
        pytest.skip("static ops are FP8 only")
    rows = 3 if hidden < 8000 else 2
    x, w, r = make_inputs(op, rows, hidden, pad, dtype, gen, exact=True)
    st = torch.tensor([0.0625])
    want = ref_op(op, x, w, None if r is None else r.clone(), 0.0, qdtype, static_scale=st)
    got = run_op(coop, op, x, w, r, 0.0, qdtype, static_scale=st)
    check_equal(got, want, op)


def rms_norm_then_quant(emu, op, x, w, r, eps, qdtype, scale_ub=None, static_scale=None):
    """Emulated rms_norm (fused_add_rms_norm_out for the dynamic ops' fp32 residual sum, rms_norm
    of the rounded sum for the static fused op) into fresh contiguous rows, then the reference
    quantization: what the fused kernels must reproduce bit for bit."""
    n = torch.empty(x.shape, dtype=x.dtype)
    res = None
    if r is not None and op == "static_add":
        res = (x.float() + r.float()).to(x.dtype)
        src = layout_rows(res, x.stride(0) - x.size(1))  # the input's layout
        emu.rms_norm(n, src, w, eps)
    elif r is not None:
        res = torch.empty(x.shape, dtype=x.dtype)
        emu.fused_add_rms_norm_out(n, res, x, r, w, eps)
    else:
        emu.rms_norm(n, x, w, eps)
    if op.startswith("static"):
        return nq.static_fp8_quant_ref(n, static_scale), static_scale, res
    gs = None if op.startswith("token") else (64 if op.startswith("group64") else 128)
    q, s = nq.dynamic_quant_ref(n, qdtype, gs, scale_ub)
    return q, s, res


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("hidden,pad", LAYOUTS[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_same_bytes_as_rms_norm_kernel(coop, op, dtype, hidden, pad, qdtype, gen):
    """Random rows: bit-identical to our (emulated) rms_norm kernel + the reference quant."""
    if op.startswith("static") and qdtype == torch.int8:
        pytest.skip("static ops are FP8 only")
    x, w, r = make_inputs(op, 3, hidden, pad, dtype, gen, exact=False)
    st = torch.tensor([0.02])
    want = rms_norm_then_quant(coop, op, x, w, None if r is None else r.clone(), 1e-6, qdtype,
                               static_scale=st)
    got = run_op(coop, op, x, w, r, 1e-6, qdtype, static_scale=st)
    check_equal(got, want, op)


@pytest.mark.parametrize("hidden,pad", [(256, 0), (256, 3), (8448, 1)])
@pytest.mark.parametrize("op", OPS)
def test_nan_inf_zero_rows_and_scale_ub(coop, op, hidden, pad, gen):
    """A zero row (minimum scale, zero codes), a row with a NaN (all NaN: codes +448 / int8 0),
    a row with an inf (NaN there, zeros elsewhere), a huge row, a normal row; scale_ub capping
    the amax of the dynamic FP8 ops."""
    dtype = torch.bfloat16
    x = torch.randn(5, hidden, generator=gen)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3] *= 1e30
    x = layout_rows(x.to(dtype), pad)
    w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dtype)
    r = torch.randn(5, hidden, generator=gen).to(dtype) if op.endswith(("_res", "_add")) else None
    if r is not None:
        r[0] = 0
    st = torch.tensor([0.5])
    for qdtype, ub in ((FP8_DTYPE, None), (FP8_DTYPE, torch.tensor([0.25])), (torch.int8, None)):
        if op.startswith("static") and (qdtype == torch.int8 or ub is not None):
            continue
        want = rms_norm_then_quant(coop, op, x, w, None if r is None else r.clone(), 1e-6,
                                   qdtype, ub, st)
        got = run_op(coop, op, x, w, None if r is None else r.clone(), 1e-6, qdtype, ub, st)
        check_equal(got, want, f"{op} {qdtype} ub={ub}")
        q = codes(got[0])
        if op.startswith("static") or qdtype == FP8_DTYPE:
            assert (q[1] == 0x7E).all(), "a NaN row must become +448"
        else:
            assert (q[1] == 0).all(), "a NaN row must become int8 0"
        if not op.startswith("static") and r is None:
            mins = FP8_MIN_SCALE if qdtype == FP8_DTYPE else INT8_MIN_SCALE
            assert (got[1][0] == mins).all() and (q[0] & 0x7F == 0).all()  # +-0
        if ub is not None:
            assert (got[1] <= 0.25 / 448 * (1 + 2 ** -23)).all()


@pytest.mark.parametrize("tokens,stride", [(5, 5), (5, 8), (1, 4), (6, 8)])
def test_per_block_transposed_scales(coop, tokens, stride, gen):
    """Column-major [tokens, groups] scales (stride (1, S), S >= tokens; TMA-aligned
    S = round_up(tokens, 4)): every scale at g * S + t, the padding never written."""
    hidden, gs = 512, 128
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    w = torch.randn(hidden, generator=gen).to(torch.bfloat16)
    buf = torch.full((hidden // gs * stride,), float("nan"))
    sc = buf.as_strided((tokens, hidden // gs), (1, stride))
    out = torch.empty(tokens, hidden, dtype=FP8_DTYPE)
    coop.rms_norm_per_block_quant(out, x, w, sc, 1e-6, None, None, gs, True)
    q, s = rms_norm_then_quant(coop, "group128", x, w, None, 1e-6, FP8_DTYPE)[:2]
    assert torch.equal(codes(out), codes(q)) and torch.equal(sc, s)
    pad = buf.view(hidden // gs, stride)[:, tokens:]
    assert pad.isnan().all(), "wrote into the scale padding"


@pytest.mark.parametrize("bad", ["result_dtype", "static_int8", "scale_shape", "group_size",
                                 "hidden_not_multiple", "transposed_stride", "ub_int8",
                                 "residual_dtype", "result_strided"])
def test_launcher_checks(emu, bad):
    # The C++ launchers' own checks, for callers that bypass the Python layer.
    x, w = torch.randn(4, 128), torch.randn(128)
    out8, fp8 = torch.empty(4, 128, dtype=torch.int8), torch.empty(4, 128, dtype=FP8_DTYPE)
    sc = torch.empty(4, 1)
    calls = {
        "result_dtype": (lambda: emu.rms_norm_dynamic_per_token_quant(
            torch.empty(4, 128), x, w, sc, 1e-6, None, None), "result must have dtype"),
        "static_int8": (lambda: emu.rms_norm_static_fp8_quant(out8, x, w, torch.ones(1), 1e-6),
                        "result must have dtype float8_e4m3fn"),
        "scale_shape": (lambda: emu.rms_norm_dynamic_per_token_quant(
            fp8, x, w, torch.empty(3, 1), 1e-6, None, None), "one per token"),
        "group_size": (lambda: emu.rms_norm_per_block_quant(
            fp8, x, w, torch.empty(4, 4), 1e-6, None, None, 32, False), "group_size must be"),
        "hidden_not_multiple": (lambda: emu.rms_norm_per_block_quant(
            torch.empty(4, 96, dtype=FP8_DTYPE), torch.randn(4, 96), torch.randn(96),
            torch.empty(4, 1), 1e-6, None, None, 64, False), "multiple of group_size"),
        "transposed_stride": (lambda: emu.rms_norm_per_block_quant(
            torch.empty(4, 256, dtype=FP8_DTYPE), torch.randn(4, 256), torch.randn(256),
            torch.empty(4, 2), 1e-6, None, None, 128, True), "column-major"),
        "ub_int8": (lambda: emu.rms_norm_dynamic_per_token_quant(
            out8, x, w, sc, 1e-6, torch.ones(1), None), "scale_ub is only supported"),
        "residual_dtype": (lambda: emu.rms_norm_dynamic_per_token_quant(
            fp8, x, w, sc, 1e-6, None, x.half()), "residual must have dtype"),
        "result_strided": (lambda: emu.rms_norm_static_fp8_quant(
            torch.empty(4, 256, dtype=FP8_DTYPE)[:, :128], x, w, torch.ones(1), 1e-6),
            "result must be contiguous"),
    }
    call, match = calls[bad]
    with pytest.raises(RuntimeError, match=match):
        call()
