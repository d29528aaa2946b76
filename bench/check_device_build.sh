#!/usr/bin/env bash
# Compile every csrc/ translation unit on this (GPU-less) host as the GPU machines do: the device's
# torch headers (torch 2.11: C++17; this host's torch 2.14 builds as C++20, so CI's build misses
# C++20-only code) with nvcc for sm_90, objects only (no link). About 15-20 min on 2 cores.
#   TORCH_VERSION=2.11.0 JOBS=2 bash bench/check_device_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
V=${TORCH_VERSION:-2.11.0}
W=${WORK:-/tmp/device_build_$V}
mkdir -p "$W/obj"
if [ ! -d "$W/torch/include" ]; then
  python3 -m pip download -q --no-deps -d "$W" "torch==$V"
  python3 - "$W" <<'PY'
import glob, sys, zipfile
w = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{w}/torch-*.whl")[0]) as z:
    z.extractall(w, [n for n in z.namelist() if n.startswith("torch/include/")])
PY
fi
STD=$(grep -q 'C++20 or later' "$W/torch/include/ATen/ATen.h" && echo c++20 || echo c++17)
T=$W/torch/include
PYINC=$(python3 -c "import sysconfig;print(sysconfig.get_paths()['include'])")
export INC="-Icsrc/include -Icsrc -I$T -I$T/torch/csrc/api/include -I${CUDA_HOME:-/usr/local/cuda}/include -I$PYINC"
export STD W NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
echo "torch $V headers, -std=$STD"
one() {
  local f=$1 o=$W/obj/$(basename "$1").o log=$W/obj/$(basename "$1").log
  case $f in
    *.cu) "$NVCC" $INC -c "$f" -o "$o" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
            --compiler-options -fPIC -O1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
            -gencode=arch=compute_90,code=sm_90 -std=$STD > "$log" 2>&1 ;;
    *.cpp) g++ $INC -c "$f" -o "$o" -fPIC -O1 -std=$STD -DTORCH_API_INCLUDE_EXTENSION_H \
             -DTORCH_EXTENSION_NAME=_C > "$log" 2>&1 ;;
  esac && echo "ok     $f" || { echo "FAILED $f"; grep -m5 "error" "$log"; return 1; }
}
export -f one
ls csrc/*.cu csrc/*.cpp | xargs -P "${JOBS:-$(nproc)}" -I{} bash -c 'one {}'
