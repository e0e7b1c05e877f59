"""Triage flow through the real node (issue 6): phantom studies sent with
storescu become worklist rows; completion by quiet period and by expected
count; a restart in the middle of a series; a late instance after triage; an
MR series and a localizer in the same study; an undecodable slice; two studies
interleaved on parallel associations; the same content never triaged twice;
a missing model keeps the node receiving.

The model here has random weights (tests/triage/make_test_model.c): these
tests check the plumbing and the order rules, not what a model has learnt.

    python3 test_triage.py ICHTRIAGE MAKE_TEST_MODEL"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

MAKE_MODEL = None
QUIET = 1


def phantom(exe, out, seed, slices=12, size=128, count=1, extra=()):
    """`ichtriage phantom` studies; returns {study_uid: [files in slice order]}."""
    subprocess.run([exe, "phantom", "--seed", str(seed), "-n", str(count), "--size", str(size),
                    "--slices", str(slices)] + list(extra) + [out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import pydicom
    studies = {}
    for f in glob.glob(os.path.join(out, "stage_2_train", "*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        studies.setdefault(ds.StudyInstanceUID, []).append((int(ds.InstanceNumber), f))
    return {k: [f for _, f in sorted(v)] for k, v in studies.items()}


def another_series(files, out, pixels=None, number=3, description=None):
    """The slices of files as another series of the same study (new series
    and SOP instance UIDs, series number number, None for none, and
    description when given), each one's pixel array passed through pixels()
    when given; written to out/sNN.dcm. (series uid, files)."""
    import pydicom
    from pydicom.uid import generate_uid
    os.makedirs(out, exist_ok=True)
    series, made = generate_uid(), []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if number is None:
            del ds.SeriesNumber
        else:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        if pixels:
            ds.PixelData = pixels(ds.pixel_array).tobytes()
        made.append(os.path.join(out, "s%02d.dcm" % i))
        ds.save_as(made[-1])
    return series, made


class TriageTest(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.model = os.path.join(self.work, "model.safetensors")
        subprocess.run([MAKE_MODEL, self.model], check=True)

    def node(self, env=None, **extra):
        settings = {"triage.model": self.model, "triage.quiet_seconds": QUIET,
                    "triage.min_slices": 5}
        settings.update(extra)
        return self.start_node(settings, env=env)

    def send(self, node, files, **kw):
        r = dt.storescu(node.port, files, workdir=self.work, **kw)
        self.assert_all_success(r, files)
        return r

    def worklist(self, node, status=None):
        argv = [itest.EXE, "worklist", "-c", "/dev/null", "--set", "store.dir=" + node.store_dir,
                "--json"] + (["--status", status] if status else [])
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        return json.loads(p.stdout)

    def wait_status(self, node, study, statuses, timeout=30):
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            rows = [r for r in self.worklist(node) if r["study_uid"] == study]
            row = rows[0] if rows else None
            if row and row["status"] in statuses:
                return row
            time.sleep(0.2)
        self.fail("study %s not %s after %ss: %r\n%s" % (study, statuses, timeout, row,
                                                         node.log_tail()))

    def jobs(self, node, study):
        return node.query("SELECT j.state, j.content_key FROM jobs j JOIN series s"
                          " ON s.id = j.series_ref JOIN studies st ON st.id = s.study_ref"
                          " WHERE st.study_uid = ?", (study,))

    # ------------------------------------------------------------------
    def test_studies_triaged_and_ordered(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=11, count=3)
        files = [f for fs in studies.values() for f in fs]
        t0 = time.monotonic()
        self.send(node, files)
        rows = [self.wait_status(node, s, ("triaged",)) for s in studies]
        self.assertLess(time.monotonic() - t0, QUIET + 20)
        for row in rows:
            self.assertEqual(row["slices"], 12)
            self.assertEqual(row["model_version"], "test-random-weights")
            self.assertIsNotNone(row["probability"])
            self.assertEqual(set(row["subtypes"]), {"epidural", "intraparenchymal",
                                                    "intraventricular", "subarachnoid",
                                                    "subdural"})
        listed = self.worklist(node)
        probs = [r["probability"] for r in listed]
        # Group 3 (triaged, not flagged) is by probability, highest first.
        self.assertEqual(probs, sorted(probs, reverse=True), listed)
        # Per-slice results are stored in the order along the normal.
        n = node.query("SELECT count(*) FROM slice_results")[0][0]
        self.assertEqual(n, 36)
        # Flag threshold from the model: with threshold 0.01 everything is flagged
        # and still ordered by probability.
        low = os.path.join(self.work, "low.safetensors")
        subprocess.run([MAKE_MODEL, low, "b8,M,b16,M,b16,M,b16,G|", "1", "0.01"], check=True)
        node2 = self.start_node({"triage.model": low, "triage.quiet_seconds": QUIET,
                                 "triage.min_slices": 5}, name="node2")
        self.send(node2, files)
        for s in studies:
            row = self.wait_status(node2, s, ("triaged",))
            self.assertTrue(row["flagged"])

    def test_expected_count_completes_at_once(self):
        # With Images in Acquisition known and reached, no quiet period is needed.
        node = self.node(**{"triage.quiet_seconds": 60})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=12)
        (study, files), = studies.items()
        import pydicom
        for f in files:
            ds = pydicom.dcmread(f)
            ds.ImagesInAcquisition = len(files)
            ds.save_as(f)
        self.send(node, files)
        self.wait_status(node, study, ("triaged",), timeout=20)

    def test_more_instances_than_expected_triaged_once(self):
        # Images in Acquisition 4 on a 12-slice series (several acquisitions
        # in one series), one association per file: past the expected count
        # the quiet period completes it, not every further instance.
        quiet = 6  # longer than any gap between two storescu runs here
        node = self.node(**{"triage.quiet_seconds": quiet})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=12)
        (study, files), = studies.items()
        import pydicom
        for f in files:
            ds = pydicom.dcmread(f)
            ds.ImagesInAcquisition = 4
            ds.save_as(f)
        for f in files:
            self.send(node, [f])
        deadline = time.monotonic() + quiet + 30
        row = None
        while time.monotonic() < deadline:
            row = self.wait_status(node, study, ("triaged", "received", "waiting", "triaging",
                                                 "not_applicable"))
            if row["status"] == "triaged" and row["slices"] == len(files):
                break
            time.sleep(0.3)
        self.assertEqual((row["status"], row["slices"]), ("triaged", len(files)), row)
        time.sleep(1)
        ran = [k for state, k in self.jobs(node, study) if state != "superseded"]
        self.assertEqual(ran, ["%d-" % len(files) + ran[-1].split("-")[1]], ran)
        self.assertEqual(len(node.events("series_triaged")), 1)

    def test_second_acquisition_with_a_larger_count_completes_once(self):
        # One series of two acquisitions, Images in Acquisition 6 and then
        # 10, one association per file: past the first count only the quiet
        # period completes it. The count passed through 10 (the raised
        # expected count) with 4 slices missing: it was completed there and
        # triaged (a job at 6, 10 and 16 instances). The first acquisition
        # alone looks complete and is decided at once (nothing says more is
        # coming); min_slices 7 makes that decision "not applicable", not a
        # job.
        quiet = 6  # longer than any gap between two storescu runs here
        node = self.node(**{"triage.quiet_seconds": quiet, "triage.min_slices": 7})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=22, slices=16)
        (study, files), = studies.items()
        import pydicom
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.AcquisitionNumber = 1 if i < 6 else 2
            ds.ImagesInAcquisition = 6 if i < 6 else 10
            ds.save_as(f)
        for f in files:
            self.send(node, [f])
            time.sleep(0.3)
        last = time.monotonic()
        self.assertTrue(node.wait_event("series_complete", timeout=quiet + 30, count=2),
                        node.log_tail())
        waited = time.monotonic() - last
        row = self.wait_status(node, study, ("triaged",), timeout=60)
        self.assertEqual(row["slices"], len(files), row)
        time.sleep(1)
        done = [re.search(r" instances=(\d+) state=(\w+)", l).groups()
                for l in node.events("series_complete")]
        self.assertEqual(done, [("6", "not_applicable"), ("16", "waiting")], done)
        self.assertGreater(waited, quiet - 1, "completed before the quiet period")
        jobs = self.jobs(node, study)
        self.assertEqual([(state, k.split("-")[0]) for state, k in jobs], [("done", "16")], jobs)

    def test_restart_in_the_middle_of_a_series(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=13)
        (study, files), = studies.items()
        self.send(node, files[:6])
        self.assertEqual(node.stop(), 0)
        # Restarted after the quiet period: the half series is complete and
        # triaged from the state in SQLite, then the rest re-opens it.
        node.start()
        self.wait_status(node, study, ("triaged", "not_applicable"))
        self.send(node, files[6:])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = self.wait_status(node, study, ("triaged",))
            if row["slices"] == 12:
                break
            time.sleep(0.3)
        self.assertEqual(row["slices"], 12, row)

    def test_late_instance_retriages_and_shows_the_change(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=14)
        (study, files), = studies.items()
        self.send(node, files[:-1])
        first = self.wait_status(node, study, ("triaged",))
        self.assertEqual(first["slices"], 11)
        self.assertEqual(first["result_updates"], 0)
        self.send(node, files[-1:])
        deadline = time.monotonic() + 30
        row = first
        while time.monotonic() < deadline and row["result_updates"] == 0:
            time.sleep(0.2)
            row = self.wait_status(node, study, ("triaged", "received", "waiting", "triaging"))
        row = self.wait_status(node, study, ("triaged",))
        self.assertEqual(row["slices"], 12)
        self.assertEqual(row["result_updates"], 1)
        self.assertEqual(len(self.jobs(node, study)), 2)

    def review(self, node, study):
        """POST .../review as a radiologist does (CSRF token of the session,
        having looked at the study: the review names the latest review and
        the result it saw)."""
        import urllib.request
        base = "http://127.0.0.1:%d" % node.http_port
        with urllib.request.urlopen(base + "/api/session", timeout=10) as r:
            csrf = json.load(r)["csrf"]
        with urllib.request.urlopen("%s/api/studies/%s" % (base, study), timeout=10) as r:
            st = json.load(r)
        req = urllib.request.Request(
            "%s/api/studies/%s/review" % (base, study), method="POST",
            data=json.dumps({"hemorrhage": False, "subtypes": [], "comment": "",
                             "seen_review": st["review_id"],
                             "seen_result": st["result_version"]}).encode(),
            headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.assertEqual(r.status, 201)

    def test_retriage_after_review_returns_to_the_worklist(self):
        # Reviewed, then late instances: the new result is on images nobody
        # reviewed, so the study is back on the worklist (flagged: first).
        low = os.path.join(self.work, "low.safetensors")
        subprocess.run([MAKE_MODEL, low, "b8,M,b16,M,b16,M,b16,G|", "1", "0.01"], check=True)
        node = self.node(**{"triage.model": low})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=14)
        (study, files), = studies.items()
        self.send(node, files[:-1])
        self.wait_status(node, study, ("triaged",))
        self.review(node, study)
        self.assertNotIn(study, [r["study_uid"] for r in self.worklist(node)])
        self.assertEqual([r["study_uid"] for r in self.worklist(node, "reviewed")], [study])
        self.send(node, files[-1:])
        deadline = time.monotonic() + QUIET + 30
        rows = []
        while time.monotonic() < deadline:
            rows = [r for r in self.worklist(node) if r["study_uid"] == study]
            if rows and rows[0]["slices"] == len(files) and rows[0]["status"] == "triaged":
                break
            time.sleep(0.3)
        self.assertTrue(rows, "re-triaged after review, not on the worklist: %r"
                        % self.worklist(node, "reviewed"))
        row = rows[0]
        self.assertEqual((row["status"], row["slices"], row["flagged"], row["result_updates"]),
                         ("triaged", len(files), True, 1), row)
        self.assertEqual(self.worklist(node)[0]["study_uid"], study)
        # The earlier review is kept.
        self.assertEqual(node.query("SELECT count(*) FROM reviews")[0][0], 1)
        # Resent unchanged after a new review: same content, stays reviewed.
        self.review(node, study)
        self.send(node, files[-1:])
        self.assertTrue(node.wait_event("series_complete", timeout=QUIET + 10, count=3))
        self.assertNotIn(study, [r["study_uid"] for r in self.worklist(node)])

    def _lock_while_the_model_runs(self, seed, until, env=None):
        """A VGG19 node (seconds per series: time to take the lock meanwhile;
        env added to its environment) triages one study while another writer
        holds the index, until until(node) is true; then the lock goes.
        Returns node, study, files."""
        import sqlite3
        slow = os.path.join(self.work, "vgg19.safetensors")
        subprocess.run([MAKE_MODEL, slow, "vgg19"], check=True, stdout=subprocess.DEVNULL)
        node = self.node(env=env, **{"triage.model": slow})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=seed, slices=24)
        (study, files), = studies.items()
        self.send(node, files)
        self.assertTrue(node.wait_event("job_started", timeout=QUIET + 20))
        con = sqlite3.connect(node.db_path, timeout=10, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        try:
            until(node)
        finally:
            con.execute("ROLLBACK")
            con.close()
        return node, study, files

    def test_result_kept_when_the_database_is_busy_at_the_end(self):
        # Another writer holds the index past the busy timeout (10 s) while
        # the model runs: storing the result fails once, and is retried
        # rather than dropped (the series failed with "database is locked").
        def first_end(node):
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not (node.events("job_finish_retry")
                                                      or node.events("series_failed")):
                time.sleep(0.05)
        node, study, files = self._lock_while_the_model_runs(17, first_end)
        self.assertTrue(node.events("job_finish_retry"), node.log_tail())
        row = self.wait_status(node, study, ("triaged", "failed"), timeout=60)
        self.assertEqual((row["status"], row["slices"]), ("triaged", len(files)), row)
        self.assertEqual([j[0] for j in self.jobs(node, study)], ["done"])

    def test_result_retried_on_time_after_a_wall_clock_step(self):
        # The inference thread's waits (the back-off between tries of a
        # job's end, the 1 s look for work no kick announced) ran until a
        # wall-clock time: a clock stepped back by N seconds while one ran
        # stretched it by N. The shim keeps the node's wall clock 60 s
        # ahead of the kernel's, against which such a wait ends: the same.
        shim = os.environ.get("ICHTRIAGE_TEST_CLOCKSTEP")
        if not shim:
            itest.skip_or_fail(self, "no clockstep shim (run through meson test)")
        step = os.path.join(self.work, "clockstep")
        with open(step, "w") as f:
            f.write("60")

        def first_end(node):
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not (node.events("job_finish_retry")
                                                      or node.events("series_failed")):
                time.sleep(0.05)
        node, study, files = self._lock_while_the_model_runs(
            19, first_end, env={"LD_PRELOAD": shim, "ICHTRIAGE_CLOCKSTEP_FILE": step})
        self.assertTrue(node.events("job_finish_retry"), node.log_tail())
        # Retried 1 s after the failed try: well within 15 s of the lock
        # going, where a wall-clock wait took 61 s.
        row = self.wait_status(node, study, ("triaged", "failed"), timeout=15)
        self.assertEqual((row["status"], row["slices"]), ("triaged", len(files)),
                         "%r\n%s" % (row, node.log_tail()))

    def test_result_not_lost_when_the_database_refuses_it_longer_than_the_retries(self):
        # The lock is held past every retry of the job's end (about 45 s of
        # busy timeouts and back-off): the job is queued again, runs again
        # once the lock goes, and the series is triaged; before, it stayed
        # "triaging" until the node was restarted.
        def retries_spent(node):
            self.assertTrue(node.wait_event("job_unfinished", timeout=120), node.log_tail())
        node, study, files = self._lock_while_the_model_runs(18, retries_spent)
        self.assertTrue(node.wait_event("jobs_requeued", timeout=30), node.log_tail())
        row = self.wait_status(node, study, ("triaged", "failed"), timeout=60)
        self.assertEqual((row["status"], row["slices"]), ("triaged", len(files)), row)
        self.assertEqual([j[0] for j in self.jobs(node, study)], ["done"])

    def _slow_node_and_other_copy(self, seed):
        """A VGG19 node (seconds per series) and a 40-slice study, with
        another copy of its slice 20 (pixels inverted). Returns node, study,
        files, the copy's path."""
        import pydicom
        slow = os.path.join(self.work, "vgg19.safetensors")
        subprocess.run([MAKE_MODEL, slow, "vgg19"], check=True, stdout=subprocess.DEVNULL)
        node = self.node(**{"triage.model": slow})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=seed, slices=40)
        (study, files), = studies.items()
        other = os.path.join(self.work, "other.dcm")
        ds = pydicom.dcmread(files[20])
        arr = ds.pixel_array
        ds.PixelData = (arr.max() - arr).astype(arr.dtype).tobytes()
        ds.save_as(other)
        return node, study, files, other

    def test_copy_replaced_and_restored_during_the_run_is_triaged_again(self):
        # While the model reads the series, a slice is replaced by other
        # pixels (B) and then by its first bytes again (A). The content is
        # A's again, but a model that read the files later could have read
        # B: its result must not pass for A's. It was kept as A's result
        # (one job); now the series is triaged again.
        node, study, files, other = self._slow_node_and_other_copy(19)
        self.send(node, files)
        # The copies come once the model has read every file (before, the
        # job could fail on the replaced file, which hides the race).
        self.assertTrue(node.wait_event("series_pixels_read", timeout=QUIET + 20))
        self.send(node, [other])
        self.send(node, [files[20]])
        self.assertFalse(node.events("series_triaged"),
                         "the job ended before the copies came: the test saw no race")
        deadline = time.monotonic() + QUIET + 120
        while time.monotonic() < deadline and len(node.events("series_triaged")) < 2:
            time.sleep(0.2)
        row = self.wait_status(node, study, ("triaged",), timeout=30)
        self.assertEqual(row["slices"], len(files), row)
        states = [j[0] for j in self.jobs(node, study)]
        self.assertEqual(states.count("done"), 2, states)
        (keys,) = node.query("SELECT s.content_key, r.content_key FROM series s"
                             " JOIN results r ON r.series_ref = s.id")
        self.assertEqual(keys[0], keys[1])

    def test_copy_replaced_and_restored_during_a_retriage_is_triaged_again(self):
        # The same with an earlier result: content A triaged, then a slice
        # replaced by other pixels (B) and, while B's job runs, restored (A).
        # A's result was there, so A was decided "triaged" at once; then
        # B's job stored its result (under no content key) over A's, and the
        # series stayed triaged: B's probabilities as A's result, two jobs.
        # Now a result that is not the series' content sends it back to be
        # decided, and A is triaged again.
        node, study, files, other = self._slow_node_and_other_copy(23)
        self.send(node, files)
        self.assertTrue(node.wait_event("series_triaged", timeout=QUIET + 120), node.log_tail())
        self.send(node, [other])
        self.assertTrue(node.wait_event("series_pixels_read", timeout=QUIET + 20, count=2))
        self.send(node, [files[20]])
        self.assertTrue(node.wait_event("series_complete", timeout=QUIET + 20, count=3))
        self.assertEqual(len(node.events("series_triaged")), 1,
                         "B's job ended before A was decided: the test saw no race")
        self.assertIn("state=triaged", node.events("series_complete")[2])
        deadline = time.monotonic() + QUIET + 120
        while time.monotonic() < deadline and len(node.events("series_triaged")) < 3:
            time.sleep(0.2)
        time.sleep(1)
        row = self.wait_status(node, study, ("triaged",), timeout=30)
        self.assertEqual(row["slices"], len(files), row)
        states = [j[0] for j in self.jobs(node, study)]
        self.assertEqual(states, ["done"] * 3, states)
        (keys,) = node.query("SELECT s.content_key, r.content_key FROM series s"
                             " JOIN results r ON r.series_ref = s.id")
        self.assertEqual(keys[0], keys[1])
        self.assertEqual(keys[0], self.jobs(node, study)[0][1])

    def test_job_running_at_three_stops_fails_its_series(self):
        # A job during which the node dies (here kill -9; in a hospital a
        # crash or the OOM killer, perhaps the job's own doing) is queued
        # again at the next start and claimed first. Three times: it fails
        # with its series, instead of bringing the node down after every
        # restart. It ran a fourth time and the series was triaged.
        slow = os.path.join(self.work, "vgg19.safetensors")
        subprocess.run([MAKE_MODEL, slow, "vgg19"], check=True, stdout=subprocess.DEVNULL)
        node = self.node(**{"triage.model": slow})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=24, slices=24)
        (study, files), = studies.items()
        self.send(node, files)
        for stop in (1, 2, 3):
            self.assertTrue(node.wait_event("job_started", timeout=QUIET + 30, count=stop),
                            node.log_tail())
            self.assertFalse(node.events("series_triaged"), "the job ended before the kill")
            node.kill9()
            node.start()
        row = self.wait_status(node, study, ("failed", "triaged"), timeout=60)
        self.assertEqual(row["status"], "failed", row)
        self.assertIn("stopped 3 times", row["status_reason"])
        self.assertTrue(node.events("jobs_failed_after_stops"), node.log_tail())
        time.sleep(1)
        self.assertEqual(len(node.events("job_started")), 3)
        self.assertEqual([j[0] for j in self.jobs(node, study)], ["failed"])

    def test_same_content_is_not_triaged_twice(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=15)
        (study, files), = studies.items()
        self.send(node, files)
        self.wait_status(node, study, ("triaged",))
        self.send(node, files)  # identical resend: re-opens, same content
        self.assertTrue(node.wait_event("series_complete", timeout=QUIET + 10, count=2))
        row = self.wait_status(node, study, ("triaged",))
        self.assertEqual(len(self.jobs(node, study)), 1, "same content triaged twice")
        self.assertEqual(row["result_updates"], 0)

    def test_mr_series_and_localizer(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=16)
        (study, files), = studies.items()
        import pydicom
        from pydicom.uid import generate_uid
        # A localizer in the CT series: same series, sagittal, LOCALIZER.
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        loc = os.path.join(self.work, "localizer.dcm")
        ds.save_as(loc)
        # An MR series in the same study.
        mr = self.gen("mr", count=6, rows=64, cols=64, sop="mr", study_uid=study)
        self.send(node, files + [loc])
        self.send(node, mr)
        row = self.wait_status(node, study, ("triaged",))
        self.assertEqual(row["slices"], 12, "the localizer was not dropped")
        states = dict(node.query("SELECT s.modality, s.state FROM series s JOIN studies st"
                                 " ON st.id = s.study_ref WHERE st.study_uid = ?", (study,)))
        self.assertEqual(states.get("MR"), "not_applicable", states)
        reason = node.query("SELECT state_reason FROM series WHERE modality = 'MR'")[0][0]
        self.assertIn("not CT", reason)

    def test_undecodable_slice_fails_that_series_only(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=17, count=2)
        (bad_study, bad), (good_study, good) = sorted(studies.items())
        import pydicom
        ds = pydicom.dcmread(bad[3])
        ds.PixelData = ds.PixelData[:100]  # far too short for its rows x columns
        ds.save_as(bad[3])
        self.send(node, bad + good)
        row = self.wait_status(node, bad_study, ("failed",))
        # The series, the file's spool path once, then what is wrong (it
        # came twice).
        reason = row["status_reason"]
        self.assertRegex(reason, r"^%s: /\S+/%s\.dcm: pixel data holds 50 values"
                         % (re.escape(ds.SeriesDescription), re.escape(ds.SOPInstanceUID)))
        self.assertEqual(reason.count(ds.SOPInstanceUID), 1, reason)
        self.wait_status(node, good_study, ("triaged",))
        self.assertTrue(node.events("series_failed"))
        # Failed is "not yet known": listed before triaged, unflagged studies.
        order = [r["study_uid"] for r in self.worklist(node)]
        self.assertLess(order.index(bad_study), order.index(good_study))
        self.assertTrue(node.alive())

    def test_slices_without_hu_or_too_small_fail_their_series(self):
        """Stored values are HU only through Rescale Slope and Intercept
        (Type 1 in CT Image Storage, per frame in Enhanced CT's functional
        groups): a series without them, or with slope 0, fails with the
        reason on the node and in predict; they had been taken as 1 and 0
        and a positive study without its intercept triaged at 0.030 instead
        of 0.992. So does a series of 1x1 images (triaged at 0.000)."""
        import pydicom
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=19, count=2)
        (no_icpt, a), (zero_slope, b) = sorted(studies.items())
        for f in a:
            ds = pydicom.dcmread(f)
            del ds.RescaleIntercept
            ds.save_as(f)
        ds = pydicom.dcmread(b[4])
        ds.RescaleSlope = "0"
        ds.save_as(b[4])
        tiny = self.gen("tiny", count=12, rows=1, cols=1)
        (enh,) = self.gen("enh", count=12, rows=64, cols=64, sop="enhanced-ct")
        ds = pydicom.dcmread(enh)
        del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0] \
            .RescaleIntercept
        ds.RescaleIntercept = "-1024"  # not where Enhanced CT keeps it
        ds.save_as(enh)
        uid = {f: str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
               for f in (tiny[0], enh)}
        self.send(node, a + b + tiny + [enh])
        want = {no_icpt: "no Rescale Intercept (0028,1052): stored values cannot be read as HU",
                zero_slope: "Rescale Slope 0",
                uid[tiny[0]]: "image size 1x1 out of range",
                uid[enh]: "no Rescale Intercept (0028,1052) in the Pixel Value Transformation"
                          " functional group of frame 1"}
        for study, reason in want.items():
            row = self.wait_status(node, study, ("failed", "triaged"))
            self.assertEqual(row["status"], "failed", row)
            self.assertIn(reason, row["status_reason"])
            self.assertIsNone(row["probability"])
        p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--set",
                            "triage.model=" + self.model, "--json", os.path.join(self.work, "ph")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = {r["study_uid"]: r for r in json.loads(p.stdout)}
        for study in (no_icpt, zero_slope):
            self.assertEqual(out[study]["status"], "failed", out[study])
            self.assertIn(want[study], out[study]["status_reason"])

    def test_two_studies_interleaved_on_parallel_associations(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=18, count=2)
        (a, fa), (b, fb) = sorted(studies.items())
        # Each association carries half of each study.
        halves = [fa[0::2] + fb[0::2], fa[1::2] + fb[1::2]]
        results = [None, None]

        def run(i):
            results[i] = dt.storescu(node.port, halves[i], workdir=self.work)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            self.assert_all_success(results[i], halves[i])
        for s in (a, b):
            row = self.wait_status(node, s, ("triaged",))
            self.assertEqual(row["slices"], 12)
            self.assertEqual(len(self.jobs(node, s)), 1)

    def test_enhanced_ct_frames_are_slices(self):
        node = self.node()
        files = self.gen("enh", count=12, rows=64, cols=64, sop="enhanced-ct")
        self.assertEqual(len(files), 1)
        import pydicom
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        self.send(node, files)
        row = self.wait_status(node, study, ("triaged",))
        self.assertEqual(row["slices"], 12)
        frames = node.query("SELECT frame FROM slice_results ORDER BY idx")
        # Frames were written bottom to top; ordered along the normal they stay so.
        self.assertEqual([f[0] for f in frames], list(range(12)))

    def test_enhanced_ct_with_too_few_frames_placed_fails(self):
        # 12 frames, 9 of them without a position: completion counts 12, but
        # only 3 are placed, fewer than triage.min_slices=5. The series fails
        # with the reason (the model had run on the 3).
        node = self.node()
        (path,) = self.gen("few", count=12, rows=64, cols=64, sop="enhanced-ct")
        import pydicom
        ds = pydicom.dcmread(path)
        study = ds.StudyInstanceUID
        for f in range(3, 12):
            del ds.PerFrameFunctionalGroupsSequence[f].PlanePositionSequence
        ds.save_as(path)
        self.send(node, [path])
        row = self.wait_status(node, study, ("failed", "triaged"))
        self.assertEqual(row["status"], "failed", row)
        self.assertIn("3 slices placed, fewer than triage.min_slices=5", row["status_reason"])

    def test_study_takes_the_highest_of_its_series(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=21)
        (study, files), = studies.items()
        # A second, "thin" series of the same study: the same slices under new UIDs
        # and flipped left-right, so the model gives it another probability.
        thin_uid, thin = another_series(files, os.path.join(self.work, "thin"),
                                        lambda a: a[:, ::-1].copy())
        self.send(node, files + thin)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            res = node.query("SELECT s.series_uid, r.p_any FROM results r JOIN series s"
                             " ON s.id = r.series_ref")
            if len(res) == 2:
                break
            time.sleep(0.2)
        self.assertEqual(len(res), 2)
        row = self.wait_status(node, study, ("triaged",))
        best = max(res, key=lambda r: r[1])
        self.assertAlmostEqual(row["probability"], best[1], places=6)
        self.assertEqual(row["series_uid"], best[0])

    def test_missing_slices_are_reported(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=22)
        (study, files), = studies.items()
        sent = files[:5] + files[7:]  # two slices missing in the middle
        self.send(node, sent)
        row = self.wait_status(node, study, ("triaged",))
        self.assertEqual(row["slices"], 10)
        note = node.query("SELECT note FROM results")[0][0]
        self.assertIn("missing", note)
        self.assertIn("missing", row["status_reason"])

    def test_series_of_the_most_slices_is_triaged(self):
        """1000 slices (TRIAGE_MAX_SLICES) and a model that crops the head:
        the pixel decoder child is sent the crop's 8 samples and then every
        slice. It had refused more than 1000 ("pixel decoder exited with
        status 5"), so 993-1000 slices always failed on the node."""
        crop = os.path.join(self.work, "crop.safetensors")
        subprocess.run([MAKE_MODEL, crop, "b8,M,b16,M,b16,M,b16,G|", "1", "0.5", "crop=head"],
                       check=True)
        node = self.node(**{"triage.model": crop})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=23, slices=1000,
                          size=64, extra=("--thickness", "0.5"))
        (study, files), = studies.items()
        self.send(node, files)
        row = self.wait_status(node, study, ("triaged", "failed"), timeout=120)
        self.assertEqual(row["status"], "triaged", row)
        self.assertEqual(row["slices"], 1000)

    def test_missing_model_keeps_receiving(self):
        node = self.node(**{"triage.model": os.path.join(self.work, "nope.safetensors")})
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=19)
        (study, files), = studies.items()
        self.send(node, files)
        self.assertTrue(node.wait_event("model_not_loaded"))
        row = self.wait_status(node, study, ("waiting",))
        self.assertIsNone(row["probability"])
        self.assertTrue(node.alive())

    def test_predict_matches_the_node(self):
        node = self.node()
        studies = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=20)
        (study, files), = studies.items()
        # Another object in the series (here a Secondary Capture, sorting
        # first, with the position and orientation of a slice) is left out by
        # both: it had decided "not applicable" for the series in predict,
        # and the node had taken it as a 13th slice (a duplicate position).
        import pydicom
        mixed = os.path.join(self.work, "mixed")
        shutil.copytree(os.path.join(self.work, "ph"), mixed)
        ds = pydicom.dcmread(files[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
        sc = os.path.join(mixed, "000.dcm")
        ds.save_as(sc)
        self.send(node, files + [sc])
        row = self.wait_status(node, study, ("triaged",))
        self.assertEqual(row["slices"], 12, row)
        self.assertIn("1 object(s) other than CT images left out", row["status_reason"])
        self.assertNotIn("duplicate", row["status_reason"])
        p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--set",
                            "triage.model=" + self.model, "--json",
                            os.path.join(self.work, "ph")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        out = json.loads(p.stdout)
        self.assertEqual(len(out), 1)
        self.assertEqual(out[0]["study_uid"], study)
        self.assertAlmostEqual(out[0]["probability"], row["probability"], places=5)
        self.assertEqual(len(out[0]["slice_probabilities"]), 12)
        p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--set",
                            "triage.model=" + self.model, "--json", mixed],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        out = json.loads(p.stdout)
        self.assertEqual([r["status"] for r in out], ["triaged"], out)
        self.assertAlmostEqual(out[0]["probability"], row["probability"], places=5)
        self.assertEqual(len(out[0]["slice_probabilities"]), 12)
        # The study's reason names the series it is about; predict's row is
        # that series.
        self.assertEqual("%s: %s" % (ds.SeriesDescription, out[0]["status_reason"]),
                         row["status_reason"])
        # A folder given as a symbolic link is walked where it points (it
        # gave an empty list before); a folder with no images says so.
        link = os.path.join(self.work, "link")
        os.symlink(os.path.join(self.work, "ph"), link)
        empty = os.path.join(self.work, "empty")
        os.mkdir(empty)
        for path, n in ((link, 1), (empty, 0)):
            p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--set",
                                "triage.model=" + self.model, "--json", path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
            self.assertEqual(len(json.loads(p.stdout)), n, path)
            self.assertEqual(b"no DICOM images found" in p.stderr, n == 0, p.stderr)
        bad = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--set",
                              "triage.model=/nonexistent.safetensors", files[0]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn(b"model", bad.stderr)

    def test_predict_reads_one_file_per_instance(self):
        """A folder given with a copy of it beside (here inside another
        folder given too): each SOP instance counts once, the first file in
        path order, as the node keeps one file per instance. The copies had
        been slices too (24 of 12, "12 slice(s) at a duplicate position")."""
        ph = os.path.join(self.work, "ph")
        phantom(itest.EXE, ph, seed=24)
        shutil.copytree(ph, os.path.join(self.work, "more", "copy"))
        cmd = [itest.EXE, "predict", "-c", "/dev/null", "--set", "triage.model=" + self.model,
               "--json"]
        once = json.loads(subprocess.run(cmd + [ph], stdout=subprocess.PIPE, check=True).stdout)
        p = subprocess.run(cmd + [ph, os.path.join(self.work, "more")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, check=True)
        twice = json.loads(p.stdout)
        self.assertEqual(len(twice), 1, twice)
        for key in ("slices", "status", "status_reason"):
            self.assertEqual(twice[0][key], once[0][key], key)
        self.assertEqual(twice[0]["slices"], 12)
        self.assertAlmostEqual(twice[0]["probability"], once[0]["probability"], places=6)
        self.assertIn(b"12 file(s) skipped (another file of the same SOP instance)", p.stderr)
        # the first in path order is read: .../more/copy/... sorts before .../ph/...
        self.assertRegex(p.stderr.decode(), r"ph/stage_2_train/\S+ is another file of the "
                         r"instance in \S+/more/copy/stage_2_train/")

    def test_predict_shows_its_progress(self):
        """Rows that go to a file or a pipe, and --json's, which prints at the
        end: the progress goes to stderr (every step here, through the
        environment; never the end), after that of reading the files'
        headers."""
        ph = os.path.join(self.work, "ph3")
        phantom(itest.EXE, ph, seed=21, count=3)
        cmd = [itest.EXE, "predict", "-c", "/dev/null", "--set", "triage.model=" + self.model]
        env = dict(os.environ, ICHTRIAGE_PROGRESS_EVERY_S="0")
        for mode in ([], ["--json"]):
            p = subprocess.run(cmd + mode + [ph], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, check=True)
            lines = [l for l in p.stderr.decode().splitlines() if "event=predict_progress" in l]
            self.assertEqual([re.search(r" done=(\d+) total=3 unit=series", l).group(1)
                              for l in lines], ["1", "2"], p.stderr)
            # before that, the headers of every file under the folder are read
            nfiles = sum(len(f) for _, _, f in os.walk(ph))
            lines = [l for l in p.stderr.decode().splitlines()
                     if "event=predict_read_progress" in l]
            self.assertEqual([re.search(r" done=(\d+) total=%d unit=files" % nfiles, l).group(1)
                              for l in lines], [str(k) for k in range(1, nfiles)], p.stderr)
            if mode:
                self.assertEqual(len(json.loads(p.stdout)), 3)
            else:
                self.assertIn(b"-- 3 series.", p.stdout)
        # by default a line a minute: none in a run this short
        p = subprocess.run(cmd + [ph], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        self.assertNotIn(b"_progress", p.stderr)


if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
