#!/usr/bin/python3
"""Issue 2: what the node refuses. Truncated and garbage datasets, a dataset
whose SOP class is not the requested one, missing UIDs: the right failure
status, a log line, nothing stored, and the association stays usable. A
called AE that is not ours, a calling AE not on the allowlist, one more
association than allowed: rejected with the right result/source/reason and
logged. A peer that sends nothing is dropped after the ACSE timeout; an
association is cut at its total deadline.

Uses the raw upper-layer client (tests/tools/dul.py) where storescu would not
send such things.

    test_reject.py /path/to/ichtriage"""
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import dul  # noqa: E402
import itest  # noqa: E402

CONTEXTS = [(dul.VERIFICATION, [dul.IMPLICIT_LE]), (dul.CT_IMAGE, [dul.EXPLICIT_LE]),
            (dul.MR_IMAGE, [dul.EXPLICIT_LE])]


def is_cannot_understand(status):
    return status is not None and status & 0xF000 == 0xC000


def is_does_not_match(status):
    return status is not None and status & 0xFF00 == 0xA900


class BadDatasets(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.ct = self.gen("ct", count=3, rows=128, cols=128)
        self.node = self.start_node()
        self.assoc = dul.Association.connect("127.0.0.1", self.node.port, contexts=CONTEXTS)
        self.assertIn(3, self.assoc.accepted, "CT context not accepted")

    def tearDown(self):
        try:
            if self.assoc is not None:
                self.assoc.release()
        finally:
            super().tearDown()

    def store_bad(self, sop_class, sop_uid, data, check, what, pc_abstract=None):
        failed_before = len(self.node.events("store_failed"))
        status, _ = self.assoc.c_store(sop_class, sop_uid, data, pc_abstract)
        self.assertTrue(check(status), "%s: status %s" % (what, None if status is None else hex(status)))
        self.assertTrue(self.node.wait_event("store_failed", timeout=5, count=failed_before + 1),
                        "%s: no event=store_failed logged" % what)
        self.assert_not_stored(self.node, sop_uid)
        # The association is still in step: a good instance goes through.
        good = self.ct.pop()
        cls, sop, _, _ = dt.sop_uids(good)
        status, _ = self.assoc.c_store(cls, sop, dt.dataset_bytes(good))
        self.assertEqual(status, 0, "%s: good instance after it got %s" % (what, status))
        self.assert_stored_exactly(self.node, [good])
        self.assert_consistent(self.node)
        self.assert_not_failing_stores(self.node)

    def ct_dataset(self, **changes):
        import pydicom
        ds = pydicom.dcmread(self.gen("one", count=1, rows=64, cols=64)[0])
        for k, v in changes.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        return ds

    def test_truncated_in_header(self):
        f = self.gen("t1", count=1, rows=128, cols=128)[0]
        cls, sop, _, _ = dt.sop_uids(f)
        data = dt.dataset_bytes(f)
        cut = data.find(b"\x20\x00\x0d\x00") + 20  # inside the Study Instance UID value
        self.store_bad(cls, sop, data[:cut], is_cannot_understand, "cut in the header")

    def test_truncated_in_pixel_data(self):
        f = self.gen("t2", count=1, rows=128, cols=128)[0]
        cls, sop, _, _ = dt.sop_uids(f)
        data = dt.dataset_bytes(f)
        self.store_bad(cls, sop, data[:len(data) - 1000], is_cannot_understand, "cut in the pixels")

    def test_garbage(self):
        rnd = random.Random(1234)
        data = bytes(rnd.getrandbits(8) for _ in range(8192))
        sop = "1.2.826.0.1.3680043.8.498.999.1"
        self.store_bad(dul.CT_IMAGE, sop, data,
                       lambda s: is_cannot_understand(s) or is_does_not_match(s), "garbage")

    def test_wrong_sop_class(self):
        mr = self.gen("mr", count=1, rows=64, cols=64, sop="mr")[0]
        _, sop, _, _ = dt.sop_uids(mr)
        # Request and context say CT; the dataset is an MR image.
        self.store_bad(dul.CT_IMAGE, sop, dt.dataset_bytes(mr), is_does_not_match, "MR as CT")
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.node.http_port) as m:
            text = m.read().decode()
        self.assertIn('ichtriage_instances_rejected_total{reason="does_not_match_sop_class"} 1',
                      text)

    def test_store_on_a_context_of_another_sop_class(self):
        """The Affected SOP Class of a C-STORE must be its presentation
        context's abstract syntax, one of the storage classes the node
        accepts (PS3.7 9.1.1, PS3.4 B.2.3): a CT image on the Verification
        context, an MR image on the CT context and a private class on the
        CT context are answered 0122 (SOP class not supported) and nothing
        is stored. Each had been answered 0000 and stored."""
        not_supported = lambda s: s == 0x0122  # noqa: E731
        ds = self.ct_dataset()
        self.store_bad(dul.CT_IMAGE, str(ds.SOPInstanceUID), dul.encode_dataset(ds, dul.IMPLICIT_LE),
                       not_supported, "CT on the Verification context", pc_abstract=dul.VERIFICATION)
        self.assertIn("why=sop_class_not_supported", self.node.events("store_failed")[-1])
        mr = self.gen("mr", count=1, rows=64, cols=64, sop="mr")[0]
        cls, sop, _, _ = dt.sop_uids(mr)
        self.store_bad(cls, sop, dt.dataset_bytes(mr), not_supported, "MR on the CT context",
                       pc_abstract=dul.CT_IMAGE)
        ds = self.ct_dataset(SOPClassUID="1.2.3.4.5.6")
        self.store_bad("1.2.3.4.5.6", str(ds.SOPInstanceUID), dul.encode_dataset(ds),
                       not_supported, "a private class on the CT context", pc_abstract=dul.CT_IMAGE)
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.node.http_port) as m:
            text = m.read().decode()
        self.assertIn('ichtriage_instances_rejected_total{reason="sop_class_not_supported"} 3',
                      text)

    def test_missing_study_uid(self):
        ds = self.ct_dataset(StudyInstanceUID=None)
        self.store_bad(dul.CT_IMAGE, str(ds.SOPInstanceUID), dul.encode_dataset(ds),
                       is_does_not_match, "no Study Instance UID")

    def test_missing_series_uid(self):
        ds = self.ct_dataset(SeriesInstanceUID=None)
        self.store_bad(dul.CT_IMAGE, str(ds.SOPInstanceUID), dul.encode_dataset(ds),
                       is_does_not_match, "no Series Instance UID")

    def test_missing_sop_instance_uid(self):
        ds = self.ct_dataset()
        sop = str(ds.SOPInstanceUID)
        del ds.SOPInstanceUID
        self.store_bad(dul.CT_IMAGE, sop, dul.encode_dataset(ds), is_does_not_match,
                       "no SOP Instance UID")

    def test_uids_already_stored_elsewhere(self):
        """UIDs are unique: a series already stored under another study
        (another patient's), or a SOP instance already stored in another
        series, is refused with A900 (why=uid_conflict) and what was stored
        stays as it was. They had been merged: the slice counted and
        triaged in the first patient's study, or taken from it."""
        import pydicom
        from pydicom.uid import generate_uid
        first = self.gen("first", count=2, rows=64, cols=64)
        for f in first:
            cls, sop, _, _ = dt.sop_uids(f)
            self.assertEqual(self.assoc.c_store(cls, sop, dt.dataset_bytes(f))[0], 0)
        ds = pydicom.dcmread(first[0])
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.PatientID, ds.PatientName = "OTHER", "OTHER^PATIENT"
        self.store_bad(dul.CT_IMAGE, str(ds.SOPInstanceUID), dul.encode_dataset(ds),
                       is_does_not_match, "its series under another study")
        self.assertIn("why=uid_conflict", self.node.events("store_failed")[-1])
        before = self.node.instances()
        ds = pydicom.dcmread(first[1])
        ds.SeriesInstanceUID = generate_uid()
        sop = str(ds.SOPInstanceUID)
        status, _ = self.assoc.c_store(dul.CT_IMAGE, sop, dul.encode_dataset(ds))
        self.assertTrue(is_does_not_match(status), "its SOP instance in another series: %s"
                        % (status and hex(status)))
        self.assertIn("already stored in another series", self.node.events("store_failed")[-1])
        after = self.node.instances()
        self.assertEqual(after[sop]["series_id"], before[sop]["series_id"])
        self.assertEqual(after[sop]["file_path"], before[sop]["file_path"])
        self.assertTrue(os.path.exists(os.path.join(self.node.store_dir, after[sop]["file_path"])))
        self.assert_consistent(self.node)
        self.assert_not_failing_stores(self.node)
        with self.node.db() as con:
            self.assertEqual(con.execute("SELECT count(*) FROM patients WHERE patient_id ="
                                         " 'OTHER'").fetchone()[0], 0, "the refused left a row")

    def test_sop_instance_uid_not_the_requested_one(self):
        ds = self.ct_dataset()
        other = str(ds.SOPInstanceUID)
        request = other[:-1] + ("1" if other[-1] != "1" else "2")
        self.store_bad(dul.CT_IMAGE, request, dul.encode_dataset(ds), is_does_not_match,
                       "dataset UID differs from the request")
        self.assert_not_stored(self.node, other)

    def test_request_uid_that_would_forge_a_log_record(self):
        """The request's SOP Instance UID is the peer's text and went into
        the log as it came: quotes and '=' in it opened a quoted value and
        added keys of the peer's choosing (dcmtk drops the spaces and the
        newline). It is logged made safe, the record whole."""
        ds = self.ct_dataset()
        forged = '1.2"\nts=2026-12-03T00:00:00Z level=error event=forged x="'
        self.store_bad(dul.CT_IMAGE, forged, dul.encode_dataset(ds), is_does_not_match,
                       "a request UID with quotes and a record in it")
        line = self.node.events("store_failed")[-1]
        self.assertNotIn("event=forged", self.node.log())
        self.assertEqual(line.count('"'), 2, line)
        self.assertIn(" sop=1.2_ts_2026-12-03T00:00:00Zlevel_erro", line)

    def test_invalid_uid_that_could_escape_the_spool(self):
        ds = self.ct_dataset(SeriesInstanceUID="../../../../tmp")
        self.store_bad(dul.CT_IMAGE, str(ds.SOPInstanceUID), dul.encode_dataset(ds),
                       is_does_not_match, "series UID with a path in it")


    def test_uids_over_64_characters_are_refused_not_cut(self):
        """Two instances whose Study and Series Instance UIDs have 66
        characters and differ only after the 64th were cut to 64, answered
        0000 and filed as one series of one study. Each is refused with
        A900 now, the log line naming the UID and its length."""
        for i in (1, 2):
            study = "1.2.3.4.5.6.7.8.9." + "1" * 46 + ".%d" % i
            self.assertEqual(len(study), 66)
            ds = self.ct_dataset(StudyInstanceUID=study, SeriesInstanceUID=study[:-1] + "7.%d" % i)
            self.store_bad(dul.CT_IMAGE, str(ds.SOPInstanceUID), dul.encode_dataset(ds),
                           is_does_not_match, "66-character UIDs, number %d" % i)
            self.assertIn('reason="invalid study UID: 66 characters, at most 64"',
                          self.node.events("store_failed")[-1])
        self.assertEqual(self.node.query(
            "SELECT count(*) FROM studies WHERE study_uid LIKE '1.2.3.4.5.6.7.8.9.%'")[0][0], 0)


