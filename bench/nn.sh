#!/bin/sh
# bench/nn.sh: nn/ against PyTorch on this machine, in one run (issue 3).
#   1. OpenBLAS sgemm 1024^3, GFLOP/s: the machine's practical peak
#   2. eval forward, slices/s, of `small` and `vgg19` at 3x128x128, batch 32
#   3. one training step of the small LRCN on a 40-slice series
# Both sides use THREADS threads (default: all cores); each measurement runs
# ours and PyTorch's alternately ROUNDS times and keeps the best of each, so
# that load from other processes hits both alike.
# Ends with: RESULT small_fwd_ratio=.. vgg19_fwd_ratio=.. train_ratio=.. vgg19_gflops=.. peak_gflops=..
# (ratio = our throughput / PyTorch's). Needs Debian's /usr/bin/python3 with python3-torch.
set -eu
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-3}
SECONDS_FWD=${SECONDS_FWD:-4}
BUILD=${BUILD:-build-nn}
PY=/usr/bin/python3

if [ ! -d "$BUILD" ]; then
    meson setup "$BUILD" -Dnn_only=true >/dev/null
fi
ninja -C "$BUILD" nn/nn-bench >/dev/null
export OPENBLAS_NUM_THREADS="$THREADS"
C="$BUILD/nn/nn-bench"
T="$PY bench/nn_torch.py $THREADS"

# value KEY LINE: the number after KEY= in LINE
value() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
# best KIND KEY CMD...: best of ROUNDS runs (max for rates, min for times)
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b ? a : b) }'; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }

echo "threads=$THREADS rounds=$ROUNDS cpu=\"$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)\""
echo "torch=$($PY -c 'import torch; print(torch.__version__)')"
# other processes skew every figure; say how busy the machine was
echo "loadavg_before=\"$(cut -d' ' -f1-3 /proc/loadavg)\""

peak=0
for _ in $(seq "$ROUNDS"); do
    line=$($C sgemm 1024)
    echo "$line"
    peak=$(max "$peak" "$(value gflops "$line")")
done

run_pair() { # MODE ARCH A B KEY PICK -> sets ours, theirs
    ours=""
    theirs=""
    for _ in $(seq "$ROUNDS"); do
        a=$($C "$1" "$2" "$3" "$4"); echo "ours  $a"
        b=$($T "$1" "$2" "$3" "$4"); echo "torch $b"
        va=$(value "$5" "$a"); vb=$(value "$5" "$b")
        ours=$($6 "${ours:-$va}" "$va"); theirs=$($6 "${theirs:-$vb}" "$vb")
    done
}

run_pair fwd small 32 "$SECONDS_FWD" slices_per_s max
small_ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
run_pair fwd vgg19 32 "$SECONDS_FWD" slices_per_s max
vgg_ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
# VGG19's 16 convolutions at 128x128: 2 * MACs per slice
vgg_gflop=$(awk 'BEGIN {
    split("3 64 64 128 128 256 256 256 256 512 512 512 512 512 512 512 512", c, " ");
    s = 128; f = 0; n = 0;
    for (i = 1; i <= 16; i++) {
        f += 2 * 9 * c[i] * c[i + 1] * s * s;
        if (i == 2 || i == 4 || i == 8 || i == 12) s /= 2;
    }
    printf "%.3f", f / 1e9 }')
vgg_gflops=$(awk -v r="$ours" -v g="$vgg_gflop" 'BEGIN { printf "%.1f", r * g }')
echo "vgg19_gflop_per_slice=$vgg_gflop"
run_pair train small 40 3 s_per_step min
train_ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", b / a }')
peak_share=$(awk -v a="$vgg_gflops" -v b="$peak" 'BEGIN { printf "%.0f", 100 * a / b }')
echo "vgg19_share_of_peak=${peak_share}%"
echo "loadavg_after=\"$(cut -d' ' -f1-3 /proc/loadavg)\""
echo "RESULT small_fwd_ratio=$small_ratio vgg19_fwd_ratio=$vgg_ratio train_ratio=$train_ratio vgg19_gflops=$vgg_gflops peak_gflops=$peak"
