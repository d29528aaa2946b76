"""The allreduce_norm pass on compiled tensor-parallel graphs: all-reduce + residual add + RMSNorm
-> fused_allreduce_add_rms_norm, on the CPU with gloo.

Two processes (ranks 0 and 1 of one gloo group) are started once for the whole file: each runs
every case below (compile, eager, counters, op lists), writes its results as JSON and exits; the
tests read them. One pair of processes keeps the file fast (Dynamo and Inductor warm up once per
process) and needs no port: the group meets through a file (``init_method="file://..."``).

On the CPU the fused op's body is gloo's all-gather + the rank-order float32 sum +
``fused_add_rms_norm``'s math, and with two ranks that sum is gloo's all-reduce sum bit for bit,
so the compiled models are compared with eager for equality, not within a tolerance.
"""

import json
import operator
import os
import re
import subprocess
import sys
import tempfile
import traceback

import torch
from expecttest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD = 2
H, VOCAB, EPS = 16, 64, 1e-5
NAME = "allreduce_norm"


# ---------------------------------------------------------------------------------------------
# Models (built inside the workers: `ctx` gives the rank and the group)
# ---------------------------------------------------------------------------------------------
class TP(torch.nn.Module):
    """The tail of each tensor-parallel decoder layer, `layers` times: a row-parallel projection
    (this rank's slice of the input features times its slice of a weight every rank draws the
    same), the all-reduce of the partial sums, residual add + RMSNorm. The residual stream starts
    at an embedding (the graph's own, as in a model); norm weight 0 is the first layer's input
    norm, which has no residual add yet (vLLM)."""

    def __init__(self, ctx, layers=2, dtype=torch.float32, reduce_op="sum", weight=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        k = H // ctx["world"]
        self.cols = slice(ctx["rank"] * k, (ctx["rank"] + 1) * k)
        self.group, self.reduce_op, self.layers = ctx["group"], reduce_op, layers
        self.embed = torch.nn.Embedding(VOCAB, H, _weight=torch.randn(VOCAB, H, generator=g)
                                        .to(dtype))
        self.proj = torch.nn.ParameterList(
            [torch.nn.Parameter((torch.randn(H, H, generator=g) / H ** 0.5)[:, self.cols]
                                .contiguous().to(dtype), requires_grad=False)
             for _ in range(layers)])
        self.norm_w = torch.nn.ParameterList(
            [torch.nn.Parameter((1 + 0.1 * torch.randn(H, generator=g)).to(dtype),
                                requires_grad=False) for _ in range(layers + 1)])
        self.weight = weight

    def row_parallel(self, i, x):
        return torch.nn.functional.linear(x[..., self.cols], self.proj[i])

    def w(self, i):
        return self.norm_w[i] if self.weight else None


def _fc():
    import torch.distributed._functional_collectives as fc

    return fc


class OpsTP(TP):
    """Our ops, as vLLM writes a layer: functional all_reduce, then the in-place
    fused_add_rms_norm (y <- the norm, residual <- the sum)."""

    def forward(self, ids):
        ops = torch.ops.compile_ops
        residual = self.embed(ids)
        x = torch.empty_like(residual)
        ops.rms_norm(x, residual, self.w(0), EPS)
        for i in range(self.layers):
            y = _fc().all_reduce(self.row_parallel(i, x), self.reduce_op, self.group)
            ops.fused_add_rms_norm(y, residual, self.w(i + 1), EPS)
            x = y
        return x, residual


def hf_rms_norm(h, w):
    """Hugging Face's LlamaRMSNorm."""
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * hf.to(h.dtype)


class NativeTP(TP):
    """Plain PyTorch as Hugging Face-style TP code writes it: the in-place dist.all_reduce (Dynamo
    traces it into the functional one), `residual + y`, LlamaRMSNorm's math."""

    def forward(self, ids):
        import torch.distributed as dist

        residual = self.embed(ids)
        x = hf_rms_norm(residual, self.norm_w[0])
        for i in range(self.layers):
            y = self.row_parallel(i, x)
            dist.all_reduce(y, group=self.group)
            h = residual + y
            x, residual = hf_rms_norm(h, self.norm_w[i + 1]), h
        return x, residual


class FirstNormTP(TP):
    """A vocab-parallel-style start: the embedding's partial result is all-reduced and the first
    input norm has no residual add (the fused op needs one); layer 1 fuses as usual."""

    def forward(self, ids):
        ops = torch.ops.compile_ops
        residual = _fc().all_reduce(self.row_parallel(0, self.embed(ids)), "sum", self.group)
        x = torch.empty_like(residual)
        ops.rms_norm(x, residual, self.norm_w[0], EPS)
        y = _fc().all_reduce(self.row_parallel(1, x), "sum", self.group)
        ops.fused_add_rms_norm(y, residual, self.norm_w[1], EPS)
        return y, residual


class ResultReadElsewhereTP(TP):
    """The all-reduce result is also returned: another reader of it besides the norm."""

    def forward(self, ids):
        residual = self.embed(ids)
        y = _fc().all_reduce(self.row_parallel(0, hf_rms_norm(residual, self.norm_w[0])),
                             "sum", self.group)
        h = residual + y
        return hf_rms_norm(h, self.norm_w[1]), h, y


class ResidualInputTP(TP):
    """A layer compiled on its own: the residual is a graph input, which add_rms_norm leaves to
    the out-of-place fused_add_rms_norm_out and the in-place fused op would have to write."""

    def forward(self, x, residual):
        y = _fc().all_reduce(self.row_parallel(0, x), "sum", self.group)
        h = y + residual
        return hf_rms_norm(h, self.norm_w[1]), h


class CollectiveBetweenTP(TP):
    """Another all-reduce issued between the one feeding the norm and the norm: fusing would
    move the first after the second."""

    def forward(self, ids):
        residual = self.embed(ids)
        x = hf_rms_norm(residual, self.norm_w[0])
        y = _fc().all_reduce(self.row_parallel(0, x), "sum", self.group)
        z = _fc().all_reduce(self.row_parallel(1, x), "sum", self.group)
        h = y + residual
        return hf_rms_norm(h, self.norm_w[1]), h, z


def _ids(tokens, seed=0):
    return torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(seed))


