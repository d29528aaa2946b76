"""Fusion: RMSNorm (or residual add + RMSNorm) -> FP8 quantization -> one fused norm + quant op.

On an FP8 (W8A8) model every RMSNorm feeds a quantization of its output before the FP8 GEMM
(``torch._scaled_mm``): two passes over the activations where one does. This pass matches our
norm ops (``rms_norm`` into a fresh buffer, or the in-place ``fused_add_rms_norm`` that the
``add_rms_norm`` pass makes of ``x + residual`` + RMSNorm) followed by a quantization of the
normalized output, written either as our quant ops or as the native PyTorch that people write::

    static per tensor:  q = (y.float() * scale.reciprocal()).clamp(-448, 448).to(float8_e4m3fn)
                        (or compile_ops.static_scaled_fp8_quant(q, y, scale))
    dynamic per token:  s = (y.float().abs().amax(-1, keepdim=True) / 448).clamp(min=1/(448*512))
                        q = (y.float() / s).clamp(-448, 448).to(float8_e4m3fn)
                        (or compile_ops.dynamic_per_token_scaled_fp8_quant(q, y, s, None))
    per group (64/128): the per-token formula over y.float().view(T, H // g, g), the FP8 result
                        viewed back to [T, H] (vLLM's native group quantization)

and rewrites the pair into vLLM's fused ops:

    rms_norm            + static     -> rms_norm_static_fp8_quant(q, x, w, scale, eps)
    rms_norm            + per token  -> rms_norm_dynamic_per_token_quant(q, x, w, s, eps, None,
                                                                         None)
    fused_add_rms_norm  + static     -> fused_add_rms_norm_static_fp8_quant(q, x, residual, w,
                                                                            scale, eps)
    fused_add_rms_norm  + per token  -> rms_norm_dynamic_per_token_quant(q, x, w, s, eps, None,
                                                                         residual)
    (either)            + per group  -> rms_norm_per_block_quant(q, x, w, s, eps, None,
                                                                 residual or None, g, False)

The fused ops compute the quantization exactly as the native formulas above (the same float32
reciprocal-multiply or division, the same minimum scale), with two differences that vLLM's own
fusion passes accept: a NaN in the normalized output becomes +448 (vLLM's kernels clamp with
fmaxf/fminf; the native ``clamp`` keeps NaN), and ``fused_add_rms_norm_static_fp8_quant`` takes the
statistics over the sum rounded to the model dtype (vLLM's kernel; ``fused_add_rms_norm`` uses the
float32 sum: at most an ulp of the dtype in the sum, which can move an FP8 code by one).

The higher-precision norm output is dropped: the fused op only writes the FP8 tensor. Where
anything else reads the normalized output, the pair is left alone (near miss). The residual sum of
the in-place add + norm keeps its users (the fused op writes it into ``residual`` in place, as
``fused_add_rms_norm`` did).

Never rewritten (each a logged near miss): a norm without a weight (vLLM's fused ops take a
weight), a norm whose out buffer is not a fresh allocation, a normalized output read by anything
but the quantization, a static scale that is not a float32 tensor of one element defined before the
norm, a static quantization that divides by the scale (the fused op multiplies by the reciprocal,
vLLM's numerics), other clamp bounds, other minimum scales, an amax over other dims, an FP8 type
other than float8_e4m3fn, an input dtype other than float32/float16/bfloat16, the out-of-place add
+ norm (``fused_add_rms_norm_out``: its inputs are only read, the fused op writes the residual in
place).
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.passes import AUTO_FUNCTIONALIZED, FusionPass, functionalized_arg, out_buffer

aten = torch.ops.aten
prims = torch.ops.prims
EMPTY_TARGETS = (aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        node.target in targets


def _only_user(node: torch.fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _number(v, want: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and \
        math.isclose(float(v), want, rel_tol=1e-6, abs_tol=0.0)


def _clamp_bounds(node: torch.fx.Node):
    """(lo, hi, last node) of clamp_min -> clamp_max (or clamp_max -> clamp_min, or one
    aten.clamp) starting at `node`; None if `node` is no clamp."""
    if _is(node, aten.clamp.default):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        return lo, hi, node
    if _is(node, aten.clamp_min.default, aten.clamp_max.default):
        nxt = _only_user(node)
        first_min = node.target is aten.clamp_min.default
        other = aten.clamp_max.default if first_min else aten.clamp_min.default
        if not _is(nxt, other) or nxt.args[0] is not node:
            return None
        a, b = node.args[1], nxt.args[1]
        return (a, b, nxt) if first_min else (b, a, nxt)
    return None


def _quant_ops() -> tuple:
    """Our quant ops that may follow a norm (static per tensor, dynamic per token)."""
    return tuple(getattr(torch.ops.compile_ops, n).default
                 for n in ("static_scaled_fp8_quant", "dynamic_per_token_scaled_fp8_quant")
                 if hasattr(torch.ops.compile_ops, n))


def _feeds_fp8(y: torch.fx.Node, depth: int = 8) -> bool:
    """Something within `depth` nodes downstream of `y` produces an FP8 tensor (a quantization
    of the normalized output, ours or native)."""
    frontier, seen = [y], {y}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                if u.target in AUTO_FUNCTIONALIZED and u.args[0] in _quant_ops():
                    return True
                v = _val(u)
                if isinstance(v, torch.Tensor) and v.dtype == FP8:
                    return True
                nxt.append(u)
        frontier = nxt
    return False


def _viewed(graph: torch.fx.Graph, node: torch.fx.Node, want: torch.Tensor,
            before: torch.fx.Node) -> torch.fx.Node:
    """`node` itself, or a view of it with `want`'s shape, inserted before `before`."""
    have = _val(node)
    if list(have.shape) == list(want.shape):
        return node
    shape = [d if isinstance(d, int) else -1 for d in want.shape]
    if shape.count(-1) > 1:
        shape = list(want.shape)
    with graph.inserting_before(before):
        v = graph.call_function(aten.view.default, (node, shape))
    with getattr(have, "fake_mode", None) or contextlib.nullcontext():
        v.meta["val"] = have.view(want.shape)
    return v


