# Sourced by bench/device_call.sh and bench/device_lanes.sh at the repo root, on the device: the
# log folder $OUT/r (packed into $OUT/r.tgz on exit and by `pack`), `el` (timeline line),
# env.txt, the carried wheels (.wheels/), the kernels built in place (kept when
# compile_ops/_C*.so exists from an earlier call on the same warm machine; REBUILD=1 forces a
# build), the editable install, and `left` (seconds left of LIMIT, default 575).
R=$OUT/r; mkdir -p "$R"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$R/timeline.txt"; }
pack() { tar czf "$OUT/r.tgz" -C "$OUT" r; }
trap pack EXIT
# Each failing test's message lands in $R/failures.txt as it happens (tests/conftest.py), so a
# call cut by its limit still says why its failures failed.
export COMPILE_OPS_FAILURE_LOG=$R/failures.txt
export PYTHONUNBUFFERED=1 COMPILE_OPS_BUILD_CUDA=1 COMPILE_OPS_REQUIRE_KERNELS=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,triton,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'triton',triton.__version__)"
  python3 -c "import torch;print('gpus',torch.cuda.device_count())"; echo "cores $(nproc)"
  echo "device copy's git (may be stale): $(git log --oneline -1 2>&1 | head -1)"; } > "$R/env.txt" 2>&1
cat "$R/env.txt"
python3 -m pip install -q --no-deps --no-index .wheels/*.whl > "$R/pip.log" 2>&1
if ls compile_ops/_C*.so >/dev/null 2>&1 && [ -z "${REBUILD:-}" ]; then el "build kept"; else
  python3 setup.py build_ext --inplace > "$R/build.log" 2>&1 || { tail -40 "$R/build.log"; el "BUILD FAILED"; exit 1; }
  el build; pack
fi
COMPILE_OPS_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> "$R/pip.log" 2>&1 || el "editable install failed"
left() { echo $(( ${LIMIT:-575} - ($(date +%s) - T0) )); }
