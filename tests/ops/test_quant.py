"""FP8 activation quantization ops (static_scaled_fp8_quant, dynamic_scaled_fp8_quant,
dynamic_per_token_scaled_fp8_quant, per_token_group_fp8_quant): the references against an
independent float64 oracle written from vLLM's formulas, the registered ops, wrappers, fake,
opcheck, compile, errors, and (CUDA) the kernels byte for byte against the references.

Every FP8 output is compared as bytes (view as uint8) and every scale with torch.equal."""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compile_ops import quant as Q
from compile_ops.testing import assert_raises_eager_and_fake, quant_mismatch

ops = torch.ops.compile_ops
FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 8), (7, 769), (33, 4096)]
ROW_PADS = [0, 64, 11]
GPU_TOKENS = [1, 7, 128, 4099]
GPU_HIDDEN = [8, 768, 769, 4096, 5120, 8192]
# opcheck's schema test compares mutated tensors with allclose, which has no float8 kernel on
# the CPU: the other tests run.
OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def u8(t):
    return t.view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Independent oracle: float64 arithmetic, a rounding to float32 wherever vLLM's kernels hold a
# float32 (the exact quotient / product of float32 values rounded once, which float64 gives
# exactly), and e4m3fn codes found by search in the table of all finite e4m3fn values.
# ---------------------------------------------------------------------------------------------
def _e4m3_table():
    vals = []
    for code in range(0x7F):  # 0x00 .. 0x7E: +0 .. 448
        e, m = code >> 3, code & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


E4M3 = _e4m3_table()
F32_MIN_SF = float(torch.tensor(1 / (448 * 512), dtype=torch.float32))


def f32(t):
    return t.double().float().double()


def oracle_codes(y, nan_code):
    """float32-valued y -> e4m3fn codes: saturate to 448, round to nearest, ties to the even
    code; NaN -> nan_code."""
    y = y.double()
    a = y.abs().clamp(max=448.0)
    hi = torch.searchsorted(E4M3, a).clamp(max=0x7E)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - E4M3[lo], E4M3[hi] - a
    pick = torch.where(dlo < dhi, lo, torch.where(dhi < dlo, hi, torch.where(lo % 2 == 0, lo, hi)))
    code = pick | torch.where(torch.signbit(y), 0x80, 0)
    return torch.where(torch.isnan(y), nan_code, code).to(torch.uint8)


def nanless_abs(x):
    a = x.double().abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)


