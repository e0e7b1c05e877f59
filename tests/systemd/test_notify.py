#!/usr/bin/python3
"""Issue 9: the sd_notify protocol as systemd sees it, and reload.

A test binds an AF_UNIX datagram socket, starts `ichtriage serve` with
NOTIFY_SOCKET (and WATCHDOG_USEC) pointing at it, as systemd does for
Type=notify, and reads what the node says: READY=1 once it listens (never
when it cannot start), WATCHDOG=1 at least every WATCHDOG_USEC/2, STATUS=,
STOPPING=1 on SIGTERM. SIGHUP (ExecReload) with a good config applies it,
with a bad one keeps the old one and the node keeps serving.

    test_notify.py /path/to/ichtriage"""
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402


class Listener:
    """What the node sent to its NOTIFY_SOCKET (dicomtest's listen_notify),
    each message parsed and stamped with the time it was read."""

    def __init__(self, node):
        self.node = node
        self.seen = 0
        self.messages = []  # (monotonic time, {key: value})

    def pump(self, timeout):
        notes = self.node.notifications()
        for text in notes[self.seen:]:
            fields = {}
            for line in text.split("\n"):
                if "=" in line:
                    k, v = line.split("=", 1)
                    fields[k] = v
            self.messages.append((time.monotonic(), fields))
        fresh = len(notes) > self.seen
        self.seen = len(notes)
        if not fresh:
            time.sleep(min(max(timeout, 0.001), 0.01))
        return fresh

    def wait(self, key, value=None, timeout=10.0, count=1, since=0.0):
        """The times of the first count messages with key (=value) after since."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump(0)
            hits = [t for t, f in self.messages if t >= since and key in f
                    and (value is None or f[key] == value)]
            if len(hits) >= count or time.monotonic() >= deadline:
                return hits[:count]


class ConfNode(dt.Node):
    """A node that reads everything from its own config file (so that a
    reload, which rereads only the file, sees the same settings)."""

    def __init__(self, exe, workdir):
        super().__init__(exe, workdir)
        self.conf = os.path.join(workdir, "ichtriage.conf")
        self.write_conf()

    def write_conf(self, extra=""):
        os.makedirs(self.workdir, exist_ok=True)
        sections = {}
        for k, v in self.settings.items():
            s, key = k.split(".", 1)
            sections.setdefault(s, []).append("%s = %s" % (key, v))
        text = "".join("[%s]\n%s\n" % (s, "\n".join(l)) for s, l in sections.items())
        with open(self.conf + ".new", "w") as f:
            f.write(text + extra)
        os.rename(self.conf + ".new", self.conf)

    def argv(self):
        return [self.exe, "serve", "-c", self.conf]


class Notify(itest.NodeTest):
    def node(self, watchdog_usec=1000000, name="node"):
        n = ConfNode(itest.EXE, os.path.join(self.work, name))
        n.listen_notify(watchdog_usec)
        self.addCleanup(n.notify_sock.close)
        self.listener = Listener(n)
        self.nodes.append(n)
        return n

    def test_ready_watchdog_status_stopping(self):
        n = self.node(watchdog_usec=1000000)
        t0 = time.monotonic()
        n.start()
        ready = self.listener.wait("READY", "1", timeout=10)
        self.assertTrue(ready, "no READY=1; got %s" % self.listener.messages)
        self.assertTrue(dt.wait_port(n.port, timeout=0.5), "READY=1 but the port does not accept")
        # WATCHDOG_USEC=1 s: systemd kills a service silent for 1 s, so the
        # node must ping at least twice a second.
        pings = self.listener.wait("WATCHDOG", "1", timeout=3.0, count=5, since=ready[0])
        self.assertEqual(len(pings), 5, "WATCHDOG=1 not sent every WATCHDOG_USEC/2: %d in 3 s "
                         "after READY=1" % len(pings))
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        self.assertLess(max(gaps), 0.9, "watchdog gaps %s" % gaps)
        status = [f["STATUS"] for _, f in self.listener.messages if "STATUS" in f]
        self.assertTrue(status, "no STATUS=")
        self.assertTrue(any("receiving" in x for x in status), status)
        n.proc.send_signal(signal.SIGTERM)
        self.assertTrue(self.listener.wait("STOPPING", "1", timeout=10), "no STOPPING=1")
        self.assertEqual(n.proc.wait(30), 0)
        self.assertLess(ready[0] - t0, 30)

    def test_no_ready_when_the_port_is_taken(self):
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        n = self.node()
        blocker.bind(("0.0.0.0", n.port))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        with self.assertRaises(dt.NodeError):
            n.start(timeout=15)
        self.listener.wait("READY", "1", timeout=1.0)
        self.assertFalse([f for _, f in self.listener.messages if f.get("READY") == "1"],
                         "READY=1 although the node could not listen")
        self.assertNotEqual(n.proc.returncode, 0)

    def test_reload_good_config(self):
        files = self.gen("ct", count=2, rows=64, cols=64)
        n = self.node()
        n.settings["log.level"] = "info"
        n.write_conf()
        n.start()
        self.assertTrue(self.listener.wait("READY", "1"))
        r = dt.storescu(n.port, files[:1], workdir=self.work)
        self.assertEqual(r.rc, 0, r.output[-2000:])
        self.assertNotIn("level=debug", n.log(), "debug lines at log.level=info")
        # A good config, twice: debug logging; then an allowlist without STORESCU.
        n.settings["log.level"] = "debug"
        n.write_conf()
        n.proc.send_signal(signal.SIGHUP)
        self.assertTrue(n.wait_event("reloaded", timeout=10), n.log_tail())
        r = dt.storescu(n.port, files[1:], workdir=self.work)
        self.assertEqual(r.rc, 0, r.output[-2000:])
        deadline = time.monotonic() + 5
        while "level=debug" not in n.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("level=debug", n.log(), "log.level=debug not applied by reload (a stored "
                      "instance logged no debug line)")
        n.settings["dicom.allowed_peers"] = "SOMEONE_ELSE"
        n.write_conf()
        n.proc.send_signal(signal.SIGHUP)
        self.assertTrue(n.wait_event("reloaded", timeout=10, count=2), n.log_tail())
        self.assertEqual(n.events("reload_refused"), [])
        self.assertEqual(n.events("reload_needs_restart"), [], n.log_tail())
        rc, out = dt.echoscu(n.port)
        self.assertNotEqual(rc, 0, "allowlist not applied by reload: " + out)
        self.assertTrue(n.wait_event("association_rejected", timeout=5), n.log_tail())
        self.assertTrue(n.alive())

    def test_reload_port_change_needs_restart(self):
        n = self.node()
        n.start()
        old_port = n.port
        n.settings["dicom.port"] = str(dt.free_port())
        n.write_conf()
        n.proc.send_signal(signal.SIGHUP)
        self.assertTrue(n.wait_event("reload_needs_restart", timeout=10), n.log_tail())
        self.assertIn("key=dicom.port", "\n".join(n.events("reload_needs_restart")))
        rc, out = dt.echoscu(old_port)
        self.assertEqual(rc, 0, "the node left its port on reload: " + out)

    def test_reload_bad_config_keeps_the_old_one(self):
        n = self.node()
        n.start()
        self.assertTrue(self.listener.wait("READY", "1"))
        n.write_conf(extra="[dicom]\nno_such_key = 1\n")
        n.proc.send_signal(signal.SIGHUP)
        self.assertTrue(n.wait_event("reload_refused", timeout=10), n.log_tail())
        self.assertEqual(n.events("reloaded"), [])
        n.settings["log.level"] = "bogus"
        n.write_conf()
        n.proc.send_signal(signal.SIGHUP)
        self.assertTrue(n.wait_event("reload_refused", timeout=10, count=2), n.log_tail())
        self.assertTrue(n.alive(), "node died on a bad reload")
        rc, out = dt.echoscu(n.port)
        self.assertEqual(rc, 0, out)
        # Still pinging the watchdog after the refused reloads.
        since = time.monotonic()
        self.assertEqual(len(self.listener.wait("WATCHDOG", "1", timeout=3, count=2, since=since)), 2)


if __name__ == "__main__":
    sys.exit(itest.main())
