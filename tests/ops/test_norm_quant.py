"""RMSNorm + FP8 / INT8 quantization ops (rms_norm_static_fp8_quant,
fused_add_rms_norm_static_fp8_quant, rms_norm_dynamic_per_token_quant, rms_norm_per_block_quant):
reference vs an independent oracle, registered ops on CPU, fake, opcheck, compile, errors, CUDA.
"""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import compile_ops
from compile_ops import norm_quant as nq
from compile_ops._fp8 import FP8_DTYPE
from compile_ops.testing import assert_raises_eager_and_fake, quant_mismatch, rows_tensor

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QDTYPES = [FP8_DTYPE, torch.int8]
EPS = 1e-6
GPU_TOKENS = [1, 7, 128, 4099]
GPU_HIDDEN = [8, 768, 769, 4096, 5120, 8192]
ROW_PADS = [0, 64, 11]


# ---------------------------------------------------------------------------------------------
# Independent oracle (the spec's formulas, float64 arithmetic rounded to float32 where the
# kernels round, and an FP8 encoder by table look-up rather than torch's cast)
# ---------------------------------------------------------------------------------------------
_FP8_POS = torch.arange(127, dtype=torch.uint8).view(FP8_DTYPE).double()  # codes 0..0x7E


def fp8_codes_oracle(v32: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3fn codes: fmaxf(-448, fminf(v, 448)) (NaN -> +448), nearest, ties to the
    even code, sign kept (also for values that round to zero)."""
    v = v32.double().flatten()
    neg = torch.signbit(v) & ~torch.isnan(v)
    a = torch.where(torch.isnan(v), torch.full_like(v, 448.0), v.abs().clamp(max=448.0))
    hi = torch.searchsorted(_FP8_POS, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - _FP8_POS[lo], _FP8_POS[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    return (code + neg.long() * 128).to(torch.uint8).view(v32.shape)


def int8_oracle(v32: torch.Tensor) -> torch.Tensor:
    v = v32.double().nan_to_num(nan=0.0, posinf=1e9, neginf=-1e9).clamp(-128, 127)
    return torch.tensor(v.numpy().round(), dtype=torch.int8) if v.numel() else v.to(torch.int8)


def f32(t):
    return t.double().float()


def quant_oracle(n, mode, qdtype=FP8_DTYPE, scale=None, group=None, ub=None):
    """(codes, scales) from the normalized n [rows, H] (dtype T) by the spec's formulas."""
    v = n.double()
    if mode == "static":
        inv = f32(1.0 / scale.double().reshape(()))
        return fp8_codes_oracle(f32(v * inv.double())), None
    rows, h = n.shape
    gs = h if group is None else group
    g = v.reshape(rows, h // gs, gs)
    amax = g.abs().nan_to_num(nan=0.0).amax(-1, keepdim=True)
    if ub is not None:
        amax = torch.minimum(amax, ub.double().reshape(()))
    qmax, mins = (448.0, 1 / (448 * 512)) if qdtype == FP8_DTYPE else (127.0, 2.0 ** -23)
    s = f32(amax / qmax).double().clamp(min=float(torch.tensor(mins, dtype=torch.float32)))
    if qdtype == FP8_DTYPE:
        q = fp8_codes_oracle(f32(g / s)).reshape(rows, h)
    else:
        q = int8_oracle(f32(g * f32(1.0 / s).double())).reshape(rows, h)
    return q, s.float().reshape(rows, -1)


def codes(t):
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def same(a, b):
    """Bitwise equality of two float tensors (NaN included)."""
    ints = {2: torch.int16, 4: torch.int32}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()]))


def special_rows(tokens, hidden, dtype, gen):
    """Random rows plus a zero row, a row with a NaN, one with an inf and a huge one."""
    x = torch.randn(tokens, hidden, generator=gen) * 3
    if tokens >= 5:
        x[1] = 0
        x[2, hidden // 2] = float("nan")
        x[3, 0] = float("inf")
        x[4] *= 1e4
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Reference vs oracle (CPU): every code, scale and residual
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,hidden", [(1, 128), (7, 768), (33, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_references_match_oracle(tokens, hidden, dtype, gen):
    x = special_rows(tokens, hidden, dtype, gen)
    r = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dtype)
    for s in (0.01, 1.0, 10.0):
        scale = torch.tensor([s])
        n = compile_ops.rms_norm(x, w, EPS)  # the registered rms_norm op on CPU
        q = nq.rms_norm_static_fp8_quant_ref(x, w, scale, EPS)
        assert torch.equal(codes(q), quant_oracle(n, "static", scale=scale)[0])
        q2, z = nq.fused_add_rms_norm_static_fp8_quant_ref(x, r, w, scale, EPS)
        z_want = (x.double() + r.double()).to(dtype)  # the sum rounded once to the dtype
        assert same(z, z_want)
        n2 = compile_ops.rms_norm(z_want, w, EPS)  # normalized from the ROUNDED sum
        assert torch.equal(codes(q2), quant_oracle(n2, "static", scale=scale)[0])


