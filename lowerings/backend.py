"""The ``compile_ops`` torch.compile backend: Inductor (compile_fx) with our post-grad passes.

Registered under the entry-point group ``torch_dynamo_backends`` (see pyproject.toml), so
``torch.compile(model, backend="compile_ops")`` works without importing anything first. Accepts
the usual ``mode`` and ``options`` of ``torch.compile``, applied as for the inductor backend.
"""

from __future__ import annotations

import torch

from lowerings.passes import pass_manager


def config_patches(mode: str | None = None, options: dict | None = None) -> dict:
    """Inductor config for this backend: the mode's options, the user's, and our pass."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(options or {})
    user_pass = patches.get("post_grad_custom_pre_pass")
    if user_pass is not None and user_pass is not pass_manager():
        raise ValueError("compile_ops backend: options['post_grad_custom_pre_pass'] is taken by "
                         "compile_ops' pass manager; add your pass to it instead "
                         "(lowerings.passes.pass_manager().passes)")
    patches["post_grad_custom_pre_pass"] = pass_manager()
    return patches


def compile_ops_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                        options: dict | None = None):
    from torch._inductor.compile_fx import compile_fx

    with torch._inductor.config.patch(config_patches(mode, options)):
        return compile_fx(gm, example_inputs)
