#!/bin/sh
# models/make-default.sh: makes models/default.safetensors, the demonstration
# model the node ships, with one `ichtriage train` run on synthetic phantoms,
# `ichtriage calibrate` on phantoms of a second seed, and scores it with
# `ichtriage eval` on phantoms of a third. About 2 hours on 2 idle cores:
# within them on a VM like that of 2026-11-30, over them on slower ones
# (models/README.md has the times measured). Trained on synthetic phantoms: a
# demonstration, not clinically validated. Decision support, not a diagnosis.
#
#   models/make-default.sh [BUILD_DIR [WORK_DIR]]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
work=${2:-${TMPDIR:-/tmp}/ichtriage-default-model}
bin=$build/ichtriage
threads=${THREADS:-2}
mkdir -p "$work"

# Data: 2400 training studies of seed 101 in six folders (made two at a
# time, one per core; `train` splits them 90/10 into train/validation by
# patient), 400 calibration studies of seed 303 and 120 held-out test studies
# of seed 202. 256x256 phantoms: the shared preprocessing resizes every slice
# to 128x128 anyway. Many heads rather than many passes: with 320 heads,
# stage 1 learnt them by heart (validation AUC flat from the second epoch
# while the training loss fell); 1080 did better, so 2160 now.
# A folder is complete once its labels CSV is there (the phantom command
# renames it into place last); one left by an interrupted run is made again.
gen() {
    [ -f "$work/$1/stage_2_train.csv" ] && return 0
    rm -rf "${work:?}/$1"
    "$bin" phantom "$work/$1" --seed "$2" --first "$3" -n "$4" --size 256
}
gen ph-a 101 0 200 & gen ph-b 101 200 200 & wait
gen ph-c 101 400 400 & gen ph-d 101 800 400 & wait
gen ph-e 101 1200 600 & gen ph-f 101 1800 600 & wait
gen ph-calib-a 303 0 200 & gen ph-calib-b 303 200 200 & wait
gen ph-test 202 0 120

# Each series is cropped to one square around the head before the resize to
# 128x128 (--crop head, docs/model-format.md): 1.0-1.3x the resolution for the
# same work; the sixth version, with it, did better on all three phantom sets
# than the fifth, without (docs/benchmarks.md).
# Stage 1 from scratch: the small LRCN at 3x128x128, 8000 augmented slices per
# epoch, Adam 1e-3 decaying 0.9 per epoch, early stopping on the validation
# AUC of "any" per slice. Stage 2: CNN frozen, BiLSTM + dense on whole series
# with the slice loss plus a max-over-slices study loss. Then temperature
# calibration on validation and the thresholds for study-level sensitivity
# 0.95. A run that is interrupted resumes from its checkpoints in --workdir.
# --ema 0.998: stage 1 validates, and keeps, a moving average of its weights
# over about the last two epochs rather than the weights of the last step; the
# eleventh version, with it, did better on all three phantom sets than the
# same recipe without it (docs/benchmarks.md, "Weight averaging in stage 1").
"$bin" train "$work/ph-a" "$work/ph-b" "$work/ph-c" "$work/ph-d" "$work/ph-e" "$work/ph-f" \
    -o "$work/trained.safetensors" \
    --workdir "$work/run" --arch small --input 128 --crop head --seed 1 --val 0.1 --test 0 \
    --epochs1 18 --slices-per-epoch 8000 --patience 4 --lr1 1e-3 --lr-decay 0.9 \
    --val-metric any --epochs2 30 --lr2 1e-3 --study-loss 1 --ema 0.998 --threads "$threads" \
    --provenance "models/make-default.sh: synthetic phantoms (ichtriage phantom --seed 101, studies 0-2399, --size 256); a demonstration, not clinically validated"

# The validation split that chose the stage-2 epoch also chose the threshold,
# so its sensitivity is optimistic: the temperatures and thresholds are picked
# again on 400 studies of their own (seed 303) that took no part in training.
"$bin" calibrate "$work/trained.safetensors" "$work/ph-calib-a" "$work/ph-calib-b" \
    -o "$work/default.safetensors" --sensitivity 0.95 --threads "$threads" \
    --report "$work/default-calibration-report.html" --json "$work/default-calibration.json" \
    | tee "$work/default-calibration.txt"

"$bin" eval "$work/default.safetensors" "$work/ph-test" --threads "$threads" \
    --report "$work/default-test-report.html" --json "$work/default-test-metrics.json" \
    | tee "$work/default-test.txt"

# Where it fails: per lesion subtype and size, per mimic (models/breakdown.py,
# Debian's python3; only a report, the model does not depend on it).
"$bin" predict -c /dev/null --set "triage.model=$work/default.safetensors" --json "$work/ph-test" \
    > "$work/default-test-predictions.json"
if [ -x /usr/bin/python3 ]; then
    /usr/bin/python3 "$here/breakdown.py" "$work/default-test-predictions.json" "$work/ph-test" \
        | tee "$work/default-test-breakdown.txt"
fi

cp "$work/default.safetensors" "$here/default.safetensors"
cp "$work/default-test-metrics.json" "$here/default-test-metrics.json"
cp "$work/default-test-report.html" "$here/default-test-report.html"
cp "$work/default-calibration.txt" "$here/default-calibration.txt"
[ ! -f "$work/default-test-breakdown.txt" ] || cp "$work/default-test-breakdown.txt" "$here/"
echo "wrote $here/default.safetensors"