@pytest.mark.parametrize("group", [None, 64, 128], ids=["token", "g64", "g128"])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_references_match_oracle(dtype, qdtype, group, gen):
    tokens, hidden = 7, 768
    x = special_rows(tokens, hidden, dtype, gen)
    r = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dtype)
    ubs = [None, torch.tensor([0.5])] if qdtype == FP8_DTYPE else [None]
    for ub, res in itertools.product(ubs, [None, r]):
        if group is None:
            q, s, ro = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, qdtype, ub, res)
        else:
            q, s, ro = nq.rms_norm_per_block_quant_ref(x, w, EPS, qdtype, group, ub, res)
        if res is None:
            n = compile_ops.rms_norm(x, w, EPS)
            assert ro is None
        else:  # the fp32 (unrounded) sum: exactly our fused_add_rms_norm's output
            n, z = compile_ops.fused_add_rms_norm_out(x, res, w, EPS)
            assert same(ro, z) and same(z, (x.double() + r.double()).to(dtype))
        wq, ws = quant_oracle(n, "dyn", qdtype, group=group, ub=ub)
        assert torch.equal(codes(q), wq), f"ub={ub} res={res is not None}"
        assert torch.equal(s, ws)
        assert s.shape == (tokens, 1 if group is None else hidden // group)
        if ub is not None:
            assert (s <= 0.5 / 448).all() and (codes(q)[5:].view(torch.int8).abs() <= 0x7E).all()


def test_special_row_semantics(gen):
    """Zero row: minimum scale, zero codes; NaN anywhere in a row: the whole row NaN -> FP8 +448
    (0x7E) / INT8 0, scale from amax 0; inf: that element NaN, the rest 0."""
    x = special_rows(5, 256, torch.bfloat16, gen)
    w = torch.ones(256, dtype=torch.bfloat16)
    q, s, _ = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, FP8_DTYPE)
    qi, si, _ = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, torch.int8)
    assert s[1].item() == compile_ops._fp8.FP8_MIN_SCALE and (codes(q[1]) == 0).all()
    assert si[1].item() == compile_ops._fp8.INT8_MIN_SCALE and (qi[1] == 0).all()
    assert (codes(q[2]) == 0x7E).all() and (qi[2] == 0).all()
    assert codes(q[3])[0] == 0x7E and (codes(q[3])[1:] & 0x7F == 0).all()  # +-0 elsewhere
    # the huge row is normalized like any other (no overflow: the sum of squares is float32)
    assert s[4].item() > 0 and (codes(q[4]) != 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 128), (7, 769), (5, 4096)])
def test_reference_dequantizes_close_to_float64(tokens, hidden, dtype, gen):
    x = rows_tensor(tokens, hidden, dtype, "cpu", generator=gen)
    w = rows_tensor(1, hidden, dtype, "cpu", generator=gen)[0]
    y = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS) * w.double()
    q, s, _ = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, FP8_DTYPE)
    amax = y.abs().amax(-1, keepdim=True)
    # one FP8 rounding (2**-4 relative) plus T's roundings of n; absolute for tiny values
    torch.testing.assert_close(q.double() * s.double(), y, rtol=0.07, atol=amax.max() * 2 ** -9)
    qi, si, _ = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, torch.int8)
    assert ((qi.double() * si.double() - y).abs() <= si.double() * 0.5 + amax * 0.02).all()


