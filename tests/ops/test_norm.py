"""rms_norm, fused_add_rms_norm and fused_add_rms_norm_out: reference, fake, opcheck, CUDA
kernels, compile, errors."""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import compile_ops
from compile_ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from compile_ops.testing import assert_close, assert_raises_eager_and_fake, rows_tensor

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6

# The shared grid (CUDA): odd and real hidden sizes, token counts around block/warp boundaries.
GPU_TOKENS = [1, 7, 128, 4099]
GPU_HIDDEN = [8, 768, 769, 4096, 5120, 8192]
# Row padding: 0 = contiguous, 64 = strided rows that stay 16-byte aligned, 11 = misaligned rows.
ROW_PADS = [0, 64, 11]


def float64_rms_norm(x, weight, eps):
    """Independent oracle for the reference: everything in float64, one final rounding."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y.to(x.dtype)


def weightless_rms_norm(x, eps):
    """Independent oracle for weight None: normalize in float32, round once to the dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def run_rms_norm(x, weight, eps=EPS, out=None):
    out = torch.full_like(x, float("nan")) if out is None else out
    ops.rms_norm(out, x, weight, eps)
    return out


def run_fused(x, residual, weight, eps=EPS):
    ops.fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


# ---------------------------------------------------------------------------------------------
# Reference (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 8), (7, 769), (33, 1024), (5, 4096)])
def test_reference_matches_float64(dtype, tokens, hidden, gen):
    x = rows_tensor(tokens, hidden, dtype, "cpu", generator=gen)
    r = rows_tensor(tokens, hidden, dtype, "cpu", generator=gen)
    w = rows_tensor(1, hidden, dtype, "cpu", generator=gen)[0]
    assert_close(rms_norm_ref(x, w, EPS), float64_rms_norm(x, w, EPS), dtype)
    out, res = fused_add_rms_norm_ref(x, r, w, EPS)
    z = x.double() + r.double()
    assert_close(res, z.to(dtype), dtype)
    assert_close(out, float64_rms_norm(z, w.double(), EPS).to(dtype), dtype)


def test_reference_uses_epsilon(gen):
    # With a tiny row, eps dominates: a wrong or ignored eps changes the result visibly.
    x = torch.full((2, 16), 1e-3)
    w = torch.ones(16)
    a = rms_norm_ref(x, w, 1e-6)
    b = rms_norm_ref(x, w, 1e-2)
    assert_close(a, float64_rms_norm(x, w, 1e-6))
    assert_close(b, float64_rms_norm(x, w, 1e-2))
    assert (a - b).abs().max() > 0.5


# ---------------------------------------------------------------------------------------------
# Registered ops on CPU: in-place semantics, layouts, functional wrappers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_pad", ROW_PADS)
def test_cpu_ops_match_reference(dtype, row_pad, gen):
    x = rows_tensor(9, 80, dtype, "cpu", row_pad=row_pad, generator=gen)
    r = rows_tensor(9, 80, dtype, "cpu", row_pad=row_pad, generator=gen)
    w = rows_tensor(1, 80, dtype, "cpu", generator=gen)[0]
    assert_close(run_rms_norm(x, w), rms_norm_ref(x, w, EPS))
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    got_out, got_res = run_fused(x, r, w)
    assert_close(got_out, exp_out)
    assert_close(got_res, exp_res)


def test_cpu_leading_dims_and_in_place(gen):
    x = torch.randn(2, 3, 40, generator=gen)
    w = torch.randn(40, generator=gen)
    expected = rms_norm_ref(x, w, EPS)
    assert_close(compile_ops.rms_norm(x, w, EPS), expected)
    y = x.clone()
    ops.rms_norm(y, y, w, EPS)  # out is input: vLLM allows it
    assert_close(y, expected)


def test_cpu_broadcast_input_rows(gen):
    # A read-only input may repeat one row (stride 0); every output row equals the one-row result.
    row = torch.randn(1, 24, generator=gen)
    w = torch.randn(24, generator=gen)
    out = run_rms_norm(row.expand(5, 24), w)
    assert_close(out, rms_norm_ref(row, w, EPS).expand(5, 24))


def test_functional_wrappers_leave_inputs_alone(gen):
    x = torch.randn(4, 32, generator=gen)
    r = torch.randn(4, 32, generator=gen)
    w = torch.randn(32, generator=gen)
    x0, r0 = x.clone(), r.clone()
    out, res = compile_ops.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(x, x0) and torch.equal(r, r0)
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    assert_close(out, exp_out)
    assert_close(res, exp_res)
    assert_close(compile_ops.rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))


def test_zero_tokens():
    x = torch.empty(0, 64)
    for w in (torch.ones(64), None):
        assert compile_ops.rms_norm(x, w).shape == (0, 64)
        out, res = compile_ops.fused_add_rms_norm(x, x.clone(), w)
        assert out.shape == res.shape == (0, 64)


# ---------------------------------------------------------------------------------------------
# weight None (``Tensor? weight``, as current vLLM): no scale
# ---------------------------------------------------------------------------------------------
def test_schema_weight_is_optional():
    for op in (ops.rms_norm.default, ops.fused_add_rms_norm.default):
        (arg,) = [a for a in op._schema.arguments if a.name == "weight"]
        assert str(arg.type) == "Optional[Tensor]", op._schema