def oracle_static(x, grid, gm, gn):
    n = x.size(-1)
    x64 = x.double().reshape(-1, n)
    m = x64.size(0)
    s = grid.double()[torch.arange(m) // gm][:, torch.arange(n) // gn]
    inv = f32(1.0 / s)
    return oracle_codes(f32(x64 * inv), 0x7E).reshape(x.shape)


def oracle_dynamic(x):
    s = f32(nanless_abs(x).max() / 448.0)
    inv = f32(1.0 / s)
    return oracle_codes(f32(x.double() * inv), 0x7E), s.float().reshape(1)


def oracle_per_token(x, ub=None):
    a = nanless_abs(x).reshape(-1, x.size(-1)).max(dim=-1, keepdim=True).values
    if ub is not None and not torch.isnan(ub).item():
        a = torch.minimum(a, ub.double().reshape(()))
    s = torch.clamp(f32(a / 448.0), min=F32_MIN_SF)
    y = f32(x.double().reshape(s.size(0), -1) / s)
    return oracle_codes(y, 0x7E).reshape(x.shape), s.float()


def oracle_group(x, gs, eps, lo, hi, ue8m0):
    k = x.size(-1)
    xg = x.double().reshape(-1, k // gs, gs)
    eps32, lo32, hi32 = (float(torch.tensor(v, dtype=torch.float32)) for v in (eps, lo, hi))
    a = torch.clamp(nanless_abs(xg).max(dim=-1).values, min=eps32)
    s = f32(a / hi32)
    if ue8m0:
        floor = float(torch.tensor(1e-10, dtype=torch.float32))
        s = torch.pow(2.0, torch.ceil(torch.log2(torch.clamp(s.abs(), min=floor))))
        s = f32(s)
    y = f32(xg / s.unsqueeze(-1))
    y = torch.where(torch.isnan(y), torch.full_like(y, lo32), y.clamp(lo32, hi32))
    return (oracle_codes(y, 0xFF).reshape(x.shape),
            s.float().reshape(tuple(x.shape[:-1]) + (k // gs,)))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def special_rows(x):
    """Rows of zeros, NaN, +-inf, tiny values (below the per-token minimum scale), -0.0 and a
    single huge value, where the tensor has enough rows."""
    x = x.clone()
    k = x.size(-1)
    rows = x.reshape(-1, k) if x.is_contiguous() else None
    if rows is None or rows.size(0) < 7:
        if x.numel() > 2:
            x.view(-1)[1] = float("nan")
        return x
    rows[1] = 0
    rows[2, ::3] = float("nan")
    rows[3, 0] = float("inf")
    rows[3, -1] = float("-inf")
    rows[4] = rows[4] * 1e-6
    rows[5] = -0.0
    rows[6, k // 2] = 6e4 if x.dtype != torch.bfloat16 else 1e30
    return x


def make_x(tokens, hidden, dtype, gen, scale=4.0, row_pad=0, device="cpu"):
    """[tokens, hidden] with special rows; with row_pad, a row slice (row stride hidden +
    row_pad) of a wider tensor on `device` (made there, so the strides survive)."""
    base = torch.randn(tokens, hidden + row_pad, generator=gen) * scale
    x = special_rows(base[:, :hidden].contiguous()).to(dtype)
    if not row_pad:
        return x.to(device)
    base = base.to(dtype)
    base[:, :hidden] = x
    return base.to(device)[:, :hidden]


def static_cases(tokens, hidden, gen):
    """(name, scale, group_shape, oracle grid, gm, gn) for an input [tokens, hidden]."""
    r = lambda *s: torch.rand(*s, generator=gen) * 0.05 + 0.001  # noqa: E731
    cases = [("tensor_0d", r(()), None), ("tensor_1", r(1), None)]
    if hidden % 8 == 0:
        cases.append(("col_groups", r(hidden // 8), [-1, 8]))
        cases.append(("col_groups_explicit", r(hidden // 8), [tokens, 8]))
        cases.append(("grid_2d_t", r(hidden // 8, 1).t().contiguous().t()
                      if tokens == 1 else r(hidden // 8, tokens).t(), None))
    cases.append(("row_groups", r(tokens), [1, -1]))
    cases.append(("per_channel", r(hidden), [-1, 1]))
    cases.append(("grid_2d", r(tokens, 1), [1, hidden]))
    cases.append(("strided_1d", r(2 * tokens)[::2], [1, -1]))
    out = []
    for name, s, gshape in cases:
        if s.numel() == 1:
            grid, gm, gn = s.reshape(1, 1), tokens, hidden
        elif s.dim() == 2:
            grid, gm, gn = s, tokens // s.size(0), hidden // s.size(1)
        elif gshape[0] == -1 or gshape[0] == tokens:
            gn = hidden if gshape[1] == -1 else gshape[1]
            grid, gm = s.reshape(1, -1), tokens
        else:
            grid, gm, gn = s.reshape(-1, 1), 1, hidden
        out.append((name, s, gshape, grid, gm, gn))
    return out


# ---------------------------------------------------------------------------------------------
# References against the oracle
# ---------------------------------------------------------------------------------------------
def test_oracle_codes_match_torch_on_finite_values(gen):
    # The table search agrees with torch's own RNE cast inside the range, saturates outside.
    y = torch.cat([torch.randn(4000, generator=gen) * 100, E4M3.float(), -E4M3.float(),
                   (E4M3[:-1] + E4M3[1:]).float() / 2, torch.tensor([500.0, -1e9, -0.0])])
    assert torch.equal(oracle_codes(y, 0x7E), u8(y.clamp(-448, 448).to(FP8)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_static_ref_matches_oracle(dtype, tokens, hidden, gen):
    x = make_x(tokens, hidden, dtype, gen)
    for name, s, gshape, grid, gm, gn in static_cases(tokens, hidden, gen):
        got = Q.static_scaled_fp8_quant_ref(x, s, gshape)
        assert got.dtype == FP8 and got.shape == x.shape
        assert torch.equal(u8(got), oracle_static(x, grid, gm, gn)), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_dynamic_ref_matches_oracle(dtype, tokens, hidden, gen):
    x = make_x(tokens, hidden, dtype, gen)
    if tokens > 3:
        x[3] = 1.0  # no inf here: an inf amax makes every finite element 0 (tested below)
    q, s = Q.dynamic_scaled_fp8_quant_ref(x)
    eq, es = oracle_dynamic(x)
    assert torch.equal(s, es) and torch.equal(u8(q), eq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("ub", [None, 2.5, float("nan")], ids=["no_ub", "ub", "nan_ub"])
def test_per_token_ref_matches_oracle(dtype, tokens, hidden, ub, gen):
    x = make_x(tokens, hidden, dtype, gen)
    ubt = None if ub is None else torch.tensor([ub])
    q, s = Q.dynamic_per_token_scaled_fp8_quant_ref(x, ubt)
    eq, es = oracle_per_token(x, ubt)
    assert torch.equal(s, es) and torch.equal(u8(q), eq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,gs", [(1, 8, 8), (7, 768, 128), (33, 4096, 128),
                                             (5, 192, 64), (3, 96, 32)])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("eps,lo,hi", [(1e-10, -448.0, 448.0), (1e-4, -224.0, 224.0),
                                       (0.0, -448.0, 448.0)])
def test_group_ref_matches_oracle(dtype, tokens, hidden, gs, ue8m0, eps, lo, hi, gen):
    x = make_x(tokens, hidden, dtype, gen)
    q, s = Q.per_token_group_fp8_quant_ref(x, gs, eps, lo, hi, ue8m0)
    eq, es = oracle_group(x, gs, eps, lo, hi, ue8m0)
    assert torch.equal(s, es) and torch.equal(u8(q), eq)


def test_ue8m0_round_up_exact():
    v = torch.tensor([1.0, 1.0000001, 0.75, 3.0, 2.0 ** -30, 1e-12, 0.0, 3e38, float("inf"),
                      -5.0, 2.0 ** 127 * 1.5], dtype=torch.float32)
    want = torch.tensor([1.0, 2.0, 1.0, 4.0, 2.0 ** -30, 2.0 ** -33, 2.0 ** -33,
                         float("inf"), float("inf"), 8.0, float("inf")], dtype=torch.float32)
    assert torch.equal(Q.ue8m0_round_up_ref(v), want)


# ---------------------------------------------------------------------------------------------
# Special values (vLLM's CUDA behaviour, which the references reproduce)
# ---------------------------------------------------------------------------------------------
def test_special_values():
    x = torch.tensor([[0.0, float("nan"), float("inf"), -float("inf"), 1.0, -0.0]])
    q = Q.static_scaled_fp8_quant_ref(x, torch.tensor(1.0))
    assert u8(q).tolist() == [[0x00, 0x7E, 0x7E, 0xFE, 0x38, 0x80]]
    # A zero scale: 0 * inf = NaN -> +448, 1 * inf -> 448.
    assert u8(Q.static_scaled_fp8_quant_ref(x, torch.tensor(0.0)))[0, [0, 4]].tolist() == \
        [0x7E, 0x7E]
    # Dynamic per tensor, all zero: scale 0 (no minimum), every byte +448.
    q, s = Q.dynamic_scaled_fp8_quant_ref(torch.zeros(3, 16))
    assert s.item() == 0.0 and bool((u8(q) == 0x7E).all())
    # An inf amax: scale inf, finite x -> 0, inf / inf = NaN -> +448.
    q, s = Q.dynamic_scaled_fp8_quant_ref(x)
    assert s.item() == float("inf") and u8(q).tolist() == [[0, 0x7E, 0x7E, 0x7E, 0, 0x80]]
    # Per token, all zero: the minimum scale, zeros.
    q, s = Q.dynamic_per_token_scaled_fp8_quant_ref(torch.zeros(2, 8))
    assert bool((s == Q.FP8_MIN_SCALE).all()) and bool((u8(q) == 0).all())
    # Per group: NaN -> fp8_min (clamp order fminf(fmaxf(v, min), max)).
    q, s = Q.per_token_group_fp8_quant_ref(torch.tensor([[float("nan"), 1.0]]), 2)
    assert u8(q).tolist() == [[0xFE, 0x7E]] and s.item() == torch.tensor(1 / 448.0).item()
    # eps 0 on a zero group: 0 / 0 = NaN -> fp8_min.
    q, s = Q.per_token_group_fp8_quant_ref(torch.zeros(1, 4), 4, 0.0)
    assert s.item() == 0.0 and bool((u8(q) == 0xFE).all())


# ---------------------------------------------------------------------------------------------
# Registered ops on the CPU
# ---------------------------------------------------------------------------------------------
def fp8_like(x):
    return torch.full(x.shape, 0x55, dtype=torch.uint8, device=x.device).view(FP8)


def run_static(x, s, gshape=None):
    out = fp8_like(x)
    ops.static_scaled_fp8_quant(out, x, s, gshape)
    return out


def run_dynamic(x):
    out = fp8_like(x)
    s = torch.full((1,), 1e9, device=x.device)  # the op zeroes it itself
    ops.dynamic_scaled_fp8_quant(out, x, s)
    return out, s


def run_per_token(x, ub=None):
    out = fp8_like(x)
    s = torch.full((x.numel() // x.size(-1), 1), -1.0, device=x.device)
    ops.dynamic_per_token_scaled_fp8_quant(out, x, s, ub)
    return out, s


def run_group(x, gs, ue8m0=False, layout="row", eps=1e-10, lo=-448.0, hi=448.0, ten=True):
    q = fp8_like(x)
    t, g = x.numel() // x.size(-1), x.size(-1) // gs
    if layout == "row":
        s = torch.full(tuple(x.shape[:-1]) + (g,), -1.0, device=x.device)
    elif layout == "col":
        s = torch.full((g, t), -1.0, device=x.device).t()
    else:  # TMA-aligned column-major
        s = torch.full((g, (t + 3) // 4 * 4), -1.0, device=x.device).t()[:t]
    args = (x, q, s, gs, eps, lo, hi, ue8m0)
    ops.per_token_group_fp8_quant(*(args + ((layout != "row", layout == "tma") if ten else ())))
    return q, s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_pad", ROW_PADS)
def test_cpu_ops_match_reference(dtype, row_pad, gen):
    x = make_x(9, 80, dtype, gen, row_pad=row_pad)
    for name, s, gshape, *_ in static_cases(9, 80, gen):
        assert torch.equal(u8(run_static(x, s, gshape)),
                           u8(Q.static_scaled_fp8_quant_ref(x, s, gshape))), name
    q, s = run_dynamic(x)
    eq, es = Q.dynamic_scaled_fp8_quant_ref(x)
    assert torch.equal(s, es) and torch.equal(u8(q), u8(eq))
    for ub in (None, torch.tensor([0.5])):
        q, s = run_per_token(x, ub)
        eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(x, ub)
        assert torch.equal(s, es) and torch.equal(u8(q), u8(eq))
    xc = x.contiguous()
    for layout, ue8m0 in itertools.product(("row", "col", "tma"), (False, True)):
        q, s = run_group(xc, 16, ue8m0, layout)
        eq, es = Q.per_token_group_fp8_quant_ref(xc, 16, scale_ue8m0=ue8m0)
        assert torch.equal(s, es) and torch.equal(u8(q), u8(eq)), layout


def test_cpu_leading_dims(gen):
    x = make_x(6, 32, torch.bfloat16, gen).reshape(2, 3, 32)
    q, s = run_per_token(x)
    eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(x.reshape(6, 32))
    assert torch.equal(u8(q).reshape(6, 32), u8(eq)) and torch.equal(s, es)
    q, s = run_group(x, 8)
    assert s.shape == (2, 3, 4)
    eq, es = Q.per_token_group_fp8_quant_ref(x, 8)
    assert torch.equal(u8(q), u8(eq)) and torch.equal(s, es)


def test_group_eight_and_ten_arguments(gen):
    x = make_x(4, 64, torch.float16, gen)
    a = run_group(x, 32, ten=False)
    b = run_group(x, 32, ten=True)
    assert torch.equal(u8(a[0]), u8(b[0])) and torch.equal(a[1], b[1])
    schema = ops.per_token_group_fp8_quant.default._schema
    assert [str(a.default_value) for a in schema.arguments[-2:]] == ["False", "False"]


def test_schemas_are_vllms():
    want = {
        "static_scaled_fp8_quant": "(Tensor(a0!) result, Tensor input, Tensor scale, "
                                   "SymInt[]? group_shape=None) -> ()",
        "dynamic_scaled_fp8_quant": "(Tensor(a0!) result, Tensor input, Tensor(a2!) scale) -> ()",
        "dynamic_per_token_scaled_fp8_quant": "(Tensor(a0!) result, Tensor input, "
                                              "Tensor(a2!) scale, Tensor? scale_ub) -> ()",
        "per_token_group_fp8_quant": "(Tensor input, Tensor(a1!) output_q, Tensor(a2!) "
                                     "output_s, SymInt group_size, float eps, float fp8_min, "
                                     "float fp8_max, bool scale_ue8m0, bool "
                                     "dummy_is_scale_transposed=False, bool "
                                     "dummy_is_tma_aligned=False) -> ()",
    }
    for name, sig in want.items():
        s = str(getattr(ops, name).default._schema)
        assert s.replace("compile_ops::" + name, "") == sig, s


def test_zero_tokens():
    for dtype in DTYPES:
        x = torch.empty(0, 64, dtype=dtype)
        assert run_static(x, torch.tensor(1.0)).shape == (0, 64)
        q, s = run_dynamic(x)
        assert q.shape == (0, 64) and s.item() == 0.0
        q, s = run_per_token(x)
        assert s.shape == (0, 1)
        q, s = run_group(x, 16)
        assert s.shape == (0, 4)
        q, s = run_group(x, 16, layout="col")
        out, sc = Q.scaled_fp8_quant(x, use_per_token_if_dynamic=True)
        assert out.shape == (0, 64) and sc.shape == (0, 1)


# ---------------------------------------------------------------------------------------------
# Functional wrappers (vLLM's Python API)
# ---------------------------------------------------------------------------------------------
def test_scaled_fp8_quant_wrapper(gen):
    x = make_x(7, 96, torch.bfloat16, gen)
    out, s = Q.scaled_fp8_quant(x)
    eq, es = Q.dynamic_scaled_fp8_quant_ref(x)
    assert s.shape == (1,) and torch.equal(s, es) and torch.equal(u8(out), u8(eq))
    ub = torch.tensor([3.0])
    out, s = Q.scaled_fp8_quant(x, num_token_padding=10, scale_ub=ub,
                                use_per_token_if_dynamic=True)
    eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(x, ub)
    assert out.shape == (10, 96) and s.shape == (10, 1)
    assert torch.equal(u8(out[:7]), u8(eq)) and torch.equal(s[:7], es)
    st = torch.tensor([0.02])
    out, s = Q.scaled_fp8_quant(x, st)
    assert s is st and torch.equal(u8(out), u8(Q.static_scaled_fp8_quant_ref(x, st)))
    grid = torch.rand(7, 3, generator=gen) + 0.01
    buf = torch.empty(7, 96, dtype=FP8)
    out, _ = Q.scaled_fp8_quant(x, grid, output=buf, group_shape=(1, 32))
    assert out is buf
    assert torch.equal(u8(out), u8(Q.static_scaled_fp8_quant_ref(x, grid, [1, 32])))
    with pytest.raises(ValueError, match="scaled_fp8_quant: input must be 2-D"):
        Q.scaled_fp8_quant(x.reshape(7, 2, 48))


def test_per_token_group_quant_fp8_wrapper(gen):
    x = make_x(10, 256, torch.float16, gen)
    eq, es = Q.per_token_group_fp8_quant_ref(x, 128)
    q, s = Q.per_token_group_quant_fp8(x, 128)
    assert s.stride() == (2, 1) and torch.equal(u8(q), u8(eq)) and torch.equal(s, es)
    q, s = Q.per_token_group_quant_fp8(x, 128, column_major_scales=True)
    assert s.stride() == (1, 10) and torch.equal(s, es)
    q, s = Q.per_token_group_quant_fp8(x, 128, column_major_scales=True, tma_aligned_scales=True)
    assert s.stride() == (1, 12) and torch.equal(s, es)
    eq, es = Q.per_token_group_fp8_quant_ref(x, 64, 1e-6, scale_ue8m0=True)
    q, s = Q.per_token_group_quant_fp8(x, 64, eps=1e-6, use_ue8m0=True)
    assert torch.equal(u8(q), u8(eq)) and torch.equal(s, es)


# ---------------------------------------------------------------------------------------------
# opcheck, fake kernels, torch.compile
# ---------------------------------------------------------------------------------------------
def _opcheck_all(device, gen):
    for dtype, (tokens, hidden), pad in itertools.product(DTYPES, [(1, 8), (7, 96)], [0, 11]):
        x = make_x(tokens, hidden, dtype, gen, row_pad=pad, device=device)
        out = torch.empty(x.shape, dtype=FP8, device=device)
        one = torch.tensor([0.05], device=device)
        grid = torch.rand(tokens, hidden // 8, generator=gen).add(0.01).to(device)
        for args in [(out, x, one, None), (out, x, grid, None),
                     (out, x, grid.reshape(-1) if tokens == 1 else grid[:, 0].contiguous(),
                      [1, -1] if tokens > 1 else [-1, 8])]:
            torch.library.opcheck(ops.static_scaled_fp8_quant.default, args,
                                  test_utils=OPCHECK_UTILS)
        torch.library.opcheck(ops.dynamic_scaled_fp8_quant.default,
                              (out, x, torch.empty(1, device=device)), test_utils=OPCHECK_UTILS)
        for ub in (None, torch.tensor([1.0], device=device)):
            torch.library.opcheck(ops.dynamic_per_token_scaled_fp8_quant.default,
                                  (out, x, torch.empty(tokens, 1, device=device), ub),
                                  test_utils=OPCHECK_UTILS)
        xc = x.contiguous()
        torch.library.opcheck(ops.per_token_group_fp8_quant.default,
                              (xc, out, torch.empty(tokens, hidden // 8, device=device), 8,
                               1e-10, -448.0, 448.0, pad == 11), test_utils=OPCHECK_UTILS)
        torch.library.opcheck(ops.per_token_group_fp8_quant.default,
                              (xc, out, torch.empty(hidden // 8, tokens, device=device).t(), 8,
                               1e-10, -448.0, 448.0, False, True, False),
                              test_utils=OPCHECK_UTILS)


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


def test_fake_matches_real_metadata(gen):
    x = make_x(6, 64, torch.bfloat16, gen)
    real = [Q.scaled_fp8_quant(x), Q.scaled_fp8_quant(x, use_per_token_if_dynamic=True,
                                                      num_token_padding=8),
            Q.per_token_group_quant_fp8(x, 32, column_major_scales=True)]
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake = [Q.scaled_fp8_quant(fx), Q.scaled_fp8_quant(fx, use_per_token_if_dynamic=True,
                                                           num_token_padding=8),
                Q.per_token_group_quant_fp8(fx, 32, column_major_scales=True)]
    for r, f in zip(itertools.chain(*real), itertools.chain(*fake)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


class QuantModule(torch.nn.Module):
    def forward(self, x, s):
        a, _ = Q.scaled_fp8_quant(x, s)
        b, bs = Q.scaled_fp8_quant(x, use_per_token_if_dynamic=True)
        c, cs = Q.scaled_fp8_quant(x)
        d, ds = Q.per_token_group_quant_fp8(x, 16, column_major_scales=True)
        return a, b, bs, c, cs, d, ds


def test_torch_compile_cpu(gen):
    torch._dynamo.reset()
    model = QuantModule()
    x = make_x(5, 64, torch.bfloat16, gen)
    s = torch.tensor([0.03])
    got = torch.compile(model, fullgraph=True)(x, s)
    for a, b in zip(got, model(x, s)):
        assert torch.equal(u8(a) if a.dtype == FP8 else a, u8(b) if b.dtype == FP8 else b)


# ---------------------------------------------------------------------------------------------
# Bad inputs: named errors, eagerly and under FakeTensorMode, nothing written
# ---------------------------------------------------------------------------------------------
def _bad_calls():
    x = lambda: torch.randn(4, 16)  # noqa: E731
    o = lambda *s: torch.empty(*(s or (4, 16)), dtype=FP8)  # noqa: E731
    one = lambda: torch.tensor([0.1])  # noqa: E731
    st, dy, pt, gq = (ops.static_scaled_fp8_quant, ops.dynamic_scaled_fp8_quant,
                      ops.dynamic_per_token_scaled_fp8_quant, ops.per_token_group_fp8_quant)
    return [
        ("st_input_int", lambda: st(o(), x().int(), one()), TypeError,
         "static_scaled_fp8_quant: input must be float32"),
        ("st_result_dtype", lambda: st(torch.empty(4, 16), x(), one()), TypeError,
         "result must have dtype torch.float8_e4m3fn"),
        ("st_result_shape", lambda: st(o(4, 17), x(), one()), ValueError,
         "result must have the shape of input"),
        ("st_scale_dtype", lambda: st(o(), x(), one().half()), TypeError,
         "scale must have dtype torch.float32"),
        ("st_scale_1d_no_group", lambda: st(o(), x(), torch.rand(4)), ValueError,
         "needs group_shape"),
        ("st_scale_1d_bad_len", lambda: st(o(), x(), torch.rand(3), [1, -1]), ValueError,
         "scale must have 4 elements"),
        ("st_scale_1d_both", lambda: st(o(), x(), torch.rand(4), [2, 8]), ValueError,
         "per column group"),
        ("st_scale_2d_indivisible", lambda: st(o(), x(), torch.rand(3, 2)), ValueError,
         "must divide the input"),
        ("st_group_mismatch", lambda: st(o(), x(), torch.rand(2, 2), [1, 8]), ValueError,
         "does not match the scale's groups"),
        ("st_group_bad", lambda: st(o(), x(), torch.rand(2, 2), [0, 8]), ValueError,
         "group_shape entries must be positive or -1"),
        ("st_scale_3d", lambda: st(o(), x(), torch.rand(2, 2, 2)), ValueError,
         "scale must be 0-d, one element, 1-D or 2-D"),
        ("st_input_transposed", lambda: st(o(16, 4), x().t(), one()), ValueError,
         "input must be contiguous in its last dimension"),
        ("st_result_rows_overlap", lambda: st(o(1, 16).expand(4, 16), x(), one()), ValueError,
         "result rows overlap in memory"),
        ("st_scale_device", lambda: st(o(), x(), torch.empty(1, device="meta")), ValueError,
         "scale must be on device cpu"),
        ("dy_scale_empty", lambda: dy(o(), x(), torch.empty(0)), ValueError,
         "scale must have at least one element"),
        ("dy_scale_dtype", lambda: dy(o(), x(), torch.empty(1, dtype=torch.float64)), TypeError,
         "dynamic_scaled_fp8_quant: scale must have dtype torch.float32"),
        ("pt_scale_count", lambda: pt(o(), x(), torch.empty(3, 1), None), ValueError,
         "scale must have one element per token"),
        ("pt_scale_overlap", lambda: pt(o(), x(), torch.empty(1, 1).expand(4, 1), None),
         ValueError, "scale rows overlap in memory"),
        ("pt_ub_count", lambda: pt(o(), x(), torch.empty(4, 1), torch.ones(2)), ValueError,
         "scale_ub must have one element"),
        ("pt_ub_dtype", lambda: pt(o(), x(), torch.empty(4, 1), torch.ones(1).half()),
         TypeError, "scale_ub must have dtype torch.float32"),
        ("gq_input_strided", lambda: gq(x()[:, ::2], o(4, 8), torch.empty(4, 1), 8, 1e-10,
                                        -448.0, 448.0, False), ValueError,
         "per_token_group_fp8_quant: input must be contiguous"),
        ("gq_group_size", lambda: gq(x(), o(), torch.empty(4, 2), 6, 1e-10, -448.0, 448.0,
                                     False), ValueError, "group_size must be positive and divide"),
        ("gq_output_s_shape", lambda: gq(x(), o(), torch.empty(4, 3), 8, 1e-10, -448.0, 448.0,
                                         False), ValueError, "output_s must have shape"),
        ("gq_output_s_overlap", lambda: gq(x(), o(), torch.empty(1, 2).expand(4, 2), 8, 1e-10,
                                           -448.0, 448.0, False), ValueError,
         "output_s elements overlap in memory"),
        ("gq_output_q_dtype", lambda: gq(x(), torch.empty(4, 16, dtype=torch.int8),
                                         torch.empty(4, 2), 8, 1e-10, -448.0, 448.0, False),
         TypeError, "output_q must have dtype torch.float8_e4m3fn"),
        ("gq_eps", lambda: gq(x(), o(), torch.empty(4, 2), 8, -1.0, -448.0, 448.0, False),
         ValueError, "eps must be >= 0"),
        ("gq_min_max", lambda: gq(x(), o(), torch.empty(4, 2), 8, 1e-10, 448.0, -448.0, False),
         ValueError, "fp8_min must be less than fp8_max"),
        ("gq_max_inf", lambda: gq(x(), o(), torch.empty(4, 2), 8, 1e-10, -448.0,
                                  float("inf"), False), ValueError, "fp8_max must be finite"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_eager_and_fake(case):
    _, call, exc, fragment = case
    assert_raises_eager_and_fake(call, exc, fragment)


def test_errors_write_nothing():
    x = torch.randn(4, 16)
    out = fp8_like(x)
    scale = torch.full((4, 1), 7.0)
    with pytest.raises(ValueError):
        ops.dynamic_per_token_scaled_fp8_quant(out, x, scale, torch.ones(2))
    with pytest.raises(ValueError):
        ops.static_scaled_fp8_quant(out, x, torch.rand(3), [1, -1])
    assert bool((u8(out) == 0x55).all()) and bool((scale == 7.0).all())


def test_overlapping_outputs_rejected():
    buf = torch.empty(64, dtype=torch.uint8)
    x = torch.randn(4, 4)
    out = buf.view(FP8).reshape(4, 16)[:, :4]
    scale = buf[60:64].view(torch.float32)
    with pytest.raises(ValueError, match="scale and result overlap in memory"):
        ops.dynamic_scaled_fp8_quant(buf.view(FP8)[48:64].reshape(4, 4), x, scale)
    ops.dynamic_scaled_fp8_quant(out, x, scale)  # disjoint columns of one buffer: fine
    with pytest.raises(ValueError, match="result and input overlap in memory"):
        y = torch.randn(4, 4)
        ops.static_scaled_fp8_quant(y.view(FP8)[:, :4], y, torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# CUDA kernels: byte for byte against the references over the shared grid
# ---------------------------------------------------------------------------------------------
def _same(q, s, eq, es, x=None, tag=""):
    """q, s (the kernel's) equal eq, es (the reference's) byte for byte, else a message that says
    which codes / scales differ, with the source values and scales there."""
    ok_s = s is None or torch.equal(s.cpu(), es)
    assert ok_s and torch.equal(u8(q).cpu(), u8(eq)), f"{tag}: " + (quant_mismatch(
        q, eq, source=x, scales=s, want_scales=es) or "scales differ")


def _cuda_x(tokens, hidden, dtype, row_pad, gen):
    x = make_x(tokens, hidden, dtype, gen, row_pad=row_pad, device="cuda")
    assert x.stride(0) == hidden + row_pad or tokens == 1
    return x


@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype, tokens, hidden, row_pad, gen):
    x = _cuda_x(tokens, hidden, dtype, row_pad, gen)
    xc = x.cpu()
    tag = f"{dtype} {tokens}x{hidden} pad {row_pad}"
    for name, s, gshape, *_ in static_cases(tokens, hidden, gen):
        got = run_static(x, s.cuda(), gshape)
        _same(got, None, Q.static_scaled_fp8_quant_ref(xc, s, gshape), None, xc,
              f"static {name} {tag}")
    q, s = run_dynamic(x)
    eq, es = Q.dynamic_scaled_fp8_quant_ref(xc)
    _same(q, s, eq, es, xc, f"dynamic {tag}")
    for ub in (None, torch.tensor([1.5])):
        q, s = run_per_token(x, None if ub is None else ub.cuda())
        eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(xc, ub)
        _same(q, s, eq, es, xc, f"token ub={ub} {tag}")


@pytest.mark.cuda
@pytest.mark.parametrize("gs", [128, 64, 32, 8])
@pytest.mark.parametrize("hidden", [768, 4096, 7168])
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_group_matches_reference(dtype, tokens, hidden, gs, gen):
    x = make_x(tokens, hidden, dtype, gen).cuda()
    for ue8m0 in (False, True):
        eq, es = Q.per_token_group_fp8_quant_ref(x.cpu(), gs, scale_ue8m0=ue8m0)
        for layout in ("row", "col", "tma"):
            q, s = run_group(x, gs, ue8m0, layout)
            _same(q, s, eq, es, x, f"{layout} ue8m0={ue8m0}")


@pytest.mark.cuda
@pytest.mark.parametrize("gs", [4096, 2048, 96, 24, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_group_odd_sizes_and_misaligned(dtype, gs, gen):
    k = gs * 3
    base = make_x(5, k + 1, dtype, gen).cuda()
    for x in (base[:, :k].contiguous(), base.reshape(-1)[1:1 + 5 * k].reshape(5, k)):
        q, s = run_group(x, gs, False, "row", eps=1e-4, lo=-200.0, hi=300.0)
        eq, es = Q.per_token_group_fp8_quant_ref(x.cpu(), gs, 1e-4, -200.0, 300.0)
        _same(q, s, eq, es, x, f"gs={gs}")


@pytest.mark.cuda
def test_cuda_long_rows_two_pass(gen):
    # Rows longer than the register-cached kernels hold (per token) and a misaligned one.
    for dtype, hidden in [(torch.float32, 16384), (torch.bfloat16, 32768), (torch.float16, 5001)]:
        x = make_x(3, hidden, dtype, gen).cuda()
        q, s = run_per_token(x)
        eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(x.cpu())
        _same(q, s, eq, es, x, f"token {dtype} {hidden}")
        q, s = run_dynamic(x)
        eq, es = Q.dynamic_scaled_fp8_quant_ref(x.cpu())
        _same(q, s, eq, es, x, f"dynamic {dtype} {hidden}")


@pytest.mark.cuda
def test_cuda_special_values_and_empty():
    x = torch.tensor([[0.0, float("nan"), float("inf"), -float("inf"), 1.0, -0.0, 3.0, 2.0]])
    xc = x.cuda()
    assert torch.equal(u8(run_static(xc, torch.tensor(1.0, device="cuda"))).cpu(),
                       u8(Q.static_scaled_fp8_quant_ref(x, torch.tensor(1.0))))
    q, s = run_dynamic(torch.zeros(3, 16, device="cuda"))
    assert s.item() == 0.0 and bool((u8(q) == 0x7E).all())
    q, s = run_dynamic(xc)
    eq, es = Q.dynamic_scaled_fp8_quant_ref(x)
    assert torch.equal(s.cpu(), es) and torch.equal(u8(q).cpu(), u8(eq))
    q, s = run_group(xc, 4)
    eq, es = Q.per_token_group_fp8_quant_ref(x, 4)
    assert torch.equal(s.cpu(), es) and torch.equal(u8(q).cpu(), u8(eq))
    e = torch.empty(0, 64, device="cuda")
    q, s = run_dynamic(e)
    assert s.item() == 0.0
    run_per_token(e)
    run_group(e, 16)
    run_static(e, torch.tensor(1.0, device="cuda"))


@pytest.mark.cuda
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@pytest.mark.cuda
def test_cuda_graph(gen):
    x = make_x(64, 1024, torch.bfloat16, gen).cuda()
    q1 = torch.empty(x.shape, dtype=FP8, device="cuda")
    s1 = torch.empty(1, device="cuda")
    q2 = torch.empty(x.shape, dtype=FP8, device="cuda")
    s2 = torch.empty(64, 1, device="cuda")
    q3 = torch.empty(x.shape, dtype=FP8, device="cuda")
    s3 = torch.empty(64, 8, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.dynamic_scaled_fp8_quant(q1, x, s1)
        ops.dynamic_per_token_scaled_fp8_quant(q2, x, s2, None)
        ops.per_token_group_fp8_quant(x, q3, s3, 128, 1e-10, -448.0, 448.0, True)
    x.copy_(make_x(64, 1024, torch.bfloat16, gen).cuda())
    g.replay()
    g.replay()  # the dynamic scale is re-zeroed inside the graph
    torch.cuda.synchronize()
    xc = x.cpu()
    eq, es = Q.dynamic_scaled_fp8_quant_ref(xc)
    assert torch.equal(s1.cpu(), es) and torch.equal(u8(q1).cpu(), u8(eq))
    eq, es = Q.dynamic_per_token_scaled_fp8_quant_ref(xc)
    assert torch.equal(s2.cpu(), es) and torch.equal(u8(q2).cpu(), u8(eq))
    eq, es = Q.per_token_group_fp8_quant_ref(xc, 128, scale_ue8m0=True)
    assert torch.equal(s3.cpu(), es) and torch.equal(u8(q3).cpu(), u8(eq))
