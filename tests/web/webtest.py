"""Shared by the web tests: a node with a random-weight test model
(tests/triage/make_test_model), phantom studies (`ichtriage phantom`, some
renamed with pydicom: an XSS name, a Latin-1 name), curl as the HTTP client,
and waiting for the worklist.

    python3 test_x.py ICHTRIAGE MAKE_TEST_MODEL [unittest args]"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import dicomtest as dt  # noqa: E402,F401
import itest  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "triage"))
import test_triage  # noqa: E402  (its phantom() helper)

MAKE_MODEL = None
XSS_NAME = "<img src=x onerror=alert(1)>"
LATIN1_NAME = "M\u00fcller^J\u00fcrgen"

# Studies for the open list's age window (node_with_rows): (uid, status,
# flagged, probability, arrived ms ago); old ones 10 days ago, the window
# the default 7 days.
_OLD, _NEW = 10 * 86400 * 1000, 86400 * 1000
AGE_WINDOW_ROWS = [("1.9.1", "triaged", 0, 0.2, _OLD),          # needs no action: left out
                   ("1.9.2", "not_applicable", 0, None, _OLD),  # left out
                   ("1.9.3", "triaged", 1, 0.9, _OLD),          # flagged, unreviewed: stays
                   ("1.9.4", "failed", 0, None, _OLD),          # not yet known: stays
                   ("1.9.5", "waiting", 0, None, _OLD),
                   ("1.9.6", "received", 0, None, _OLD),
                   ("1.9.7", "triaged", 0, 0.1, _NEW),
                   ("1.9.8", "not_applicable", 0, None, _NEW)]


def phantom(out, seed, count=1, slices=12, size=64):
    """{study_uid: [files in slice order]} of `ichtriage phantom` studies."""
    return test_triage.phantom(itest.EXE, out, seed, slices=slices, size=size, count=count)


def rename(files, name, charset=None):
    """Sets PatientName (and Specific Character Set) in every file."""
    import pydicom
    for f in files:
        ds = pydicom.dcmread(f)
        if charset:
            ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(f)


def head_first(files):
    """Rewrites files (one series, in slice order from the feet) as a scanner
    that numbers images from the head and runs its columns from the
    patient's front to back: InstanceNumber n..1, ImageOrientationPatient
    1,0,0,0,-1,0 (rows x columns then points to the feet)."""
    import pydicom
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = len(files) - k
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.save_as(f)


def date_study(files, when):
    """Sets StudyDate and StudyTime of files to the datetime when."""
    import pydicom
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyDate = when.strftime("%Y%m%d")
        ds.StudyTime = when.strftime("%H%M%S")
        ds.save_as(f)


def curl(url, method="GET", body=None, headers=(), cookies=None, insecure=False, timeout=20):
    """(status, headers dict lower-case, body bytes) of one request with curl."""
    with tempfile.NamedTemporaryFile(prefix="hdr.", delete=False) as h:
        hdr = h.name
    argv = ["curl", "-s", "-S", "-X", method, "-D", hdr, "-o", "-", "-m", str(timeout)]
    if insecure:
        argv.append("-k")
    if cookies:
        argv += ["-b", cookies, "-c", cookies]
    for k in headers:
        argv += ["-H", k]
    if body is not None:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    p = subprocess.run(argv + [url], input=(data.encode() if isinstance(data, str) else data)
                       if body is not None else None, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    try:
        with open(hdr, "rb") as f:
            lines = f.read().decode("latin-1").splitlines()
    finally:
        os.unlink(hdr)
    if p.returncode != 0 or not lines:
        return None, {}, p.stderr
    status = int(lines[0].split()[1])
    hd = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hd.setdefault(k.strip().lower(), []).append(v.strip())
    return status, hd, p.stdout


def crypt_hash(password, prefix):
    """A crypt(3) hash from libcrypt: prefix "$y$" yescrypt, "$6$" sha512-crypt."""
    import ctypes
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt.restype = ctypes.c_char_p
    salt = lib.crypt_gensalt(prefix.encode(), 0, None, 0)
    return lib.crypt(password.encode(), salt).decode()


class WebTest(itest.NodeTest):
    def tls_files(self):
        """(users file with alice/alice-pw yescrypt and bob/bob-pw sha512-crypt,
        self-signed certificate, key)."""
        cert, key = os.path.join(self.work, "cert.pem"), os.path.join(self.work, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-subj", "/CN=localhost", "-days", "2"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        users = os.path.join(self.work, "users")
        with open(users, "w") as f:
            f.write("# name:hash\nalice:%s\nbob:%s\n" % (crypt_hash("alice-pw", "$y$"),
                                                       crypt_hash("bob-pw", "$6$")))
        return users, cert, key

    def clock_step(self):
        """(env for a node whose wall clock the test moves, step(seconds)
        that moves it that far from the real one): tests/web/clockstep.c
        preloaded. Skipped without the shim (failed where it must be)."""
        shim = os.environ.get("ICHTRIAGE_TEST_CLOCKSTEP")
        if not shim:
            itest.skip_or_fail(self, "no clockstep shim (run through meson test)")
        path = os.path.join(self.work, "clockstep")

        def step(seconds):
            with open(path, "w") as f:
                f.write(str(seconds))
        step(0)
        return {"LD_PRELOAD": shim, "ICHTRIAGE_CLOCKSTEP_FILE": path}, step

    def public_node(self, **extra):
        """A node on 0.0.0.0 with logins and HTTPS; node.base is https://127.0.0.1:port."""
        users, cert, key = self.tls_files()
        port = dt.free_port()
        settings = {"http.listen": "0.0.0.0:%d" % port, "http.users": users,
                    "http.tls_cert": cert, "http.tls_key": key}
        settings.update(extra)
        node = self.web_node(**settings)
        node.base = "https://127.0.0.1:%d" % port
        node.plain = "http://127.0.0.1:%d" % port
        return node

    def make_model(self, threshold="0.5", seed="1"):
        """A test model with random weights drawn from seed."""
        path = os.path.join(self.work, "model-%s-%s.safetensors" % (threshold, seed))
        subprocess.run([MAKE_MODEL, path, "b8,M,b16,M,b16,M,b16,G|", seed, threshold], check=True)
        return path

    def web_node(self, threshold="0.5", env=None, model_seed="1", **extra):
        settings = {"triage.model": self.make_model(threshold, model_seed),
                    "triage.quiet_seconds": 1,
                    "triage.min_slices": 5, "log.level": "info"}
        settings.update(extra)
        node = self.start_node(settings, env=env)
        node.base = "http://127.0.0.1:%d" % node.http_port
        return node

    def node_with_rows(self, rows, **settings):
        """A node (no model) whose index holds rows, each (study_uid, status,
        flagged, probability or None, arrived this many ms ago), written
        straight into its SQLite index; node.base is its URL."""
        settings.setdefault("triage.model", os.path.join(self.work, "none.safetensors"))
        node = self.start_node(settings)
        node.stop()
        import sqlite3
        now = int(time.time() * 1000)
        con = sqlite3.connect(node.db_path)
        con.execute("INSERT INTO patients (patient_id, patient_name) VALUES ('P', 'Doe^J')")
        con.executemany(
            "INSERT INTO studies (study_uid, patient_ref, accession, study_desc, received_at,"
            " updated_at, status, flagged, probability) VALUES (?, 1, ?, 'CT HEAD', ?, ?, ?, ?, ?)",
            [(uid, "A" + uid, now - age, now - age, status, flagged, p)
             for uid, status, flagged, p, age in rows])
        con.commit()
        con.close()
        node.start()
        node.base = "http://127.0.0.1:%d" % node.http_port
        return node

    def event_stream(self, node=None):
        """curl -N on node's /api/events (default self.node's): the process,
        and the list a thread fills with each worklist event as {"event":
        name, "data": parsed JSON} once the first has come (the caller kills
        the process). Pings are left out."""
        events = []
        proc = subprocess.Popen(["curl", "-sN", "-m", "40",
                                 (node or self.node).base + "/api/events"], stdout=subprocess.PIPE)

        def read():
            ev = {}
            for line in proc.stdout:
                line = line.decode().rstrip("\n")
                if not line:
                    if ev and ev.get("event") != "ping":
                        events.append(ev)
                    ev = {}
                elif line.startswith("event: "):
                    ev["event"] = line[7:]
                elif line.startswith("data: "):
                    ev["data"] = json.loads(line[6:])
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        if not events:
            proc.kill()
            proc.wait()
            self.fail("no first event")
        return proc, events

    def get_json(self, node, path, expect=200):
        status, _, body = curl(node.base + path)
        self.assertEqual(status, expect, "%s: %s %r" % (path, status, body[:300]))
        return json.loads(body)

    def send(self, node, files):
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)

    def wait_rows(self, node, studies, statuses=("triaged",), timeout=40):
        """Waits until every study is listed with one of statuses; the list."""
        deadline = time.monotonic() + timeout
        rows = []
        while time.monotonic() < deadline:
            rows = self.get_json(node, "/api/worklist")
            got = {r["study_uid"]: r["status"] for r in rows}
            if all(got.get(s) in statuses for s in studies):
                return rows
            time.sleep(0.2)
        self.fail("studies not %s after %ss: %r\n%s" % (statuses, timeout, rows, node.log_tail()))

    def cli_worklist(self, node, status=None):
        argv = [itest.EXE, "worklist", "-c", "/dev/null", "--set",
                "store.dir=" + node.store_dir, "--json"] + (["--status", status] if status else [])
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        return json.loads(p.stdout)


def main():
    global MAKE_MODEL
    if len(sys.argv) < 3:
        sys.stderr.write("usage: %s ICHTRIAGE MAKE_TEST_MODEL [unittest args]\n" % sys.argv[0])
        return 2
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    return itest.main()
