#!/bin/bash
# Triage benchmark (issue 6): latency from the last instance to the worklist
# row, throughput of back-to-back studies, and ingest slowdown while the
# model runs. Usage: bench/triage.sh [BUILD_DIR]   (default: build)
# See bench/triage.py for what is measured and how.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(realpath "${1:-$root/build}")
ninja -C "$build" ichtriage tests/triage/make_test_model >/dev/null
exec /usr/bin/python3 "$root/bench/triage.py" "$build/ichtriage" "$build/tests/triage/make_test_model"
