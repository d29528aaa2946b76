"""The post-grad pass manager: an ordered list of fusion passes that Inductor runs on the
functionalized post-grad graph (``post_grad_custom_pre_pass``), one ``uuid()`` for Inductor's FX
graph cache, per-pattern match counters and a debug log of matches and near misses.

COMPILE_OPS_DEBUG_FUSION=1 logs every match and every near miss (with its reason) to stderr.

Where the passes rewrite (issue 24: never slower than Inductor, on any device): each pass lists
the device types its kernels beat Inductor's own code on (``FusionPass.devices``). On the CPU
the ops run their pure-PyTorch reference bodies through the Python dispatcher, which Inductor's
generated C++ beats on every measured graph (bench/NOTES.md, session 10), so by default no pass
rewrites a CPU graph: Inductor compiles it as ``backend="inductor"`` would. The policy
(``COMPILE_OPS_PASS_DEVICES``, or ``pass_devices(...)`` as a context manager):

- ``auto`` (default): each pass on the devices in its ``devices``;
- ``all``: every pass on every device (the CPU tests use it to check the rewrites on CPU graphs).
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


POLICIES = ("auto", "all")
_policy: list[str] = []


def pass_device_policy() -> str:
    """``auto`` or ``all`` (see the module docstring)."""
    if _policy:
        return _policy[-1]
    value = os.environ.get("COMPILE_OPS_PASS_DEVICES", "auto") or "auto"
    if value not in POLICIES:
        raise ValueError(f"COMPILE_OPS_PASS_DEVICES must be one of {POLICIES}, got {value!r}")
    return value


class pass_devices:
    """``with pass_devices("all"): ...`` (or ``.set()`` / ``.reset()``): the policy while the
    block runs (compiles in the block; Inductor's FX graph cache keys include it)."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy

    def __enter__(self):
        _policy.append(self.policy)
        return self

    def __exit__(self, *exc):
        _policy.pop()


def graph_device_type(graph: torch.fx.Graph) -> str:
    """"cuda" when a graph input lives on a CUDA device, else "cpu" (what the graph computes on:
    a decode step's small host tensors, e.g. CPU positions, do not count)."""
    kinds = set()
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            kinds.add(v.device.type)
    for k in ("cuda", "xpu", "mps"):
        if k in kinds:
            return k
    return "cpu"


class FusionPass:
    """One fusion. Subclasses set ``name`` and implement ``apply(graph) -> matches``."""

    name = "fusion"
    # Device types where this pass's kernels beat Inductor's own code (the "auto" policy).
    devices: tuple = ("cuda",)

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


def functionalized_arg(node: torch.fx.Node, name: str):
    """A kwarg of an auto_functionalized call (v2 passes mutated args through ``_all_bases``);
    None where v2 passes a view of a larger base."""
    kw = node.kwargs
    if name in kw:
        return kw[name]
    idx = kw.get(f"_{name}_base_index")
    if idx is not None and not any(k.startswith(f"_{name}_") and k != f"_{name}_base_index"
                                   for k in kw):
        return kw["_all_bases"][idx]
    return None


def out_buffer(node: torch.fx.Node):
    """The ``out`` buffer of a functionalized out-style op (v1 or v2), or None where v2 passes a
    view of a larger base."""
    kw = node.kwargs
    if node.target is torch.ops.higher_order.auto_functionalized_v2:
        if any(k.startswith("_out_") and k != "_out_base_index" for k in kw):
            return None  # out is a view of a larger base
        return kw["_all_bases"][kw["_out_base_index"]]
    return kw.get("out")


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
        policy = pass_device_policy()
        device = graph_device_type(graph)
        for p in self.passes:
            if policy == "auto" and device not in p.devices:
                COUNTERS[p.name][f"skipped: {device} graph (Inductor's own code is faster "
                                 "there; COMPILE_OPS_PASS_DEVICES=all rewrites anyway)"] += 1
                continue
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
            h.update(repr(p.devices).encode())
        h.update(pass_device_policy().encode())
        return h.hexdigest()


def default_passes() -> list[FusionPass]:
    from lowerings.act_quant import ActQuantPass
    from lowerings.activation_lowering import ActivationLoweringPass
    from lowerings.add_rms_norm import AddRMSNormPass
    from lowerings.allreduce_norm import AllReduceNormPass
    from lowerings.argmax import ArgmaxPass
    from lowerings.norm_quant import NormQuantPass
    from lowerings.rms_norm_math import RMSNormMathPass
    from lowerings.rope_cache import RopeCachePass
    from lowerings.static_cache_attention import StaticCacheAttentionPass

    return [StaticCacheAttentionPass(), RMSNormMathPass(), AddRMSNormPass(), AllReduceNormPass(),
            NormQuantPass(), RopeCachePass(), ActQuantPass(), ActivationLoweringPass(),
            ArgmaxPass()]


_MANAGER: PassManager | None = None


def pass_manager() -> PassManager:
    """The process-wide pass manager used by the backend and by compile_ops.enable()."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PassManager(default_passes())
    return _MANAGER
