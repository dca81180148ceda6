#!/usr/bin/env bash
# The GPU figures that docs/PERFORMANCE.md and docs/OPERATIONS.md still lack, in one prepared run.
#
#   bash bench/gpu_checks.sh [OUT_DIR]        (default: $OUT, else ./gpu_results)
#
# Runs on a machine with one CUDA GPU and PyTorch, from the repository root; needs only the packages the bench
# scripts import (torch, numpy, pyyaml, scikit-image), not the service's. It writes seven files, so that a
# lease that returns at most eight brings all of it back:
#   log.txt                         everything printed, with the GPU's name and driver first
#   vilbert.json                    ViLBERT B=1 / B=8: fp32 time, bf16 autocast speed-up and probability drift,
#                                   weights and peak GPU memory
#   detector_{fp32,bf16,fp16}.json  X-152 per stage at 800x1333 under each precision, peak GPU memory
#   detector_bf16_cl.json           the same in bf16 with channels-last convolutions
#   drift.json                      detector options against fp32: box overlap, fc6 cosine, time
# Each step runs even when an earlier one failed; the exit status is that of the last failure.
# BENCH_QUICK=1 shrinks every step (one repeat, the tiny ViLBERT config, detector input 32x32, 150 proposals,
# one drift photograph) and BENCH_DEVICE=cpu runs it without a GPU: the test suite checks the script that way.
# BENCH_REPEATS and BENCH_DETECTOR_SIZE (min x max side) override the repeats and the detector's input size.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
device="${BENCH_DEVICE:-cuda}"
export PYTHONUNBUFFERED=1
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    # On a CPU without native bf16 the bf16 convolutions and matmuls are emulated, many times slower than fp32:
    # at these sizes the quick check takes seconds per step on any x86-64 CPU with AVX2, not minutes
    # (docs/TESTING.md)
    vilbert_repeats=1 detector_repeats=1 detector_size=32x32 vilbert_model=--tiny
    detector_quick="--proposals 150 --selection-boxes 200" drift_quick="--proposals 150 --photos 1"
else
    vilbert_repeats=20 detector_repeats=5 detector_size=800x1333 vilbert_model= detector_quick= drift_quick=
fi
vilbert_repeats="${BENCH_REPEATS:-$vilbert_repeats}" detector_repeats="${BENCH_REPEATS:-$detector_repeats}"
detector_size="${BENCH_DETECTOR_SIZE:-$detector_size}"
# fp16 convolutions have no fast CPU kernels (a quick CPU run would take tens of minutes): the CPU check of this
# script leaves fp16 out with these two.
precisions="${BENCH_PRECISIONS:-fp32 bf16 fp16}"
drift_options="${BENCH_DRIFT_OPTIONS:-channels_last,bf16,fp16,channels_last+bf16}"
status=0
step() {  # step NAME COMMAND...: run, log, remember a failure
    echo "## $1 ($(date -u +%H:%M:%S))"
    shift
    "$@" || { rc=$?; echo "!! failed with status $rc"; status=$rc; }
}
{
    if [ "$device" = cuda ]; then
        step "machine" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    fi
    step "torch" "$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    step "vilbert" "$python" bench/bench_vilbert.py --device "$device" --repeats "$vilbert_repeats" $vilbert_model \
        --json "$out/vilbert.json"
    for precision in $precisions; do
        step "detector $precision" "$python" bench/bench_detector.py --device "$device" --precision "$precision" \
            --repeats "$detector_repeats" --resize "$detector_size" $detector_quick --json "$out/detector_$precision.json"
    done
    # tensor-core convolutions prefer channels-last: the likely fastest GPU configuration
    step "detector bf16 channels-last" "$python" bench/bench_detector.py --device "$device" --precision bf16 \
        --channels-last --repeats "$detector_repeats" --resize "$detector_size" $detector_quick \
        --json "$out/detector_bf16_cl.json"
    step "detector drift" "$python" bench/drift_detector.py --device "$device" --options "$drift_options" \
        --size "$detector_size" $drift_quick --json "$out/drift.json"
    echo "## done, status $status"
    exit "$status"
} 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
