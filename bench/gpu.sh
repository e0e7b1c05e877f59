#!/bin/bash
# bench/gpu.sh: the GPU run of issue 11, one script for a machine with an
# NVIDIA GPU (written for the H200 device machine: CUDA 13, PyTorch, no
# network, none of Debian's -dev packages).
#   1. unpacks the .deb bundle of tools/fetch-nn-debs.sh (DEBS, default
#      .nn-debs) into a local prefix and finds cuDNN and cuBLAS (CUDA's folder,
#      else PyTorch's nvidia-* wheels); nothing is installed
#   2. builds nn/ alone: meson setup -Dnn_only=true -Dcuda=enabled
#   3. runs the GPU tests (every op and whole LRCNs, CUDA against the CPU,
#      fp32 with TF32 off): they must PASS here, a SKIP means no GPU was seen
#   4. VGG19 LRCN inference of one SLICES-slice series (host in, host out),
#      median ms: ours (production precision) and PyTorch's
#   5. training throughput, one SLICES-slice series per step, every layer
#      trained, Adam: ours / PyTorch's (PyTorch with its defaults, printed)
# Ends with: RESULT vgg19_lrcn_fwd_ms=.. train_ratio=.. gpu_tests=pass|fail|skip
# The log is $BUILD/gpu.log; with OUT set (the device tool), it and the test
# and meson logs are copied there. Each step has a time limit, so the whole
# run ends inside the device machine's 10 minutes.
set -u
cd "$(dirname "$0")/.." || exit 1
BUILD=${BUILD:-build-gpu}
DEBS=${DEBS:-.nn-debs}
PY=${PY:-python3}
SLICES=${SLICES:-40}
REPS=${REPS:-30}
STEPS=${STEPS:-8}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PREFIX=$PWD/$BUILD-deps
mkdir -p "$BUILD" "$PREFIX"
LOG=$PWD/$BUILD/gpu.log

copy_logs() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    cp "$LOG" "$OUT/gpu.log" 2>/dev/null
    cp "$BUILD/meson-logs/testlog.txt" "$OUT/testlog.txt" 2>/dev/null
    cp "$BUILD/meson-logs/meson-log.txt" "$OUT/meson-log.txt" 2>/dev/null
    return 0
}
trap copy_logs EXIT

# value KEY LINE: the number after KEY= in LINE
value() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }

# Prepends a folder to a colon-separated variable.
prepend() { eval "export $1=\"$2\${$1:+:\$$1}\""; }

# The folder holding the first file named $1 under the folders given after it.
find_dir() {
    local name=$1
    shift
    for root in "$@"; do
        [ -d "$root" ] || continue
        local f
        f=$(find -L "$root" -maxdepth 6 -name "$name" 2>/dev/null | head -1)
        if [ -n "$f" ]; then
            dirname "$f"
            return 0
        fi
    done
    return 1
}

# A library usable at link time: $dir/lib$1.so, or a link to its versioned file.
link_lib() {
    local name=$1 dir=$2
    [ -e "$dir/lib$name.so" ] && return 0
    local v
    v=$(ls "$dir"/lib"$name".so.* 2>/dev/null | head -1)
    [ -n "$v" ] || return 1
    mkdir -p "$PREFIX/links"
    ln -sf "$v" "$PREFIX/links/lib$name.so"
}

