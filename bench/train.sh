#!/bin/sh
# bench/train.sh: training throughput of the small LRCN, ichtriage's nn/ (as
# `ichtriage train` drives it: train/bench_main.c) against PyTorch 1.13 CPU on
# the same architecture (tests/nn/lrcn_torch.py), the same batches and the
# same number of threads, one run each. Stage 1: CNN per slice, batches of 32
# slices 3x128x128 (our side includes the augmentation). Stage 2: CNN frozen,
# BiLSTM + dense over 8 series of 40 slices of precomputed features.
# Ends with: RESULT stage1_ratio=.. stage2_ratio=..  (ours / PyTorch's)
#
#   bench/train.sh [BUILD_DIR]   (THREADS=2, SECONDS=20 by default)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
threads=${THREADS:-2}
secs=${SECONDS_PER_STAGE:-20}
arch=${ARCH:-small}
[ -x "$build/train/train-bench" ] || { echo "bench/train.sh: build first: ninja -C $build" >&2; exit 2; }
echo "cores=$(nproc) threads=$threads arch=$arch seconds_per_stage=$secs load=\"$(cut -d' ' -f1-3 /proc/loadavg)\""
ours=$(OPENBLAS_NUM_THREADS=$threads "$build/train/train-bench" "$arch" 32 8 40 "$secs")
echo "ichtriage: $ours"
theirs=$(OMP_NUM_THREADS=$threads /usr/bin/python3 "$here/train_torch.py" "$arch" 32 8 40 "$secs" "$threads")
echo "pytorch:   $theirs"
get() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
awk -v a="$(get "$ours" stage1_slices_per_s)" -v b="$(get "$theirs" stage1_slices_per_s)" \
    -v c="$(get "$ours" stage2_slices_per_s)" -v d="$(get "$theirs" stage2_slices_per_s)" \
    'BEGIN { printf "RESULT stage1_ratio=%.2f stage2_ratio=%.2f\n", a / b, c / d }'
