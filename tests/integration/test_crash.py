#!/usr/bin/python3
"""Issue 2: kill -9 of the node while storescu sends, then restart. Every
instance storescu saw acknowledged is present bit for bit and indexed; what
the index holds is intact; PRAGMA integrity_check says ok; no temp file or
unindexed spool file survives the restart; and the node takes the series
again afterwards.

    test_crash.py /path/to/ichtriage"""
import os
import sqlite3
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402


class Crash(itest.NodeTest):
    def send_and_kill(self, node, files, kill_after):
        """Runs storescu on files and SIGKILLs the node once kill_after
        responses with status 0x0000 have arrived. Returns storescu's
        per-file statuses."""
        killed = []

        def on_ack(n):
            if n >= kill_after and not killed:
                node.kill9()  # at once, from the reader thread
                killed.append(n)
        run = dt.StorescuStream(node.port, files, self.work, on_ack=on_ack)
        r = run.wait(120)
        self.assertTrue(killed, "storescu got only %d acknowledgements before it ended:\n%s"
                        % (run.acked, run.tail()))
        statuses = r.statuses
        self.assertLess(sum(1 for s in statuses.values() if s == 0), len(files),
                        "everything was stored before the kill; the test proved nothing")
        return statuses

    def check_after_restart(self, node, files, acked):
        self.assertEqual(node.temp_files(), [], "temp files survived the restart")
        con = sqlite3.connect("file:%s?mode=ro" % node.db_path, uri=True, timeout=10)
        try:
            self.assertEqual(con.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        finally:
            con.close()
        instances = node.instances()
        lost = [f for f in acked if dt.sop_uids(f)[1] not in instances]
        self.assertFalse(lost, "%d acknowledged instances lost, first %s" % (len(lost), lost[:3]))
        # Whatever is indexed (acknowledged or not) must be intact.
        indexed = [f for f in files if dt.sop_uids(f)[1] in instances]
        self.assert_stored_exactly(node, indexed, instances)
        self.assert_consistent(node)
        return len(indexed)

    def test_kill9_while_sending(self):
        files = self.gen("ct", count=200, rows=512, cols=512)
        node = self.start_node()
        store = node.store_dir

        statuses = self.send_and_kill(node, files, kill_after=40)
        acked = [f for f in files if statuses.get(f) == 0]
        node = self.start_node(store_dir=store, name="restart1")
        n1 = self.check_after_restart(node, files, acked)

        # Again while the same instances are being re-sent (the replace path).
        statuses = self.send_and_kill(node, files, kill_after=max(5, n1 // 3))
        acked2 = [f for f in files if statuses.get(f) == 0]
        node = self.start_node(store_dir=store, name="restart2")
        self.check_after_restart(node, files, sorted(set(acked) | set(acked2)))

        # And the node takes the whole series afterwards.
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
        self.assertEqual(node.query("SELECT COUNT(*) FROM instances")[0][0], len(files))
        uid = dt.sop_uids(files[0])[3]
        self.assertEqual([r[0] for r in node.query(
            "SELECT instance_count FROM series WHERE series_uid = ?", (uid,))], [len(files)])
        sys.stderr.write("acknowledged before kills: %d, then %d\n" % (len(acked), len(acked2)))

    def test_startup_removes_strays(self):
        """What a crash can leave (a temp file; a spool file whose row was
        never committed, so never acknowledged) is gone after a start; what
        is indexed is untouched."""
        files = self.gen("ct", count=3, rows=64, cols=64)
        node = self.start_node()
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        # A crash (a clean stop marks the spool clean, and the next start
        # then does not walk it: test_serve_guard.py).
        node.proc.kill()
        node.proc.wait()
        store = node.store_dir
        tmp = os.path.join(node.spool, ".tmp")
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "stray-from-crash"), "wb") as f:
            f.write(b"\0" * 1000)
        series_dir = os.path.dirname(os.path.join(store, node.instances()[dt.sop_uids(files[0])[1]]["file_path"]))
        unindexed = os.path.join(series_dir, "1.2.826.0.1.3680043.8.498.424242.dcm")
        with open(files[0], "rb") as src, open(unindexed, "wb") as dst:
            dst.write(src.read())
        node = self.start_node(store_dir=store, name="restart")
        self.assertEqual(node.temp_files(), [], "stray temp file survived the start")
        self.assertFalse(os.path.exists(unindexed), "unindexed spool file survived the start")
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)


if __name__ == "__main__":
    sys.exit(itest.main())
