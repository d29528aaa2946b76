"""The compile_ops backend and the residual-add + RMSNorm fusion, tested on compiled graphs."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from expecttest import TestCase

import compile_ops
import lowerings
from compile_ops.testing import assert_close

ops = torch.ops.compile_ops
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDDEN = 32


def _w(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(HIDDEN, generator=g).to(dtype), requires_grad=False)


class Layers(torch.nn.Module):
    """vLLM-style residual stream: each layer adds its input to the residual and normalizes."""

    def __init__(self, n=2, eps=1e-5, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.ws = torch.nn.ParameterList([_w(i, dtype) for i in range(n)])
        self.lin = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=dtype)

    def forward(self, x, residual):
        # as in a model, the residual stream starts inside the graph: the in-place fused op
        # (graph inputs take the out-of-place one: TestGraphInputs)
        x, residual = self.lin(x), self.lin(residual)
        for w in self.ws:
            h = x + residual
            out = torch.empty_like(h)
            ops.rms_norm(out, h, w, self.eps)
            x, residual = self.lin(out), h
        return x, residual


def _inputs(tokens=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, HIDDEN, generator=g).to(dtype),
            torch.randn(tokens, HIDDEN, generator=g).to(dtype))


def run_both(model, inputs, backend="compile_ops", **kw):
    """(eager outputs, compiled outputs), each on fresh clones of the inputs."""
    with torch.no_grad():
        eager = model(*[t.clone() for t in inputs])
        compiled = torch.compile(model, backend=backend, fullgraph=True, **kw)
        got = compiled(*[t.clone() for t in inputs])
    return eager, got


def assert_same(eager, got, dtype=None):
    eager = eager if isinstance(eager, tuple) else (eager,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(eager) == len(got)
    for a, b in zip(got, eager):
        assert_close(a, b, dtype)


def matched():
    return lowerings.counters().get("add_rms_norm", {}).get("matched", 0)


def near_misses():
    return {k[len("near_miss: "):]: v for k, v in lowerings.counters().get("add_rms_norm", {}).items()
            if k.startswith("near_miss: ")}


def ops_after():
    return "\n".join(lowerings.pass_manager().ops_after)


class CallRecorder:
    """Records the compile_ops ops a (compiled) function calls at run time, from profiler events
    (a dispatch mode would stop Dynamo from running compiled code)."""

    def __enter__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        self.calls = [e.name for e in self._prof.events() if e.name.startswith("compile_ops::")]
        return False


class TestFusion(TestCase):
    def test_two_layers_fused(self):
        eager, got = run_both(Layers(2), _inputs())
        assert_same(eager, got)
        self.assertEqual(matched(), 2)
        self.assertEqual(near_misses(), {})
        self.assertExpectedInline(ops_after(), """\
