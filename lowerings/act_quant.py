"""Fusion: SiLU-and-mul -> static FP8 quantization -> ``silu_and_mul_quant`` (see ActQuantPass).

The tail matchers (our quant ops and the native formulations) are ``norm_quant``'s.
"""

from __future__ import annotations

import operator

import torch

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.norm_quant import (AUTO_FUNCTIONALIZED, EMPTY_TARGETS, FLOATS, FP8, NormQuantPass,
                                  _feeds_fp8, _fresh, _is, _number, _only_user, _val)

aten = torch.ops.aten
prims = torch.ops.prims
_CONVERT = (prims.convert_element_type.default, aten._to_copy.default)


def _last_dim_slice(node, rank):
    """(base, start, end) of ``aten.slice(base, -1 or rank - 1, start, end)`` with step 1."""
    if not _is(node, aten.slice.Tensor):
        return None
    a = list(node.args) + [None] * (5 - len(node.args))
    base, dim, start, end, step = a[:5]
    if dim not in (-1, rank - 1) or step not in (None, 1):
        return None
    return base, (start or 0), end


def _silu_of(node, dtype):
    """(g, nodes) where ``node`` is SiLU(g) as a post-grad graph spells it: ``aten.silu(g)``,
    or Inductor's decomposition ``c / (1 + exp(-c))`` with ``c = g`` (float32) or
    ``c = g.float()`` and the quotient cast back to ``dtype``; None otherwise."""
    if _is(node, aten.silu.default):
        return node.args[0], [node]
    nodes = []
    if dtype != torch.float32:
        if not _is(node, *_CONVERT) or len(node.users) != 1:
            return None
        nodes.append(node)
        node = node.args[0]
    if not _is(node, aten.div.Tensor) or len(node.users) != 1:
        return None
    c, add = node.args
    if not (_is(add, aten.add.Tensor) and len(add.users) == 1 and _number(add.args[1], 1.0)):
        return None
    exp = add.args[0]
    if not (_is(exp, aten.exp.default) and len(exp.users) == 1):
        return None
    neg = exp.args[0]
    if not (_is(neg, aten.neg.default) and len(neg.users) == 1 and neg.args[0] is c):
        return None
    nodes += [node, add, exp, neg]
    if dtype == torch.float32:
        return c, nodes
    if not (_is(c, *_CONVERT) and len(c.users) == 2):  # read by neg and div
        return None
    return c.args[0], nodes + [c]


def _emit_fused(graph, before, x, shape, scale):
    """``silu_and_mul_quant(fresh FP8 [shape], x, scale)`` inserted before `before`; returns
    the getitem of its FP8 result."""
    with graph.inserting_before(before):
        q_buf = _fresh(graph, x, shape, FP8)
        fused = graph.call_function(
            torch.ops.higher_order.auto_functionalized,
            (torch.ops.compile_ops.silu_and_mul_quant.default,),
            {"result": q_buf, "input": x, "scale": scale})
        q = graph.call_function(operator.getitem, (fused, 1))
    q.meta["val"] = q_buf.meta["val"]
    fused.meta["val"] = (None, q_buf.meta["val"])
    return q


