#!/bin/bash
# bench/soak.sh: the node under a long steady load (issue 10; not in CI).
#
#   bench/soak.sh [MINUTES] [path/to/ichtriage]     (default 30, build/ichtriage)
#
# 8 senders (storescu, one association per study) each send fresh phantom
# studies (new UIDs every time, 16 slices of 128x128) back to back for
# MINUTES, while the node triages them with a random-weight test model
# (tests/triage/make_test_model from the same build; MODEL=path to use another).
# Every 10 s it samples the node's RSS, open files, threads, the job queue
# (queued+running), series still receiving, temp files, and instances stored.
# At the end: a table of the samples (one row a minute), and one line
#   RESULT minutes=.. studies=.. refused=.. rss_mb_start=.. rss_mb_end=..
#     rss_mb_max=.. rss_slope_mb_per_h=.. fds_start=.. fds_end=.. fds_max=..
#     threads_max=.. queue_max=.. queue_end=.. tmp_end=.. lost=..
# where the slope is fitted over the second half (after warm-up), and lost
# counts acknowledged instances missing from the index. Flat means: the slope
# near zero, fds and threads back to their start, queue_end 0.
# Environment: SENDERS (8), BENCH_DIR (work dir, removed unless KEEP=1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
minutes=${1:-30}
ichtriage=$(realpath "${2:-$root/build/ichtriage}")
build=$(dirname "$ichtriage")
PYTHON=${PYTHON:-/usr/bin/python3}
work=${BENCH_DIR:-$(mktemp -d /tmp/ichtriage-soak.XXXXXX)}
mkdir -p "$work"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
model=${MODEL:-$work/model.safetensors}
[ -n "${MODEL:-}" ] || "$build/tests/triage/make_test_model" "$model" >/dev/null
"$ichtriage" phantom --seed 5 -n 4 --size 128 --slices 16 "$work/templates" >/dev/null 2>&1

exec "$PYTHON" - "$ichtriage" "$model" "$work" "$minutes" "${SENDERS:-8}" "$root/tests/tools" <<'PY'
import os, sqlite3, subprocess, sys, threading, time
exe, model, work, minutes, senders, tools = sys.argv[1:7]
minutes, senders = float(minutes), int(senders)
sys.path.insert(0, tools)
import dicomtest as dt
import pydicom
from pydicom.uid import generate_uid

node = dt.Node(exe, os.path.join(work, "node"), {
    "triage.model": model, "triage.quiet_seconds": 2, "triage.min_slices": 5,
    "log.level": "info", "dicom.max_associations": senders + 2})
node.start()
tdir = os.path.join(work, "templates", "stage_2_train")
templates = {}
for f in sorted(os.listdir(tdir)):
    ds = pydicom.dcmread(os.path.join(tdir, f))
    templates.setdefault(ds.StudyInstanceUID, []).append(ds)
templates = list(templates.values())
end = time.monotonic() + minutes * 60
lock = threading.Lock()
totals = {"studies": 0, "refused": 0}
acked = []

def sender(i):
    out = os.path.join(work, "send%d" % i)
    os.makedirs(out, exist_ok=True)
    n = 0
    while time.monotonic() < end:
        study, series = generate_uid(), generate_uid()
        files = []
        for k, ds in enumerate(templates[(i + n) % len(templates)]):
            ds = ds.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = os.path.join(out, "%03d.dcm" % k)
            ds.save_as(path)
            files.append((path, ds.SOPInstanceUID))
        r = dt.storescu(node.port, [p for p, _ in files], exact_ts=False)
        with lock:
            totals["studies"] += 1
            totals["refused"] += sum(1 for p, _ in files if r.statuses.get(p) != 0)
            acked.extend(sop for p, sop in files if r.statuses.get(p) == 0)
        n += 1

def sample():
    pid = node.proc.pid
    with open("/proc/%d/status" % pid) as f:
        st = dict(l.split(":", 1) for l in f if ":" in l)
    con = sqlite3.connect("file:%s?mode=ro" % node.db_path, uri=True, timeout=30)
    try:
        q = con.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued','running')").fetchone()[0]
        rcv = con.execute("SELECT COUNT(*) FROM series WHERE state = 'receiving'").fetchone()[0]
        inst = con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        tri = con.execute("SELECT COUNT(*) FROM series WHERE state = 'triaged'").fetchone()[0]
    finally:
        con.close()
    return {"t": time.monotonic(), "rss_mb": int(st["VmRSS"].split()[0]) / 1024,
            "fds": len(os.listdir("/proc/%d/fd" % pid)), "threads": int(st["Threads"]),
            "queue": q, "receiving": rcv, "tmp": len(node.temp_files()), "instances": inst,
            "triaged": tri}

t0 = time.monotonic()
samples = [sample()]
threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    time.sleep(10)
    samples.append(sample())
for t in threads:
    t.join()
# Let triage drain, then the last sample.
drain = time.monotonic() + 300
while sample()["queue"] and time.monotonic() < drain:
    time.sleep(2)
time.sleep(3)
samples.append(sample())
stored = {r[0] for r in node.query("SELECT sop_uid FROM instances")}
lost = sum(1 for s in acked if s not in stored)
rc = node.stop(120)

print("| min | RSS MB | fds | threads | queue | receiving | tmp | instances | triaged |")
print("|---|---|---|---|---|---|---|---|---|")
last = -1
for s in samples:
    m = int((s["t"] - t0) // 60)
    if m != last or s is samples[-1]:
        last = m
        print("| %.1f | %.1f | %d | %d | %d | %d | %d | %d | %d |" % (
            (s["t"] - t0) / 60, s["rss_mb"], s["fds"], s["threads"], s["queue"],
            s["receiving"], s["tmp"], s["instances"], s["triaged"]))
half = [s for s in samples[:-1] if s["t"] - t0 >= minutes * 30] or samples
if len(half) >= 2:
    xs = [(s["t"] - t0) / 3600 for s in half]
    ys = [s["rss_mb"] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den
else:
    slope = 0.0
print("RESULT minutes=%g studies=%d refused=%d rss_mb_start=%.1f rss_mb_end=%.1f rss_mb_max=%.1f "
      "rss_slope_mb_per_h=%.1f fds_start=%d fds_end=%d fds_max=%d threads_max=%d queue_max=%d "
      "queue_end=%d tmp_end=%d lost=%d exit=%s" % (
          minutes, totals["studies"], totals["refused"], samples[0]["rss_mb"],
          samples[-1]["rss_mb"], max(s["rss_mb"] for s in samples), slope, samples[0]["fds"],
          samples[-1]["fds"], max(s["fds"] for s in samples), max(s["threads"] for s in samples),
          max(s["queue"] for s in samples), samples[-1]["queue"], samples[-1]["tmp"], lost, rc))
sys.exit(0 if lost == 0 and rc == 0 else 1)
PY