def _check_no_weight(x, r, eps=EPS):
    """Both ops with weight None against the independent formula, and bit-equal to a weight of
    ones in the dtype (one rounding either way: T(T(v) * 1) == T(v))."""
    tag = f"{tuple(x.shape)} {x.dtype} {x.device}"
    ones = torch.ones(x.size(-1), dtype=x.dtype, device=x.device)
    got = run_rms_norm(x, None, eps)
    assert_close(got, weightless_rms_norm(x, eps), msg=tag)
    assert torch.equal(got, run_rms_norm(x, ones, eps)), tag
    if x.device.type == "cpu":  # the registered op runs the reference body itself
        assert torch.equal(got, rms_norm_ref(x, None, eps)), tag
    z = x.float() + r.float()
    xf, rf = x.clone(), r.clone()
    run_fused(xf, rf, None, eps)
    assert_close(xf, weightless_rms_norm(z, eps).to(x.dtype), msg=tag)
    assert_close(rf, z.to(x.dtype), msg=tag)
    xo, ro = x.clone(), r.clone()
    run_fused(xo, ro, ones, eps)
    assert torch.equal(xf, xo) and torch.equal(rf, ro), tag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_pad", ROW_PADS)
def test_cpu_no_weight(dtype, row_pad, gen):
    x = rows_tensor(9, 80, dtype, "cpu", row_pad=row_pad, generator=gen)
    r = rows_tensor(9, 80, dtype, "cpu", row_pad=row_pad, generator=gen)
    _check_no_weight(x, r)


def test_functional_wrappers_no_weight(gen):
    x = torch.randn(2, 3, 40, generator=gen).to(torch.bfloat16)
    r = torch.randn(2, 3, 40, generator=gen).to(torch.bfloat16)
    assert_close(compile_ops.rms_norm(x, None, 1e-5), weightless_rms_norm(x, 1e-5))
    out, res = compile_ops.fused_add_rms_norm(x, r, None, 1e-5)
    z = x.float() + r.float()
    assert_close(out, weightless_rms_norm(z, 1e-5).to(x.dtype))
    assert_close(res, z.to(x.dtype))
    y = x.clone()
    ops.rms_norm(y, y, None, 1e-5)  # in place, no weight
    assert torch.equal(y, compile_ops.rms_norm(x, None, 1e-5))


def test_fake_no_weight(gen):
    x = rows_tensor(6, 48, torch.float16, "cpu", row_pad=64, generator=gen)
    r = rows_tensor(6, 48, torch.float16, "cpu", generator=gen)
    real = compile_ops.fused_add_rms_norm(x, r, None)
    with FakeTensorMode() as mode:
        fx, fr = mode.from_tensor(x), mode.from_tensor(r)
        fake = compile_ops.fused_add_rms_norm(fx, fr, None)
        fake_norm = compile_ops.rms_norm(fx, None)
        ops.rms_norm(torch.empty_like(fx), fx, None, EPS)
    for a, b in zip(real, fake):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
    assert (fake_norm.shape, fake_norm.dtype) == (x.shape, x.dtype)
    # The fake still checks the other arguments when the weight is None.
    assert_raises_eager_and_fake(
        lambda: ops.rms_norm(torch.empty(4, 17), torch.randn(4, 16), None, EPS), ValueError,
        "out must have the shape of input")


def _bad_weights():
    """(id, weight for a [4, 16] float32 input, exception, fragment): still rejected, by name."""
    return [
        ("shape", lambda: torch.randn(15), ValueError, "weight must be a 1-D tensor of size 16"),
        ("2d", lambda: torch.randn(1, 16), ValueError, "weight must be a 1-D tensor"),
        ("dtype", lambda: torch.randn(16).half(), TypeError,
         "weight must have dtype torch.float32"),
        ("strided", lambda: torch.randn(32)[::2], ValueError, "weight must be contiguous"),
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "fused_add_rms_norm"])
@pytest.mark.parametrize("case", _bad_weights(), ids=lambda c: c[0])
def test_bad_weight_still_rejected(case, fused):
    _, weight, exc, fragment = case
    if fused:
        call = lambda: ops.fused_add_rms_norm(torch.randn(4, 16), torch.randn(4, 16),  # noqa: E731
                                              weight(), EPS)
    else:
        call = lambda: ops.rms_norm(torch.empty(4, 16), torch.randn(4, 16),  # noqa: E731
                                    weight(), EPS)
    assert_raises_eager_and_fake(call, exc, fragment)


class NoWeightNorm(torch.nn.Module):
    def forward(self, x, residual):
        out = torch.empty_like(x)
        ops.rms_norm(out, x, None, 1e-5)
        ops.fused_add_rms_norm(out, residual, None, 1e-6)
        return out, residual


def test_torch_compile_no_weight_cpu(gen):
    torch._dynamo.reset()
    model = NoWeightNorm()
    compiled = torch.compile(model, fullgraph=True)
    x = rows_tensor(5, 64, torch.bfloat16, "cpu", generator=gen)
    r = rows_tensor(5, 64, torch.bfloat16, "cpu", generator=gen)
    for a, b in zip(compiled(x.clone(), r.clone()), model(x.clone(), r.clone())):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake, functionalization, aot dispatch) on sample inputs
# ---------------------------------------------------------------------------------------------
def _samples(device, gen):
    for dtype, (tokens, hidden), pad in itertools.product(
            DTYPES, [(1, 8), (7, 769), (16, 256)], [0, 11]):
        x = rows_tensor(tokens, hidden, dtype, device, row_pad=pad, generator=gen)
        r = rows_tensor(tokens, hidden, dtype, device, row_pad=pad, generator=gen)
        w = rows_tensor(1, hidden, dtype, device, generator=gen)[0]
        yield x, r, w