def _fresh(graph: torch.fx.Graph, x: torch.fx.Node, shape: list, dtype) -> torch.fx.Node:
    """A new contiguous buffer of `shape` (dims of x's shape, or 1) on x's device; symbolic
    dims are read from x through sym_size nodes."""
    xv = _val(x)
    args = []
    for d, n in enumerate(shape):
        if isinstance(n, int):
            args.append(n)
            continue
        dim = next(i for i, m in enumerate(xv.shape)
                   if isinstance(m, torch.SymInt) and m.node.expr == n.node.expr)
        sz = graph.call_function(aten.sym_size.int, (x, dim))
        sz.meta["val"] = n
        args.append(sz)
    buf = graph.call_function(aten.empty.memory_format, (args,),
                              {"dtype": dtype, "device": xv.device, "pin_memory": False})
    with getattr(xv, "fake_mode", None) or contextlib.nullcontext():
        buf.meta["val"] = torch.empty(shape, dtype=dtype, device=xv.device)
    return buf


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
GROUPS = (64, 128)


class _Tail:
    """A matched quantization of the normalized output."""

    def __init__(self, kind, q, nodes, scale=None, s=None):
        self.kind = kind      # "static" or "per_token"
        self.q = q            # the node whose value is the FP8 tensor (replaced)
        self.nodes = nodes    # every node of the tail, erased after the rewrite
        self.scale = scale    # static: the scale tensor node
        self.s = s            # per token: the node whose value is the [.., 1] scales (replaced)


