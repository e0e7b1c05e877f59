"""A small DICOM upper-layer client (PS3.8) over a plain socket, for tests that
need to send what no well-behaved SCU sends: truncated or garbage datasets, a
request whose SOP class disagrees with its dataset, stalled or trickling peers,
many associations held open.

    a = dul.Association.connect("127.0.0.1", port, called="ICHTRIAGE",
                                contexts=[(CT, [EXPLICIT_LE])])
    status, rsp = a.c_store(CT, sop_uid, dataset_bytes)
    a.release()

The PDU framing is written here by hand; DIMSE command sets are encoded in
implicit VR little endian (PS3.7 §6.3.1) with the few elements C-ECHO and
C-STORE need. Datasets are passed as bytes already encoded in the
presentation context's transfer syntax (see encode_dataset). Standard library
only, except encode_dataset (pydicom)."""
import socket
import struct
import time

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_CLASS = "1.2.826.0.1.3680043.8.498.1.99"
IMPLEMENTATION_VERSION = "ICHTRIAGE_TEST"

# PDU types
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

# Largest PDU we accept from the peer before calling it a protocol error.
MAX_INCOMING_PDU = 16 * 1024 * 1024


class DulError(Exception):
    pass


class Closed(DulError):
    """The peer closed the connection (possibly after an A-ABORT)."""


class Aborted(DulError):
    def __init__(self, source, reason):
        super().__init__("A-ABORT source=%d reason=%d" % (source, reason))
        self.source, self.reason = source, reason


class Rejected(DulError):
    """A-ASSOCIATE-RJ. result 1 permanent, 2 transient; source 1 service user,
    2 ACSE provider, 3 presentation provider; reason per PS3.8 §9.3.4
    (source 1: 2 application context, 3 calling AE not recognized,
    7 called AE not recognized; source 3: 1 temporary congestion,
    2 local limit exceeded)."""

    def __init__(self, result, source, reason):
        super().__init__("A-ASSOCIATE-RJ result=%d source=%d reason=%d" % (result, source, reason))
        self.result, self.source, self.reason = result, source, reason


# --- PDU encoding --------------------------------------------------------

def _item(item_type, payload):
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(u):
    return u.encode("ascii")


def _ae(title):
    b = title.encode("ascii")
    if len(b) > 16:
        raise ValueError("AE title longer than 16 bytes")
    return b.ljust(16, b" ")


def pdu(pdu_type, payload):
    return struct.pack(">BBI", pdu_type, 0, len(payload)) + payload


def associate_rq(called, calling, contexts, max_pdu=16384):
    """contexts: list of (abstract syntax, [transfer syntaxes]); ids 1, 3, 5..."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    body += _item(0x10, _uid(APPLICATION_CONTEXT))
    for i, (abstract, tss) in enumerate(contexts):
        pc = struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + _item(0x30, _uid(abstract))
        for ts in tss:
            pc += _item(0x40, _uid(ts))
        body += _item(0x20, pc)
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, _uid(IMPLEMENTATION_CLASS))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def parse_associate_ac(payload):
    """Returns ({pc_id: (result, transfer syntax)}, peer max PDU)."""
    pos = 2 + 2 + 16 + 16 + 32
    contexts, max_pdu = {}, 0
    while pos + 4 <= len(payload):
        t, _, length = struct.unpack_from(">BBH", payload, pos)
        body = payload[pos + 4:pos + 4 + length]
        pos += 4 + length
        if t == 0x21:
            pc_id, _, result, _ = struct.unpack_from(">BBBB", body, 0)
            ts = None
            if len(body) >= 8:
                st, _, sl = struct.unpack_from(">BBH", body, 4)
                if st == 0x40:
                    ts = body[8:8 + sl].rstrip(b"\0 ").decode("ascii")
            contexts[pc_id] = (result, ts)
        elif t == 0x50:
            upos = 0
            while upos + 4 <= len(body):
                st, _, sl = struct.unpack_from(">BBH", body, upos)
                if st == 0x51 and sl == 4:
                    (max_pdu,) = struct.unpack_from(">I", body, upos + 4)
                upos += 4 + sl
    return contexts, max_pdu


def pdv(pc_id, data, command, last):
    header = (0x01 if command else 0) | (0x02 if last else 0)
    return struct.pack(">IBB", len(data) + 2, pc_id, header) + data


# --- DIMSE command sets (implicit VR little endian) ------------------------

def _elem(tag, value):
    group, elem = tag >> 16, tag & 0xFFFF
    return struct.pack("<HHI", group, elem, len(value)) + value


def _ui(uid):
    b = uid.encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def _us(v):
    return struct.pack("<H", v)


def encode_command(elements):
    """elements: list of (tag, bytes) in ascending tag order, group length
    (0000,0000) is added."""
    body = b"".join(_elem(t, v) for t, v in elements)
    return _elem(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq(sop_class, sop_instance, msg_id, priority=0):
    return encode_command([
        (0x00000002, _ui(sop_class)),
        (0x00000100, _us(0x0001)),
        (0x00000110, _us(msg_id)),
        (0x00000700, _us(priority)),
        (0x00000800, _us(0x0000)),       # a dataset follows
        (0x00001000, _ui(sop_instance)),
    ])


def c_echo_rq(msg_id):
    return encode_command([
        (0x00000002, _ui(VERIFICATION)),
        (0x00000100, _us(0x0030)),
        (0x00000110, _us(msg_id)),
        (0x00000800, _us(0x0101)),       # no dataset
    ])


def parse_command(data):
    """Implicit VR LE command set -> {tag: raw bytes}."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[(group << 16) | elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


