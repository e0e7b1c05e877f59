"""Worklist page benchmark: how long the page takes to show a long list.

Starts a node (no model: nothing is triaged meanwhile), writes ROWS studies
straight into its index (real SQLite, the node's own schema), as a site
collects them over DAYS days (default 10000 over 60): most triaged and not
flagged, some not applicable, a few flagged, waiting or failed, a fifth
reviewed. Then opens the page in headless Chromium and measures, in the
page's own clock, the time from navigation until the list is drawn (the
count says how many studies, two animation frames later: laid out and
painted), with the browser's script, layout and style seconds, and with
curl how long GET /api/worklist takes. Extra arguments are --set keys for
the node (`--set http.worklist_days=0`: every study not reviewed listed).

    /usr/bin/python3 bench/worklist_page.py BUILD/ichtriage [ROWS [DAYS]] [--set k=v]...

Prints `RESULT page_first_render_ms=.. api_worklist_ms=.. rows_listed=..`
(the median of 3 page loads)."""
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests", "web"))
import cdp  # noqa: E402
import dicomtest as dt  # noqa: E402

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def fill(db_path, rows, days, seed=7):
    """Writes rows studies arrived over the last days days."""
    rnd = random.Random(seed)
    now = int(time.time() * 1000)
    c = sqlite3.connect(db_path, timeout=30)
    c.execute("BEGIN IMMEDIATE")
    for i in range(rows):
        at = now - int(rnd.random() * days * 86400000)
        k = rnd.random()
        status, p, flagged = "triaged", rnd.random() * 0.4, 0
        if k < 0.2:
            status = "reviewed"
        elif k < 0.25:
            status, p = "not_applicable", None
        elif k < 0.27:
            p, flagged = 0.6 + rnd.random() * 0.4, 1
        elif k < 0.28:
            status, p = "waiting", None
        elif k < 0.285:
            status, p = "failed", None
        pid = c.execute("INSERT INTO patients (patient_id, patient_name) VALUES (?, ?)",
                        ("PID%06d" % i, "BENCH^PATIENT%d" % i)).lastrowid
        sid = c.execute(
            "INSERT INTO studies (study_uid, patient_ref, accession, study_date, study_time,"
            " study_desc, received_at, updated_at, status, probability, flagged)"
            " VALUES (?, ?, ?, ?, ?, 'CT HEAD', ?, ?, ?, ?, ?)",
            ("1.2.826.0.1.3680043.10.9999.%d" % i, pid, "ACC%06d" % i,
             time.strftime("%Y%m%d", time.gmtime(at / 1000)),
             time.strftime("%H%M%S", time.gmtime(at / 1000)), at, at + 60000, status, p,
             flagged)).lastrowid
        ser = c.execute(
            "INSERT INTO series (series_uid, study_ref, modality, series_number, series_desc,"
            " instance_count, first_instance_at, last_instance_at, state)"
            " VALUES (?, ?, 'CT', 2, 'AXIAL', 40, ?, ?, ?)",
            ("1.2.826.0.1.3680043.10.9999.%d.2" % i, sid, at, at,
             "triaged" if p is not None else status)).lastrowid
        if p is not None:
            sub = [rnd.random() * p for _ in SUBTYPES]
            c.execute("INSERT INTO results (series_ref, content_key, model_version, p_any,"
                      " p_epidural, p_intraparenchymal, p_intraventricular, p_subarachnoid,"
                      " p_subdural, flagged, slices, key_index, key_sop, created_at)"
                      " VALUES (?, 'k', 'bench', ?, ?, ?, ?, ?, ?, ?, 40, 0, '', ?)",
                      [ser, p] + sub + [flagged, at + 60000])
            c.execute("UPDATE studies SET result_series_ref = ? WHERE id = ?", (ser, sid))
    c.execute("COMMIT")
    c.close()


def page_render_ms(base, expect):
    """(ms from navigation until the count shows and two frames passed,
    {the browser's script, layout and style seconds until then})."""
    b = cdp.Browser()
    try:
        b.open(base + "/")
        b.send("Performance.enable")
        b.wait("typeof state !== 'undefined' && document.readyState !== 'loading'", 60)
        ms = b.eval(
            "new Promise((done) => { const check = () => {"
            " if (/^%d stud/.test(document.getElementById('count').textContent))"
            "  requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now())));"
            " else requestAnimationFrame(check); }; check(); })" % expect)
        metrics = {m["name"]: m["value"] for m in b.send("Performance.getMetrics")["metrics"]}
        return ms, {k: round(metrics.get(k, 0), 2) for k in
                    ("ScriptDuration", "LayoutDuration", "RecalcStyleDuration")}
    finally:
        b.close()


def main():
    args = [a for a in sys.argv[1:]]
    sets = {}
    while "--set" in args:
        i = args.index("--set")
        k, v = args[i + 1].split("=", 1)
        sets[k] = v
        del args[i:i + 2]
    exe = os.path.abspath(args[0])
    rows = int(args[1]) if len(args) > 1 else 10000
    days = float(args[2]) if len(args) > 2 else 60
    work = tempfile.mkdtemp(prefix="ichtriage-bench-page.")
    settings = {"triage.model": "/nonexistent.safetensors", "log.level": "info"}
    settings.update(sets)
    node = dt.Node(exe, os.path.join(work, "node"), settings)
    node.start()
    try:
        fill(os.path.join(node.store_dir, "ichtriage.db"), rows, days)
        base = "http://127.0.0.1:%d" % node.http_port
        t0 = time.monotonic()
        out = subprocess.run(["curl", "-sS", base + "/api/worklist"], stdout=subprocess.PIPE,
                             check=True).stdout
        api_ms = (time.monotonic() - t0) * 1000
        listed = len(json.loads(out))
        loads = [page_render_ms(base, listed) for _ in range(3)]
        times = [ms for ms, _ in loads]
        print("browser seconds of the last load:", loads[-1][1])
        print("rows in the index %d, listed %d; page loads (ms): %s" %
              (rows, listed, ", ".join("%.0f" % t for t in times)))
        print("RESULT page_first_render_ms=%.0f api_worklist_ms=%.0f rows_listed=%d" %
              (statistics.median(times), api_ms, listed))
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
