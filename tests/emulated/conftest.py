"""Build csrc/'s launchers and kernels with the host compiler (COMPILE_OPS_EMULATE) as a CPU
extension: each launch runs its CUDA threads one after another, so the kernels' index math,
bounds checks, vector paths and conversions run on machines without a GPU.

Needs a C++ compiler, the CUDA headers (CUDA_HOME, default /usr/local/cuda; no GPU or CUDA
runtime library) and torch's headers. Built once per session, cached by torch in its extension
directory.
"""

import os

import pytest
import torch.utils.cpp_extension as cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def _cuda_include():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    inc = os.path.join(home, "include")
    if not os.path.exists(os.path.join(inc, "cuda_fp8.h")):
        return None
    return inc


@pytest.fixture(scope="session")
def emu():
    inc = _cuda_include()
    if inc is None:
        pytest.skip("CUDA headers (cuda_fp8.h) not found under CUDA_HOME or /usr/local/cuda")
    sources = [os.path.join(HERE, f) for f in
               ("emu_bindings.cpp", "emu_activation.cpp", "emu_pos_encoding.cpp",
                "emu_cache.cpp", "emu_rope_cache.cpp", "emu_layernorm.cpp", "emu_attention.cpp",
                "emu_decode_attention.cpp",
                "emu_mla.cpp", "emu_sampling.cpp", "emu_activation_quant.cpp", "emu_quant.cpp",
                "emu_layernorm_quant.cpp")]
    asan = os.environ.get("COMPILE_OPS_EMU_ASAN", "") not in ("", "0")
    san = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    return cpp.load(
        name="compile_ops_emulated_asan" if asan else "compile_ops_emulated",
        sources=sources,
        # UBSan's alignment check aborts on a misaligned 16-byte Pack access, which a GPU
        # would fault on and a CPU would silently do (the run dies with exit code 1; pytest -s
        # shows the sanitizer's message with the file and line).
        extra_cflags=["-O1", "-DCOMPILE_OPS_EMULATE=1", "-std=c++20", "-fsanitize=alignment",
                      "-fno-sanitize-recover=alignment"] + san,
        extra_ldflags=["-fsanitize=alignment"] + san,
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc"),
                             inc],
        with_cuda=False,
        verbose=False,
    )


@pytest.fixture
def coop(emu):
    """The emulated extension in the cooperative schedule (barriers, shuffles, shared memory)."""
    emu.set_cooperative(True)
    yield emu
    emu.set_cooperative(False)


# COMPILE_OPS_EMU_SAMPLE=N: of each emulated test function's parametrizations, keep every N-th
# (in collection order) and the last. The AddressSanitizer child run (test_address_sanitizer.py)
# sets it: the parent run has already checked every parametrization's numbers, the child's job is
# the memory paths, which a sample of the shapes (the first, the last and every N-th between)
# exercises at a fraction of the time.
def _sample_every():
    raw = os.environ.get("COMPILE_OPS_EMU_SAMPLE", "")
    try:
        n = int(raw) if raw else 1
    except ValueError:
        raise pytest.UsageError(f"COMPILE_OPS_EMU_SAMPLE must be an integer, got {raw!r}") from None
    if n < 1:
        raise pytest.UsageError(f"COMPILE_OPS_EMU_SAMPLE must be >= 1, got {n}")
    return n


def sample_items(items, every):
    """(kept, dropped): of the items of each test function (file + function name), every
    ``every``-th in order and the last one."""
    groups = {}
    for it in items:
        groups.setdefault((str(it.path), getattr(it, "originalname", it.name)), []).append(it)
    keep = set()
    for members in groups.values():
        keep.update(id(m) for m in members[::every])
        keep.add(id(members[-1]))
    kept = [it for it in items if id(it) in keep]
    return kept, [it for it in items if id(it) not in keep]


def pytest_collection_modifyitems(config, items):
    every = _sample_every()
    if every == 1:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    mine = [it for it in items if str(it.path).startswith(here + os.sep)]
    kept, dropped = sample_items(mine, every)
    if dropped:
        gone = {id(it) for it in dropped}
        config.hook.pytest_deselected(items=dropped)
        items[:] = [it for it in items if id(it) not in gone]
