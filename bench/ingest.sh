#!/bin/bash
# bench/ingest.sh: ingest speed of ichtriage against dcmtk's storescp and
# Orthanc, side by side on loopback (issue 2).
#
#   bench/ingest.sh [path/to/ichtriage]      (default: build/ichtriage)
#
# Data: 200 synthetic CT instances of 512x512 (about 100 MB, explicit VR LE),
# sent by storescu on one association; then 8 storescu at once, 50 instances
# each, every one its own series. storescu and storescp run with TCP_NODELAY=1;
# Orthanc (Debian's /usr/sbin/Orthanc) runs on a generated config with its own
# storage dir and ports and its defaults otherwise (fsync + SQLite index);
# ichtriage stores durably and indexed, as always.
#
# Prints a table and ends with one line
#   RESULT ingest_s=.. storescp_s=.. orthanc_s=.. ratio_vs_orthanc=.. parallel_ratio_vs_orthanc=..
# (ratio = Orthanc's time / ours). Environment: ROUNDS (default 1: fresh data
# and fresh servers per round, medians reported), BENCH_DIR (work dir, default
# a new dir under /tmp, removed at the end unless KEEP=1), ORTHANC, PYTHON.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
ichtriage=${1:-$root/build/ichtriage}
[ -x "$ichtriage" ] || [ -n "${1:-}" ] || ichtriage=$root/build/triage/ichtriage
ichtriage=$(realpath "$ichtriage")
PYTHON=${PYTHON:-/usr/bin/python3}
ORTHANC=${ORTHANC:-/usr/sbin/Orthanc}
tools="$root/tests/tools"

for tool in storescu storescp echoscu "$ORTHANC" "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "ingest.sh: $tool not found" >&2; exit 2; }
done
[ -x "$ichtriage" ] || { echo "ingest.sh: $ichtriage is not executable (build first)" >&2; exit 2; }

