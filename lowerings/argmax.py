"""Greedy sampling: ``aten.argmax`` over a long last dimension -> ``compile_ops.argmax``.

Matches, in the post-grad graph::

    idx = aten.argmax.default(x, dim, keepdim)       # dim the last dimension of x

and rewrites it as ``idx = compile_ops.argmax(x)`` (``unsqueeze(idx, -1)`` for keepdim). Inductor
reduces each row of an argmax in one CTA, latency-bound for a vocabulary-sized row (~29 us per
decode step on an H200 at 128k entries, at every batch up to 128); our kernel splits a row over
CTAs. An exact upcast of the input (``x.float()`` of bfloat16/float16 logits) is looked through:
it changes no order, so the kernel reads the narrow tensor.

COMPILE_OPS_ARGMAX picks the policy: ``auto`` (default: CUDA inputs whose last dimension has at
least ``MIN_N`` entries, produced by something Inductor would not fuse into its reduction anyway),
``always`` (every float input, any device and size: what the CPU tests use), ``never``.

Never rewritten (near misses): no dim (argmax over all elements), a dim other than the last, a
dtype other than float32/float16/bfloat16, a symbolic last dimension; under ``auto`` also: not on
CUDA, a last dimension under MIN_N, an input computed by a pointwise op (Inductor fuses it into
its argmax kernel; ours would first write it to memory).
"""

from __future__ import annotations

import contextlib
import os

import torch

import compile_ops  # noqa: F401  (registers torch.ops.compile_ops)
from lowerings.passes import FusionPass

aten = torch.ops.aten
POLICIES = ("auto", "always", "never")
# Shortest row the auto policy rewrites. bench/bench_sampling.py on the H200 (bench/NOTES.md,
# session 7): at 4096 entries Inductor's one-CTA-per-row kernel is faster (1.75 vs 2.66 us at one
# row, 5.0 vs 6.5 at 512), at 32000 ours is 1.3-2.8x faster, at 128256 1.65-6.8x.
MIN_N = 32000
_UPCASTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _is_pointwise(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in node.target.tags)


def _exact_upcast_source(node: torch.fx.Node):
    """`node`'s input when `node` converts a float16/bfloat16 tensor to float32 (and nothing
    else: no device or layout change), else None."""
    if node.op != "call_function" or node.target not in _UPCASTS or not node.args:
        return None
    src = node.args[0]
    sv, dv = (src.meta.get("val") if isinstance(src, torch.fx.Node) else None), node.meta.get("val")
    if not isinstance(sv, torch.Tensor) or not isinstance(dv, torch.Tensor):
        return None
    if sv.dtype not in (torch.float16, torch.bfloat16) or dv.dtype != torch.float32 or \
            sv.device != dv.device or tuple(sv.shape) != tuple(dv.shape):
        return None
    if node.target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
        return None
    return src


class ArgmaxPass(FusionPass):
    name = "argmax"

    def __init__(self, policy: str | None = None, min_n: int = MIN_N):
        policy = policy or os.environ.get("COMPILE_OPS_ARGMAX", "auto")
        if policy not in POLICIES:
            raise ValueError(f"COMPILE_OPS_ARGMAX must be one of {POLICIES}, got {policy!r}")
        self.policy, self.min_n = policy, min_n

    def settings(self) -> dict:
        return {"policy": self.policy, "min_n": self.min_n}

    def apply(self, graph: torch.fx.Graph) -> int:
        if self.policy == "never":
            return 0
        nodes = [n for n in graph.nodes
                 if n.op == "call_function" and n.target is aten.argmax.default]
        return sum(self._try(graph, n) for n in nodes)

    def _try(self, graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
        args = list(node.args) + [None, False][len(node.args) - 1:]
        x, dim, keepdim = args[0], node.kwargs.get("dim", args[1]), \
            node.kwargs.get("keepdim", args[2])
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(xv, torch.Tensor):
            self.near_miss("input without tensor metadata", node)
            return False
        if dim is None:
            self.near_miss("no dim: argmax over all elements", node)
            return False
        if xv.dim() == 0 or dim not in (-1, xv.dim() - 1):
            self.near_miss("dim is not the last dimension", node)
            return False
        if xv.dtype not in _FLOATS:
            self.near_miss(f"dtype {xv.dtype} (the kernel takes float32/float16/bfloat16)", node)
            return False
        n = xv.shape[-1]
        if not isinstance(n, int):
            self.near_miss("symbolic last dimension", node)
            return False
        src = _exact_upcast_source(x) or x
        if self.policy == "auto":
            if xv.device.type != "cuda":
                self.near_miss("not a CUDA tensor", node)
                return False
            if n < self.min_n:
                self.near_miss(f"last dimension {n} < {self.min_n}: Inductor's kernel is as fast",
                               node)
                return False
            if _is_pointwise(src):
                self.near_miss("input computed by a pointwise op: Inductor fuses it into the "
                               "argmax", node)
                return False
        fake_mode = getattr(xv, "fake_mode", None) or contextlib.nullcontext()
        sv = src.meta["val"]
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.compile_ops.argmax.default, (src,))
            with fake_mode:
                new.meta["val"] = torch.ops.compile_ops.argmax.default(sv)
            if keepdim:
                un = graph.call_function(aten.unsqueeze.default, (new, -1))
                with fake_mode:
                    un.meta["val"] = aten.unsqueeze.default(new.meta["val"], -1)
                new = un
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if src is not x and not x.users:
            graph.erase_node(x)  # the upcast fed only the argmax
        self.matched("argmax(%s)%s -> compile_ops.argmax", src.name,
                     " (through an exact upcast)" if src is not x else "")
        return True
