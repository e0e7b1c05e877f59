#!/usr/bin/python3
"""Issue 2: the spool on a small tmpfs that fills up. storescu gets A700 for
what did not fit, the rest is stored bit for bit, the node keeps running, index
and spool agree, and storing works again once there is space. Once through the
real ENOSPC path (store.min_free_mb=0), once through the low-water mark; and
a node started below the mark says so, and stops saying so once space is
freed, with no store arriving.
Needs permission to mount a tmpfs (root in CI); skipped otherwise.

    test_diskfull.py /path/to/ichtriage"""
import json
import os
import re
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

MB = 1024 * 1024
A700 = 0xA700


def free_mb(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / MB


def says_disk_low(status):
    return re.search(r"disk[ _-]*(space[ _-]*)?(is[ _-]*)?low|low[ _-]*(on[ _-]*)?disk", status, re.I)


def wait_status(node, pred, timeout=10.0):
    """True once the latest STATUS= the node sent satisfies pred."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = [l[len("STATUS="):] for n in node.notifications() for l in n.splitlines()
                    if l.startswith("STATUS=")]
        if statuses and pred(statuses[-1]):
            return True
        time.sleep(0.1)
    return False


def failing_lines(node):
    with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port, timeout=10) as r:
        return [d for d in json.loads(r.read())["degraded"] if d.startswith("stores failing")]


class DiskFull(itest.NodeTest):
    def fill(self, min_free_mb, notify=False):
        """Sends 60 instances of 512 KB (about 31 MB) to a node whose store is
        a 20 MB tmpfs; returns (node, mount point, files, statuses)."""
        mnt = os.path.join(self.work, "mnt")
        self.mount_tmpfs(mnt, 20)
        files = self.gen("ct", count=60, rows=512, cols=512)
        node = self.start_node({"store.min_free_mb": min_free_mb,
                                "store.failure_window_seconds": 1},
                               store_dir=os.path.join(mnt, "store"), notify=notify)
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assertEqual(r.association, "accepted", r.output[-2000:])
        unanswered = [f for f in files if f not in r.statuses]
        self.assertFalse(unanswered, "%d instances got no response (association lost?):\n%s"
                         % (len(unanswered), r.output[-3000:]))
        codes = sorted({hex(s) for s in r.statuses.values()})
        self.assertTrue(set(r.statuses.values()) <= {0, A700}, "statuses other than 0/A700: %s" % codes)
        ok = [f for f in files if r.statuses[f] == 0]
        full = [f for f in files if r.statuses[f] == A700]
        self.assertGreater(len(ok), 5, "almost nothing fitted in 20 MB: %s" % codes)
        self.assertTrue(full, "nothing was refused; did 31 MB fit in a 20 MB tmpfs?")
        self.assertTrue(node.alive(), "node died when the disk filled:\n" + node.log_tail())
        self.assertTrue(node.events("store_failed"), "no event=store_failed in the log")
        self.assert_stored_exactly(node, ok)
        for f in full:
            self.assert_not_stored(node, dt.sop_uids(f)[1])
        self.assert_consistent(node)
        rc, out = dt.echoscu(node.port)
        self.assertEqual(rc, 0, "node does not answer C-ECHO after the disk filled:\n" + out)
        return node, mnt, files, ok, full

    def send_again_after_growing(self, node, mnt, files, full):
        self.resize_tmpfs(mnt, 96)
        r = dt.storescu(node.port, full, workdir=self.work)
        self.assert_all_success(r, full)
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
        self.assertEqual(node.query("SELECT COUNT(*) FROM instances")[0][0], len(files))

    def test_enospc(self):
        node, mnt, files, ok, full = self.fill(min_free_mb=0)
        # /healthz (the page's banner) says stores are failing, and why;
        # the node's own state file survived the full disk.
        lines = failing_lines(node)
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r": (disk_full|database): .*(No space|full)", lines)
        self.send_again_after_growing(node, mnt, files, full)
        deadline = time.monotonic() + 10
        while failing_lines(node) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual(failing_lines(node), [], "still failing after stores succeeded")

    def test_low_water_mark(self):
        node, mnt, files, ok, full = self.fill(min_free_mb=12, notify=True)
        # Refused before the disk was really full: at most one instance (and
        # the index's growth) below the mark.
        left = free_mb(mnt)
        self.assertGreater(left, 10, "only %.1f MB left: the low-water mark did not hold" % left)
        lines = [l for l in node.events("store_failed") if "A700" in l.upper()]
        self.assertTrue(lines, "no store_failed line with status A700")
        # The service status (sd_notify STATUS=) says why, and stops saying
        # it once there is space again.
        if not any("READY=1" in n for n in node.notifications()):
            self.assertFalse(itest.STRICT, "no sd_notify messages (built without libsystemd?)")
            sys.stderr.write("note: no sd_notify messages (built without libsystemd?); "
                             "status not checked\n")
            self.send_again_after_growing(node, mnt, files, full)
            return
        self.assertTrue(wait_status(node, says_disk_low),
                        "STATUS= never mentioned the low disk: %s" % node.notifications()[-3:])
        self.send_again_after_growing(node, mnt, files, full)
        self.assertTrue(wait_status(node, lambda st: not says_disk_low(st)),
                        "STATUS= still says the disk is low: %s" % node.notifications()[-3:])

    def test_disk_low_follows_the_disk_without_stores(self):
        """A node started below store.min_free_mb says so at once, and stops
        saying so once space is freed, with no C-STORE either time: free
        space was measured only when a scanner sent something, so such a
        node reported healthy until a scanner was refused, and "disk low"
        stayed until the next store after space came back."""
        mnt = os.path.join(self.work, "mnt")
        self.mount_tmpfs(mnt, 20)
        node = self.start_node({"store.min_free_mb": 64}, store_dir=os.path.join(mnt, "store"),
                               notify=True)
        low = "disk low: new instances are refused (A700)"

        def degraded():
            with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port,
                                        timeout=10) as r:
                return json.loads(r.read())["degraded"]

        def wait_degraded(pred, timeout=15.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                # read as systemd would: an unread socket fills and
                # sd_notify then blocks the node's loop
                node.notifications()
                if pred(degraded()):
                    return True
                time.sleep(0.2)
            return False

        self.assertTrue(wait_degraded(lambda d: low in d),
                        "/healthz never said the disk is low: %s\n%s" % (degraded(), node.log_tail()))
        notified = any("READY=1" in n for n in node.notifications())
        if notified:
            self.assertTrue(wait_status(node, says_disk_low),
                            "STATUS= never mentioned the low disk: %s" % node.notifications()[-3:])
        self.assertEqual(len(node.events("disk_low")), 1, node.log_tail())
        self.resize_tmpfs(mnt, 200)
        self.assertTrue(wait_degraded(lambda d: low not in d),
                        "/healthz still says the disk is low with %.0f MB free: %s"
                        % (free_mb(mnt), degraded()))
        if notified:
            self.assertTrue(wait_status(node, lambda st: not says_disk_low(st)),
                            "STATUS= still says the disk is low: %s" % node.notifications()[-3:])
        self.assertEqual(len(node.events("disk_ok")), 1, node.log_tail())
        # Measuring is not refusing: nothing was sent, nothing counted.
        self.assertEqual(node.stop(), 0)
        self.assertIn("refused_low_space=0", node.events("stopped")[-1])


if __name__ == "__main__":
    sys.exit(itest.main())