def _opcheck_all(device, gen):
    for i, (x, r, w) in enumerate(_samples(device, gen)):
        for weight in (w, None):
            torch.library.opcheck(ops.rms_norm.default, (torch.empty_like(x), x, weight, EPS))
            torch.library.opcheck(ops.fused_add_rms_norm.default,
                                  (x.clone(), r.clone(), weight, EPS))
        # the out-of-place op: every sample once, with and without a weight in turn
        torch.library.opcheck(ops.fused_add_rms_norm_out.default,
                              (torch.empty_like(x), torch.empty_like(r), x, r,
                               w if (i // 2) % 2 else None, EPS))


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


# ---------------------------------------------------------------------------------------------
# Fake kernels: same shapes/dtypes as real, and the same errors
# ---------------------------------------------------------------------------------------------
def test_fake_matches_real_metadata(gen):
    x = rows_tensor(6, 48, torch.bfloat16, "cpu", row_pad=64, generator=gen)
    r = rows_tensor(6, 48, torch.bfloat16, "cpu", generator=gen)
    w = torch.ones(48, dtype=torch.bfloat16)
    real = compile_ops.fused_add_rms_norm(x, r, w)
    with FakeTensorMode() as mode:
        fx, fr, fw = (mode.from_tensor(t) for t in (x, r, w))
        fake = compile_ops.fused_add_rms_norm(fx, fr, fw)
        fake_norm = compile_ops.rms_norm(fx, fw)
    for a, b in zip(real, fake):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())
    assert (fake_norm.shape, fake_norm.dtype) == (x.shape, x.dtype)


def _bad_calls():
    """(id, function of a namespace of tensors, expected exception, message fragment)."""
    f32, f16 = torch.float32, torch.float16
    x = lambda: torch.randn(4, 16)  # noqa: E731
    w = lambda: torch.randn(16)  # noqa: E731
    return [
        ("weight_dtype", lambda: ops.rms_norm(torch.empty(4, 16), x(), w().to(f16), EPS),
         TypeError, "weight must have dtype torch.float32"),
        ("input_int", lambda: ops.rms_norm(torch.empty(4, 16, dtype=torch.int32),
                                           x().int(), w(), EPS),
         TypeError, "input must be float32, float16 or bfloat16"),
        ("out_dtype", lambda: ops.rms_norm(torch.empty(4, 16, dtype=f16), x(), w(), EPS),
         TypeError, "out must have dtype"),
        ("out_shape", lambda: ops.rms_norm(torch.empty(4, 17), x(), w(), EPS),
         ValueError, "out must have the shape of input"),
        ("weight_size", lambda: ops.rms_norm(torch.empty(4, 16), x(), torch.randn(15), EPS),
         ValueError, "weight must be a 1-D tensor of size 16"),
        ("weight_2d", lambda: ops.rms_norm(torch.empty(4, 16), x(), torch.randn(1, 16), EPS),
         ValueError, "weight must be a 1-D tensor"),
        ("weight_strided", lambda: ops.rms_norm(torch.empty(4, 16), x(), torch.randn(32)[::2],
                                                EPS),
         ValueError, "weight must be contiguous"),
        ("weight_device", lambda: ops.rms_norm(torch.empty(4, 16), x(),
                                               torch.empty(16, device="meta"), EPS),
         ValueError, "weight must be on device cpu"),
        ("input_transposed", lambda: ops.rms_norm(torch.empty(16, 4), x().t(), torch.randn(4),
                                                  EPS),
         ValueError, "input must be contiguous in its last dimension"),
        ("input_not_collapsible", lambda: ops.rms_norm(
            torch.empty(3, 4, 16), torch.randn(4, 3, 16).transpose(0, 1), w(), EPS),
         ValueError, "input leading dimensions must collapse"),
        ("out_rows_overlap", lambda: ops.rms_norm(torch.empty(1, 16).expand(4, 16), x(), w(),
                                                  EPS),
         ValueError, "out rows overlap in memory"),
        ("epsilon_negative", lambda: ops.rms_norm(torch.empty(4, 16), x(), w(), -1.0),
         ValueError, "epsilon must be finite and >= 0"),
        ("residual_dtype", lambda: ops.fused_add_rms_norm(x(), x().to(f16), w(), EPS),
         TypeError, "residual must have dtype torch.float32"),
        ("residual_shape", lambda: ops.fused_add_rms_norm(x(), torch.randn(4, 1), w(), EPS),
         ValueError, "residual must have the shape of input"),
        ("fused_weight_dtype", lambda: ops.fused_add_rms_norm(x(), x(), w().to(f16), EPS),
         TypeError, "weight must have dtype"),
        ("fused_input_overlap_rows", lambda: ops.fused_add_rms_norm(
            torch.randn(1, 16).expand(4, 16), x(), w(), EPS),
         ValueError, "input rows overlap in memory"),
        ("fused_weight_f32_input_f16", lambda: ops.fused_add_rms_norm(
            x().to(f16), x().to(f16), w().to(f32), EPS),
         TypeError, "weight must have dtype torch.float16"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_eager_and_fake(case):
    _, call, exc, fragment = case
    assert_raises_eager_and_fake(call, exc, fragment)


def test_fused_rejects_aliased_input_and_residual():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="input and residual overlap in memory"):
        ops.fused_add_rms_norm(x, x, torch.randn(16), EPS)
    buf = torch.randn(5, 16)
    with pytest.raises(ValueError, match="overlap in memory"):
        ops.fused_add_rms_norm(buf[:4], buf[1:], torch.randn(16), EPS)


def test_fused_accepts_disjoint_column_slices_of_one_buffer(gen):
    # x and residual interleave in memory (extents overlap) but share no element.
    buf = torch.randn(4, 48, generator=gen)
    w = torch.randn(16, generator=gen)
    x, r = buf[:, :16], buf[:, 32:]
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    ops.fused_add_rms_norm(x, r, w, EPS)
    assert_close(x, exp_out)
    assert_close(r, exp_res)
    with pytest.raises(ValueError, match="input and residual overlap in memory"):
        ops.fused_add_rms_norm(buf[:, :16], buf[:, 8:24], w, EPS)


def test_out_partially_overlapping_input_rejected():
    buf = torch.randn(5, 16)
    with pytest.raises(ValueError, match="out and input overlap in memory"):
        ops.rms_norm(buf[1:], buf[:4], torch.randn(16), EPS)


# ---------------------------------------------------------------------------------------------
# fused_add_rms_norm_out (ours): out of place, input and residual only read
# ---------------------------------------------------------------------------------------------
def float64_fused_add_rms_norm(x, r, weight, eps):
    """Independent oracle: (normalized sum, sum), the sum and the norm in float64, each output
    rounded once (weight None: no scale)."""
    z = x.double() + r.double()
    y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    y = y if weight is None else y * weight.double()
    return y.to(x.dtype), z.to(x.dtype)


def run_out(x, r, weight, eps=EPS, out=None, residual_out=None):
    """The op into NaN-poisoned buffers (or the given ones); x and r must stay as they were."""
    out = torch.full_like(x, float("nan")) if out is None else out
    residual_out = torch.full_like(r, float("nan")) if residual_out is None else residual_out
    x0, r0 = x.clone(), r.clone()
    ops.fused_add_rms_norm_out(out, residual_out, x, r, weight, eps)
    assert torch.equal(x, x0) and torch.equal(r, r0), "an input was written"
    return out, residual_out


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 8), (7, 769), (5, 4096)])
def test_out_reference_matches_float64(tokens, hidden, dtype, row_pad, weighted, gen):
    x = rows_tensor(tokens, hidden, dtype, "cpu", row_pad=row_pad, generator=gen)
    r = rows_tensor(tokens, hidden, dtype, "cpu", row_pad=row_pad + 3 if row_pad else 0,
                    generator=gen)
    w = rows_tensor(1, hidden, dtype, "cpu", generator=gen)[0] if weighted else None
    want_out, want_res = float64_fused_add_rms_norm(x, r, w, EPS)
    out, res = run_out(x, r, w)
    assert_close(out, want_out)
    assert_close(res, want_res)
    # exactly fused_add_rms_norm's rounding: bit-equal to the in-place op
    xi, ri = x.clone(), r.clone()
    run_fused(xi, ri, w)
    assert torch.equal(out, xi) and torch.equal(res, ri)


