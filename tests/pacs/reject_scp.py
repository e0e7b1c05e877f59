"""A tiny Storage SCP that accepts associations and every presentation
context, and answers each C-STORE with one fixed status (A700, out of
resources, by default): a PACS that is full. With late_first=S, the very
first C-STORE is answered 0x0000 only after S seconds (a PACS that stalls
once): an SCU that has given up waiting must not read that late answer as
the answer to its next request. With delay=S every other answer waits S
seconds (a slow PACS). With abort_class=UID a C-STORE of that SOP class is
answered with an A-ABORT (a PACS that chokes on one kind of object). With
accept_delay=S each association is accepted only S seconds after it was
asked for (counted in requests); close() ends one still waiting (a PACS
that hangs until it is fixed). Built
on tests/tools/dul.py's PDU helpers;
runs in a thread of the test.

    scp = RejectScp(status=0xA700); scp.start(); ... scp.stores; scp.close()"""
import socket
import struct
import threading
import time

import dul


def _parse_rq(payload):
    """A-ASSOCIATE-RQ -> (called, calling, [(pc_id, abstract, [ts])])."""
    called = payload[4:20]
    calling = payload[20:36]
    pos, contexts = 68, []
    while pos + 4 <= len(payload):
        t, _, length = struct.unpack_from(">BBH", payload, pos)
        body = payload[pos + 4:pos + 4 + length]
        pos += 4 + length
        if t != 0x20:
            continue
        pc_id = body[0]
        sub, abstract, tss = 4, None, []
        while sub + 4 <= len(body):
            st, _, sl = struct.unpack_from(">BBH", body, sub)
            v = body[sub + 4:sub + 4 + sl].rstrip(b"\0 ").decode("ascii")
            if st == 0x30:
                abstract = v
            elif st == 0x40:
                tss.append(v)
            sub += 4 + sl
        contexts.append((pc_id, abstract, tss))
    return called, calling, contexts


def _associate_ac(called, calling, contexts):
    body = struct.pack(">HH", 1, 0) + called + calling + b"\0" * 32
    body += dul._item(0x10, dul._uid(dul.APPLICATION_CONTEXT))
    for pc_id, _, tss in contexts:
        body += dul._item(0x21, struct.pack(">BBBB", pc_id, 0, 0, 0) +
                          dul._item(0x40, dul._uid(tss[0])))
    user = dul._item(0x51, struct.pack(">I", 16384))
    user += dul._item(0x52, dul._uid(dul.IMPLEMENTATION_CLASS))
    body += dul._item(0x50, user)
    return dul.pdu(dul.A_ASSOCIATE_AC, body)


def _store_rsp(sop_class, sop_uid, msg_id, status):
    return dul.encode_command([
        (0x00000002, dul._ui(sop_class)),
        (0x00000100, dul._us(0x8001)),
        (0x00000120, dul._us(msg_id)),
        (0x00000800, dul._us(0x0101)),
        (0x00000900, dul._us(status)),
        (0x00001000, dul._ui(sop_uid)),
    ])


class RejectScp:
    def __init__(self, status=0xA700, late_first=0, delay=0, abort_class=None, accept_delay=0):
        self.status = status
        self.accept_delay = accept_delay
        self.requests = 0       # A-ASSOCIATE-RQs received
        self.abort_class = abort_class
        self.aborted = []       # (sop class, sop instance) of each C-STORE aborted
        self.late_first = late_first
        self.delay = delay  # seconds before each answer (after the first's late one)
        self.stores = []        # (sop class, sop instance) of each C-STORE answered
        self.associations = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def close(self):
        self._stop.set()
        self.sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(10)
                self._association(conn)
            except (OSError, dul.DulError):
                pass
            finally:
                conn.close()

    def _association(self, conn):
        t, payload = dul.recv_pdu(conn)
        if t != dul.A_ASSOCIATE_RQ:
            return
        called, calling, contexts = _parse_rq(payload)
        self.requests += 1
        if self._stop.wait(self.accept_delay):
            return
        conn.sendall(_associate_ac(called, calling, contexts))
        self.associations += 1
        command, in_dataset = b"", False
        while True:
            t, payload = dul.recv_pdu(conn)
            if t == dul.A_RELEASE_RQ:
                conn.sendall(dul.pdu(dul.A_RELEASE_RP, b"\0\0\0\0"))
                return
            if t != dul.P_DATA_TF:
                return
            pos = 0
            while pos + 6 <= len(payload):
                length, pc_id, header = struct.unpack_from(">IBB", payload, pos)
                data = payload[pos + 6:pos + 4 + length]
                pos += 4 + length
                if header & 1:
                    command += data
                    if header & 2:
                        cmd = dul.parse_command(command)
                        in_dataset = struct.unpack("<H", cmd[0x00000800])[0] != 0x0101
                        if not in_dataset:
                            command = b""
                elif header & 2 and in_dataset:
                    cmd = dul.parse_command(command)
                    cls = cmd[0x00000002].rstrip(b"\0").decode()
                    uid = cmd[0x00001000].rstrip(b"\0").decode()
                    msg_id = struct.unpack("<H", cmd[0x00000110])[0]
                    if cls == self.abort_class:
                        self.aborted.append((cls, uid))
                        conn.sendall(dul.pdu(dul.A_ABORT, b"\0\0\0\0"))
                        return
                    self.stores.append((cls, uid))
                    status = self.status
                    if self.late_first and len(self.stores) == 1:
                        time.sleep(self.late_first)
                        status = 0x0000
                    elif self.delay:
                        time.sleep(self.delay)
                    rsp = _store_rsp(cls, uid, msg_id, status)
                    conn.sendall(dul.pdu(dul.P_DATA_TF, dul.pdv(pc_id, rsp, True, True)))
                    command, in_dataset = b"", False
