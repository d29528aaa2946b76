#!/usr/bin/env bash
# One device call (the `device` tool): build the kernels once (kept while the machine stays warm:
# a call within its idle window finds compile_ops/_C*.so and skips the build; REBUILD=1 forces
# it), then the steps given as one shell string, each `step NAME SECONDS|rest CMD...` with its own
# timeout, within LIMIT seconds (default 575) from the start. Logs: $OUT/r/NAME.log, the timeline
# in $OUT/r/timeline.txt, all packed into $OUT/r.tgz after every step (a call cut by the tool's
# limit still returns what ran). Carry expecttest as a wheel in .wheels/ (no network there).
#   OUT=$OUT LIMIT=590 bash bench/device_call.sh 'export OMP_NUM_THREADS=1;
#     step fp8 230 python3 -m pytest tests/ops/test_quant.py -m cuda -n 16 -v;
#     step bench rest python3 bench/bench_quant.py --out $OUT/r'
# The device's copy of .git is not the session's (it can be stale): never `git checkout` there.
set -u
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p "$R"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$R/timeline.txt"; }
pack() { tar czf "$OUT/r.tgz" -C "$OUT" r; }
trap pack EXIT
export PYTHONUNBUFFERED=1 COMPILE_OPS_BUILD_CUDA=1 COMPILE_OPS_REQUIRE_KERNELS=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,triton,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'triton',triton.__version__)"
  echo "device copy's git (may be stale): $(git log --oneline -1 2>&1 | head -1)"; } > "$R/env.txt" 2>&1
cat "$R/env.txt"
python3 -m pip install -q --no-deps --no-index .wheels/*.whl > "$R/pip.log" 2>&1
if ls compile_ops/_C*.so >/dev/null 2>&1 && [ -z "${REBUILD:-}" ]; then el "build kept"; else
  python3 setup.py build_ext --inplace > "$R/build.log" 2>&1 || { tail -40 "$R/build.log"; el "BUILD FAILED"; exit 1; }
  el build; pack
fi
COMPILE_OPS_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$R/pip.log" 2>&1 || el "editable install failed"
left() { echo $(( ${LIMIT:-575} - ($(date +%s) - T0) )); }
step() { local name=$1 to=$2; [ "$to" = rest ] && to=$(left); [ "$to" -gt "$(left)" ] && to=$(left); [ "$to" -lt 5 ] && { el "$name skipped (no time)"; return; }; shift 2; el "$name start"; timeout "$to" "$@" > "$R/$name.log" 2>&1; el "$name rc $?"; tail -${TAILN:-6} "$R/$name.log"; pack; }
eval "$1"
el done