def test_out_strided_outputs_and_leading_dims(gen):
    # outputs with their own row strides (slices of wider buffers) and 3-D inputs
    x = torch.randn(2, 3, 40, generator=gen)
    r = torch.randn(6, 41, generator=gen)[:, :40].view(2, 3, 40)
    w = torch.randn(40, generator=gen)
    out_base = torch.full((6, 45), 7.0)
    res_base = torch.full((6, 50), 7.0)
    out, res = out_base[:, 2:42].view(2, 3, 40), res_base[:, :40].view(2, 3, 40)
    run_out(x, r, w, out=out, residual_out=res)
    want_out, want_res = fused_add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(out, want_out) and torch.equal(res, want_res)
    assert (out_base[:, :2] == 7).all() and (out_base[:, 42:] == 7).all()
    assert (res_base[:, 40:] == 7).all()


def test_out_read_only_inputs_may_repeat_and_share(gen):
    # input and residual are only read: a broadcast row (stride 0), or even the same tensor
    x = torch.randn(5, 24, generator=gen)
    row = torch.randn(1, 24, generator=gen)
    w = torch.randn(24, generator=gen)
    out, res = run_out(x, row.expand(5, 24), w)
    want_out, want_res = fused_add_rms_norm_ref(x, row.expand(5, 24).contiguous(), w, EPS)
    assert torch.equal(out, want_out) and torch.equal(res, want_res)
    out, res = run_out(x, x, w)
    assert torch.equal(res, x + x)
    assert torch.equal(out, fused_add_rms_norm_ref(x, x.clone(), w, EPS)[0])


def test_out_exact_aliases_are_the_in_place_op(gen):
    # out is input and residual_out is residual (each exactly): the in-place op's results
    x = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    r = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
    w = torch.randn(32, generator=gen).to(torch.bfloat16)
    xi, ri = x.clone(), r.clone()
    run_fused(xi, ri, w)
    ops.fused_add_rms_norm_out(x, r, x, r, w, EPS)
    assert torch.equal(x, xi) and torch.equal(r, ri)


def test_out_functional_wrapper(gen):
    x = rows_tensor(4, 48, torch.float16, "cpu", row_pad=5, generator=gen)
    r = rows_tensor(4, 48, torch.float16, "cpu", generator=gen)
    x0, r0 = x.clone(), r.clone()
    for w in (torch.randn(48, generator=gen).half(), None):
        out, res = compile_ops.fused_add_rms_norm_out(x, r, w, 1e-5)
        assert torch.equal(x, x0) and torch.equal(r, r0)
        assert out.is_contiguous() and res.is_contiguous()
        want_out, want_res = compile_ops.fused_add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(out, want_out) and torch.equal(res, want_res)
    out, res = compile_ops.fused_add_rms_norm_out(torch.empty(0, 64), torch.empty(0, 64), None)
    assert out.shape == res.shape == (0, 64)
    with pytest.raises(TypeError, match="fused_add_rms_norm_out: residual must be a torch.Tensor"):
        compile_ops.fused_add_rms_norm_out(x, None, None)


