#!/usr/bin/python3
"""Issue 2: the node answers C-ECHO, stores what storescu sends bit for bit and
indexes it once, in every transfer syntax and storage class it claims, replaces
a resent instance, keeps its store owner-only, and drains on SIGTERM.

    test_store.py /path/to/ichtriage"""
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402
from itest import owner_only  # noqa: E402

TS_CASES = [  # (gen_ct transfer syntax name, storage class)
    ("implicit", "ct"), ("explicit", "ct"), ("bigendian", "ct"), ("deflated", "ct"),
    ("rle", "ct"), ("jpegls", "ct"), ("jpeg-lossless", "ct"), ("jpeg-baseline", "sc"),
]


class Store(itest.NodeTest):
    def test_echo(self):
        node = self.start_node()
        rc, out = dt.echoscu(node.port)
        self.assertEqual(rc, 0, out)
        self.assertIn("Received Echo Response (Success)", out)

    def test_series_200_bit_for_bit(self):
        files = self.gen("ct200", count=200, rows=512, cols=512)
        node = self.start_node()
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assertEqual(r.association, "accepted", r.output[-2000:])
        self.assert_all_success(r, files)
        self.assertEqual(r.rc, 0, r.output[-2000:])
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
        _, _, study, series = dt.sop_uids(files[0])
        rows = node.query("SELECT instance_count FROM series WHERE series_uid = ?", (series,))
        self.assertEqual([r[0] for r in rows], [200])
        self.assertEqual(node.query("SELECT COUNT(*) FROM studies WHERE study_uid = ?", (study,))[0][0], 1)
        calling = {r[0] for r in node.query("SELECT calling_ae FROM instances")}
        self.assertEqual(calling, {"STORESCU"})

    def test_transfer_syntaxes(self):
        files = []
        for ts, sop in TS_CASES:
            files += self.gen(ts, count=2, rows=128, cols=128, ts=ts, sop=sop)
        node = self.start_node()
        # One association proposing one context per (class, syntax): each file
        # travels in its own syntax or, if the node refuses the context, not at all.
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assertEqual(r.association, "accepted", r.output[-2000:])
        not_sent = [f for f in files if f not in r.statuses]
        self.assertFalse(not_sent, "no context accepted for: %s\n%s" % (
            sorted({dt.split_file(f)[2] for f in not_sent}), r.output[-3000:]))
        self.assert_all_success(r, files)
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)

    def test_other_storage_classes(self):
        files = self.gen("mr", count=3, rows=256, cols=256, sop="mr")
        files += self.gen("sc", count=2, rows=256, cols=256, sop="sc")
        node = self.start_node()
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)

    def test_resend_replaces(self):
        files = self.gen("orig", count=3, rows=128, cols=128)
        node = self.start_node()
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        # Same instances again, unchanged: one row and one file each.
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
        self.assertEqual(len(node.spool_files()), 3, node.spool_files())
        # The first instance again with other content: the new bytes win.
        import pydicom
        ds = pydicom.dcmread(files[0])
        ds.SeriesDescription = "AXIAL 5MM RESENT"
        ds.PixelData = bytes(len(ds.PixelData))
        changed = os.path.join(self.work, "data", "changed.dcm")
        ds.save_as(changed, write_like_original=False)
        r = dt.storescu(node.port, [changed], workdir=self.work)
        self.assert_all_success(r, [changed])
        self.assert_stored_exactly(node, [changed] + files[1:])
        self.assert_consistent(node)
        self.assertEqual(len(node.spool_files()), 3, node.spool_files())
        self.assertEqual(node.query("SELECT COUNT(*) FROM instances")[0][0], 3)

    def test_store_is_owner_only(self):
        files = self.gen("modes", count=2, rows=64, cols=64)
        node = self.start_node()
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        checked = []
        for root, dirs, names in os.walk(node.spool):
            checked.append(root)
            checked += [os.path.join(root, n) for n in names]
        db_files = [node.db_path + s for s in ("", "-wal", "-shm") if os.path.exists(node.db_path + s)]
        self.assertIn(node.db_path, db_files)
        checked += db_files
        loose = ["%s %o" % (p, os.stat(p).st_mode & 0o777) for p in checked if not owner_only(p)]
        self.assertFalse(loose, "readable by group/others: %s" % loose)
        self.assertGreaterEqual(len(checked), 5)  # spool, study, series, 2 files, db

    def test_sigterm_drains_inflight_association(self):
        files = self.gen("drain", count=200, rows=512, cols=512)
        node = self.start_node()
        cfg = dt.exact_config(files, self.work)
        cmd = dt.storescu_cmd(node.port, files, config=cfg)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dt.storescu_env())
        lines, acked = [], [0]

        def reader():
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                if line.startswith("D: DIMSE Status") and "0x0000" in line:
                    acked[0] += 1
        t = threading.Thread(target=reader)
        t.start()
        deadline = time.monotonic() + 60
        while acked[0] < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        self.assertGreaterEqual(acked[0], 10, "storescu did not get going:\n" + "\n".join(lines[-30:]))
        node.proc.terminate()  # SIGTERM while the association is in flight
        # A new association after SIGTERM must not be served.
        time.sleep(0.2)
        rc_echo, out_echo = dt.echoscu(node.port, timeout=30)
        proc.wait(120)
        t.join()
        rc = node.proc.wait(120)
        node.proc = None
        self.assertEqual(rc, 0, "node exit status after SIGTERM; log:\n" + node.log_tail())
        statuses, _ = dt.parse_storescu("\n".join(lines))
        # 200 instances take seconds: well within any sane drain bound.
        self.assert_all_success(dt.StoreResult(proc.returncode, "\n".join(lines), statuses, None), files)
        self.assertNotEqual(rc_echo, 0, "a new association was served after SIGTERM:\n" + out_echo)
        acked_files = [f for f in files if statuses.get(f) == 0]
        node2 = self.start_node(store_dir=node.store_dir, name="node-after")
        self.assert_stored_exactly(node2, acked_files)
        self.assert_consistent(node2)


if __name__ == "__main__":
    sys.exit(itest.main())
