"""Rewrite: RMSNorm written as module math -> ``compile_ops.rms_norm`` (issue 16).

Models written in plain PyTorch (Hugging Face's ``LlamaRMSNorm``, gpt-fast's ``RMSNorm``,
``F.rms_norm`` without a weight) reach the post-grad graph as::

    x32 = prims.convert_element_type(x, float32)        # absent when x is float32
    sq  = aten.pow.Tensor_Scalar(x32, 2)                 # or aten.mul.Tensor(x32, x32)
    ms  = aten.mean.dim(sq, [-1], True)                  # the last dim only, keepdim
    a   = aten.add.Tensor(ms, eps)                       # (or add.Scalar; eps a constant)
    r   = aten.rsqrt.default(a)
    y   = aten.mul.Tensor(x32, r)                        # the same x32 as squared
    yb  = prims.convert_element_type(y, x.dtype)         # absent when x is float32
    out = aten.mul.Tensor(w, yb)                         # either order; absent: weightless

and are rewritten as::

    buf = aten.empty.memory_format(x.shape, dtype=x.dtype, device=x.device)
                                          # (aten.empty_like(x, contiguous) for symbolic shapes)
    af  = auto_functionalized(compile_ops.rms_norm.default, out=buf, input=x, weight=w,
                              epsilon=eps)                # weight=None when weightless
    out = getitem(af, 1)                                  # every user of the old `out`

This is the node form ``AddRMSNormPass`` (which runs next) fuses with a residual add feeding x
into ``fused_add_rms_norm``: Hugging Face's decoder layers become one fused add + norm each.

Exactly the same numbers: ``rms_norm`` accumulates the mean square in float32, rounds the
normalized value to x's dtype and multiplies by the weight in that dtype, which is the rounding
sequence of the matched math (``weight * y.to(dtype)``). So everything that would change a
rounding step is refused. Never rewritten (each a logged near miss): an exponent other than 2,
the square and the normalize multiplying different tensors, a mean over other dims or without
keepdim, statistics not in float32 (a bfloat16 x squared without an upcast), an eps that is not
a constant >= 0, an upcast whose float32 result is not converted back to x's dtype before the
weight multiply (Gemma's ``(1 + weight)`` applied in float32: one rounding fewer), a convert to
another dtype, a weight that is not 1-d of x's last dim size, x's dtype and device, contiguous
(a float32 weight on a bfloat16 x promotes the multiply to float32), x of a dtype other than
float32/float16/bfloat16 or in a layout the kernel does not take, a mean-centred x (LayerNorm
written out), and an intermediate (upcast, square, mean, add, rsqrt, normalize multiply, convert
back) that is also used outside the norm.
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.add_rms_norm import _rows_layout_ok, _same_shape
from lowerings.passes import FusionPass

aten = torch.ops.aten
prims = torch.ops.prims

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CONVERTS = (prims.convert_element_type.default, aten._to_copy.default)
_ADDS = (aten.add.Tensor, aten.add.Scalar)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _val(n):
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _dt(dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _is_call(node, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and \
        node.target in targets


def _convert(node):
    """(source, dtype) when `node` only converts a tensor's dtype, else None."""
    if not _is_call(node, _CONVERTS) or not node.args:
        return None
    src, sv, dv = node.args[0], _val(node.args[0]), _val(node)
    if sv is None or dv is None or sv.device != dv.device:
        return None
    if node.target is aten._to_copy.default and (
            len(node.args) > 1 or set(node.kwargs) - {"dtype", "layout", "device"}
            or node.kwargs.get("layout") not in (None, torch.strided)):
        return None
    return src, dv.dtype


def _const(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_square(node):
    """(x32, exponent) for ``pow.Tensor_Scalar(x32, e)`` or ``mul.Tensor(x32, x32)`` (e = 2),
    else None: the anchor of a candidate."""
    if _is_call(node, (aten.pow.Tensor_Scalar,)) and len(node.args) == 2 and \
            isinstance(node.args[0], torch.fx.Node):
        return node.args[0], node.args[1]
    if _is_call(node, (aten.mul.Tensor,)) and len(node.args) == 2 and \
            isinstance(node.args[0], torch.fx.Node) and node.args[0] is node.args[1]:
        return node.args[0], 2
    return None


def _only_user(node, user) -> bool:
    return len(node.users) == 1 and user in node.users


def _sole_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other_operand(mul, node):
    """For ``aten.mul.Tensor(a, b)`` with `node` one operand: the other; else None."""
    if not _is_call(mul, (aten.mul.Tensor,)) or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    if a is node:
        return b
    if b is node:
        return a
    return None


def _last_dim_only(dims, rank: int) -> bool:
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
        return False
    return rank >= 1 and dims[0] % rank == rank - 1


def _mean_centred(x) -> bool:
    """`x` is ``sub(a, mean(a, [-1], keepdim))``: a LayerNorm written out, not an RMSNorm."""
    if not _is_call(x, (aten.sub.Tensor,)) or len(x.args) != 2:
        return False
    a, m = x.args
    if not _is_call(m, (aten.mean.dim,)):
        return False
    src = m.args[0]
    conv = _convert(src)
    return src is a or (conv is not None and conv[0] is a)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.permute.default, aten.transpose.int, aten.unsqueeze.default,
          aten.squeeze.dim, aten.expand.default, aten.alias.default, aten.slice.Tensor,
          aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, operator.getitem)