aten.mm.default
aten.mm.default
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.permute.default
aten.permute.default
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.fused_add_rms_norm.default)
getitem
getitem
getitem
getitem""")
        self.assertIn("auto_functionalized(compile_ops.rms_norm.default)",
                      lowerings.pass_manager().ops_before)

    def test_chain_of_four_layers_bf16(self):
        model = Layers(4, dtype=torch.bfloat16)
        eager, got = run_both(model, _inputs(7, torch.bfloat16))
        assert_same(eager, got)
        self.assertEqual(matched(), 4)

    def test_compiled_code_calls_the_fused_op(self):
        model = Layers(3)
        inputs = _inputs()
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        with torch.no_grad():
            compiled(*[t.clone() for t in inputs])
            with CallRecorder() as rec:
                compiled(*[t.clone() for t in inputs])
        self.assertEqual(rec.calls, ["compile_ops::fused_add_rms_norm"] * 3)

    def test_epsilon_taken_from_the_graph(self):
        # Tiny activations: the result depends strongly on eps, so a rewrite with another eps
        # would not match eager.
        model = Layers(1, eps=1e-2)
        x, r = (t * 1e-3 for t in _inputs())
        eager, got = run_both(model, (x, r))
        assert_same(eager, got)
        self.assertEqual(matched(), 1)
        with torch.no_grad():
            other = Layers(1, eps=1e-6)
            other.load_state_dict(model.state_dict())
            assert (other(x.clone(), r.clone())[1] - eager[1]).abs().max() == 0  # same sum
            assert (other(x.clone(), r.clone())[0] - eager[0]).abs().max() > 1e-3

    def test_dynamic_token_count(self):
        model = Layers(2)
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        for tokens in (3, 11, 17):
            x, r = _inputs(tokens, seed=tokens)
            xc, rc = x.clone(), r.clone()
            torch._dynamo.mark_dynamic(xc, 0)
            torch._dynamo.mark_dynamic(rc, 0)
            with torch.no_grad():
                assert_same(model(x, r), compiled(xc, rc))
        self.assertEqual(matched(), 2)  # one compile, dynamic in tokens

    def test_no_weight_fuses_with_none(self):
        # Weightless RMSNorm (weight None, as current vLLM): fused with weight None kept.
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=torch.bfloat16)

            def forward(self, x, residual):
                x, residual = self.lin(x), self.lin(residual)  # intermediates, as in a model
                for _ in range(2):
                    h = x + residual
                    out = torch.empty_like(h)
                    ops.rms_norm(out, h, None, 1e-5)
                    x, residual = self.lin(out), h
                return x, residual

        model = M()
        inputs = _inputs(7, torch.bfloat16)
        eager, got = run_both(model, inputs)
        assert_same(eager, got)
        self.assertEqual(matched(), 2)
        self.assertEqual(near_misses(), {})
        self.assertNotIn("auto_functionalized(compile_ops.rms_norm.default)", ops_after())
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        with torch.no_grad():
            compiled(*[t.clone() for t in inputs])
            with CallRecorder() as rec:
                compiled(*[t.clone() for t in inputs])
        self.assertEqual(rec.calls, ["compile_ops::fused_add_rms_norm"] * 2)

    def test_sum_used_by_other_ops_too(self):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = _w(0)

            def forward(self, x, r):
                h = x.sin() + r.cos()  # operands computed in the graph (not its inputs)
                mean = h.mean()  # another user of the sum
                out = torch.empty_like(h)
                ops.rms_norm(out, h, self.w, 1e-5)
                return out + mean, h * 2

        eager, got = run_both(M(), _inputs())
        assert_same(eager, got)
        self.assertEqual(matched(), 1)


class AddNorm(torch.nn.Module):
    """out = rms_norm(make_sum(x, r)): one model for the negative cases."""

    def __init__(self, make_sum, returns_sum=False):
        super().__init__()
        self.w = _w(0)
        self.make_sum = make_sum
        self.returns_sum = returns_sum

    def forward(self, x, r):
        h = self.make_sum(x, r)
        out = torch.empty_like(h)
        ops.rms_norm(out, h, self.w, 1e-5)
        return (out, h) if self.returns_sum else out


class HFLayer(torch.nn.Module):
    """Plain PyTorch as Hugging Face writes a decoder layer's tail: the residual add in the model
    dtype, then LlamaRMSNorm's module math (float32 statistics, cast back, times the weight)."""

    def __init__(self, dtype=torch.float32, eps=1e-6):
        super().__init__()
        self.weight = _w(0, dtype)
        self.eps = eps

    def forward(self, x, residual):
        h = x + residual
        hf = h.to(torch.float32)
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hf.to(h.dtype), h


def compile_and_record(model, inputs, **kw):
    """(eager outputs, compiled outputs, compile_ops ops the compiled model calls on its second
    run, its generated code), one compile; the caller's tensors must be left as they were."""
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(model, backend="compile_ops", fullgraph=True, **kw)
    kept = [t.clone() for t in inputs]
    with torch.no_grad():
        eager = model(*[t.clone() for t in inputs])
        got, code = run_and_get_code(compiled, *inputs)
        with CallRecorder() as rec:
            compiled(*inputs)
    for t, k in zip(inputs, kept):
        assert torch.equal(t, k), "the compiled graph wrote an input"
    return eager, got, rec.calls, "\n".join(code)


