#!/bin/sh
# models/make-default.sh: makes models/default.safetensors, the demonstration
# model the node ships, with `ichtriage train` on synthetic phantoms, and
# scores it with `ichtriage eval` on phantoms of a seed not used in training.
# Under an hour on 2 idle cores. Trained on synthetic phantoms: a demonstration,
# not clinically validated. Decision support, not a diagnosis.
#
#   models/make-default.sh [BUILD_DIR [WORK_DIR]]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
work=${2:-${TMPDIR:-/tmp}/ichtriage-default-model}
bin=$build/ichtriage
threads=${THREADS:-2}
mkdir -p "$work"

# Data: 160 training studies (seed 101; train/validation split by patient
# inside `train`), 60 held-out test studies (seed 202). 256x256 phantoms:
# the shared preprocessing resizes every slice to 128x128 anyway.
[ -f "$work/ph-train/studies.csv" ] || "$bin" phantom "$work/ph-train" --seed 101 -n 160 --size 256
[ -f "$work/ph-test/studies.csv" ] || "$bin" phantom "$work/ph-test" --seed 202 -n 60 --size 256

# Training, three runs of `ichtriage train`, each starting from the previous
# one's best stage-1 CNN: that is how the shipped model was made in the time
# there was (each run is deterministic for its seed; rerunning one after an
# interruption resumes from its checkpoints).
# 1. Stage 1 from scratch: the small LRCN at 3x128x128, 2000 augmented slices
#    per epoch, Adam 1e-3, early stopping on the mean validation AUC over the
#    labels (it stopped after epoch 5, best epoch 2).
"$bin" train "$work/ph-train" -o "$work/stage1a.safetensors" --workdir "$work/run" \
    --arch small --input 128 --seed 1 --val 0.2 --test 0 \
    --epochs1 7 --slices-per-epoch 2000 --patience 3 --lr1 1e-3 \
    --epochs2 0 --threads "$threads"
# 2. Stage 1 again from that CNN, Adam 3e-4 decaying 0.8 per epoch, 2000
#    slices per epoch, early stopping on the validation AUC of "any" (8 epochs,
#    best epoch 6).
"$bin" train "$work/ph-train" -o "$work/stage1b.safetensors" --workdir "$work/run2" \
    --init "$work/run/best-stage1.safetensors" \
    --arch small --input 128 --seed 1 --val 0.2 --test 0 \
    --epochs1 8 --slices-per-epoch 2000 --patience 3 --lr1 3e-4 --lr-decay 0.8 \
    --val-metric any --epochs2 0 --threads "$threads"
# 3. Two full passes over the training slices at Adam 2e-4 (x 0.85), then
#    stage 2 (CNN frozen; BiLSTM + dense on whole series, slice loss plus a
#    max-over-slices study loss), temperature calibration on validation and
#    the thresholds for study-level sensitivity 0.95.
"$bin" train "$work/ph-train" -o "$work/default.safetensors" --workdir "$work/run4" \
    --init "$work/run2/best-stage1.safetensors" \
    --arch small --input 128 --seed 1 --val 0.2 --test 0 \
    --epochs1 2 --patience 2 --lr1 2e-4 --lr-decay 0.85 \
    --val-metric any --epochs2 30 --lr2 1e-3 --study-loss 1 --threads "$threads" \
    --provenance "models/make-default.sh: synthetic phantoms (ichtriage phantom --seed 101 -n 160 --size 256); a demonstration, not clinically validated"

"$bin" eval "$work/default.safetensors" "$work/ph-test" --threads "$threads" \
    --report "$work/default-test-report.html" --json "$work/default-test-metrics.json" \
    | tee "$work/default-test.txt"

cp "$work/default.safetensors" "$here/default.safetensors"
cp "$work/default-test-metrics.json" "$here/default-test-metrics.json"
cp "$work/default-test-report.html" "$here/default-test-report.html"
echo "wrote $here/default.safetensors"
