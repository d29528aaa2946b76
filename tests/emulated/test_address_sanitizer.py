"""The emulated kernel tests again, with the kernels built under AddressSanitizer: any read or
write outside a tensor's allocation (a bad slot, block id or position that a bounds check let
through, a vector access past a row) aborts the run with the faulting kernel and line.

Runs in a child pytest (ASan must be preloaded into the interpreter) over a sample of the
emulated tests (every third parametrization of each, and the last; COMPILE_OPS_EMU_SAMPLE=1 in
the environment runs them all); skipped where the compiler has no libasan.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _runtime(lib):
    try:
        path = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(os.environ.get("COMPILE_OPS_EMU_ASAN") not in (None, "", "0"),
                    reason="this is the ASan child run itself")
def test_emulated_kernels_under_address_sanitizer(emu):
    asan, cxx = _runtime("libasan.so"), _runtime("libstdc++.so")
    if asan is None or cxx is None:
        pytest.skip("g++ has no libasan.so / libstdc++.so to preload")
    # Every third parametrization of each test (conftest.py's COMPILE_OPS_EMU_SAMPLE): this
    # process's emulated tests check every one's numbers; the child looks for bad memory accesses.
    env = dict(os.environ, COMPILE_OPS_EMU_ASAN="1", LD_PRELOAD=f"{asan} {cxx}",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               COMPILE_OPS_EMU_SAMPLE=os.environ.get("COMPILE_OPS_EMU_SAMPLE", "3"))
    # The shifted-row norm tests (4096 rows of OS threads) add time but no new memory paths.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           HERE, "-k", "not rms_norm_shifted and not address_sanitizer"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    out = proc.stdout + proc.stderr
    assert "AddressSanitizer" not in out, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in proc.stdout