def _hidden(tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, H, generator=g), torch.randn(tokens, H, generator=g)


# name -> (model factory, list of input tuples, mark token dim dynamic)
CASES = {
    "ops": (lambda c: OpsTP(c), [(_ids(5),)], False),
    "native": (lambda c: NativeTP(c), [(_ids(5),)], False),
    "ops_bf16_dynamic": (lambda c: OpsTP(c, dtype=torch.bfloat16),
                         [(_ids(3, 1),), (_ids(9, 2),), (_ids(17, 3),)], True),
    "first_norm": (lambda c: FirstNormTP(c), [(_ids(5),)], False),
    "reduce_max": (lambda c: OpsTP(c, reduce_op="max"), [(_ids(5),)], False),
    "no_weight": (lambda c: OpsTP(c, weight=False), [(_ids(5),)], False),
    "result_read_elsewhere": (lambda c: ResultReadElsewhereTP(c), [(_ids(5),)], False),
    "residual_input": (lambda c: ResidualInputTP(c), [_hidden(5)], False),
    "collective_between": (lambda c: CollectiveBetweenTP(c), [(_ids(5),)], False),
}


# ---------------------------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------------------------
def _run_case(ctx, name):
    import lowerings
    from torch._inductor.utils import run_and_get_code

    from tests.lowerings.test_add_rms_norm import CallRecorder

    make, inputs, dynamic = CASES[name]
    torch._dynamo.reset()
    lowerings.reset_counters()
    model = make(ctx)
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
    res = {"bit_equal": [], "max_diff": [], "outputs": [], "code": ""}
    with torch.no_grad():
        for k, args in enumerate(inputs):
            eager = model(*[a.clone() for a in args])
            cargs = [a.clone() for a in args]
            if dynamic:
                torch._dynamo.mark_dynamic(cargs[0], 0)
            if k == 0:
                got, code = run_and_get_code(compiled, *cargs)
                res["code"] = "\n".join(code)
                # what the graph calls at run time (the first call compiled it)
                with CallRecorder() as rec:
                    compiled(*[a.clone() for a in args])
                res["calls"] = rec.calls
            else:
                got = compiled(*cargs)
            res["bit_equal"].append(all(torch.equal(a, b) for a, b in zip(eager, got)))
            res["max_diff"].append(max((a.float() - b.float()).abs().max().item()
                                       for a, b in zip(eager, got)))
            res["outputs"].append([t.float().tolist() for t in got])
    c = lowerings.counters()
    res["counters"] = c
    res["matched"] = c.get(NAME, {}).get("matched", 0)
    res["near_misses"] = {k[len("near_miss: "):]: v for k, v in c.get(NAME, {}).items()
                          if k.startswith("near_miss: ")}
    res["ops_before"] = lowerings.pass_manager().ops_before
    res["ops_after"] = lowerings.pass_manager().ops_after
    return res