# ---------------------------------------------------------------------------------------------
# Registered ops on CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_ops_match_reference(dtype, row_pad, gen):
    x = rows_tensor(9, 256, dtype, "cpu", row_pad=row_pad, generator=gen)
    w = rows_tensor(1, 256, dtype, "cpu", generator=gen)[0]
    r = rows_tensor(9, 256, dtype, "cpu", generator=gen)
    scale = torch.tensor([0.05])
    out = torch.empty(9, 256, dtype=FP8_DTYPE)
    ops.rms_norm_static_fp8_quant(out, x, w, scale, EPS)
    assert torch.equal(codes(out), codes(nq.rms_norm_static_fp8_quant_ref(x, w, scale, EPS)))
    r1 = r.clone()
    ops.fused_add_rms_norm_static_fp8_quant(out, x, r1, w, scale, EPS)
    q, z = nq.fused_add_rms_norm_static_fp8_quant_ref(x, r, w, scale, EPS)
    assert torch.equal(codes(out), codes(q)) and torch.equal(r1, z)
    for qdtype, res in itertools.product(QDTYPES, [None, r]):
        res1 = None if res is None else res.clone()
        o = torch.empty(9, 256, dtype=qdtype)
        sc = torch.empty(9, 1)
        ops.rms_norm_dynamic_per_token_quant(o, x, w, sc, EPS, None, res1)
        wq, ws, wr = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, qdtype, None, res)
        assert torch.equal(codes(o), codes(wq)) and torch.equal(sc, ws)
        if res is not None:
            assert torch.equal(res1, wr)
        for transposed in (False, True):
            res1 = None if res is None else res.clone()
            sc = torch.empty(2, 9).t() if transposed else torch.empty(9, 2)
            ops.rms_norm_per_block_quant(o, x, w, sc, EPS, None, res1, 128, transposed)
            wq, ws, wr = nq.rms_norm_per_block_quant_ref(x, w, EPS, qdtype, 128, None, res)
            assert torch.equal(codes(o), codes(wq)) and torch.equal(sc, ws)
            if res is not None:
                assert torch.equal(res1, wr)