class TestGraphInputs(TestCase):
    """A layer compiled on its own (regional compilation, a graph break, piecewise graphs): x and
    residual are graph inputs. The in-place fused op would make Inductor copy both first (x0.60-
    0.68 of add + rms_norm on the H200, session 7), so they fuse into fused_add_rms_norm_out:
    fresh buffers, the inputs only read, one kernel and no copies."""

    def _check_out_of_place(self, model, inputs, calls=("compile_ops::fused_add_rms_norm_out",),
                            exact=False):
        eager, got, rec, code = compile_and_record(model, inputs)
        if exact:  # float32: the same float32 steps as add + rms_norm
            for a, b in zip(got, eager):
                self.assertTrue(torch.equal(a, b))
        else:
            assert_same(eager, got)
        self.assertEqual(rec, list(calls))
        self.assertIn("compile_ops.fused_add_rms_norm_out", code)
        self.assertNotIn("clone", code)  # the inputs are never copied
        self.assertNotIn("compile_ops.rms_norm", code)

    def test_ops_layer_fuses_out_of_place(self):
        self._check_out_of_place(AddNorm(lambda x, r: x + r, returns_sum=True), _inputs(),
                                 exact=True)
        self.assertEqual(lowerings.counters()["add_rms_norm"], {"matched": 1})
        self.assertExpectedInline("\n".join(lowerings.pass_manager().ops_before), """\
aten.add.Tensor
aten.empty.memory_format
auto_functionalized(compile_ops.rms_norm.default)
getitem""")
        self.assertExpectedInline(ops_after(), """\
aten.empty.memory_format
aten.empty.memory_format
auto_functionalized(compile_ops.fused_add_rms_norm_out.default)
getitem
getitem""")

    def test_views_of_graph_inputs(self):
        # x a row slice of an input, residual computed from another: out of place, no copy
        self._check_out_of_place(AddNorm(lambda x, r: x[1:] + r.sin()[1:], returns_sum=True),
                                 _inputs(7))
        self.assertEqual(lowerings.counters()["add_rms_norm"], {"matched": 1})

    def test_hf_layer_fuses_through_rms_norm_math(self):
        # the native formulation: rms_norm_math turns the module math into rms_norm, then this
        # pass fuses the add feeding it
        self._check_out_of_place(HFLayer(), _inputs(), exact=True)
        self.assertEqual(lowerings.counters()["rms_norm_math"], {"matched": 1})
        self.assertEqual(lowerings.counters()["add_rms_norm"], {"matched": 1})
        self.assertExpectedInline("\n".join(lowerings.pass_manager().ops_before), """\
aten.add.Tensor
aten.add.Tensor
aten.mean.dim
aten.mul.Tensor
aten.mul.Tensor
aten.pow.Tensor_Scalar
aten.rsqrt.default""")
        self.assertExpectedInline(ops_after(), """\
aten.empty.memory_format
aten.empty.memory_format
auto_functionalized(compile_ops.fused_add_rms_norm_out.default)
getitem
getitem""")

    def test_hf_layer_bfloat16_dynamic_tokens(self):
        # bf16: the fused op normalizes the float32 sum, eager the sum rounded to bf16 (within
        # bf16 rounding); one compile for every token count
        model = HFLayer(torch.bfloat16)
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        for tokens in (3, 9, 17):
            x, r = _inputs(tokens, torch.bfloat16, seed=tokens)
            xc, rc = x.clone(), r.clone()
            torch._dynamo.mark_dynamic(xc, 0)
            torch._dynamo.mark_dynamic(rc, 0)
            with torch.no_grad():
                assert_same(model(x, r), compiled(xc, rc))
            self.assertTrue(torch.equal(xc, x) and torch.equal(rc, r))
        self.assertEqual(matched(), 1)
        self.assertIn("compile_ops.fused_add_rms_norm_out.default", ops_after())

    def test_no_weight(self):
        class M(torch.nn.Module):
            def forward(self, x, r):
                h = x + r
                out = torch.empty_like(h)
                ops.rms_norm(out, h, None, 1e-5)
                return out, h

        self._check_out_of_place(M(), _inputs(6, torch.bfloat16))
        self.assertEqual(matched(), 1)

    def test_regional_stack(self):
        # each layer compiled on its own, as bench_backend does: one graph, shared by the layers
        layer = HFLayer()
        compiled = torch.compile(layer, backend="compile_ops", fullgraph=True)
        x, r = _inputs()
        with torch.no_grad():
            ex, er = x, r
            for _ in range(3):
                ex, er = layer(ex, er)
            compiled(x, r)
            gx, gr = x, r
            with CallRecorder() as rec:
                for _ in range(3):
                    gx, gr = compiled(gx, gr)
        assert_same((ex, er), (gx, gr))
        self.assertEqual(rec.calls, ["compile_ops::fused_add_rms_norm_out"] * 3)
        self.assertEqual(matched(), 1)

    def test_stream_starting_at_graph_inputs(self):
        # the first layer's operands are the graph's inputs (out of place); from the second on
        # the residual stream is the graph's own (in place, as before)
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ws = torch.nn.ParameterList([_w(i) for i in range(3)])
                self.lin = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)

            def forward(self, x, residual):
                for w in self.ws:
                    h = x + residual
                    out = torch.empty_like(h)
                    ops.rms_norm(out, h, w, 1e-5)
                    x, residual = self.lin(out), h
                return x, residual

        self._check_out_of_place(M(), _inputs(), calls=["compile_ops::fused_add_rms_norm_out"] +
                                 ["compile_ops::fused_add_rms_norm"] * 2)
        self.assertEqual(matched(), 3)
        after = ops_after()
        self.assertEqual(after.count("compile_ops.fused_add_rms_norm_out.default"), 1)
        self.assertEqual(after.count("compile_ops.fused_add_rms_norm.default"), 2)

    def test_operand_read_after_the_sum(self):
        # x is the graph's own but read again after the sum: written in place, Inductor would
        # copy it first; out of place instead
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = _w(0)

            def forward(self, x, r):
                x, r = x.sin(), r.cos()
                h = x + r
                out = torch.empty_like(h)
                ops.rms_norm(out, h, self.w, 1e-5)
                return out + x, h

        self._check_out_of_place(M(), _inputs())
        self.assertEqual(matched(), 1)


