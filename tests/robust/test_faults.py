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
- A corrupted model file at start (garbage, truncated) and at reload
  (SIGHUP): /healthz says degraded with the loader's reason, the node keeps
  receiving; at start the series waits, and is triaged once a good file is
  in place and SIGHUP reloads; at reload the old model is kept and used.

The full spool is tests/integration/test_diskfull.py (issue 2).

    test_faults.py /path/to/ichtriage /path/to/make_test_model"""
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


class ReadOnlySpool(itest.NodeTest):
    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.skipTest("needs root to run the node as nobody")
        self.user = pwd.getpwnam("nobody")
        can = subprocess.run(["setpriv", "--reuid=%d" % self.user.pw_uid,
                              "--regid=%d" % self.user.pw_gid, "--clear-groups", "--",
                              "test", "-x", itest.EXE])
        if can.returncode != 0:
            self.skipTest("nobody cannot run %s (a parent folder is not searchable)" % itest.EXE)
        os.chmod(self.work, 0o711)
        nodedir = os.path.join(self.work, "node")
        os.makedirs(nodedir)
        os.chown(nodedir, self.user.pw_uid, self.user.pw_gid)
        node = NobodyNode(self.user.pw_uid, self.user.pw_gid, itest.EXE, nodedir)
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
        self.read_only(os.path.join(self.node.spool, ".tmp"))
        self.expect_refused(files, "Permission denied")
        self.recover(files)

    def test_series_folder_read_only(self):
        first = self.gen("s", count=4, rows=32, cols=32)
        r = self.send(first[:1])
        self.assert_all_success(r, first[:1])
        series_dir = os.path.dirname(os.path.join(
            self.node.store_dir, self.node.instances()[dt.sop_uids(first[0])[1]]["file_path"]))
        self.read_only(series_dir)
        self.expect_refused(first[1:], "Permission denied")
        self.recover(first[1:])
        self.assert_stored_exactly(self.node, first)


class LockedDatabase(itest.NodeTest):
    def test_exclusive_lock_held_by_another_process(self):
        node = self.start_node()
        files = self.gen("a", count=2, rows=32, cols=32)
        r = dt.storescu(node.port, files[:1], workdir=self.work)
        self.assert_all_success(r, files[:1])
        # Another process takes the database (as the sqlite3 shell would).
        holder = subprocess.Popen(
            ["/usr/bin/python3", "-c",
             "import sqlite3, sys\n"
             "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "c.execute('BEGIN EXCLUSIVE')\n"
             "print('locked', flush=True)\n"
             "sys.stdin.readline()\n"
             "c.execute('ROLLBACK')\n", node.db_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            self.assertEqual(holder.stdout.readline().strip(), b"locked")
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
        finally:
            holder.stdin.write(b"\n")
            holder.stdin.close()
            holder.wait(30)
            holder.stdout.close()
        # The refused instance left nothing; once the lock is gone it is stored.
        self.assert_not_stored(node, dt.sop_uids(files[1])[1])
        self.assert_consistent(node)
        r = dt.storescu(node.port, files[1:], workdir=self.work)
        self.assert_all_success(r, files[1:])
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
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
        for how in ("garbage", "truncated", "header"):
            with self.subTest(how=how):
                self.corrupt(how)
                node = self.node()
                self.assertTrue(node.wait_event("model_not_loaded"), node.log_tail())
                line = node.events("model_not_loaded")[-1]
                self.assertIn("error=", line)
                self.assert_degraded_by_model(node)
                study, files = self.phantom(seed=len(how))
                r = dt.storescu(node.port, files, workdir=self.work)
                self.assert_all_success(r, files)
                self.wait_study(node, study, "waiting")
                self.install_good()
                node.proc.send_signal(signal.SIGHUP)
                self.assertTrue(node.wait_event("model_loaded"), node.log_tail())
                self.wait_study(node, study, "triaged")
                self.assertEqual(healthz(node)["status"], "ok")
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
