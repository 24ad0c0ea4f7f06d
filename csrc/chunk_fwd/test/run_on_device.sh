#!/bin/bash
# Builds the fused chunked forward and its standalone test on the GPU machine, then runs
# the checks and timings. Run from the repository root:
#   bash csrc/chunk_fwd/test/run_on_device.sh [sanitize] [ncu]   (env CFB: build folder; BUILD_ONLY=1;
#                                                                  GLA_CUDA_NO_WGMMA=1: the mma.sync kernels)
#   sanitize: compute-sanitizer memcheck and racecheck on the small cases (varlen, split)
#   ncu:      Nsight Compute sections for one launch at (8,2048,16,128,128)
# Every run of the test has a time limit (a hung kernel fails instead of taking the device time).
# Writes test.log (and ncu.txt) under $OUT; build logs stay in $CFB/logs.
set -u
CFB=${CFB:-/tmp/cfb}  # build folder (several builds side by side: set it)
ROOT=$(pwd)
OUTDIR=${OUT:-/tmp/out}
SANITIZE=0; NCU=0
for a in "$@"; do
  case $a in sanitize) SANITIZE=1 ;; ncu) NCU=1 ;; esac
done
mkdir -p "$OUTDIR" /tmp/cutl $CFB/logs
if [ ! -d /tmp/cutl/cutlass_library ]; then
  (cd /tmp/cutl && python3 -m zipfile -e "$ROOT/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl" .)
fi
NVCC=${NVCC:-/usr/local/cuda-13.0/bin/nvcc}
ARCH="-gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80"
FLAGS="-DGLA_SM90A=1 -DNDEBUG -std=c++17 -O3 --expt-relaxed-constexpr -I$ROOT/csrc -I/tmp/cutl/cutlass_library/source/include $ARCH"
rm -f $CFB/*.o
pids=()
for f in "$ROOT"/csrc/chunk_fwd/*.cu "$ROOT"/csrc/chunk_fwd/test/chunk_fwd_test.cu; do
  b=$(basename "$f" .cu)
  $NVCC $FLAGS -Xptxas -v -c "$f" -o $CFB/$b.o > $CFB/logs/build_$b.log 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait $p || fail=1; done
if [ $fail = 1 ]; then echo BUILD FAILED; grep -h -B2 -A5 error $CFB/logs/*.log | head -60; exit 1; fi
$NVCC $ARCH $CFB/*.o -o $CFB/chunk_fwd_test || exit 1
# registers / spills per kernel (sm_90a)
for f in $CFB/logs/build_chunk_fwd_*_k*.log; do
  grep -E "Compiling entry|registers|spill" "$f" | paste - - - | grep sm_90a |
    sed -e 's/.*chunk_fwd_kernelIN7cutlass//' -e 's/EEEvNS_9FwdParams[^ ]* for .sm_90a.//' -e 's/ptxas info *://'
done
grep -E "registers|spill" $CFB/logs/build_chunk_fwd_fused_sm90.log | paste - - | sed 's/ptxas info *://' | head -4
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [ $SANITIZE = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 300 /usr/local/cuda-13.0/bin/compute-sanitizer --tool $tool $CFB/chunk_fwd_test small 2>&1 | tail -7
  done
fi
[ -n "${BUILD_ONLY:-}" ] && exit 0
timeout 60 $CFB/chunk_fwd_test small || { echo "small cases: failed or timed out"; exit 1; }
timeout 300 $CFB/chunk_fwd_test 2>&1 | tee "$OUTDIR/test.log"
if [ $NCU = 1 ]; then
  NCUBIN=$(command -v ncu || echo /usr/local/cuda-13.0/bin/ncu)
  timeout 300 $NCUBIN --kernel-name regex:chunk_f --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
    --section InstructionStats $CFB/chunk_fwd_test bench > "$OUTDIR/ncu.txt" 2>&1
  grep -iE "Duration|Throughput|Issue Slots|Eligible|Warp Cycles Per Issued|Issued Instructions |stall|Bank|Executed Ipc A|ERR" \
    "$OUTDIR/ncu.txt" | cut -c1-200 | head -40
fi