def command_status(cmd):
    v = cmd.get(0x00000900)
    return struct.unpack("<H", v)[0] if v is not None and len(v) == 2 else None


def command_field(cmd):
    v = cmd.get(0x00000100)
    return struct.unpack("<H", v)[0] if v is not None and len(v) == 2 else None


def encode_dataset(ds, transfer_syntax=EXPLICIT_LE):
    """Encodes a pydicom Dataset (no file meta) as the dataset bytes of a
    little-endian, uncompressed transfer syntax."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    ds = ds.copy()
    ds.is_little_endian = True
    ds.is_implicit_VR = buf.is_implicit_VR
    if hasattr(ds, "file_meta"):
        del ds.file_meta
    write_dataset(buf, ds)
    return buf.getvalue()


# --- the association -----------------------------------------------------

def connect(host, port, timeout=10.0):
    """A bare TCP connection, for peers that misbehave before any PDU."""
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def trickle(sock, data, chunk=1, interval=1.0, deadline=None):
    """Sends data chunk bytes at a time, interval seconds apart (a slow or
    malicious peer). Stops early, returning the bytes sent, when the peer
    closes or deadline (time.monotonic()) passes; otherwise len(data)."""
    sent = 0
    while sent < len(data):
        if deadline is not None and time.monotonic() >= deadline:
            break
        try:
            sock.sendall(data[sent:sent + chunk])
        except OSError:
            break
        sent += len(data[sent:sent + chunk])
        time.sleep(interval)
    return sent


def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        b = sock.recv(min(n - got, 1 << 20))
        if not b:
            raise Closed("connection closed after %d of %d bytes" % (got, n))
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def recv_pdu(sock):
    """(type, payload) of the next PDU."""
    header = recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if length > MAX_INCOMING_PDU:
        raise DulError("PDU of %d bytes" % length)
    return pdu_type, recv_exact(sock, length)


def wait_closed(sock, timeout):
    """Seconds until the peer closed the connection (EOF or reset, after
    discarding anything it sent), or None if still open after timeout."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            b = sock.recv(65536)
        except socket.timeout:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        if not b:
            return time.monotonic() - start