def test_out_fake_matches_real_metadata(gen):
    x = rows_tensor(6, 48, torch.bfloat16, "cpu", row_pad=64, generator=gen)
    r = rows_tensor(6, 48, torch.bfloat16, "cpu", generator=gen)
    real = compile_ops.fused_add_rms_norm_out(x, r, None)
    with FakeTensorMode() as mode:
        fake = compile_ops.fused_add_rms_norm_out(mode.from_tensor(x), mode.from_tensor(r), None)
    for a, b in zip(real, fake):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


def _bad_out_calls():
    """(id, kwargs over good [4, 16] float32 tensors, exception, message fragment)."""
    f16 = torch.float16
    buf = torch.randn(5, 16)
    return [
        ("input_int", dict(input=torch.randn(4, 16).int()), TypeError,
         "input must be float32, float16 or bfloat16"),
        ("residual_dtype", dict(residual=torch.randn(4, 16).to(f16)), TypeError,
         "residual must have dtype torch.float32"),
        ("residual_shape", dict(residual=torch.randn(4, 1)), ValueError,
         "residual must have the shape of input"),
        ("out_dtype", dict(out=torch.zeros(4, 16, dtype=f16)), TypeError,
         "out must have dtype torch.float32"),
        ("out_shape", dict(out=torch.zeros(4, 17)), ValueError, "out must have the shape of input"),
        ("residual_out_dtype", dict(residual_out=torch.zeros(4, 16, dtype=f16)), TypeError,
         "residual_out must have dtype torch.float32"),
        ("residual_out_device", dict(residual_out=torch.zeros(4, 16, device="meta")), ValueError,
         "residual_out must be on device cpu"),
        ("weight_size", dict(weight=torch.randn(15)), ValueError,
         "weight must be a 1-D tensor of size 16"),
        ("weight_dtype", dict(weight=torch.randn(16).to(f16)), TypeError,
         "weight must have dtype torch.float32"),
        ("epsilon_negative", dict(epsilon=-1.0), ValueError, "epsilon must be finite and >= 0"),
        ("input_transposed", dict(input=torch.randn(16, 4).t()), ValueError,
         "input must be contiguous in its last dimension"),
        ("out_rows_overlap", dict(out=torch.zeros(1, 16).expand(4, 16)), ValueError,
         "out rows overlap in memory"),
        ("residual_out_rows_overlap", dict(residual_out=torch.zeros(1, 16).expand(4, 16)),
         ValueError, "residual_out rows overlap in memory"),
        ("out_partially_over_input", dict(input=buf[:4], out=buf[1:]), ValueError,
         "out and input overlap in memory"),
        ("out_is_residual", "out_is_residual", ValueError, "out and residual overlap in memory"),
        ("residual_out_is_input", "residual_out_is_input", ValueError,
         "residual_out and input overlap in memory"),
        ("outputs_shared", "outputs_shared", ValueError,
         "out and residual_out overlap in memory"),
        ("residual_out_over_weight", "residual_out_over_weight", ValueError,
         "residual_out and weight overlap in memory"),
    ]


@pytest.mark.parametrize("case", _bad_out_calls(), ids=lambda c: c[0])
def test_out_bad_input_named_and_nothing_written(case):
    _, change, exc, fragment = case
    args = dict(out=torch.full((4, 16), 7.0), residual_out=torch.full((4, 16), 7.0),
                input=torch.randn(4, 16), residual=torch.randn(4, 16), weight=torch.randn(16),
                epsilon=EPS)
    if change == "out_is_residual":
        args["out"] = args["residual"]
    elif change == "residual_out_is_input":
        args["residual_out"] = args["input"]
    elif change == "outputs_shared":
        args["residual_out"] = args["out"]
    elif change == "residual_out_over_weight":
        big = torch.full((5, 16), 7.0)
        args["residual_out"], args["weight"] = big[:4], big[3]
    else:
        args.update(change)
    before = {k: v.clone() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    call = lambda: ops.fused_add_rms_norm_out(**args)  # noqa: E731
    fragment = "compile_ops.fused_add_rms_norm_out: " + fragment
    if "overlap in memory" in fragment and "rows" not in fragment:
        with pytest.raises(exc, match=fragment):  # addresses: fake tensors have none
            call()
    else:
        assert_raises_eager_and_fake(call, exc, fragment)
    for k, v in before.items():  # raised before any write
        assert torch.equal(args[k], v), f"{k} was written"


class OutOfPlaceLayer(torch.nn.Module):
    def __init__(self, hidden, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x, residual):
        out, res = torch.empty_like(x), torch.empty_like(residual)
        ops.fused_add_rms_norm_out(out, res, x, residual, self.w, 1e-5)
        return out * 2.0, res


def _compile_out_check(device, dtype, gen, **compile_kwargs):
    torch._dynamo.reset()
    model = OutOfPlaceLayer(64, dtype).to(device)
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    x = rows_tensor(5, 64, dtype, device, generator=gen)
    r = rows_tensor(5, 64, dtype, device, generator=gen)
    x0, r0 = x.clone(), r.clone()
    exp = model(x, r)
    for _ in range(3):  # CUDA graph trees record on the 2nd call and replay after
        got = compiled(x, r)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    assert torch.equal(x, x0) and torch.equal(r, r0)


def test_out_torch_compile_fullgraph_cpu(gen):
    _compile_out_check("cpu", torch.float32, gen)


# ---------------------------------------------------------------------------------------------
# torch.compile (CPU)
# ---------------------------------------------------------------------------------------------
class AddNorm(torch.nn.Module):
    """Two layers of vLLM-style code: out-style rms_norm, then the in-place fused op."""

    def __init__(self, hidden, dtype):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(hidden, dtype=dtype), requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x, residual):
        h = x + residual
        out = torch.empty_like(h)
        ops.rms_norm(out, h, self.w1, 1e-5)
        y = out * 2.0
        ops.fused_add_rms_norm(y, h, self.w2, 1e-6)
        return y, h


