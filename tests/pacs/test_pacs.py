"""Results to PACS (issue 8), through the real node and real receivers:
Orthanc (Debian's, started here on loopback) gets the SR and the SC in the
right study, checked through its REST API; dcmtk's storescp as a second
receiver; both objects pass dciodvfy; our own objects sent back to the node
are stored but never triaged; a re-triaged study sends a new revision; with
Orthanc down the results wait (and survive a restart) and arrive once it is
up, nothing sent twice; a destination answering A700 is retried, then given
up with a visible error; a late answer is never read as the answer to the
next object.

The model has random weights (tests/triage/make_test_model.c) and pacs.send
is "all": these tests check delivery, not what a model has learnt.

    python3 test_pacs.py ICHTRIAGE MAKE_TEST_MODEL"""
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
sys.path.insert(0, HERE)
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402
from reject_scp import RejectScp  # noqa: E402

MAKE_MODEL = None
ORTHANC = "/usr/sbin/Orthanc"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def phantom(exe, out, seed, slices=12):
    subprocess.run([exe, "phantom", "--seed", str(seed), "-n", "1", "--size", "128",
                    "--slices", str(slices), out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import pydicom
    files = []
    for f in glob.glob(os.path.join(out, "stage_2_train", "*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        files.append((int(ds.InstanceNumber), f, ds.StudyInstanceUID, ds.PatientID))
    files.sort()
    return files[0][2], files[0][3], [f for _, f, _, _ in files]


class Orthanc:
    """Orthanc on loopback with its own storage and ports."""

    def __init__(self, workdir, dicom_port=None):
        self.dir = os.path.join(workdir, "orthanc")
        os.makedirs(self.dir, exist_ok=True)
        self.dicom_port = dicom_port or dt.free_port()
        self.http_port = dt.free_port()
        self.config = os.path.join(self.dir, "orthanc.json")
        with open(self.config, "w") as f:
            json.dump({"Name": "ichtriage-test", "StorageDirectory": self.dir + "/db",
                       "IndexDirectory": self.dir + "/db", "DicomAet": "ORTHANC",
                       "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                       "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                       "Plugins": []}, f)
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.dir, "orthanc.log"), "ab")
        self.proc = subprocess.Popen([ORTHANC, self.config], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                dt.wait_port(self.dicom_port, timeout=5)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        if self.proc:
            self.log.close()
        self.proc = None

    def get(self, path):
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.http_port, path),
                                    timeout=10) as r:
            return json.load(r)

    def post(self, path, body):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.http_port, path),
                                     data=body.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def study_instances(self, study_uid):
        """[(modality, SOP class, SOP instance UID, patient id)] of a study."""
        found = [x for x in self.post("/tools/lookup", study_uid) if x["Type"] == "Study"]
        out = []
        for hit in found:
            for inst in self.get("/studies/%s/instances" % hit["ID"]):
                tags = self.get("/instances/%s/simplified-tags" % inst["ID"])
                out.append((tags.get("Modality"), tags.get("SOPClassUID"),
                            tags.get("SOPInstanceUID"), tags.get("PatientID")))
        return sorted(out)