setup_env() {
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
    echo "cpus=$(nproc) kernel=$(uname -r)"
    local n=0
    for f in "$DEBS"/*.deb; do
        [ -e "$f" ] || continue
        dpkg -x "$f" "$PREFIX" && n=$((n + 1))
    done
    echo "debs_unpacked=$n from $DEBS"
    local a=$PREFIX/usr/lib/x86_64-linux-gnu
    prepend CPATH "$PREFIX/usr/include"
    prepend CPATH "$PREFIX/usr/include/x86_64-linux-gnu/openblas-pthread"
    prepend LIBRARY_PATH "$a"
    prepend LIBRARY_PATH "$a/openblas-pthread"
    prepend LD_LIBRARY_PATH "$a"
    prepend LD_LIBRARY_PATH "$a/openblas-pthread"
    [ -x "$CUDA_HOME/bin/nvcc" ] && prepend PATH "$CUDA_HOME/bin"
    echo "nvcc=$(command -v nvcc) $(nvcc --version 2>/dev/null | tail -1)"
    echo "cc=$(command -v cc) $(cc --version 2>/dev/null | head -1)"
    echo "meson=$(meson --version 2>/dev/null) ninja=$(ninja --version 2>/dev/null)"
    local site
    site=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    local roots="$CUDA_HOME /usr/include /usr/lib/x86_64-linux-gnu"
    for s in $site; do roots="$roots $s/nvidia"; done
    for lib in cudnn cublas; do
        local hdr=cudnn.h
        [ $lib = cublas ] && hdr=cublas_v2.h
        local inc libdir
        # shellcheck disable=SC2086
        inc=$(find_dir $hdr $roots) || inc=
        # shellcheck disable=SC2086
        libdir=$(find_dir "lib$lib.so*" $roots) || libdir=
        echo "$lib: include=${inc:-none} lib=${libdir:-none}"
        [ -n "$inc" ] && [ "$inc" != "$CUDA_HOME/include" ] && prepend CPATH "$inc"
        if [ -n "$libdir" ]; then
            prepend LD_LIBRARY_PATH "$libdir"
            prepend LIBRARY_PATH "$libdir"
            link_lib $lib "$libdir"
        fi
    done
    [ -d "$PREFIX/links" ] && prepend LIBRARY_PATH "$PREFIX/links"
    "$PY" bench/gpu_torch.py info 2>&1
}

build() {
    echo "== build (-Dnn_only=true -Dcuda=enabled)"
    local t0=$SECONDS
    if [ -f "$BUILD/build.ninja" ]; then
        timeout 120 meson setup --reconfigure "$BUILD" -Dnn_only=true -Dcuda=enabled >/dev/null
    else
        timeout 120 meson setup "$BUILD" -Dnn_only=true -Dcuda=enabled --buildtype=release >/dev/null
    fi || {
        echo "meson setup failed:"
        tail -30 "$BUILD/meson-logs/meson-log.txt"
        return 1
    }
    timeout 300 ninja -C "$BUILD" >"$BUILD/ninja.log" 2>&1 || {
        echo "build failed:"
        grep -E -A5 "error|FAILED" "$BUILD/ninja.log" | head -60
        return 1
    }
    echo "build_s=$((SECONDS - t0))"
}

# Prints pass, fail or skip.
gpu_tests() {
    timeout 400 meson test -C "$BUILD" --suite gpu --print-errorlogs >"$BUILD/gpu-tests.log" 2>&1
    local rc=$?
    grep -E "nn_cuda|^(Ok|Fail|Skipped|Timeout):" "$BUILD/gpu-tests.log" >&2
    grep -E "^FAIL" "$BUILD/meson-logs/testlog.txt" 2>/dev/null | head -40 >&2
    grep -E " checks failed" "$BUILD/meson-logs/testlog.txt" 2>/dev/null >&2
    if [ $rc -ne 0 ]; then
        echo fail
    elif grep -qE "^Skipped: *[1-9]" "$BUILD/gpu-tests.log"; then
        echo skip
    else
        echo pass
    fi
}

main() {
    setup_env
    local tests=fail fwd_ms=NA ratio=NA
    if build; then
        echo "== GPU tests (CUDA against the CPU, fp32, TF32 off)"
        tests=$(gpu_tests)
        echo "gpu_tests=$tests"
        local C=$BUILD/nn/nn-bench
        echo "== VGG19 LRCN inference, one $SLICES-slice series"
        local ours torch
        ours=$(timeout 180 "$C" lrcn-fwd vgg19 "$SLICES" "$REPS" cuda)
        echo "ours:  $ours"
        torch=$(timeout 180 "$PY" bench/gpu_torch.py fwd vgg19 "$SLICES" "$REPS")
        echo "torch: $torch"
        fwd_ms=$(value median_ms "$ours")
        echo "== VGG19 LRCN training, one $SLICES-slice series per step, $STEPS steps"
        ours=$(timeout 240 "$C" train vgg19 "$SLICES" "$STEPS" cuda)
        echo "ours:  $ours"
        torch=$(timeout 240 "$PY" bench/gpu_torch.py train vgg19 "$SLICES" "$STEPS")
        echo "torch: $torch"
        local a b
        a=$(value slices_per_s "$ours")
        b=$(value slices_per_s "$torch")
        if [ -n "$a" ] && [ -n "$b" ]; then
            ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }')
        fi
    fi
    echo "RESULT vgg19_lrcn_fwd_ms=${fwd_ms:-NA} train_ratio=$ratio gpu_tests=$tests"
}

main 2>&1 | tee "$LOG"