class ActQuantPass(NormQuantPass):
    """silu_and_mul -> static FP8 quantization -> ``silu_and_mul_quant`` (vLLM's fused op).

    Matches our ``silu_and_mul`` into a fresh buffer, or the native ``silu(x[..., :d]) *
    x[..., d:]`` (as Hugging Face and gpt-fast write an MLP; either operand order, the SiLU as
    ``aten.silu`` or Inductor's decomposition), whose output is only read by a static
    per-tensor quantization (native ``(y.float() * scale.reciprocal()).clamp(-448, 448)
    .to(float8_e4m3fn)`` or ``static_scaled_fp8_quant``): an FP8 MLP's down-projection input.
    Runs before ``lower_activation``, which would otherwise hand the activation to Inductor
    (the quantization's upcast is a pointwise neighbour). The fused op computes exactly what the
    pair does (SiLU rounded to the dtype, times up rounded, times the reciprocal scale), except
    that a NaN becomes +448 (vLLM's clamp order). Near misses: other readers of the activation,
    a dynamic (per-token) quantization (vLLM has no fused SiLU + per-token op; the per-block
    one quantizes the float32 product, not the rounded one), the reasons of ``norm_quant``'s
    static tail.
    """

    name = "act_quant"

    def apply(self, graph: torch.fx.Graph) -> int:
        if not hasattr(torch.ops.compile_ops, "silu_and_mul_quant"):
            return 0
        act = torch.ops.compile_ops.silu_and_mul.default
        cands = [n for n in graph.nodes if n.op == "call_function"
                 and n.target in AUTO_FUNCTIONALIZED and n.args[0] is act]
        native = [n for n in graph.nodes if _is(n, aten.mul.Tensor)]
        return sum(1 for n in cands if self._try_fuse_act(graph, n)) + \
            sum(1 for n in native
                if not getattr(n, "_erased", False) and self._try_fuse_native(graph, n))

    def _try_fuse_native(self, graph: torch.fx.Graph, mul: torch.fx.Node) -> bool:
        """``silu(x[..., :d]) * x[..., d:]`` (either operand order) -> static quant."""
        yv = _val(mul)
        if not isinstance(yv, torch.Tensor) or yv.dtype not in FLOATS or yv.dim() < 1 \
                or not _feeds_fp8(mul):
            return False
        for silu, up in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            if not isinstance(silu, torch.fx.Node) or not isinstance(up, torch.fx.Node):
                return False
            m = _silu_of(silu, yv.dtype)
            if m is not None:
                break
        else:
            return False
        g, silu_nodes = m
        rank = yv.dim()
        gs, us = _last_dim_slice(g, rank), _last_dim_slice(up, rank)
        if gs is None or us is None or gs[0] is not us[0]:
            return False  # not two halves of one tensor: not an MLP's gate_up
        x = gs[0]
        xv = _val(x)
        d = yv.shape[-1]
        if not isinstance(xv, torch.Tensor) or not isinstance(d, int) \
                or not isinstance(xv.shape[-1], int):
            self.near_miss("symbolic last dimension", mul)
            return False
        if gs[1:] != (0, d) or us[1] != d or not (us[2] is None or us[2] >= 2 * d) \
                or xv.shape[-1] != 2 * d:
            self.near_miss("silu(gate) * up: gate and up are not the two halves of one tensor "
                           "(x[..., :d], x[..., d:])", mul)
            return False
        if xv.dtype != yv.dtype or not xv.is_contiguous():
            self.near_miss("silu(gate) * up: the gate_up tensor is not contiguous or of "
                           "another dtype", mul)
            return False
        tail = self._match_tail(mul, yv.dtype)
        if isinstance(tail, str):
            self.near_miss(tail, mul)
            return False
        if tail.kind != "static":
            self.near_miss("dynamic per-token or group quantization of the activation (no fused "
                           "op with silu_and_mul's rounding)", mul)
            return False
        tail.q.replace_all_uses_with(_emit_fused(graph, tail.q, x, list(yv.shape), tail.scale))
        order = {n: i for i, n in enumerate(graph.nodes)}
        dead = tail.nodes + [mul] + silu_nodes
        for n in sorted(set(dead), key=lambda n: -order.get(n, -1)):
            graph.erase_node(n)
        for n in (g, up):
            if not n.users:
                graph.erase_node(n)
        self.matched("silu(%s[..., :d]) * %s[..., d:] + static FP8 quant -> silu_and_mul_quant",
                     x.name, x.name)
        return True

    def _try_fuse_act(self, graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
        x = self._arg(node, "input")
        xv = _val(x)
        ys = [u for u in node.users if _is(u, operator.getitem) and u.args[1] == 1]
        if len(ys) != 1 or not isinstance(xv, torch.Tensor) or not _feeds_fp8(ys[0]):
            return False
        y = ys[0]
        if xv.dtype not in FLOATS:
            return False
        tail = self._match_tail(y, xv.dtype)
        if isinstance(tail, str):
            self.near_miss(tail, node)
            return False
        if tail.kind == "per_token":
            self.near_miss("dynamic per-token quantization of the activation (no fused op)", node)
            return False
        if tail.kind == "group":
            self.near_miss("group quantization of the activation (silu_and_mul_per_block_quant "
                           "quantizes the float32 product, not silu_and_mul's rounded one)", node)
            return False
        out = self._out_buffer(node)
        if not _is(out, *EMPTY_TARGETS) or len(out.users) != 1:
            self.near_miss("the activation's out buffer is not a fresh allocation", node)
            return False
        if not all(_is(u, operator.getitem) for u in node.users):
            self.near_miss("activation results used other than through getitem", node)
            return False
        order = {n: i for i, n in enumerate(graph.nodes)}
        if order.get(tail.scale, len(order)) > order[node]:
            self.near_miss("the static scale is computed after the activation", node)
            return False
        yv = _val(y)
        if not isinstance(yv.shape[-1], int):
            self.near_miss("symbolic last dimension", node)
            return False
        q = _emit_fused(graph, node, x, list(yv.shape), tail.scale)
        for n in (tail.q if isinstance(tail.q, list) else [tail.q]):
            n.replace_all_uses_with(q)
        dead = list(getattr(tail, "getitems", [])) + tail.nodes + [y, node, out]
        for n in sorted(set(dead), key=lambda n: -order.get(n, -1)):
            graph.erase_node(n)
        self.matched("silu_and_mul(%s) + static FP8 quant -> silu_and_mul_quant", x.name)
        return True
