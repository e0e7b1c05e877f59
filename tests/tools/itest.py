"""unittest scaffolding of the integration tests: the ichtriage executable
from the command line, a fresh work dir per test, a node per test, and the
checks every test shares (stored bit for bit, index and spool agree, nothing
stored).

    python3 test_x.py /path/to/ichtriage [unittest args]

Exit status: 0 pass, 1 fail, 77 (meson's "skipped") when every test skipped.
A failing test keeps its work dir (node log, store) and prints where it is."""
import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

import dicomtest as dt

EXE = None


class NodeTest(unittest.TestCase):
    """Base class: self.work is a fresh dir; self.start_node() starts a node
    whose store is inside it and which tearDown stops (SIGTERM, exit 0
    expected)."""

    node_settings = {}

    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="ichtriage-it.%s." % self._testMethodName)
        self.nodes = []
        self.mounts = []  # unmounted in tearDown, after the nodes stopped

    def start_node(self, settings=None, store_dir=None, name="node", notify=False, env=None):
        merged = dict(self.node_settings)
        merged.update(settings or {})
        node = dt.Node(EXE, os.path.join(self.work, name), merged, store_dir=store_dir)
        node.env = env or {}
        if notify:
            node.listen_notify()
        self.nodes.append(node)
        node.start()
        return node

    def tearDown(self):
        failed = self._failed()
        for node in self.nodes:
            if node.alive():
                rc = node.stop()
                if not failed:
                    self.assertEqual(rc, 0, "node did not exit 0 on SIGTERM; log:\n" + node.log_tail())
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        # a test expected to fail (meson's should_fail) sets
        # ICHTRIAGE_IT_KEEP=0: its work dir would pile up, one per run
        keep = failed and os.environ.get("ICHTRIAGE_IT_KEEP", "1") != "0"
        if failed:
            sys.stderr.write("\n[%s work dir of %s: %s]\n" %
                             ("kept" if keep else "removed", self.id(), self.work))
            for node in self.nodes:
                sys.stderr.write("--- %s (last lines)\n%s\n" % (node.log_path, node.log_tail(25)))
        if not keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def _failed(self):
        outcome = getattr(self, "_outcome", None)
        if outcome is None:
            return False
        result = getattr(outcome, "result", None)
        if result is not None:  # Python 3.11+
            return any(t is self for t, _ in result.failures + result.errors)
        return any(exc for _, exc in getattr(outcome, "errors", []))

    def mount_tmpfs(self, path, size_mb):
        """Mounts a tmpfs of size_mb at path (made if needed), or skips the
        test when this process may not mount."""
        os.makedirs(path, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dm,mode=0700" % size_mb,
                            "tmpfs", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            self.skipTest("cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): %s"
                          % p.stdout.decode("utf-8", "replace").strip())
        self.mounts.append(path)

    def resize_tmpfs(self, path, size_mb):
        subprocess.run(["mount", "-o", "remount,size=%dm" % size_mb, path], check=True)

    # --- data -------------------------------------------------------------
    def gen(self, name, **kw):
        return dt.generate(os.path.join(self.work, "data", name), **kw)

    # --- shared checks ----------------------------------------------------
    def assert_all_success(self, result, files):
        missing = [f for f in files if result.statuses.get(f) != 0]
        self.assertFalse(missing, "%d of %d files not answered 0x0000 (%r); statuses %s; "
                         "storescu output tail:\n%s" % (
                             len(missing), len(files), result,
                             sorted({hex(result.statuses.get(f, -1)) for f in missing}),
                             result.output[-3000:]))

    def assert_stored_exactly(self, node, files, instances=None):
        """Each file's SOP instance has one index row whose file holds the
        file's dataset byte for byte, in the same transfer syntax."""
        instances = instances if instances is not None else node.instances()
        for f in files:
            sop_class, sop, study, series = dt.sop_uids(f)
            self.assertIn(sop, instances, "%s (%s) not indexed" % (f, sop))
            row = instances[sop]
            path = os.path.join(node.store_dir, row["file_path"])
            self.assertTrue(os.path.isfile(path), "index points to missing file %s" % path)
            ts = dt.split_file(f)[2]
            sent = dt.sent_dataset(f)
            _, stored, stored_ts = dt.split_file(path)
            self.assertEqual(stored_ts, ts, "%s: stored with transfer syntax %s, sent %s"
                             % (sop, stored_ts, ts))
            self.assertTrue(stored == sent, "%s: stored dataset differs from what was sent "
                            "(%d vs %d bytes)" % (sop, len(stored), len(sent)))
            self.assertEqual(row["sop_class"], sop_class)
            self.assertEqual(row["transfer_syntax"], ts)
            self.assertEqual(row["file_size"], os.path.getsize(path))
            rel = os.path.relpath(path, node.spool)
            self.assertTrue(rel.startswith(os.path.join(study, series) + os.sep),
                            "%s not under spool/<study>/<series>/" % rel)
        n = node.query("SELECT COUNT(*) FROM instances WHERE sop_uid IN (%s)"
                       % ",".join("?" * len(files)), [dt.sop_uids(f)[1] for f in files])[0][0]
        self.assertEqual(n, len(files), "instances indexed more or fewer times than sent")

    def assert_consistent(self, node):
        """Index and spool agree: every row's file exists with its size, every
        spool file is a row's, no temp file is left, series counts match."""
        rows = node.query("SELECT sop_uid, file_path, file_size FROM instances")
        indexed = set()
        for r in rows:
            path = os.path.join(node.store_dir, r["file_path"])
            self.assertTrue(os.path.isfile(path), "row %s points to missing %s" % (r["sop_uid"], path))
            self.assertEqual(os.path.getsize(path), r["file_size"], "size of %s" % path)
            indexed.add(os.path.normpath(r["file_path"]))
        orphans = [p for p in node.spool_files() if os.path.normpath(p) not in indexed]
        self.assertFalse(orphans, "spool files with no index row: %s" % orphans[:10])
        self.assertEqual(node.temp_files(), [], "temp files left in spool/.tmp")
        bad = node.query("SELECT s.series_uid, s.instance_count, COUNT(i.sop_uid) AS n "
                         "FROM series s LEFT JOIN instances i ON i.series_id = s.id "
                         "GROUP BY s.id HAVING s.instance_count != n")
        self.assertFalse(bad, "series.instance_count disagrees with instances: %s"
                         % [tuple(b) for b in bad])

    def assert_not_failing_stores(self, node):
        """A peer's own trouble (a refused dataset, a broken association)
        is not the node's: /healthz lists no "stores failing"."""
        degraded = node.healthz()["degraded"]
        self.assertFalse([d for d in degraded if d.startswith("stores failing")], degraded)

    def assert_not_stored(self, node, sop):
        self.assertEqual(node.query("SELECT COUNT(*) FROM instances WHERE sop_uid = ?", (sop,))[0][0]
                         if os.path.exists(node.db_path) else 0, 0, "%s was indexed" % sop)
        stray = [p for p in node.spool_files() if sop in p]
        self.assertFalse(stray, "%s left files in the spool: %s" % (sop, stray))
        self.assertEqual(node.temp_files(), [], "temp files left in spool/.tmp")


@contextlib.contextmanager
def database_locked(db_path, begin="BEGIN EXCLUSIVE"):
    """Another process holds db_path's lock (begin: the transaction it
    opens, as the sqlite3 shell would) for the body of the with."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute(sys.argv[2])\n"
         "print('locked', flush=True)\n"
         "sys.stdin.readline()\n"
         "c.execute('ROLLBACK')\n", db_path, begin],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if holder.stdout.readline().strip() != b"locked":
            raise RuntimeError("could not lock " + db_path)
        yield
    finally:
        holder.stdin.write(b"\n")
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()


def owner_only(path):
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def main():
    global EXE
    if len(sys.argv) < 2 or not os.access(sys.argv[1], os.X_OK):
        sys.stderr.write("usage: %s /path/to/ichtriage [unittest args]\n" % sys.argv[0])
        return 2
    EXE = os.path.abspath(sys.argv[1])
    prog = unittest.main(module="__main__", argv=[sys.argv[0]] + sys.argv[2:], exit=False,
                         verbosity=2)
    return exit_code(prog.result)


# .ci/run sets ICHTRIAGE_TEST_STRICT=1: there every dependency is installed
# and the tests run as root, so a check that would be skipped elsewhere (no
# sd_notify, a path nobody cannot reach) fails instead of passing silently.
STRICT = os.environ.get("ICHTRIAGE_TEST_STRICT") == "1"


def skip_or_fail(test, why):
    """Skips test (a unittest.TestCase) for why, or fails it under STRICT."""
    if STRICT:
        test.fail("not run, which is not allowed here (ICHTRIAGE_TEST_STRICT): " + why)
    test.skipTest(why)


def exit_code(r):
    """A unittest result as meson reads an exit status: 1 failed; 77
    skipped when nothing ran (a class skipped in setUpClass counts a skip
    and runs none) or everything was skipped; 0 passed."""
    if not r.wasSuccessful():
        return 1
    if r.testsRun == 0 or len(r.skipped) >= r.testsRun:
        return 77
    return 0