class TestNoFusion(TestCase):
    """Graphs where fusing would change results or cannot be expressed: left alone. x and r are
    graph inputs here: each reason is found before the operands' kind matters."""

    def _check(self, model, inputs, reason):
        eager, got = run_both(model, inputs)
        assert_same(eager, got)
        self.assertEqual(matched(), 0)
        self.assertTrue(any(reason in k for k in near_misses()), near_misses())
        self.assertIn("auto_functionalized(compile_ops.rms_norm.default)",
                      lowerings.pass_manager().ops_after)

    def test_broadcast(self):
        self._check(AddNorm(lambda x, r: x + r[:1]), _inputs(), "broadcast")  # [1, H] over tokens
        self.assertExpectedInline(ops_after(), """\
aten.add.Tensor
aten.empty.memory_format
aten.slice.Tensor
auto_functionalized(compile_ops.rms_norm.default)
getitem""")

    def test_dtype_promotion(self):
        x, r = _inputs()
        self._check(AddNorm(lambda x, r: x + r), (x.to(torch.bfloat16), r), "dtypes differ")

    def test_norm_input_not_an_add(self):
        self._check(AddNorm(lambda x, r: x * r, returns_sum=True), _inputs(),
                    "not aten.add.Tensor")

    def test_add_with_alpha(self):
        self._check(AddNorm(lambda x, r: torch.add(x, r, alpha=2.0)), _inputs(), "alpha")

    def test_same_operand_twice(self):
        self._check(AddNorm(lambda x, r: x + x), _inputs(), "same tensor")

    def test_input_mutated_between_add_and_norm(self):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = _w(0)

            def forward(self, x, r):
                h = x + r
                x.mul_(3.0)  # the caller's x changes between the add and the norm
                out = torch.empty_like(h)
                ops.rms_norm(out, h, self.w, 1e-5)
                return out

        x, r = _inputs()
        x_eager, x_comp = x.clone(), x.clone()
        model = M()
        with torch.no_grad():
            eager = model(x_eager, r.clone())
            got = torch.compile(model, backend="compile_ops", fullgraph=True)(x_comp, r.clone())
        assert_same(eager, got)
        assert_same(x_eager, x_comp)
        self.assertEqual(matched(), 0)
        self.assertIn("x or residual is mutated by the program", near_misses())

    def test_user_provided_out_buffer(self):
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = _w(0)

            def forward(self, x, r, out):
                ops.rms_norm(out, x.sin() + r.cos(), self.w, 1e-5)  # writes the caller's buffer
                return out.sum()

        x, r = _inputs()
        model = M()
        out_e, out_c = torch.zeros_like(x), torch.zeros_like(x)
        with torch.no_grad():
            eager = model(x, r, out_e)
            got = torch.compile(model, backend="compile_ops", fullgraph=True)(x, r, out_c)
        assert_same(eager, got)
        assert_same(out_e, out_c)
        self.assertEqual(matched(), 0)
        self.assertIn("the norm's out buffer is not a fresh allocation used only by it",
                      near_misses())


