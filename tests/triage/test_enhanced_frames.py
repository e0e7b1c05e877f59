"""Enhanced CT (one multi-frame image) is never triaged on a part of its
frames without saying so (triage.md #4), through `ichtriage predict --json`:

- more frames than the volume limit fails the series, as the same series
  sent as single-frame files does (it used to be triaged on the first frames
  in file order);
- a frame without a position is dropped and counted in the series' note
  (it used to be dropped silently, and then with every frame after it); the
  frames after it are slices.

And, as on the node, a series whose slices are not axial is not triaged.

    python3 test_enhanced_frames.py ICHTRIAGE MAKE_TEST_MODEL"""
import json
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import itest  # noqa: E402

MAKE_MODEL = None
MAX_SLICES = 1000  # TRIAGE_MAX_SLICES (triage/volume.h)


class EnhancedFramesTest(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.model = os.path.join(self.work, "model.safetensors")
        subprocess.run([MAKE_MODEL, self.model], check=True)

    def predict(self, folder):
        p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--device", "cpu",
                            "--set", "triage.model=" + self.model, "--set",
                            "triage.min_slices=5", "--json", folder],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = json.loads(p.stdout)
        self.assertEqual(len(out), 1, out)
        return p.returncode, out[0], p.stderr.decode()

    def test_more_frames_than_the_limit_fail_the_series(self):
        (path,) = self.gen("many", count=MAX_SLICES + 1, rows=16, cols=16, sop="enhanced-ct")
        rc, row, err = self.predict(os.path.dirname(path))
        self.assertEqual(row["status"], "failed", row)
        self.assertIn("more than %d slices" % MAX_SLICES, row["status_reason"])
        self.assertEqual(rc, 1, err)

    def test_frames_without_a_position_are_counted(self):
        (path,) = self.gen("gap", count=30, rows=64, cols=64, sop="enhanced-ct")
        import pydicom
        ds = pydicom.dcmread(path)
        del ds.PerFrameFunctionalGroupsSequence[9].PlanePositionSequence
        ds.save_as(path)
        rc, row, err = self.predict(os.path.dirname(path))
        self.assertEqual(rc, 0, err)
        self.assertEqual(row["status"], "triaged", row)
        # frame 10 has no position; 11..30 are slices
        self.assertEqual(row["slices"], 29)
        self.assertIn("1 image(s) of other size or without geometry dropped",
                      row["status_reason"])
        self.assertEqual(len(row["slice_probabilities"]), 29)

    def test_sagittal_series_is_not_triaged(self):
        # As on the node (triage.max_tilt): a series whose slices are not
        # axial is not applicable, with the reason, instead of getting a
        # probability.
        files = self.gen("sag", count=8, rows=64, cols=64)
        import pydicom
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.ImagePositionPatient = [float(i), 0.0, 0.0]
            ds.save_as(f)
        rc, row, err = self.predict(os.path.dirname(files[0]))
        self.assertEqual(row["status"], "not_applicable", row)
        self.assertIn("slices are not axial", row["status_reason"])
        self.assertIsNone(row["probability"])
        self.assertEqual(rc, 0, err)

    def test_sagittal_enhanced_ct_on_the_node_is_not_applicable(self):
        """An enhanced CT's orientation is in its functional groups, so the
        node learns that it is sagittal only in the job: the series is then
        not applicable (with the reason), as predict says, not failed; and
        its study, whose axial series was triaged, is triaged, not listed as
        failed (not yet known) among the studies still to read."""
        import pydicom
        import time
        import dicomtest as dt
        (enh,) = self.gen("sagenh", count=12, rows=64, cols=64, sop="enhanced-ct")
        ds = pydicom.dcmread(enh)
        ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0] \
            .ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            item.PlanePositionSequence[0].ImagePositionPatient = ["%g" % (5.0 * i), "-125", "125"]
        axial = self.gen("ax", count=12, rows=64, cols=64,
                         study_uid=str(ds.StudyInstanceUID))
        ds.save_as(enh)
        node = self.start_node({"triage.model": self.model, "triage.quiet_seconds": 1,
                                "triage.min_slices": 5})
        r = dt.storescu(node.port, [enh] + axial, workdir=self.work)
        self.assert_all_success(r, [enh] + axial)
        deadline = time.monotonic() + 60
        states = {}
        while time.monotonic() < deadline:
            states = dict(node.query("SELECT series_uid, state || ' ' || state_reason"
                                     " FROM series"))
            if len(states) == 2 and not any(v.split()[0] in ("receiving", "waiting", "triaging")
                                            for v in states.values()):
                break
            time.sleep(0.2)
        self.assertTrue(states.get(str(ds.SeriesInstanceUID), "").startswith(
            "not_applicable slices are not axial"), states)
        status, = node.query("SELECT status FROM studies")[0]
        self.assertEqual(status, "triaged", states)


if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