def test_functional_wrappers(gen):
    x = torch.randn(2, 3, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(256, generator=gen).to(torch.bfloat16)
    r = torch.randn(2, 3, 256, generator=gen).to(torch.bfloat16)
    out, s = nq.rms_norm_dynamic_per_token_quant(x, w, EPS, FP8_DTYPE)
    assert out.shape == x.shape and out.dtype == FP8_DTYPE and s.shape == (6, 1)
    wq, ws, _ = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, FP8_DTYPE)
    assert torch.equal(codes(out), codes(wq)) and torch.equal(s, ws)
    r1 = r.clone()
    out, s = nq.rms_norm_dynamic_per_token_quant(x, w, EPS, torch.int8, residual=r1)
    wq, ws, wr = nq.rms_norm_dynamic_per_token_quant_ref(x, w, EPS, torch.int8, None, r)
    assert torch.equal(out, wq) and torch.equal(r1, wr), "residual updated in place"
    for transposed, tma, gs in ((False, 0, 64), (True, 0, [1, 128]), (True, 4, 128)):
        out, s = nq.rms_norm_per_block_quant(x, w, EPS, FP8_DTYPE, gs, None, None, transposed,
                                             tma)
        g = gs if isinstance(gs, int) else gs[1]
        assert s.shape == (6, 256 // g)
        want_stride = (1, 8 if tma else 6) if transposed else (256 // g, 1)
        assert s.stride() == want_stride
        wq, ws, _ = nq.rms_norm_per_block_quant_ref(x, w, EPS, FP8_DTYPE, g)
        assert torch.equal(codes(out), codes(wq)) and torch.equal(s, ws)
    scale = torch.tensor([0.1])
    assert torch.equal(codes(nq.rms_norm_static_fp8_quant(x, w, scale, EPS)),
                       codes(nq.rms_norm_static_fp8_quant_ref(x, w, scale, EPS)))
    r1 = r.clone()
    q = nq.fused_add_rms_norm_static_fp8_quant(x, r1, w, scale, EPS)
    wq, wz = nq.fused_add_rms_norm_static_fp8_quant_ref(x, r, w, scale, EPS)
    assert torch.equal(codes(q), codes(wq)) and torch.equal(r1, wz)


def test_zero_tokens_and_empty_rows():
    w = torch.ones(128)
    out, s = nq.rms_norm_dynamic_per_token_quant(torch.empty(0, 128), w, EPS, FP8_DTYPE)
    assert out.shape == (0, 128) and s.shape == (0, 1)
    out, s = nq.rms_norm_per_block_quant(torch.empty(0, 128), w, EPS, FP8_DTYPE, 64, None,
                                         None, True, 4)
    assert out.shape == (0, 128) and s.shape == (0, 2)
    out, s = nq.rms_norm_dynamic_per_token_quant(torch.empty(3, 0), torch.ones(0), EPS,
                                                 torch.int8)
    assert out.shape == (3, 0) and (s == compile_ops._fp8.INT8_MIN_SCALE).all()


def test_schemas_are_vllms():
    want = {
        "rms_norm_static_fp8_quant": "(Tensor(a0!) result, Tensor input, Tensor weight, "
                                     "Tensor scale, float epsilon) -> ()",
        "fused_add_rms_norm_static_fp8_quant": "(Tensor(a0!) result, Tensor input, "
                                               "Tensor(a2!) residual, Tensor weight, "
                                               "Tensor scale, float epsilon) -> ()",
        "rms_norm_dynamic_per_token_quant": "(Tensor(a0!) result, Tensor input, Tensor weight, "
                                            "Tensor(a3!) scale, float epsilon, Tensor? scale_ub, "
                                            "Tensor(a6!)? residual) -> ()",
        "rms_norm_per_block_quant": "(Tensor(a0!) result, Tensor input, Tensor weight, "
                                    "Tensor(a3!) scale, float epsilon, Tensor? scale_ub, "
                                    "Tensor(a6!)? residual, int group_size, "
                                    "bool is_scale_transposed) -> ()",
    }
    for name, schema in want.items():
        assert str(getattr(ops, name).default._schema) == f"compile_ops::{name}{schema}"


# ---------------------------------------------------------------------------------------------
# opcheck, fake kernels, errors
# ---------------------------------------------------------------------------------------------
def _op_samples(device, gen):
    for dtype, (tokens, hidden), pad in [(torch.bfloat16, (7, 256), 0),
                                         (torch.float32, (1, 128), 11),
                                         (torch.float16, (16, 768), 64)]:
        x = rows_tensor(tokens, hidden, dtype, device, row_pad=pad, generator=gen)
        r = rows_tensor(tokens, hidden, dtype, device, generator=gen)
        w = rows_tensor(1, hidden, dtype, device, generator=gen)[0]
        scale = torch.tensor([0.1], device=device)
        ub = torch.tensor([1.0], device=device)
        fp8 = torch.empty(tokens, hidden, dtype=FP8_DTYPE, device=device)
        i8 = torch.empty(tokens, hidden, dtype=torch.int8, device=device)
        sc = torch.empty(tokens, 1, device=device)
        g = hidden // 128
        yield ops.rms_norm_static_fp8_quant.default, (fp8, x, w, scale, EPS)
        yield ops.fused_add_rms_norm_static_fp8_quant.default, (fp8, x, r.clone(), w, scale, EPS)
        yield ops.rms_norm_dynamic_per_token_quant.default, (fp8, x, w, sc, EPS, ub, r.clone())
        yield ops.rms_norm_dynamic_per_token_quant.default, (i8, x, w, sc, EPS, None, None)
        yield ops.rms_norm_per_block_quant.default, (
            fp8, x, w, torch.empty(tokens, g, device=device), EPS, None, r.clone(), 128, False)
        yield ops.rms_norm_per_block_quant.default, (
            i8, x, w, torch.empty(g, tokens, device=device).t(), EPS, None, None, 128, True)


# opcheck's test_schema compares the mutated tensors with arithmetic that float8 lacks on the
# CPU ("mul_cpu_reduced_float" not implemented for Float8_e4m3fn): skipped for FP8 results.
_NO_SCHEMA = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _opcheck(op, args):
    fp8 = args[0].dtype == FP8_DTYPE and args[0].device.type == "cpu"
    torch.library.opcheck(op, args, test_utils=_NO_SCHEMA if fp8 else
                          ("test_schema",) + _NO_SCHEMA)


def test_opcheck_cpu(gen):
    for op, args in _op_samples("cpu", gen):
        _opcheck(op, args)


def test_fake_matches_real_metadata(gen):
    x = rows_tensor(6, 256, torch.bfloat16, "cpu", row_pad=64, generator=gen)
    w = torch.ones(256, dtype=torch.bfloat16)
    r = rows_tensor(6, 256, torch.bfloat16, "cpu", generator=gen)
    real = [nq.rms_norm_dynamic_per_token_quant(x, w, EPS, FP8_DTYPE, None, r.clone()),
            nq.rms_norm_per_block_quant(x, w, EPS, torch.int8, 64, None, r.clone(), True, 4)]
    with FakeTensorMode() as mode:
        fx, fw, fr = (mode.from_tensor(t) for t in (x, w, r))
        fake = [nq.rms_norm_dynamic_per_token_quant(fx, fw, EPS, FP8_DTYPE, None, fr),
                nq.rms_norm_per_block_quant(fx, fw, EPS, torch.int8, 64, None, fr, True, 4)]
    for a_pair, b_pair in zip(real, fake):
        for a, b in zip(a_pair, b_pair):
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def _bad_calls():
    """(id, call, exception, message fragment, tensors that must stay untouched)."""
    x = torch.randn(4, 128)
    w = torch.randn(128)
    fp8 = lambda *s: torch.zeros(*(s or (4, 128)), dtype=FP8_DTYPE)  # noqa: E731
    i8 = torch.zeros(4, 128, dtype=torch.int8)
    sc = torch.zeros(4, 1)
    one = torch.ones(1)
    st, dyn, blk = (ops.rms_norm_static_fp8_quant, ops.rms_norm_dynamic_per_token_quant,
                    ops.rms_norm_per_block_quant)
    add = ops.fused_add_rms_norm_static_fp8_quant
    return [
        ("result_int8_static", lambda o: st(o, x, w, one, EPS), i8, TypeError,
         "result must have dtype torch.float8_e4m3fn"),
        ("result_float", lambda o: dyn(o, x, w, sc, EPS, None, None), torch.zeros(4, 128),
         TypeError, "result must have dtype"),
        ("result_shape", lambda o: st(o, x, w, one, EPS), fp8(4, 127), ValueError,
         "result must have the shape of input"),
        ("result_strided", lambda o: st(o[:, :128], x, w, one, EPS), fp8(4, 256), ValueError,
         "result must be contiguous"),
        ("input_int", lambda o: st(o, x.int(), w, one, EPS), fp8(), TypeError,
         "input must be float32, float16 or bfloat16"),
        ("weight_none", lambda o: st(o, x, None, one, EPS), fp8(), TypeError,
         "weight must be a torch.Tensor"),
        ("weight_dtype", lambda o: dyn(o, x, w.half(), sc, EPS, None, None), fp8(), TypeError,
         "weight must have dtype torch.float32"),
        ("weight_size", lambda o: st(o, x, torch.randn(64), one, EPS), fp8(), ValueError,
         "weight must be a 1-D tensor of size 128"),
        ("scale_dtype", lambda o: st(o, x, w, one.double(), EPS), fp8(), TypeError,
         "scale must have dtype torch.float32"),
        ("scale_numel", lambda o: st(o, x, w, torch.ones(2), EPS), fp8(), ValueError,
         "scale must have exactly one element"),
        ("epsilon", lambda o: st(o, x, w, one, -1.0), fp8(), ValueError,
         "epsilon must be finite and >= 0"),
        ("input_transposed", lambda o: st(o, torch.randn(128, 4).t(), w, one, EPS), fp8(),
         ValueError, "input must be contiguous in its last dimension"),
        ("residual_dtype", lambda o: add(o, x, x.half(), w, one, EPS), fp8(), TypeError,
         "residual must have dtype torch.float32"),
        ("residual_rows_overlap", lambda o: dyn(o, x, w, sc, EPS, None,
                                                torch.randn(1, 128).expand(4, 128)),
         fp8(), ValueError, "residual rows overlap"),
        ("token_scale_shape", lambda o: dyn(o, x, w, torch.zeros(3, 1), EPS, None, None), fp8(),
         ValueError, "one per token"),
        ("token_scale_dtype", lambda o: dyn(o, x, w, sc.half(), EPS, None, None), fp8(),
         TypeError, "scale must have dtype torch.float32"),
        ("scale_ub_int8", lambda o: dyn(o, x, w, sc, EPS, one, None), i8, ValueError,
         "scale_ub is only supported"),
        ("scale_ub_numel", lambda o: dyn(o, x, w, sc, EPS, torch.ones(2), None), fp8(),
         ValueError, "scale_ub must have exactly one element"),
        ("group_size", lambda o: blk(o, x, w, torch.zeros(4, 4), EPS, None, None, 32, False),
         fp8(), ValueError, "group_size must be 64 or 128"),
        ("hidden_multiple", lambda o: blk(o[:, :96], torch.randn(4, 96), torch.randn(96),
                                          torch.zeros(4, 1), EPS, None, None, 64, False),
         fp8(4, 96), ValueError, "must be a multiple of group_size"),
        ("block_scale_shape", lambda o: blk(o, x, w, torch.zeros(4, 1), EPS, None, None, 64,
                                            False), fp8(), ValueError, "scale must have shape"),
        ("block_scale_not_contiguous", lambda o: blk(o, x, w, torch.zeros(2, 4).t(), EPS, None,
                                                     None, 64, False),
         fp8(), ValueError, "scale must be contiguous"),
        ("block_scale_not_transposed", lambda o: blk(o, x, w, torch.zeros(4, 2), EPS, None,
                                                     None, 64, True),
         fp8(), ValueError, "column-major"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_eager_and_fake_nothing_written(case):
    _, call, result, exc, fragment = case
    before = result.clone()
    assert_raises_eager_and_fake(lambda: call(result), exc, fragment)
    assert torch.equal(result.view(torch.uint8), before.view(torch.uint8))


def test_overlapping_tensors_rejected_nothing_written():
    # Real tensors only: fake tensors have no addresses (the fake kernel skips these checks).
    x, w, one = torch.randn(4, 128), torch.randn(128), torch.ones(1)
    o = torch.zeros(4, 128, dtype=FP8_DTYPE)
    x0 = x.clone()
    with pytest.raises(ValueError, match="residual and input overlap"):
        ops.fused_add_rms_norm_static_fp8_quant(o, x, x, w, one, EPS)
    with pytest.raises(ValueError, match="scale and result overlap"):
        ops.rms_norm_dynamic_per_token_quant(o, x, w, o.view(torch.float32).view(-1)[:4],
                                             EPS, None, None)
    buf = torch.zeros(4 * 128 + 4)
    with pytest.raises(ValueError, match="scale and residual overlap"):
        ops.rms_norm_dynamic_per_token_quant(o, x, w, buf[-8:-4], EPS, None,
                                             buf[:512].view(4, 128))
    assert torch.equal(x, x0) and (o.view(torch.uint8) == 0).all() and (buf == 0).all()


class NormQuantLayer(torch.nn.Module):
    def __init__(self, hidden, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(hidden).to(dtype), requires_grad=False)
        self.register_buffer("scale", torch.tensor([0.05]))

    def forward(self, x, r):
        r = r.clone()
        q0 = nq.fused_add_rms_norm_static_fp8_quant(x, r, self.w, self.scale, EPS)
        q1, s1 = nq.rms_norm_dynamic_per_token_quant(x, self.w, EPS, FP8_DTYPE, None, r)
        q2, s2 = nq.rms_norm_per_block_quant(x, self.w, EPS, torch.int8, 64, None, None, True,
                                             4)
        return q0.view(torch.uint8), q1.view(torch.uint8), s1, q2, s2, r


def _compile_check(device, dtype, gen, **kwargs):
    torch._dynamo.reset()
    model = NormQuantLayer(128, dtype).to(device)
    compiled = torch.compile(model, fullgraph=True, **kwargs)
    for tokens in (3, 5):
        x = rows_tensor(tokens, 128, dtype, device, generator=gen)
        r = rows_tensor(tokens, 128, dtype, device, generator=gen)
        exp = model(x, r)
        for _ in range(3):  # CUDA graph trees record on the 2nd call and replay after
            got = compiled(x, r)
        for a, b in zip(got, exp):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph_cpu(gen):
    _compile_check("cpu", torch.float32, gen)


# ---------------------------------------------------------------------------------------------
# CUDA: the kernels against our CUDA rms_norm / fused_add_rms_norm_out + the reference quant,
# byte for byte (the fused kernels accumulate in rms_norm's order; see norm_quant.cuh)
# ---------------------------------------------------------------------------------------------
def _wide(tokens, hidden, dtype, row_pad, gen):
    base = torch.randn(tokens, hidden + row_pad, generator=gen).to(dtype=dtype, device="cuda")
    return base[:, :hidden]


# rms_norm and fused_add_rms_norm_out switch to their shifted kernel (another summation order)
# for misaligned rows whose tensors share one 16-byte phase (e.g. hidden 769 in rows of 833) from
# layernorm_kernels.cu's kShiftMinRows = 4096 rows on; the norm + quant kernels have no shifted
# variant and take the element-wise path there. The oracle normalizes such inputs in chunks of
# fewer rows, which keeps the element-wise kernel and rms_norm's order for every row.
_ORACLE_CHUNK_ROWS = 2048


def _by_chunks(fn, *rows):
    parts = [fn(*(t[i:i + _ORACLE_CHUNK_ROWS] for t in rows))
             for i in range(0, max(1, rows[0].shape[0]), _ORACLE_CHUNK_ROWS)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _cuda_oracle(kind, x, w, r, qdtype, group=None, ub=None, scale=None):
    """(codes, scales, residual_out, normalized rows) from our CUDA norm kernels (outputs fresh
    and contiguous, as rms_norm's own tests use them; rows in chunks, see above) and the
    reference quantization."""
    res = None
    if kind == "static_add":
        res = (x.float() + r.float()).to(x.dtype)
        src = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
        src.copy_(res)  # the input's layout (alignment, stride): the same kernel choice
        n = _by_chunks(lambda t: compile_ops.rms_norm(t, w, EPS), src)
    elif r is not None:
        n, res = _by_chunks(lambda a, b: compile_ops.fused_add_rms_norm_out(a, b, w, EPS), x, r)
    else:
        n = _by_chunks(lambda t: compile_ops.rms_norm(t, w, EPS), x)
    if kind.startswith("static"):
        return codes(nq.static_fp8_quant_ref(n, scale)), None, res, n
    q, s = nq.dynamic_quant_ref(n, qdtype, group, ub)
    return codes(q), s, res, n


def _check_cuda(kind, x, w, r, qdtype, group=None, ub=None, transposed=False, tag=""):
    tokens, hidden = x.shape
    scale = torch.tensor([0.05], device="cuda")
    want_q, want_s, want_r, n = _cuda_oracle(kind, x, w, None if r is None else r.clone(), qdtype,
                                          group, ub, scale)
    x0 = x.clone()
    r1 = None if r is None else r.clone()
    if kind == "static":
        got = nq.rms_norm_static_fp8_quant(x, w, scale, EPS)
        s = None
    elif kind == "static_add":
        got = nq.fused_add_rms_norm_static_fp8_quant(x, r1, w, scale, EPS)
        s = None
    elif kind == "token":
        got, s = nq.rms_norm_dynamic_per_token_quant(x, w, EPS, qdtype, ub, r1)
    else:
        got, s = nq.rms_norm_per_block_quant(x, w, EPS, qdtype, group, ub, r1, transposed,
                                             4 if transposed else 0)
    want = want_q.view(FP8_DTYPE) if want_q.dtype == torch.uint8 else want_q
    assert torch.equal(codes(got), want_q), \
        f"{tag}: codes differ: {quant_mismatch(got, want, source=n, scales=s, want_scales=want_s)}"
    if s is not None:
        assert torch.equal(s, want_s), \
            f"{tag}: scales differ: {quant_mismatch(got, want, scales=s, want_scales=want_s)}"
    if r is not None:  # NaN payloads may differ between torch's casts and the kernels'
        torch.testing.assert_close(r1, want_r, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{tag}: residual differs")
    assert torch.equal(x, x0), "input was modified"


@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_static_grid(tokens, hidden, dtype, row_pad, gen):
    x = _wide(tokens, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    r = rows_tensor(tokens, hidden, dtype, "cuda", generator=gen)
    tag = f"{tokens}x{hidden} {dtype} pad={row_pad}"
    _check_cuda("static", x, w, None, FP8_DTYPE, tag=tag)
    _check_cuda("static_add", x, w, r, FP8_DTYPE, tag=tag + " add")


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["fp8", "int8"])
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_per_token_grid(tokens, hidden, dtype, row_pad, qdtype, gen):
    x = _wide(tokens, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    r = rows_tensor(tokens, hidden, dtype, "cuda", generator=gen)
    tag = f"{tokens}x{hidden} {dtype} pad={row_pad} {qdtype}"
    _check_cuda("token", x, w, None, qdtype, tag=tag)
    _check_cuda("token", x, w, r, qdtype, tag=tag + " residual")
    if qdtype == FP8_DTYPE:
        _check_cuda("token", x, w, None, qdtype, ub=torch.tensor([0.5], device="cuda"),
                    tag=tag + " ub")


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["fp8", "int8"])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [768, 4096, 5120, 8192])
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_per_block_grid(tokens, hidden, dtype, row_pad, group, qdtype, gen):
    x = _wide(tokens, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    r = rows_tensor(tokens, hidden, dtype, "cuda", generator=gen)
    tag = f"{tokens}x{hidden} {dtype} pad={row_pad} g={group} {qdtype}"
    _check_cuda("group", x, w, None, qdtype, group, tag=tag)
    _check_cuda("group", x, w, r, qdtype, group, transposed=True, tag=tag + " residual T")
    if qdtype == FP8_DTYPE:
        _check_cuda("group", x, w, None, qdtype, group, ub=torch.tensor([0.5], device="cuda"),
                    tag=tag + " ub")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,row_pad", [(16384, 0), (65536, 0), (70016, 0), (9088, 1)])
def test_cuda_long_rows(hidden, row_pad, dtype, gen):
    # past the register budget: the two-pass kernel (the same sum order as rms_norm's)
    x = _wide(3, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    r = rows_tensor(3, hidden, dtype, "cuda", generator=gen)
    _check_cuda("static_add", x, w, r, FP8_DTYPE, tag="static_add")
    _check_cuda("token", x, w, r, torch.int8, tag="token")
    _check_cuda("group", x, w, r, FP8_DTYPE, 128, transposed=True, tag="group")
    _check_cuda("group", x, w, None, torch.int8, 64, tag="group64")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["static", "static_add", "token", "group"])
def test_cuda_nan_inf_zero_rows(kind, gen):
    for dtype in DTYPES:
        x = special_rows(9, 1024, dtype, gen).cuda()
        w = rows_tensor(1, 1024, dtype, "cuda", generator=gen)[0]
        r = None if kind == "static" else rows_tensor(9, 1024, dtype, "cuda", generator=gen)
        for qdtype in ([FP8_DTYPE] if kind.startswith("static") else QDTYPES):
            _check_cuda(kind, x, w, r, qdtype, 128, tag=f"{kind} {dtype} {qdtype}")
            if kind != "static_add":
                _check_cuda(kind, x, w, None, qdtype, 64, tag=f"{kind} {dtype} {qdtype}")


@pytest.mark.cuda
def test_cuda_3d_and_zero_tokens(gen):
    x = torch.randn(2, 3, 512, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, generator=gen).to(device="cuda", dtype=torch.bfloat16)
    q, s = nq.rms_norm_per_block_quant(x, w, EPS, FP8_DTYPE, 128, None, None, True, 4)
    wq, ws, _ = nq.rms_norm_per_block_quant_ref(x.cpu(), w.cpu(), EPS, FP8_DTYPE, 128)
    assert ((codes(q).cpu().int() - codes(wq).int()).abs() <= 1).all()
    torch.testing.assert_close(s.cpu(), ws, rtol=2 ** -7, atol=0)
    q, s = nq.rms_norm_dynamic_per_token_quant(x[:0], w, EPS, torch.int8)
    assert q.shape == (0, 3, 512) and s.shape == (0, 1)


@pytest.mark.cuda
def test_opcheck_cuda(gen):
    for op, args in _op_samples("cuda", gen):
        _opcheck(op, args)


@pytest.mark.cuda
def test_cuda_launcher_checks():
    from compile_ops._extension import _C

    x = torch.randn(4, 128, device="cuda")
    w = torch.randn(128, device="cuda")
    with pytest.raises(RuntimeError, match="result must have dtype"):
        _C.rms_norm_static_fp8_quant(torch.empty(4, 128, device="cuda"), x, w,
                                     torch.ones(1, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="group_size must be 64 or 128"):
        _C.rms_norm_per_block_quant(torch.empty(4, 128, device="cuda", dtype=FP8_DTYPE), x, w,
                                    torch.empty(4, 4, device="cuda"), EPS, None, None, 32,
                                    False)


@pytest.mark.cuda
def test_torch_compile_cuda_graphs(gen):
    _compile_check("cuda", torch.bfloat16, gen, mode="reduce-overhead")
