#!/usr/bin/python3
"""Issue 10: untrusted pixel decoding runs in a child process, so that one
bad file cannot take the node down.

- The child decodes exactly what the node decoded inline: the same study
  gets the same per-slice probabilities with triage.pixel_decoder = child and
  = inline.
- A child that crashes (SIGSEGV, abort), runs over its CPU limit, goes
  silent, or allocates beyond its address-space limit fails its series with
  the reason ("pixel decoder crashed: signal 11 ...", a pixel_decoder_failed
  log line); the node stays up, answers C-ECHO, and triages a good study sent
  with them. The faults come from the test hook ICHTRIAGE_TEST_DECODER_FAULT
  (builds with -Dtest_hooks=true; skipped otherwise), which the child
  honours before decoding a file whose path names a given series.

    test_decoder.py /path/to/ichtriage /path/to/make_test_model"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

MAKE_MODEL = None
MAX_MB = 512


class Decoder(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.model = os.path.join(self.work, "model.safetensors")
        subprocess.run([MAKE_MODEL, self.model], check=True)

    def node(self, **settings):
        s = {"triage.model": self.model, "triage.quiet_seconds": 1, "triage.min_slices": 5}
        s.update(settings)
        return self.start_node(s, name="node%d" % len(self.nodes))

    def phantom(self, seed):
        out = os.path.join(self.work, "ph%d" % seed)
        if not os.path.isdir(out):
            subprocess.run([itest.EXE, "phantom", "--seed", str(seed), "-n", "1", "--size", "64",
                            "--slices", "8", out], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        d = os.path.join(out, "stage_2_train")
        files = sorted(os.path.join(d, f) for f in os.listdir(d))
        _, _, study, series = dt.sop_uids(files[0])
        return study, series, files

    def job(self, node, series, timeout=90):
        """(state, error) of the series' job once it is done or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = node.query("SELECT j.state, j.error FROM jobs j JOIN series s "
                              "ON s.id = j.series_ref WHERE s.series_uid = ? "
                              "ORDER BY j.id DESC LIMIT 1", (series,))
            if rows and rows[0][0] in ("done", "failed"):
                return rows[0][0], rows[0][1]
            time.sleep(0.2)
        self.fail("the job of series %s did not end in %d s; log:\n%s"
                  % (series, timeout, node.log_tail()))

    def per_slice(self, node, series):
        return node.query("SELECT r.idx, r.sop_uid, r.frame, r.p_any, r.p_epidural, "
                          "r.p_intraparenchymal, r.p_intraventricular, r.p_subarachnoid, "
                          "r.p_subdural FROM slice_results r JOIN series s "
                          "ON s.id = r.series_ref WHERE s.series_uid = ? ORDER BY r.idx",
                          (series,))

    def test_child_decodes_as_inline(self):
        study, series, files = self.phantom(1)
        got = {}
        for how in ("inline", "child"):
            node = self.node(**{"triage.pixel_decoder": how})
            r = dt.storescu(node.port, files, workdir=self.work)
            self.assert_all_success(r, files)
            self.assertEqual(self.job(node, series), ("done", ""))
            got[how] = [tuple(x) for x in self.per_slice(node, series)]
            self.assertEqual(len(got[how]), 8)
            self.assertEqual(bool(node.events("pixel_decoder_failed")), False)
        self.assertEqual(got["child"], got["inline"])

    def test_bad_children_fail_their_series_only(self):
        hooks = subprocess.run([itest.EXE, "decode-pixels", "--has-test-hooks"])
        if hooks.returncode != 0:
            self.skipTest("built with -Dtest_hooks=false")
        faults = ["segv", "abort", "spin", "hang", "hog"]
        studies = {kind: self.phantom(10 + i) for i, kind in enumerate(faults)}
        good = self.phantom(30)
        os.environ["ICHTRIAGE_TEST_DECODER_FAULT"] = ",".join(
            "%s:%s" % (kind, studies[kind][1]) for kind in faults)
        try:
            node = self.node(**{"triage.decoder_cpu_seconds": 1,
                                "triage.decoder_max_mb": MAX_MB})
        finally:
            del os.environ["ICHTRIAGE_TEST_DECODER_FAULT"]
        files = [f for kind in faults for f in studies[kind][2]] + good[2]
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        want = {
            "segv": "pixel decoder crashed: signal %d (Segmentation fault) at slice 1 of 8"
                    % 11,
            "abort": "pixel decoder crashed: signal 6 (Aborted) at slice 1 of 8",
            "spin": "pixel decoder stopped: over its CPU limit (triage.decoder_cpu_seconds=1)",
            "hang": "pixel decoder stopped: no answer for 10 s at slice 1 of 8",
        }
        for kind in faults:
            with self.subTest(kind=kind):
                state, error = self.job(node, studies[kind][1])
                self.assertEqual(state, "failed", error)
                if kind == "hog":
                    # The address-space limit refused the allocations.
                    self.assertRegex(error, r"^test hook: \d+ MiB allocated, then refused$")
                    self.assertLess(int(error.split()[2]), MAX_MB)
                else:
                    self.assertIn(want[kind], error)
                    self.assertTrue(any(want[kind] in l
                                        for l in node.events("pixel_decoder_failed")),
                                    node.log_tail())
        self.assertEqual(self.job(node, good[1]), ("done", ""))
        self.assertEqual(len(self.per_slice(node, good[1])), 8)
        self.assertTrue(node.alive())
        rc, out = dt.echoscu(node.port)
        self.assertEqual(rc, 0, out)
        # No decoder child is left behind.
        kids = subprocess.run(["pgrep", "-P", str(node.proc.pid)], stdout=subprocess.PIPE)
        self.assertEqual(kids.stdout.split(), [])

    def test_sizes_and_slices_are_named_as_the_series_has_them(self):
        """A series whose headers say 65535x65535 fails on its size before
        anything is allocated for it; the node had allocated 17 GB for one
        slice, then its child refused the request: "pixel decoder exited
        with status 5 at slice 1 of 20", the cause unnamed. And with the head
        crop (whose samples the child decodes first) a failure names the
        slice as the series counts them: slice 2 of 20, not 1 of 28."""
        hooks = subprocess.run([itest.EXE, "decode-pixels", "--has-test-hooks"])
        if hooks.returncode != 0:
            self.skipTest("built with -Dtest_hooks=false")
        crop = os.path.join(self.work, "crop.safetensors")
        subprocess.run([MAKE_MODEL, crop, "b8,M,b16,M,b16,M,b16,G|", "1", "0.5", "crop=head"],
                       check=True)
        _, huge, files = self.phantom(40)
        subprocess.run(["dcmodify", "-nb", "-m", "(0028,0010)=65535", "-m", "(0028,0011)=65535"]
                       + files, check=True, stdout=subprocess.DEVNULL)
        out = os.path.join(self.work, "ph41")
        subprocess.run([itest.EXE, "phantom", "--seed", "41", "-n", "1", "--size", "64",
                        "--slices", "20", out], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        d = os.path.join(out, "stage_2_train")
        crashing = sorted(os.path.join(d, f) for f in os.listdir(d))
        crash = dt.sop_uids(crashing[0])[3]
        os.environ["ICHTRIAGE_TEST_DECODER_FAULT"] = "segv:" + crash
        try:
            node = self.node(**{"triage.model": crop})
        finally:
            del os.environ["ICHTRIAGE_TEST_DECODER_FAULT"]
        r = dt.storescu(node.port, files + crashing, workdir=self.work)
        self.assert_all_success(r, files + crashing)
        state, error = self.job(node, huge)
        self.assertEqual(state, "failed", error)
        self.assertEqual(error, "image size 65535x65535 out of range (64x64 to 8192x8192)")
        state, error = self.job(node, crash)
        self.assertEqual(state, "failed", error)
        self.assertIn("pixel decoder crashed: signal 11 (Segmentation fault) at slice 2 of 20,"
                      " read for the head crop (", error)


if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
