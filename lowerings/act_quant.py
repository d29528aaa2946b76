"""Fusion: SiLU-and-mul -> static FP8 quantization -> ``silu_and_mul_quant`` (see ActQuantPass).

The tail matchers (our quant ops and the native formulations) are ``norm_quant``'s.
"""

from __future__ import annotations

import operator

import torch

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.norm_quant import (AUTO_FUNCTIONALIZED, EMPTY_TARGETS, FLOATS, FP8, NormQuantPass,
                                  _feeds_fp8, _fresh, _is, _val)


class ActQuantPass(NormQuantPass):
    """silu_and_mul -> static FP8 quantization -> ``silu_and_mul_quant`` (vLLM's fused op).

    Matches our ``silu_and_mul`` into a fresh buffer whose output is only read by a static
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
        return sum(1 for n in cands if self._try_fuse_act(graph, n))

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
        with graph.inserting_before(node):
            q_buf = _fresh(graph, x, list(yv.shape[:-1]) + [yv.shape[-1]], FP8)
            fused = graph.call_function(
                torch.ops.higher_order.auto_functionalized,
                (torch.ops.compile_ops.silu_and_mul_quant.default,),
                {"result": q_buf, "input": x, "scale": tail.scale})
            q = graph.call_function(operator.getitem, (fused, 1))
        q.meta["val"] = q_buf.meta["val"]
        fused.meta["val"] = (None, q_buf.meta["val"])
        for n in (tail.q if isinstance(tail.q, list) else [tail.q]):
            n.replace_all_uses_with(q)
        dead = list(getattr(tail, "getitems", [])) + tail.nodes + [y, node, out]
        for n in sorted(set(dead), key=lambda n: -order.get(n, -1)):
            graph.erase_node(n)
        self.matched("silu_and_mul(%s) + static FP8 quant -> silu_and_mul_quant", x.name)
        return True
