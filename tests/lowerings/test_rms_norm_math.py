"""RMSNorm written as module math -> compile_ops.rms_norm (lowerings/rms_norm_math.py), then the
residual add feeding it -> fused_add_rms_norm (AddRMSNormPass), tested on compiled graphs."""

import os
import sys

import torch
from expecttest import TestCase

import lowerings
from compile_ops.testing import assert_close
from tests.lowerings.test_add_rms_norm import CallRecorder  # the profiler helper, shared

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDDEN = 32
f32, bf16 = torch.float32, torch.bfloat16


def hf_norm(dtype=f32, eps=1e-6, seed=0):
    """Hugging Face's LlamaRMSNorm itself, with a random weight (it starts as ones)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(HIDDEN, eps=eps)
    g = torch.Generator().manual_seed(seed)
    norm.weight.data = torch.randn(HIDDEN, generator=g)
    return norm.to(dtype)


class GptFastRMSNorm(torch.nn.Module):
    """gpt-fast's RMSNorm (model.py): x * x instead of pow, type_as, then * weight."""

    def __init__(self, dim=HIDDEN, eps=1e-5, seed=0):
        super().__init__()
        self.eps = eps
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(dim, generator=g))

    def _norm(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class Weightless(torch.nn.Module):
    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


class GemmaNorm(torch.nn.Module):
    """Gemma's RMSNorm: (1 + weight) applied in float32, one rounding at the end."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(HIDDEN, generator=g) * 0.1)

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Stream(torch.nn.Module):
    """A decoder's residual stream, x = x + f(norm(x)) per layer and a final norm, with Hugging
    Face's LlamaRMSNorm. The stream starts inside the graph, as in a model (AddRMSNormPass leaves
    a graph input alone: the fused kernel writes it in place)."""

    def __init__(self, layers=2, dtype=f32):
        super().__init__()
        self.inp = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.norms = torch.nn.ModuleList([hf_norm(seed=i) for i in range(layers)])
        self.fs = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
                                       for _ in range(layers)])
        self.final = hf_norm(seed=layers)
        self.to(dtype)

    def forward(self, x):
        h = self.inp(x)
        for norm, f in zip(self.norms, self.fs):
            h = h + f(norm(h))
        return self.final(h)


def x_in(tokens=5, dtype=f32, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, tokens, HIDDEN, generator=g) * 3).to(dtype)


def run_both(model, *inputs, backend="compile_ops"):
    with torch.no_grad():
        eager = model(*[t.clone() for t in inputs])
        got = torch.compile(model, backend=backend, fullgraph=True)(*[t.clone() for t in inputs])
    return eager, got


def counts(name="rms_norm_math"):
    return lowerings.counters().get(name, {})


def matched(name="rms_norm_math"):
    return counts(name).get("matched", 0)


def near_misses(name="rms_norm_math"):
    return {k[len("near_miss: "):]: v for k, v in counts(name).items()
            if k.startswith("near_miss: ")}


def ops_before():
    return "\n".join(lowerings.pass_manager().ops_before)


def ops_after():
    return "\n".join(lowerings.pass_manager().ops_after)


class TestMatch(TestCase):
    def test_hf_llama_rms_norm_float32(self):
        eager, got = run_both(hf_norm(f32), x_in(5, f32))
        self.assertTrue(torch.equal(eager, got))  # the op does the module's float32 steps
        self.assertEqual(counts(), {"matched": 1})
        self.assertExpectedInline(ops_before(), """\
aten.add.Tensor
aten.mean.dim
aten.mul.Tensor
aten.mul.Tensor
aten.pow.Tensor_Scalar
aten.rsqrt.default""")
        self.assertExpectedInline(ops_after(), """\
aten.empty.memory_format
auto_functionalized(compile_ops.rms_norm.default)
getitem""")

    def test_hf_llama_rms_norm_bfloat16(self):
        eager, got = run_both(hf_norm(bf16), x_in(5, bf16, lead=(2,)))  # [2, 5, H]
        self.assertTrue(torch.equal(eager, got))  # one rounding to bf16, then * weight in bf16
        self.assertEqual(counts(), {"matched": 1})
        self.assertExpectedInline(ops_before(), """\
aten.add.Tensor
aten.mean.dim
aten.mul.Tensor
aten.mul.Tensor
aten.pow.Tensor_Scalar
aten.rsqrt.default
prims.convert_element_type.default
prims.convert_element_type.default""")
        self.assertExpectedInline(ops_after(), """\
