#!/usr/bin/python3
"""Issue 2: the node answers C-ECHO, stores what storescu sends bit for bit and
indexes it once, in every transfer syntax and storage class it claims, replaces
a resent instance, keeps its store owner-only, and drains on SIGTERM.

    test_store.py /path/to/ichtriage"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402
from itest import owner_only  # noqa: E402

TS_CASES = [  # (gen_ct transfer syntax name, storage class)
    ("implicit", "ct"), ("explicit", "ct"), ("bigendian", "ct"), ("deflated", "ct"),
    ("rle", "ct"), ("jpegls", "ct"), ("jpeg-lossless", "ct"), ("jpeg-lossless-p14", "ct"),
    ("jpeg-extended", "ct"), ("jpeg-baseline", "sc"),
    ("explicit", "enhanced-ct"), ("jpegls", "enhanced-ct"),
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
            files += self.gen(ts + "-" + sop, count=2, rows=128, cols=128, ts=ts, sop=sop)
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

    def test_premise_storescp_receives_what_we_compare(self):
        """What these tests compare stored files with (dicomtest.sent_dataset)
        is what storescu sends: dcmtk's storescp in bit-preserving mode
        receives exactly that. Guards the other tests' reference."""
        files = []
        for ts, sop in TS_CASES:
            if ts != "jpeg-lossless-p14":  # not among the syntaxes storescp +xa accepts
                files += self.gen(ts + "-" + sop, count=2, rows=128, cols=128, ts=ts, sop=sop)
        rx = os.path.join(self.work, "storescp")
        os.makedirs(rx)
        port = dt.free_port()
        scp = subprocess.Popen(["storescp", "+xa", "+B", "-od", rx, "-aet", "ICHTRIAGE", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dt.storescu_env())
        try:
            self.assertTrue(dt.wait_port(port), "storescp did not start")
            r = dt.storescu(port, files, workdir=self.work)
        finally:
            scp.terminate()
            scp.wait(10)
        self.assert_all_success(r, files)
        received = {dt.sop_uids(os.path.join(rx, n))[1]: os.path.join(rx, n) for n in os.listdir(rx)}
        for f in files:
            got = received[dt.sop_uids(f)[1]]
            self.assertEqual(dt.split_file(got)[2], dt.split_file(f)[2], f)
            self.assertTrue(dt.dataset_bytes(got) == dt.sent_dataset(f), "%s: storescp got other bytes" % f)

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

    def test_client_without_tcp_nodelay_is_not_stalled(self):
        """Scanners do not set TCP_NODELAY. With Nagle on the sender and
        delayed ACKs on the receiver every C-STORE waits ~40 ms (dcmtk's
        storescp: 9 s for 200 instances). The node must avoid that stall
        from its side; 100 small instances then take well under 4 s."""
        files = self.gen("nagle", count=100, rows=64, cols=64)
        node = self.start_node()
        cfg = dt.exact_config(files, self.work)
        env = dict(os.environ)
        env.pop("TCP_NODELAY", None)
        t0 = time.monotonic()
        p = subprocess.run(dt.storescu_cmd(node.port, files, config=cfg), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        took = time.monotonic() - t0
        statuses, _ = dt.parse_storescu(p.stdout.decode("utf-8", "replace"))
        self.assertEqual(sum(1 for s in statuses.values() if s == 0), len(files))
        self.assertLess(took, 3.0, "100 instances from a client that keeps Nagle took %.1f s "
                        "(%.0f ms each): delayed-ACK stall" % (took, took * 10))

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
        run = dt.StorescuStream(node.port, files, self.work)
        self.assertTrue(run.wait_acked(10), "storescu did not get going:\n" + run.tail())
        node.proc.terminate()  # SIGTERM while the association is in flight
        # A new association after SIGTERM must not be served.
        time.sleep(0.2)
        rc_echo, out_echo = dt.echoscu(node.port, timeout=30)
        r = run.wait(120)
        rc = node.proc.wait(120)
        node.proc = None
        self.assertEqual(rc, 0, "node exit status after SIGTERM; log:\n" + node.log_tail())
        # 200 instances take seconds: well within any sane drain bound.
        self.assert_all_success(r, files)
        self.assertNotEqual(rc_echo, 0, "a new association was served after SIGTERM:\n" + out_echo)
        statuses = r.statuses
        acked_files = [f for f in files if statuses.get(f) == 0]
        node2 = self.start_node(store_dir=node.store_dir, name="node-after")
        self.assert_stored_exactly(node2, acked_files)
        self.assert_consistent(node2)


if __name__ == "__main__":
    sys.exit(itest.main())
