#!/bin/bash
# fuzz/seeds.sh BUILD_DIR OUTDIR: seed corpora for the fuzz targets, one
# folder per target under OUTDIR, from the project's own generators: small
# CT files in every transfer syntax and an enhanced CT (tests/tools/gen_ct.py),
# phantom slices (`ichtriage phantom`), a test model
# (tests/triage/make_test_model), the shipped config file. Idempotent: a
# target folder that already has files is left alone (libFuzzer adds to it).
set -euo pipefail
build=$(realpath "$1")
out=$2
src=$(cd "$(dirname "$0")/.." && pwd)
py=/usr/bin/python3
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

need() { [ -z "$(ls -A "$out/$1" 2>/dev/null)" ] && mkdir -p "$out/$1"; }

if need dicom; then
  for ts in implicit explicit bigendian deflated rle jpegls jpeg-lossless jpeg-baseline; do
    "$py" "$src/tests/tools/gen_ct.py" "$tmp/$ts" --count 1 --rows 16 --cols 16 --ts "$ts" \
      >/dev/null 2>&1 || echo "seeds: no $ts seed (gen_ct.py failed)" >&2
  done
  "$py" "$src/tests/tools/gen_ct.py" "$tmp/enh" --count 3 --rows 16 --cols 16 --sop enhanced-ct \
    >/dev/null 2>&1 || true
  "$build/ichtriage" phantom --seed 3 -n 1 --size 64 --slices 2 "$tmp/ph" >/dev/null 2>&1 || true
  i=0
  for f in $(find "$tmp" -name '*.dcm' | sort); do
    cp "$f" "$out/dicom/seed$((i++)).dcm"
  done
fi
for t in scp_info scp_pixels; do
  if need "$t"; then cp "$out/dicom/"* "$out/$t/"; fi
done
if need safetensors; then
  "$build/tests/triage/make_test_model" "$out/safetensors/test_model.safetensors" \
    "b4,M,G|" 1 >/dev/null
  # A minimal valid file: one F32 tensor of 2 values and a metadata pair.
  "$py" - "$out/safetensors/tiny.safetensors" <<'PY'
import json, struct, sys
h = json.dumps({"__metadata__": {"k": "v"},
                "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + struct.pack("<2f", 1, 2))
PY
fi
if need config; then
  cp "$src/etc/ichtriage.conf" "$out/config/ichtriage.conf"
  printf '[dicom]\nport = 104\n[store]\ndir = /tmp/x\n' >"$out/config/small.conf"
  printf 'dicom.port=11112' >"$out/config/set.txt"
fi
if need http; then
  cp "$src/fuzz/regressions/http/"* "$out/http/"
fi
if need preprocess; then
  "$py" - "$out/preprocess" <<'PY'
import os, struct, sys
d = sys.argv[1]
open(os.path.join(d, "a"), "wb").write(bytes([16, 16, 8, 8]) + b"40/80,80/200\0"
                                       + struct.pack("<256f", *[i * 10.0 - 1000 for i in range(256)]))
open(os.path.join(d, "b"), "wb").write(bytes([3, 5, 7, 2]) + struct.pack("<15f", *[float("nan")] * 15))
PY
fi
