"""Lower the gated activations to aten pointwise ops where Inductor can fuse them.

Our activation kernels are opaque to Inductor: an ``out = silu_and_mul(x)`` followed by ``out * s``
(or preceded by a pointwise producer of ``x``) costs an extra round trip through memory. Under the
``compile_ops`` backend this pass rewrites

    af = auto_functionalized[_v2](compile_ops.<act>_and_mul.default, out=empty, input=x, ...)
    y  = getitem(af, 1)

into the same math in aten ops (slices, the activation, the multiply) so that Inductor generates
one fused kernel with the neighbours. Where there is nothing to fuse with (the usual GEMM ->
activation -> GEMM MLP), the op and its CUDA kernel stay.

COMPILE_OPS_LOWER_ACTIVATIONS picks the policy: ``auto`` (default: lower only next to a fusable
pointwise neighbour), ``always``, ``never``.
"""

from __future__ import annotations

import contextlib
import operator
import os

import torch

import compile_ops  # noqa: F401
from lowerings.passes import AUTO_FUNCTIONALIZED, FusionPass, out_buffer

aten = torch.ops.aten
EMPTY_TARGETS = (aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default)
_ACTS = ("silu_and_mul", "mul_and_silu", "gelu_and_mul", "gelu_tanh_and_mul", "fatrelu_and_mul",
         "swigluoai_and_mul")
POLICIES = ("auto", "always", "never")


def _is_pointwise(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags)


class ActivationLoweringPass(FusionPass):
    name = "lower_activation"

    def __init__(self, policy: str | None = None):
        policy = policy or os.environ.get("COMPILE_OPS_LOWER_ACTIVATIONS", "auto")
        if policy not in POLICIES:
            raise ValueError(f"COMPILE_OPS_LOWER_ACTIVATIONS must be one of {POLICIES}, got "
                             f"{policy!r}")
        self.policy = policy

    def settings(self) -> dict:
        return {"policy": self.policy}

    def apply(self, graph: torch.fx.Graph) -> int:
        if self.policy == "never":
            return 0
        targets = {getattr(torch.ops.compile_ops, n).default: n for n in _ACTS}
        nodes = [n for n in graph.nodes if n.op == "call_function"
                 and n.target in AUTO_FUNCTIONALIZED and n.args[0] in targets]
        return sum(self._try_lower(graph, n, targets[n.args[0]]) for n in nodes)

    _out_buffer = staticmethod(out_buffer)

    def _try_lower(self, graph, node, act: str) -> bool:
        x = node.kwargs.get("input")
        out = self._out_buffer(node)
        results = list(node.users)
        if not isinstance(x, torch.fx.Node) or not isinstance(x.meta.get("val"), torch.Tensor):
            self.near_miss("input without tensor metadata", node)
            return False
        if out is None or out.op != "call_function" or out.target not in EMPTY_TARGETS \
                or len(out.users) != 1:
            self.near_miss("out is not a fresh allocation used only by the op", node)
            return False
        if not all(u.target is operator.getitem and u.args[1] == 1 for u in results):
            self.near_miss("result used other than through getitem(1)", node)
            return False
        xv = x.meta["val"]
        two_d = xv.shape[-1]
        if not isinstance(two_d, int):
            self.near_miss("symbolic last dimension", node)
            return False
        scalars = {k: node.kwargs[k] for k in ("threshold", "alpha", "limit") if k in node.kwargs}
        if not all(isinstance(v, (int, float)) for v in scalars.values()):
            self.near_miss("non-constant scalar argument", node)
            return False
        if self.policy == "auto":
            users = [u for r in results for u in r.users]
            if not (_is_pointwise(x) or any(_is_pointwise(u) for u in users)):
                self.near_miss("kept the CUDA kernel: no pointwise neighbour to fuse with", node)
                return False

        fake_mode = getattr(xv, "fake_mode", None) or contextlib.nullcontext()

        def emit(target, *args, **kwargs):
            n = graph.call_function(target, args, kwargs)
            vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
            with fake_mode:
                n.meta["val"] = target(*vals, **kwargs)
            return n

        with graph.inserting_before(node):
            y = self._emit_math(emit, act, x, xv.dtype, two_d // 2, scalars)
        for r in results:
            r.replace_all_uses_with(y)
            graph.erase_node(r)
        graph.erase_node(node)
        graph.erase_node(out)
        self.matched("%s(%s) -> aten pointwise", act, x.name)
        return True

    @staticmethod
    def _emit_math(emit, act, x, dtype, d, s):
        """The op's math in ops that Inductor lowers directly (post-grad graphs hold no ops that
        have decompositions: silu, gelu, clamp, threshold, _to_copy are spelled out)."""
        mul, add = aten.mul.Tensor, aten.add.Tensor
        cvt = torch.ops.prims.convert_element_type.default

        def silu(t):
            return emit(mul, t, emit(aten.sigmoid.default, t))

        if act == "swigluoai_and_mul":
            alpha, limit = float(s.get("alpha", 1.702)), float(s.get("limit", 7.0))
            gate = emit(cvt, emit(aten.slice.Tensor, x, -1, 0, 2 * d, 2), torch.float32)
            up = emit(cvt, emit(aten.slice.Tensor, x, -1, 1, 2 * d, 2), torch.float32)
            g = emit(aten.clamp_max.default, gate, limit)
            u = emit(aten.clamp_max.default, emit(aten.clamp_min.default, up, -limit), limit)
            glu = emit(mul, g, emit(aten.sigmoid.default, emit(mul, g, alpha)))
            return emit(cvt, emit(mul, emit(add, u, 1.0), glu), dtype)
        a = emit(aten.slice.Tensor, x, -1, 0, d)
        b = emit(aten.slice.Tensor, x, -1, d, 2 * d)
        if act == "mul_and_silu":
            return emit(mul, a, silu(b))
        if act == "silu_and_mul":
            f = silu(a)
        elif act == "gelu_and_mul":  # 0.5 a (1 + erf(a / sqrt 2))
            e = emit(aten.erf.default, emit(mul, a, 0.7071067811865476))
            f = emit(mul, emit(mul, a, 0.5), emit(add, e, 1.0))
        elif act == "gelu_tanh_and_mul":  # 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))
            cube = emit(mul, emit(mul, a, a), a)
            inner = emit(mul, emit(add, a, emit(mul, cube, 0.044715)), 0.7978845608028654)
            f = emit(mul, emit(mul, a, 0.5), emit(add, emit(aten.tanh.default, inner), 1.0))
        else:  # fatrelu_and_mul: where(a > threshold, a, 0)
            th = float(s.get("threshold", 0.0))
            zero = emit(aten.scalar_tensor.default, 0.0, dtype=dtype, device=x.meta["val"].device)
            # compare in float32 as the op does: a bf16/fp16 compare would round the threshold
            # to the input dtype (0.3 -> 0.30078125 in bf16) and flip values right at it
            a32 = emit(cvt, a, torch.float32)
            f = emit(aten.where.self, emit(aten.gt.Scalar, a32, th), a, zero)
        return emit(mul, f, b)
