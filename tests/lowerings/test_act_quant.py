"""The act_quant pass (lowerings/act_quant.py): silu_and_mul followed by a static FP8
quantization feeding torch._scaled_mm, fused into silu_and_mul_quant. CPU graphs
(COMPILE_OPS_PASS_DEVICES=all) with the CPU reference path of _scaled_mm."""

import torch
from expecttest import TestCase

import compile_ops  # noqa: F401
import lowerings
from compile_ops.testing import assert_close

ops = torch.ops.compile_ops
FP8 = torch.float8_e4m3fn
D, H = 64, 32


def counts(name="act_quant"):
    c = lowerings.counters().get(name, {})
    return c.get("matched", 0), {k[len("near_miss: "):]: v for k, v in c.items()
                                 if k.startswith("near_miss: ")}


class Mlp(torch.nn.Module):
    """gate_up GEMM (bf16) -> silu_and_mul -> FP8 quant -> down GEMM (FP8)."""

    def __init__(self, quant="static", extra_read=False, dtype=torch.bfloat16, native=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up = (torch.randn(2 * D, H, generator=g) * 0.3).to(dtype)
        self.down = (torch.randn(H, D, generator=g) * 0.5).to(FP8)
        self.scale = torch.tensor(0.01)
        self.ws = torch.tensor(0.02)
        self.quant, self.extra_read, self.native = quant, extra_read, native

    def forward(self, x):
        gu = x @ self.gate_up.t()
        if self.native == "gate_up":  # silu(gate) * up as Hugging Face / gpt-fast write it
            y = torch.nn.functional.silu(gu[..., :D]) * gu[..., D:]
        elif self.native == "up_gate":
            y = gu[..., D:] * torch.nn.functional.silu(gu[..., :D])
        elif self.native == "halves_swapped":  # silu of the second half: not vLLM's layout
            y = torch.nn.functional.silu(gu[..., D:]) * gu[..., :D]
        else:
            y = torch.empty(gu.shape[0], D, dtype=gu.dtype)
            ops.silu_and_mul(y, gu)
        if self.quant == "static":
            q = (y.float() * self.scale.reciprocal()).clamp(-448, 448).to(FP8)
            sa = self.scale
        elif self.quant == "static_op":
            q = torch.empty(y.shape, dtype=FP8)
            ops.static_scaled_fp8_quant(q, y, self.scale, None)
            sa = self.scale
        else:  # per token
            yf = y.float()
            sa = (yf.abs().amax(-1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
            q = (yf / sa).clamp(-448, 448).to(FP8)
        sb = self.ws if sa.numel() == 1 else self.ws.expand(1, H).contiguous()
        o = torch._scaled_mm(q, self.down.t(), scale_a=sa, scale_b=sb, out_dtype=y.dtype)
        return o + y[:, :H] if self.extra_read else o


def run_both(model, x):
    with torch.no_grad():
        eager = model(x.clone())
        got = torch.compile(model, backend="compile_ops", fullgraph=True)(x.clone())
    return eager, got


def _x(tokens=7, dtype=torch.bfloat16):
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(1)).to(dtype)


class TestActQuant(TestCase):
    def test_static_native_fused_bit_exact(self):
        eager, got = run_both(Mlp("static"), _x())
        self.assertTrue(torch.equal(eager, got))
        self.assertEqual(counts(), (1, {}))
        after = lowerings.pass_manager().ops_after
        self.assertIn("auto_functionalized(compile_ops.silu_and_mul_quant.default)", after)
        self.assertNotIn("auto_functionalized(compile_ops.silu_and_mul.default)", after)
        self.assertEqual(counts("lower_activation"), (0, {}))  # nothing left to lower

    def test_static_op_tail(self):
        eager, got = run_both(Mlp("static_op"), _x())
        self.assertTrue(torch.equal(eager, got))
        self.assertEqual(counts(), (1, {}))

    def test_per_token_is_a_near_miss(self):
        # left to lower_activation + Inductor (its SiLU may round differently from the op's)
        eager, got = run_both(Mlp("per_token"), _x())
        assert_close(got, eager)
        self.assertEqual(counts(), (0, {
            "dynamic per-token quantization of the activation (no fused op)": 1}))

    def test_activation_read_elsewhere(self):
        eager, got = run_both(Mlp("static", extra_read=True), _x())
        assert_close(got, eager)
        self.assertEqual(counts(), (0, {
            "the norm or activation output has other readers besides one quantization": 1}))

    # The native spelling: silu(gate) * up of the two halves of the gate_up GEMM's output.
    def test_native_silu_mul_static_fused_bit_exact(self):
        for native in ("gate_up", "up_gate"):
            for dtype in (torch.bfloat16, torch.float32):
                with self.subTest(native=native, dtype=dtype):
                    lowerings.reset_counters()
                    torch._dynamo.reset()
                    eager, got = run_both(Mlp("static", native=native, dtype=dtype),
                                          _x(dtype=dtype))
                    self.assertTrue(torch.equal(eager, got))
                    self.assertEqual(counts(), (1, {}))
                    after = lowerings.pass_manager().ops_after
                    self.assertIn("auto_functionalized(compile_ops.silu_and_mul_quant.default)",
                                  after)
                    for gone in ("aten.exp.default", "aten.slice.Tensor", "aten.clamp_min.default"):
                        self.assertNotIn(gone, after)

    def test_native_silu_mul_ops_before_after(self):
        run_both(Mlp("static", native="gate_up"), _x())
        pm = lowerings.pass_manager()
        self.assertExpectedInline(" ".join(sorted(set(pm.ops_after) - set(pm.ops_before))),
                                  """aten.empty.memory_format auto_functionalized(compile_ops.silu_and_mul_quant.default) getitem""")
        self.assertExpectedInline(" ".join(sorted(set(pm.ops_before) - set(pm.ops_after))),
                                  """aten.add.Tensor aten.clamp_max.default aten.clamp_min.default aten.div.Tensor aten.exp.default aten.mul.Tensor aten.neg.default aten.reciprocal.default aten.slice.Tensor prims.convert_element_type.default""")

    def test_native_silu_mul_per_token_is_a_near_miss(self):
        eager, got = run_both(Mlp("per_token", native="gate_up"), _x())
        assert_close(got, eager)
        self.assertEqual(counts(), (0, {
            "dynamic per-token or group quantization of the activation (no fused op with "
            "silu_and_mul's rounding)": 1}))

    def test_native_silu_mul_read_elsewhere(self):
        eager, got = run_both(Mlp("static", extra_read=True, native="gate_up"), _x())
        assert_close(got, eager)
        self.assertEqual(counts(), (0, {
            "the norm or activation output has other readers besides one quantization": 1}))

    def test_native_silu_of_the_second_half_is_left_alone(self):
        eager, got = run_both(Mlp("static", native="halves_swapped"), _x())
        assert_close(got, eager)  # Inductor's own SiLU (its exp may differ by an ulp)
        self.assertEqual(counts(), (0, {
            "silu(gate) * up: gate and up are not the two halves of one tensor "
            "(x[..., :d], x[..., d:])": 1}))
