#!/usr/bin/python3
"""Issue 10: faults of the machine under the node, each with a clear status
and message, the node staying up, and recovery once the fault is gone.

- The spool read-only, the node run as nobody (root ignores file modes):
  stores answer A700 with the reason logged, nothing half-stored; storing
  works again once the modes are back. Two places: the temp folder (the
  file cannot even be created) and a series folder (the temp file is written
  but cannot be moved into place).
- The database locked by another process (BEGIN EXCLUSIVE held): a store
  answers A700 after the busy timeout, nothing of it is left in the spool;
  once the lock goes, the same instance is stored.
- In each of those store faults, admins see it while it lasts: /healthz
  (and so the page's banner) says "stores failing" with the kind and the
  reason, /metrics counts the refusals by reason and sets
  ichtriage_stores_failing, and `ichtriage status` lists the problem; the
  state stays while the fault lasts, even with no store coming, and clears
  by itself once stores succeed again (store.failure_window_seconds later).
- A corrupted model file at start (garbage, truncated) and at reload
  (SIGHUP): /healthz says degraded with the loader's reason, the node keeps
  receiving; at start the series waits, and is triaged once a good file is
  in place and SIGHUP reloads; at reload the old model is kept and used.

The full spool is tests/integration/test_diskfull.py (issue 2).

    test_faults.py /path/to/ichtriage /path/to/make_test_model"""
import http.client
import json
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

MAKE_MODEL = None


class NobodyNode(dt.Node):
    """The node as nobody (setpriv), so that file modes apply to it."""

    def __init__(self, uid, gid, *args, **kw):
        super().__init__(*args, **kw)
        self.uid, self.gid = uid, gid

    def argv(self):
        return ["setpriv", "--reuid=%d" % self.uid, "--regid=%d" % self.gid,
                "--clear-groups", "--"] + super().argv()


def healthz(node):
    with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port, timeout=10) as r:
        return json.loads(r.read())


def metrics(node):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % node.http_port, timeout=10) as r:
        text = r.read().decode()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1])
            for l in text.splitlines() if l and not l.startswith("#")}


WINDOW = 2  # store.failure_window_seconds of these nodes


class Events:
    """The page's event stream (/api/events): each worklist event carries the
    degraded list the banner shows."""

    def __init__(self, node):
        self.conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=15)
        self.conn.request("GET", "/api/events")
        self.resp = self.conn.getresponse()

    def wait_degraded(self, pred, timeout=15):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.resp.readline().decode()
            if line.startswith("data: "):
                seen = json.loads(line[6:]).get("degraded", [])
                if pred(seen):
                    return seen
        raise AssertionError("no event with the expected degraded list; last %r" % seen)

    def close(self):
        self.conn.close()


def failing_lines(node):
    return [d for d in healthz(node)["degraded"] if d.startswith("stores failing")]


