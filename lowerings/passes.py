"""The post-grad pass manager: an ordered list of fusion passes that Inductor runs on the
functionalized post-grad graph (``post_grad_custom_pre_pass``), one ``uuid()`` for Inductor's FX
graph cache, per-pattern match counters and a debug log of matches and near misses.

COMPILE_OPS_DEBUG_FUSION=1 logs every match and every near miss (with its reason) to stderr.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import operator
import os
import sys

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

log = logging.getLogger("compile_ops.lowerings")
if os.environ.get("COMPILE_OPS_DEBUG_FUSION", "") not in ("", "0"):
    _h = logging.StreamHandler(sys.stderr)
    _h.setFormatter(logging.Formatter("[compile_ops] %(message)s"))
    log.addHandler(_h)
    log.setLevel(logging.DEBUG)

# COUNTERS[pattern]["matched"] and COUNTERS[pattern]["near_miss: <reason>"]
COUNTERS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

AUTO_FUNCTIONALIZED = (torch.ops.higher_order.auto_functionalized,
                       torch.ops.higher_order.auto_functionalized_v2)


def counters() -> dict[str, dict[str, int]]:
    """A copy of the match counters: {pattern: {"matched": n, "near_miss: reason": n, ...}}."""
    return {k: dict(v) for k, v in COUNTERS.items()}


def reset_counters() -> None:
    COUNTERS.clear()


class FusionPass:
    """One fusion. Subclasses set ``name`` and implement ``apply(graph) -> matches``."""

    name = "fusion"

    def apply(self, graph: torch.fx.Graph) -> int:
        raise NotImplementedError

    def settings(self) -> dict:
        """Everything besides the source code that changes what the pass does (for uuid())."""
        return {}

    def source_files(self) -> list[str]:
        return [sys.modules[type(self).__module__].__file__]

    def matched(self, msg: str, *args) -> None:
        COUNTERS[self.name]["matched"] += 1
        log.debug(f"{self.name}: matched " + msg, *args)

    def near_miss(self, reason: str, at: torch.fx.Node) -> None:
        COUNTERS[self.name][f"near_miss: {reason}"] += 1
        log.debug("%s: near miss at %s: %s", self.name, at.name, reason)


def op_name(node: torch.fx.Node) -> str:
    """A short, torch-version-stable name of a call target (for graph snapshots)."""
    t = node.target
    if t in AUTO_FUNCTIONALIZED:  # v1 and v2 differ by torch version and config: one name
        return f"auto_functionalized({node.args[0]})"
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(t)
    return getattr(t, "__name__", str(t))


def graph_ops(graph: torch.fx.Graph) -> list[str]:
    """Sorted call targets of a graph."""
    return sorted(op_name(n) for n in graph.nodes if n.op == "call_function")


def _dump(directory: str, when: str, graph: torch.fx.Graph) -> None:
    """COMPILE_OPS_DUMP_GRAPHS=dir: the post-grad graph before and after our passes, as text
    (one numbered pair of files per compiled graph)."""
    os.makedirs(directory, exist_ok=True)
    n = len([f for f in os.listdir(directory) if f.endswith("_before.txt")])
    n = n - 1 if when == "after" else n
    with open(os.path.join(directory, f"graph{n:03d}_{when}.txt"), "w") as f:
        try:
            f.write(graph.python_code("self", verbose=True).src)
        except Exception:  # noqa: BLE001  (the plain form is enough)
            f.write(str(graph))


class PassManager(CustomGraphPass):
    """Runs the fusion passes in order; records the op list after the last run."""

    def __init__(self, passes: list[FusionPass]):
        self.passes = list(passes)
        self.ops_before: list[str] = []
        self.ops_after: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.ops_before = graph_ops(graph)
        dump = os.environ.get("COMPILE_OPS_DUMP_GRAPHS", "")
        if dump:
            _dump(dump, "before", graph)
        for p in self.passes:
            if p.apply(graph):
                graph.lint()
        self.ops_after = graph_ops(graph)
        if dump:
            _dump(dump, "after", graph)

    def uuid(self):
        h = hashlib.sha256()
        for p in self.passes:
            h.update(type(p).__qualname__.encode())
            for f in sorted(set(p.source_files() + [__file__])):
                with open(f, "rb") as fh:
                    h.update(fh.read())
            h.update(repr(sorted(p.settings().items())).encode())
        return h.hexdigest()


def default_passes() -> list[FusionPass]:
    from lowerings.activation_lowering import ActivationLoweringPass
    from lowerings.add_rms_norm import AddRMSNormPass
    from lowerings.argmax import ArgmaxPass
    from lowerings.rms_norm_math import RMSNormMathPass
    from lowerings.rope_cache import RopeCachePass
    from lowerings.static_cache_attention import StaticCacheAttentionPass

    return [StaticCacheAttentionPass(), RMSNormMathPass(), AddRMSNormPass(), RopeCachePass(),
            ActivationLoweringPass(), ArgmaxPass()]


_MANAGER: PassManager | None = None


def pass_manager() -> PassManager:
    """The process-wide pass manager used by the backend and by compile_ops.enable()."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PassManager(default_passes())
    return _MANAGER
