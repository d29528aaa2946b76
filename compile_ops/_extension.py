"""Loading of the compiled CUDA kernels (compile_ops._C).

The package works without them: every op's pure-PyTorch reference body then runs on every device.
"""

import importlib
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which compile_ops._C links against)

_C = None
_REASON = None

try:
    _C = importlib.import_module("compile_ops._C")
except ImportError as exc:  # not built, or built against another torch
    _REASON = f"{type(exc).__name__}: {exc}"


def kernels_available() -> bool:
    """True when the CUDA kernels (compile_ops._C) were built and load in this process."""
    return _C is not None


def kernels_unavailable_reason() -> str | None:
    """Why the CUDA kernels are not loaded (None when they are)."""
    if _C is not None:
        return None
    if _REASON and "No module named 'compile_ops._C'" in _REASON:
        return ("compile_ops._C was not built (no CUDA toolchain at install time, or "
                "COMPILE_OPS_BUILD_CUDA=0); reinstall with nvcc available")
    return _REASON


def _warn_if_gpu_without_kernels() -> None:
    if _C is None and torch.cuda.is_available():
        warnings.warn(
            "compile_ops: a GPU is present but the CUDA kernels are not loaded "
            f"({kernels_unavailable_reason()}); CUDA tensors use the slow reference kernels",
            RuntimeWarning,
            stacklevel=3,
        )