aten.empty.memory_format
auto_functionalized(compile_ops.rms_norm.default)
getitem""")
        # Inductor's own kernel, without the pass, is not: only within bf16 rounding (measured
        # 0.0156 off)
        torch._dynamo.reset()
        _, inductor = run_both(hf_norm(bf16), x_in(5, bf16, lead=(2,)), backend="inductor")
        assert_close(inductor, eager)

    def test_gpt_fast_rms_norm_bfloat16(self):
        eager, got = run_both(GptFastRMSNorm().to(bf16), x_in(7, bf16))
        self.assertTrue(torch.equal(eager, got))
        self.assertEqual(counts(), {"matched": 1})
        self.assertIn("aten.mul.Tensor", ops_before())
        self.assertNotIn("aten.pow.Tensor_Scalar", ops_before())  # x * x, not pow
        self.assertExpectedInline(ops_after(), """\
aten.empty.memory_format
auto_functionalized(compile_ops.rms_norm.default)
getitem""")

    def test_hf_llama_rms_norm_float16(self):
        eager, got = run_both(hf_norm(torch.float16), x_in(5, torch.float16))
        self.assertTrue(torch.equal(eager, got))
        self.assertEqual(counts(), {"matched": 1})

    def test_gpt_fast_rms_norm_float32_dynamic_tokens(self):
        # Symbolic token count: the out buffer is empty_like(x) (no shape to spell out).
        model = GptFastRMSNorm()
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        for tokens in (3, 11, 17):
            x = x_in(tokens, seed=tokens)
            xc = x.clone()
            torch._dynamo.mark_dynamic(xc, 0)
            with torch.no_grad():
                self.assertTrue(torch.equal(model(x), compiled(xc)))
        self.assertEqual(counts(), {"matched": 1})  # one compile, dynamic in tokens
        self.assertIn("aten.empty_like.default", ops_after())
        self.assertIn("auto_functionalized(compile_ops.rms_norm.default)", ops_after())

    def test_weightless(self):
        # compile_ops.rms_norm takes weight=None: the rounded normalized value is the result.
        for dtype in (f32, bf16):
            torch._dynamo.reset()
            lowerings.reset_counters()
            eager, got = run_both(Weightless(), x_in(5, dtype))
            self.assertTrue(torch.equal(eager, got), dtype)
            self.assertEqual(counts(), {"matched": 1})
            self.assertNotIn("aten.rsqrt.default", ops_after())

    def test_gemma_style_one_plus_weight_in_float32_model(self):
        # All float32: (1 + w) is just a weight computed in the graph, the same rounding steps.
        model = GemmaNorm().to(f32)
        eager, got = run_both(model, x_in(5, f32))
        self.assertTrue(torch.equal(eager, got))
        self.assertEqual(counts(), {"matched": 1})


class TestResidualStream(TestCase):
    def test_float32_fused_and_bit_exact(self):
        model = Stream(2, f32)
        x = x_in(5, f32)
        eager, got = run_both(model, x)
        self.assertTrue(torch.equal(eager, got))
        self.assertEqual(counts(), {"matched": 3})
        # the first norm reads the input projection, not a sum: it stays rms_norm
        self.assertEqual(counts("add_rms_norm"), {
            "matched": 2, "near_miss: norm input is aten.mm.default, not aten.add.Tensor": 1})
        self.assertExpectedInline(ops_after(), """\
