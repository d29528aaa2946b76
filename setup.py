"""Build compile_ops, with its CUDA kernels (compile_ops._C) when a GPU is there to run them.

COMPILE_OPS_BUILD_CUDA=1 forces the CUDA build (a missing toolchain is then an error),
COMPILE_OPS_BUILD_CUDA=0 skips it; unset, the kernels are built when nvcc and a CUDA build of torch
are found and either a CUDA GPU is visible or TORCH_CUDA_ARCH_LIST is set (building for a GPU
elsewhere). On a machine without a GPU the build would only cost time (nvcc builds every kernel:
about 14 minutes on 2 cores) for kernels nothing can run. TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "9.0", Hopper).
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


def decide(flag: str, arch_list: str, gpu_visible: bool, problems: list):
    """(build?, reason) from COMPILE_OPS_BUILD_CUDA (`flag`), TORCH_CUDA_ARCH_LIST, whether a
    CUDA GPU is visible and what the toolchain lacks (`problems`); exits on a bad flag or on a
    forced build that cannot work."""
    if flag not in ("", "0", "1"):
        sys.exit(f"COMPILE_OPS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "COMPILE_OPS_BUILD_CUDA=0"
    if problems:
        if flag == "1":
            sys.exit("COMPILE_OPS_BUILD_CUDA=1 but " + "; ".join(problems))
        return False, "; ".join(problems)
    if flag == "" and not arch_list and not gpu_visible:
        return False, ("no CUDA GPU visible (COMPILE_OPS_BUILD_CUDA=1 or TORCH_CUDA_ARCH_LIST "
                       "builds them anyway)")
    return True, ""


def _want_cuda():
    """(build?, reason or the CUDA home) from the environment, the toolchain and torch."""
    flag = os.environ.get("COMPILE_OPS_BUILD_CUDA", "").strip()
    if flag == "0":
        return decide(flag, "", False, [])
    import torch

    cuda_home = _find_cuda_home()
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        problems.append("no nvcc found (set CUDA_HOME)")
    gpu = not problems and torch.cuda.is_available()
    build, why = decide(flag, os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip(), gpu, problems)
    if not build:
        return False, why
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


if __name__ == "__main__":  # (pip's build backend runs this file as __main__; tests import it)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