def _compile_check(device, dtype, gen, **compile_kwargs):
    torch._dynamo.reset()
    model = AddNorm(64, dtype).to(device)
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    for tokens in (3, 5):
        x = rows_tensor(tokens, 64, dtype, device, generator=gen)
        r = rows_tensor(tokens, 64, dtype, device, generator=gen)
        exp = model(x.clone(), r.clone())
        for _ in range(3):  # CUDA graph trees record on the 2nd call and replay after
            got = compiled(x.clone(), r.clone())
        for a, b in zip(got, exp):
            assert_close(a, b)


def test_torch_compile_fullgraph_cpu(gen):
    _compile_check("cpu", torch.float32, gen)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
def _wide(tokens, hidden, dtype, row_pad, gen, fill=None):
    """(view, base): a [tokens, hidden] view into a base with row_pad extra columns."""
    base = torch.randn(tokens, hidden + row_pad, generator=gen).to(dtype=dtype, device="cuda")
    if fill is not None:
        base.fill_(fill)
    return base[:, :hidden], base


def _pad_untouched(base, before, hidden):
    # Bit-exact, NaN poison included.
    torch.testing.assert_close(base[:, hidden:], before[:, hidden:], rtol=0, atol=0,
                               equal_nan=True, msg="wrote outside the rows")


@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_rms_norm_grid(tokens, hidden, dtype, row_pad, gen):
    x, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    out, out_base = _wide(tokens, hidden, dtype, row_pad, gen, fill=float("nan"))
    before = out_base.clone()
    x0 = x.clone()
    ops.rms_norm(out, x, w, EPS)
    assert_close(out, rms_norm_ref(x, w, EPS), msg=f"{tokens}x{hidden} {dtype} pad={row_pad}")
    assert torch.equal(x, x0), "input was modified"
    _pad_untouched(out_base, before, hidden)


@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_fused_add_rms_norm_grid(tokens, hidden, dtype, row_pad, gen):
    x, x_base = _wide(tokens, hidden, dtype, row_pad, gen)
    r, r_base = _wide(tokens, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    xb, rb = x_base.clone(), r_base.clone()
    ops.fused_add_rms_norm(x, r, w, EPS)
    tag = f"{tokens}x{hidden} {dtype} pad={row_pad}"
    assert_close(x, exp_out, msg=tag)
    assert_close(r, exp_res, msg=tag)
    _pad_untouched(x_base, xb, hidden)
    _pad_untouched(r_base, rb, hidden)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [16384, 65536, 70000, 9001])
def test_cuda_long_rows(hidden, dtype, gen):
    # Around the limit of the register-cached kernel (8 packs x 1024 threads): 65536 in 16-bit
    # types is exactly at it; 70000 (aligned) and 9001 (scalar) go to the two-pass kernel, as do
    # the float32 sizes past 32768.
    x = rows_tensor(3, hidden, dtype, "cuda", generator=gen)
    r = rows_tensor(3, hidden, dtype, "cuda", generator=gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    assert_close(run_rms_norm(x, w), rms_norm_ref(x, w, EPS))
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    run_fused(x, r, w)
    assert_close(x, exp_out)
    assert_close(r, exp_res)


def _offset_rows(tokens, hidden, dtype, offset, gen):
    """[tokens, hidden] starting `offset` elements past a 16-byte aligned allocation."""
    buf = rows_tensor(1, tokens * hidden + offset, dtype, "cuda", generator=gen)[0]
    return buf[offset:].view(tokens, hidden)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 771])
@pytest.mark.parametrize("x_off,other_off", [(1, 0), (3, 3), (0, 2)])
def test_cuda_misaligned_base_pointer(dtype, hidden, x_off, other_off, gen):
    # Bases off 16 bytes. Same offset on input and out/residual: the shifted 128-bit path (each
    # row split at its first 16-byte boundary); different offsets: the scalar path.
    tokens = 4097  # the shifted kernel runs from 4096 rows on (kShiftMinRows)
    x = _offset_rows(tokens, hidden, dtype, x_off, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    out = _offset_rows(tokens, hidden, dtype, other_off, gen).fill_(float("nan"))
    ops.rms_norm(out, x, w, EPS)
    assert_close(out, rms_norm_ref(x, w, EPS))
    r = _offset_rows(tokens, hidden, dtype, other_off, gen)
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    run_fused(x, r, w)
    assert_close(x, exp_out)
    assert_close(r, exp_res)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [17, 769, 2049, 16383, 16401])