work=${BENCH_DIR:-$(mktemp -d /tmp/ichtriage-bench.XXXXXX)}
mkdir -p "$work"
server=""   # pid of the server being measured, if any
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    [ "${KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

export TCP_NODELAY=1   # storescu, storescp and Orthanc read it from here

# N ports below the ephemeral range (tests/tools/dicomtest.py), distinct: drawn
# in one process, since each one's reservation ends when that process does.
ports() { "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import dicomtest; print(" ".join(str(dicomtest.free_port()) for _ in range(int(sys.argv[2]))))' "$tools" "$1"; }
port() { ports 1; }
now() { date +%s.%N; }
elapsed() { "$PYTHON" -c 'import sys; print("%.3f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$2"; }

# Waits until an AE answers C-ECHO (up to 60 s).
wait_echo() {
    local port=$1 aet=$2
    for _ in $(seq 600); do
        echoscu -aec "$aet" 127.0.0.1 "$port" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "ingest.sh: nothing answers C-ECHO on port $port" >&2
    return 1
}

# One association, all files of a directory; fails the run if any store fails.
send_one() {
    local port=$1 aet=$2 dir=$3 log=$4
    if ! storescu -aec "$aet" -aet BENCH 127.0.0.1 "$port" "$dir"/*.dcm >"$log" 2>&1; then
        echo "ingest.sh: storescu to $aet failed, see $log" >&2
        tail -5 "$log" >&2
        return 1
    fi
}

# Times one association of 200 and then 8 associations of 50 at once; sets
# t_single and t_parallel.
measure() {
    local name=$1 port=$2 aet=$3
    local t0 t1 rc=0
    # Data just written is dirty in the page cache; whoever fsyncs first would
    # pay for writing it back. Each phase starts from a clean cache.
    sync
    t0=$(now)
    send_one "$port" "$aet" "$work/data/single" "$work/$name.single.log"
    t1=$(now)
    t_single=$(elapsed "$t0" "$t1")
    local senders=()
    sync
    t0=$(now)
    for i in 0 1 2 3 4 5 6 7; do
        send_one "$port" "$aet" "$work/data/par$i" "$work/$name.par$i.log" &
        senders+=($!)
    done
    for p in "${senders[@]}"; do wait "$p" || rc=1; done
    t1=$(now)
    [ "$rc" = 0 ] || return 1
    t_parallel=$(elapsed "$t0" "$t1")
}

stop() {
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
}


# Fresh data for one round: 200 instances in one series, 8 series of 50.
generate() {
    local d=$1 seed=$2
    echo "generating 200 + 8x50 CT instances of 512x512 in $d ..." >&2
    "$PYTHON" "$tools/gen_ct.py" "$d/single" --count 200 --seed "$seed" >/dev/null
    for i in 0 1 2 3 4 5 6 7; do
        "$PYTHON" "$tools/gen_ct.py" "$d/par$i" --count 50 --seed $((seed * 10 + i)) >/dev/null
    done
}

check_count() {
    if [ "$2" != 600 ]; then
        echo "ingest.sh: $1 holds $2 instances after the round, not 600" >&2
        exit 1
    fi
}

run_ichtriage() {
    local dir=$1 p h
    read -r p h <<PORTS
$(ports 2)
PORTS
    "$ichtriage" serve -c /dev/null --set dicom.port="$p" --set dicom.aetitle=ICHTRIAGE \
        --set store.dir="$dir" --set store.min_free_mb=0 \
        --set http.listen=127.0.0.1:"$h" --set log.level=warn 2>>"$work/ichtriage.log" &
    server=$!
    wait_echo "$p" ICHTRIAGE
    measure ichtriage "$p" ICHTRIAGE
    check_count ichtriage "$("$PYTHON" -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT COUNT(*) FROM instances").fetchone()[0])' "$dir/ichtriage.db")"
    stop
}

# dcmtk's storescp: writes files, no fsync, no index, one association at a time.
run_storescp() {
    local dir=$1 p
    p=$(port)
    mkdir -p "$dir"
    storescp -aet STORESCP -od "$dir" "$p" 2>>"$work/storescp.log" &
    server=$!
    wait_echo "$p" STORESCP
    measure storescp "$p" STORESCP
    check_count storescp "$(find "$dir" -type f | wc -l)"
    stop
}

# Orthanc from Debian: its defaults (fsync, SQLite index) with its own dirs
# and ports, so a system Orthanc on 4242/8042 does not matter.
run_orthanc() {
    local dir=$1 p h
    p=$(port)
    h=$(port)
    mkdir -p "$dir"
    printf '{\n  "Name": "ichtriage-bench",\n  "StorageDirectory": "%s",\n  "IndexDirectory": "%s",\n  "DicomAet": "ORTHANC",\n  "DicomPort": %d,\n  "HttpPort": %d,\n  "RemoteAccessAllowed": false,\n  "AuthenticationEnabled": false,\n  "Plugins": []\n}\n' \
        "$dir" "$dir" "$p" "$h" >"$dir.json"
    "$ORTHANC" "$dir.json" >>"$work/orthanc.log" 2>&1 &
    server=$!
    wait_echo "$p" ORTHANC
    measure orthanc "$p" ORTHANC
    check_count orthanc "$("$PYTHON" -c 'import json, sys, urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:%s/statistics" % sys.argv[1]))["CountInstances"])' "$h")"
    stop
}

ROUNDS=${ROUNDS:-1}
declare -A single parallel
for r in $(seq "$ROUNDS"); do
    generate "$work/data" "$r"
    mb=$(du -sm "$work/data/single" | cut -f1)
    # The order rotates from round to round, so that a load that comes and
    # goes on the machine does not always hit the same server.
    order=(ichtriage storescp orthanc)
    for k in 0 1 2; do
        name=${order[$(((k + r - 1) % 3))]}
        "run_$name" "$work/$name.$r"
        single[$name]+="$t_single "
        parallel[$name]+="$t_parallel "
        rm -rf "${work:?}/$name.$r" "${work:?}/$name.$r.json"
    done
    rm -rf "${work:?}/data"
done

median() { "$PYTHON" -c 'import statistics, sys; print("%.3f" % statistics.median(map(float, sys.argv[1:])))' $1; }
ratio() { "$PYTHON" -c 'import sys; print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
ich_single=$(median "${single[ichtriage]}")
ich_par=$(median "${parallel[ichtriage]}")
scp_single=$(median "${single[storescp]}")
scp_par=$(median "${parallel[storescp]}")
orthanc_single=$(median "${single[orthanc]}")
orthanc_par=$(median "${parallel[orthanc]}")

printf '\n%d MB in the 200-instance series (512x512 CT), loopback, %s CPUs, %s round(s), medians\n' \
    "$mb" "$(nproc)" "$ROUNDS"
printf '%-28s %18s %18s\n' server "1 assoc x 200 (s)" "8 assocs x 50 (s)"
printf '%-28s %18s %18s\n' "ichtriage (fsync + index)" "$ich_single" "$ich_par"
printf '%-28s %18s %18s\n' "storescp (no fsync, no index)" "$scp_single" "$scp_par"
printf '%-28s %18s %18s\n' "Orthanc $("$ORTHANC" --version | head -1 | awk '{print $2}')" "$orthanc_single" "$orthanc_par"
if [ "$ROUNDS" -gt 1 ]; then
    for name in ichtriage storescp orthanc; do
        echo "  $name per round: single ${single[$name]}| parallel ${parallel[$name]}"
    done
fi
echo "RESULT ingest_s=$ich_single storescp_s=$scp_single orthanc_s=$orthanc_single" \
    "ratio_vs_orthanc=$(ratio "$orthanc_single" "$ich_single")" \
    "parallel_ratio_vs_orthanc=$(ratio "$orthanc_par" "$ich_par")"
