#!/bin/bash
# bench/fuzz.sh [SECONDS] [TARGET...]: runs each libFuzzer target of fuzz/ for
# SECONDS (default 60) on its corpus, one after the other, one process each.
#
#   CC=clang CXX=clang++ meson setup build-fuzz -Dfuzz=true \
#     -Db_sanitize=address,undefined -Db_lundef=false -Dcuda=disabled
#   ninja -C build-fuzz && bench/fuzz.sh 300
#
# Environment: FUZZ_BUILD (default build-fuzz), FUZZ_CORPUS (default
# $FUZZ_BUILD/fuzz-corpus: seeds from fuzz/seeds.sh, grown by the runs),
# FUZZ_ARTIFACTS (default $FUZZ_BUILD/fuzz-artifacts: crash-*, leak-*,
# timeout-* inputs). A crash, leak or timeout fails the script and names the
# input; turn it into a regression input in fuzz/regressions/TARGET/ (which
# every run replays first, and CI with it).
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-60}
shift || true
build=${FUZZ_BUILD:-$src/build-fuzz}
corpus=${FUZZ_CORPUS:-$build/fuzz-corpus}
artifacts=${FUZZ_ARTIFACTS:-$build/fuzz-artifacts}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(scp_info scp_pixels preprocess safetensors config http)
mkdir -p "$artifacts"
"$src/fuzz/seeds.sh" "$build" "$corpus" || { echo "fuzz: cannot make seeds" >&2; exit 1; }
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$src/tests/robust/lsan.supp}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=0
for t in "${targets[@]}"; do
  exe=$build/fuzz/fuzz_$t
  [ -x "$exe" ] || { echo "fuzz: $exe missing (build with -Dfuzz=true)" >&2; failed=1; continue; }
  reg=$src/fuzz/regressions/$t
  if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
    if ! "$exe" -runs=0 "$reg"/* >"$artifacts/$t.regressions.log" 2>&1; then
      echo "fuzz: $t: a regression input fails again; see $artifacts/$t.regressions.log" >&2
      failed=1
      continue
    fi
  fi
  mkdir -p "$corpus/$t"
  # -rss_limit_mb: the parsers' own caps must hold well below it; a
  # timeout of 10 s per input catches hangs (e.g. a loop on a lying length).
  # -malloc_limit_mb above 4 GB: dcmtk reserves (without touching) whatever a
  # 32-bit length claims in a deflated dataset (fuzz_scp_pixels reads such files
  # directly; the SCP and fuzz_scp_info refuse them first, docs/robustness.md);
  # memory actually used still counts against the RSS limit.
  "$exe" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=4200 \
    -max_len=262144 \
    -artifact_prefix="$artifacts/$t-" -print_final_stats=1 "$corpus/$t" \
    >"$artifacts/$t.log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$artifacts/$t.log" | grep -o '[0-9]*$')
  cov=$(grep -o 'cov: [0-9]*' "$artifacts/$t.log" | tail -n1 | grep -o '[0-9]*')
  if [ $rc -ne 0 ]; then
    echo "fuzz: $t FAILED after ${secs}s (rc $rc): $(ls -t "$artifacts/$t-"* 2>/dev/null | head -n1)" >&2
    grep -m3 -E 'ERROR|runtime error|SUMMARY' "$artifacts/$t.log" >&2
    failed=1
  else
    echo "fuzz: $t ok: ${execs:-?} inputs in ${secs}s, coverage ${cov:-?}, corpus $(ls "$corpus/$t" | wc -l)"
  fi
done
exit $failed