class TestBackend(TestCase):
    def test_enable_disable_default_inductor(self):
        model = Layers(2)
        try:
            compile_ops.enable()
            eager, got = run_both(model, _inputs(), backend="inductor")
            assert_same(eager, got)
            self.assertEqual(matched(), 2)
        finally:
            compile_ops.disable()
        torch._dynamo.reset()
        lowerings.reset_counters()
        run_both(model, _inputs(), backend="inductor")
        self.assertEqual(matched(), 0)
        self.assertIsNone(torch._inductor.config.post_grad_custom_pre_pass)

    def test_enabled_context_manager(self):
        with compile_ops.enabled():
            run_both(Layers(1), _inputs(), backend="inductor")
        self.assertEqual(matched(), 1)
        self.assertIsNone(torch._inductor.config.post_grad_custom_pre_pass)

    def test_mode_and_options(self):
        eager, got = run_both(Layers(2), _inputs(), mode="reduce-overhead")
        assert_same(eager, got)
        self.assertEqual(matched(), 2)
        torch._dynamo.reset()
        eager, got = run_both(Layers(1), _inputs(), options={"epilogue_fusion": False})
        assert_same(eager, got)
        with self.assertRaisesRegex(Exception, "post_grad_custom_pre_pass"):
            run_both(Layers(1), _inputs(), options={"post_grad_custom_pre_pass": lambda g: None})

    def test_uuid_tracks_pass_source_and_settings(self):
        pm = lowerings.pass_manager()
        u = pm.uuid()
        self.assertEqual(u, lowerings.PassManager(pm.passes).uuid())
        self.assertNotEqual(u, lowerings.PassManager([]).uuid())

    def test_fx_graph_cache_hit_is_still_fused(self):
        model = Layers(2)
        inputs = _inputs()
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_ops_fxcache_")
        try:
            self._cache_round_trip(model, inputs)
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved

    def _cache_round_trip(self, model, inputs):
        from torch._dynamo.utils import counters

        with torch._inductor.config.patch(fx_graph_cache=True):
            counters.clear()
            run_both(model, inputs)
            first_matches = matched()
            torch._dynamo.reset()
            lowerings.reset_counters()
            compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
            with torch.no_grad():
                compiled(*[t.clone() for t in inputs])  # compiles (from the cache)
                with CallRecorder() as rec:
                    got = compiled(*[t.clone() for t in inputs])
        self.assertEqual(first_matches, 2)
        self.assertGreaterEqual(counters["inductor"]["fxgraph_cache_hit"], 1)
        self.assertEqual(matched(), 0)  # served from the cache: the pass did not run again ...
        self.assertEqual(rec.calls, ["compile_ops::fused_add_rms_norm"] * 2, rec.calls)  # fused
        with torch.no_grad():
            assert_same(model(*[t.clone() for t in inputs]), got)


