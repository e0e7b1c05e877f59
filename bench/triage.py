"""Triage benchmark (issue 6), driven by bench/triage.sh.

One node, phantom head CTs of 40 slices at 512x512, the default model
(models/default.safetensors; if absent, the `small` architecture with random
weights, which runs exactly as fast). Measures, from the node's own clocks in
its index:
  latency     result row written - last instance committed - quiet period
              (median of 3 studies sent one at a time)
  throughput  10 studies sent back to back: studies per minute from the first
              series completing to the last result (median over the rounds)
  slowdown    ingest time of a 200-instance 512x512 series (one storescu
              association, TCP_NODELAY) while those 10 are being triaged, over
              the same just before them with the node idle: one pair per
              round, the median of the pairs' ratios. Pairs taken seconds
              apart cancel the drift of the VM's disk, which moves the ingest
              time by more than inference does.
ROUNDS (environment, default 5) sets the rounds, 10 new studies each.
Prints a table and `RESULT triage_latency_s=.. studies_per_min=.. ingest_slowdown=..`."""
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import dicomtest as dt  # noqa: E402

QUIET = 2


def phantoms(exe, out, seed, count):
    subprocess.run([exe, "phantom", "--seed", str(seed), "-n", str(count), "--slices", "40",
                    out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import pydicom
    studies = {}
    for f in glob.glob(os.path.join(out, "stage_2_train", "*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        studies.setdefault(ds.StudyInstanceUID, []).append(f)
    return [sorted(v) for _, v in sorted(studies.items())]


def storescu(port, files, work):
    t0 = time.monotonic()
    r = dt.storescu(port, files, workdir=work)
    took = time.monotonic() - t0
    ok = sum(1 for s in r.statuses.values() if s == 0)
    if ok != len(files):
        raise SystemExit("storescu: %d of %d stored\n%s" % (ok, len(files), r.output[-2000:]))
    return took


def chest_series(out):
    """200 instances of 512x512: a chest series, stored and never triaged, so
    it adds no jobs."""
    import pydicom
    files = dt.generate(out, count=200)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.BodyPartExamined, ds.StudyDescription, ds.SeriesDescription = "CHEST", "CT CHEST", "AXIAL"
        ds.save_as(f)
    return files


def pending(node):
    """Jobs queued or running: inference has work."""
    return node.query("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")[0][0]


def wait_results(node, n, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = node.query("SELECT count(*) FROM jobs WHERE state IN ('done', 'failed')")[0][0]
        if done >= n:
            failed = node.query("SELECT count(*) FROM jobs WHERE state = 'failed'")[0][0]
            if failed:
                raise SystemExit("%d jobs failed: %s" % (failed, node.query(
                    "SELECT error FROM jobs WHERE state = 'failed'")[0][0]))
            return
        time.sleep(0.05)
    raise SystemExit("only %d of %d results after %d s" % (done, n, timeout))


def main():
    exe, make_model = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    work = tempfile.mkdtemp(prefix="ichtriage-bench-triage.")
    try:
        model = os.path.join(ROOT, "models", "default.safetensors")
        model_note = "models/default.safetensors"
        if not os.path.exists(model):
            model = os.path.join(work, "small.safetensors")
            subprocess.run([make_model, model, "small"], check=True)
            model_note = "small architecture, random weights (no default model yet)"
        print("model: %s" % model_note)
        rounds = int(os.environ.get("ROUNDS", "5"))
        nstudies = 4 + 10 * rounds
        print("generating phantoms (%d studies x 40 slices, 512x512) ..." % nstudies, flush=True)
        studies = phantoms(exe, os.path.join(work, "ph"), 4242, nstudies)
        big = chest_series(os.path.join(work, "ingest"))
        nslices = len(studies[0])

        node = dt.Node(exe, os.path.join(work, "node"), {
            "triage.model": model, "triage.quiet_seconds": QUIET, "log.level": "info"})
        node.start()
        # Warm-up: the model file is paged in, the model's worker threads started.
        storescu(node.port, studies[0], work)
        wait_results(node, 1)

        # 1. latency, one study at a time.
        lat = []
        for i in (1, 2, 3):
            storescu(node.port, studies[i], work)
            wait_results(node, 1 + i)
        rows = node.query(
            "SELECT r.created_at - s.last_instance_at, r.ms_pixels, r.ms_model, r.ms_total"
            " FROM results r JOIN series s ON s.id = r.series_ref ORDER BY r.created_at")
        for row in rows[1:4]:
            lat.append((row[0] - QUIET * 1000) / 1000.0)
        parts = rows[1:4]
        latency = statistics.median(lat)

        # 2.-4. per round: ingest with the node idle, then ten new studies back
        # to back and the same ingest while they are being triaged.
        base, busy, rates = [], [], []
        done = 4
        for r in range(rounds):
            base.append(storescu(node.port, big, work))
            time.sleep(0.5)
            t_send = time.time()
            for i in range(done, done + 10):
                storescu(node.port, studies[i], work)
            time.sleep(QUIET + 0.5)
            running = pending(node)
            busy.append(storescu(node.port, big, work))
            if running == 0 or pending(node) == 0:
                print("warning: inference was idle during part of round %d's loaded ingest" % (r + 1))
            done += 10
            wait_results(node, done)
            span = node.query(
                "SELECT min(s.completed_at), max(r.created_at) FROM results r JOIN series s"
                " ON s.id = r.series_ref WHERE r.created_at >= ?", (int(t_send * 1000),))[0]
            rates.append(10 * 60000.0 / (span[1] - span[0]))
        per_min = statistics.median(rates)
        ratios = [b / a for a, b in zip(base, busy)]
        slowdown = statistics.median(ratios)
        node.stop()

        print()
        print("%-44s %s" % ("series", "%d slices, 512x512, quiet period %d s" % (nslices, QUIET)))
        for i, (l, p) in enumerate(zip(lat, parts)):
            print("%-44s %.3f s (decode+preprocess %.0f ms, model %.0f ms, job %.0f ms)"
                  % ("latency, study %d" % (i + 1), l, p[1], p[2], p[3]))
        print("%-44s %.3f s" % ("latency, median", latency))
        print("%-44s %s studies/min" % ("throughput, 10 back to back, per round",
                                         " ".join("%.1f" % x for x in rates)))
        print("%-44s %.1f studies/min" % ("throughput, median", per_min))
        print("%-44s %s s" % ("ingest 200 x 512 KB, idle", " ".join("%.2f" % t for t in base)))
        print("%-44s %s s" % ("ingest 200 x 512 KB, inference running", " ".join("%.2f" % t for t in busy)))
        print("%-44s %s" % ("ingest slowdown, per round", " ".join("%.3f" % x for x in ratios)))
        print("%-44s %.3f" % ("ingest slowdown (median of the rounds)", slowdown))
        print("RESULT triage_latency_s=%.3f studies_per_min=%.1f ingest_slowdown=%.3f"
              % (latency, per_min, slowdown))
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