def test_cuda_shifted_rows_every_phase(dtype, hidden, gen):
    # Contiguous odd-width rows start at every phase of a 16-byte boundary in turn. 16383 bf16
    # is the longest row the shifted register kernel holds; 16401 bf16 (and fp32 past 8191) goes
    # to the scalar two-pass kernel.
    tokens = 4103  # >= kShiftMinRows; below it the same rows take the scalar kernel
    x = rows_tensor(tokens, hidden, dtype, "cuda", generator=gen)
    r = rows_tensor(tokens, hidden, dtype, "cuda", generator=gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    assert_close(run_rms_norm(x, w), rms_norm_ref(x, w, EPS))
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    run_fused(x, r, w)
    assert_close(x, exp_out)
    assert_close(r, exp_res)


@pytest.mark.cuda
def test_cuda_in_place_broadcast_and_3d(gen):
    x = rows_tensor(64, 4096, torch.bfloat16, "cuda", generator=gen)
    w = rows_tensor(1, 4096, torch.bfloat16, "cuda", generator=gen)[0]
    expected = rms_norm_ref(x, w, EPS)
    ops.rms_norm(x, x, w, EPS)
    assert_close(x, expected)
    row = rows_tensor(1, 4096, torch.bfloat16, "cuda", generator=gen)
    assert_close(run_rms_norm(row.expand(9, 4096), w), rms_norm_ref(row, w, EPS).expand(9, 4096))
    x3 = rows_tensor(6, 3 * 768, torch.float16, "cuda", generator=gen).view(2, 3, 3, 768)
    w3 = rows_tensor(1, 768, torch.float16, "cuda", generator=gen)[0]
    assert_close(compile_ops.rms_norm(x3, w3), rms_norm_ref(x3, w3, EPS))


@pytest.mark.cuda
def test_cuda_zero_tokens():
    x = torch.empty(0, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    assert compile_ops.rms_norm(x, w).shape == (0, 4096)
    compile_ops.fused_add_rms_norm(x, x.clone(), w)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,row_pad", [
    (7, 768, 0),       # register-cached, warp per row, 128-bit
    (128, 4096, 64),   # register-cached, block per row, strided aligned rows
    (33, 769, 11),     # scalar (element-wise) register kernel
    (4103, 769, 0),    # shifted 128-bit kernel (odd rows from 4096 rows on)
    (3, 70000, 0),     # two-pass, aligned
    (3, 9001, 0),      # two-pass, scalar
])
def test_cuda_no_weight(tokens, hidden, row_pad, dtype, gen):
    # weight None on every kernel variant: against the formula, bit-equal to a weight of ones.
    x, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    r, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    _check_no_weight(x, r)
    assert_close(run_rms_norm(x, None), rms_norm_ref(x, None, EPS))


@pytest.mark.cuda
def test_cuda_launcher_no_weight(gen):
    # The binding takes None (std::optional) and an undefined tensor alike.
    from compile_ops._extension import _C

    x = rows_tensor(5, 256, torch.float16, "cuda", generator=gen)
    expected = weightless_rms_norm(x, EPS)
    out = torch.empty_like(x)
    _C.rms_norm(out, x, None, EPS)
    assert_close(out, expected)
    r = torch.zeros_like(x)
    xf = x.clone()
    _C.fused_add_rms_norm(xf, r, None, EPS)
    assert_close(xf, expected)
    assert torch.equal(r, x)
    with pytest.raises(RuntimeError, match="weight must be a contiguous 1-D tensor of size 256"):
        _C.rms_norm(out, x, torch.ones(255, device="cuda", dtype=torch.float16), EPS)


@pytest.mark.cuda
def test_cuda_compile_no_weight(gen):
    torch._dynamo.reset()
    model = NoWeightNorm()
    compiled = torch.compile(model, fullgraph=True)
    x = rows_tensor(5, 64, torch.bfloat16, "cuda", generator=gen)
    r = rows_tensor(5, 64, torch.bfloat16, "cuda", generator=gen)
    for a, b in zip(compiled(x.clone(), r.clone()), model(x.clone(), r.clone())):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@pytest.mark.cuda
def test_cuda_bad_input_raises():
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(ValueError, match="weight must be on device cuda:0"):
        ops.rms_norm(torch.empty_like(x), x, torch.randn(16), EPS)
    with pytest.raises(ValueError, match="residual must be on device cuda:0"):
        ops.fused_add_rms_norm(x, torch.randn(4, 16), torch.randn(16, device="cuda"), EPS)


@pytest.mark.cuda
def test_cuda_launcher_checks():
    # The C++ launcher re-checks its arguments for callers that bypass the Python layer.
    from compile_ops._extension import _C

    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="weight must have dtype"):
        _C.rms_norm(torch.empty_like(x), x, torch.randn(16, device="cuda").half(), EPS)
    with pytest.raises(RuntimeError, match="input must be contiguous in its last dimension"):
        _C.rms_norm(torch.empty(16, 4, device="cuda"), x.t(), torch.randn(4, device="cuda"), EPS)
    with pytest.raises(RuntimeError, match="weight must be a contiguous 1-D tensor of size 16"):
        _C.fused_add_rms_norm(x, x.clone(), torch.randn(8, device="cuda"), EPS)