class PacsTest(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.model = os.path.join(self.work, "model.safetensors")
        subprocess.run([MAKE_MODEL, self.model], check=True)
        self.stoppers = []

    def tearDown(self):
        super().tearDown()
        for stop in reversed(self.stoppers):
            stop()

    def node(self, destinations, name="node", **extra):
        settings = {"triage.model": self.model, "triage.quiet_seconds": 1,
                    "triage.min_slices": 5, "pacs.destinations": destinations,
                    "pacs.send": "all", "pacs.retry_seconds": 1, "pacs.max_retry_seconds": 2,
                    "pacs.timeout": 5}
        settings.update(extra)
        return self.start_node(settings, name=name)

    def orthanc(self, **kw):
        o = Orthanc(self.work, **kw)
        self.stoppers.append(o.stop)
        return o

    def send(self, node, files):
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)

    def deliveries(self, node):
        return [tuple(r) for r in node.query("SELECT d.destination, d.object, d.state, d.attempts, d.last_error,"
                          " d.file_path, d.sop_uid, pr.revision, d.sent_at FROM pacs_deliveries d"
                          " JOIN pacs_revisions pr ON pr.id = d.revision_ref ORDER BY d.id")]

    def wait_deliveries(self, node, pred, count, timeout=60, what="deliveries"):
        deadline = time.monotonic() + timeout
        rows = []
        while time.monotonic() < deadline:
            rows = self.deliveries(node)
            if len([r for r in rows if pred(r)]) >= count:
                return rows
            time.sleep(0.25)
        self.fail("%s: %r\n%s" % (what, rows, node.log_tail()))

    def dciodvfy_clean(self, path):
        p = subprocess.run(["dciodvfy", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = p.stdout.decode("utf-8", "replace")
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        self.assertEqual(errors, [], "dciodvfy %s:\n%s" % (path, out))

    # ------------------------------------------------------------------
    def test_orthanc_and_storescp_receive_sr_and_sc(self):
        orthanc = self.orthanc().start()
        scp_dir = os.path.join(self.work, "storescp")
        os.makedirs(scp_dir)
        scp_port = dt.free_port()
        scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", scp_dir, str(scp_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stoppers.append(lambda: (scp.terminate(), scp.wait(10)))
        dt.wait_port(scp_port)
        node = self.node("ORTHANC@127.0.0.1:%d, STORESCP@127.0.0.1:%d"
                         % (orthanc.dicom_port, scp_port))
        study, patient_id, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=31)
        # 11 slices first; the 12th later re-opens the series (a new revision).
        self.send(node, files[:11])
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent", 4)
        self.assertEqual(sorted((r[1], r[2]) for r in rows),
                         [("sc", "sent")] * 2 + [("sr", "sent")] * 2, rows)
        got = orthanc.study_instances(study)
        self.assertEqual(sorted((m, c) for m, c, _, _ in got), [("OT", SC_CLASS), ("SR", SR_CLASS)])
        self.assertTrue(all(p == patient_id for _, _, _, p in got), got)
        sent_uids = {r[6] for r in rows}
        self.assertEqual({u for _, _, u, _ in got}, sent_uids)
        self.assertEqual(len(os.listdir(scp_dir)), 2, os.listdir(scp_dir))

        # Both objects are valid, say who made them, and name the key slice.
        import pydicom
        # What storescp received, checked; the node's own copies are gone once
        # every destination acknowledged them.
        paths = sorted(os.path.join(scp_dir, f) for f in os.listdir(scp_dir))
        for r in rows:
            self.assertFalse(os.path.exists(os.path.join(node.store_dir, r[5])), r)
        key_sop, = node.query("SELECT r.key_sop FROM results r")[0:1][0]
        for path in paths:
            self.dciodvfy_clean(path)
            ds = pydicom.dcmread(path)
            self.assertEqual(ds.StudyInstanceUID, study)
            self.assertEqual(ds.PatientID, patient_id)
            self.assertEqual(ds.Manufacturer, "ichtriage")
            if ds.SOPClassUID == SR_CLASS:
                text = " ".join(str(e.value) for e in ds.iterall()
                                if e.keyword in ("TextValue", "ReferencedSOPInstanceUID"))
                self.assertIn("Decision support, not a diagnosis", text)
                self.assertIn(key_sop, text)
                self.assertIn("test-random-weights", text)
            else:
                self.assertEqual((ds.Rows, ds.Columns, ds.SamplesPerPixel), (720, 512, 3))
                self.assertEqual(ds.SourceImageSequence[0].ReferencedSOPInstanceUID, key_sop)

        # Our own objects routed back to the node: stored, never triaged.
        results_before = node.query("SELECT count(*) FROM results")[0][0]
        self.send(node, paths)
        time.sleep(3)
        states = [tuple(r) for r in node.query("SELECT s.modality, s.state FROM series s WHERE s.modality != 'CT'")]
        self.assertEqual(sorted(states), [("OT", "not_applicable"), ("SR", "not_applicable")])
        self.assertEqual(node.query("SELECT count(*) FROM results")[0][0], results_before)

        # The late 12th slice: triaged again, revision 2 goes out.
        self.send(node, files[11:])
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent" and r[7] == 2, 4)
        deadline = time.monotonic() + 20
        while len(orthanc.study_instances(study)) < 4 and time.monotonic() < deadline:
            time.sleep(0.25)
        got = orthanc.study_instances(study)
        self.assertEqual(len(got), 4, got)
        self.assertEqual(len(os.listdir(scp_dir)), 4)
        # Revision 2's SR names revision 1's as its predecessor; all stay valid.
        first_sr = [r[6] for r in rows if r[1] == "sr" and r[7] == 1][0]
        second_sr = [r[6] for r in rows if r[1] == "sr" and r[7] == 2][0]
        seen = False
        for f in os.listdir(scp_dir):
            path = os.path.join(scp_dir, f)
            self.dciodvfy_clean(path)
            ds = pydicom.dcmread(path)
            if ds.SOPInstanceUID == second_sr:
                seen = True
                pred = ds.PredecessorDocumentsSequence[0]
                self.assertEqual(pred.StudyInstanceUID, study)
                self.assertEqual(pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                                 .ReferencedSOPInstanceUID, first_sr)
        self.assertTrue(seen)

    def test_enhanced_ct_key_frame(self):
        """An Enhanced CT (one multi-frame object): the SR names each slice by
        its 1-based frame number and the SC shows the key frame itself.
        slice_results keeps frames 0-based; they were passed on as they were
        (every reference one frame early, frame 0 none at all) and the SC
        drew the frame before the key."""
        port, out = self.storescp("enhanced")
        node = self.node("ENHANCED@127.0.0.1:%d" % port)
        frames = 30
        (path,) = self.gen("enh", count=frames, rows=64, cols=64, sop="enhanced-ct")
        import numpy as np
        import pydicom
        ds = pydicom.dcmread(path)
        # Frames in the file from top to bottom, so slice and frame numbers
        # differ; frame k is flat at its own HU, whose grey in the brain
        # window (0..80 HU) tells which frame a picture shows.
        hu = []
        for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            item.PlanePositionSequence[0].ImagePositionPatient[2] = -100.0 + 5.0 * (frames - 1 - k)
            hu.append(2 * (frames - 1 - k) + 1)
        pixels = np.stack([np.full((64, 64), 1024 + v, dtype=np.uint16) for v in hu])
        ds.PixelData = pixels.tobytes()
        ds.save_as(path)
        self.send(node, [path])
        self.wait_deliveries(node, lambda r: r[2] == "sent", 2)
        key_sop, key_index = node.query("SELECT key_sop, key_index FROM results")[0]
        slices = {i: (f, p) for i, f, p in node.query(
            "SELECT idx, frame, p_any FROM slice_results ORDER BY idx")}
        self.assertEqual(len(slices), frames)
        key_frame = slices[key_index][0]
        # As the node picks them: the key slice, then the most probable others.
        others = sorted((i for i in slices if i != key_index and slices[i][1] >= 0.5),
                        key=lambda i: -slices[i][1])[:2]
        want = [key_frame + 1] + [slices[i][0] + 1 for i in others]
        got = {}
        for f in os.listdir(out):
            got[str(pydicom.dcmread(os.path.join(out, f)).SOPClassUID)] = os.path.join(out, f)
        self.assertEqual(sorted(got), sorted([SC_CLASS, SR_CLASS]), got)
        sr = pydicom.dcmread(got[SR_CLASS])
        refs = [item.ReferencedSOPSequence[0] for item in sr.ContentSequence
                if item.ValueType == "IMAGE"]
        self.assertEqual([r.ReferencedSOPInstanceUID for r in refs], [key_sop] * len(want))
        self.assertEqual([int(r.get("ReferencedFrameNumber", 0)) for r in refs], want,
                         "key slice %d is frame %d (0-based)" % (key_index, key_frame))
        sc = pydicom.dcmread(got[SC_CLASS])
        self.assertEqual(int(sc.SourceImageSequence[0].ReferencedFrameNumber), key_frame + 1)
        # The middle of the picture's image square (56 + 512 / 2, 512 / 2).
        grey = int(sc.pixel_array[56 + 256, 256, 0])
        greys = [round(min(max(v / 80.0, 0.0), 1.0) * 255) for v in hu]
        shown = min(range(frames), key=lambda k: abs(greys[k] - grey))
        self.assertEqual(shown, key_frame, "grey %d" % grey)
        self.assertLessEqual(abs(greys[key_frame] - grey), 1)
        for p in got.values():
            self.dciodvfy_clean(p)

    def fragmented_enhanced_ct(self, name, converter, frames=12):
        """An Enhanced CT of 64x64 frames whose positions run against the
        file's order (slice i is frame frames-1-i), compressed by converter
        (a dcmtk tool and its options) into several fragments per frame with
        an empty Basic Offset Table."""
        import pydicom
        (plain,) = self.gen(name, count=frames, rows=64, cols=64, sop="enhanced-ct", seed=8)
        ds = pydicom.dcmread(plain)
        for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            item.PlanePositionSequence[0].ImagePositionPatient[2] = -100.0 + 5.0 * (frames - 1 - k)
        ds.save_as(plain)
        path = plain + ".enc.dcm"
        subprocess.run(converter + [plain, path], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        os.unlink(plain)
        dump = subprocess.run(["dcmdump", path], stdout=subprocess.PIPE, check=True).stdout
        self.assertGreater(dump.count(b"(fffe,e000) pi") - 1, frames, "one fragment per frame")
        return path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)

    def slice_png(self, node, study, sop, frame):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/api/studies/%s/slices/%s.png?frame=%d"
                                        % (node.http_port, study, sop, frame), timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def test_enhanced_ct_of_several_fragments_per_frame(self):
        """JPEG frames of several fragments each and an empty Basic Offset
        Table (PS3.5 A.4 allows both): triage decoded the whole object, but
        the summary image and the page's slice images decode one frame, which
        dcmtk alone could not find past the first ("basic offset table is
        empty"): every other frame's image was a 500, and with the key slice
        not in frame 0 neither the SR nor the SC reached PACS."""
        port, out = self.storescp("frag")
        node = self.node("FRAG@127.0.0.1:%d" % port)
        frames = 12
        path, study, sop = self.fragmented_enhanced_ct(
            "frag", ["dcmcjpeg", "+e1", "+fs", "1", "-ot"], frames)
        self.send(node, [path])
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent", 2)
        self.assertEqual(sorted(r[1] for r in rows), ["sc", "sr"], rows)
        key_index, = node.query("SELECT key_index FROM results")[0]
        key_frame, = node.query("SELECT frame FROM slice_results WHERE idx = ?", (key_index,))[0]
        self.assertNotEqual(key_frame, 0, "the test wants a key slice beyond frame 0")
        import pydicom
        sc = [pydicom.dcmread(os.path.join(out, f)) for f in os.listdir(out)]
        sc = [ds for ds in sc if ds.SOPClassUID == SC_CLASS]
        self.assertEqual(int(sc[0].SourceImageSequence[0].ReferencedFrameNumber), key_frame + 1)
        self.assertEqual([self.slice_png(node, study, sop, f) for f in range(frames)],
                         [200] * frames)
        self.assertFalse(node.wait_event("pacs_summary_failed", timeout=0.1, since_start=True))

    def test_summary_image_that_cannot_be_drawn_sends_the_sr_alone(self):
        """RLE with several fragments per frame (dcmcrle +fs, "non-standard":
        PS3.5 A.4.2 allows one per frame) and an empty offset table is
        triaged (the whole object decodes), but its key frame does not decode
        alone. That failure comes back at every attempt; the build is tried
        again (a passing failure, out of memory or of file descriptors,
        would clear) and at the last attempt the SR goes alone. Building
        used to fail after writing the SR, remove it and retry until given
        up, so nothing of the result reached PACS."""
        port, out = self.storescp("sronly")
        node = self.node("SRONLY@127.0.0.1:%d" % port, **{"pacs.max_attempts": 3})
        path, _, _ = self.fragmented_enhanced_ct("rle", ["dcmcrle", "+fs", "1", "-ot"])
        self.send(node, [path])
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent", 1)
        self.assertEqual([r[1] for r in rows], ["sr"], rows)
        self.assertTrue(node.wait_event("pacs_summary_failed", since_start=True), node.log_tail())
        self.assertEqual(len(node.events("pacs_revision_retry", since_start=True)), 2,
                         node.log_tail())
        self.assertIn("allows one fragment per frame", node.log_tail())
        self.assertEqual([tuple(r) for r in node.query("SELECT state FROM pacs_revisions")],
                         [("ready",)])
        import pydicom
        got = [str(pydicom.dcmread(os.path.join(out, f)).SOPClassUID) for f in os.listdir(out)]
        self.assertEqual(got, [SR_CLASS])

    def test_orthanc_down_then_up(self):
        orthanc = self.orthanc()
        node = self.node("ORTHANC@127.0.0.1:%d" % orthanc.dicom_port,
                         **{"pacs.max_attempts": 1000})
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=32)
        self.send(node, files)
        self.wait_deliveries(node, lambda r: r[2] == "pending" and r[3] >= 2, 2,
                             what="failed attempts while Orthanc is down")
        self.assertTrue(node.wait_event("pacs_retry"))
        # The queue survives a restart of the node.
        self.assertEqual(node.stop(), 0)
        orthanc.start()
        node.start()
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent", 2)
        got = orthanc.study_instances(study)
        self.assertEqual(sorted(c for _, c, _, _ in got), sorted([SC_CLASS, SR_CLASS]))
        # Acknowledged objects are never sent again after a restart.
        self.assertEqual(node.stop(), 0)
        node.start()
        time.sleep(3)
        self.assertEqual(self.deliveries(node), rows)
        self.assertNotIn("event=pacs_sent", node.log(since_start=True))
        self.assertEqual(len(orthanc.get("/instances")), 2)

    def test_rejecting_destination_is_given_up(self):
        scp = RejectScp(0xA700).start()
        self.stoppers.append(scp.close)
        node = self.node("FULL@127.0.0.1:%d" % scp.port, **{"pacs.max_attempts": 3})
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=33)
        self.send(node, files)
        rows = self.wait_deliveries(node, lambda r: r[2] == "failed", 2)
        for r in rows:
            self.assertEqual(r[3], 3, r)
            self.assertIn("0xA700", r[4])
            # Kept for an operator to look at or resend.
            self.assertTrue(os.path.exists(os.path.join(node.store_dir, r[5])), r)
        self.assertEqual(len(scp.stores), 6)
        self.assertEqual(scp.associations, 3)
        failed = node.events("pacs_delivery_failed")
        self.assertEqual(len(failed), 2, failed)
        self.assertGreaterEqual(len(node.events("pacs_retry")), 4)
        # Visible on the page (its degraded banner, also in /healthz) and in /metrics.
        failures = self.assert_shown(node, "not delivered to PACS: 2 objects",
                                     'ichtriage_pacs_deliveries{state="failed"} 2\n')
        self.assertEqual(sorted(f["object"] for f in failures), ["sc", "sr"])
        self.assertTrue(all(f["study_uid"] == study and f["attempts"] == 3 and
                            "0xA700" in f["error"] for f in failures), failures)
        status = subprocess.run([itest.EXE, "status", "-c", "/dev/null", "--set",
                                 "store.dir=" + node.store_dir, "--json"],
                                stdout=subprocess.PIPE, check=False)
        self.assertEqual(json.loads(status.stdout)["pacs_deliveries"],
                         {"pending": 0, "sent": 0, "failed": 2})

    def test_warning_status_is_stored(self):
        """B001 is a warning (PS3.7 C.1.2: the object is stored, as for
        0001, 0107, 0116 and any Bxxx). Only B000, B006 and B007 were taken
        for warnings: each object was stored once per attempt, then called
        given up."""
        scp = RejectScp(0xB001).start()
        self.stoppers.append(scp.close)
        node = self.node("WARN@127.0.0.1:%d" % scp.port, **{"pacs.max_attempts": 3})
        _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=39)
        self.send(node, files)
        rows = self.wait_deliveries(node, lambda r: r[2] in ("sent", "failed"), 2)
        time.sleep(3)  # a retry (1 to 2 s) would have stored them again by now
        self.assertEqual([(r[1], r[2], r[3]) for r in self.deliveries(node)],
                         [("sr", "sent", 1), ("sc", "sent", 1)], rows)
        self.assertEqual(len(scp.stores), 2, scp.stores)
        sent = node.events("pacs_sent")
        self.assertEqual(len(sent), 2, sent)
        self.assertTrue(all("status=0xB001" in e for e in sent), sent)
        self.assertEqual(node.events("pacs_retry") + node.events("pacs_delivery_failed"), [])
        health = json.load(urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port))
        self.assertFalse([d for d in health.get("degraded", []) if "PACS" in d], health)

    def test_object_the_pacs_aborts_on_does_not_hold_back_the_others(self):
        """A PACS that aborts the association on every SR: each SC is still
        delivered, at its first attempt, and each SR uses only its own
        attempts. The objects behind an SR on its association never went
        out, yet each such association counted an attempt for them, and the
        SR (oldest, so first every time) was behind on every one: the SCs,
        of any study, were given up without ever being sent."""
        scp = RejectScp(0x0000, abort_class=SR_CLASS).start()
        self.stoppers.append(scp.close)
        node = self.node("CHOKES@127.0.0.1:%d" % scp.port, **{"pacs.max_attempts": 3})
        files = []
        for seed in (61, 62):
            files += phantom(itest.EXE, os.path.join(self.work, "ph%d" % seed), seed=seed)[2]
        self.send(node, files)
        rows = self.wait_deliveries(node, lambda r: r[2] in ("sent", "failed"), 4, timeout=90)
        by_object = sorted((r[1], r[2], r[3]) for r in rows)
        self.assertEqual(by_object, [("sc", "sent", 1)] * 2 + [("sr", "failed", 3)] * 2, rows)
        self.assertEqual(sorted(c for c, _ in scp.stores), [SC_CLASS] * 2, scp.stores)
        self.assertEqual(len(scp.aborted), 6, scp.aborted)
        # An object left behind by the abort was sent again, not counted.
        self.assertTrue(node.events("pacs_requeued"), node.log_tail())
        self.assertFalse([e for e in node.events("pacs_retry") if "object=sc" in e],
                         node.events("pacs_retry"))
        # An association the peer aborted is dropped, not aborted again:
        # that had dcmtk log "Association Abort Failed" (its own lines show
        # at log.level debug, as here) for each.
        self.assertNotIn("Abort Failed", node.log())

    def pacs_cmd(self, node, *args, env=None):
        return subprocess.run([itest.EXE, "pacs", "-c", "/dev/null", "--set",
                               "store.dir=" + node.store_dir, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=60, env=dict(os.environ, **(env or {})))

    def test_retry_by_hand_delivers_what_was_given_up(self):
        """`ichtriage pacs list` shows what was given up, and `pacs retry`
        puts it back in the queue of the running node, which delivers it.
        Nothing could: the docs said to resend by hand with storescu, which
        left the rows given up, the files in outbox/ and the study out of
        retention for ever."""
        scp = RejectScp(0xA700).start()
        self.stoppers.append(scp.close)
        dest = "FULL@127.0.0.1:%d" % scp.port
        node = self.node(dest, **{"pacs.max_attempts": 2})
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=40)
        import pydicom
        name = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientName)
        self.send(node, files)
        rows = self.wait_deliveries(node, lambda r: r[2] == "failed", 2)

        listed = self.pacs_cmd(node, "list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, r"%s +0 +2 +0 +0\n" % dest)
        self.assertIn(study, listed.stdout)
        self.assertIn("C-STORE status 0xA700", listed.stdout)
        self.assertTrue(name and name not in listed.stdout, listed.stdout)
        got = json.loads(self.pacs_cmd(node, "list", "--json").stdout)
        self.assertEqual(got["destinations"], [{"destination": dest, "pending": 0, "sent": 0,
                                                 "failed": 2, "dismissed": 0}])
        self.assertEqual(sorted((f["object"], f["study_uid"], f["attempts"])
                                for f in got["failed"]), [("sc", study, 2), ("sr", study, 2)])
        self.assertEqual(got["results_not_built"], 0)

        other = self.pacs_cmd(node, "retry", "1.2.3.4.5")
        self.assertEqual(other.returncode, 1, other.stderr)
        self.assertIn("nothing of study 1.2.3.4.5 was given up", other.stderr)
        self.assertEqual(self.pacs_cmd(node, "retry").returncode, 2)

        # The PACS is fixed; the node runs on.
        scp.status = 0x0000
        stores = len(scp.stores)
        r = self.pacs_cmd(node, "retry", study)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("2 objects back in the queue", r.stdout)
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent", 2, timeout=90)
        self.assertEqual(sorted((r[1], r[3]) for r in rows), [("sc", 1), ("sr", 1)], rows)
        self.assertEqual(len(scp.stores), stores + 2, scp.stores)
        for r in rows:  # delivered everywhere: its files go
            self.assertFalse(os.path.exists(os.path.join(node.store_dir, r[5])), r)
        got = json.loads(self.pacs_cmd(node, "list", "--json").stdout)
        self.assertEqual(got["destinations"], [{"destination": dest, "pending": 0, "sent": 2,
                                                 "failed": 0, "dismissed": 0}])
        self.assertEqual(got["failed"], [])
        health = json.load(urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port))
        self.assertFalse([d for d in health.get("degraded", []) if "PACS" in d], health)

    def test_pacs_as_root_leaves_the_store_to_its_owner(self):
        """`sudo ichtriage pacs list|retry|dismiss` on the store of the
        service user (here nobody), after an upgrade and before the node's
        restart migrated the index: every file in the store stays the
        user's, and the user still opens and writes the index. The copy of
        the index taken before the migration was root's (0644), in the
        user's store. SQLite gives its -wal and -shm files the index's
        owner itself."""
        if os.geteuid() != 0:
            self.skipTest("needs root to act for another user")
        user = pwd.getpwnam("nobody")
        node = self.node("")
        self.assertEqual(node.stop(), 0, node.log_tail())
        os.chmod(self.work, 0o711)  # let the user reach its store below it
        import sqlite3
        con = sqlite3.connect(node.db_path)
        version, = con.execute("PRAGMA user_version").fetchone()
        # The last migration (an index) not yet made: the node's previous release.
        con.executescript("DROP INDEX studies_open; PRAGMA user_version = %d;"
                          % (version - 1))
        con.close()
        for d, dirs, files in os.walk(node.store_dir):
            for x in [d] + [os.path.join(d, f) for f in files]:
                os.chown(x, user.pw_uid, user.pw_gid)
        for args in (["list"], ["retry", "--all"], ["dismiss", "--all"]):
            r = self.pacs_cmd(node, *args)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual("event=db_backup_before_migration" in r.stderr, args == ["list"],
                             r.stderr)
        wrong = []
        for d, dirs, files in os.walk(node.store_dir):
            for x in dirs + files:
                st = os.stat(os.path.join(d, x))
                if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
                    wrong.append((os.path.relpath(os.path.join(d, x), node.store_dir), st.st_uid))
        self.assertEqual(wrong, [])
        self.assertEqual(len(glob.glob(node.db_path + ".v%d-*.bak" % (version - 1))), 1,
                         os.listdir(node.store_dir))
        r = subprocess.run(["setpriv", "--reuid=%d" % user.pw_uid, "--regid=%d" % user.pw_gid,
                            "--clear-groups", "--", itest.EXE, "pacs", "-c", "/dev/null", "--set",
                            "store.dir=" + node.store_dir, "retry", "--all"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_admin_commands_leave_a_running_older_nodes_schema_alone(self):
        """After an upgrade, before the node's restart, the node of the
        release before still runs on the index: `ichtriage pacs` and
        `ichtriage worklist` of the new release refuse to migrate it under
        that node (it checked the schema once, at its start) and say what to
        do. They had migrated it. Once the node has stopped they do."""
        node = self.node("")
        import sqlite3
        con = sqlite3.connect(node.db_path, timeout=30)
        version, = con.execute("PRAGMA user_version").fetchone()
        # The running node as of the release before: the last migration
        # (an index) not yet made.
        con.executescript("DROP INDEX studies_open; PRAGMA user_version = %d;" % (version - 1))
        con.close()
        worklist = [itest.EXE, "worklist", "-c", "/dev/null", "--set",
                    "store.dir=" + node.store_dir]
        for r in (self.pacs_cmd(node, "list"),
                  subprocess.run(worklist, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, timeout=60)):
            self.assertNotEqual(r.returncode, 0, r.stdout)
            self.assertIn("a node of an older release still runs on it", r.stderr)
            self.assertIn("restart the node with this release first", r.stderr)
        con = sqlite3.connect(node.db_path, timeout=30)
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], version - 1)
        con.close()
        self.assertEqual(glob.glob(node.db_path + ".v*.bak"), [])
        self.assertEqual(node.stop(), 0, node.log_tail())
        r = self.pacs_cmd(node, "list")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("event=db_backup_before_migration", r.stderr)
        r = subprocess.run(worklist, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        con = sqlite3.connect(node.db_path)
        self.assertEqual(con.execute("PRAGMA user_version").fetchone()[0], version)
        con.close()

    def test_dismiss_lets_go_of_a_removed_destination(self):
        """Objects for a destination taken out of pacs.destinations are given
        up at the next start and can never be delivered: `pacs dismiss`,
        while the node runs, lets them go (logged, audited), removes the
        result's files, clears the banner, and the study may go by
        retention. They had kept the banner up for a day, the files in
        outbox/ and the study out of retention for ever; retry only gave
        them up again."""
        port, _ = self.storescp("kept")
        kept = "KEPT@127.0.0.1:%d" % port
        gone = "GONE@127.0.0.1:%d" % dt.free_port()  # nothing listens: retried
        node = self.node(kept + "," + gone, **{"pacs.max_attempts": 1000})
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=43)
        import pydicom
        name = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientName)
        self.send(node, files)
        self.wait_deliveries(node, lambda r: r[0] == kept and r[2] == "sent", 2)
        self.wait_deliveries(node, lambda r: r[0] == gone and r[2] == "pending" and r[3] >= 1, 2,
                             what="attempts to the destination about to go")
        # Nothing pending is dismissed.
        r = self.pacs_cmd(node, "dismiss", study)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("nothing of study %s was given up" % study, r.stderr)
        self.assertEqual(sorted(x[2] for x in self.deliveries(node) if x[0] == gone),
                         ["pending", "pending"])

        # The destination is removed from the config: given up at start.
        self.assertEqual(node.stop(), 0)
        node.settings["pacs.destinations"] = kept
        node.start()
        rows = self.wait_deliveries(node, lambda r: r[0] == gone and r[2] == "failed", 2)
        self.assertTrue(all(r[4] == "destination no longer configured"
                            for r in rows if r[0] == gone), rows)
        self.assert_shown(node, "not delivered to PACS: 2 objects",
                          'ichtriage_pacs_deliveries{state="failed"} 2\n')
        paths = sorted({r[5] for r in rows})
        self.assertEqual(len(paths), 2, rows)
        for p in paths:
            self.assertTrue(os.path.exists(os.path.join(node.store_dir, p)), p)

        r = self.pacs_cmd(node, "dismiss", study, env={"SUDO_USER": "admin1"})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("%s: 2 objects dismissed, 0 results dismissed, 2 files removed from outbox/"
                      % study, r.stdout)
        logged = sorted(l for l in r.stderr.splitlines() if "event=pacs_dismissed" in l)
        self.assertEqual(len(logged), 2, r.stderr)
        for line, obj in zip(logged, ("sc", "sr")):
            for field in ("study=" + study, "revision=1", "destination=" + gone,
                          "object=" + obj, "user=admin1"):
                self.assertIn(field, line)
        self.assertTrue(name and name not in r.stdout + r.stderr, r.stderr)
        self.assertEqual(sorted((x[0], x[2]) for x in self.deliveries(node)),
                         [(gone, "dismissed")] * 2 + [(kept, "sent")] * 2)
        for p in paths:  # nothing left to send: the result's files go
            self.assertFalse(os.path.exists(os.path.join(node.store_dir, p)), p)
        self.assertEqual([tuple(a) for a in node.query(
            "SELECT user, study_uid, detail FROM audit WHERE action = 'pacs_dismissed'"
            " ORDER BY id")],
            [("admin1", study, "revision=1 destination=%s object=%s" % (gone, obj))
             for obj in ("sc", "sr")])

        # The banner is gone, at once (no event needed: the page asks).
        health = json.load(urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port))
        self.assertFalse([d for d in health.get("degraded", []) if "PACS" in d], health)
        metrics = urllib.request.urlopen("http://127.0.0.1:%d/metrics"
                                         % node.http_port).read().decode()
        self.assertIn('ichtriage_pacs_deliveries{state="failed"} 0\n', metrics)
        self.assertIn('ichtriage_pacs_deliveries{state="dismissed"} 2\n', metrics)
        self.assertEqual(json.load(urllib.request.urlopen(
            "http://127.0.0.1:%d/api/pacs/failures" % node.http_port)), [])
        listed = self.pacs_cmd(node, "list")
        self.assertRegex(listed.stdout, r"%s +0 +0 +0 +2\n" % gone)
        self.assertRegex(listed.stdout, r"%s +0 +0 +2 +0\n" % kept)
        got = json.loads(self.pacs_cmd(node, "list", "--json").stdout)
        self.assertEqual(got["destinations"], [
            {"destination": gone, "pending": 0, "sent": 0, "failed": 0, "dismissed": 2},
            {"destination": kept, "pending": 0, "sent": 2, "failed": 0, "dismissed": 0}])
        self.assertEqual((got["failed"], got["results_dismissed"]), ([], 0))

        # Final: retry and a second dismissal leave them as they are.
        self.assertEqual(self.pacs_cmd(node, "retry", study).returncode, 1)
        r = self.pacs_cmd(node, "retry", "--all")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("0 objects back in the queue", r.stdout)
        self.assertEqual(self.pacs_cmd(node, "dismiss", study).returncode, 1)
        self.assertEqual(sorted((x[0], x[2]) for x in self.deliveries(node)),
                         [(gone, "dismissed")] * 2 + [(kept, "sent")] * 2)

        # Done with: retention takes the study once it is old (made so while
        # the node is stopped; not flagged, so that the random model's flag
        # does not keep it).
        self.assertEqual(node.stop(), 0)
        old = int(time.time() * 1000) - 3 * 86400 * 1000
        import sqlite3
        con = sqlite3.connect(node.db_path)
        with con:
            con.execute("UPDATE studies SET updated_at = ?, received_at = ?, flagged = 0",
                        (old, old))
        con.close()
        node.settings["store.retention_days"] = "1"
        node.start()
        self.assertTrue(node.wait_event("study_purged", timeout=20), node.log_tail())
        self.assertEqual([tuple(x) for x in node.query(
            "SELECT purged_at IS NOT NULL FROM studies WHERE study_uid = ?", (study,))], [(1,)])

    def test_given_up_reaches_an_open_page(self):
        # The page's banner heard of a delivery given up only when something
        # else changed: the PACS thread does not wake the loop, and pushes
        # came only from worklist changes.
        node = self.node("CLOSED@127.0.0.1:%d" % dt.free_port(),
                         **{"pacs.max_attempts": 2, "pacs.retry_seconds": 2})
        stream = dt.EventStream("http://127.0.0.1:%d/api/events" % node.http_port)
        self.stoppers.append(stream.close)
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=38)
        self.send(node, files)
        self.assertTrue(node.wait_event("pacs_delivery_failed", timeout=60, count=2),
                        node.log_tail())
        given_up = time.monotonic()
        banner = "results not delivered to PACS: 2 objects"
        deadline = given_up + 12
        heard = None
        while heard is None and time.monotonic() < deadline:
            heard = next((ev for ev in list(stream.events)
                          if any(banner in d for d in ev["data"].get("degraded", []))), None)
            time.sleep(0.1)
        self.assertIsNotNone(heard, "not on the stream 12 s after it was given up; "
                             "events: %r" % [ev["data"].get("degraded") for ev in stream.events])
        self.assertLess(heard["at"] - given_up, 7)
        self.assert_shown(node, banner, 'ichtriage_pacs_deliveries{state="failed"} 2\n')

    def test_stop_sends_no_more_objects_to_a_slow_pacs(self):
        """A slow PACS (the first answer after 5 s, each next after 1 s):
        while the first revision's objects go out, the other studies' are
        built, and the next association carries all of them. A stop during
        it ends the association after the object in flight, records no
        attempt for the rest, and the next start sends them. Before, the
        stop waited for the whole batch (up to pacs.timeout per object, past
        systemd's TimeoutStopSec with enough of them)."""
        scp = RejectScp(0x0000, late_first=5, delay=1).start()
        self.stoppers.append(scp.close)
        node = self.node("SLOW@127.0.0.1:%d" % scp.port, **{"pacs.timeout": 20})
        files = []
        for seed in (51, 52, 53, 54):
            files += phantom(itest.EXE, os.path.join(self.work, "ph%d" % seed), seed=seed)[2]
        self.send(node, files)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(scp.stores) < 4:
            time.sleep(0.05)
        self.assertGreaterEqual(len(scp.stores), 4, node.log_tail())
        at_stop = len(scp.stores)
        self.assertEqual(node.stop(), 0, node.log_tail())
        time.sleep(1.5)  # an object still going out would be answered by now
        self.assertLessEqual(len(scp.stores), at_stop + 1, "objects sent after the stop")
        rows = self.deliveries(node)
        self.assertEqual(len(rows), 8, rows)
        waiting = [r for r in rows if r[2] == "pending"]
        self.assertTrue(waiting, rows)
        self.assertEqual([r[3] for r in waiting], [0] * len(waiting), "attempts counted: %s" % rows)
        node.start()
        self.wait_deliveries(node, lambda r: r[2] == "sent", 8, timeout=90)

    def test_retry_waits_after_a_slow_attempt(self):
        """A PACS that takes 2 s to refuse each object, with
        pacs.retry_seconds 1: the retry comes 1 s after the attempt ended,
        both objects on one association. Measured from the attempt's start,
        it was due before the attempt ended (next_in_ms=-1000, -3000): no
        backoff at all for a slow PACS."""
        scp = RejectScp(0xA700, delay=2).start()
        self.stoppers.append(scp.close)
        node = self.node("SLOWREFUSE@127.0.0.1:%d" % scp.port,
                         **{"pacs.max_attempts": 2, "pacs.timeout": 10})
        _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=41)
        self.send(node, files)
        self.wait_deliveries(node, lambda r: r[2] == "failed", 2, timeout=90)
        retries = node.events("pacs_retry")
        self.assertEqual(len(retries), 2, retries)
        waits = [int(e.split("next_in_ms=")[1].split()[0]) for e in retries]
        self.assertTrue(all(900 <= w <= 1000 for w in waits), retries)
        self.assertEqual(scp.associations, 2, retries)

    def test_stop_while_the_association_is_set_up_sends_nothing(self):
        """A stop that comes while the PACS takes its time to accept the
        association: once accepted, no object goes out on it, none uses an
        attempt, and the next start sends them. The first object went out
        (and its answer was waited for, up to pacs.timeout) whatever the
        stop."""
        scp = RejectScp(0x0000, accept_delay=3).start()
        self.stoppers.append(scp.close)
        node = self.node("SLOWACCEPT@127.0.0.1:%d" % scp.port, **{"pacs.timeout": 20})
        _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=42)
        self.send(node, files)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and scp.requests < 1:
            time.sleep(0.05)
        self.assertEqual(scp.requests, 1, node.log_tail())
        self.assertEqual(node.stop(), 0, node.log_tail())
        time.sleep(1)  # an object sent after the accept would be stored by now
        self.assertEqual(scp.stores, [])
        rows = self.deliveries(node)
        self.assertEqual([(r[2], r[3]) for r in rows], [("pending", 0)] * 2, rows)
        node.start()
        self.wait_deliveries(node, lambda r: r[2] == "sent", 2)
        self.assertEqual(len(scp.stores), 2, scp.stores)

    def test_stop_cuts_short_a_pacs_that_never_answers(self):
        """pacs.timeout 300 s, and a PACS that never accepts the association
        it was asked for, or one that accepts it and never answers the first
        C-STORE: the node stops within seconds all the same, and the objects
        wait for the next start with no attempt used. The stop had waited
        for the acceptance or the answer, up to pacs.timeout, past systemd's
        TimeoutStopSec (40 s), while the node could not be started again
        and scanners were refused."""
        for name, scp in (("NOACCEPT", RejectScp(0x0000, accept_delay=3600)),
                          ("NOANSWER", RejectScp(0x0000, late_first=3600))):
            scp.start()
            self.stoppers.append(scp.close)
            node = self.node("%s@127.0.0.1:%d" % (name, scp.port), name=name,
                             **{"pacs.timeout": 300})
            _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph" + name), seed=46)
            self.send(node, files)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (scp.stores if name == "NOANSWER"
                                                       else scp.requests):
                time.sleep(0.05)
            self.assertTrue(scp.stores if name == "NOANSWER" else scp.requests, node.log_tail())
            time.sleep(0.5)  # well into the wait
            t0 = time.monotonic()
            rc = node.stop()
            took = time.monotonic() - t0
            self.assertEqual(rc, 0, "%s: %s" % (name, node.log_tail()))
            self.assertLess(took, 10, "%s: the stop took %.1f s" % (name, took))
            rows = self.deliveries(node)
            self.assertEqual([(r[2], r[3]) for r in rows], [("pending", 0)] * 2,
                             "%s: %s" % (name, rows))
            scp.close()

    def test_stop_leaves_a_connect_that_never_completes(self):
        """A destination that drops packets (its listen queue full: the TCP
        connect never completes), pacs.timeout 300 s: the stop leaves the
        sender in its connect after 5 s (pacs_stop_left_sender) and the
        node exits 0 well within systemd's TimeoutStopSec; the objects wait
        for the next start with no attempt used. The stop had waited out the
        connect, up to pacs.timeout."""
        dropping = socket.socket()
        dropping.bind(("127.0.0.1", 0))
        dropping.listen(0)
        queued = socket.create_connection(dropping.getsockname())  # the queue is full
        port = dropping.getsockname()[1]
        try:
            node = self.node("DROP@127.0.0.1:%d" % port, **{"pacs.timeout": 300})
            _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=47)
            self.send(node, files)
            self.wait_deliveries(node, lambda r: r[2] == "pending", 2)
            time.sleep(2)  # the sender in its connect
            t0 = time.monotonic()
            rc = node.stop()
            took = time.monotonic() - t0
            self.assertEqual(rc, 0, node.log_tail())
            self.assertLess(took, 15, "the stop took %.1f s" % took)
            self.assertTrue(node.events("pacs_stop_left_sender"), node.log_tail())
            rows = self.deliveries(node)
            self.assertEqual([(r[2], r[3]) for r in rows], [("pending", 0)] * 2, rows)
        finally:
            queued.close()
            dropping.close()

    def test_a_hanging_destination_does_not_hold_back_the_others(self):
        """Three destinations: one takes the association request and never
        answers it, one never completes the TCP connect (its listen queue is
        full, as a firewall that drops packets), one is a storescp; pacs.timeout
        is 300 s. The storescp gets each study's SR and SC while the other two
        still hang, and their objects wait with no attempt used. One sender
        worked through the queue one destination at a time, in name order,
        and the storescp waited out the hang ahead of it (up to pacs.timeout
        per attempt, every attempt): the first study's objects or the
        second's, whichever came after a hanging attempt began."""
        hung = RejectScp(0x0000, accept_delay=3600).start()
        self.stoppers.append(hung.close)
        dropping = socket.socket()
        dropping.bind(("127.0.0.1", 0))
        dropping.listen(0)
        queued = socket.create_connection(dropping.getsockname())  # the queue is full
        port, out = self.storescp("good")
        bad = ["HUNG@127.0.0.1:%d" % hung.port, "DROP@127.0.0.1:%d" % dropping.getsockname()[1]]
        good = "GOOD@127.0.0.1:%d" % port
        node = self.node(",".join(bad + [good]), **{"pacs.timeout": 300})
        try:
            for k, seed in enumerate((44, 45)):
                _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph%d" % seed), seed=seed)
                self.send(node, files)
                self.wait_deliveries(node, lambda r: r[0] == good and r[2] == "sent", 2 * (k + 1),
                                     what="the good PACS, while the others hang")
                self.assertEqual(len(os.listdir(out)), 2 * (k + 1))
                self.assertEqual((hung.requests, hung.associations), (1, 0), node.log_tail())
            rows = self.deliveries(node)
            self.assertEqual(sorted((r[0], r[2], r[3]) for r in rows if r[0] in bad),
                             sorted([(b, "pending", 0) for b in bad] * 4), rows)
            self.assertFalse([e for e in node.events("pacs_retry") + node.events("pacs_sent")
                              if "destination=HUNG" in e or "destination=DROP" in e],
                             node.log_tail())
        finally:
            # Their attempts end (closed, refused), else the stop would wait
            # for them.
            hung.close()
            queued.close()
            dropping.close()
        self.wait_deliveries(node, lambda r: r[0] in bad and r[3] >= 1, 4,
                             what="the hung attempts, ended")
        self.assertEqual(node.stop(), 0, node.log_tail())

    def test_late_answer_is_not_taken_for_the_next(self):
        # The PACS answers the first object (0x0000) only after the node has
        # stopped waiting, and refuses everything after it (A700). Read on the
        # same association, that late answer would pass for the next object's
        # and mark a refused object sent; the node must instead drop the
        # association and record nothing as sent.
        scp = RejectScp(0xA700, late_first=3).start()
        self.stoppers.append(scp.close)
        node = self.node("SLOW@127.0.0.1:%d" % scp.port,
                         **{"pacs.max_attempts": 2, "pacs.timeout": 1})
        _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=36)
        self.send(node, files)
        rows = self.wait_deliveries(node, lambda r: r[2] == "failed", 2)
        self.assertEqual([r[2] for r in rows], ["failed", "failed"], rows)
        self.assertEqual(node.events("pacs_sent"), [])
        # The first association: the object that got no answer in time uses
        # an attempt; the other, never sent on it, uses none and goes on a
        # new association.
        retries = node.events("pacs_retry")
        first = [e for e in retries if "attempt=1" in e and "object=sr" in e]
        self.assertEqual(len(first), 1, retries)
        self.assertIn("C-STORE:", first[0])
        self.assertFalse([e for e in retries if "not sent" in e], retries)
        requeued = node.events("pacs_requeued")
        self.assertEqual(len(requeued), 1, requeued)
        self.assertIn("object=sc", requeued[0])
        # The SR went out twice (its second attempt refused, the late answer
        # long since given). The SC's first association may time out while
        # the PACS still sits on the late answer: once or twice.
        self.assertEqual(len([c for c, _ in scp.stores if c == SR_CLASS]), 2, scp.stores)
        self.assertIn(len([c for c, _ in scp.stores if c == SC_CLASS]), (1, 2), scp.stores)

    def storescp(self, name, tls=None):
        """dcmtk's storescp on a free port (TLS with tls=(key, cert)); returns
        (port, its output dir)."""
        out = os.path.join(self.work, name)
        os.makedirs(out)
        port = dt.free_port()
        argv = ["storescp", "-aet", name.upper(), "-od", out]
        if tls:
            argv += ["+tls", tls[0], tls[1], "-ic"]
        p = subprocess.Popen(argv + [str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.stoppers.append(lambda: (p.terminate(), p.wait(10)))
        dt.wait_port(port)
        return port, out

    def test_tls_destination(self):
        """Over TLS a result goes only to the PACS whose certificate the CA
        file vouches for and that names the host dialled: not to a stranger,
        and not to a trusted certificate issued for another host."""
        certs = {}
        for name, san in (("trusted", "IP:127.0.0.1"), ("stranger", "IP:127.0.0.1"),
                          ("misnamed", "DNS:pacs.example")):
            key, crt = os.path.join(self.work, name + ".key"), os.path.join(self.work, name + ".pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                            key, "-out", crt, "-days", "2", "-subj", "/CN=" + name,
                            "-addext", "subjectAltName=" + san],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            certs[name] = (key, crt)
        # The CA file trusts the misnamed certificate too: only its name is wrong.
        ca = os.path.join(self.work, "ca.pem")
        with open(ca, "w") as f:
            for name in ("trusted", "misnamed"):
                with open(certs[name][1]) as c:
                    f.write(c.read())
        ports, dirs = {}, {}
        for name in certs:
            ports[name], dirs[name] = self.storescp(name, tls=certs[name])
        node = self.node(",".join("tls:%s@127.0.0.1:%d" % (n.upper(), ports[n]) for n in certs),
                         **{"pacs.tls_ca": ca, "pacs.max_attempts": 2})
        _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=34)
        self.send(node, files)
        rows = self.wait_deliveries(node, lambda r: r[2] in ("sent", "failed"), 6)
        by_dest = {}
        for r in rows:
            by_dest.setdefault(r[0].split("@")[0], set()).add(r[2])
        self.assertEqual(by_dest, {"tls:TRUSTED": {"sent"}, "tls:STRANGER": {"failed"},
                                   "tls:MISNAMED": {"failed"}}, rows)
        self.assertEqual(len(os.listdir(dirs["trusted"])), 2)
        self.assertEqual(os.listdir(dirs["stranger"]), [])
        self.assertEqual(os.listdir(dirs["misnamed"]), [])

    def assert_shown(self, node, banner, metric):
        """What was given up is in /healthz (the page's banner) and /metrics;
        returns /api/pacs/failures."""
        health = json.load(urllib.request.urlopen("http://127.0.0.1:%d/healthz" % node.http_port))
        self.assertTrue(any(banner in d for d in health["degraded"]), health)
        metrics = urllib.request.urlopen("http://127.0.0.1:%d/metrics"
                                         % node.http_port).read().decode()
        self.assertIn(metric, metrics)
        return json.load(urllib.request.urlopen(
            "http://127.0.0.1:%d/api/pacs/failures" % node.http_port))

    @staticmethod
    def block_outbox(node):
        """outbox/ cannot be made (a file holds its name): building fails."""
        outbox = os.path.join(node.store_dir, "outbox")
        if os.path.isdir(outbox):
            os.rmdir(outbox)
        with open(outbox, "w") as f:
            f.write("in the way\n")
        return outbox

    def test_build_fault_retried_until_it_clears(self):
        port, out = self.storescp("fault")
        node = self.node("FAULT@127.0.0.1:%d" % port)
        outbox = self.block_outbox(node)
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=36)
        self.send(node, files)
        self.assertTrue(node.wait_event("pacs_revision_retry", timeout=60), node.log_tail())
        revs = [tuple(r) for r in node.query("SELECT state FROM pacs_revisions")]
        self.assertEqual(revs, [("pending",)], node.log_tail())
        # The fault clears: the same result is built and delivered.
        os.unlink(outbox)
        rows = self.wait_deliveries(node, lambda r: r[2] == "sent", 2, timeout=30)
        self.assertEqual(sorted(r[1] for r in rows), ["sc", "sr"])
        self.assertEqual(len(os.listdir(out)), 2)

    def test_build_fault_given_up_is_shown(self):
        port, _ = self.storescp("unbuilt")
        node = self.node("FAULT@127.0.0.1:%d" % port, **{"pacs.max_attempts": 1})
        self.block_outbox(node)
        study, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=37)
        self.send(node, files)
        self.assertTrue(node.wait_event("pacs_revision_failed", timeout=60), node.log_tail())
        # No delivery exists to fail, yet the admins see it (it was silent).
        failures = self.assert_shown(node, "results not built for PACS: 1",
                                     "ichtriage_pacs_results_not_built 1\n")
        self.assertEqual([f["study_uid"] for f in failures], [study], failures)
        status = subprocess.run([itest.EXE, "status", "-c", "/dev/null", "--set",
                                 "store.dir=" + node.store_dir, "--json"],
                                stdout=subprocess.PIPE, check=False)
        self.assertEqual(json.loads(status.stdout)["pacs_results_not_built"], 1)

    def test_send_flagged_only(self):
        port, out = self.storescp("flagged")
        _, _, files = phantom(itest.EXE, os.path.join(self.work, "ph"), seed=35)
        # Not flagged (random weights, threshold 0.5): recorded as skipped, nothing sent.
        node = self.node("FLAGGED@127.0.0.1:%d" % port, **{"pacs.send": "flagged"})
        self.send(node, files)
        deadline = time.monotonic() + 30
        revs = []
        while time.monotonic() < deadline and not revs:
            revs = [tuple(r) for r in node.query("SELECT state, reason FROM pacs_revisions")]
            time.sleep(0.2)
        self.assertEqual(revs, [("skipped", "not flagged (pacs.send = flagged)")])
        self.assertEqual(self.deliveries(node), [])
        # Everything flagged (threshold 0.01): sent.
        low = os.path.join(self.work, "low.safetensors")
        subprocess.run([MAKE_MODEL, low, "b8,M,b16,M,b16,M,b16,G|", "1", "0.01"], check=True)
        node2 = self.node("FLAGGED@127.0.0.1:%d" % port, name="node2",
                          **{"pacs.send": "flagged", "triage.model": low})
        self.send(node2, files)
        self.wait_deliveries(node2, lambda r: r[2] == "sent", 2)
        self.assertEqual(len(os.listdir(out)), 2)


if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
