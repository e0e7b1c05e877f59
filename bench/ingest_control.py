"""Control for bench/triage.py's ingest slowdown (issue 6).

The same 200-instance 512x512 chest series, sent in idle/loaded pairs as
bench/triage.py does, against a node with nothing to triage; the load is one
busy loop per CPU under SCHED_IDLE (`chrt --idle 0`), the scheduling class of
the node's inference threads, instead of the model. What this ratio shows is
what CPU work at that class costs the receiver at all, and its spread is the
spread of the machine itself (disk, fsync per instance).

    /usr/bin/python3 bench/ingest_control.py build/ichtriage [ROUNDS]

Prints the pairs and `RESULT control_slowdown=..` (median of the pairs' ratios)."""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import dicomtest as dt  # noqa: E402
from triage import chest_series, storescu  # noqa: E402


def main():
    exe = os.path.abspath(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    work = tempfile.mkdtemp(prefix="ichtriage-bench-control.")
    hogs = []
    try:
        big = chest_series(os.path.join(work, "ingest"))
        node = dt.Node(exe, os.path.join(work, "node"), {"log.level": "info"})
        node.start()
        storescu(node.port, big, work)  # warm-up: the store's folders and index exist
        base, busy = [], []
        for _ in range(rounds):
            base.append(storescu(node.port, big, work))
            time.sleep(0.3)
            hogs = [subprocess.Popen(["chrt", "--idle", "0", "sh", "-c", "while :; do :; done"])
                    for _ in range(os.cpu_count() or 1)]
            time.sleep(0.3)
            busy.append(storescu(node.port, big, work))
            for h in hogs:
                h.kill()
                h.wait()
            hogs = []
            time.sleep(0.3)
        node.stop()
        ratios = [b / a for a, b in zip(base, busy)]
        print("%-44s %s s" % ("ingest 200 x 512 KB, idle", " ".join("%.2f" % t for t in base)))
        print("%-44s %s s" % ("ingest, SCHED_IDLE busy loops", " ".join("%.2f" % t for t in busy)))
        print("%-44s %s" % ("ratio, per round", " ".join("%.3f" % x for x in ratios)))
        print("RESULT control_slowdown=%.3f" % statistics.median(ratios))
    finally:
        for h in hogs:
            h.kill()
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
