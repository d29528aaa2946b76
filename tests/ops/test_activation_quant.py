"""silu_and_mul_quant and silu_and_mul_per_block_quant: references against independent float64
oracles, hand-checked special values (NaN / inf / zero groups, scale_ub), the registered ops on
CPU (layouts, wrappers, empty inputs), fake / opcheck / torch.compile, errors, CUDA kernels
byte for byte against the reference run on the same device."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compile_ops import activation_quant as AQ
from compile_ops._fp8 import FP8_MIN_SCALE, INT8_MIN_SCALE
from compile_ops.activation_quant import (silu_and_mul_per_block_quant_ref,
                                          silu_and_mul_quant_ref)
from compile_ops.testing import (assert_raises_eager_and_fake, ordered_codes as ordered,
                                 quant_mismatch, special_gate_up_rows)

ops = torch.ops.compile_ops
FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QDTYPES = [FP8, torch.int8]

GPU_TOKENS = [1, 7, 128, 4099]
GPU_HIDDEN = [8, 768, 769, 4096, 5120, 8192]
# 0 = contiguous, 64 = strided rows kept 16-byte aligned, 11 = misaligned rows (scalar path).
ROW_PADS = [0, 64, 11]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def rows(tokens, width, dtype, device="cpu", *, row_pad=0, gen=None, scale=1.0):
    base = (torch.randn(tokens, width + row_pad, generator=gen) * scale).to(dtype=dtype,
                                                                             device=device)
    return base[:, :width] if row_pad else base


def assert_codes_within_one(got, expected, max_frac=0.01):
    d = (ordered(got.cpu()) - ordered(expected.cpu())).abs()
    assert d.max().item() <= 1 if d.numel() else True, f"max code distance {d.max().item()}"
    assert (d != 0).float().mean().item() <= max_frac, f"{(d != 0).sum().item()} codes differ"


def same_bytes(a, b):
    return torch.equal(a.cpu().view(torch.uint8) if a.dtype == FP8 else a.cpu(),
                       b.cpu().view(torch.uint8) if b.dtype == FP8 else b.cpu())


def scales_buffer(tokens, groups, transposed, device="cpu", fill=float("nan")):
    if transposed:
        return torch.full((groups, tokens), fill, device=device).t()
    return torch.full((tokens, groups), fill, device=device)


def f64_silu_and_mul_quant(x, scale):
    """Independent oracle: silu in float64, the two roundings to T, 1/scale in float32."""
    d = x.shape[-1] // 2
    g, u = x[..., :d].double(), x[..., d:].double()
    s = (g * torch.sigmoid(g)).to(x.dtype).double()
    p = (s * u).to(x.dtype).double()
    inv = (1.0 / scale.double().reshape(())).float().double()
    y = (p * inv).clamp(-448.0, 448.0)
    return y.float().to(FP8)


def f64_per_block(x, gs, qdtype, scale_ub=None):
    """Independent oracle: float64 silu * up, group amax, the scale bound, min scale."""
    d = x.shape[-1] // 2
    g, u = x[:, :d].double(), x[:, d:].double()
    r = (g * torch.sigmoid(g) * u).reshape(x.shape[0], d // gs, gs)
    qmax, min_s = (448.0, FP8_MIN_SCALE) if qdtype == FP8 else (127.0, INT8_MIN_SCALE)
    s = r.abs().amax(-1) / qmax
    if scale_ub is not None:
        s = s.clamp(max=float(scale_ub))
    s = s.clamp(min=min_s)
    y = (r / s.unsqueeze(-1)).reshape(x.shape[0], d)
    if qdtype == FP8:
        q = y.clamp(-448.0, 448.0).float().to(FP8)
    else:
        q = y.round().clamp(-128, 127).to(torch.int8)
    return q, s.float()


def run_quant(x, scale):
    out = torch.empty(tuple(x.shape[:-1]) + (x.shape[-1] // 2,), dtype=FP8, device=x.device)
    out.view(torch.uint8).fill_(0x55)
    ops.silu_and_mul_quant(out, x, scale)
    return out


def run_block(x, gs, qdtype=FP8, scale_ub=None, transposed=False):
    d = x.shape[-1] // 2
    out = torch.empty(x.shape[0], d, dtype=qdtype, device=x.device)
    out.view(torch.uint8).fill_(0x55)
    s = scales_buffer(x.shape[0], d // gs, transposed, x.device)
    ops.silu_and_mul_per_block_quant(out, x, s, gs, scale_ub, transposed)
    return out, s


# ---------------------------------------------------------------------------------------------
# References against independent oracles (CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,d", [(1, 8), (7, 769), (33, 256), (3, 4096)])
def test_quant_reference_matches_float64(dtype, tokens, d, gen):
    x = rows(tokens, 2 * d, dtype, gen=gen, scale=3.0)
    for sc in (0.02, 1.0, -0.5):
        scale = torch.tensor([sc])
        assert_codes_within_one(silu_and_mul_quant_ref(x, scale), f64_silu_and_mul_quant(x, scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("gs", [64, 128])
@pytest.mark.parametrize("tokens,d", [(1, 128), (7, 768), (33, 256), (3, 4096)])
def test_per_block_reference_matches_float64(dtype, qdtype, gs, tokens, d, gen):
    x = rows(tokens, 2 * d, dtype, gen=gen, scale=2.0)
    ubs = [None, torch.tensor([0.005])] if qdtype == FP8 else [None]
    for ub in ubs:
        q, s = silu_and_mul_per_block_quant_ref(x, gs, qdtype, ub)
        eq, es = f64_per_block(x, gs, qdtype, ub)
        assert q.dtype == qdtype and s.dtype == torch.float32
        assert s.shape == (tokens, d // gs)
        torch.testing.assert_close(s, es, rtol=2e-6, atol=0)
        assert_codes_within_one(q, eq)


def test_per_block_result_is_not_rounded_to_dtype(gen):
    # r = silu(g) * u stays float32: with bf16 inputs the FP8 codes differ from quantizing the
    # bf16-rounded product (what vLLM's own test oracle does) for some elements.
    x = rows(16, 2 * 1024, torch.bfloat16, gen=gen)
    q, s = silu_and_mul_per_block_quant_ref(x, 128)
    g, u = x[:, :1024].float(), x[:, 1024:].float()
    r_rounded = (torch.nn.functional.silu(g).bfloat16().float() * u).bfloat16().float()
    q2 = (r_rounded.view(16, 8, 128) / s.unsqueeze(-1)).clamp(-448, 448).to(FP8).view(16, 1024)
    assert not same_bytes(q, q2)


def test_quant_rounds_to_dtype_twice():
    # T(T(silu(x)) * y) differs from the fp32 product for some bf16 inputs: check a known value.
    x = torch.tensor([[1.3, 1.7]], dtype=torch.bfloat16)
    g, u = x[0, 0].float(), x[0, 1].float()
    s = (g / (1 + torch.exp(-g))).bfloat16().float()
    p = (s * u).bfloat16().float()
    got = silu_and_mul_quant_ref(x, torch.tensor([1.0]))
    assert got.float().item() == p.to(FP8).float().item()


# ---------------------------------------------------------------------------------------------
# Special values, exactly (references and the CPU ops)
# ---------------------------------------------------------------------------------------------
def test_quant_special_values():
    inf, nan = float("inf"), float("nan")
    g = torch.tensor([nan, 1.0, inf, -inf, 0.0, 20.0, 2.0, -3.0])
    u = torch.tensor([1.0, nan, 1.0, 1.0, 5.0, 1e4, 0.0, 1.0])
    x = torch.cat([g, u]).unsqueeze(0)
    codes = run_quant(x, torch.tensor([1.0])).view(torch.uint8)[0].tolist()
    # NaN -> +448 (0x7E); inf * 1 -> 448; -inf: silu(-inf) = -inf / inf = NaN -> +448;
    # 0 -> 0; huge -> 448; x * 0 = 0; -3 * sigmoid(-3) = -0.1423 -> fp8.
    neg = (torch.tensor(-3.0) / (1 + torch.exp(torch.tensor(3.0)))).to(FP8).view(torch.uint8)
    assert codes == [0x7E, 0x7E, 0x7E, 0x7E, 0x00, 0x7E, 0x00, neg.item()]
    # Zero scale: inv = inf, p * inf -> +-inf (clamped) or NaN (0 * inf -> +448).
    z = run_quant(torch.tensor([[1.0, 0.0, -1.0, 2.0, 2.0, 2.0]]), torch.tensor([0.0]))
    assert z.view(torch.uint8)[0].tolist() == [0x7E, 0x7E, 0xFE]
    # Negative scale flips the sign; a 0-d scale is accepted.
    a = run_quant(torch.tensor([[1.0, 2.0]]), torch.tensor(-0.25))
    b = run_quant(torch.tensor([[1.0, 2.0]]), torch.tensor([0.25]))
    assert a.float().item() == -b.float().item() != 0


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_per_block_special_groups(qdtype):
    inf, nan = float("inf"), float("nan")
    gs, groups = 64, 6
    d = gs * groups
    g = torch.randn(d, generator=torch.Generator().manual_seed(1))
    u = torch.ones(d)
    g[0:gs] = 0.0                      # group 0: all zero -> MIN_SCALE, codes 0
    g[gs + 3] = nan                    # group 1: one NaN -> +448 / 0 for it, scale from the rest
    g[2 * gs:3 * gs] = nan             # group 2: all NaN -> NaN amax -> MIN_SCALE
    g[3 * gs + 5] = inf                # group 3: inf -> scale inf, inf/inf NaN, finite -> 0
    g[4 * gs + 7] = -inf               # group 4: -inf * sigmoid(-inf) = -inf * 0 = NaN
    u[5 * gs:6 * gs] = 0.0             # group 5: up zero -> zero group
    x = torch.cat([g, u]).unsqueeze(0)
    q, s = run_block(x, gs, qdtype)
    qmax, min_s = (448.0, FP8_MIN_SCALE) if qdtype == FP8 else (127.0, INT8_MIN_SCALE)
    nan_code = 0x7E if qdtype == FP8 else 0
    c = q.view(torch.uint8)[0] if qdtype == FP8 else q[0]
    s = s[0]
    assert s[0].item() == min_s and (q[0, 0:gs].float() == 0).all()
    r = g[gs:2 * gs] * (torch.ones(gs) / (1 + torch.exp(-g[gs:2 * gs])))
    finite = r[~r.isnan()]
    assert s[1].item() == max((finite.abs().max() / torch.tensor(qmax)).item(), min_s)
    assert c[gs + 3].item() == nan_code
    assert s[2].item() == min_s and (c[2 * gs:3 * gs] == nan_code).all()
    assert s[3].item() == inf
    assert c[3 * gs + 5].item() == nan_code and (q[0, 3 * gs:3 * gs + 5].float() == 0).all()
    assert s[4].item() > 0 and c[4 * gs + 7].item() == nan_code
    assert s[5].item() == min_s and (q[0, 5 * gs:].float() == 0).all()
    assert same_bytes(q, silu_and_mul_per_block_quant_ref(x, gs, qdtype)[0])


def test_per_block_scale_ub_bounds_the_scale():
    gs = 64
    x = torch.cat([torch.full((gs,), 3.0), torch.linspace(-10, 10, gs)]).unsqueeze(0)
    q0, s0 = run_block(x, gs)
    ub = float(s0[0, 0]) / 4
    q1, s1 = run_block(x, gs, scale_ub=torch.tensor([ub]))
    # vLLM bounds the scale (min(amax / 448, ub)), not the amax (which would give ub / 448).
    assert s1[0, 0].item() == torch.tensor(ub).item()
    assert (q1.float().abs() == 448).sum() > 0
    # A bound above the scale changes nothing; a bound below MIN_SCALE gives MIN_SCALE.
    q2, s2 = run_block(x, gs, scale_ub=torch.tensor(1e9))
    assert same_bytes(q2, q0) and torch.equal(s2, s0)
    _, s3 = run_block(x, gs, scale_ub=torch.tensor([1e-12]))
    assert s3[0, 0].item() == FP8_MIN_SCALE
    # All-NaN group with a bound: fminf(NaN, ub) = ub, as vLLM's fmaxf tree gives NaN there.
    xn = torch.cat([torch.full((gs,), float("nan")), torch.ones(gs)]).unsqueeze(0)
    _, s4 = run_block(xn, gs, scale_ub=torch.tensor([0.5]))
    assert s4[0, 0].item() == 0.5


# ---------------------------------------------------------------------------------------------
# Registered ops on CPU: layouts, wrappers, empty inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_pad", ROW_PADS)
def test_cpu_ops_match_reference(dtype, row_pad, gen):
    x = rows(9, 2 * 256, dtype, row_pad=row_pad, gen=gen)
    scale = torch.tensor([0.01])
    assert same_bytes(run_quant(x, scale), silu_and_mul_quant_ref(x, scale))
    for qdtype in QDTYPES:
        for transposed in (False, True):
            q, s = run_block(x, 128, qdtype, transposed=transposed)
            eq, es = silu_and_mul_per_block_quant_ref(x, 128, qdtype)
            assert same_bytes(q, eq) and torch.equal(s, es)
            if transposed:
                assert s.stride() == (1, 9)


def test_cpu_quant_leading_dims_and_wrapper(gen):
    x = torch.randn(2, 3, 2 * 40, generator=gen).bfloat16()
    scale = torch.tensor([0.05])
    out = AQ.silu_and_mul_quant(x, scale)
    assert out.shape == (2, 3, 40) and out.dtype == FP8
    assert same_bytes(out, silu_and_mul_quant_ref(x.reshape(6, 80), scale).reshape(2, 3, 40))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_per_block_wrapper(qdtype, transposed, gen):
    x = rows(5, 2 * 384, torch.float16, gen=gen)
    x0 = x.clone()
    out, scales = AQ.silu_and_mul_per_block_quant(x, 64, qdtype, None, transposed)
    assert torch.equal(x, x0)
    assert out.shape == (5, 384) and out.dtype == qdtype
    assert scales.shape == (5, 6) and scales.stride() == ((1, 5) if transposed else (6, 1))
    eq, es = silu_and_mul_per_block_quant_ref(x, 64, qdtype)
    assert same_bytes(out, eq) and torch.equal(scales, es)


def test_empty_inputs_do_nothing():
    scale = torch.tensor([1.0])
    assert AQ.silu_and_mul_quant(torch.empty(0, 16), scale).shape == (0, 8)
    assert AQ.silu_and_mul_quant(torch.empty(3, 0), scale).shape == (3, 0)
    out, s = AQ.silu_and_mul_per_block_quant(torch.empty(0, 256), 128)
    assert out.shape == (0, 128) and s.shape == (0, 1)
    out, s = AQ.silu_and_mul_per_block_quant(torch.empty(4, 0), 64, is_scale_transposed=True)
    assert out.shape == (4, 0) and s.shape == (4, 0)


def test_broadcast_input_rows(gen):
    row = torch.randn(1, 2 * 128, generator=gen)
    x = row.expand(4, 256)
    q, s = run_block(x, 64)
    eq, es = silu_and_mul_per_block_quant_ref(row, 64)
    assert same_bytes(q, eq.expand(4, 128)) and torch.equal(s, es.expand(4, 2))


# ---------------------------------------------------------------------------------------------
# Schema, fake kernels, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_schemas():
    assert str(ops.silu_and_mul_quant.default._schema) == (
        "compile_ops::silu_and_mul_quant(Tensor(a0!) result, Tensor input, Tensor scale) -> ()")
    assert str(ops.silu_and_mul_per_block_quant.default._schema) == (
        "compile_ops::silu_and_mul_per_block_quant(Tensor(a0!) out, Tensor input, "
        "Tensor(a2!) scales, SymInt group_size, Tensor? scale_ub=None, "
        "bool is_scale_transposed=False) -> ()")


@pytest.mark.parametrize("transposed", [False, True])
def test_fake_matches_real_metadata(transposed, gen):
    x = rows(6, 2 * 256, torch.bfloat16, gen=gen)
    real = AQ.silu_and_mul_per_block_quant(x, 128, FP8, torch.tensor([1.0]), transposed)
    real_q = AQ.silu_and_mul_quant(x, torch.tensor([0.1]))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fake = AQ.silu_and_mul_per_block_quant(fx, 128, FP8, mode.from_tensor(torch.ones(1)),
                                               transposed)
        fake_q = AQ.silu_and_mul_quant(fx, mode.from_tensor(torch.tensor([0.1])))
    for a, b in zip(list(real) + [real_q], list(fake) + [fake_q]):
        assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype,
                                                             b.device)


# FP8 outputs: every check but test_schema, whose SchemaCheckMode compares the mutated output
# with torch.allclose, which has no float8 kernel (as tests/ops/test_attention.py).
NO_SCHEMA = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def _opcheck_all(device, gen):
    for dtype in DTYPES:
        x = rows(5, 2 * 256, dtype, device, gen=gen)
        torch.library.opcheck(ops.silu_and_mul_quant.default,
                              (torch.empty(5, 256, dtype=FP8, device=device), x,
                               torch.tensor([0.02], device=device)), test_utils=NO_SCHEMA)
        for qdtype in QDTYPES:
            for transposed in (False, True):
                ub = torch.tensor([0.01], device=device) if qdtype == FP8 else None
                torch.library.opcheck(
                    ops.silu_and_mul_per_block_quant.default,
                    (torch.empty(5, 256, dtype=qdtype, device=device), x,
                     scales_buffer(5, 2, transposed, device), 128, ub, transposed),
                    **({"test_utils": NO_SCHEMA} if qdtype == FP8 else {}))


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


class SiluQuantMLP(torch.nn.Module):
    def forward(self, x, scale, ub):
        a = AQ.silu_and_mul_quant(x, scale)
        q, s = AQ.silu_and_mul_per_block_quant(x, 64, FP8, ub, True)
        return a.float() * 2, q.float() * s.repeat_interleave(64, dim=1)


def _compile_check(device, gen):
    torch._dynamo.reset()
    model = SiluQuantMLP()
    compiled = torch.compile(model, fullgraph=True)
    scale = torch.tensor([0.03], device=device)
    ub = torch.tensor([0.02], device=device)
    for tokens in (3, 5):
        x = rows(tokens, 2 * 128, torch.bfloat16, device, gen=gen)
        exp = model(x, scale, ub)
        for _ in range(3):
            got = compiled(x, scale, ub)
        for a, b in zip(got, exp):
            assert torch.equal(a, b)


def test_torch_compile_fullgraph_cpu(gen):
    _compile_check("cpu", gen)


# ---------------------------------------------------------------------------------------------
# Errors: named, raised eagerly and under FakeTensorMode, nothing written
# ---------------------------------------------------------------------------------------------
def _quant_bad_cases():
    x = torch.randn(4, 64).bfloat16()
    r = lambda *s, dt=FP8: torch.zeros(*(s or (4, 32)), dtype=dt)  # noqa: E731
    sc = torch.tensor([1.0])
    return [
        ("int input", lambda: (r(), x.to(torch.int32), sc), TypeError, "input must be float32"),
        ("odd input", lambda: (r(4, 32), torch.randn(4, 63), sc), ValueError,
         "input's last dimension must be even"),
        ("result dtype", lambda: (r(dt=torch.bfloat16), x, sc), TypeError,
         "result must have dtype"),
        ("result shape", lambda: (r(4, 31), x, sc), ValueError, r"result must have shape"),
        ("result strided", lambda: (r(4, 64)[:, :32], x, sc), ValueError,
         "result must be contiguous"),
        ("scale dtype", lambda: (r(), x, sc.double()), TypeError, "scale must have dtype torch.float32"),
        ("scale shape", lambda: (r(), x, torch.ones(2)), ValueError, "scale must hold one"),
        ("scale 2-d", lambda: (r(), x, torch.ones(1, 1)), ValueError, "scale must hold one"),
        ("input strided last", lambda: (r(), torch.randn(64, 4).bfloat16().t(), sc), ValueError,
         "input must be contiguous in its last dimension"),
    ]


@pytest.mark.parametrize("case", _quant_bad_cases(), ids=lambda c: c[0])
def test_quant_bad_inputs(case):
    _, make, exc, frag = case
    args = make()
    before = args[0].clone()
    assert_raises_eager_and_fake(lambda: ops.silu_and_mul_quant(*args), exc,
                                 "silu_and_mul_quant: " + frag)
    assert same_bytes(args[0], before)


def _block_bad_cases():
    x = torch.randn(4, 256).half()
    o = lambda *s, dt=FP8: torch.zeros(*(s or (4, 128)), dtype=dt)  # noqa: E731
    sc = lambda t=4, g=2: torch.zeros(t, g)  # noqa: E731
    return [
        ("3-d input", lambda: (o(1, 4, 128), x.view(1, 4, 256), sc(), 64, None, False), ValueError,
         "input must be 2-D"),
        ("out dtype", lambda: (o(dt=torch.float16), x, sc(), 64, None, False), TypeError,
         "out must have dtype"),
        ("out shape", lambda: (o(4, 64), x, sc(), 64, None, False), ValueError, "out must have"),
        ("group size", lambda: (o(), x, sc(4, 4), 32, None, False), ValueError,
         "group_size must be 64 or 128"),
        ("indivisible", lambda: (o(4, 96), torch.randn(4, 192).half(), sc(4, 1), 64, None, False),
         ValueError, r"d = input.size\(-1\) / 2 = 96 must be a multiple of group_size 64"),
        ("scales dtype", lambda: (o(), x, sc().double(), 64, None, False), TypeError,
         "scales must have dtype torch.float32"),
        ("scales shape", lambda: (o(), x, sc(4, 3), 64, None, False), ValueError,
         "scales must have shape"),
        ("scales layout", lambda: (o(), x, sc(), 64, None, True), ValueError,
         "scales must be a contiguous"),
        ("scales layout t", lambda: (o(), x, scales_buffer(4, 2, True), 64, None, False),
         ValueError, r"scales must be contiguous \[T, G\]"),
        ("ub int8", lambda: (o(dt=torch.int8), x, sc(), 64, torch.ones(1), False), ValueError,
         "scale_ub is only supported"),
        ("ub dtype", lambda: (o(), x, sc(), 64, torch.ones(1).half(), False), TypeError,
         "scale_ub must have dtype torch.float32"),
        ("ub shape", lambda: (o(), x, sc(), 64, torch.ones(2), False), ValueError,
         "scale_ub must hold one"),
        ("input dtype", lambda: (o(), x.to(torch.int16), sc(), 64, None, False), TypeError,
         "input must be float32"),
    ]


@pytest.mark.parametrize("case", _block_bad_cases(), ids=lambda c: c[0])
def test_per_block_bad_inputs(case):
    _, make, exc, frag = case
    args = make()
    before = (args[0].clone(), args[2].clone())
    assert_raises_eager_and_fake(lambda: ops.silu_and_mul_per_block_quant(*args), exc,
                                 "silu_and_mul_per_block_quant: " + frag)
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731  (NaN-safe equality)
    assert torch.equal(bits(args[0]), bits(before[0])) and torch.equal(bits(args[2]),
                                                                        bits(before[1]))


def test_overlapping_outputs_rejected():
    x = torch.randn(4, 256)
    # scales aliasing out's bytes (different dtypes, overlapping memory)
    raw = torch.zeros(4 * 128, dtype=torch.int8)
    scales = raw.view(torch.float32)[:8].view(4, 2)
    with pytest.raises(ValueError, match="scales and out overlap"):
        ops.silu_and_mul_per_block_quant(raw.view(4, 128), x, scales, 64, None, False)
    # result inside the input's storage
    xb = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="result and input overlap"):
        ops.silu_and_mul_quant(xb.view(-1).view(FP8)[:128].view(4, 32), xb, torch.ones(1))


# ---------------------------------------------------------------------------------------------
# CUDA: the kernels byte for byte against the reference computed on the same device. Both use
# the device's accurate expf (PyTorch's CUDA exp of a float tensor is expf; no fast math on
# either side) and IEEE division (the reference divides tensor by tensor: PyTorch's CUDA
# `t / python_scalar` would multiply by a reciprocal). Every other step is an exactly rounded
# float32 operation or an order-free fmaxf reduction, so equality is exact.
# ---------------------------------------------------------------------------------------------
def _cuda_rows(tokens, width, dtype, row_pad, gen, scale=1.0):
    base = (torch.randn(tokens, width + row_pad, generator=gen) * scale).to(dtype=dtype,
                                                                             device="cuda")
    return base[:, :width] if row_pad else base


@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_silu_and_mul_quant(tokens, hidden, dtype, row_pad, gen):
    x = _cuda_rows(tokens, 2 * hidden, dtype, row_pad, gen, scale=4.0)
    for sc in (0.01, 0.3, -1.0):
        scale = torch.tensor([sc], device="cuda")
        got = run_quant(x, scale)
        exp = silu_and_mul_quant_ref(x, scale)
        assert same_bytes(got, exp), f"scale {sc}: {quant_mismatch(got, exp)}"


# Per-block needs d % group_size == 0: the grid's hidden sizes that allow it, plus 64 and 192.
BLOCK_HIDDEN = [64, 192, 768, 4096, 5120, 8192]


@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", ROW_PADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", BLOCK_HIDDEN)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_cuda_silu_and_mul_per_block_quant(tokens, hidden, dtype, row_pad, gen):
    x = _cuda_rows(tokens, 2 * hidden, dtype, row_pad, gen)
    for gs in (64, 128):
        if hidden % gs:
            continue
        for qdtype in QDTYPES:
            for transposed in (False, True):
                for ub in ([None, torch.tensor([0.004], device="cuda")] if qdtype == FP8
                           else [None]):
                    q, s = run_block(x, gs, qdtype, ub, transposed)
                    eq, es = silu_and_mul_per_block_quant_ref(x, gs, qdtype, ub)
                    tag = f"gs={gs} {qdtype} transposed={transposed} ub={ub}"
                    assert same_bytes(q, eq) and torch.equal(s, es), \
                        f"{tag}: {quant_mismatch(q, eq, scales=s, want_scales=es)}"


@pytest.mark.cuda
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_cuda_special_values(qdtype):
    gs = 64
    x = special_gate_up_rows(gs, 8, up_inf=True).cuda()
    for transposed in (False, True):
        for ub in ([None, torch.tensor([0.5], device="cuda")] if qdtype == FP8 else [None]):
            q, s = run_block(x, gs, qdtype, ub, transposed)
            eq, es = silu_and_mul_per_block_quant_ref(x, gs, qdtype, ub)
            assert same_bytes(q, eq) and torch.equal(s, es)
    for sc in (0.0, 1.0):
        scale = torch.tensor([sc], device="cuda")
        assert same_bytes(run_quant(x.bfloat16(), scale),
                          silu_and_mul_quant_ref(x.bfloat16(), scale))


@pytest.mark.cuda
def test_cuda_empty_and_3d(gen):
    scale = torch.tensor([1.0], device="cuda")
    assert AQ.silu_and_mul_quant(torch.empty(0, 16, device="cuda"), scale).shape == (0, 8)
    out, s = AQ.silu_and_mul_per_block_quant(torch.empty(0, 256, device="cuda"), 128)
    assert out.shape == (0, 128) and s.shape == (0, 1)
    x = torch.randn(2, 3, 2 * 520, generator=gen).bfloat16().cuda()
    assert same_bytes(AQ.silu_and_mul_quant(x, scale), silu_and_mul_quant_ref(x, scale))


@pytest.mark.cuda
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@pytest.mark.cuda
def test_launcher_checks_cuda():
    from compile_ops._extension import _C

    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="group_size must be 64 or 128"):
        _C.silu_and_mul_per_block_quant(torch.empty(4, 128, dtype=FP8, device="cuda"), x,
                                        torch.empty(4, 4, device="cuda"), 32, None, False)
    with pytest.raises(RuntimeError, match="scale must hold one value"):
        _C.silu_and_mul_quant(torch.empty(4, 128, dtype=FP8, device="cuda"), x,
                              torch.ones(2, device="cuda"))


@pytest.mark.cuda
def test_cuda_graph_replay(gen):
    x = torch.randn(7, 2 * 512, generator=gen).bfloat16().cuda()
    scale = torch.tensor([0.05], device="cuda")
    out = torch.empty(7, 512, dtype=FP8, device="cuda")
    q = torch.empty(7, 512, dtype=FP8, device="cuda")
    s = scales_buffer(7, 4, True, "cuda")
    ops.silu_and_mul_quant(out, x, scale)  # warm up outside the capture
    ops.silu_and_mul_per_block_quant(q, x, s, 128, None, True)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.silu_and_mul_quant(out, x, scale)
        ops.silu_and_mul_per_block_quant(q, x, s, 128, None, True)
    x.copy_(torch.randn(7, 1024, generator=gen).bfloat16().cuda())
    g.replay()
    torch.cuda.synchronize()
    eq, es = silu_and_mul_per_block_quant_ref(x, 128)
    assert same_bytes(out, silu_and_mul_quant_ref(x, scale))
    assert same_bytes(q, eq) and torch.equal(s, es)


@pytest.mark.cuda
def test_torch_compile_cuda(gen):
    _compile_check("cuda", gen)
