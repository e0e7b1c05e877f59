#!/usr/bin/python3
"""Issue 9: `ichtriage status`, and `ichtriage backup DIR` + `restore DIR`
round trips with a node that received instances.

    test_backup.py /path/to/ichtriage"""
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402


def ichtriage(*args, user=None):
    """Runs a subcommand; returns (rc, stdout, stderr)."""
    argv = [itest.EXE] + list(args)
    if user is not None:
        argv = ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
                "--clear-groups", "--"] + argv
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def store_args(store_dir, port=None, extra=()):
    a = ["-c", "/dev/null", "--set", "store.dir=%s" % store_dir, "--set", "store.min_free_mb=0"]
    if port:
        a += ["--set", "dicom.port=%d" % port]
    for kv in extra:
        a += ["--set", kv]
    return a


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def tree(root):
    """relative path -> bytes, of every file below root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


class Backup(itest.NodeTest):
    def received(self, series=2, count=4):
        """A running node that received `series` series of `count` CT slices."""
        node = self.start_node()
        files = []
        for i in range(series):
            files += self.gen("s%d" % i, count=count, rows=64, cols=64)
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        return node, files

    def model_file(self):
        """A file where status looks for the model (status only checks it is there)."""
        path = os.path.join(self.work, "model.safetensors")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
        return path

    def status(self, store_dir, port, *extra, http_port=None):
        extra = ("triage.model=" + self.model_file(),) + extra
        if http_port:
            extra += ("http.listen=127.0.0.1:%d" % http_port,)
        rc, out, err = ichtriage("status", "--json", *store_args(store_dir, port, extra))
        self.assertIn(rc, (0, 1), err)
        doc = json.loads(out)
        self.assertEqual(doc["healthy"], rc == 0, out)
        return rc, doc

    def copied_last(self, node, files):
        """(spool path, SOP instance UID, file sent) of the instance a
        backup copies last."""
        import sqlite3
        con = sqlite3.connect("file:%s?mode=ro" % node.db_path, uri=True)
        rel, sop = con.execute("SELECT file_path, sop_uid FROM instances"
                               " ORDER BY file_path DESC LIMIT 1").fetchone()
        con.close()
        return rel, sop, [f for f in files if dt.sop_uids(f)[1] == sop][0]

    def held_backup(self, store_dir, bdir, hold_s=8):
        """Starts `ichtriage backup` with its first file copy held hold_s
        (strace delay injection) and returns the process once the
        snapshot (bdir/ichtriage.db) is there: what the test does next
        happens between the snapshot and the copies."""
        if not shutil.which("strace"):
            self.skipTest("needs strace")
        argv = ["strace", "-f", "-o", "/dev/null", "-e", "trace=copy_file_range", "-e",
                "inject=copy_file_range:delay_enter=%d:when=1" % (hold_s * 1000000), itest.EXE,
                "backup"]
        backup = subprocess.Popen(argv + store_args(store_dir) + [bdir],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10  # the snapshot is taken before any copy
        while not os.path.exists(os.path.join(bdir, "ichtriage.db")) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        return backup

    # --- status -----------------------------------------------------------
    def test_status(self):
        node, files = self.received(series=2, count=3)
        rc, doc = self.status(node.store_dir, node.port, http_port=node.http_port)
        self.assertEqual(rc, 0, doc)
        self.assertEqual(doc["problems"], [])
        self.assertIs(doc["dicom"]["listening"], True)
        self.assertIs(doc["http"]["listening"], True)
        db = doc["database"]
        self.assertEqual(db["quick_check"], "ok")
        self.assertEqual((db["studies"], db["series"], db["instances"]), (2, 2, 6))
        self.assertEqual(db["spool_bytes"], sum(os.path.getsize(os.path.join(node.store_dir, p))
                                                for p in node.spool_files()))
        self.assertRegex(db["last_received_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(sum(db["series_by_state"].values()), 2)
        self.assertTrue(doc["disk"]["ok"])
        if db["schema_version"] >= 2:  # the triage tables (issue 6)
            self.assertIsInstance(doc["triage"], dict, doc)
            self.assertIsInstance(doc["triage"]["jobs_by_state"], dict)
            self.assertEqual(sum(doc["triage"]["studies_by_status"].values()), 2, doc)
        else:
            self.assertIsNone(doc["triage"])
        self.assertEqual(doc["model"], {"found": True, "path": self.model_file(), "bytes": 1000,
                                        "modified_at": doc["model"]["modified_at"]})
        # No model: triage cannot run, a problem.
        rc, doc = self.status(node.store_dir, node.port, "triage.model=/nonexistent/m.safetensors",
                              http_port=node.http_port)
        self.assertEqual(rc, 1)
        self.assertFalse(doc["model"]["found"])
        self.assertTrue([p for p in doc["problems"] if "model" in p], doc["problems"])
        # The text form says the same, without patient names.
        rc, out, _ = ichtriage("status", *store_args(node.store_dir, node.port, [
            "triage.model=" + self.model_file(), "http.listen=127.0.0.1:%d" % node.http_port]))
        self.assertEqual(rc, 0, out)
        self.assertIn("6 instances", out)
        self.assertIn("health        ok", out)
        names = {r[0] for r in node.query("SELECT patient_name FROM patients") if r[0]}
        for n in names:
            self.assertNotIn(n, out)
        # Problems: the disk below the low-water mark, the node gone.
        rc, doc = self.status(node.store_dir, node.port, "store.min_free_mb=1073741824",
                              http_port=node.http_port)
        self.assertEqual(rc, 1)
        self.assertFalse(doc["disk"]["ok"])
        self.assertEqual(node.stop(), 0)
        rc, doc = self.status(node.store_dir, node.port, http_port=node.http_port)
        self.assertEqual(rc, 1)
        self.assertIs(doc["dicom"]["listening"], False)
        self.assertEqual(doc["database"]["instances"], 6, "status must read a stopped node's store")

    def test_status_http_listening(self):
        """The listening check reads the kernel's socket table: a socket that
        listens on http.listen's port is seen, a closed one is not."""
        import socket
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        _, doc = self.status(os.path.join(self.work, "none"), dt.free_port(),
                             "http.listen=127.0.0.1:%d" % port)
        self.assertEqual(doc["http"], {"listen": "127.0.0.1:%d" % port, "listening": True})
        sock.close()
        _, doc = self.status(os.path.join(self.work, "none"), dt.free_port(),
                             "http.listen=127.0.0.1:%d" % port)
        self.assertIs(doc["http"]["listening"], False)
        self.assertTrue([p for p in doc["problems"] if p.startswith("http")], doc["problems"])

    def test_status_without_a_store(self):
        missing = os.path.join(self.work, "nothing")
        rc, doc = self.status(missing, dt.free_port())
        self.assertEqual(rc, 1)
        self.assertFalse(doc["database"]["readable"])
        self.assertFalse(os.path.exists(missing), "status created the store")

    def test_status_sees_a_damaged_database(self):
        node, _ = self.received(series=1, count=3)
        self.assertEqual(node.stop(), 0)
        size = os.path.getsize(node.db_path)
        with open(node.db_path, "r+b") as f:  # scribble over everything after page 1
            page = 4096
            f.seek(page)
            f.write(b"\x5a" * (size - page))
        rc, doc = self.status(node.store_dir, node.port, http_port=node.http_port)
        self.assertEqual(rc, 1)
        self.assertTrue(doc["problems"], doc)

    # --- backup and restore -------------------------------------------------
    def test_round_trip(self):
        node, files = self.received(series=2, count=4)
        # The model registry (<store.dir>/models) is state too; a .tmp is a
        # registration in progress and stays behind.
        models = os.path.join(node.store_dir, "models")
        os.makedirs(os.path.join(models, "old"), exist_ok=True)
        registry = {"active.safetensors": os.urandom(3000), "m1.safetensors": os.urandom(2000),
                    "old/m0.safetensors": os.urandom(1000)}
        for name, data in registry.items():
            with open(os.path.join(models, name), "wb") as f:
                f.write(data)
        with open(os.path.join(models, "m2.safetensors.tmp"), "wb") as f:
            f.write(b"half")
        bdir = os.path.join(self.work, "backup")
        rc, out, err = ichtriage("backup", *store_args(node.store_dir), bdir)
        self.assertEqual(rc, 0, err)
        self.assertIn("8 instances", out)
        self.assertIn("3 model files", out)
        # Sent after the backup: not in it.
        late = self.gen("late", count=2, rows=64, cols=64)
        r = dt.storescu(node.port, late, workdir=self.work)
        self.assert_all_success(r, late)
        original = {p: c for p, c in tree(node.store_dir).items() if p.startswith("spool/")}
        self.assertEqual(node.stop(), 0)

        # The backup: owner-only, MANIFEST, the snapshot's files only.
        self.assertEqual(stat.S_IMODE(os.stat(bdir).st_mode), 0o700)
        for d, dirs, fs in os.walk(bdir):
            for x in dirs + fs:
                self.assertTrue(itest.owner_only(os.path.join(d, x)), os.path.join(d, x))
        with open(os.path.join(bdir, "MANIFEST")) as f:
            manifest = f.read()
        self.assertIn("format = ichtriage-backup 2\n", manifest)
        self.assertIn("instances = 8\n", manifest)
        # Every file outside the spool listed with its size and SHA-256.
        listed = sorted(line[len("file = "):] for line in manifest.splitlines()
                        if line.startswith("file = "))
        outside = {p: c for p, c in tree(bdir).items()
                   if p != "MANIFEST" and not p.startswith("spool/")}
        self.assertEqual(listed, sorted("%s %d %s" % (hashlib.sha256(c).hexdigest(), len(c), p)
                                        for p, c in outside.items()))
        self.assertIn("listed_files = 4\n", manifest)
        backed = tree(os.path.join(bdir, "spool"))
        self.assertEqual(len(backed), 8)

        # Restore into a new store; a node on it has exactly the first 8.
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        node2 = self.start_node(store_dir=store2, name="node2")
        self.assertEqual(node2.events("recovered")[-1].count("unindexed_files_removed=0"), 1,
                         "restore left files the index does not know")
        sent = {dt.sop_uids(f)[1] for f in files}
        self.assertEqual(set(node2.instances()), sent)
        self.assert_stored_exactly(node2, files)
        self.assert_consistent(node2)
        restored = tree(store2)
        for p, content in restored.items():
            if p.startswith("spool/"):
                self.assertEqual(content, original[p], p)
        self.assertEqual(len([p for p in restored if p.startswith("spool/")]), 8)
        self.assertEqual({p[len("models/"):]: c for p, c in restored.items()
                          if p.startswith("models/")}, registry)
        rc, doc = self.status(store2, node2.port, http_port=node2.http_port)
        self.assertEqual(rc, 0, doc)
        self.assertEqual(doc["database"]["instances"], 8)
        # And it keeps working: the late series can be sent again.
        r = dt.storescu(node2.port, late, workdir=self.work)
        self.assert_all_success(r, late)
        self.assert_consistent(node2)

    def test_round_trip_keeps_the_pacs_queue(self):
        """Results waiting for PACS (outbox/ files, pending deliveries) come
        back with a restore. Revision 2 is delivered everywhere while the
        backup's first copy is held (its files removed, its deliveries
        sent in the node's index): recorded as sent in the backup, not
        left to fail. Revision 3's files were lost from the node's outbox/
        while its deliveries are still pending there: they stay pending in
        the backup, logged. The backup had called them sent, from the
        files' absence alone. Revision 4, given up, is dismissed meanwhile
        (`ichtriage pacs dismiss` removes its files): dismissed in the
        backup too, not left given up with its files missing."""
        import sqlite3
        node, _ = self.received(series=1, count=2)
        self.assertEqual(node.stop(), 0)
        outbox = os.path.join(node.store_dir, "outbox")
        os.makedirs(outbox, exist_ok=True)
        objects = {"%d-%s.dcm" % (rev, obj): os.urandom(1500)
                   for rev in (1, 2, 4) for obj in ("sr", "sc")}
        for name, data in objects.items():
            with open(os.path.join(outbox, name), "wb") as f:
                f.write(data)
        con = sqlite3.connect(node.db_path)
        with con:
            study, series = con.execute("SELECT study_ref, id FROM series").fetchone()
            for rev in (1, 2, 3, 4):  # revision 3: no files; 4: given up
                cur = con.execute(
                    "INSERT INTO pacs_revisions (study_ref, series_ref, result_at, revision,"
                    " state, created_at) VALUES (?, ?, ?, ?, 'ready', 1)",
                    (study, series, rev, rev))
                for obj in ("sr", "sc"):
                    con.execute("INSERT INTO pacs_deliveries (revision_ref, destination, object,"
                                " file_path, sop_uid, next_attempt_at, state) VALUES (?, 'P@h:104',"
                                " ?, ?, '1.2', 0, ?)",
                                (cur.lastrowid, obj, "outbox/%d-%s.dcm" % (rev, obj),
                                 "failed" if rev == 4 else "pending"))
        con.close()
        bdir = os.path.join(self.work, "backup")
        backup = self.held_backup(node.store_dir, bdir)
        con = sqlite3.connect(node.db_path)
        with con:  # revision 2 delivered, as the node does it: sent, then its files go
            con.execute("UPDATE pacs_deliveries SET state = 'sent', sent_at = 12345 WHERE"
                        " revision_ref = (SELECT id FROM pacs_revisions WHERE revision = 2)")
        con.close()
        for obj in ("sr", "sc"):
            os.unlink(os.path.join(outbox, "2-%s.dcm" % obj))
            del objects["2-%s.dcm" % obj]
        dismiss = subprocess.run([itest.EXE, "pacs"] + store_args(node.store_dir)
                                 + ["dismiss", "--all"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, timeout=60)
        self.assertEqual(dismiss.returncode, 0, dismiss.stderr)
        self.assertIn("2 objects dismissed, 0 results dismissed, 2 files removed", dismiss.stdout)
        for obj in ("sr", "sc"):
            del objects["4-%s.dcm" % obj]
        out, err = backup.communicate(timeout=60)
        out, err = out.decode(), err.decode()
        self.assertEqual(backup.returncode, 0, err)
        self.assertIn("2 outbox files", out)
        self.assertIn("event=backup_outbox_settled deliveries=4", err)
        self.assertEqual(err.count("event=backup_outbox_file_missing"), 2, err)
        self.assertIn("outbox: 2 deliveries pending or given up whose files the store has lost",
                      out)
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        self.assertEqual({p[len("outbox/"):]: c for p, c in tree(store2).items()
                          if p.startswith("outbox/")}, objects)
        con = sqlite3.connect(os.path.join(store2, "ichtriage.db"))
        states = sorted(con.execute("SELECT pr.revision, d.object, d.state, d.sent_at"
                                    " FROM pacs_deliveries d"
                                    " JOIN pacs_revisions pr ON pr.id = d.revision_ref"))
        con.close()
        self.assertEqual(states, [(1, "sc", "pending", None), (1, "sr", "pending", None),
                                  (2, "sc", "sent", 12345), (2, "sr", "sent", 12345),
                                  (3, "sc", "pending", None), (3, "sr", "pending", None),
                                  (4, "sc", "dismissed", None), (4, "sr", "dismissed", None)])

    def test_backup_while_retention_purges(self):
        """Retention removes a study the backup has listed but not copied yet:
        the backup leaves that study out (marked purged) and completes. The
        backup's first file copy is held 8 s (strace delay injection) while
        a node with store.retention_days purges the study."""
        import sqlite3
        node, files = self.received(series=2, count=3)
        self.assertEqual(node.stop(), 0)
        DAY = 86400 * 1000
        con = sqlite3.connect(node.db_path)
        with con:
            # The study whose files are copied last becomes old and triaged.
            last = con.execute("SELECT st.id FROM instances i JOIN series s ON s.id ="
                               " i.series_id JOIN studies st ON st.id = s.study_ref"
                               " ORDER BY i.file_path DESC LIMIT 1").fetchone()[0]
            con.execute("UPDATE series SET state = 'not_applicable' WHERE study_ref != ?", (last,))
            con.execute("UPDATE series SET state = 'triaged' WHERE study_ref = ?", (last,))
            old = int(time.time() * 1000) - 3 * DAY
            con.execute("UPDATE studies SET updated_at = ?, received_at = ? WHERE id = ?",
                        (old, old, last))
            kept = con.execute("SELECT i.file_path FROM instances i JOIN series s ON s.id ="
                               " i.series_id WHERE s.study_ref != ?", (last,)).fetchall()
        con.close()
        bdir = os.path.join(self.work, "backup")
        backup = self.held_backup(node.store_dir, bdir)
        node.settings["store.retention_days"] = "1"
        node.start()
        self.assertTrue(node.wait_event("study_purged", timeout=6), node.log_tail())
        out, err = backup.communicate(timeout=60)
        self.assertEqual(backup.returncode, 0, err.decode())
        self.assertIn("%d instances" % len(kept), out.decode())
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        con = sqlite3.connect(os.path.join(store2, "ichtriage.db"))
        self.assertEqual(sorted(con.execute("SELECT file_path FROM instances")), sorted(kept))
        self.assertEqual(con.execute("SELECT purged_at IS NOT NULL FROM studies WHERE id = ?",
                                     (last,)).fetchone()[0], 1)
        con.close()
        self.assertEqual(sorted(p for p in tree(store2) if p.startswith("spool/")),
                         sorted(k[0] for k in kept))

    def test_backup_while_an_instance_is_resent(self):
        """The instance the backup copies last is sent again twice, with other
        bytes of the same size, while the backup's first copy is held 8 s:
        the spool name of the first copy comes back with the third's bytes.
        The backup must not keep those bytes under the first copy's row:
        it leaves the instance out (the node replaced it after the
        snapshot), and every row of what is restored names its file's
        bytes. It had copied the third copy's bytes under the first's row."""
        import sqlite3
        import struct as st
        node, files = self.received(series=1, count=3)
        rel, sop, src = self.copied_last(node, files)
        with open(src, "rb") as f:
            data = f.read()
        variants = []
        for k in (1, 2):  # the last pixel's high byte changed: same size, other bytes
            v = os.path.join(self.work, "v%d.dcm" % k)
            with open(v, "wb") as f:
                f.write(data[:-1] + bytes([(data[-1] + k) % 256]))
            variants.append(v)
        bdir = os.path.join(self.work, "backup")
        backup = self.held_backup(node.store_dir, bdir)
        for v in variants:
            r = dt.storescu(node.port, [v], workdir=self.work)
            self.assert_all_success(r, [v])
        con = sqlite3.connect("file:%s?mode=ro" % node.db_path, uri=True)
        self.assertEqual(con.execute("SELECT file_path FROM instances WHERE sop_uid = ?",
                                     (sop,)).fetchone()[0], rel, "the name did not come back")
        con.close()
        out, err = backup.communicate(timeout=60)
        self.assertEqual(backup.returncode, 0, err.decode())
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        con = sqlite3.connect(os.path.join(store2, "ichtriage.db"))
        rows = con.execute("SELECT sop_uid, file_path, content_digest FROM instances").fetchall()
        count = con.execute("SELECT instance_count FROM series").fetchone()[0]
        con.close()
        self.assertNotIn(sop, [r[0] for r in rows], "the replaced instance's row was kept")
        self.assertEqual(len(rows), 2)
        self.assertEqual(count, 2, "the series' instance_count still counts the left-out one")
        for _, path, digest in rows:
            with open(os.path.join(store2, path), "rb") as f:
                b = f.read()
            meta = 132 + 12 + st.unpack("<I", b[140:144])[0]  # after (0002,0000) UL
            self.assertEqual(hashlib.sha256(b[meta:]).hexdigest(), digest, path)
        # A backup whose file was changed in place (same size): restore
        # refuses it before writing anything (it had checked sizes only).
        damaged = os.path.join(bdir, rows[0][1])
        with open(damaged, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([(last[0] + 1) % 256]))
        rc, out, err = ichtriage("restore", *store_args(os.path.join(self.work, "r3")), bdir)
        self.assertNotEqual(rc, 0, out)
        self.assertIn("does not hold the bytes its index row names", err)
        self.assertFalse(os.path.exists(os.path.join(self.work, "r3", "spool")))

    def test_backup_while_an_instance_is_resent_with_the_same_bytes(self):
        """The instance the backup copies last is sent again, the same
        bytes, while the backup's first copy is held 8 s: the node moves
        it to <sop>~1.dcm and removes the snapshot's name. The backup
        copies it from its new name and moves its row there: every
        acknowledged instance is in the backup. It had left the instance
        out (backup_files_left_out files=1)."""
        node, files = self.received(series=1, count=3)
        rel, sop, src = self.copied_last(node, files)
        bdir = os.path.join(self.work, "backup")
        backup = self.held_backup(node.store_dir, bdir)
        r = dt.storescu(node.port, [src], workdir=self.work)
        self.assert_all_success(r, [src])
        moved = node.instances()[sop]["file_path"]
        self.assertNotEqual(moved, rel, "the resend kept the spool name: nothing was tested")
        self.assertFalse(os.path.exists(os.path.join(node.store_dir, rel)))
        out, err = backup.communicate(timeout=60)
        self.assertEqual(backup.returncode, 0, err.decode())
        self.assertIn("3 instances, 3 files", out.decode())
        self.assertNotIn("backup_files_left_out", err.decode())
        self.assertIn("event=backup_files_moved files=1", err.decode())
        self.assertEqual(node.stop(), 0)
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        node2 = self.start_node(store_dir=store2, name="node2")
        instances = node2.instances()
        self.assertEqual(set(instances), {dt.sop_uids(f)[1] for f in files})
        self.assertEqual(instances[sop]["file_path"], moved)
        self.assert_stored_exactly(node2, files, instances)
        self.assert_consistent(node2)

    def assert_left_out(self, node, files, rel, sop, option, failure, left_out, other=()):
        """The one file rel (instance sop) of files fails a backup (with
        the options other), which names option; a backup with option leaves
        that instance out, logged, and restores consistent. Returns the
        restored store's node."""
        rc, out, err = ichtriage("backup", *other, *store_args(node.store_dir),
                                 os.path.join(self.work, "backup"))
        self.assertEqual(rc, 1, out)
        self.assertIn(failure, err)
        self.assertIn("'ichtriage backup %s DIR'" % option, err)
        bdir = os.path.join(self.work, "backup2")
        rc, out, err = ichtriage("backup", option, *store_args(node.store_dir), bdir)
        self.assertEqual(rc, 0, err)
        self.assertIn("2 instances, 2 files", out)
        self.assertIn("left out: 1 instances " + left_out, out)
        self.assertIn("event=backup_instance_left_out sop=%s path=%s" % (sop, rel), err)
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        node2 = self.start_node(store_dir=store2, name="node2")
        kept = [f for f in files if dt.sop_uids(f)[1] != sop]
        self.assertEqual(set(node2.instances()), {dt.sop_uids(f)[1] for f in kept})
        self.assert_stored_exactly(node2, kept)
        self.assert_consistent(node2)
        return node2

    def test_a_spool_file_lost_from_the_store(self):
        """One spool file the index lists is gone from the store. Every
        backup fails on it, and the admin is told how to get out; status
        lists it as a problem (it said health ok); `backup
        --leave-out-missing` leaves that instance out, logged, and the
        restored store is consistent."""
        node, files = self.received(series=1, count=3)
        rel, sop, _ = self.copied_last(node, files)
        os.unlink(os.path.join(node.store_dir, rel))
        rc, doc = self.status(node.store_dir, node.port, http_port=node.http_port)
        self.assertEqual(rc, 1, doc)
        self.assertEqual(doc["database"]["files_missing"], 1, doc)
        self.assertEqual(doc["database"]["first_missing_file"], rel)
        self.assertTrue([p for p in doc["problems"] if "--leave-out-missing" in p], doc)
        node2 = self.assert_left_out(node, files, rel, sop, "--leave-out-missing",
                                     "is missing although the index lists it",
                                     "whose files are missing")
        rc, doc = self.status(node2.store_dir, node2.port, http_port=node2.http_port)
        self.assertEqual((rc, doc["database"]["files_missing"]), (0, 0), doc)

    def test_a_spool_file_damaged_in_place(self):
        """One spool file keeps its name and size but not its bytes (a
        flipped byte: a disk or file-system fault). Every backup fails on
        it, naming the way out; `backup --leave-out-damaged` leaves that
        instance out, logged, and the restored store is consistent. There
        was no way out: --leave-out-missing did not cover it."""
        node, files = self.received(series=1, count=3)
        rel, sop, _ = self.copied_last(node, files)
        with open(os.path.join(node.store_dir, rel), "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([(last[0] + 1) % 256]))
        self.assert_left_out(node, files, rel, sop, "--leave-out-damaged",
                             "holds other bytes than its row names although the index lists it",
                             "whose files are damaged in the store", ("--leave-out-missing",))

    def test_spool_files_lost_from_several_series(self):
        """Files lost from three series, two of one and one of each other
        (the backup recounts a series once after the run of its rows):
        `backup --leave-out-missing` leaves all four out and the restored
        store's series counts agree with its rows."""
        node, files = self.received(series=3, count=3)
        lost = files[0:2] + files[3:4] + files[8:9]
        instances = node.instances()
        for f in lost:
            os.unlink(os.path.join(node.store_dir, instances[dt.sop_uids(f)[1]]["file_path"]))
        rc, doc = self.status(node.store_dir, node.port, http_port=node.http_port)
        self.assertEqual(doc["database"]["files_missing"], 4, doc)
        bdir = os.path.join(self.work, "backup")
        rc, out, err = ichtriage("backup", "--leave-out-missing", *store_args(node.store_dir),
                                 bdir)
        self.assertEqual(rc, 0, err)
        self.assertIn("5 instances, 5 files", out)
        self.assertIn("left out: 4 instances whose files are missing", out)
        store2 = os.path.join(self.work, "restored")
        rc, out, err = ichtriage("restore", *store_args(store2), bdir)
        self.assertEqual(rc, 0, err)
        node2 = self.start_node(store_dir=store2, name="node2")
        kept = [f for f in files if f not in lost]
        self.assert_stored_exactly(node2, kept)
        self.assert_consistent(node2)
        counts = sorted(r[0] for r in node2.query("SELECT instance_count FROM series"))
        self.assertEqual(counts, [1, 2, 2])

    def test_backup_while_a_model_is_registered(self):
        """`ichtriage model register` writes the model to a temporary file
        beside its name and renames it; its rename is held 5 s (strace)
        while a backup runs. The backup leaves the temporary file out and
        restores. nn_st_write named it <model>.tmp.<pid>, which the
        backup did not take for a temporary file: it copied it."""
        if not shutil.which("strace"):
            self.skipTest("needs strace")
        shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models",
                               "default.safetensors")
        if not os.path.isfile(shipped):
            self.skipTest("no shipped model in the source tree")
        node, _ = self.received(series=1, count=2)
        models = os.path.join(node.store_dir, "models")
        register = subprocess.Popen(
            ["strace", "-f", "-o", "/dev/null", "-e", "trace=rename", "-e",
             "inject=rename:delay_enter=5000000:when=1", itest.EXE, "model", "--set",
             "store.dir=" + node.store_dir, "register", shipped],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        temp = []
        while not temp and time.monotonic() < deadline:
            temp = [n for n in os.listdir(models) if "tmp" in n] if os.path.isdir(models) else []
            time.sleep(0.05)
        self.assertTrue(temp, "no temporary file seen while registering")
        bdir = os.path.join(self.work, "backup")
        rc, out, err = ichtriage("backup", *store_args(node.store_dir), bdir)
        self.assertEqual(register.wait(60), 0, register.stderr.read().decode())
        self.assertEqual(rc, 0, err)
        self.assertEqual([n for n in os.listdir(os.path.join(bdir, "models"))
                          if "tmp" in n] if os.path.isdir(os.path.join(bdir, "models")) else [],
                         [], "a temporary file of the registration was backed up")
        rc, out, err = ichtriage("restore", *store_args(os.path.join(self.work, "r")), bdir)
        self.assertEqual(rc, 0, err)

    def test_backup_while_receiving(self):
        """Online: a backup taken while a series streams in is consistent,
        holds what was acknowledged before it began, and the stream is not
        disturbed."""
        node, first = self.received(series=1, count=3)
        files = self.gen("stream", count=200, rows=256, cols=256)
        stream = dt.StorescuStream(node.port, files, workdir=self.work)
        self.assertTrue(stream.wait_acked(20), stream.tail())
        bdir = os.path.join(self.work, "backup")
        acked_before = stream.acked
        rc, out, err = ichtriage("backup", *store_args(node.store_dir), bdir)
        acked_after = stream.acked
        r = stream.wait()
        self.assert_all_success(r, files)
        self.assertEqual(rc, 0, err)
        self.assertLess(acked_after, len(files), "the stream ended before the backup: "
                        "nothing was tested; send more")
        store2 = os.path.join(self.work, "restored")
        self.assertEqual(ichtriage("restore", *store_args(store2), bdir)[0], 0)
        node2 = self.start_node(store_dir=store2, name="node2")
        got = set(node2.instances())
        sent = {dt.sop_uids(f)[1] for f in first + files}
        self.assertLessEqual(got, sent)
        self.assertGreaterEqual(len(got), len(first) + acked_before)
        self.assertLessEqual(len(got), len(first) + acked_after)
        self.assert_consistent(node2)
        self.assert_stored_exactly(node2, [f for f in first + files if dt.sop_uids(f)[1] in got])

    def test_a_full_disk_is_said(self):
        """Backup and restore onto a file system too small (a 1 MiB tmpfs):
        both fail saying the disk is full. The read/write copy (another
        file system than the source's) took a short write for an error
        without setting errno and reported copy_file_range's 'Invalid
        cross-device link'."""
        node = self.start_node()
        files = self.gen("big", count=20, rows=256, cols=256)  # 128 KiB each: 2.5 MiB
        self.assert_all_success(dt.storescu(node.port, files, workdir=self.work), files)
        self.assertEqual(node.stop(), 0)
        small = os.path.join(self.work, "small")
        self.mount_tmpfs(small, 1)
        rc, out, err = ichtriage("backup", *store_args(node.store_dir),
                                 os.path.join(small, "backup"))
        self.assertEqual(rc, 1, out)
        self.assertIn("No space left on device", err)
        self.assertNotIn("cross-device", err)
        bdir = os.path.join(self.work, "backup")
        self.assertEqual(ichtriage("backup", *store_args(node.store_dir), bdir)[0], 0)
        subprocess.run(["umount", small], check=True)
        self.mount_tmpfs(small, 1)
        rc, out, err = ichtriage("restore", *store_args(small), bdir)
        self.assertEqual(rc, 1, out)
        self.assertIn("No space left on device", err)
        self.assertNotIn("cross-device", err)

    def test_restore_refuses(self):
        node, _ = self.received(series=1, count=2)
        bdir = os.path.join(self.work, "backup")
        self.assertEqual(ichtriage("backup", *store_args(node.store_dir), bdir)[0], 0)
        # Backing up into a folder that holds something: refused, without
        # calling the complete backup there incomplete (it did).
        rc, _, err = ichtriage("backup", *store_args(node.store_dir), bdir)
        self.assertEqual(rc, 1, err)
        self.assertIn("exists and is not empty", err)
        self.assertNotIn("not a complete backup", err)
        self.assertEqual(node.stop(), 0)
        # A store that holds data.
        before = tree(node.store_dir)
        rc, _, err = ichtriage("restore", *store_args(node.store_dir), bdir)
        self.assertEqual(rc, 1)
        self.assertIn("not empty", err)
        self.assertEqual(tree(node.store_dir), before)
        # A backup without its MANIFEST (interrupted).
        partial = os.path.join(self.work, "partial")
        shutil.copytree(bdir, partial)
        os.unlink(os.path.join(partial, "MANIFEST"))
        target = os.path.join(self.work, "t1")
        rc, _, err = ichtriage("restore", *store_args(target), partial)
        self.assertEqual(rc, 1)
        self.assertIn("MANIFEST", err)
        self.assertFalse(os.path.exists(target))
        # A backup whose spool file was truncated: found before anything is written.
        broken = os.path.join(self.work, "broken")
        shutil.copytree(bdir, broken)
        victim = sorted(tree(os.path.join(broken, "spool")))[0]
        with open(os.path.join(broken, "spool", victim), "r+b") as f:
            f.truncate(100)
        target = os.path.join(self.work, "t2")
        os.mkdir(target, 0o700)
        rc, _, err = ichtriage("restore", *store_args(target), broken)
        self.assertEqual(rc, 1)
        self.assertIn("missing or not", err)
        self.assertEqual(os.listdir(target), [], "restore wrote before checking the backup")
        # An empty store a node holds (its lock; it would clean up what the
        # restore writes): refused, nothing written.
        import fcntl
        target = os.path.join(self.work, "t3")
        os.mkdir(target, 0o700)
        with open(os.path.join(target, "ichtriage.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rc, _, err = ichtriage("restore", *store_args(target), bdir)
        self.assertEqual(rc, 1)
        self.assertIn("another ichtriage node runs on store.dir", err)
        self.assertEqual(os.listdir(target), ["ichtriage.lock"])
        # Free, the same empty store (a lock file is no data) takes the restore.
        self.assertEqual(ichtriage("restore", *store_args(target), bdir)[0], 0)

    def test_restore_checks_what_the_index_does_not_cover(self):
        """ichtriage.db, models/ and outbox/ are checked against MANIFEST's
        file list before anything is written: a file missing, truncated,
        changed or added is refused. Restore had copied them blindly and
        reported success; the node then failed to load the model. An older
        backup (format 1, no list) is restored with a warning that says
        what could not be checked."""
        node, _ = self.received(series=1, count=2)
        self.assertEqual(node.stop(), 0)
        for name in ("models/active.safetensors", "models/m1.safetensors", "outbox/1-sr.dcm"):
            os.makedirs(os.path.dirname(os.path.join(node.store_dir, name)), exist_ok=True)
            with open(os.path.join(node.store_dir, name), "wb") as f:
                f.write(os.urandom(2000))
        bdir = os.path.join(self.work, "backup")
        rc, out, err = ichtriage("backup", *store_args(node.store_dir), bdir)
        self.assertEqual(rc, 0, err)

        def damaged(name, change):
            """A copy of the backup with change(path of name) applied."""
            copy = os.path.join(self.work, "damaged-%d" % len(os.listdir(self.work)))
            shutil.copytree(bdir, copy)
            change(os.path.join(copy, name))
            return copy

        def flip_last_byte(path):
            with open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                b = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([b[0] ^ 0xFF]))

        def add(path):
            with open(path, "wb") as f:
                f.write(b"x")

        cases = [
            ("outbox/1-sr.dcm", os.unlink, "outbox/1-sr.dcm is missing (MANIFEST lists it)"),
            ("models/active.safetensors", os.unlink, "is missing (MANIFEST lists it)"),
            ("models/m1.safetensors", lambda p: os.truncate(p, 100),
             "m1.safetensors has 100 bytes, MANIFEST lists 2000"),
            ("models/m1.safetensors", flip_last_byte, "does not hold the bytes MANIFEST lists"),
            ("ichtriage.db", flip_last_byte, "ichtriage.db does not hold the bytes MANIFEST lists"),
            ("models/m2.safetensors", add, "is not in the backup's MANIFEST"),
        ]
        for name, change, why in cases:
            copy = damaged(name, change)
            target = os.path.join(self.work, "t-" + os.path.basename(copy))
            os.mkdir(target, 0o700)
            rc, out, err = ichtriage("restore", *store_args(target), copy)
            self.assertEqual(rc, 1, "%s: %s" % (name, out))
            self.assertIn(why, err, name)
            self.assertEqual(os.listdir(target), [], "restore wrote before checking " + name)
        # An older backup: its MANIFEST has format 1 and no file list.
        old = os.path.join(self.work, "old")
        shutil.copytree(bdir, old)
        with open(os.path.join(old, "MANIFEST")) as f:
            lines = [line for line in f if not line.startswith(("file = ", "listed_files = "))]
        with open(os.path.join(old, "MANIFEST"), "w") as f:
            f.write("".join(lines).replace("ichtriage-backup 2", "ichtriage-backup 1"))
        rc, out, err = ichtriage("restore", *store_args(os.path.join(self.work, "r-old")), old)
        self.assertEqual(rc, 0, err)
        self.assertIn("models/ and outbox/ could not be checked", err)
        self.assertIn("event=restore_unchecked", err)
        rc, out, err = ichtriage("restore", *store_args(os.path.join(self.work, "r-new")), bdir)
        self.assertEqual(rc, 0, err)
        self.assertNotIn("could not be checked", err)

    def test_restore_as_root_takes_the_store_owner(self):
        """The admin restores as root into /var/lib/ichtriage made by tmpfiles
        (owned by the service user); the node, run as that user, serves it."""
        if os.geteuid() != 0:
            self.skipTest("needs root to restore for another user")
        user = pwd.getpwnam("nobody")
        node, files = self.received(series=1, count=3)
        bdir = os.path.join(self.work, "backup")
        self.assertEqual(ichtriage("backup", *store_args(node.store_dir), bdir)[0], 0)
        self.assertEqual(node.stop(), 0)
        os.chmod(self.work, 0o711)  # let the user reach its store below it
        store = os.path.join(self.work, "svc")
        os.mkdir(store, 0o700)
        os.chown(store, user.pw_uid, user.pw_gid)
        rc, _, err = ichtriage("restore", *store_args(store), bdir)
        self.assertEqual(rc, 0, err)
        for d, dirs, fs in os.walk(store):
            for x in dirs + fs:
                st = os.stat(os.path.join(d, x))
                self.assertEqual((st.st_uid, st.st_gid), (user.pw_uid, user.pw_gid),
                                 os.path.join(d, x))
                self.assertEqual(stat.S_IMODE(st.st_mode) & 0o077, 0, os.path.join(d, x))
        # The admin looks first, as root: the -wal/-shm files SQLite makes
        # must belong to the user too, or the node could not open its index.
        rc, doc = self.status(store, dt.free_port())
        self.assertEqual(doc["database"]["instances"], 3, doc)
        for name in os.listdir(store):
            st = os.stat(os.path.join(store, name))
            self.assertEqual((st.st_uid, st.st_gid), (user.pw_uid, user.pw_gid), name)
        # The node as that user: opens the restored index, accepts more.
        port = dt.free_port()
        log = open(os.path.join(self.work, "svc.log"), "wb")
        proc = subprocess.Popen(
            ["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid, "--clear-groups",
             "--", itest.EXE, "serve"] + store_args(
                 store, port, ["http.listen=127.0.0.1:%d" % dt.free_port()]),
            stdout=log, stderr=log)
        try:
            self.assertTrue(dt.wait_port(port, timeout=20), read_text(log.name))
            rc, doc = self.status(store, port)
            self.assertEqual(doc["database"]["instances"], 3, doc)
            more = self.gen("more", count=2, rows=64, cols=64)
            r = dt.storescu(port, more, workdir=self.work)
            self.assert_all_success(r, more)
        finally:
            proc.terminate()
            rc = proc.wait(30)
            log.close()
        self.assertEqual(rc, 0, read_text(log.name))
        rc, doc = self.status(store, port)
        self.assertEqual(doc["database"]["instances"], 5)


if __name__ == "__main__":
    sys.exit(itest.main())
