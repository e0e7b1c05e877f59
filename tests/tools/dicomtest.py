"""Shared helpers of the integration tests and benchmarks: start and stop the
node, run dcmtk's storescu/echoscu and read what each instance got back, read
the spool and the index.

Uses Debian's /usr/bin/python3 standard library only (plus pydicom where a
helper says so)."""
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GEN_CT = os.path.join(HERE, "gen_ct.py")
PYTHON = "/usr/bin/python3"


_held_ports = []


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A TCP port for a node or peer under test to listen on, nobody else's.

    Asking the kernel for port 0 and closing it is racy: the port comes from
    the ephemeral range, so until the node binds it, any outgoing connection
    on the machine (storescu, a browser, another test) may be given it as its
    source port. So the port is taken below the ephemeral range, where the
    kernel never hands ports out by itself, and reserved among the tests
    (meson runs several at once) by an flock on a file named after it, held
    until this process exits."""
    top = min(_ephemeral_low(), 32768)
    bottom = 20000
    if top - bottom < 1000:
        bottom = 1024
    lockdir = os.path.join(tempfile.gettempdir(), "ichtriage-test-ports")
    if not os.path.isdir(lockdir):
        os.makedirs(lockdir, exist_ok=True)
        try:
            os.chmod(lockdir, 0o1777)  # tests that run as another user
        except OSError:
            pass
    span = top - bottom
    start = (os.getpid() * 7919 + len(_held_ports) * 101) % span
    for i in range(span):
        port = bottom + (start + i) % span
        try:
            fd = os.open(os.path.join(lockdir, str(port)),
                         os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            os.close(fd)
            continue
        # Kept open, out of the way of low descriptor numbers that helpers
        # hand to children; not inherited by them (close-on-exec).
        try:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 512)
            os.close(fd)
            fd = high
        except OSError:  # a descriptor limit below 512
            pass
        _held_ports.append(fd)
        return port
    raise OSError("no free TCP port in %d-%d" % (bottom, top - 1))


def wait_port(port, timeout=10.0, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EventStream:
    """GET url (server-sent events) with curl; .events collects
    {"event", "data" (parsed JSON), "at" (time.monotonic())} as they come.
    close() ends it."""

    def __init__(self, url, timeout=120):
        self.events = []
        self.proc = subprocess.Popen(["curl", "-sN", "-m", str(timeout), url],
                                     stdout=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        ev = {}
        for line in self.proc.stdout:
            line = line.decode().rstrip("\n")
            if not line:
                if ev:
                    ev["at"] = time.monotonic()
                    self.events.append(ev)
                ev = {}
            elif line.startswith("event: "):
                ev["event"] = line[7:]
            elif line.startswith("data: "):
                ev["data"] = json.loads(line[6:])

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


class NodeError(Exception):
    pass


class Node:
    """One `ichtriage serve` process with its own store.dir and ports.

    settings: dict of config keys (section.key) passed with --set; the test's
    defaults put everything in store_dir and on free ports. The log (stderr)
    goes to store_dir/../node.log and is read with log()/events()."""

    def __init__(self, exe, workdir, settings=None, store_dir=None):
        self.exe = exe
        self.workdir = workdir
        self.store_dir = store_dir or os.path.join(workdir, "store")
        self.port = free_port()
        self.http_port = free_port()
        self.settings = {
            "dicom.port": str(self.port),
            "dicom.aetitle": "ICHTRIAGE",
            "store.dir": self.store_dir,
            "store.min_free_mb": "0",
            "http.listen": "127.0.0.1:%d" % self.http_port,
            "log.level": "debug",
        }
        if settings:
            self.settings.update({k: str(v) for k, v in settings.items()})
        self.log_path = os.path.join(workdir, "node.log")
        self.proc = None
        self._log_offset_at_start = 0
        self.notify_sock = None   # see listen_notify()
        self.env = {}             # set in the node's environment, over the test's
        self.notes = []

    def listen_notify(self, watchdog_usec=1000000):
        """Before start(): receive the node's sd_notify messages (READY=1,
        STATUS=..., WATCHDOG=1, STOPPING=1) on a socket of our own, as
        systemd would; a watchdog of watchdog_usec makes the node send them
        often. Read them with notifications()."""
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "notify.sock")
        if os.path.exists(path):
            os.unlink(path)
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(path)
        self.notify_sock.setblocking(False)
        self.notify_env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(watchdog_usec)}

    def notifications(self):
        """Every sd_notify message received so far, oldest first."""
        while self.notify_sock is not None:
            try:
                self.notes.append(self.notify_sock.recv(65536).decode("utf-8", "replace"))
            except BlockingIOError:
                break
        return list(self.notes)

    @property
    def aet(self):
        return self.settings["dicom.aetitle"]

    def argv(self):
        # ICHTRIAGE_TEST_WRAPPER (e.g. "valgrind --error-exitcode=99"): the
        # node runs under it (issue 10's memcheck run in .ci/run).
        argv = shlex.split(os.environ.get("ICHTRIAGE_TEST_WRAPPER", ""))
        if argv:  # found on the test's PATH, whatever the node's (self.env)
            argv[0] = shutil.which(argv[0]) or argv[0]
        argv += [self.exe, "serve", "-c", "/dev/null"]
        for k, v in self.settings.items():
            argv += ["--set", "%s=%s" % (k, v)]
        return argv

    def start(self, timeout=30.0):
        """Starts the node and waits for its event=ready line (and the port)."""
        if os.environ.get("ICHTRIAGE_TEST_WRAPPER"):
            timeout *= 10  # valgrind starts a process about that much slower
        os.makedirs(self.workdir, exist_ok=True)
        logf = open(self.log_path, "ab")
        self._log_offset_at_start = logf.tell()
        env = dict(os.environ)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        if self.notify_sock is not None:
            env.update(self.notify_env)
        env.update(self.env)
        self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL, env=env)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeError("node exited with %s before ready; log:\n%s"
                                % (self.proc.returncode, self.log_tail()))
            # No probe connection: the node logs ready once it listens, and
            # a probe would show up in its log as a peer.
            if re.search(r"\bevent=ready\b", self.log(since_start=True)):
                return self
            time.sleep(0.05)
        raise NodeError("node not ready after %.0f s; log:\n%s" % (timeout, self.log_tail()))

    def sockets_down_to(self, n, timeout=15.0):
        """Waits up to timeout until the node holds at most n sockets; how
        many it holds then."""
        deadline = time.monotonic() + timeout
        while self.open_sockets() > n and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.open_sockets()

    def open_sockets(self):
        """How many sockets the running node holds (from /proc)."""
        n = 0
        for fd in os.listdir("/proc/%d/fd" % self.proc.pid):
            try:
                n += os.readlink("/proc/%d/fd/%s" % (self.proc.pid, fd)).startswith("socket:")
            except OSError:
                pass  # closed meanwhile
        return n

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=30.0):
        """SIGTERM, wait; returns the exit status (None if it had to be killed)."""
        if os.environ.get("ICHTRIAGE_TEST_WRAPPER"):
            timeout *= 10
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                return None
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def log(self, since_start=False):
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset_at_start)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=40):
        return "\n".join(self.log().splitlines()[-n:])

    def healthz(self):
        """GET /healthz, as JSON."""
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % self.http_port,
                                    timeout=10) as r:
            return json.loads(r.read())

    def events(self, name, since_start=False):
        """Log lines whose event is name (of every start of this node's log,
        or with since_start of the last start only)."""
        pat = re.compile(r"\bevent=%s\b" % re.escape(name))
        return [l for l in self.log(since_start).splitlines() if pat.search(l)]

    def wait_event(self, name, timeout=10.0, count=1, since_start=False):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events(name, since_start)) >= count:
                return True
            time.sleep(0.05)
        return False

    # --- the store -------------------------------------------------------
    @property
    def spool(self):
        return os.path.join(self.store_dir, "spool")

    @property
    def db_path(self):
        return os.path.join(self.store_dir, "ichtriage.db")

    def db(self):
        """A read-only connection to the index (works while the node runs: WAL)."""
        con = sqlite3.connect("file:%s?mode=ro" % self.db_path, uri=True, timeout=10)
        con.row_factory = sqlite3.Row
        return con

    def query(self, sql, args=()):
        con = self.db()
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def instances(self):
        """sop_uid -> row of table instances."""
        return {r["sop_uid"]: r for r in self.query("SELECT * FROM instances")}

    def spool_files(self):
        """Relative paths (to store.dir) of every stored .dcm, temp dir excluded."""
        out = []
        for root, dirs, files in os.walk(self.spool):
            dirs[:] = [d for d in dirs if d != ".tmp"]
            for f in files:
                out.append(os.path.relpath(os.path.join(root, f), self.store_dir))
        return sorted(out)

    def temp_files(self):
        tmp = os.path.join(self.spool, ".tmp")
        if not os.path.isdir(tmp):
            return []
        return sorted(os.listdir(tmp))


# --- DICOM files -----------------------------------------------------------

def split_file(path):
    """(meta_bytes, dataset_bytes, transfer_syntax_uid) of a Part 10 file:
    preamble + DICM + group 0002 (explicit LE) + the dataset as encoded."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("%s: no DICM prefix" % path)
    pos = 132
    ts = None
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            hdr = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            hdr = 8
        if elem == 0x0010:
            ts = data[pos + hdr:pos + hdr + length].rstrip(b"\0 ").decode("ascii")
        pos += hdr + length
    return data[:pos], data[pos:], ts


