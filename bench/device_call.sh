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
. bench/device_setup.sh
step() { local name=$1 to=$2; [ "$to" = rest ] && to=$(left); [ "$to" -gt "$(left)" ] && to=$(left); [ "$to" -lt 5 ] && { el "$name skipped (no time)"; return; }; shift 2; el "$name start"; timeout "$to" "$@" > "$R/$name.log" 2>&1; el "$name rc $?"; tail -${TAILN:-6} "$R/$name.log"; pack; }
eval "$1"
el done
