#!/usr/bin/python3
"""Issue 9: `meson install` into a DESTDIR puts every file in its place, the
sysusers.d and tmpfiles.d fragments create the user and /var/lib/ichtriage
(owned by it, 0700) in that root, the units and drop-ins pass
`systemd-analyze verify --root`, and `systemd-analyze security` rates the
node's unit 2.0 or lower.

    test_units.py /path/to/ichtriage --build-root=... --prefix=... (see meson.build)"""
import datetime
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import itest  # noqa: E402

ARGS = {}
EXE = None
MAX_EXPOSURE = 2.0


def run(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def exposure(output):
    """The overall exposure level from `systemd-analyze security` text."""
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    return float(m.group(1)) if m else None


class Units(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not shutil.which("systemd-analyze"):
            raise unittest.SkipTest("systemd-analyze not installed (tools/install-deps.sh)")
        cls.root = tempfile.mkdtemp(prefix="ichtriage-destdir.")
        p = run([ARGS["meson"], "install", "-C", ARGS["build-root"], "--destdir", cls.root,
                 "--no-rebuild", "--quiet"])
        if p.returncode != 0:
            raise AssertionError("meson install failed:\n" + p.stdout.decode(errors="replace"))
        cls.installed = sorted("/" + os.path.relpath(os.path.join(d, f), cls.root)
                               for d, _, files in os.walk(cls.root) for f in files)
        # systemd-analyze verify --root resolves everything inside the root:
        # the units ours depend on (sysinit.target, ...) and /bin/kill of
        # ExecReload. Give it the host's, as a package's root would have them.
        os.makedirs(os.path.join(cls.root, "usr/lib/systemd"), exist_ok=True)
        shutil.copytree("/usr/lib/systemd/system", os.path.join(cls.root, "usr/lib/systemd/system"),
                        symlinks=True, dirs_exist_ok=True)
        os.makedirs(os.path.join(cls.root, "usr/bin"), exist_ok=True)
        if not os.path.lexists(os.path.join(cls.root, "bin")):
            os.symlink("usr/bin", os.path.join(cls.root, "bin"))
        shutil.copy2(shutil.which("kill") or "/usr/bin/kill", os.path.join(cls.root, "usr/bin/kill"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def dest(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def unit_text(self, name):
        with open(self.dest(os.path.join(ARGS["unitdir"], name))) as f:
            return f.read()

    def directives(self, name):
        """key -> list of values of the unit file (comments dropped)."""
        out = {}
        for line in self.unit_text(name).splitlines():
            line = line.strip()
            if not line or line[0] in "#;[" or "=" not in line:
                continue
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
        return out

    def verify(self, *units):
        p = run(["systemd-analyze", "verify", "--man=no", "--root=" + self.root] + list(units))
        out = p.stdout.decode(errors="replace")
        self.assertEqual(p.returncode, 0, out)
        self.assertEqual(out.strip(), "", "systemd-analyze verify is not clean:\n" + out)

    def security(self, unit):
        p = run(["systemd-analyze", "security", "--offline=true", "--root=" + self.root, unit])
        out = p.stdout.decode(errors="replace")
        level = exposure(out)
        self.assertIsNotNone(level, "no exposure level in:\n" + out)
        return level, out

    def add_dropin(self, unit, example, name):
        d = self.dest("/etc/systemd/system/%s.d" % unit)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, name)
        shutil.copy(self.dest(os.path.join(ARGS["docdir"], "examples", example)), path)
        self.addCleanup(os.unlink, path)

    # --- the tree ---------------------------------------------------------
    def test_tree(self):
        exe = self.dest(os.path.join(ARGS["bindir"], "ichtriage"))
        self.assertTrue(os.access(exe, os.X_OK), exe)
        p = run([exe, "--version"])
        self.assertEqual(p.returncode, 0, p.stdout)
        for f in [os.path.join(ARGS["confdir"], "ichtriage.conf"),
                  os.path.join(ARGS["unitdir"], "ichtriage.service"),
                  os.path.join(ARGS["unitdir"], "ichtriage-train.service"),
                  os.path.join(ARGS["unitdir"], "ichtriage-train.timer"),
                  os.path.join(ARGS["sysusersdir"], "ichtriage.conf"),
                  os.path.join(ARGS["tmpfilesdir"], "ichtriage.conf"),
                  os.path.join(ARGS["docdir"], "operations.md"),
                  os.path.join(ARGS["docdir"], "examples", "gpu.conf.example"),
                  os.path.join(ARGS["docdir"], "examples", "port104.conf.example")]:
            self.assertTrue(os.path.isfile(self.dest(f)), "not installed: " + f)
        # The default model, once the source tree has one; no empty folder before.
        model = os.path.join(ARGS["source-root"], "models", "default.safetensors")
        models_dir = self.dest(os.path.join(ARGS["datadir"], "ichtriage", "models"))
        if os.path.isfile(model):
            with open(model, "rb") as a, open(os.path.join(models_dir, "default.safetensors"),
                                             "rb") as b:
                self.assertTrue(a.read() == b.read(), "installed default model differs")
        else:
            self.assertFalse(os.path.exists(models_dir), "empty models folder installed")
        # The installed binary loads the installed model, never the source
        # tree's it was built from (it did, before the installed one).
        store = os.path.join(self.root, "status-store")
        p = subprocess.run([exe, "status", "-c", "/dev/null", "--set", "store.dir=" + store,
                            "--json"], stdout=subprocess.PIPE)
        model = json.loads(p.stdout)["model"]
        where = model.get("path") or model.get("tried")
        self.assertNotIn(ARGS["source-root"] + "/models", where, model)
        # Nothing where a package would not expect it.
        for rel in self.installed:
            self.assertTrue(rel.startswith(ARGS["prefix"] + "/") or
                            rel.startswith(ARGS["confdir"] + "/"), "stray file " + rel)

    def test_installed_config(self):
        with open(os.path.join(ARGS["source-root"], "etc", "ichtriage.conf")) as f:
            src = f.read().splitlines()
        with open(self.dest(os.path.join(ARGS["confdir"], "ichtriage.conf"))) as f:
            inst = f.read().splitlines()
        self.assertEqual(len(src), len(inst))
        diff = [(a, b) for a, b in zip(src, inst) if a != b]
        self.assertEqual(diff, [("dir = ./var", "dir = /var/lib/ichtriage")])
        # The installed binary reads it: status reports that store.dir.
        exe = self.dest(os.path.join(ARGS["bindir"], "ichtriage"))
        p = subprocess.run([exe, "status", "--json", "-c",
                            self.dest(os.path.join(ARGS["confdir"], "ichtriage.conf"))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertIn(b'"store_dir":\t"/var/lib/ichtriage"', p.stdout, p.stdout + p.stderr)

    def test_user_and_state_dir(self):
        p = run(["systemd-sysusers", "--root=" + self.root,
                 self.dest(os.path.join(ARGS["sysusersdir"], "ichtriage.conf"))])
        self.assertEqual(p.returncode, 0, p.stdout)
        with open(self.dest("/etc/passwd")) as f:
            users = {l.split(":")[0]: l.split(":") for l in f if l.strip()}
        self.assertIn("ichtriage", users)
        uid, gid, home, shell = int(users["ichtriage"][2]), int(users["ichtriage"][3]), \
            users["ichtriage"][5], users["ichtriage"][6].strip()
        self.assertLess(uid, 1000, "not a system user")
        self.assertEqual(home, "/var/lib/ichtriage")
        self.assertIn("nologin", shell)
        p = run(["systemd-tmpfiles", "--root=" + self.root, "--create",
                 self.dest(os.path.join(ARGS["tmpfilesdir"], "ichtriage.conf"))])
        self.assertEqual(p.returncode, 0, p.stdout)
        st = os.stat(self.dest("/var/lib/ichtriage"))
        self.assertTrue(stat.S_ISDIR(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o700)
        self.assertEqual((st.st_uid, st.st_gid), (uid, gid))

    # --- the units --------------------------------------------------------
    def test_verify(self):
        self.verify("ichtriage.service", "ichtriage-train.service", "ichtriage-train.timer")

    def test_verify_catches_a_missing_binary(self):
        """The check above can fail: without the installed binary it does."""
        exe = self.dest(os.path.join(ARGS["bindir"], "ichtriage"))
        os.rename(exe, exe + ".away")
        try:
            p = run(["systemd-analyze", "verify", "--man=no", "--root=" + self.root,
                     "ichtriage.service"])
        finally:
            os.rename(exe + ".away", exe)
        self.assertIn(b"is not executable", p.stdout)

    def test_node_unit(self):
        d = self.directives("ichtriage.service")
        exe = os.path.join(ARGS["bindir"], "ichtriage")
        conf = os.path.join(ARGS["confdir"], "ichtriage.conf")
        self.assertEqual(d["ExecStart"], ["%s serve -c %s" % (exe, conf)])
        expect = {
            "Type": "notify", "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure",
            "User": "ichtriage", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/ichtriage",
            "PrivateTmp": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "MemoryDenyWriteExecute": "yes", "ProtectHome": "yes", "PrivateDevices": "yes",
            "LockPersonality": "yes", "RestrictNamespaces": "yes", "RestrictRealtime": "yes",
            "SystemCallArchitectures": "native", "UMask": "0077",
            "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
            "ProtectKernelLogs": "yes",
        }
        for k, v in expect.items():
            self.assertIn(v, d.get(k, []), "%s=%s expected, unit has %s" % (k, v, d.get(k)))
        self.assertIn("@system-service", d["SystemCallFilter"])
        self.assertTrue(int(d["WatchdogSec"][0]) > 0)

    def test_node_security(self):
        level, out = self.security("ichtriage.service")
        self.assertLessEqual(level, MAX_EXPOSURE, out)
        sys.stderr.write("ichtriage.service exposure level: %.1f\n" % level)

    def test_security_score_can_fail(self):
        """The same parse on a unit without hardening reads a high score."""
        path = self.dest("/etc/systemd/system/plain-test.service")
        with open(path, "w") as f:
            f.write("[Service]\nExecStart=%s serve\n" % os.path.join(ARGS["bindir"], "ichtriage"))
        self.addCleanup(os.unlink, path)
        level, out = self.security("plain-test.service")
        self.assertGreater(level, MAX_EXPOSURE, out)

    def test_port104_dropin(self):
        self.add_dropin("ichtriage.service", "port104.conf.example", "port104.conf")
        self.verify("ichtriage.service")
        level, out = self.security("ichtriage.service")
        self.assertLessEqual(level, MAX_EXPOSURE, out)
        # The drop-in is read: the capability shows up among the exposures.
        self.assertRegex(out, r"✗ CapabilityBoundingSet=~CAP_NET_\(BIND_SERVICE")

    def test_gpu_dropin(self):
        self.add_dropin("ichtriage.service", "gpu.conf.example", "gpu.conf")
        self.add_dropin("ichtriage-train.service", "gpu.conf.example", "gpu.conf")
        self.verify("ichtriage.service", "ichtriage-train.service")

    def test_train_units(self):
        d = self.directives("ichtriage-train.service")
        self.assertEqual(d["Type"], ["oneshot"])
        self.assertEqual(d["Nice"], ["19"])
        self.assertEqual(d["IOSchedulingClass"], ["idle"])
        self.assertEqual(d["ExecStart"], [
            "%s train -c %s --reviews --register --cache /var/cache/ichtriage "
            "-o /var/lib/ichtriage/candidate.safetensors" % (
                os.path.join(ARGS["bindir"], "ichtriage"),
                os.path.join(ARGS["confdir"], "ichtriage.conf"))])
        self.assertEqual(d["CacheDirectory"], ["ichtriage"])
        t = self.directives("ichtriage-train.timer")
        self.assertEqual(t["Persistent"], ["true"])
        p = run(["systemd-analyze", "calendar", "--iterations=2", t["OnCalendar"][0]])
        self.assertEqual(p.returncode, 0, p.stdout)
        days = re.findall(rb"(?:Next elapse|Iter\. #2): \w+ (\d{4}-\d\d-\d\d)", p.stdout)
        self.assertEqual(len(days), 2, p.stdout)
        a, b = (datetime.date.fromisoformat(x.decode()) for x in days)
        self.assertEqual((b - a).days, 7, "not weekly: " + p.stdout.decode())
        level, out = self.security("ichtriage-train.service")
        self.assertLessEqual(level, MAX_EXPOSURE, out)


def main():
    global EXE
    argv = [sys.argv[0]]
    for a in sys.argv[1:]:
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            ARGS[k] = v
        elif EXE is None:
            EXE = a
        else:
            argv.append(a)
    prog = unittest.main(module="__main__", argv=argv, exit=False, verbosity=2)
    return itest.exit_code(prog.result)


if __name__ == "__main__":
    sys.exit(main())
