"""The norm_quant pass (lowerings/norm_quant.py): RMSNorm (or add + RMSNorm) followed by an FP8
quantization feeding torch._scaled_mm, fused into vLLM's norm + quant ops. Tested on CPU graphs
(COMPILE_OPS_PASS_DEVICES=all, tests/conftest.py) with the CPU reference path of _scaled_mm."""

import pytest
import torch
from expecttest import TestCase

import compile_ops  # noqa: F401
import lowerings
from compile_ops.testing import assert_close

ops = torch.ops.compile_ops
FP8 = torch.float8_e4m3fn
H, N = 64, 32
EPS = 1e-5


def counts():
    c = lowerings.counters().get("norm_quant", {})
    return c.get("matched", 0), {k[len("near_miss: "):]: v for k, v in c.items()
                                 if k.startswith("near_miss: ")}


def ops_after():
    return "\n".join(lowerings.pass_manager().ops_after)


def _w8(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g) * 0.5).to(FP8)


def native_static(y, scale):
    return (y.float() * scale.reciprocal()).clamp(-448, 448).to(FP8)


def native_per_token(y):
    yf = y.float()
    s = (yf.abs().amax(-1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
    return (yf / s).clamp(-448, 448).to(FP8), s


class NormGemm(torch.nn.Module):
    """x -> RMSNorm -> quant -> FP8 GEMM, `layers` times (a W8A8 model's attention input)."""

    def __init__(self, quant="static", layers=1, dtype=torch.bfloat16, add=False, weight=True,
                 extra_read=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ws = [(1 + 0.1 * torch.randn(H, generator=g)).to(dtype) if weight else None
                   for _ in range(layers)]
        self.wq = [_w8(i) for i in range(layers)]
        self.up = torch.randn(N, H, generator=g).to(dtype) * 0.1
        self.scale = torch.tensor(0.05)
        self.ws_b = torch.tensor(0.02)
        self.quant, self.add, self.extra_read = quant, add, extra_read

    def forward(self, x, residual):
        x, residual = x * 1.5, residual * 0.5  # intermediates (in place is allowed on them)
        outs = []
        for w, wq in zip(self.ws, self.wq):
            if self.add:
                h = x + residual
                y = torch.empty_like(h)
                ops.rms_norm(y, h, w, EPS)
                residual = h
            else:
                y = torch.empty_like(x)
                ops.rms_norm(y, x, w, EPS)
            if self.quant == "static":
                q = native_static(y, self.scale)
                sa = self.scale
            elif self.quant == "static_div":
                q = (y.float() / self.scale).clamp(-448, 448).to(FP8)
                sa = self.scale
            elif self.quant == "static_op":
                q = torch.empty(y.shape, dtype=FP8)
                ops.static_scaled_fp8_quant(q, y, self.scale, None)
                sa = self.scale
            elif self.quant == "per_token":
                q, sa = native_per_token(y)
            elif self.quant == "per_token_op":
                q = torch.empty(y.shape, dtype=FP8)
                sa = torch.empty(y.shape[0], 1)
                ops.dynamic_per_token_scaled_fp8_quant(q, y, sa, None)
            else:  # "none": a bf16 model
                outs.append(y @ self.up.t())
                x = outs[-1] @ self.up
                continue
            sb = self.ws_b if sa.numel() == 1 else self.ws_b.expand(1, N).contiguous()
            o = torch._scaled_mm(q, wq.t(), scale_a=sa, scale_b=sb, out_dtype=y.dtype)
            if self.extra_read:
                o = o + y[:, :N]
            outs.append(o)
            x = (o @ self.up).to(y.dtype)
        return tuple(outs) + (residual,)


def _inputs(tokens=7, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, H, generator=g).to(dtype),
            torch.randn(tokens, H, generator=g).to(dtype))


def run_both(model, inputs):
    with torch.no_grad():
        eager = model(*[t.clone() for t in inputs])
        got = torch.compile(model, backend="compile_ops", fullgraph=True)(
            *[t.clone() for t in inputs])
    return eager, got


def assert_equal(eager, got):
    assert len(eager) == len(got)
    for a, b in zip(got, eager):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a - b).abs().max()


class TestNormQuant(TestCase):
    def test_static_native_fused_bit_exact(self):
        eager, got = run_both(NormGemm("static", layers=2), _inputs())
        assert_equal(eager, got)  # same bytes into the same GEMM
        self.assertEqual(counts(), (2, {}))
        after = ops_after()
        self.assertIn("auto_functionalized(compile_ops.rms_norm_static_fp8_quant.default)", after)
        self.assertNotIn("compile_ops.rms_norm.default", after)
        self.assertExpectedInline("\n".join(sorted(set(lowerings.pass_manager().ops_after))), """\
aten._scaled_mm.default
aten.empty.memory_format
aten.mm.default
aten.mul.Tensor
aten.permute.default
auto_functionalized(compile_ops.rms_norm_static_fp8_quant.default)
getitem""")

    def test_static_op_tail(self):
        eager, got = run_both(NormGemm("static_op"), _inputs())
        assert_equal(eager, got)
        self.assertEqual(counts(), (1, {}))
        self.assertNotIn("static_scaled_fp8_quant", ops_after())

    def test_per_token_native_fused_bit_exact(self):
        eager, got = run_both(NormGemm("per_token", layers=2), _inputs(9))
        assert_equal(eager, got)
        self.assertEqual(counts(), (2, {}))
        self.assertIn("rms_norm_dynamic_per_token_quant", ops_after())
        self.assertNotIn("aten.amax", ops_after())

    def test_per_token_op_tail(self):
        eager, got = run_both(NormGemm("per_token_op"), _inputs())
        assert_equal(eager, got)
        self.assertEqual(counts(), (1, {}))

    def test_add_norm_per_token_keeps_the_residual(self):
        # add + rms_norm -> fused_add_rms_norm (add_rms_norm pass) -> with the quant:
        # rms_norm_dynamic_per_token_quant with the residual (float32 sum, as fused_add_rms_norm)
        # (eager rounds the sum to bf16 before the norm; the add_rms_norm pass's fused op and
        # this one normalize the float32 sum: bf16-close, not bit-equal)
        eager, got = run_both(NormGemm("per_token", layers=2, add=True), _inputs())
        for a, b in zip(got, eager):
            assert_close(a, b, torch.bfloat16)
        self.assertEqual(counts(), (2, {}))
        self.assertNotIn("fused_add_rms_norm.default", ops_after())

    def test_add_norm_static(self):
        # vLLM's fused static op normalizes the sum rounded to bf16, as eager's `x + residual`
        # then rms_norm does: the same bytes
        eager, got = run_both(NormGemm("static", layers=2, add=True), _inputs())
        assert_equal(eager, got)
        self.assertEqual(counts(), (2, {}))
        self.assertIn("fused_add_rms_norm_static_fp8_quant", ops_after())

    def test_float32_model(self):
        # float32: no upcast node; the per-token tail reads the norm output twice
        for quant in ("static", "per_token"):
            torch._dynamo.reset()
            lowerings.reset_counters()
            eager, got = run_both(NormGemm(quant, dtype=torch.float32),
                                  _inputs(dtype=torch.float32))
            assert_equal(eager, got)
            self.assertEqual(counts(), (1, {}), quant)

    def test_dynamic_tokens(self):
        model = NormGemm("per_token")
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        for t in (3, 11, 17):
            x, r = _inputs(t, seed=t)
            xc, rc = x.clone(), r.clone()
            torch._dynamo.mark_dynamic(xc, 0)
            torch._dynamo.mark_dynamic(rc, 0)
            with torch.no_grad():
                assert_equal(model(x, r), compiled(xc, rc))
        self.assertEqual(counts()[0], 1)


class TestNearMisses(TestCase):
    def test_bf16_model_says_nothing(self):
        run_both(NormGemm("none", layers=2), _inputs())
        self.assertEqual(counts(), (0, {}))

    def test_static_divide_is_not_fused(self):
        eager, got = run_both(NormGemm("static_div"), _inputs())
        assert_equal(eager, got)
        m, nm = counts()
        self.assertEqual(m, 0)
        self.assertEqual(list(nm), ["static quantization divides by the scale (the fused op "
                                    "multiplies by its reciprocal, vLLM's numerics)"])

    def test_norm_output_read_elsewhere(self):
        eager, got = run_both(NormGemm("static", extra_read=True), _inputs())
        assert_equal(eager, got)
        self.assertEqual(counts(), (0, {
            "the norm or activation output has other readers besides one quantization": 1}))
        self.assertIn("compile_ops.rms_norm.default", ops_after())

    def test_no_weight(self):
        eager, got = run_both(NormGemm("static", weight=False), _inputs())
        assert_equal(eager, got)
        self.assertEqual(counts(), (0, {
            "norm without a weight (vLLM's fused norm + quant ops take one)": 1}))

    def test_other_clamp_bounds(self):
        class M(NormGemm):
            def forward(self, x, r):
                y = torch.empty_like(x)
                ops.rms_norm(y, x * 1.5, self.ws[0], EPS)
                q = (y.float() * self.scale.reciprocal()).clamp(-240, 240).to(FP8)
                return (torch._scaled_mm(q, self.wq[0].t(), scale_a=self.scale,
                                         scale_b=self.ws_b, out_dtype=y.dtype),)

        eager, got = run_both(M("static"), _inputs())
        assert_equal(eager, got)
        self.assertEqual(counts(), (0, {"clamp bounds (-240, 240) are not (-448, 448)": 1}))


@pytest.mark.parametrize("quant", ["static", "per_token"])
def test_nan_becomes_448_when_fused(quant):
    """The one deliberate numerical difference (vLLM's kernels): a NaN activation quantizes to
    +448 in the fused op where the native clamp keeps NaN."""
    model = NormGemm(quant)
    x, r = _inputs()
    x[2, 5] = float("nan")
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
    with torch.no_grad():
        eager, got = model(x.clone(), r.clone()), compiled(x.clone(), r.clone())
    assert counts()[0] == 1
    assert torch.isnan(eager[0][2]).all()   # native: NaN row (NaN code into the GEMM)
    assert torch.equal(got[0][:2], eager[0][:2]) and torch.equal(got[0][3:], eager[0][3:])


def native_group(y, g=128):
    t, h = y.shape
    yg = y.float().view(t, h // g, g)
    s = (yg.abs().amax(-1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
    return (yg / s).clamp(-448, 448).to(FP8).view(t, h), s


class NormGroup(torch.nn.Module):
    """rms_norm (or add + rms_norm) -> DeepSeek-style group quantization (vLLM's native
    QuantFP8 formula): the FP8 rows and the [T, G, 1] scales are the outputs."""

    def __init__(self, g=128, add=False, dtype=torch.bfloat16, hidden=256):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
        self.g, self.add = g, add

    def forward(self, x, r):
        x, r = x * 1.5, r * 0.5
        if self.add:
            x = x + r
        y = torch.empty_like(x)
        ops.rms_norm(y, x, self.w, EPS)
        q, s = native_group(y, self.g)
        return q.view(torch.uint8), s, x


def _rows(tokens=7, hidden=256, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(tokens, hidden, generator=g).to(dtype),
            torch.randn(tokens, hidden, generator=g).to(dtype))


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("add", [False, True])
def test_group_quant_fused_into_rms_norm_per_block_quant(g, add):
    model = NormGroup(g, add)
    x, r = _rows()
    with torch.no_grad():
        eager = model(x.clone(), r.clone())
        got = torch.compile(model, backend="compile_ops", fullgraph=True)(x.clone(), r.clone())
    if not add:
        for a, b in zip(got, eager):
            assert a.shape == b.shape and torch.equal(a, b)
    else:  # eager normalizes the bf16-rounded sum, the fused ops the float32 one
        assert_close(got[0].view(FP8).float(), eager[0].view(FP8).float(), FP8)
        assert_close(got[1], eager[1], torch.bfloat16)
        assert_close(got[2], eager[2], torch.bfloat16)
    assert counts() == (1, {})
    after = lowerings.pass_manager().ops_after
    assert "auto_functionalized(compile_ops.rms_norm_per_block_quant.default)" in after
    assert "aten.amax.default" not in after


def test_group_of_other_size_is_a_near_miss():
    model = NormGroup(32)
    x, r = _rows()
    with torch.no_grad():
        eager = model(x.clone(), r.clone())
        got = torch.compile(model, backend="compile_ops", fullgraph=True)(x.clone(), r.clone())
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    assert counts() == (0, {
        "the normalized output is reshaped, not into groups of 64 or 128 columns": 1})


def test_group_quant_dynamic_tokens():
    model = NormGroup(128)
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
    for t in (3, 11, 17):
        x, r = _rows(t)
        xc, rc = x.clone(), r.clone()
        torch._dynamo.mark_dynamic(xc, 0)
        torch._dynamo.mark_dynamic(rc, 0)
        with torch.no_grad():
            for a, b in zip(compiled(xc, rc), model(x, r)):
                assert torch.equal(a, b)
    assert counts() == (1, {})
