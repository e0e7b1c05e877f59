"""DICOM over TLS (dcmtls): storescu with TLS stores bit for bit; a client
certificate is demanded when a CA is configured; a plain client on the TLS
port is refused; bad key/certificate settings stop the node at start with a
clear message. Keys are made with openssl at test time."""
import os
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402


def make_cert(d, name, ca=None):
    key, crt = os.path.join(d, name + ".key"), os.path.join(d, name + ".pem")
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", crt, "-days", "2", "-subj", "/CN=" + name], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        csr = os.path.join(d, name + ".csr")
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", csr, "-subj", "/CN=" + name], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0],
                        "-CAcreateserial", "-out", crt, "-days", "2"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return key, crt


class TlsTest(itest.NodeTest):
    def pki(self):
        """A CA and a server certificate it signed, made once per test."""
        if not hasattr(self, "ca"):
            self.pki_dir = os.path.join(self.work, "pki")
            os.makedirs(self.pki_dir, exist_ok=True)
            self.ca = make_cert(self.pki_dir, "ca")
            self.server = make_cert(self.pki_dir, "server", self.ca)
        return self.pki_dir

    def tls_node(self, **extra):
        self.pki()
        self.tls_port = dt.free_port()
        settings = {"dicom.tls_port": self.tls_port, "dicom.tls_key": self.server[0],
                    "dicom.tls_cert": self.server[1]}
        settings.update(extra)
        return self.start_node(settings)

    def test_store_over_tls(self):
        node = self.tls_node()
        files = self.gen("tls", count=5, rows=64, cols=64)
        r = dt.storescu(self.tls_port, files, workdir=self.work,
                        extra=["+tla", "+cf", self.ca[1]])
        self.assert_all_success(r, files)
        self.assert_stored_exactly(node, files)
        self.assert_consistent(node)
        # The plain port keeps working beside it.
        self.assertEqual(dt.echoscu(node.port)[0], 0)

    def trickle(self, port, seconds, reconnect=False):
        """A peer that starts a TLS handshake and sends a byte every 2 s
        (each under the node's 5 s read timeout) for seconds; with
        reconnect, it starts again as soon as the node cuts it. Returns a
        function that tells whether it is still at it."""
        import select
        import socket
        import threading

        def start():
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes
            return s

        first = start()
        done = threading.Event()

        def run():
            sock = first
            end = time.monotonic() + seconds
            try:
                while time.monotonic() < end:
                    if not reconnect:
                        time.sleep(2)
                        sock.sendall(b"\x01")
                        continue
                    try:
                        if select.select([sock], [], [], 2)[0] and not sock.recv(64):
                            raise ConnectionResetError("cut")
                        sock.sendall(b"\x01")
                    except OSError:
                        sock.close()
                        sock = start()
            except OSError:
                pass
            finally:
                sock.close()
                done.set()

        threading.Thread(target=run, daemon=True).start()
        return lambda: not done.is_set()

    def test_trickling_handshake_holds_no_one_up(self):
        """A peer trickling its handshake is cut after 10 s: other TLS
        peers get in while it is still sending, and the node stops while
        another one is. It had held up every new TLS association, and the
        stop, for as long as it went on."""
        node = self.tls_node()
        trickling = self.trickle(self.tls_port, 40)
        time.sleep(1)
        p = subprocess.run(["echoscu", "+tla", "+cf", self.ca[1], "-aec", "ICHTRIAGE",
                            "127.0.0.1", str(self.tls_port)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout.decode(errors="replace"))
        self.assertTrue(trickling(), "C-ECHO over TLS had to wait for the trickling peer to end")
        deadline = time.monotonic() + 20
        while (not any("tls=1" in l for l in node.events("association_failed"))
               and time.monotonic() < deadline):
            time.sleep(0.2)
        self.assertTrue(any("tls=1" in l for l in node.events("association_failed")),
                        "the trickling peer was not cut; log:\n" + node.log_tail())
        self.assertTrue(trickling(), "the trickling peer gave up before it was cut")
        trickling = self.trickle(self.tls_port, 60)
        time.sleep(1)
        self.assertEqual(node.stop(), 0, node.log_tail())
        self.assertTrue(trickling(), "the stop had to wait for the trickling peer to end")

    def echo_while_trickling(self, node, port, extra=()):
        """C-ECHOs to port every half second for 24 s while a peer trickles
        a TLS handshake and starts again each time it is cut: each must be
        answered within 3 s, and the peer was cut at least twice."""
        trickling = self.trickle(self.tls_port, 60, reconnect=True)
        time.sleep(1)
        end = time.monotonic() + 24  # past two cuts, each followed by a new handshake
        n = 0
        while time.monotonic() < end:
            try:
                rc, out = dt.echoscu(port, timeout=3, extra=extra)
            except subprocess.TimeoutExpired:
                rc, out = None, ""
            self.assertIsNotNone(rc, "%s C-ECHO %d not answered within 3 s while a peer "
                                 "trickled a TLS handshake; log:\n%s"
                                 % ("TLS" if extra else "plain", n + 1, node.log_tail()))
            self.assertEqual(rc, 0, out)
            n += 1
            time.sleep(0.5)
        self.assertTrue(trickling(), "the trickling peer gave up")
        cuts = [l for l in node.events("association_failed") if "tls=1" in l]
        self.assertGreaterEqual(len(cuts), 2, node.log_tail())

    def test_trickling_handshake_holds_up_no_plain_association(self):
        """Scanners on the plain port are answered while a peer trickles a
        TLS handshake, and starts again each time it is cut. dcmtk did the
        handshake and read the request under the lock that every plain
        association needs to hand dcmtk its socket, so anyone who could
        reach the TLS port held up reception on the plain one: a C-ECHO
        that came meanwhile waited until the peer was cut, up to 10 s."""
        node = self.tls_node()
        self.echo_while_trickling(node, node.port)

    def test_trickling_handshake_holds_up_no_other_tls_association(self):
        """Nor are other TLS peers held up by it: each connection does its
        handshake on its own thread. They had been done one at a time on
        the TLS listener, so a scanner sending over TLS waited behind the
        trickling peer until it was cut, up to 10 s, each time."""
        node = self.tls_node()
        self.echo_while_trickling(node, self.tls_port, extra=("+tla", "+cf", self.ca[1]))

    def test_plain_client_on_tls_port_is_refused(self):
        node = self.tls_node()
        files = self.gen("plain", count=1, rows=64, cols=64)
        r = dt.storescu(self.tls_port, files, workdir=self.work)
        self.assertNotEqual(r.statuses.get(files[0]), 0)
        node.wait_event("association_failed")
        self.assert_not_stored(node, dt.sop_uids(files[0])[1])

    def test_connections_reset_at_once_leave_no_socket_behind(self):
        """Fifty connections to the TLS port, each reset by the peer
        (SO_LINGER 0) as soon as it is made, some with a byte of a
        ClientHello: the node keeps no socket of them. dcmtk gives up on a
        reset connection before it takes the socket over (getpeername
        fails) and leaves it open; the TLS listener closed only what dcmtk
        had never been given, so each such connection stayed open for the
        life of the node. Then a TLS client still stores."""
        node = self.tls_node()
        self.assertEqual(dt.echoscu(node.port)[0], 0)
        before = node.open_sockets()
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", self.tls_port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if i % 2:
                s.sendall(b"\x16")
            s.close()
        self.assertLessEqual(node.sockets_down_to(before), before,
                             "sockets left open by the node after 50 reset connections to the "
                             "TLS port (before them %d)" % before)
        files = self.gen("after", count=2, rows=64, cols=64)
        r = dt.storescu(self.tls_port, files, workdir=self.work,
                        extra=["+tla", "+cf", self.ca[1]])
        self.assert_all_success(r, files)

    def test_client_certificate_required_with_ca(self):
        d = self.pki()
        node = self.tls_node(**{"dicom.tls_ca": self.ca[1]})
        client = make_cert(d, "client", self.ca)
        files = self.gen("mtls", count=2, rows=64, cols=64)
        anon = dt.storescu(self.tls_port, files[:1], workdir=self.work,
                           extra=["+tla", "+cf", self.ca[1]])
        self.assertNotEqual(anon.statuses.get(files[0]), 0, "anonymous client was accepted")
        ok = dt.storescu(self.tls_port, files, workdir=self.work,
                         extra=["+tls", client[0], client[1], "-pw", "+cf", self.ca[1]])
        self.assert_all_success(ok, files)
        self.assert_stored_exactly(node, files)

    def test_bad_key_stops_start_with_message(self):
        d = os.path.join(self.work, "pki")
        os.makedirs(d, exist_ok=True)
        a = make_cert(d, "a")
        b = make_cert(d, "b")
        argv = dt.Node(itest.EXE, os.path.join(self.work, "n"),
                       {"dicom.tls_port": dt.free_port(), "dicom.tls_key": a[0],
                        "dicom.tls_cert": b[1]}).argv()
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        out = p.stdout.decode()
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("does not match", out)
        missing = dt.Node(itest.EXE, os.path.join(self.work, "m"),
                          {"dicom.tls_port": dt.free_port()}).argv()
        p = subprocess.run(missing, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("dicom.tls_cert", p.stdout.decode())


if __name__ == "__main__":
    sys.exit(itest.main())