@pytest.mark.cuda
def test_cuda_runs_on_current_stream(gen):
    x = rows_tensor(512, 4096, torch.bfloat16, "cuda", generator=gen)
    x_new = rows_tensor(512, 4096, torch.bfloat16, "cuda", generator=gen)
    w = rows_tensor(1, 4096, torch.bfloat16, "cuda", generator=gen)[0]
    expected = rms_norm_ref(x_new, w, EPS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The side stream is busy, then rewrites x: a kernel launched on any other stream would
        # run early and normalize the old x.
        torch.cuda._sleep(5_000_000)
        x.copy_(x_new)
        out = torch.empty_like(x)
        ops.rms_norm(out, x, w, EPS)
        result = out.clone()
    side.synchronize()
    assert_close(result, expected)


@pytest.mark.cuda
def test_torch_compile_fullgraph_cuda(gen):
    _compile_check("cuda", torch.bfloat16, gen)


@pytest.mark.cuda
def test_torch_compile_cuda_graphs(gen):
    _compile_check("cuda", torch.bfloat16, gen, mode="reduce-overhead")


# ---------------------------------------------------------------------------------------------
# CUDA: fused_add_rms_norm_out
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_fused_add_rms_norm_out_grid(tokens, hidden, dtype, row_pad, gen):
    # inputs and outputs in the same layout (the 128-bit, shifted and scalar kernels as for the
    # in-place op); the inputs must stay untouched and nothing be written past the rows
    x, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    r, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    out, out_base = _wide(tokens, hidden, dtype, row_pad, gen, fill=float("nan"))
    res, res_base = _wide(tokens, hidden, dtype, row_pad, gen, fill=float("nan"))
    ob, rb = out_base.clone(), res_base.clone()
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    run_out(x, r, w, out=out, residual_out=res)
    tag = f"{tokens}x{hidden} {dtype} pad={row_pad}"
    assert_close(out, exp_out, msg=tag)
    assert_close(res, exp_res, msg=tag)
    _pad_untouched(out_base, ob, hidden)
    _pad_untouched(res_base, rb, hidden)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 771, 70000, 9001])
@pytest.mark.parametrize("layout", ["contiguous_outputs", "aliased", "broadcast_residual"])
def test_cuda_fused_add_rms_norm_out_layouts(layout, hidden, dtype, gen):
    # inputs and outputs in different layouts (strided aligned inputs, contiguous outputs), the
    # exact aliases of the in-place call, a repeated read-only residual row; register and
    # two-pass kernels (70000, 9001)
    tokens = 4097 if hidden < 16384 else 3  # from 4096 rows odd rows may take the shifted kernel
    x, _ = _wide(tokens, hidden, dtype, 64, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    if layout == "broadcast_residual":
        r = rows_tensor(1, hidden, dtype, "cuda", generator=gen).expand(tokens, hidden)
    else:
        r, _ = _wide(tokens, hidden, dtype, 64 + 1, gen)
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    if layout == "aliased":
        ops.fused_add_rms_norm_out(x, r, x, r, w, EPS)
        out, res = x, r
    else:
        out, res = run_out(x, r, w)
    assert_close(out, exp_out)
    assert_close(res, exp_res)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 771])
@pytest.mark.parametrize("in_off,out_off", [(1, 1), (3, 0)])
def test_cuda_fused_add_rms_norm_out_misaligned(dtype, hidden, in_off, out_off, gen):
    # bases off 16 bytes: outputs at the inputs' offset take the shifted kernel (residual_out a
    # tensor of its own there), another offset the scalar one
    tokens = 4097
    x = _offset_rows(tokens, hidden, dtype, in_off, gen)
    r = _offset_rows(tokens, hidden, dtype, in_off, gen)
    w = rows_tensor(1, hidden, dtype, "cuda", generator=gen)[0]
    out = _offset_rows(tokens, hidden, dtype, out_off, gen).fill_(float("nan"))
    res = _offset_rows(tokens, hidden, dtype, in_off, gen).fill_(float("nan"))
    exp_out, exp_res = fused_add_rms_norm_ref(x, r, w, EPS)
    run_out(x, r, w, out=out, residual_out=res)
    assert_close(out, exp_out)
    assert_close(res, exp_res)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,row_pad", [(7, 768, 0), (33, 769, 11), (3, 70000, 0)])
def test_cuda_fused_add_rms_norm_out_no_weight(tokens, hidden, row_pad, dtype, gen):
    x, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    r, _ = _wide(tokens, hidden, dtype, row_pad, gen)
    out, res = run_out(x, r, None)
    exp_out, exp_res = float64_fused_add_rms_norm(x, r, None, EPS)
    assert_close(out, exp_out)
    assert_close(res, exp_res)
    xi, ri = x.clone(), r.clone()
    run_fused(xi, ri, None)
    assert torch.equal(out, xi) and torch.equal(res, ri)  # the in-place op's kernels


@pytest.mark.cuda
def test_cuda_fused_add_rms_norm_out_launcher_checks(gen):
    from compile_ops._extension import _C

    x = torch.randn(4, 16, device="cuda")
    r = torch.randn(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="residual_out must have dtype"):
        _C.fused_add_rms_norm_out(torch.empty_like(x), torch.empty_like(x).half(), x, r, None, EPS)
    with pytest.raises(RuntimeError, match="out must have the shape of input"):
        _C.fused_add_rms_norm_out(torch.empty(4, 17, device="cuda"), torch.empty_like(x), x, r,
                                  None, EPS)
    with pytest.raises(RuntimeError, match="residual_out rows overlap"):
        _C.fused_add_rms_norm_out(torch.empty_like(x),
                                  torch.empty(1, 16, device="cuda").expand(4, 16), x, r, None, EPS)
    with pytest.raises(ValueError, match="residual must be on device cuda:0"):
        ops.fused_add_rms_norm_out(torch.empty_like(x), torch.empty_like(x), x, r.cpu(), None, EPS)


@pytest.mark.cuda
def test_torch_compile_out_fullgraph_cuda(gen):
    _compile_out_check("cuda", torch.bfloat16, gen)


@pytest.mark.cuda
def test_torch_compile_out_cuda_graphs(gen):
    _compile_out_check("cuda", torch.bfloat16, gen, mode="reduce-overhead")