class NormQuantPass(FusionPass):
    name = "norm_quant"

    def apply(self, graph: torch.fx.Graph) -> int:
        if not hasattr(torch.ops.compile_ops, "rms_norm_dynamic_per_token_quant"):
            return 0  # (a build of the package without the norm + quant ops)
        norm_ops = (torch.ops.compile_ops.rms_norm.default,
                    torch.ops.compile_ops.fused_add_rms_norm.default,
                    torch.ops.compile_ops.fused_add_rms_norm_out.default)
        cands = [n for n in graph.nodes if n.op == "call_function"
                 and n.target in AUTO_FUNCTIONALIZED and n.args[0] in norm_ops]
        return sum(1 for n in cands if self._try_fuse(graph, n))

    # -----------------------------------------------------------------------------------------
    _out_buffer = staticmethod(out_buffer)

    _arg = staticmethod(functionalized_arg)

    def _match_tail(self, y: torch.fx.Node, dtype: torch.dtype):
        """The quantization of `y`, or a near-miss reason (str)."""
        user = _only_user(y)
        if user is None and not (dtype == torch.float32 and len(y.users) == 2):
            return "the norm or activation output has other readers besides one quantization"
        # Our quant ops.
        if user is not None and user.target in AUTO_FUNCTIONALIZED:
            return self._match_op_tail(y, user)
        base, nodes = y, []
        if user is None:
            pass  # float32: `.float()` is gone, the per-token tail reads y twice
        elif _is(user, prims.convert_element_type.default, aten._to_copy.default):
            to = user.args[1] if len(user.args) > 1 else user.kwargs.get("dtype")
            if to != torch.float32:
                return f"the normalized output is converted to {to}, not float32"
            base, nodes = user, [user]
        elif dtype != torch.float32:
            return f"the normalized output ({dtype}) is not upcast to float32 before quantizing"
        users = list(base.users)
        if len(users) == 1 and _is(users[0], *_VIEWS):  # [T, H] -> [T, H / g, g]: groups
            view, yv = users[0], _val(y)
            vv = _val(view)
            g = vv.shape[-1] if vv is not None and vv.dim() == yv.dim() + 1 else None
            if g not in GROUPS or not statically_known_true(vv.shape[-2] * g == yv.shape[-1]) \
                    or list(vv.shape[:-2]) != list(yv.shape[:-1]):
                return "the normalized output is reshaped, not into groups of 64 or 128 columns"
            if len(view.users) != 2:
                return "no FP8 quantization of the normalized output"
            return self._match_per_token(view, list(view.users), nodes + [view], group=g)
        if len(users) == 1 and _is(users[0], aten.mul.Tensor):
            return self._match_static(base, users[0], nodes)
        if len(users) == 1 and _is(users[0], aten.div.Tensor):
            return "static quantization divides by the scale (the fused op multiplies by its " \
                   "reciprocal, vLLM's numerics)"
        if len(users) == 2:
            return self._match_per_token(base, users, nodes)
        return "no FP8 quantization of the normalized output"

    def _match_static(self, base, mul, nodes):
        other = mul.args[1] if mul.args[0] is base else mul.args[0]
        if not _is(other, aten.reciprocal.default) or len(other.users) != 1:
            return "static quantization: the multiplier is not scale.reciprocal()"
        scale = other.args[0]
        sv = _val(scale)
        if not isinstance(sv, torch.Tensor) or sv.dtype != torch.float32 or sv.numel() != 1:
            return "static scale is not a float32 tensor of one element"
        return self._finish(_Tail("static", None, nodes + [other, mul], scale=scale), mul)

    def _match_per_token(self, base, users, nodes, group=None):
        absn = next((u for u in users if _is(u, aten.abs.default)), None)
        div = next((u for u in users if _is(u, aten.div.Tensor) and u.args[0] is base), None)
        if absn is None or div is None:
            return "no FP8 quantization of the normalized output"
        amax = _only_user(absn)
        if not _is(amax, aten.amax.default):
            return "per-token quantization: |y| is not reduced by amax"
        dims = amax.args[1] if len(amax.args) > 1 else amax.kwargs.get("dim")
        keep = amax.args[2] if len(amax.args) > 2 else amax.kwargs.get("keepdim", False)
        rank = _val(base).dim()
        if not keep or list(dims) not in ([-1], [rank - 1]):
            return "per-token quantization: amax is not over the last dim with keepdim"
        d448 = _only_user(amax)
        if not _is(d448, aten.div.Tensor) or not _number(d448.args[1], FP8_MAX):
            return "per-token quantization: amax is not divided by 448"
        cmin = _only_user(d448)
        if not _is(cmin, aten.clamp_min.default) or not _number(cmin.args[1], MIN_SCALE):
            return "per-token quantization: the scale is not clamped at vLLM's 1/(448*512)"
        if div.args[1] is not cmin:
            return "per-token quantization: y is not divided by its scale"
        # the scales may have other readers (the GEMM's scale_a): they get the fused op's
        tail = _Tail("per_token" if group is None else "group", None,
                     nodes + [absn, amax, d448, cmin, div], s=cmin)
        tail.group = group
        tail = self._finish(tail, div)
        if isinstance(tail, _Tail) and group is not None:
            back = _only_user(tail.q)  # the FP8 groups viewed back as rows
            if _is(back, *_VIEWS) and list(_val(back).shape) == list(_val(base).shape[:-2]) + \
                    [_val(base).shape[-2] * group]:
                tail.nodes.append(back)
                tail.q = back
        return tail

    def _finish(self, tail: _Tail, last):
        bounds = _clamp_bounds(_only_user(last)) if _only_user(last) is not None else None
        if bounds is None:
            return "the scaled value is not clamped to [-448, 448]"
        lo, hi, cl = bounds
        if not (_number(lo, -FP8_MAX) and _number(hi, FP8_MAX)):
            return f"clamp bounds ({lo}, {hi}) are not (-448, 448)"
        cvt = _only_user(cl)
        if not _is(cvt, prims.convert_element_type.default, aten._to_copy.default):
            return "the clamped value is not converted to FP8"
        to = cvt.args[1] if len(cvt.args) > 1 else cvt.kwargs.get("dtype")
        if to != FP8:
            return f"quantized to {to}, not float8_e4m3fn"
        # the clamp chain's intermediate nodes
        chain, n = [], _only_user(last)
        while n is not cl:
            chain.append(n)
            n = _only_user(n)
        chain.append(cl)
        tail.nodes += chain + [cvt]
        tail.q = cvt
        return tail

    def _match_op_tail(self, y, af):
        op = af.args[0]
        static = torch.ops.compile_ops.static_scaled_fp8_quant.default
        per_token = torch.ops.compile_ops.dynamic_per_token_scaled_fp8_quant.default
        if op not in (static, per_token):
            return f"the normalized output feeds {op}, not a quant op"
        if self._arg(af, "input") is not y:
            return "the normalized output is not the quant op's input"
        result = self._arg(af, "result")
        if not _is(result, *EMPTY_TARGETS) or len(result.users) != 1:
            return "the quant op's result is not a fresh allocation"
        if _val(result).dtype != FP8:
            return f"quantized to {_val(result).dtype}, not float8_e4m3fn"
        gets = list(af.users)
        if not all(_is(g, operator.getitem) for g in gets):
            return "the quant op's results are used other than through getitem"
        q = [g for g in gets if g.args[1] == 1]
        if op is static:
            if af.kwargs.get("group_shape") is not None:
                return "static quantization with group scales"
            scale = af.kwargs.get("scale")
            sv = _val(scale)
            if not isinstance(sv, torch.Tensor) or sv.numel() != 1:
                return "static scale is not a float32 tensor of one element"
            tail = _Tail("static", q, [af, result], scale=scale)
        else:
            if af.kwargs.get("scale_ub") is not None:
                return "per-token quantization with scale_ub"
            sbuf = self._arg(af, "scale")
            if not _is(sbuf, *EMPTY_TARGETS) or len(sbuf.users) != 1:
                return "the quant op's scale is not a fresh allocation"
            s = [g for g in gets if g.args[1] == 2]
            tail = _Tail("per_token", q, [af, result, sbuf], s=s)
        tail.getitems = gets
        return tail

    # -----------------------------------------------------------------------------------------
    def _try_fuse(self, graph: torch.fx.Graph, norm: torch.fx.Node) -> bool:
        op = norm.args[0]
        fused_add = op is torch.ops.compile_ops.fused_add_rms_norm.default
        if op is torch.ops.compile_ops.fused_add_rms_norm_out.default:
            ys = [u for u in norm.users if _is(u, operator.getitem) and u.args[1] == 1]
            if any(_feeds_fp8(y) for y in ys):
                self.near_miss("out-of-place add + norm (graph inputs): the fused quant op "
                               "writes the residual in place", norm)
            return False
        x = self._arg(norm, "input")
        weight, eps = norm.kwargs.get("weight"), norm.kwargs.get("epsilon")
        ys = [u for u in norm.users if _is(u, operator.getitem) and u.args[1] == 1]
        if len(ys) != 1:
            return False
        y = ys[0]
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or xv.dtype not in FLOATS:
            return False
        if not _feeds_fp8(y):  # not an FP8 model's norm: nothing to say
            return False
        tail = self._match_tail(y, xv.dtype)
        if isinstance(tail, str):
            self.near_miss(tail, norm)
            return False
        if weight is None:
            self.near_miss("norm without a weight (vLLM's fused norm + quant ops take one)", norm)
            return False
        if not isinstance(eps, (float, int)) or isinstance(eps, bool):
            self.near_miss("epsilon is not a constant", norm)
            return False
        order = {n: i for i, n in enumerate(graph.nodes)}
        if tail.kind == "static" and order.get(tail.scale, len(order)) > order[norm]:
            self.near_miss("the static scale is computed after the norm", norm)
            return False
        residual = self._arg(norm, "residual") if fused_add else None
        out = None if fused_add else self._out_buffer(norm)
        if not fused_add and (not _is(out, *EMPTY_TARGETS) or len(out.users) != 1):
            self.near_miss("the norm's out buffer is not a fresh allocation used only by it", norm)
            return False
        if not all(_is(u, operator.getitem) for u in norm.users):
            self.near_miss("norm results used other than through getitem", norm)
            return False
        sums = [u for u in norm.users if u.args[1] == 2] if fused_add else []

        with graph.inserting_before(norm):
            q_buf = _fresh(graph, x, list(xv.shape), FP8)
            if tail.kind == "per_token":
                s_buf = _fresh(graph, x, list(xv.shape[:-1]) + [1], torch.float32)
            elif tail.kind == "group":
                s_buf = _fresh(graph, x, list(xv.shape[:-1]) + [xv.shape[-1] // tail.group],
                               torch.float32)
            ops = torch.ops.compile_ops
            if tail.kind == "static" and not fused_add:
                target, kw = ops.rms_norm_static_fp8_quant.default, {
                    "result": q_buf, "input": x, "weight": weight, "scale": tail.scale,
                    "epsilon": float(eps)}
                idx = {"q": 1}
            elif tail.kind == "static":
                target, kw = ops.fused_add_rms_norm_static_fp8_quant.default, {
                    "result": q_buf, "input": x, "residual": residual, "weight": weight,
                    "scale": tail.scale, "epsilon": float(eps)}
                idx = {"q": 1, "sum": 2}
            elif tail.kind == "group":
                target, kw = ops.rms_norm_per_block_quant.default, {
                    "result": q_buf, "input": x, "weight": weight, "scale": s_buf,
                    "epsilon": float(eps), "scale_ub": None, "residual": residual,
                    "group_size": tail.group, "is_scale_transposed": False}
                idx = {"q": 1, "s": 2, "sum": 3} if fused_add else {"q": 1, "s": 2}
            else:
                target, kw = ops.rms_norm_dynamic_per_token_quant.default, {
                    "result": q_buf, "input": x, "weight": weight, "scale": s_buf,
                    "epsilon": float(eps), "scale_ub": None, "residual": residual}
                idx = {"q": 1, "s": 2, "sum": 3} if fused_add else {"q": 1, "s": 2}
            fused = graph.call_function(torch.ops.higher_order.auto_functionalized, (target,), kw)
            outs = {k: graph.call_function(operator.getitem, (fused, i)) for k, i in idx.items()}
        vals = {"q": q_buf.meta["val"]}
        if "s" in outs:
            vals["s"] = s_buf.meta["val"]
        if "sum" in outs:
            vals["sum"] = _val(residual)
        for k, n in outs.items():
            n.meta["val"] = vals[k]
        mutated = [vals["q"]] + ([vals["s"]] if "s" in outs else []) + \
            ([vals["sum"]] if "sum" in outs else [])
        fused.meta["val"] = tuple([None] + mutated)

        # Rewire: the FP8 tensor, the scales, the residual sum.
        qs = tail.q if isinstance(tail.q, list) else [tail.q]
        for n in qs:
            n.replace_all_uses_with(_viewed(graph, outs["q"], _val(n), n))
        if tail.kind == "group":  # native scales [.., G, 1]: a view of ours [.., G]
            for u in list(tail.s.users):
                if u not in tail.nodes:
                    u.replace_input_with(tail.s, _viewed(graph, outs["s"], _val(tail.s), u))
        if tail.kind == "per_token":
            if isinstance(tail.s, list):  # our op's getitem(2) nodes
                for n in tail.s:
                    n.replace_all_uses_with(outs["s"])
            else:  # the native scales node: its readers outside the tail (the GEMM's scale_a)
                for u in list(tail.s.users):
                    if u not in tail.nodes:
                        u.replace_input_with(tail.s, outs["s"])
        for n in sums:
            n.replace_all_uses_with(outs["sum"])
        # Erase the tail (users first), the norm and its buffer.
        dead = list(getattr(tail, "getitems", [])) + tail.nodes + [y] + sums + [norm]
        if out is not None:
            dead.append(out)
        for n in sorted(set(dead), key=lambda n: -order.get(n, -1)):
            if n.users:
                for u in list(n.users):
                    if u in dead:
                        continue
                    raise RuntimeError(f"norm_quant: {n} still used by {u}")
            graph.erase_node(n)
        self.matched("%s(%s) + %s FP8 quant -> %s", op.__name__.split(".")[0], x.name, tail.kind,
                     target.__name__.split(".")[0])
        return True

