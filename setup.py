"""Build compile_ops, with its CUDA kernels (compile_ops._C) when a CUDA toolchain is present.

COMPILE_OPS_BUILD_CUDA=1 forces the CUDA build (a missing toolchain is then an error),
COMPILE_OPS_BUILD_CUDA=0 skips it; unset, the kernels are built when nvcc and a CUDA build of torch
are found. TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "9.0", Hopper).
Install with: pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda():
    """(build?, reason) from COMPILE_OPS_BUILD_CUDA, the toolchain and the installed torch."""
    flag = os.environ.get("COMPILE_OPS_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"COMPILE_OPS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "COMPILE_OPS_BUILD_CUDA=0"
    import torch

    cuda_home = _find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no nvcc found (set CUDA_HOME)")
    if problems:
        if flag == "1":
            sys.exit("COMPILE_OPS_BUILD_CUDA=1 but " + "; ".join(problems))
        return False, "; ".join(problems)
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    return True, cuda_home


def _extensions():
    build, why = _want_cuda()
    if not build:
        print(f"compile_ops: CUDA kernels not built ({why}); only the reference kernels are available")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    print(f"compile_ops: building CUDA kernels with {why}/bin/nvcc for arch "
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="compile_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # The C++ standard comes from torch.utils.cpp_extension (C++17 or C++20 by version).
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