def dataset_bytes(path):
    return split_file(path)[1]


def sent_dataset(path):
    """The dataset bytes storescu puts on the wire for the file at path when
    the context's transfer syntax is the file's: the file's dataset, plus
    the single 00H pad an odd-length deflated stream gets (PS3.5 A.5;
    dcmtk writes files unpadded but pads on the network)."""
    data = dataset_bytes(path)
    return data + b"\0" if len(data) % 2 else data


def sop_uids(path):
    """(sop_class, sop_instance, study, series) read with pydicom, no pixels."""
    import pydicom
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (str(ds.SOPClassUID), str(ds.SOPInstanceUID),
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def generate(outdir, **kw):
    """gen_ct.generate in this process (import kept local: numpy is slow to load)."""
    import sys
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import gen_ct
    return gen_ct.generate(outdir, **kw)


# --- dcmtk clients -----------------------------------------------------------

def storescu_config(path, pairs):
    """Writes a storescu -xf config whose profile 'Exact' proposes, for every
    (sop_class, transfer_syntax) in pairs, one presentation context with that
    single transfer syntax: whatever the SCP accepts is the file's own
    syntax, so storescu sends the dataset without converting it."""
    pairs = sorted(set(pairs))
    ts_list = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(ts_list):
        lines += ["[TS%d]" % i, "TransferSyntax1 = %s" % ts]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    for n, (sop, ts) in enumerate(pairs, 1):
        lines.append("PresentationContext%d = %s\\TS%d" % (n, sop, ts_list.index(ts)))
    lines += ["", "[[Profiles]]", "[Exact]", "PresentationContexts = Contexts", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class StoreResult:
    def __init__(self, proc_rc, output, statuses, association):
        self.rc = proc_rc
        self.output = output
        self.statuses = statuses      # file path -> status int (only answered ones)
        self.association = association  # 'accepted', 'rejected' or None

    def succeeded(self):
        return [f for f, s in self.statuses.items() if s == 0]

    def __repr__(self):
        return "StoreResult(rc=%s, %d answered, %d success)" % (
            self.rc, len(self.statuses), len(self.succeeded()))


_SENDING = re.compile(r"^I: Sending file: (.*)$")
_STATUS = re.compile(r"^D: DIMSE Status\s*: 0x([0-9A-Fa-f]{4})")


def parse_storescu(output):
    """Maps each file storescu sent to the status of its C-STORE response,
    from storescu -d output; files without a response are absent."""
    statuses = {}
    current = None
    in_rsp = False
    association = None
    for line in output.splitlines():
        m = _SENDING.match(line)
        if m:
            current = m.group(1)
            in_rsp = False
            continue
        if "Association Accepted" in line:
            association = "accepted"
        elif "Association Rejected" in line:
            association = "rejected"
        if line.startswith("D: Message Type") and "C-STORE RSP" in line:
            in_rsp = True
            continue
        m = _STATUS.match(line)
        if m and in_rsp and current is not None:
            statuses[current] = int(m.group(1), 16)
            in_rsp = False
            current = None
    return statuses, association


def storescu_cmd(port, files, called="ICHTRIAGE", calling="STORESCU", config=None,
                 extra=(), host="127.0.0.1"):
    cmd = ["storescu", "-d", "-aet", calling, "-aec", called, "-nh"]
    if config:
        cmd += ["-xf", config, "Exact"]
    cmd += list(extra) + [host, str(port)] + list(files)
    return cmd


def storescu_env():
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def exact_config(files, workdir=None):
    """A temp storescu_config() file for files; the caller removes it."""
    pairs = [(sop_uids(f)[0], split_file(f)[2]) for f in files]
    fd, config = tempfile.mkstemp(prefix="storescu.", suffix=".cfg", dir=workdir)
    os.close(fd)
    return storescu_config(config, pairs)


def storescu(port, files, exact_ts=True, workdir=None, timeout=300, **kw):
    """Runs storescu -d on files and returns a StoreResult. With exact_ts the
    proposed contexts are exactly the files' (SOP class, transfer syntax)
    pairs, so nothing is converted on the way."""
    config = exact_config(files, workdir) if exact_ts else None
    try:
        p = subprocess.run(storescu_cmd(port, files, config=config, **kw),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=storescu_env(), timeout=timeout)
    finally:
        if config:
            os.unlink(config)
    out = p.stdout.decode("utf-8", "replace")
    statuses, assoc = parse_storescu(out)
    return StoreResult(p.returncode, out, statuses, assoc)


class StorescuStream:
    """storescu -d running in the background on exact-TS contexts. A reader
    thread keeps its output and counts 0x0000 responses as they arrive,
    calling on_ack(count) after each (from that thread), so a test can act
    at a precise point of the transfer (kill the node, send SIGTERM)."""

    def __init__(self, port, files, workdir=None, on_ack=None, **kw):
        import threading
        self.config = exact_config(files, workdir)
        self.proc = subprocess.Popen(storescu_cmd(port, files, config=self.config, **kw),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=storescu_env())
        self.lines, self.acked, self.on_ack = [], 0, on_ack
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if _STATUS.match(line) and "0x0000" in line:
                self.acked += 1
                if self.on_ack:
                    self.on_ack(self.acked)
        self.proc.stdout.close()

    def wait_acked(self, n, timeout=60):
        """True once n successes arrived; False if storescu ended first or time ran out."""
        deadline = time.monotonic() + timeout
        while self.acked < n and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.005)
        return self.acked >= n

    def tail(self, n=30):
        return "\n".join(self.lines[-n:])

    def wait(self, timeout=300):
        """Waits for storescu to end; returns its StoreResult."""
        self.proc.wait(timeout)
        self.thread.join()
        if os.path.exists(self.config):
            os.unlink(self.config)
        out = "\n".join(self.lines)
        statuses, assoc = parse_storescu(out)
        return StoreResult(self.proc.returncode, out, statuses, assoc)


def echoscu(port, called="ICHTRIAGE", calling="ECHOSCU", host="127.0.0.1", timeout=60, extra=()):
    p = subprocess.run(["echoscu", "-v", *extra, "-aet", calling, "-aec", called, host, str(port)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")