class Association:
    def __init__(self, sock, contexts, accepted, peer_max_pdu):
        self.sock = sock
        self.proposed = contexts          # pc_id -> abstract syntax
        self.accepted = accepted          # pc_id -> transfer syntax (accepted only)
        self.peer_max_pdu = peer_max_pdu or 16384
        self.msg_id = 0

    @classmethod
    def connect(cls, host, port, called="ICHTRIAGE", calling="RAWSCU", contexts=None,
                max_pdu=16384, timeout=10.0):
        """Opens an association; raises Rejected, Aborted or Closed."""
        contexts = contexts or [(VERIFICATION, [IMPLICIT_LE])]
        sock = connect(host, port, timeout)
        try:
            sock.sendall(associate_rq(called, calling, contexts, max_pdu))
            t, payload = recv_pdu(sock)
            if t == A_ASSOCIATE_RJ:
                _, result, source, reason = struct.unpack_from(">BBBB", payload, 0)
                raise Rejected(result, source, reason)
            if t == A_ABORT:
                raise Aborted(payload[2], payload[3])
            if t != A_ASSOCIATE_AC:
                raise DulError("unexpected PDU type %d in answer to A-ASSOCIATE-RQ" % t)
            pcs, peer_max = parse_associate_ac(payload)
        except BaseException:
            sock.close()
            raise
        proposed = {2 * i + 1: c[0] for i, c in enumerate(contexts)}
        accepted = {pid: ts for pid, (res, ts) in pcs.items() if res == 0}
        return cls(sock, proposed, accepted, peer_max)

    def context_for(self, abstract):
        for pid, ab in self.proposed.items():
            if ab == abstract and pid in self.accepted:
                return pid
        raise DulError("no accepted presentation context for %s" % abstract)

    def send_message(self, pc_id, command, dataset=None, fragment=None):
        """Sends a command and optional dataset as P-DATA-TF PDUs, each PDV
        no larger than the peer's max PDU allows."""
        fragment = fragment or max(64, self.peer_max_pdu - 6 - 6)
        self._send_stream(pc_id, command, True, fragment)
        if dataset is not None:
            self._send_stream(pc_id, dataset, False, fragment)

    def _send_stream(self, pc_id, data, command, fragment):
        pos = 0
        while True:
            chunk = data[pos:pos + fragment]
            pos += len(chunk)
            last = pos >= len(data)
            self.sock.sendall(pdu(P_DATA_TF, pdv(pc_id, chunk, command, last)))
            if last:
                return

    def recv_command(self):
        """Reads P-DATA until a complete command set arrives; returns it parsed.
        Dataset fragments (none expected for our requests) are skipped."""
        buf = b""
        while True:
            t, payload = recv_pdu(self.sock)
            if t == A_ABORT:
                raise Aborted(payload[2], payload[3])
            if t != P_DATA_TF:
                raise DulError("unexpected PDU type %d while waiting for a response" % t)
            pos = 0
            while pos + 6 <= len(payload):
                (length,) = struct.unpack_from(">I", payload, pos)
                header = payload[pos + 5]
                data = payload[pos + 6:pos + 4 + length]
                pos += 4 + length
                if header & 0x01:
                    buf += data
                    if header & 0x02:
                        return parse_command(buf)

    def next_msg_id(self):
        self.msg_id = (self.msg_id + 1) & 0xFFFF or 1
        return self.msg_id

    def c_echo(self):
        pid = self.context_for(VERIFICATION)
        self.send_message(pid, c_echo_rq(self.next_msg_id()))
        rsp = self.recv_command()
        return command_status(rsp), rsp

    def c_store(self, sop_class, sop_instance, dataset, pc_abstract=None):
        """Sends one C-STORE-RQ on the context of pc_abstract (default:
        sop_class) and returns (status, response command)."""
        pid = self.context_for(pc_abstract or sop_class)
        self.send_message(pid, c_store_rq(sop_class, sop_instance, self.next_msg_id()), dataset)
        rsp = self.recv_command()
        return command_status(rsp), rsp

    def release(self, timeout=10.0):
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(pdu(A_RELEASE_RQ, b"\0\0\0\0"))
            t, _ = recv_pdu(self.sock)
            if t != A_RELEASE_RP:
                raise DulError("unexpected PDU type %d in answer to A-RELEASE-RQ" % t)
        finally:
            self.sock.close()

    def abort(self):
        try:
            self.sock.sendall(pdu(A_ABORT, b"\0\0\0\0"))
        except OSError:
            pass
        self.sock.close()

    def close(self):
        self.sock.close()