class StoreHealth:
    """Checks of the "stores failing" state, mixed into the store faults."""

    def assert_stores_failing(self, node, why, reason_word, refused, status=True):
        """The node says stores fail (healthz, metrics; with status, also
        `ichtriage status`, which reads the database)."""
        if status:
            self.assert_status_says_failing(node)
        h = healthz(node)
        self.assertEqual(h["status"], "degraded", h)
        lines = failing_lines(node)
        self.assertEqual(len(lines), 1, h)
        self.assertIn(": %s: " % why, lines[0])
        self.assertIn(reason_word, lines[0])
        m = metrics(node)
        self.assertEqual(m["ichtriage_stores_failing"], 1, lines)
        self.assertEqual(m['ichtriage_instances_rejected_total{reason="%s"}' % why], refused)
        self.assertGreater(m["ichtriage_store_last_failure_timestamp_seconds"], time.time() - 600)
        # The fault lasts and nothing is sent: the state does not time out.
        time.sleep(WINDOW + 1)
        self.assertEqual(len(failing_lines(node)), 1, "cleared while the fault lasts")

    def assert_stores_recovered(self, node):
        deadline = time.monotonic() + WINDOW + 10
        while failing_lines(node) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual(failing_lines(node), [], "still failing after stores succeeded")
        self.assertEqual(metrics(node)["ichtriage_stores_failing"], 0)

    def assert_status_says_failing(self, node):
        st = self.status_json(node)
        self.assertTrue(st["stores"]["failing"], st)
        self.assertTrue(any(p.startswith("stores failing") for p in st["problems"]), st)

    def status_json(self, node):
        p = subprocess.run([itest.EXE, "status", "-c", "/dev/null", "--set",
                            "store.dir=" + node.store_dir, "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return json.loads(p.stdout)


class ReadOnlySpool(StoreHealth, itest.NodeTest):
    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            itest.skip_or_fail(self, "needs root to run the node as nobody")
        self.user = pwd.getpwnam("nobody")
        can = subprocess.run(["setpriv", "--reuid=%d" % self.user.pw_uid,
                              "--regid=%d" % self.user.pw_gid, "--clear-groups", "--",
                              "test", "-x", itest.EXE])
        if can.returncode != 0:
            itest.skip_or_fail(self, "nobody cannot run %s (a parent folder is not searchable)"
                               % itest.EXE)
        os.chmod(self.work, 0o711)
        nodedir = os.path.join(self.work, "node")
        os.makedirs(nodedir)
        os.chown(nodedir, self.user.pw_uid, self.user.pw_gid)
        node = NobodyNode(self.user.pw_uid, self.user.pw_gid, itest.EXE, nodedir,
                          {"store.failure_window_seconds": WINDOW})
        self.nodes.append(node)
        self.node = node.start()
        self.restore = []

    def tearDown(self):
        for path, mode in self.restore:
            os.chmod(path, mode)
        super().tearDown()

    def read_only(self, path):
        self.restore.append((path, os.stat(path).st_mode & 0o7777))
        os.chmod(path, 0o500)

    def send(self, files):
        return dt.storescu(self.node.port, files, workdir=self.work)

    def expect_refused(self, files, reason_word):
        r = self.send(files)
        self.assertEqual(set(r.statuses.values()), {0xA700},
                         "statuses %s; storescu:\n%s" % (r.statuses, r.output[-2000:]))
        failed = [l for l in self.node.events("store_failed") if reason_word in l]
        self.assertTrue(failed, "no store_failed line naming %r; log:\n%s"
                        % (reason_word, self.node.log_tail()))
        for f in files:
            self.assert_not_stored(self.node, dt.sop_uids(f)[1])
        self.assertTrue(self.node.alive())

    def recover(self, files):
        for path, mode in self.restore:
            os.chmod(path, mode)
        self.restore = []
        r = self.send(files)
        self.assert_all_success(r, files)
        self.assert_stored_exactly(self.node, files)
        self.assert_consistent(self.node)

    def test_temp_folder_read_only(self):
        files = self.gen("a", count=3, rows=32, cols=32)
        events = Events(self.node)
        self.addCleanup(events.close)
        events.wait_degraded(lambda d: not any(x.startswith("stores failing") for x in d))
        self.read_only(os.path.join(self.node.spool, ".tmp"))
        self.expect_refused(files, "Permission denied")
        # The page hears it without any worklist row changing.
        events.wait_degraded(lambda d: any(x.startswith("stores failing") for x in d))
        self.assert_stores_failing(self.node, "permission", "cannot create temp file", len(files))
        self.recover(files)
        self.assert_stores_recovered(self.node)
        events.wait_degraded(lambda d: not any(x.startswith("stores failing") for x in d))
        st = self.status_json(self.node)
        self.assertFalse(st["stores"]["failing"], st)
        self.assertFalse(any(p.startswith("stores failing") for p in st["problems"]), st)

    def test_series_folder_read_only(self):
        first = self.gen("s", count=4, rows=32, cols=32)
        r = self.send(first[:1])
        self.assert_all_success(r, first[:1])
        series_dir = os.path.dirname(os.path.join(
            self.node.store_dir, self.node.instances()[dt.sop_uids(first[0])[1]]["file_path"]))
        self.read_only(series_dir)
        self.expect_refused(first[1:], "Permission denied")
        self.assert_stores_failing(self.node, "permission", "cannot move into spool",
                                   len(first) - 1)
        self.recover(first[1:])
        self.assert_stored_exactly(self.node, first)
        self.assert_stores_recovered(self.node)


class LockedDatabase(StoreHealth, itest.NodeTest):
    def test_exclusive_lock_held_by_another_process(self):
        node = self.start_node({"store.failure_window_seconds": WINDOW})
        files = self.gen("a", count=2, rows=32, cols=32)
        r = dt.storescu(node.port, files[:1], workdir=self.work)
        self.assert_all_success(r, files[:1])
        # Another process takes the database (as the sqlite3 shell would).
        with itest.database_locked(node.db_path):
            t0 = time.monotonic()
            r = dt.storescu(node.port, files[1:], workdir=self.work, timeout=120)
            took = time.monotonic() - t0
            self.assertEqual(list(r.statuses.values()), [0xA700],
                             "while locked: %s\n%s" % (r.statuses, r.output[-2000:]))
            self.assertLess(took, 60, "the store waited %.0f s on the lock" % took)
            self.assertTrue(any("busy" in l or "locked" in l for l in node.events("store_failed")),
                            "store_failed does not say the database is busy:\n" + node.log_tail())
            self.assertTrue(node.alive())
            rc, out = dt.echoscu(node.port)
            self.assertEqual(rc, 0, out)
            # (`ichtriage status` reads the database: after the lock, below)
            self.assert_stores_failing(node, "database", "locked", 1, status=False)
        self.assert_status_says_failing(node)
        # The refused instance left nothing; once the lock is gone it is stored.
        self.assert_not_stored(node, dt.sop_uids(files[1])[1])
        self.assert_consistent(node)
        r = dt.storescu(node.port, files[1:], workdir=self.work)
        self.assert_all_success(r, files[1:])
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
        self.assert_stores_recovered(node)
        sys.stderr.write("store refused after %.1f s of lock\n" % took)


class CorruptModel(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.good = os.path.join(self.work, "good.safetensors")
        subprocess.run([MAKE_MODEL, self.good], check=True)
        self.model = os.path.join(self.work, "model.safetensors")

    def node(self):
        return self.start_node({"triage.model": self.model, "triage.quiet_seconds": 1,
                                "triage.min_slices": 5})

    def phantom(self, seed):
        out = os.path.join(self.work, "ph%d" % seed)
        subprocess.run([itest.EXE, "phantom", "--seed", str(seed), "-n", "1", "--size", "64",
                        "--slices", "8", out], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        d = os.path.join(out, "stage_2_train")
        files = sorted(os.path.join(d, f) for f in os.listdir(d))
        return dt.sop_uids(files[0])[2], files

    def study_status(self, node, study):
        rows = node.query("SELECT status FROM studies WHERE study_uid = ?", (study,))
        return rows[0][0] if rows else None

    def wait_study(self, node, study, status, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.study_status(node, study) == status:
                return
            time.sleep(0.2)
        self.fail("study %s is %s, not %s, after %d s; log:\n%s"
                  % (study, self.study_status(node, study), status, timeout, node.log_tail()))

    def corrupt(self, how):
        with open(self.good, "rb") as f:
            data = f.read()
        if how == "garbage":
            data = os.urandom(4096)
        elif how == "truncated":
            data = data[:len(data) // 2]
        elif how == "header":
            data = data[:8] + b"{\"x\": [" + data[15:]
        tmp = self.model + ".new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.model)

    def install_good(self):
        with open(self.good, "rb") as f:
            data = f.read()
        tmp = self.model + ".new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.model)

    def assert_degraded_by_model(self, node):
        h = healthz(node)
        self.assertEqual(h["status"], "degraded", h)
        self.assertTrue(any("model not loaded" in d for d in h["degraded"]), h)

    def test_corrupt_at_start_then_fixed_and_reloaded(self):
        # Each round starts a node on the same work dir and log: its events
        # are read from its own start (those of the rounds before had
        # answered the waits at once), and a failed round stops its node
        # (the next rounds had failed on "another node runs").
        for how in ("garbage", "truncated", "header"):
            with self.subTest(how=how):
                self.corrupt(how)
                node = self.node()
                try:
                    self.assertTrue(node.wait_event("model_not_loaded", since_start=True),
                                    node.log_tail())
                    line = node.events("model_not_loaded", since_start=True)[-1]
                    self.assertIn("error=", line)
                    self.assertFalse(node.events("model_loaded", since_start=True))
                    self.assert_degraded_by_model(node)
                    study, files = self.phantom(seed=len(how))
                    r = dt.storescu(node.port, files, workdir=self.work)
                    self.assert_all_success(r, files)
                    self.wait_study(node, study, "waiting")
                    self.install_good()
                    node.proc.send_signal(signal.SIGHUP)
                    self.assertTrue(node.wait_event("model_loaded", since_start=True),
                                    node.log_tail())
                    self.wait_study(node, study, "triaged")
                    self.assertEqual(healthz(node)["status"], "ok")
                finally:
                    self.assertEqual(node.stop(), 0)
                    self.nodes.remove(node)

    def test_corrupt_at_reload_keeps_the_old_model(self):
        self.install_good()
        node = self.node()
        self.assertTrue(node.wait_event("model_loaded"))
        for n, how in enumerate(("truncated", "garbage")):
            self.corrupt(how)
            node.proc.send_signal(signal.SIGHUP)
            self.assertTrue(node.wait_event("model_reload_refused", count=n + 1), node.log_tail())
            self.assertIn("kept=old", node.events("model_reload_refused")[-1])
            self.assertEqual(healthz(node)["status"], "ok", "old model kept, yet degraded")
            study, files = self.phantom(seed=10 + n)
            r = dt.storescu(node.port, files, workdir=self.work)
            self.assert_all_success(r, files)
            self.wait_study(node, study, "triaged")
        self.assertTrue(node.alive())


if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
