#!/usr/bin/env bash
# One device call (the `device` tool, nvidia-h200-x2 preferred): build, then two lanes at once.
# Bench lane (GPU 0, cores 0-7): bench/tune_decode_attention.py checks, then the benchmarks named
# in BENCHES (paged wide h256 breakdown e2e ablate cache cache_old sampling rope backend static hf; CACHE_ARGS
# go to bench_cache.py, HF_ARGS to bench_hf.py). Test lane (GPU 1 when there are two, cores 8+): pytest -m cuda over
# TEST_SEL (then TEST_SEL2 if set), then
# compute-sanitizer memcheck / racecheck (SANITIZE, SAN_FILES, SAN_K, SAN2_FILES, SAN2_K, RACECHECK,
# RACE_FILES, RACE_K) and the Hugging
# Face test (HF=1). BENCHES=none on two GPUs: two test lanes (TEST_SEL0 on GPU 0, TEST_SEL on
# GPU 1; the sanitizer steps on GPU 1 only), half the cores each. Everything under $OUT/r, packed as $OUT/r.tgz (the tool returns 8 files at
# most). Used for session 6's four H200 calls, e.g.
#   OUT=$OUT LIMIT=400 TUNE=0 GRAPH_MIB=1000000 BENCHES="cache e2e" \
#     TEST_SEL="tests/ops/test_cache.py tests/models" bash bench/device_lanes.sh
# GRAPH_MIB=1000000 times every benchmark case as CUDA-graph replays: the test lane loads the
# host's CPUs, which slows plain launches (bench/NOTES.md, session 6). Carry expecttest as a wheel
# in .wheels/ (the device has no network).
set -u
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-540}
. bench/device_setup.sh
NG=$(python3 -c "import torch;print(torch.cuda.device_count())")
NC=$(nproc)

test_lane() {
  local gpu=$1 cores=$2 workers=$3 sel=${4:-${TEST_SEL:-tests}} tag=${5:-}
  el "tests$tag start (gpu $gpu, cores $cores, -n $workers): $sel"
  CUDA_VISIBLE_DEVICES=$gpu taskset -c "$cores" timeout $(( $(left) - ${TEST_RESERVE:-100} )) python3 -m pytest $sel -m cuda -q -n "$workers" -p no:cacheprovider --durations=30 --junitxml="$R/tests$tag.xml" > "$R/tests$tag.log" 2>&1
  el "tests$tag rc $?"
  tail -4 "$R/tests$tag.log"
  if [ -n "${TEST_SEL2:-}" ] && [ -z "$tag" ]; then
    CUDA_VISIBLE_DEVICES=$gpu taskset -c "$cores" timeout $(( $(left) - ${TEST_RESERVE:-100} )) python3 -m pytest $TEST_SEL2 -m cuda -q -n "$workers" -p no:cacheprovider --durations=15 > "$R/tests2.log" 2>&1
    el "tests2 rc $?"
    tail -4 "$R/tests2.log"
  fi
  if [ "${SANITIZE:-1}" = 1 ]; then
    CUDA_VISIBLE_DEVICES=$gpu COMPILE_OPS_DECODE_ATTENTION=cuda timeout $(( $(left) / 2 - 5 )) compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest ${SAN_FILES:-tests/ops/test_paged_attention.py} -m cuda -q -p no:cacheprovider -k "${SAN_K:-cuda_kernel_warp_partials or cuda_kernel_every_split}" > "$R/memcheck.log" 2>&1
    el "memcheck rc $?"; tail -3 "$R/memcheck.log"
    if [ -n "${SAN2_FILES:-}" ]; then
      CUDA_VISIBLE_DEVICES=$gpu timeout $(( $(left) / 2 - 5 )) compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest $SAN2_FILES -m cuda -q -p no:cacheprovider -k "${SAN2_K:-cuda}" > "$R/memcheck2.log" 2>&1
      el "memcheck2 rc $?"; tail -3 "$R/memcheck2.log"
    fi
    [ -n "${HF:-}" ] && { timeout 200 python3 -m pytest tests/models/test_llama.py -k hugging_face -q -p no:cacheprovider -rs > "$R/hf.log" 2>&1; el "hf test rc $?"; tail -3 "$R/hf.log"; }
    [ "${RACECHECK:-1}" = 1 ] && CUDA_VISIBLE_DEVICES=$gpu timeout $(( $(left) - 5 )) compute-sanitizer --tool racecheck --print-limit 20 python3 -m pytest ${RACE_FILES:-tests/ops/test_paged_attention.py} -m cuda -q -p no:cacheprovider -k "${RACE_K:-cuda_kernel_warp_partials and auto}" > "$R/racecheck.log" 2>&1
    el "racecheck rc $?"; tail -3 "$R/racecheck.log"
  fi
}