def _feeds_only_pointwise(node) -> bool:
    """Every use of `node` (through views) is an elementwise aten op: Inductor would fuse the
    norm's math into those kernels, where our op is a kernel of its own and a round trip through
    memory. A GEMM, a custom op, a reduction or a graph output among the uses: False."""
    stack, seen, users = [node], set(), 0
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op != "call_function":
                return False
            if u.target in _VIEWS:
                stack.append(u)
                continue
            tags = getattr(u.target, "tags", ())
            if torch.Tag.pointwise not in tags and u.target is not aten.cat.default:
                return False
            users += 1
    return users > 0


# From this many rows (tokens) on, Inductor's kernel for the module math beats ours: bench_backend
# on an H100 (session 10), HF's add + LlamaRMSNorm per layer at 4096 wide: ours x1.03-1.26 of
# Inductor's at 1-128 tokens, x0.83 at 256 (77% against 93% of the copy bandwidth).
MAX_ROWS = 256


class RMSNormMathPass(FusionPass):
    name = "rms_norm_math"

    def apply(self, graph: torch.fx.Graph) -> int:
        candidates = [n for n in graph.nodes if _is_call(n, (aten.mean.dim,)) and n.args
                      and _is_square(n.args[0]) is not None]
        matches = 0
        for mean in candidates:
            if self._try(graph, mean):
                matches += 1
        return matches

    def _try(self, graph: torch.fx.Graph, mean: torch.fx.Node) -> bool:
        sq = mean.args[0]
        x32, exponent = _is_square(sq)

        # -- the statistics: mean(x32^2, [-1], keepdim) + eps, rsqrt -----------------------------
        if not _const(exponent) or exponent != 2:
            self.near_miss(f"pow exponent {exponent!r}, not 2", sq)
            return False
        xv32 = _val(x32)
        if xv32 is None or _val(mean) is None:
            self.near_miss("missing tensor metadata", mean)
            return False
        dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
        keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
        if not _last_dim_only(dims, xv32.dim()):
            self.near_miss(f"mean over dims {dims}, not the last dim only", mean)
            return False
        if keepdim is not True:
            self.near_miss("mean without keepdim", mean)
            return False
        if mean.kwargs.get("dtype") is not None or xv32.dtype != torch.float32 or \
                _val(mean).dtype != torch.float32:
            self.near_miss(f"statistics in {_dt(_val(mean).dtype)} (squared tensor "
                           f"{_dt(xv32.dtype)}), not float32", mean)
            return False
        if not _only_user(sq, mean):
            self.near_miss("the square is also used outside the norm", sq)
            return False
        add = _sole_user(mean)
        if add is None:
            self.near_miss("the mean square is also used outside the norm", mean)
            return False
        if not _is_call(add, _ADDS) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
            self.near_miss(f"the mean square goes to {add.target}, not + eps", add)
            return False
        eps = add.args[1] if add.args[0] is mean else add.args[0]
        if not _const(eps):
            self.near_miss("epsilon is not a constant", add)
            return False
        if not (0.0 <= float(eps) < math.inf):
            self.near_miss(f"epsilon {eps!r} is not finite and >= 0", add)
            return False
        rsqrt = _sole_user(add)
        if rsqrt is None:
            self.near_miss("mean square + eps is also used outside the norm", add)
            return False
        if not _is_call(rsqrt, (aten.rsqrt.default,)):
            self.near_miss(f"mean square + eps goes to {rsqrt.target}, not rsqrt", rsqrt)
            return False
        norm = _sole_user(rsqrt)
        if norm is None:
            self.near_miss("the rsqrt is also used outside the norm", rsqrt)
            return False
        other = _other_operand(norm, rsqrt)
        if other is None:
            self.near_miss(f"the rsqrt goes to {norm.target}, not a multiply", norm)
            return False
        if other is not x32:
            self.near_miss("the normalize multiply takes another tensor than the one squared",
                           norm)
            return False
        if _mean_centred(x32):
            self.near_miss("the input is mean-centred (LayerNorm, not RMSNorm)", norm)
            return False

        # -- precision: upcast x -> float32 ... convert back to x's dtype, or float32 throughout --
        inner = [sq, mean, add, rsqrt, norm]
        up = _convert(x32)
        if up is not None and _val(up[0]) is not None and _val(up[0]).dtype in (
                torch.float16, torch.bfloat16):
            x = up[0]
            xv = _val(x)
            if set(x32.users) != {sq, norm}:
                self.near_miss("the float32 upcast of x is also used outside the norm", x32)
                return False
            back = _sole_user(norm)
            conv = _convert(back)
            if back is None:
                self.near_miss("the float32 normalized value is also used outside the norm", norm)
                return False
            if conv is None:
                self.near_miss(f"the float32 normalized value goes to {back.target}, not a "
                               f"convert back to {_dt(xv.dtype)} (a weight applied in float32, "
                               f"as Gemma's 1 + weight, rounds differently)", back)
                return False
            if conv[1] != xv.dtype:
                self.near_miss(f"the normalized value is converted to {_dt(conv[1])}, not to "
                               f"x's dtype {_dt(xv.dtype)}", back)
                return False
            inner = [x32] + inner + [back]
            y = back
        else:
            x, xv, y = x32, xv32, norm
            back = _sole_user(norm)
            conv = _convert(back) if back is not None else None
            if conv is not None and conv[1] != torch.float32:
                self.near_miss(f"the float32 normalized value is converted to {_dt(conv[1])}, "
                               f"but x is float32", back)
                return False

        # -- x -------------------------------------------------------------------------------------
        if xv.dtype not in _FLOATS:
            self.near_miss(f"unsupported dtype {_dt(xv.dtype)}", x)
            return False
        if not _rows_layout_ok(xv):
            self.near_miss("x not in a row layout the kernel takes", x)
            return False

        # -- the weight multiply, or none (weightless) ----------------------------------------
        weight = None
        out = y
        scaled = [u for u in y.users if _is_call(u, (aten.mul.Tensor,))
                  and isinstance(_other_operand(u, y), torch.fx.Node)]
        if scaled:
            wmul = scaled[0]
            if len(y.users) != 1:
                self.near_miss("the normalized value is also used outside the weight multiply",
                               y)
                return False
            weight = _other_operand(wmul, y)
            wv, ov = _val(weight), _val(wmul)
            if wv is None or ov is None:
                self.near_miss("missing tensor metadata", wmul)
                return False
            if wv.dim() != 1 or not statically_known_true(wv.size(0) == xv.size(-1)):
                self.near_miss(f"weight of shape {tuple(wv.shape)}, not [{xv.size(-1)}] "
                               f"(1-d of x's last dim)", wmul)
                return False
            if wv.dtype != xv.dtype:
                self.near_miss(f"weight dtype {_dt(wv.dtype)} != x dtype {_dt(xv.dtype)} (type "
                               f"promotion: the multiply would round differently)", wmul)
                return False
            if wv.device != xv.device:
                self.near_miss("weight on another device than x", wmul)
                return False
            if not statically_known_true(wv.size(0) <= 1) and \
                    not statically_known_true(wv.stride(0) == 1):
                self.near_miss("weight is not contiguous", wmul)
                return False
            if ov.dtype != xv.dtype or not _same_shape(ov, xv):
                self.near_miss("the weight multiply changes the dtype or shape", wmul)
                return False
            out = wmul

        rows = math.prod(xv.shape[:-1])
        if type(rows) is int and rows >= MAX_ROWS:
            self.near_miss(f"{rows} rows (a prefill): Inductor's own fused add + RMSNorm kernel "
                           f"is faster from {MAX_ROWS} rows on", out)
            return False
        if _feeds_only_pointwise(out):
            self.near_miss("the normalized output feeds only pointwise math (a per-head q/k norm "
                           "before RoPE, as Qwen3's): Inductor fuses the norm into that kernel",
                           out)
            return False

        # -- rewrite -------------------------------------------------------------------------------
        static = all(type(s) is int for s in xv.shape)
        with graph.inserting_before(out):
            if static:
                buf = graph.call_function(
                    aten.empty.memory_format, (list(xv.shape),),
                    {"dtype": xv.dtype, "device": xv.device, "pin_memory": False})
            else:
                buf = graph.call_function(
                    aten.empty_like.default, (x,),
                    {"memory_format": torch.contiguous_format})
            af = graph.call_function(
                torch.ops.higher_order.auto_functionalized,
                (torch.ops.compile_ops.rms_norm.default,),
                {"out": buf, "input": x, "weight": weight, "epsilon": float(eps)})
            res = graph.call_function(operator.getitem, (af, 1))
        with getattr(xv, "fake_mode", None) or contextlib.nullcontext():
            if static:
                val = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
            else:
                val = torch.empty_like(xv, memory_format=torch.contiguous_format)
        buf.meta["val"] = val
        af.meta["val"] = (None, val)
        res.meta["val"] = val

        out.replace_all_uses_with(res)
        dead = [out] + [n for n in reversed(inner) if n is not out]
        for n in dead:
            if n.users:  # every intermediate was checked to be used only inside the norm
                raise AssertionError(f"rms_norm_math: {n.name} still has users {list(n.users)}")
            graph.erase_node(n)
        self.matched("%s -> rms_norm(eps=%g%s, %s)", x.name, float(eps),
                     "" if weight is not None else ", weight=None", _dt(xv.dtype))
        return True
