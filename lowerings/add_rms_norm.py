"""Fusion: residual add + RMSNorm -> one ``compile_ops.fused_add_rms_norm(_out)``.

Matches, in the functionalized post-grad graph::

    h     = aten.add.Tensor(x, residual)
    out   = aten.empty...(...)                       # only used as the norm's out buffer
    af    = auto_functionalized[_v2](compile_ops.rms_norm.default, out=out, input=h,
                                     weight=w, epsilon=eps)
    y     = getitem(af, 1)

and rewrites it, where x and residual may be written in place (a model's residual stream: both
are intermediates that nothing reads after the sum), as::

    af2   = auto_functionalized(compile_ops.fused_add_rms_norm.default, input=x, residual=residual,
                                weight=w, epsilon=eps)
    y     = getitem(af2, 1)   # every user of the norm output
    h     = getitem(af2, 2)   # every user of the sum

and otherwise (x or residual a graph input or a view of one, as in a layer compiled on its own,
or read again after the sum) into two fresh buffers, x and residual only read::

    o, s  = aten.empty...(...), aten.empty...(...)   # contiguous, x's shape
    af2   = auto_functionalized(compile_ops.fused_add_rms_norm_out.default, out=o,
                                residual_out=s, input=x, residual=residual, weight=w, epsilon=eps)
    y     = getitem(af2, 1)   # every user of the norm output
    h     = getitem(af2, 2)   # every user of the sum

The in-place op on a graph input would make Inductor copy the input first (two extra passes over
memory: x0.60-0.68 of add + rms_norm on the H200, session 7, bench_backend); the out-of-place op
reads each input once and writes each output once, the same bytes as Inductor's own fused add +
RMSNorm kernel. Inductor reinplaces either form: the in-place op on x and residual, the
out-of-place one into its fresh buffers, with no copies.

eps, the weight and the dtype come from the matched graph; a None weight (weightless RMSNorm)
stays None in the fused op. The chain across layers matches naturally: layer i's sum is layer
i+1's residual. RMSNorm written as module math (Hugging Face's LlamaRMSNorm) reaches this pass
as ``rms_norm`` through the ``rms_norm_math`` pass, which runs first.

Never rewritten (each is a logged near miss): operands of different shapes (broadcast) or dtypes
(type promotion), an add with alpha or a scalar, x is residual, an operand that the program
mutates (a graph input written by the program included), a norm out buffer that is not a fresh
allocation used only by the norm (a caller's buffer), layouts the fused kernels do not take, an
eps that is not a constant, a weight computed after the sum's first use.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.passes import AUTO_FUNCTIONALIZED, FusionPass, out_buffer

aten = torch.ops.aten
EMPTY_TARGETS = (aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default)


def _is_mutated(node: torch.fx.Node) -> bool:
    """The program writes into `node`: an input mutation (copy_ into it), an in-place aten op on
    it, or a mutable op that takes it as a base."""
    for u in node.users:
        if u.op != "call_function":
            continue
        t = u.target
        if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable and u.args and \
                u.args[0] is node:
            return True
        if t in AUTO_FUNCTIONALIZED:
            bases = u.kwargs.get("_all_bases")
            if bases is not None and node in bases:
                return True
            if bases is None and node in u.kwargs.values():
                schema = u.args[0]._schema
                mutated = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
                if any(u.kwargs.get(name) is node for name in mutated):
                    return True
    return False


_VIEW_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten.slice.Tensor, aten.select.int, aten.permute.default, aten.transpose.int,
             aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
             aten.as_strided.default, aten.expand.default, aten.alias.default)


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            node.target in _VIEW_OPS:
        node = node.args[0]
    return node


def _aliases_graph_input(node) -> bool:
    """`node` is a graph input or a view of one: memory the compiled graph may not write unless
    the program does, so Inductor copies it before an in-place op on it."""
    node = _view_root(node)
    return isinstance(node, torch.fx.Node) and node.op in ("placeholder", "get_attr")


def _read_from(node: torch.fx.Node, order: dict, at: int, ignore: torch.fx.Node) -> bool:
    """Some node at or after position `at` (or the graph output) other than `ignore` uses the
    memory of `node`: the node itself, the tensor it is a view of, or any view of that. Writing
    `node` in place before `at` would make Inductor copy it first."""
    root = _view_root(node)
    stack, seen = [root], {root}
    while stack:
        n = stack.pop()
        for u in n.users:
            if u is ignore:
                continue
            if u.op == "call_function" and u.target in _VIEW_OPS and u.args and u.args[0] is n:
                if u not in seen:
                    seen.add(u)
                    stack.append(u)
                continue
            if u.op == "output" or order[u] >= at:
                return True
    return False


def _rows_layout_ok(v: torch.Tensor) -> bool:
    """Provably what the fused kernel takes: last dim contiguous, leading dims collapsible."""
    if v.dim() < 1:
        return False
    if not statically_known_true(v.size(-1) <= 1) and not statically_known_true(v.stride(-1) == 1):
        return False
    expect = None
    for d in range(v.dim() - 2, -1, -1):
        if statically_known_true(v.size(d) == 1):
            continue
        if expect is not None and not statically_known_true(v.stride(d) == expect):
            return False
        expect = v.stride(d) * v.size(d)
    return True


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(statically_known_true(x == y)
                                      for x, y in zip(a.shape, b.shape))


class AddRMSNormPass(FusionPass):
    name = "add_rms_norm"

    def apply(self, graph: torch.fx.Graph) -> int:
        norm_op = torch.ops.compile_ops.rms_norm.default
        candidates = [n for n in graph.nodes if n.op == "call_function"
                      and n.target in AUTO_FUNCTIONALIZED and n.args[0] is norm_op]
        matches = 0
        for norm in candidates:
            if self._try_fuse(graph, norm):
                matches += 1
        return matches

    _out_buffer = staticmethod(out_buffer)

    def _try_fuse(self, graph: torch.fx.Graph, norm: torch.fx.Node) -> bool:
        h = norm.kwargs.get("input")
        if not isinstance(h, torch.fx.Node) or h.op != "call_function":
            return False
        if h.target is not aten.add.Tensor:
            self.near_miss(f"norm input is {h.target}, not aten.add.Tensor", norm)
            return False
        if len(h.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in h.args):
            self.near_miss("add of a scalar", h)
            return False
        if h.kwargs.get("alpha", 1) != 1:
            self.near_miss("add with alpha != 1", h)
            return False
        x, residual = h.args
        if x is residual:
            self.near_miss("x and residual are the same tensor", h)
            return False
        weight, eps = norm.kwargs.get("weight"), norm.kwargs.get("epsilon")
        if not isinstance(eps, (float, int)) or isinstance(eps, bool):
            self.near_miss("epsilon is not a constant", norm)
            return False
        if weight is not None and not isinstance(weight, torch.fx.Node):
            self.near_miss("weight is neither None nor a tensor node", norm)
            return False
        nodes = (x, residual, h) if weight is None else (x, residual, h, weight)
        vals = [n.meta.get("val") for n in nodes]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            self.near_miss("missing tensor metadata", norm)
            return False
        xv, rv, hv = vals[:3]
        wv = vals[3] if weight is not None else hv  # no weight: nothing more to agree on
        if not (_same_shape(xv, rv) and _same_shape(xv, hv)):
            self.near_miss("add operands have different shapes (broadcast)", h)
            return False
        if not (xv.dtype == rv.dtype == hv.dtype == wv.dtype):
            self.near_miss(f"dtypes differ (x {xv.dtype}, residual {rv.dtype}, sum {hv.dtype}, "
                           f"weight {wv.dtype})", h)
            return False
        if hv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self.near_miss(f"unsupported dtype {hv.dtype}", h)
            return False
        if not (xv.device == rv.device == wv.device):
            self.near_miss("operands on different devices", h)
            return False
        if not (_rows_layout_ok(xv) and _rows_layout_ok(rv)):
            self.near_miss("x or residual not in a row layout the fused kernel takes", h)
            return False
        if _is_mutated(x) or _is_mutated(residual):
            self.near_miss("x or residual is mutated by the program", h)
            return False
        out = self._out_buffer(norm)
        if out is None or out.op != "call_function" or out.target not in EMPTY_TARGETS \
                or len(out.users) != 1:
            self.near_miss("the norm's out buffer is not a fresh allocation used only by it", norm)
            return False
        results = list(norm.users)
        if not all(u.target is operator.getitem and u.args[1] == 1 for u in results):
            self.near_miss("norm result used other than through getitem(1)", norm)
            return False

        order = {n: i for i, n in enumerate(graph.nodes)}
        first_use = min(h.users, key=lambda n: order[n])
        if weight is not None and order[weight] > order[first_use]:
            self.near_miss("weight is computed after the sum's first use", norm)
            return False

        # The fused op goes right before the sum's first use. In place where x and residual are
        # the graph's own and nothing reads them from there on; else into fresh buffers.
        if _aliases_graph_input(x) or _aliases_graph_input(residual):
            why = "graph input"
        elif _read_from(x, order, order[first_use], h) or \
                _read_from(residual, order, order[first_use], h):
            why = "read after the sum"
        else:
            why = None
        with graph.inserting_before(first_use):
            if why is None:
                fused = graph.call_function(
                    torch.ops.higher_order.auto_functionalized,
                    (torch.ops.compile_ops.fused_add_rms_norm.default,),
                    {"input": x, "residual": residual, "weight": weight, "epsilon": float(eps)})
            else:
                bufs = [self._fresh_buffer(graph, x, xv) for _ in range(2)]
                fused = graph.call_function(
                    torch.ops.higher_order.auto_functionalized,
                    (torch.ops.compile_ops.fused_add_rms_norm_out.default,),
                    {"out": bufs[0], "residual_out": bufs[1], "input": x, "residual": residual,
                     "weight": weight, "epsilon": float(eps)})
            new_out = graph.call_function(operator.getitem, (fused, 1))
            new_sum = graph.call_function(operator.getitem, (fused, 2))
        if why is None:  # the results are x's and residual's memory
            with getattr(xv, "fake_mode", None) or contextlib.nullcontext():
                out_val = torch.empty_strided(xv.shape, xv.stride(), dtype=xv.dtype,
                                              device=xv.device)
                sum_val = torch.empty_strided(rv.shape, rv.stride(), dtype=rv.dtype,
                                              device=rv.device)
        else:
            out_val, sum_val = (b.meta["val"] for b in bufs)
        fused.meta["val"] = (None, out_val, sum_val)
        new_out.meta["val"] = out_val
        new_sum.meta["val"] = sum_val

        for r in results:
            r.replace_all_uses_with(new_out)
            graph.erase_node(r)
        graph.erase_node(norm)
        graph.erase_node(out)
        h.replace_all_uses_with(new_sum)
        graph.erase_node(h)
        self.matched("%s + %s -> %s(eps=%g%s)", x.name, residual.name,
                     "fused_add_rms_norm" if why is None else
                     f"fused_add_rms_norm_out (x or residual {why})", float(eps),
                     "" if weight is not None else ", weight=None")
        return True

    @staticmethod
    def _fresh_buffer(graph: torch.fx.Graph, x: torch.fx.Node, xv: torch.Tensor) -> torch.fx.Node:
        """A new contiguous buffer of x's shape, dtype and device (symbolic shapes: through
        empty_like of x, which only reads x's metadata)."""
        static = all(type(d) is int for d in xv.shape)
        if static:
            buf = graph.call_function(aten.empty.memory_format, (list(xv.shape),),
                                      {"dtype": xv.dtype, "device": xv.device,
                                       "pin_memory": False})
        else:
            buf = graph.call_function(aten.empty_like.default, (x,),
                                      {"memory_format": torch.contiguous_format})
        with getattr(xv, "fake_mode", None) or contextlib.nullcontext():
            buf.meta["val"] = torch.empty_like(xv, memory_format=torch.contiguous_format)
        return buf