bench_lane() {
  export CUDA_VISIBLE_DEVICES=0
  local tc="taskset -c 0-7"
  [ -n "${GRAPH_MIB:-}" ] && export BENCH_GRAPH_BELOW_MIB=$GRAPH_MIB
  el "bench start"
  [ "${TUNE:-1}" = 1 ] && $tc timeout $(( $(left) - 10 )) python3 bench/tune_decode_attention.py --cuda --check --kv auto fp8 --points ${POINTS:-32x4096,64x4096,32x16384} --out "$R" > "$R/tune.log" 2>&1
  el "tune rc $?"; grep -c "^ok" "$R/tune.log"; grep -E "FAIL|^cuda kv" "$R/tune.log" | cut -c1-260
  for spec in ${BENCHES:-paged e2e wide h256}; do
    case $spec in
      paged) BENCH_GRAPH_BELOW_MIB=${GRAPH_MIB:-512} $tc timeout $(( $(left) - 10 )) python3 bench/bench_attention.py --section paged --kv auto fp8 --out "$R" > "$R/bench_attention.log" 2>&1 ;;
      wide) mkdir -p "$R/wide"; $tc timeout $(( $(left) - 10 )) python3 bench/bench_attention.py --section paged --heads 64 --kv-heads 4 --batch 32 128 --context 4096 16384 --kv auto fp8 --out "$R/wide" > "$R/bench_wide.log" 2>&1 ;;
      h256) mkdir -p "$R/h256"; $tc timeout $(( $(left) - 10 )) python3 bench/bench_attention.py --section paged --head-size 256 --batch 32 128 --context 4096 16384 --kv auto fp8 --out "$R/h256" > "$R/bench_h256.log" 2>&1 ;;
      breakdown) $tc timeout 120 python3 bench/tune_decode_attention.py --cuda --kv auto fp8 --breakdown 8 16384 > "$R/breakdown.log" 2>&1 ;;
      e2e) $tc timeout $(( $(left) - 10 )) python3 bench/bench_e2e.py --out "$R" ${E2E_ARGS:-} > "$R/bench_e2e.log" 2>&1 ;;
      cache) $tc timeout $(( $(left) - 10 )) python3 bench/bench_cache.py --section paged --out "$R" ${CACHE_ARGS:-} > "$R/bench_cache.log" 2>&1 ;;
      cache_old) mkdir -p "$R/cache_old"; COMPILE_OPS_CACHE_STAGED=0 $tc timeout $(( $(left) - 10 )) python3 bench/bench_cache.py --section paged --tokens 1 32 1024 4096 16384 --out "$R/cache_old" > "$R/bench_cache_old.log" 2>&1 ;;
      ablate) $tc timeout $(( $(left) - 10 )) python3 bench/bench_e2e.py --out "$R" --batch 1 128 --context 4096 --variants compile_ops --ablate --stem e2e_ablate_H200 > "$R/bench_ablate.log" 2>&1 ;;
      sampling) $tc timeout $(( $(left) - 10 )) python3 bench/bench_sampling.py --out "$R" > "$R/bench_sampling.log" 2>&1 ;;
      rope) $tc timeout $(( $(left) - 10 )) python3 bench/bench_rope_cache.py --layout paged --quick --out "$R" > "$R/bench_rope_cache.log" 2>&1 ;;
      backend) $tc timeout $(( $(left) - 10 )) python3 bench/bench_backend.py --out "$R" > "$R/bench_backend.log" 2>&1 ;;
      static) $tc timeout $(( $(left) - 10 )) python3 bench/bench_static_cache.py --out "$R" ${STATIC_ARGS:-} > "$R/bench_static_cache.log" 2>&1 ;;
      hf) $tc timeout $(( $(left) - 10 )) python3 bench/bench_hf.py --out "$R" ${HF_ARGS:-} > "$R/bench_hf.log" 2>&1 ;;
    esac
    el "bench $spec rc $?"
  done
}

if [ "$NG" -gt 1 ] && [ "${BENCHES:-}" = none ]; then
  # tests only: one lane per GPU (TEST_SEL0 on GPU 0, TEST_SEL on GPU 1), half the cores each
  SANITIZE=0 test_lane 0 "0-$(( NC / 2 - 1 ))" $(( NC / 2 - 1 )) "${TEST_SEL0:-tests}" _gpu0 &
  test_lane 1 "$(( NC / 2 ))-$(( NC - 1 ))" $(( NC / 2 - 1 ))
  wait
elif [ "$NG" -gt 1 ]; then
  test_lane 1 "8-$(( NC - 1 ))" $(( NC - 10 )) &
  bench_lane
  wait
else
  TEST_SEL="${TEST_SEL1:-tests/ops/test_paged_attention.py}" SANITIZE=${SANITIZE1:-0} test_lane 0 "0-$(( NC - 1 ))" $(( NC - 2 ))
  bench_lane
fi
el done
