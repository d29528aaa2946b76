"""Fusion: tensor-parallel all-reduce + residual add + RMSNorm -> one
``compile_ops.fused_allreduce_add_rms_norm`` (issue 27).

A row-parallel linear (o_proj, down_proj) ends with an all-reduce of its partial sums; the next
thing a decoder layer does with the result is the residual add + RMSNorm. Functional collectives
(``torch.distributed._functional_collectives.all_reduce``, and ``dist.all_reduce(t)``, which
Dynamo traces into the same ops) reach the post-grad graph as::

    ar    = _c10d_functional.all_reduce.default(t, "sum", group_name)
    y     = _c10d_functional.wait_tensor.default(ar)      # not always right after ar
    af    = auto_functionalized[_v2](compile_ops.fused_add_rms_norm.default,
                                     input=y, residual=r, weight=w, epsilon=eps)
    out   = getitem(af, 1)          # rms_norm(y + r) * w
    s     = getitem(af, 2)          # y + r

(the in-place op that the ``add_rms_norm`` pass, run earlier, makes of ``y + r`` + RMSNorm, or
the model's own call; ``r + y`` as Hugging Face writes it puts y in the residual slot: the sum
is the same, so it matches too). This pass rewrites it, at the norm's position, as::

    af2   = auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default,
                                input=t, residual=r, weight=w, epsilon=eps, group_name=group_name)
    out   = getitem(af2, 1)
    s     = getitem(af2, 2)

The fused op writes the all-reduce's input in place (the functional all-reduce copied it into a
new buffer; Inductor reinplaces ``t``, or copies it where something still reads it: no worse) and
the residual in place, which ``add_rms_norm`` only chose where r is the graph's own.

It runs right after ``add_rms_norm`` and before ``norm_quant``: on an FP8 model the norm that
feeds a quantization fuses with its all-reduce here and the quantization stays its own op (there
is no all-reduce + norm + quant op yet).

``_c10d_functional.all_reduce_`` (in place) is not matched: it does not reach a post-grad graph
(torch 2.14.1's functionalization refuses its aliased output; ``dist.all_reduce`` is traced into
the functional op plus a wait).

Never rewritten (each a logged near miss, counted only where the all-reduce feeds a norm): a
reduce op other than "sum", a plain RMSNorm after the all-reduce (no residual add: the fused op
needs one), an add + RMSNorm that ``add_rms_norm`` did not fuse, the all-reduce result read by
anything besides the norm (or by something other than one wait_tensor), the out-of-place
``fused_add_rms_norm_out`` (the residual is a graph input or read after the sum: the fused op
would write it), an operand that is a view of a larger base, no weight, a non-constant eps,
operands on different devices, an all-reduce input the kernel's row layout does not take or that
shares memory with the residual, another collective between the all-reduce and the norm (fusing
would reorder collectives), the all-reduce input written before the norm (fusing would move its
read past the write).
"""

from __future__ import annotations

import contextlib
import operator

import torch

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.add_rms_norm import _VIEW_OPS, _rows_layout_ok, _same_shape, _view_root
from lowerings.passes import AUTO_FUNCTIONALIZED, FusionPass
from lowerings.passes import functionalized_arg as _arg


def _c10d_ops():
    """(all_reduce, wait_tensor), or None where this torch has no distributed support."""
    if not torch.distributed.is_available():
        return None
    ns = torch.ops._c10d_functional
    return ns.all_reduce.default, ns.wait_tensor.default


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _result_index(node: torch.fx.Node, name: str) -> int:
    """getitem index of the new value of mutated argument `name` (v1: schema order; v2: its
    base)."""
    if node.target is torch.ops.higher_order.auto_functionalized_v2:
        return 1 + node.kwargs[f"_{name}_base_index"]
    schema = node.args[0]._schema
    mutated = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
    return 1 + mutated.index(name)


def _is_af(node, op) -> bool:
    return node.op == "call_function" and node.target in AUTO_FUNCTIONALIZED and \
        node.args[0] is op


