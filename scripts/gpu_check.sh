#!/usr/bin/env bash
# One call on the GPU machine: build with every core, run the GPU tests, the main job
# and the benchmark; logs go to $OUT (or ./gpu_logs). Carry .whl (nvidia-cutlass and
# fla-core wheels; see README "Developing on the GPU machine").
#   bash scripts/gpu_check.sh [build|test|bench|sanitize ...]   (default: all but sanitize)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_logs}; mkdir -p "$OUT"
steps=${*:-build test main bench}
export PYTHONUNBUFFERED=1 MAX_JOBS=$(nproc) GLA_PTXAS_VERBOSE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
status=0
for step in $steps; do
  echo "=== $step ($(date +%T))"
  case $step in
    build)
      start=$(date +%s)
      python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { status=1; tail -40 "$OUT/build.log"; }
      grep -E "gla_cuda:|registers|spill|error" "$OUT/build.log" | grep -v "^$" | sort -u | head -60
      echo "build took $(( $(date +%s) - start )) s" ;;
    test)
      GLA_TEST_DEVICES=cuda timeout ${TEST_TIMEOUT:-420} python3 -m pytest ${PYTEST_ARGS:-tests} -q -rs \
        -p no:cacheprovider --durations=10 > "$OUT/pytest.log" 2>&1 || status=1
      tail -30 "$OUT/pytest.log" ;;
    main)
      timeout 200 python3 -m gla_cuda ${MAIN_ARGS:-} 2>&1 | tee "$OUT/main.log" || status=1 ;;
    bench)
      timeout 400 python3 -m gla_cuda.bench --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_case.py ${SANITIZE_BACKENDS:-} \
          > "$OUT/sanitize_$tool.log" 2>&1; echo "$tool exit $?"; tail -3 "$OUT/sanitize_$tool.log"
      done ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
