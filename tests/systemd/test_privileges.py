#!/usr/bin/python3
"""Issue 9: the node needs no privilege. As an unprivileged user with no
capability it serves a port >= 1024; port 104 needs CAP_NET_BIND_SERVICE
and nothing else (what systemd/port104.conf.example grants), and without it
the node says why and exits non-zero.

    test_privileges.py /path/to/ichtriage"""
import os
import pwd
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402


class Privileges(itest.NodeTest):
    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.skipTest("needs root to switch to an unprivileged user")
        self.user = pwd.getpwnam("nobody")
        os.chmod(self.work, 0o711)
        self.store = os.path.join(self.work, "store")
        os.mkdir(self.store, 0o700)
        os.chown(self.store, self.user.pw_uid, self.user.pw_gid)
        self.procs = []

    def tearDown(self):
        for p, log in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
            log.close()
        super().tearDown()

    def serve(self, port, caps):
        """The node as nobody, with exactly the capabilities caps (e.g.
        "+net_bind_service" or "-all"), in its inheritable, ambient and
        bounding sets."""
        log = open(os.path.join(self.work, "node-%d.log" % port), "wb")
        ambient = ["--ambient-caps=" + caps] if caps.startswith("+") else []
        argv = ["setpriv", "--reuid=%d" % self.user.pw_uid, "--regid=%d" % self.user.pw_gid,
                "--clear-groups", "--inh-caps=" + caps] + ambient + [
                "--bounding-set=-all" + ("," + caps if caps.startswith("+") else ""), "--",
                itest.EXE, "serve", "-c", "/dev/null", "--set", "store.dir=" + self.store,
                "--set", "store.min_free_mb=0", "--set", "dicom.port=%d" % port,
                "--set", "http.listen=127.0.0.1:%d" % dt.free_port()]
        p = subprocess.Popen(argv, stdout=log, stderr=log)
        self.procs.append((p, log))
        return p, log.name

    def log(self, path):
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def test_high_port_without_any_capability(self):
        port = dt.free_port()
        p, log = self.serve(port, "-all")
        self.assertTrue(dt.wait_port(port, timeout=20), self.log(log))
        rc, out = dt.echoscu(port)
        self.assertEqual(rc, 0, out)
        p.terminate()
        self.assertEqual(p.wait(30), 0, self.log(log))

    def test_port_104(self):
        if dt.wait_port(104, timeout=0.2):
            self.skipTest("something already listens on port 104")
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            unprivileged_start = int(f.read())
        if unprivileged_start > 104:
            p, log = self.serve(104, "-all")
            self.assertNotEqual(p.wait(30), 0, "bound port 104 without CAP_NET_BIND_SERVICE")
            self.assertIn("event=start_failed", self.log(log))
        p, log = self.serve(104, "+net_bind_service")
        self.assertTrue(dt.wait_port(104, timeout=20), self.log(log))
        rc, out = dt.echoscu(104)
        self.assertEqual(rc, 0, out)
        p.terminate()
        self.assertEqual(p.wait(30), 0, self.log(log))


if __name__ == "__main__":
    sys.exit(itest.main())
