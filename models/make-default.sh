#!/bin/sh
# models/make-default.sh: makes models/default.safetensors, the demonstration
# model the node ships, with one `ichtriage train` run on synthetic phantoms,
# and scores it with `ichtriage eval` on phantoms of a seed not used in
# training. Within 2 hours on 2 idle cores (the phantoms take about 5 minutes
# of that). Trained on synthetic phantoms: a demonstration, not clinically
# validated. Decision support, not a diagnosis.
#
#   models/make-default.sh [BUILD_DIR [WORK_DIR]]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
work=${2:-${TMPDIR:-/tmp}/ichtriage-default-model}
bin=$build/ichtriage
threads=${THREADS:-2}
mkdir -p "$work"

# Data: 400 training studies of seed 101 in two folders of 200 (made at the
# same time, one per core; `train` splits them 80/20 into train/validation by
# patient) and 120 held-out test studies of seed 202. 256x256 phantoms: the
# shared preprocessing resizes every slice to 128x128 anyway.
[ -f "$work/ph-a/studies.csv" ] || "$bin" phantom "$work/ph-a" --seed 101 -n 200 --size 256 &
[ -f "$work/ph-b/studies.csv" ] || "$bin" phantom "$work/ph-b" --seed 101 --first 200 -n 200 --size 256 &
wait
[ -f "$work/ph-test/studies.csv" ] || "$bin" phantom "$work/ph-test" --seed 202 -n 120 --size 256

# Stage 1 from scratch: the small LRCN at 3x128x128, 6000 augmented slices per
# epoch, Adam 1e-3 decaying 0.9 per epoch, early stopping on the validation
# AUC of "any" per slice. Stage 2: CNN frozen, BiLSTM + dense on whole series
# with the slice loss plus a max-over-slices study loss. Then temperature
# calibration on validation and the thresholds for study-level sensitivity
# 0.95. A run that is interrupted resumes from its checkpoints in --workdir.
"$bin" train "$work/ph-a" "$work/ph-b" -o "$work/default.safetensors" --workdir "$work/run" \
    --arch small --input 128 --seed 1 --val 0.2 --test 0 \
    --epochs1 18 --slices-per-epoch 6000 --patience 5 --lr1 1e-3 --lr-decay 0.9 \
    --val-metric any --epochs2 30 --lr2 1e-3 --study-loss 1 --threads "$threads" \
    --provenance "models/make-default.sh: synthetic phantoms (ichtriage phantom --seed 101, studies 0-399, --size 256); a demonstration, not clinically validated"

"$bin" eval "$work/default.safetensors" "$work/ph-test" --threads "$threads" \
    --report "$work/default-test-report.html" --json "$work/default-test-metrics.json" \
    | tee "$work/default-test.txt"

cp "$work/default.safetensors" "$here/default.safetensors"
cp "$work/default-test-metrics.json" "$here/default-test-metrics.json"
cp "$work/default-test-report.html" "$here/default-test-report.html"
echo "wrote $here/default.safetensors"