def _is_collective(node: torch.fx.Node, wait) -> bool:
    t = node.target
    if node.op != "call_function" or t is wait:
        return False
    if isinstance(t, torch._ops.OpOverload):
        return t.namespace in ("_c10d_functional", "c10d", "_c10d_functional_autograd")
    if t in AUTO_FUNCTIONALIZED:  # a custom op that talks to a process group (ours included)
        return any(a.name == "group_name" for a in node.args[0]._schema.arguments)
    return False


def _writes(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    """`node` writes `target` in place (an input mutation's copy_, an in-place aten op, a
    mutable custom op taking it)."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable:
        return bool(node.args) and node.args[0] is target
    if t in AUTO_FUNCTIONALIZED:
        bases = node.kwargs.get("_all_bases")
        if bases is not None:
            return target in bases
        mutated = {a.name for a in node.args[0]._schema.arguments
                   if a.alias_info and a.alias_info.is_write}
        return any(node.kwargs.get(m) is target for m in mutated)
    return False


def _written_between(node: torch.fx.Node, order: dict, lo: int, hi: int) -> bool:
    """Some node strictly between positions lo and hi writes the memory of `node` (itself, the
    tensor it views, or any view of that)."""
    root = _view_root(node)
    stack, seen = [root], {root}
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in _VIEW_OPS and u.args and u.args[0] is n and u not in seen:
                seen.add(u)
                stack.append(u)
            elif lo < order[u] < hi and _writes(u, n):
                return True
    return False


class AllReduceNormPass(FusionPass):
    name = "allreduce_norm"

    def apply(self, graph: torch.fx.Graph) -> int:
        c10d = _c10d_ops()
        if c10d is None:
            return 0
        self._ar, self._wait = c10d
        ars = [n for n in graph.nodes if n.op == "call_function" and n.target is self._ar]
        return sum(1 for ar in ars if self._try_fuse(graph, ar))

    def _find_norm(self, ar: torch.fx.Node, order: dict):
        """(kind, norm node, the all-reduce result it reads, slot) for the first norm (in graph
        order) that reads the all-reduce result (through a wait, or directly), or None: not a
        candidate."""
        ops = torch.ops.compile_ops
        readers = []
        for u in ar.users:
            readers.extend(u.users if u.target is self._wait else [u])
        for r in sorted(set(readers), key=order.__getitem__):
            if r.op != "call_function":
                continue
            for kind, op in (("fused", ops.fused_add_rms_norm.default),
                             ("fused_out", ops.fused_add_rms_norm_out.default)):
                if not _is_af(r, op):
                    continue
                for slot in ("input", "residual"):
                    y = r.kwargs.get(slot) if kind == "fused_out" else _arg(r, slot)
                    if y is ar or (isinstance(y, torch.fx.Node) and y.target is self._wait
                                   and y.args[0] is ar):
                        return kind, r, y, slot
                if kind == "fused":
                    return "view", r, None, None  # a view of the result as a v2 base
            if _is_af(r, ops.rms_norm.default) and r.kwargs.get("input") in (ar, *ar.users):
                return "rms_norm", r, None, None
            if r.target is torch.ops.aten.add.Tensor and any(
                    _is_af(a, ops.rms_norm.default) and a.kwargs.get("input") is r
                    for a in r.users):
                return "add", r, None, None
        return None

    def _try_fuse(self, graph: torch.fx.Graph, ar: torch.fx.Node) -> bool:
        order = {n: i for i, n in enumerate(graph.nodes)}
        found = self._find_norm(ar, order)
        if found is None:
            return False  # an all-reduce that feeds no norm: nothing to say
        kind, norm, y, slot = found
        args = list(ar.args) + [ar.kwargs.get(k) for k in ("reduce_op", "group_name")
                                if k in ar.kwargs]
        t, reduce_op, group_name = args[:3]
        if not isinstance(reduce_op, str) or reduce_op.lower() != "sum":
            self.near_miss(f"reduce op is {reduce_op!r}, not 'sum'", ar)
            return False
        if kind == "rms_norm":
            self.near_miss("no residual add (a plain rms_norm after the all-reduce; the fused op "
                           "needs a residual)", norm)
            return False
        if kind == "add":
            self.near_miss("the residual add was not fused with the norm (see add_rms_norm's "
                           "near misses)", norm)
            return False
        if kind == "view":
            self.near_miss("the norm's input or residual is a view of a larger base", norm)
            return False
        if len(ar.users) != 1 or y.target is not self._wait:
            self.near_miss("the all-reduce result is not read through one wait_tensor", ar)
            return False
        wait = y
        if len(wait.users) != 1:
            self.near_miss("the all-reduce result is also read by another op", wait)
            return False
        if kind == "fused_out":
            self.near_miss("the residual is a graph input or read after the sum (add_rms_norm "
                           "emitted fused_add_rms_norm_out; the fused op writes it in place)",
                           norm)
            return False
        other = _arg(norm, "residual" if slot == "input" else "input")
        if not isinstance(other, torch.fx.Node):
            self.near_miss("the norm's input or residual is a view of a larger base", norm)
            return False
        if not isinstance(group_name, str):
            self.near_miss("group_name is not a constant string", ar)
            return False
        weight, eps = norm.kwargs.get("weight"), norm.kwargs.get("epsilon")
        if not isinstance(weight, torch.fx.Node):
            self.near_miss("no weight (the fused op takes one)", norm)
            return False
        if not isinstance(eps, (float, int)) or isinstance(eps, bool):
            self.near_miss("epsilon is not a constant", norm)
            return False
        tv, rv, wv = _val(t), _val(other), _val(weight)
        if not all(isinstance(v, torch.Tensor) for v in (tv, rv, wv)):
            self.near_miss("missing tensor metadata", norm)
            return False
        if not (tv.device == rv.device == wv.device):
            self.near_miss("operands on different devices", norm)
            return False
        if tv.dtype != rv.dtype or not _same_shape(tv, rv):
            self.near_miss("the all-reduce input and the residual differ in dtype or shape", ar)
            return False
        if not _rows_layout_ok(tv):
            self.near_miss("the all-reduce input is not in a row layout the fused kernel takes",
                           ar)
            return False
        if _view_root(t) is _view_root(other) or _view_root(t) is _view_root(weight):
            self.near_miss("the all-reduce input shares memory with the residual or weight", ar)
            return False
        results = list(norm.users)
        # input <- the norm, residual <- the sum, whichever slot the all-reduce result took
        norm_idx, sum_idx = _result_index(norm, "input"), _result_index(norm, "residual")
        if not all(u.target is operator.getitem and u.args[1] in (norm_idx, sum_idx)
                   for u in results):
            self.near_miss("norm result used other than through getitem", norm)
            return False
        between = [n for n in graph.nodes if order[ar] < order[n] < order[norm]]
        if any(_is_collective(n, self._wait) for n in between):
            self.near_miss("another collective between the all-reduce and the norm (fusing "
                           "would reorder collectives)", ar)
            return False
        if _written_between(t, order, order[ar], order[norm]):
            self.near_miss("the all-reduce input is written before the norm (fusing would "
                           "move its read past the write)", ar)
            return False

        with graph.inserting_before(norm):
            fused = graph.call_function(
                torch.ops.higher_order.auto_functionalized,
                (torch.ops.compile_ops.fused_allreduce_add_rms_norm.default,),
                {"input": t, "residual": other, "weight": weight, "epsilon": float(eps),
                 "group_name": group_name})
            new_out = graph.call_function(operator.getitem, (fused, 1))
            new_sum = graph.call_function(operator.getitem, (fused, 2))
        with getattr(tv, "fake_mode", None) or contextlib.nullcontext():  # t's and r's memory
            out_val = torch.empty_strided(tv.shape, tv.stride(), dtype=tv.dtype, device=tv.device)
            sum_val = torch.empty_strided(rv.shape, rv.stride(), dtype=rv.dtype, device=rv.device)
        fused.meta["val"] = (None, out_val, sum_val)
        new_out.meta["val"] = out_val
        new_sum.meta["val"] = sum_val

        for r in results:
            r.replace_all_uses_with(new_out if r.args[1] == norm_idx else new_sum)
            graph.erase_node(r)
        graph.erase_node(norm)
        graph.erase_node(wait)
        graph.erase_node(ar)
        self.matched("all_reduce(%s, group %s) + %s -> fused_allreduce_add_rms_norm(eps=%g)",
                     t.name, group_name, other.name, float(eps))
        return True