class Rejections(itest.NodeTest):
    def expect_rejected(self, node, called, calling, result, source, reason, log_reason=None):
        before = len(node.events("association_rejected"))
        with self.assertRaises(dul.Rejected) as cm:
            a = dul.Association.connect("127.0.0.1", node.port, called=called, calling=calling)
            a.abort()
        e = cm.exception
        self.assertEqual((e.result, e.source, e.reason), (result, source, reason), str(e))
        self.assertTrue(node.wait_event("association_rejected", timeout=5, count=before + 1),
                        "no event=association_rejected logged")
        if log_reason:
            self.assertIn("reason=" + log_reason, node.events("association_rejected")[-1])

    def test_called_ae_not_ours(self):
        node = self.start_node()
        # permanent, service user, called AE title not recognized
        self.expect_rejected(node, "NOTUS", "RAWSCU", 1, 1, 7)
        rc, out = dt.echoscu(node.port, called="ICHTRIAGE2")
        self.assertNotEqual(rc, 0, out)
        f = self.gen("ct", count=1, rows=64, cols=64)
        r = dt.storescu(node.port, f, called="SOMEONE", workdir=self.work)
        self.assertNotEqual(r.rc, 0)
        self.assertEqual(r.statuses, {})
        self.assertEqual(node.spool_files(), [])
        # The admin's graph counts them by reason.
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % node.http_port) as m:
            text = m.read().decode()
        self.assertIn('ichtriage_associations_total{result="rejected_called_ae"} 3', text)
        self.assertIn('ichtriage_associations_total{result="accepted"} 0', text)

    def test_calling_ae_not_allowed(self):
        node = self.start_node({"dicom.allowed_peers": "RAWSCU, ECHOSCU, BOUND@10.255.255.1"})
        rc, out = dt.echoscu(node.port)
        self.assertEqual(rc, 0, "an allowed peer was refused:\n" + out)
        # permanent, service user, calling AE title not recognized
        self.expect_rejected(node, "ICHTRIAGE", "INTRUDER", 1, 1, 3)
        # An allowed title from the wrong host is no better.
        self.expect_rejected(node, "ICHTRIAGE", "BOUND", 1, 1, 3)
        f = self.gen("ct", count=1, rows=64, cols=64)
        r = dt.storescu(node.port, f, calling="STORESCU", workdir=self.work)
        self.assertNotEqual(r.rc, 0)
        self.assertEqual(r.statuses, {})
        self.assertEqual(node.spool_files(), [])
        a = dul.Association.connect("127.0.0.1", node.port, calling="RAWSCU")
        self.assertEqual(a.c_echo()[0], 0)
        a.release()

    def test_leading_spaces_in_ae_titles_are_not_significant(self):
        """PS3.5 6.2: leading and trailing spaces of an AE title are not
        significant. A called AE " ICHTRIAGE" was rejected (called AE not
        recognized), and " RAWSCU" was not the RAWSCU of the allowlist."""
        node = self.start_node({"dicom.allowed_peers": "RAWSCU"})
        a = dul.Association.connect("127.0.0.1", node.port, called=" ICHTRIAGE",
                                    calling="  RAWSCU")
        self.assertEqual(a.c_echo()[0], 0)
        a.release()
        self.assertIn("calling_ae=RAWSCU ", node.events("association_accepted")[-1])
        self.expect_rejected(node, " ICHTRIAGE", " INTRUDER", 1, 1, 3, "calling_peer_not_allowed")
        self.expect_rejected(node, " ICHTRIAGE2", "RAWSCU", 1, 1, 7, "called_ae_not_ours")
        # What is stored names the peer as it was judged, not "  RAWSCU".
        files = self.gen("ct", count=1, rows=64, cols=64)
        r = dt.storescu(node.port, files, workdir=self.work, calling="  RAWSCU")
        self.assert_all_success(r, files)
        self.assertEqual([row[0] for row in node.query("SELECT calling_ae FROM instances")],
                         ["RAWSCU"])

    def test_calling_ae_bound_to_our_host_is_allowed(self):
        node = self.start_node({"dicom.allowed_peers": "LOCALSCU@127.0.0.1, ELSEWHERE@10.255.255.1"})
        a = dul.Association.connect("127.0.0.1", node.port, calling="LOCALSCU")
        self.assertEqual(a.c_echo()[0], 0)
        a.release()
        self.expect_rejected(node, "ICHTRIAGE", "ELSEWHERE", 1, 1, 3)

    def test_more_associations_than_allowed(self):
        node = self.start_node({"dicom.max_associations": 2})
        held = [dul.Association.connect("127.0.0.1", node.port) for _ in range(2)]
        # transient, service provider (presentation), local limit exceeded
        self.expect_rejected(node, "ICHTRIAGE", "RAWSCU", 2, 3, 2)
        for a in held:
            self.assertEqual(a.c_echo()[0], 0, "a held association stopped working")
        held.pop().release()
        # A slot is free again (allow the node a moment to notice).
        deadline = time.monotonic() + 5
        while True:
            try:
                a = dul.Association.connect("127.0.0.1", node.port)
                break
            except dul.Rejected:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.assertEqual(a.c_echo()[0], 0)
        a.release()
        held.pop().release()

    def test_wrong_ae_titles_are_refused_as_such_while_full(self):
        """The AE titles are checked before the association limit: while the
        node was full, a peer with a wrong called AE title (or a calling
        one not allowed) got the transient "local limit exceeded" and would
        retry, where the permanent "not recognized" is the answer."""
        node = self.start_node({"dicom.max_associations": 1,
                                "dicom.allowed_peers": "RAWSCU"})
        held = dul.Association.connect("127.0.0.1", node.port)
        self.expect_rejected(node, "NOTUS", "RAWSCU", 1, 1, 7, "called_ae_not_ours")
        self.expect_rejected(node, "ICHTRIAGE", "INTRUDER", 1, 1, 3, "calling_peer_not_allowed")
        self.expect_rejected(node, "ICHTRIAGE", "RAWSCU", 2, 3, 2, "too_many_associations")
        self.assertEqual(held.c_echo()[0], 0)
        held.release()

    def test_associations_do_not_count_against_the_cap_on_waiting_connections(self):
        """Connections that have not sent their request yet are capped at
        twice dicom.max_associations, apart from the associations
        (docs/conformance.md): with the two associations of a limit of two
        held and two silent connections, a new peer was cut off at once
        (4 of a cap of 4) instead of being told A-ASSOCIATE-RJ."""
        node = self.start_node({"dicom.max_associations": 2, "dicom.acse_timeout": 20})
        held = [dul.Association.connect("127.0.0.1", node.port) for _ in range(2)]
        silent = [dul.connect("127.0.0.1", node.port) for _ in range(2)]
        time.sleep(0.5)  # accepted and waiting for their request
        try:
            self.expect_rejected(node, "ICHTRIAGE", "RAWSCU", 2, 3, 2, "too_many_associations")
            # The cap itself still holds: with four waiting, a fifth is closed unanswered.
            silent += [dul.connect("127.0.0.1", node.port) for _ in range(2)]
            time.sleep(0.5)
            s = dul.connect("127.0.0.1", node.port)
            s.sendall(dul.associate_rq("ICHTRIAGE", "RAWSCU", [(dul.VERIFICATION, [dul.IMPLICIT_LE])]))
            with self.assertRaises((dul.Closed, ConnectionResetError)):
                dul.recv_pdu(s)
            s.close()
            self.assertTrue(node.wait_event("connection_refused", timeout=5))
        finally:
            for x in silent:
                x.close()
        for a in held:
            self.assertEqual(a.c_echo()[0], 0)
            a.release()

    def test_silent_peer_is_dropped(self):
        node = self.start_node({"dicom.acse_timeout": 3})
        s = dul.connect("127.0.0.1", node.port)
        t = dul.wait_closed(s, timeout=3 + 10)
        s.close()
        self.assertIsNotNone(t, "a peer that sent nothing was still connected after 13 s")
        self.assertGreater(t, 1.0, "dropped after %.1f s, before the ACSE timeout" % t)
        self.assertTrue(node.wait_event("association_failed", timeout=5),
                        "nothing logged about the silent peer")
        rc, out = dt.echoscu(node.port)
        self.assertEqual(rc, 0, out)

    def test_silent_peer_does_not_block_others(self):
        node = self.start_node({"dicom.acse_timeout": 8})
        silent = [dul.connect("127.0.0.1", node.port) for _ in range(2)]
        time.sleep(0.3)
        t0 = time.monotonic()
        a = dul.Association.connect("127.0.0.1", node.port, timeout=20)
        waited = time.monotonic() - t0
        self.assertEqual(a.c_echo()[0], 0)
        a.release()
        for s in silent:
            s.close()
        self.assertLess(waited, 3.0, "a working peer waited %.1f s behind two silent ones "
                        "(acse_timeout 8 s)" % waited)

    def test_association_deadline(self):
        node = self.start_node({"dicom.association_deadline": 3, "dicom.dimse_timeout": 60})
        a = dul.Association.connect("127.0.0.1", node.port)
        t0 = time.monotonic()
        cut = None
        while time.monotonic() - t0 < 15:
            try:
                status, _ = a.c_echo()  # busy, never idle long enough for a timeout
                self.assertEqual(status, 0)
            except (dul.DulError, OSError):
                cut = time.monotonic() - t0
                break
            time.sleep(0.3)
        a.close()
        self.assertIsNotNone(cut, "an active association outlived its 3 s deadline by 12 s")
        self.assertGreater(cut, 2.0)
        node.wait_event("association_ended", timeout=5)
        logged = [l for l in node.log().splitlines() if "deadline" in l and "event=ready" not in l]
        self.assertTrue(logged, "nothing logged about the deadline")


if __name__ == "__main__":
    sys.exit(itest.main())
