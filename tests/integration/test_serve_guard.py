"""What `ichtriage serve` refuses at start and on reload, so that an admin's
slip never costs acknowledged instances or a node that cannot restart:

- a second node on the same store.dir refuses to start, before it cleans up
  anything (its start-up clean-up would delete the files the first node is
  receiving, and those it renamed into the spool but has not indexed yet);
- a store whose index is gone (ichtriage.db deleted or moved aside) but
  whose spool holds instances: the node refuses to start instead of deleting
  every instance as unindexed;
- a configuration the node refuses exits 2 with event=start_failed before
  it makes anything, and SIGHUP with a value a restart would refuse is
  refused (the old configuration stays) by the same checks; a changed key
  that only a restart applies says so (reload_needs_restart);
- the walk that checks every spool file against the index runs after a
  crash, not after a clean stop (on a store of millions it takes minutes).

    python3 test_serve_guard.py ICHTRIAGE"""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402


def spool_files(store):
    out = []
    for root, _, names in os.walk(os.path.join(store, "spool")):
        out += [os.path.join(root, n) for n in names if n.endswith(".dcm")]
    return sorted(out)


class ServeGuard(itest.NodeTest):
    def test_second_node_on_the_same_store_refuses_and_removes_nothing(self):
        first = self.start_node()
        # What a running node has in flight: a file being received, and one
        # renamed into the spool whose row is not committed yet.
        tmp = os.path.join(first.store_dir, "spool", ".tmp", "in-flight.part")
        renamed = os.path.join(first.store_dir, "spool", "1.2.3", "1.2.3.4", "1.2.3.4.5.dcm")
        os.makedirs(os.path.dirname(renamed))
        for path in (tmp, renamed):
            with open(path, "wb") as f:
                f.write(b"\0" * 132)
        # Its own ports: only the store is shared.
        second = dt.Node(itest.EXE, os.path.join(self.work, "second"), store_dir=first.store_dir)
        with self.assertRaises(dt.NodeError) as cm:
            second.start(timeout=20)
        self.assertIn("another ichtriage node runs on store.dir", str(cm.exception))
        self.assertTrue(os.path.exists(tmp))
        self.assertTrue(os.path.exists(renamed))
        self.assertTrue(first.alive())
        # The lock is the running node's alone: once it stops, a node starts.
        self.assertEqual(first.stop(), 0)
        second.start()
        self.nodes.append(second)

    def test_spool_checked_after_a_crash_not_after_a_clean_stop(self):
        node = self.start_node()
        files = self.gen("ct", count=2, rows=64, cols=64)
        self.assert_all_success(dt.storescu(node.port, files, workdir=self.work), files)
        stray = os.path.join(node.store_dir, "spool", "1.2.3", "1.2.3.4", "1.2.3.4.5.dcm")
        os.makedirs(os.path.dirname(stray))
        with open(stray, "wb") as f:
            f.write(b"\0" * 132)
        # A clean stop: every rename has its row, so the next start skips
        # the walk over the spool (the stray file, not the node's, stays).
        self.assertEqual(node.stop(), 0)
        node.start()
        self.assertIn("after=clean_stop", node.events("recovered")[-1])
        self.assertTrue(os.path.exists(stray))
        # A crash: the next start checks every file, and removes the stray.
        node.proc.kill()
        node.proc.wait()
        node.start()
        self.assertIn("after=crash_or_first_start", node.events("recovered")[-1])
        self.assertIn("unindexed_files_removed=1", node.events("recovered")[-1])
        self.assertFalse(os.path.exists(stray))
        self.assertEqual(len(spool_files(node.store_dir)), 2)

    def test_lost_index_with_instances_in_the_spool_refuses_to_start(self):
        node = self.start_node()
        files = self.gen("ct", count=3, rows=64, cols=64)
        self.assert_all_success(dt.storescu(node.port, files, workdir=self.work), files)
        self.assertEqual(node.stop(), 0)
        stored = spool_files(node.store_dir)
        self.assertEqual(len(stored), 3)
        for suffix in ("", "-wal", "-shm"):
            path = os.path.join(node.store_dir, "ichtriage.db" + suffix)
            if os.path.exists(path):
                os.unlink(path)
        # Refused at every start, not only the first (systemd restarts it
        # 5 s later): the refused start used to create an empty index, and
        # the next one removed every instance as unindexed. Without the
        # clean-stop marker too, as after a crash.
        marker = os.path.join(node.store_dir, "spool", ".clean-shutdown")
        for attempt in range(3):
            if attempt == 2 and os.path.exists(marker):
                os.unlink(marker)
            with self.assertRaises(dt.NodeError) as cm:
                node.start(timeout=20)
            self.assertIn("refusing to delete them", str(cm.exception))
            self.assertEqual(spool_files(node.store_dir), stored)
            self.assertFalse(os.path.exists(os.path.join(node.store_dir, "ichtriage.db")))

    def test_empty_index_with_instances_in_the_spool_refuses_to_start(self):
        """An empty ichtriage.db (a truncated copy, "> ichtriage.db") is a
        valid empty database to SQLite: the node made a fresh schema in it,
        and the start-up walk removed every stored instance as unindexed.
        Now it is refused like a missing index, and so is a database with
        no schema of the node's (user_version 0)."""
        node = self.start_node()
        files = self.gen("ct", count=3, rows=64, cols=64)
        self.assert_all_success(dt.storescu(node.port, files, workdir=self.work), files)
        node.kill9()  # as after a crash: the start-up walk runs
        stored = spool_files(node.store_dir)
        self.assertEqual(len(stored), 3)
        db = os.path.join(node.store_dir, "ichtriage.db")
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        open(db, "w").close()
        with self.assertRaises(dt.NodeError) as cm:
            node.start(timeout=20)
        self.assertIn("is missing or empty but the spool holds 3 instance files", str(cm.exception))
        self.assertEqual(spool_files(node.store_dir), stored)
        self.assertEqual(os.path.getsize(db), 0, "the refused start left the index as it was")
        # Nor do the node's other commands make a schema in it (an admin's
        # look at the worklist, the retraining timer reading reviews): the
        # next start would have taken it for the index and emptied the spool.
        for cmd in (["worklist"], ["train", "--reviews", "--epochs1", "1", "-o",
                                   os.path.join(self.work, "m.safetensors")]):
            r = subprocess.run([itest.EXE, *cmd, "-c", "/dev/null", "--set",
                                "store.dir=" + node.store_dir], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=120)
            self.assertNotEqual(r.returncode, 0, (cmd, r.stdout))
            self.assertIn("holds no index of the node's", r.stderr, cmd)
            self.assertEqual(os.path.getsize(db), 0, cmd)
        with self.assertRaises(dt.NodeError):
            node.start(timeout=20)
        self.assertEqual(spool_files(node.store_dir), stored)
        sqlite3.connect(db).execute("CREATE TABLE notes (x)").connection.commit()
        with self.assertRaises(dt.NodeError) as cm:
            node.start(timeout=20)
        self.assertIn("refusing to delete them", str(cm.exception))
        self.assertEqual(spool_files(node.store_dir), stored)

    def write_conf(self, node, extra):
        settings = dict(node.settings)
        settings.update(extra)
        with open(node.conf, "w") as f:
            for k, v in settings.items():
                f.write("[%s]\n%s = %s\n" % (k.split(".")[0], k.split(".")[1], v))

    def config_node(self, extra):
        """A node that reads its settings from a file (a reload reads it again)."""
        node = dt.Node(itest.EXE, os.path.join(self.work, "node"))
        node.conf = os.path.join(self.work, "node.conf")
        self.write_conf(node, extra)
        node.argv = lambda: [itest.EXE, "serve", "-c", node.conf]
        self.nodes.append(node)
        return node.start()

    def reload(self, node, extra, event):
        self.write_conf(node, extra)
        n = len(node.events(event))
        node.proc.send_signal(signal.SIGHUP)
        self.assertTrue(node.wait_event(event, count=n + 1), node.log_tail())
        return node.events(event)[-1]

    def test_reload_refuses_what_a_restart_would_and_names_restart_keys(self):
        node = self.config_node({"triage.quiet_seconds": 2})
        for key, bad in (("triage.quiet_seconds", "abc"), ("nn.device", "quantum"),
                         ("log.level", "loud"), ("pacs.destinations", "PACS@nowhere")):
            line = self.reload(node, {key: bad}, "reload_refused")
            self.assertIn(key if key != "pacs.destinations" else "PACS@nowhere", line)
        self.assertEqual(node.events("reloaded"), [])
        # A TLS key file that is not there would stop the next start: refused too.
        line = self.reload(node, {"dicom.tls_port": dt.free_port(),
                                  "dicom.tls_cert": "/nonexistent.pem",
                                  "dicom.tls_key": "/nonexistent.key"}, "reload_refused")
        self.assertIn("/nonexistent", line)
        # What only the start checked had been "reloaded", and the next
        # restart refused it: HTTP off loopback without logins, a DICOM TLS
        # port without its certificate, a trusted proxy that is a name.
        for extra, why in (({"http.listen": "0.0.0.0:%d" % dt.free_port()},
                            "http.users, http.tls_cert and http.tls_key are required"),
                           ({"dicom.tls_port": dt.free_port()},
                            "dicom.tls_cert and dicom.tls_key are needed"),
                           ({"http.trusted_proxies": "nginx.local"}, "'nginx.local' is not an IP"),
                           # no result would ever be sent (their deliveries collide)
                           ({"pacs.destinations": "A@127.0.0.1:104,A@127.0.0.1:104"},
                            "'A@127.0.0.1:104' is listed twice")):
            self.assertIn(why, self.reload(node, extra, "reload_refused"))
        self.assertEqual(node.events("reloaded"), [])
        # A valid change that only a restart applies: reloaded, with the key
        # named; the open list's age window is applied, so not named.
        self.reload(node, {"triage.quiet_seconds": 3, "store.retention_days": 30,
                           "http.worklist_days": 30}, "reloaded")
        keys = sorted(e.split("key=")[1] for e in node.events("reload_needs_restart"))
        self.assertEqual(keys, ["store.retention_days", "triage.quiet_seconds"])
        self.assertTrue(node.alive())


    def test_refused_configuration_exits_2_with_start_failed_before_the_store(self):
        """A configuration the node refuses exits 2 (the unit does not
        restart it: RestartPreventExitStatus=2) with event=start_failed,
        which docs/operations.md tells admins to look for; it had printed
        only a line of its own. A bad PACS destination list and a DICOM TLS
        port without its certificate were refused only after the index was
        made."""
        for extra, why in (({"dicom.port": "abc"}, "dicom.port"),
                           ({"pacs.destinations": "PACS@nowhere"}, "PACS@nowhere"),
                           ({"pacs.destinations": "A@127.0.0.1:104,A@127.0.0.1:104 "},
                            "'A@127.0.0.1:104' is listed twice"),
                           ({"dicom.tls_port": dt.free_port()},
                            "dicom.tls_cert and dicom.tls_key are needed")):
            node = dt.Node(itest.EXE, os.path.join(self.work, "refused"), settings=extra)
            shutil.rmtree(node.store_dir, ignore_errors=True)
            r = subprocess.run(node.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, timeout=30)
            self.assertEqual(r.returncode, 2, r.stderr)
            failed = [l for l in r.stderr.splitlines() if "event=start_failed" in l]
            self.assertTrue(failed and why in failed[0], r.stderr)
            self.assertFalse(os.path.exists(os.path.join(node.store_dir, "ichtriage.db")))
        unit = open(os.path.join(os.path.dirname(itest.EXE), "systemd", "ichtriage.service")).read()
        self.assertIn("RestartPreventExitStatus=2", unit)

    def test_promote_and_rollback_reach_the_running_node(self):
        """`model promote` and `rollback` (and the retraining timer's
        auto-promote) replace models/active.safetensors; the node loads it
        at once, named by its registry id. It had waited for a SIGHUP that
        nothing sent, so an auto-promoted model took effect at whatever
        restart came next while `model list` marked it active."""
        node = self.start_node()
        self.assertTrue(node.wait_event("model_loaded"), node.log_tail())
        shipped = os.path.join(HERE, "..", "..", "models", "default.safetensors")

        def model(*args):
            r = subprocess.run([itest.EXE, "model", "--set", "store.dir=" + node.store_dir,
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr)
            return r.stdout.strip().splitlines()[-1]

        first, second = model("register", shipped), model("register", shipped)
        for args, want in ((("promote", first), first), (("promote", second), second),
                           (("rollback",), first)):
            n = len(node.events("model_loaded"))
            model(*args)
            self.assertTrue(node.wait_event("model_loaded", count=n + 1, timeout=20),
                            node.log_tail())
            self.assertIn('version="%s"' % want, node.events("model_loaded")[-1])
        self.assertEqual(len(node.events("model_active_changed")), 3)

    def test_a_model_copied_in_place_is_loaded_once_whole(self):
        """A model copied over models/active.safetensors in place (cp by
        hand, a write at a time) is loaded once the copy is whole: one
        model_loaded, no half-written file refused. Each write had asked for
        a load, and the node refused the partial file (an error in the log)
        until the copy ended."""
        node = self.start_node()
        self.assertTrue(node.wait_event("model_loaded"), node.log_tail())
        shipped = os.path.join(HERE, "..", "..", "models", "default.safetensors")
        r = subprocess.run([itest.EXE, "model", "--set", "store.dir=" + node.store_dir,
                            "register", shipped], stdout=subprocess.PIPE, text=True, timeout=120)
        first = r.stdout.strip().splitlines()[-1]
        subprocess.run([itest.EXE, "model", "--set", "store.dir=" + node.store_dir, "promote",
                        first], check=True, stdout=subprocess.DEVNULL, timeout=120)
        self.assertTrue(node.wait_event("model_loaded", count=2, timeout=20), node.log_tail())
        time.sleep(1)
        loaded = len(node.events("model_loaded"))
        data = open(shipped, "rb").read()
        with open(os.path.join(node.store_dir, "models", "active.safetensors"), "r+b") as f:
            f.truncate(0)
            step = len(data) // 8 + 1
            for k in range(0, len(data), step):
                f.write(data[k:k + step])
                f.flush()
                time.sleep(0.15)
        self.assertTrue(node.wait_event("model_loaded", count=loaded + 1, timeout=20),
                        node.log_tail())
        time.sleep(1.5)
        self.assertEqual(len(node.events("model_loaded")), loaded + 1, node.log_tail())
        self.assertEqual(node.events("model_reload_refused"), [])

    def test_open_files_limit_raised_to_the_hard_limit(self):
        # systemd's soft limit is 1024, short of 1000 associations' sockets
        # and temp files; the node takes the hard limit it is allowed.
        node = dt.Node(itest.EXE, os.path.join(self.work, "node"))
        argv = node.argv
        node.argv = lambda: ["prlimit", "--nofile=256:4096"] + argv()
        self.nodes.append(node)
        node.start()
        with open("/proc/%d/limits" % node.proc.pid) as f:
            line, = [x for x in f if x.startswith("Max open files")]
        self.assertEqual(line.split()[3:5], ["4096", "4096"], line)


if __name__ == "__main__":
    sys.exit(itest.main())