def _worker(rank: int, world: int, directory: str) -> None:
    """Rank `rank`: every case in CASES, results to <directory>/rank<rank>.json."""
    import datetime

    import torch.distributed as dist

    os.environ["COMPILE_OPS_PASS_DEVICES"] = "all"
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method="file://" + os.path.join(directory, "rendezvous"),
                            timeout=datetime.timedelta(seconds=120))
    import compile_ops  # noqa: F401
    import lowerings

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    ctx = {"rank": rank, "world": world, "group": dist.group.WORLD,
           "group_name": dist.group.WORLD.group_name}
    results = {"group_name": ctx["group_name"]}
    with lowerings.pass_devices("all"):
        for name in CASES:
            try:
                results[name] = _run_case(ctx, name)
            except Exception:  # noqa: BLE001  (reported by the test of the case)
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


_RESULTS = {}


def results() -> list[dict]:
    """Every rank's results (the two processes run once, on first use)."""
    if "ranks" in _RESULTS:
        return _RESULTS["ranks"]
    if "error" in _RESULTS:
        raise RuntimeError(_RESULTS["error"])
    with tempfile.TemporaryDirectory(prefix="compile_ops_allreduce_norm_") as d:
        env = dict(os.environ, COMPILE_OPS_PASS_DEVICES="all", TORCHINDUCTOR_COMPILE_THREADS="1")
        env.pop("COMPILE_OPS_DUMP_GRAPHS", None)
        procs = [subprocess.Popen(
            [sys.executable, "-c", "from tests.lowerings.test_allreduce_norm import _worker; "
                                   f"_worker({r}, {WORLD}, {d!r})"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(WORLD)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=540)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                logs.append(p.communicate()[0] + "\n(timed out)")
        files = [os.path.join(d, f"rank{r}.json") for r in range(WORLD)]
        if any(p.returncode != 0 for p in procs) or not all(map(os.path.exists, files)):
            _RESULTS["error"] = "workers failed:\n" + "\n".join(
                f"--- rank {r} (exit {p.returncode}):\n{log[-6000:]}"
                for r, (p, log) in enumerate(zip(procs, logs)))
            raise RuntimeError(_RESULTS["error"])
        ranks = []
        for f in files:
            with open(f) as fh:
                ranks.append(json.load(fh))
    _RESULTS["ranks"] = ranks
    return ranks


def case(name: str) -> list[dict]:
    """The case's results of every rank; a case that raised fails here with its traceback."""
    per_rank = [r[name] for r in results()]
    for rank, r in enumerate(per_rank):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
    return per_rank


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
FUSED = "auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)"
ALL_REDUCE = "_c10d_functional.all_reduce.default"


class TestFusion(TestCase):
    def _check_fused(self, name, matched):
        per_rank = case(name)
        for r in per_rank:
            self.assertEqual(r["matched"], matched)
            self.assertEqual(r["near_misses"], {})
            self.assertTrue(all(r["bit_equal"]), r["max_diff"])  # compiled == eager, bit for bit
            self.assertNotIn(ALL_REDUCE, r["ops_after"])
            self.assertNotIn("_c10d_functional.wait_tensor.default", r["ops_after"])
            self.assertEqual(r["ops_after"].count(FUSED), matched)  # one fused op per norm
            self.assertEqual(r["ops_before"].count(ALL_REDUCE), matched)
        self.assertEqual(per_rank[0]["outputs"], per_rank[1]["outputs"])  # every rank the same
        return per_rank

    def test_ops_two_layers(self):
        per_rank = self._check_fused("ops", 2)
        for r in per_rank:
            self.assertEqual(r["calls"], ["compile_ops::rms_norm"] +
                             ["compile_ops::fused_allreduce_add_rms_norm"] * 2)
            # the all-reduce input (the projection's output) is written in place: no copy
            self.assertNotIn("clone", r["code"])
        self.assertExpectedInline("\n".join(per_rank[0]["ops_before"]), """\
_c10d_functional.all_reduce.default
_c10d_functional.all_reduce.default
_c10d_functional.wait_tensor.default
_c10d_functional.wait_tensor.default
aten.embedding.default
aten.empty.memory_format
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.slice.Tensor
aten.slice.Tensor
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.rms_norm.default)
getitem
getitem
getitem
getitem
getitem""")
        self.assertExpectedInline("\n".join(per_rank[0]["ops_after"]), """\
aten.embedding.default
aten.empty.memory_format
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.slice.Tensor
aten.slice.Tensor
auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)
auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)
auto_functionalized(compile_ops.rms_norm.default)
getitem
getitem
getitem
getitem
getitem""")

    def test_native_two_layers(self):
        # dist.all_reduce in place + `residual + y` + LlamaRMSNorm math: rms_norm_math and
        # add_rms_norm make fused_add_rms_norm of it (y in the residual slot), then this pass
        per_rank = self._check_fused("native", 2)
        for r in per_rank:
            self.assertEqual(r["counters"]["rms_norm_math"], {"matched": 3})
            self.assertEqual(r["counters"]["add_rms_norm"]["matched"], 2)
            self.assertEqual(r["calls"], ["compile_ops::rms_norm"] +
                             ["compile_ops::fused_allreduce_add_rms_norm"] * 2)
        self.assertExpectedInline("\n".join(per_rank[0]["ops_after"]), """\
aten.embedding.default
aten.empty.memory_format
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.slice.Tensor
aten.slice.Tensor
auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)
auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)
auto_functionalized(compile_ops.rms_norm.default)
getitem
getitem
getitem
getitem
getitem""")

    def test_bf16_dynamic_tokens(self):
        per_rank = self._check_fused("ops_bf16_dynamic", 2)  # one compile for 3, 9, 17 tokens
        for r in per_rank:
            self.assertEqual(len(r["bit_equal"]), 3)

    def test_first_norm_without_residual(self):
        per_rank = case("first_norm")
        for r in per_rank:
            self.assertEqual(r["matched"], 1)
            self.assertEqual(r["near_misses"], {
                "no residual add (a plain rms_norm after the all-reduce; the fused op needs a "
                "residual)": 1})
            self.assertTrue(all(r["bit_equal"]), r["max_diff"])
        self.assertEqual(per_rank[0]["outputs"], per_rank[1]["outputs"])
        self.assertExpectedInline("\n".join(per_rank[0]["ops_after"]), """\
_c10d_functional.all_reduce.default
_c10d_functional.wait_tensor.default
aten.embedding.default
aten.empty.memory_format
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.slice.Tensor
aten.slice.Tensor
auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)
auto_functionalized(compile_ops.rms_norm.default)
getitem
getitem
getitem""")


class TestNoFusion(TestCase):
    """Fusing would change results or cannot be expressed: the graph keeps its all-reduces, the
    compiled model still matches eager, a near miss says why."""

    def _check(self, name, reason, all_reduces=1):
        per_rank = case(name)
        for r in per_rank:
            self.assertEqual(r["matched"], 0)
            self.assertIn(reason, r["near_misses"])
            self.assertTrue(all(r["bit_equal"]), r["max_diff"])
            self.assertNotIn(FUSED, r["ops_after"])
            self.assertEqual(r["ops_after"].count(ALL_REDUCE), all_reduces)
        self.assertEqual(per_rank[0]["outputs"], per_rank[1]["outputs"])
        return per_rank

    def test_reduce_max(self):
        per_rank = self._check("reduce_max", "reduce op is 'max', not 'sum'", all_reduces=2)
        self.assertEqual(per_rank[0]["near_misses"], {"reduce op is 'max', not 'sum'": 2})
        self.assertExpectedInline("\n".join(per_rank[0]["ops_after"]), """\
_c10d_functional.all_reduce.default
_c10d_functional.all_reduce.default
_c10d_functional.wait_tensor.default
_c10d_functional.wait_tensor.default
aten.embedding.default
aten.empty.memory_format
aten.mm.default
aten.mm.default
aten.permute.default
aten.permute.default
aten.slice.Tensor
aten.slice.Tensor
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.fused_add_rms_norm.default)
auto_functionalized(compile_ops.rms_norm.default)
getitem
getitem
getitem
getitem
getitem""")

    def test_no_weight(self):
        self._check("no_weight", "no weight (the fused op takes one)", all_reduces=2)

    def test_result_read_elsewhere(self):
        per_rank = self._check("result_read_elsewhere",
                               "the all-reduce result is also read by another op")
        # the graph is what add_rms_norm left: the all-reduce, its wait, the out-of-place norm
        for r in per_rank:
            self.assertIn("auto_functionalized(compile_ops.fused_add_rms_norm_out.default)",
                          r["ops_after"])
            self.assertIn("_c10d_functional.wait_tensor.default", r["ops_after"])

    def test_residual_graph_input(self):
        self._check("residual_input", "the residual is a graph input or read after the sum "
                    "(add_rms_norm emitted fused_add_rms_norm_out; the fused op writes it in "
                    "place)")

    def test_collective_between(self):
        self._check("collective_between", "another collective between the all-reduce and the "
                    "norm (fusing would reorder collectives)", all_reduces=2)


# ---------------------------------------------------------------------------------------------
# Hand-built graphs (no process group needed: the pass only reads the graph)
# ---------------------------------------------------------------------------------------------
def _graph(slot="input", write_between=False, weight_device="cpu"):
    """t -> all_reduce -> wait -> fused_add_rms_norm(wait in `slot`, r = 2 * r0), returning
    (norm, sum)."""
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    g = torch.fx.Graph()

    def node(n, device="cpu", shape=(5, H)):
        n.meta["val"] = torch.empty(shape, device=device)
        return n

    t, r0 = node(g.placeholder("t")), node(g.placeholder("r0"))
    w = node(g.placeholder("w"), weight_device, (H,))
    r = node(g.call_function(aten.mul.Tensor, (r0, 2.0)))
    ar = node(g.call_function(c10d.all_reduce.default, (t, "sum", "7")))
    if write_between:
        g.call_function(aten.copy_.default, (t, r))
    wait = node(g.call_function(c10d.wait_tensor.default, (ar,)))
    slots = {"input": wait, "residual": r} if slot == "input" else {"input": r, "residual": wait}
    af = g.call_function(torch.ops.higher_order.auto_functionalized,
                         (torch.ops.compile_ops.fused_add_rms_norm.default,),
                         {**slots, "weight": w, "epsilon": 1e-3})
    g.output((g.call_function(operator.getitem, (af, 1)),
              g.call_function(operator.getitem, (af, 2))))
    return g, t, r, w


def _apply(graph):
    import lowerings
    from lowerings.allreduce_norm import AllReduceNormPass

    lowerings.reset_counters()
    n = AllReduceNormPass().apply(graph)
    graph.lint()
    c = lowerings.counters().get(NAME, {})
    return n, {k[len("near_miss: "):]: v for k, v in c.items() if k.startswith("near_miss: ")}


class TestHandBuiltGraphs(TestCase):
    def _fused(self, graph):
        (node,) = [n for n in graph.nodes if n.op == "call_function"
                   and n.target is torch.ops.higher_order.auto_functionalized]
        return node

    def test_rewrite(self):
        for slot in ("input", "residual"):  # `y + r` or `r + y`: the same fused call
            g, t, r, w = _graph(slot)
            self.assertEqual(_apply(g), (1, {}))
            fused = self._fused(g)
            self.assertIs(fused.args[0], torch.ops.compile_ops.fused_allreduce_add_rms_norm.default)
            self.assertEqual(dict(fused.kwargs), {"input": t, "residual": r, "weight": w,
                                                  "epsilon": 1e-3, "group_name": "7"})
            out = next(n for n in g.nodes if n.op == "output")
            # the norm is the input's new value, the sum the residual's
            self.assertEqual([(a.args[0], a.args[1]) for a in out.args[0]],
                             [(fused, 1), (fused, 2)])
            self.assertFalse(any(str(n.target).startswith("_c10d_functional") for n in g.nodes))

    def test_input_written_before_the_norm(self):
        g, *_ = _graph(write_between=True)
        self.assertEqual(_apply(g), (0, {
            "the all-reduce input is written before the norm (fusing would move its read past "
            "the write)": 1}))

    def test_different_devices(self):
        g, *_ = _graph(weight_device="meta")
        self.assertEqual(_apply(g), (0, {"operands on different devices": 1}))


def test_generated_code_calls_the_fused_op_with_the_group():
    # the fused op, in place on the projection's output and the residual stream, takes the
    # all-reduce's group by name (the default group's here)
    group = results()[0]["group_name"]
    for r in case("ops"):
        calls = re.findall(r"fused_allreduce_add_rms_norm\.default\((\w+), (\w+), \w+, "
                           r"1e-05, '(\w+)'\)", r["code"])
        assert len(calls) == 2 and all(c[2] == group for c in calls), r["code"]
        assert calls[0][1] == calls[1][1]  # one residual buffer through both layers
