#!/usr/bin/env bash
# One call on the GPU machine: build with every core, run the GPU tests, the main job
# and the benchmark; logs go to $OUT (or ./gpu_logs). Wheels in .whl/ (nvidia-cutlass,
# fla-core) are installed first, for machines without network (tools/README.md).
#   bash tools/gpu_check.sh [build|warm|test|main|example|sanitize|wait|bench ...]
#   (default: build warm test main bench). warm compiles the benchmark's kernels in the
#   background while the steps after it run; bench (or wait) waits for it. Triton's cache
#   is build/triton_cache, so a later call on the same (still warm) machine reuses it. Every step fits in
#   DEADLINE_S seconds from the start (default 580: the device tool's call limit is 600).
set -uo pipefail
deadline=$(( $(date +%s) + ${DEADLINE_S:-580} ))
left() { echo $(( deadline - $(date +%s) )); }
OUT=${OUT:-$PWD/gpu_logs}; mkdir -p "$OUT"
steps=${*:-build warm test main bench}
SHAPES=${SHAPES:-8,2048,16,128,128 2,8192,16,128,128 32,2048,16,64,64 8,2048,4,256,512}
export PYTHONUNBUFFERED=1 MAX_JOBS=$(nproc) GLA_PTXAS_VERBOSE=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
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
      grep -E "gla_cuda:|registers|spill|error|C7510" "$OUT/build.log" | grep -v "^$" | sort -u | head -60
      echo "build took $(( $(date +%s) - start )) s" ;;
    test)
      # the suite is mostly Triton compiles and small launches: 12 processes share the GPU. -v
      # names every result as it comes, so a run cut by the timeout still says what failed.
      python3 -c "import xdist" 2>/dev/null && par="-n ${TEST_JOBS:-12}" || par=""
      GLA_TEST_DEVICES=cuda timeout $(( $(left) < ${TEST_TIMEOUT:-420} ? $(left) : ${TEST_TIMEOUT:-420} )) python3 -m pytest $par ${PYTEST_ARGS:-tests} -v --tb=short -rs \
        -p no:cacheprovider -p no:benchmark --durations=10 > "$OUT/pytest.log" 2>&1 || status=1
      grep -E " (FAILED|ERROR) " "$OUT/pytest.log" | head -40
      echo "$(grep -c " PASSED " "$OUT/pytest.log") passed so far"; tail -15 "$OUT/pytest.log" ;;
    main)
      start=$(date +%s)
      timeout 200 python3 -m gla_cuda ${MAIN_ARGS:-} 2>&1 | tee "$OUT/main.log" || status=1
      echo "main job (gla-bench --quick) took $(( $(date +%s) - start )) s wall" | tee -a "$OUT/main.log" ;;
    example)
      timeout $(( $(left) < 240 ? $(left) : 240 )) python3 examples/train_gla_lm.py --bf16 ${EXAMPLE_ARGS:-} 2>&1 |
        tee "$OUT/example.log" || status=1 ;;
    warm)
      # compile (and let fla autotune) every benchmark shape in parallel processes (WARM_BACKWARD=0:
      # forwards only, for BENCH_ARGS="--modes fwd")
      for s in $SHAPES; do
        ( timeout $(( $(left) < 300 ? $(left) : 300 )) python3 -c "import sys; from gla_cuda import bench; bench.warm(tuple(map(int, sys.argv[1].split(','))), backward=sys.argv[2] == '1')" $s ${WARM_BACKWARD:-1} \
          >> "$OUT/warm.log" 2>&1 && echo "warm $s: done ($(date +%T))" || echo "warm $s: exit $? (124: cut by the timeout)" ) >> "$OUT/warm.log" &
      done ;;
    wait)
      wait; echo "warm-up done ($(date +%T))" ;;
    bench)
      wait; echo "warm-up done ($(date +%T))"
      timeout $(left) python3 -m gla_cuda.bench --out "$OUT" --shapes $SHAPES ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout ${SANITIZE_TIMEOUT:-200} compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitize_case.py ${SANITIZE_BACKENDS:-} \
          > "$OUT/sanitize_$tool.log" 2>&1; echo "$tool exit $?"; tail -3 "$OUT/sanitize_$tool.log"
      done ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