aten.empty.memory_format
aten.mm.default
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.permute.default
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.rms_norm.default)
getitem
getitem
getitem
getitem
getitem""")
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        with torch.no_grad():
            compiled(x.clone())
            with CallRecorder() as rec:
                compiled(x.clone())
        self.assertEqual(rec.calls,
                         ["compile_ops::rms_norm"] + ["compile_ops::fused_add_rms_norm"] * 2)

    def test_bfloat16_fused(self):
        # fused_add_rms_norm normalizes the float32 sum before its rounding to bf16 (vLLM's
        # semantics; Inductor's own fused kernel does the same): within bf16 rounding of eager.
        model = Stream(3, bf16)
        eager, got = run_both(model, x_in(7, bf16))
        assert_close(got, eager)
        self.assertEqual(matched(), 4)
        self.assertEqual(matched("add_rms_norm"), 3)


class Fn(torch.nn.Module):
    def __init__(self, fn, dtype=f32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(HIDDEN, generator=g).to(dtype))
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.weight)


class Transpose(torch.nn.Module):
    def forward(self, x):
        return x.t()


class TestNoMatch(TestCase):
    """Graphs where rms_norm would change the result (or is not what the math computes): left
    alone, each a near miss with its reason."""

    def _check(self, model, x, reason, tol_dtype=None):
        eager, got = run_both(model, x)
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        eager if isinstance(eager, tuple) else (eager,)):
            assert_close(a, b, tol_dtype)
        self.assertEqual(matched(), 0)
        self.assertEqual(list(near_misses()), [reason], near_misses())
        self.assertNotIn("compile_ops", ops_after())

    def test_per_head_norm_feeding_only_rope(self):
        """Qwen3's q/k norm: each head's slice normed, then only pointwise math (RoPE's
        rotate_half, cos / sin multiplies): Inductor fuses the norm into that one kernel, which
        our op would split in two. Left alone (the same model's norm feeding a GEMM is
        rewritten: test_per_head_norm_feeding_a_matmul)."""
        def f(x, w):  # x [T, 4 heads * 8]; w [8]
            h = x.view(x.shape[0], 4, 8)
            h32 = h.float()
            n = w[:8] * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
            n = n.transpose(0, 1)
            cos, sin = torch.cos(torch.arange(8.0)), torch.sin(torch.arange(8.0))
            rot = torch.cat((-n[..., 4:], n[..., :4]), dim=-1)
            return n * cos + rot * sin

        self._check(Fn(f), x_in(), "the normalized output feeds only pointwise math (a per-head "
                    "q/k norm before RoPE, as Qwen3's): Inductor fuses the norm into that kernel")

    def test_mean_over_another_dim(self):
        def f(x, w):
            x32 = x.float()
            return w * (x32 * torch.rsqrt(x32.pow(2).mean(0, keepdim=True) + 1e-6)).to(x.dtype)
        self._check(Fn(f), x_in(), "mean over dims [0], not the last dim only")

    def test_mean_without_keepdim(self):
        def f(x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1) + 1e-6)[:, None])
        self._check(Fn(f), x_in(), "mean without keepdim")

    def test_pow_exponent_not_two(self):
        def f(x, w):
            return w * (x * torch.rsqrt(x.abs().pow(3).mean(-1, keepdim=True) + 1e-6))
        self._check(Fn(f), x_in(), "pow exponent 3, not 2")

    def test_normalizes_another_tensor_than_it_squares(self):
        def f(x, w):
            return w * (x.sin() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        self._check(Fn(f), x_in(),
                    "the normalize multiply takes another tensor than the one squared")

    def test_statistics_in_bfloat16(self):
        def f(x, w):  # no upcast: the mean square is accumulated and rounded in bf16
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        self._check(Fn(f, bf16), x_in(dtype=bf16),
                    "statistics in bfloat16 (squared tensor bfloat16), not float32")

    def test_gemma_one_plus_weight_in_float32_on_bf16(self):
        # (1 + w) multiplies the float32 value before the only rounding: rms_norm would round
        # first and multiply in bf16.
        self._check(GemmaNorm().to(bf16), x_in(dtype=bf16),
                    "the float32 normalized value goes to aten.mul.Tensor, not a convert back to "
                    "bfloat16 (a weight applied in float32, as Gemma's 1 + weight, rounds "
                    "differently)")

    def test_float32_weight_on_bf16_x(self):
        # HF LlamaRMSNorm with its weight left float32: weight * bf16 promotes to float32.
        # (Inductor's own kernel skips the rounding to bf16 before the multiply: compared
        # within bf16 rounding.)
        self._check(hf_norm(f32), x_in(dtype=bf16),
                    "weight dtype float32 != x dtype bfloat16 (type promotion: the multiply "
                    "would round differently)", tol_dtype=bf16)

    def test_weight_not_one_dimensional(self):
        def f(x, w):
            x32 = x.float()
            return w[None] * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))
        self._check(Fn(f), x_in(), "weight of shape (1, 32), not [32] (1-d of x's last dim)")

    def test_x_not_in_rows(self):
        # x.t() of a [H, T] tensor: the hidden dim is strided; the kernel takes rows
        model = hf_norm(f32)
        self._check(torch.nn.Sequential(Transpose(), model), x_in(HIDDEN)[:, :5].contiguous(),
                    "x not in a row layout the kernel takes")

    def test_epsilon_not_a_constant(self):
        def f(x, w):
            eps = w[0].abs() * 1e-6  # a tensor
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        self._check(Fn(f), x_in(), "epsilon is not a constant")

    def test_intermediate_used_elsewhere(self):
        def variance_too(x, w):
            x32 = x.float()
            var = x32.pow(2).mean(-1, keepdim=True)
            return w * (x32 * torch.rsqrt(var + 1e-6)).to(x.dtype), var
        self._check(Fn(variance_too), x_in(), "the mean square is also used outside the norm")
        torch._dynamo.reset()
        lowerings.reset_counters()

        def normalized_too(x, w):
            x32 = x.float()
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
            return w * y.to(x.dtype), y
        self._check(Fn(normalized_too, bf16), x_in(dtype=bf16),
                    "the float32 normalized value is also used outside the norm", tol_dtype=bf16)

    def test_layer_norm(self):
        # torch's layer norm: var_mean, never a mean of a square: nothing to look at
        model = Fn(lambda x, w: torch.nn.functional.layer_norm(x, (HIDDEN,), w, None, 1e-5))
        eager, got = run_both(model, x_in())
        assert_close(got, eager)
        self.assertEqual(counts(), {})
        self.assertNotIn("compile_ops", ops_after())
        torch._dynamo.reset()

        def written_out(x, w):  # the same as math: rms_norm of the centred x, but a LayerNorm
            xc = x - x.mean(-1, keepdim=True)
            return w * (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5))
        self._check(Fn(written_out), x_in(), "the input is mean-centred (LayerNorm, not RMSNorm)")


class TestRowsRule(TestCase):
    def test_prefill_rows_left_to_inductor(self):
        """From MAX_ROWS rows on Inductor's own fused kernel is faster: a near miss; one row
        fewer is rewritten."""
        from lowerings.rms_norm_math import MAX_ROWS

        eager, got = run_both(hf_norm(), x_in(tokens=MAX_ROWS))
        assert_close(got, eager)
        self.assertEqual(matched(), 0)
        self.assertEqual(list(near_misses()), [
            f"{MAX_ROWS} rows (a prefill): Inductor's own fused add + RMSNorm kernel is faster "
            f"from {MAX_ROWS} rows on"])
        lowerings.reset_counters()
        torch._dynamo.reset()
        eager, got = run_both(hf_norm(), x_in(tokens=MAX_ROWS - 1))
        assert_close(got, eager)
        self.assertEqual(matched(), 1)


class TestPointwiseRule(TestCase):
    def test_per_head_norm_feeding_a_matmul(self):
        """The same per-head norm with a GEMM among its uses: rewritten (the norm is a kernel of
        its own either way)."""
        def f(x, w):
            h = x.view(x.shape[0], 4, 8)
            h32 = h.float()
            n = w[:8] * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
            return n * 2.0, n.reshape(x.shape[0], 32) @ w[:32, None].expand(32, 3)

        eager, got = run_both(Fn(f), x_in())
        for a, b in zip(got, eager):
            assert_close(a, b)
        self.assertEqual(matched(), 1)


class TestHuggingFaceLlama(TestCase):
    """A tiny LlamaForCausalLM decode step (bench/bench_hf.py's cpu_check), backend=compile_ops."""

    def _decode(self, dtype, steps):
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        try:
            import bench_hf
        finally:
            sys.path.pop(0)
        layers, batch, cache_len, context = 2, 2, 64, 16
        config = bench_hf.llama_config(layers, tiny=True)
        model = bench_hf.build_model(config, "cpu", dtype)
        out = {}
        for variant in ("eager", "compile_ops"):
            cache, first = bench_hf.prefill(model, config, batch, cache_len, context, "cpu", seed=1)
            out[variant] = bench_hf.decode(bench_hf.compiled(bench_hf.make_step(model, cache),
                                                             variant), first, context, steps, "cpu")
        return layers, out

    def test_decode_step_float32(self):
        layers, out = self._decode(f32, steps=4)
        (tokens, logits), (want, want_logits) = out["compile_ops"], out["eager"]
        self.assertTrue(torch.equal(tokens, want), (tokens, want))
        for got, ref in zip(logits, want_logits):
            assert_close(got, ref)  # float32 tolerance (measured: bit-exact on CPU)
        # every RMSNorm: input_layernorm and post_attention_layernorm per layer, the final norm
        self.assertEqual(counts(), {"matched": 2 * layers + 1})
        # each norm but the first reads a residual sum: fused. The first reads the embedding.
        self.assertEqual(counts("add_rms_norm"), {
            "matched": 2 * layers,
            "near_miss: norm input is aten.embedding.default, not aten.add.Tensor": 1})
        self.assertNotIn("aten.rsqrt.default", ops_after())
        self.assertEqual(ops_after().count("compile_ops.fused_add_rms_norm"), 2 * layers)

    def test_decode_step_bfloat16(self):
        # The form with the converts (x.to(float32) ... .to(bfloat16)) in the real model. Greedy
        # tokens are not compared: eager's two best logits at the second step are one bf16 ulp
        # apart (6.094 and 6.0625), so any other rounding may pick either (compile_ops without
        # this pass already picks the other one).
        layers, out = self._decode(bf16, steps=1)
        # The logits against eager's: each rewrite keeps eager's rounding steps, but Inductor's
        # fused code around them (the residual adds, the GEMM epilogues) rounds bf16 at other
        # points, so the bound is a few bf16 steps (2**-8 relative) of logits of O(1-10):
        # atol 0.1, rtol 2**-6.
        (_, logits), (_, want_logits) = out["compile_ops"], out["eager"]
        torch.testing.assert_close(logits[0], want_logits[0], atol=0.1, rtol=2 ** -6)
        self.assertEqual(counts(), {"matched": 2 * layers + 1})
        self.assertEqual(matched("add_rms_norm"), 2 * layers)
        self.assertNotIn("aten.rsqrt.default", ops_after())
        self.assertEqual(ops_after().count("compile_ops.fused_add_rms_norm"), 2 * layers)
