"""Inductor passes and the ``compile_ops`` torch.compile backend.

    torch.compile(model, backend="compile_ops")      # found through the entry point
    compile_ops.enable() / compile_ops.disable()     # the same passes in the default backend
    lowerings.counters()                             # matches and near misses per pattern
"""

from lowerings.passes import (  # noqa: F401
    PassManager,
    counters,
    graph_ops,
    pass_device_policy,
    pass_devices,
    pass_manager,
    reset_counters,
)
from lowerings.backend import compile_ops_backend  # noqa: F401

__all__ = ["PassManager", "compile_ops_backend", "counters", "disable", "enable", "graph_ops",
           "pass_device_policy", "pass_devices", "pass_manager", "reset_counters"]

_saved = []


def enable() -> None:
    """Install the passes into Inductor's config (the default ``inductor`` backend)."""
    import torch._inductor.config as cfg

    if cfg.post_grad_custom_pre_pass is pass_manager():
        return
    _saved.append(cfg.post_grad_custom_pre_pass)
    cfg.post_grad_custom_pre_pass = pass_manager()


def disable() -> None:
    """Undo ``enable()`` (restores whatever pass was installed before)."""
    import torch._inductor.config as cfg

    if cfg.post_grad_custom_pre_pass is pass_manager():
        cfg.post_grad_custom_pre_pass = _saved.pop() if _saved else None
