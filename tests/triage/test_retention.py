"""Retention (issue 9): with store.retention_days set, the spool files and
instance rows of studies that are old, triaged and delivered are removed,
and nothing else: not a recent study, not one whose series failed triage,
not one with a PACS result not yet delivered, not one reviewed more recently
than store.keep_reviewed_days. The worklist row stays.

"Old" is made by moving a study's timestamps back in the index while the
node is stopped; retention runs two seconds after start.

    python3 test_retention.py ICHTRIAGE MAKE_TEST_MODEL"""
import os
import subprocess
import sqlite3
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402
from test_triage import phantom  # noqa: E402

MAKE_MODEL = None
DAY = 86400 * 1000


class Retention(itest.NodeTest):
    def test_only_old_triaged_delivered_studies_go(self):
        model = os.path.join(self.work, "model.safetensors")
        subprocess.run([MAKE_MODEL, model], check=True)
        node = self.start_node({"triage.model": model, "triage.quiet_seconds": 1,
                                "triage.min_slices": 5, "store.retention_days": 1,
                                "store.keep_reviewed_days": 30})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=31, count=5)
        uids = sorted(studies)
        old, recent, failed, reviewed, undelivered = uids
        import pydicom
        bad = studies[failed][2]
        ds = pydicom.dcmread(bad)
        ds.PixelData = ds.PixelData[:64]
        ds.save_as(bad)
        files = [f for u in uids for f in studies[u]]
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = dict(node.query("SELECT study_uid, status FROM studies"))
            if len(states) == 5 and all(s in ("triaged", "failed") for s in states.values()):
                break
            time.sleep(0.2)
        self.assertEqual(states[failed], "failed", states)
        self.assertEqual(node.stop(), 0)

        now = int(time.time() * 1000)
        con = sqlite3.connect(node.db_path)
        with con:
            for u in (old, failed, reviewed, undelivered):
                con.execute("UPDATE studies SET updated_at = ?, received_at = ?"
                            " WHERE study_uid = ?", (now - 3 * DAY, now - 3 * DAY, u))
            con.execute("UPDATE studies SET reviewed_at = ?, status = 'reviewed'"
                        " WHERE study_uid = ?", (now - 10 * DAY, reviewed))
            ser, = con.execute("SELECT s.id FROM studies st JOIN series s"
                                   " ON s.study_ref = st.id WHERE st.study_uid = ?",
                                   (undelivered,)).fetchone()
            # Its result built and queued for a PACS, not acknowledged yet
            # (the node recorded it skipped: it has no pacs.destinations).
            rev, = con.execute("SELECT id FROM pacs_revisions WHERE series_ref = ?",
                               (ser,)).fetchone()
            con.execute("UPDATE pacs_revisions SET state = 'ready', revision = 1 WHERE id = ?",
                        (rev,))
            con.execute("INSERT INTO pacs_deliveries (revision_ref, destination, object,"
                        " file_path, sop_uid, next_attempt_at) VALUES (?, 'PACS@127.0.0.1:9',"
                        " 'sr', 'outbox/1-sr.dcm', '1.2', ?)", (rev, now))
        con.close()

        node.start()
        self.assertTrue(node.wait_event("study_purged", timeout=20), node.log_tail())
        time.sleep(1.0)  # a second purge, if any were wrongly due, would be logged by now
        self.assertEqual(len(node.events("study_purged")), 1, node.log_tail())

        def files_of(u):
            return node.query("SELECT count(*) FROM instances i JOIN series s ON s.id ="
                              " i.series_id JOIN studies st ON st.id = s.study_ref"
                              " WHERE st.study_uid = ?", (u,))[0][0]

        self.assertEqual(files_of(old), 0)
        purged = dict(node.query("SELECT study_uid, purged_at IS NOT NULL FROM studies"))
        self.assertEqual(purged, {old: 1, recent: 0, failed: 0, reviewed: 0, undelivered: 0})
        for u in (recent, failed, reviewed, undelivered):
            self.assertEqual(files_of(u), 12, u)
        # Index and spool agree: the purged study's files are gone, with its folder.
        self.assertFalse(os.path.exists(os.path.join(node.spool, old)))
        self.assert_consistent_files(node)
        # Its worklist row stays.
        p = subprocess.run([itest.EXE, "worklist", "-c", "/dev/null", "--set",
                            "store.dir=" + node.store_dir], stdout=subprocess.PIPE, check=True)
        self.assertIn(old, p.stdout.decode())

    def test_a_backlog_goes_a_few_studies_at_a_time(self):
        """Six studies due at once (the first run on an old store) are all
        purged, a batch of at most 4 at a time with the loop free in
        between, not all in one go (which held the loop for every unlink of
        the backlog: HTTP, completion and the watchdog's heartbeat)."""
        model = os.path.join(self.work, "model.safetensors")
        subprocess.run([MAKE_MODEL, model], check=True)
        node = self.start_node({"triage.model": model, "triage.quiet_seconds": 1,
                                "triage.min_slices": 5, "store.retention_days": 1})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=41, count=6)
        files = [f for u in sorted(studies) for f in studies[u]]
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = dict(node.query("SELECT study_uid, status FROM studies"))
            if len(states) == 6 and all(s == "triaged" for s in states.values()):
                break
            time.sleep(0.2)
        self.assertEqual(sorted(states.values()), ["triaged"] * 6, states)
        self.assertEqual(node.stop(), 0)
        old = int(time.time() * 1000) - 3 * DAY
        con = sqlite3.connect(node.db_path)
        with con:
            con.execute("UPDATE studies SET updated_at = ?, received_at = ?", (old, old))
        con.close()
        node.start()
        self.assertTrue(node.wait_event("study_purged", timeout=30, count=6, since_start=True),
                        node.log_tail())
        at = [l.split()[0] for l in node.events("study_purged", since_start=True)]
        # the log's ts=...Z times: batches are a second apart
        import datetime
        t = [datetime.datetime.strptime(x[3:], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() for x in at]
        gaps = [b - a for a, b in zip(t, t[1:])]
        self.assertTrue(any(g >= 0.5 for g in gaps[:4]) and all(g < 0.5 for g in gaps[:3]),
                        "purged in batches of 4: gaps %s" % gaps)
        self.assertEqual(node.query("SELECT count(*) FROM instances")[0][0], 0)
        self.assert_consistent_files(node)

    def assert_consistent_files(self, node):
        rows = node.query("SELECT file_path FROM instances")
        indexed = {os.path.normpath(r[0]) for r in rows}
        on_disk = {os.path.normpath(p) for p in node.spool_files()}
        self.assertEqual(indexed, on_disk)


if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