def test_backend_found_through_entry_point():
    # A fresh interpreter that never imports compile_ops or lowerings itself.
    code = ("import sys, torch\n"
            "assert 'compile_ops' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
            "f = torch.compile(lambda x: x * 2 + 1, backend='compile_ops')\n"
            "assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))\n"
            "assert 'lowerings.backend' in sys.modules\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd="/", timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_debug_switch_logs_matches_and_near_misses():
    code = ("import torch, compile_ops\n"
            "ops = torch.ops.compile_ops\n"
            "w = torch.ones(8)\n"
            "def f(x, r):\n"
            "    x, r = x.sin(), r.cos()\n"
            "    h = x + r\n"
            "    out = torch.empty_like(h)\n"
            "    ops.rms_norm(out, h, w, 1e-5)\n"
            "    g = x + r[:1]\n"
            "    out2 = torch.empty_like(g)\n"
            "    ops.rms_norm(out2, g, w, 1e-5)\n"
            "    return out, out2\n"
            "torch._inductor.config.fx_graph_cache = False\n"
            "torch._functorch.config.enable_autograd_cache = False\n"
            "torch.compile(f, backend='compile_ops')(torch.randn(3, 8), torch.randn(3, 8))\n")
    env = dict(os.environ, COMPILE_OPS_DEBUG_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[compile_ops] add_rms_norm: matched" in proc.stderr, proc.stderr
    assert "near miss" in proc.stderr and "broadcast" in proc.stderr, proc.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_backend_fuses_and_matches_eager(mode):
    model = Layers(4, dtype=torch.bfloat16).cuda()
    x, r = (t.cuda() for t in _inputs(33, torch.bfloat16))
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True, mode=mode)
    with torch.no_grad():
        expected = model(x.clone(), r.clone())
        for _ in range(3):  # CUDA graph trees record on the 2nd call, replay after
            got = compiled(x.clone(), r.clone())
        assert_same(expected, got)
        with CallRecorder() as rec:
            compiled(x.clone(), r.clone())
    assert matched() == 4
    assert rec.calls.count("compile_ops::fused_add_rms_norm") == 4 or mode == "reduce-overhead"


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_graph_inputs_fuse_out_of_place(mode):
    # a layer compiled on its own on CUDA: x and residual graph inputs -> fused_add_rms_norm_out,
    # the inputs left as they were, no copy in the generated code
    from torch._inductor.utils import run_and_get_code

    model = HFLayer(torch.bfloat16).cuda()
    x, r = (t.cuda() for t in _inputs(33, torch.bfloat16))
    x0, r0 = x.clone(), r.clone()
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True, mode=mode)
    with torch.no_grad():
        expected = model(x, r)
        _, code = run_and_get_code(compiled, x, r)
        for _ in range(3):  # CUDA graph trees record on the 2nd call, replay after
            got = compiled(x, r)
        assert_same(expected, tuple(t.clone() for t in got))
        with CallRecorder() as rec:
            compiled(x, r)
    assert torch.equal(x, x0) and torch.equal(r, r0)
    assert matched() == 1
    assert "compile_ops.fused_add_rms_norm_out" in "\n".join(code)
    assert "clone" not in "\n".join(code)
    assert rec.calls == ["compile_ops::fused_add_rms_norm_out"] or mode == "reduce-overhead"
