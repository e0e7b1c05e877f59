"""Models whose numbers are not numbers (files.md #1, triage.md #3): a NaN or
Inf weight makes every output NaN, and NaN compares false against every
threshold, so such a model used to triage every study "p=0, not flagged".

- A file with a NaN weight, or a negative batch-norm variance, is refused
  by `model register`, `model promote`, the node at start (model not
  loaded, studies wait) and at SIGHUP reload (the old model is kept and
  used).
- A model whose weights are all finite but whose forward pass overflows
  (Inf, then Inf*0 = NaN), in the head or in the first convolution (the NaN
  passes every ReLU and max-pool), fails the series with a reason, in the
  node and in `ichtriage predict`: an unknown result is never a negative one.
- A file without its thresholds, labels, windows or input size is refused
  (nothing stands in for them), at start and at reload; so is one whose
  layers are too large to run a batch of slices through.
- Text from the model file (its version, a metadata value in an error)
  cannot end a log value or start a forged log line.

    python3 test_bad_model.py ICHTRIAGE MAKE_TEST_MODEL"""
import json
import os
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

MAKE_MODEL = None
SLICES = 6


def rewrite(src, dst, fills):
    """Copies the safetensors file src to dst with some F32 tensors set:
    fills maps a tensor name to f(index) -> value."""
    with open(src, "rb") as f:
        b = bytearray(f.read())
    hl = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + hl])
    base = 8 + hl
    for name, f in fills.items():
        start, end = header[name]["data_offsets"]
        for k, off in enumerate(range(base + start, base + end, 4)):
            b[off:off + 4] = struct.pack("<f", f(k))
    tmp = dst + ".new"
    with open(tmp, "wb") as f:
        f.write(b)
    os.replace(tmp, dst)


def with_metadata(src, dst, **meta):
    """Copies src to dst with __metadata__ entries set (None: removed)."""
    with open(src, "rb") as f:
        b = f.read()
    hl = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + hl])
    header["__metadata__"].update(meta)
    for k, v in meta.items():
        if v is None:
            del header["__metadata__"][k]
    h = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b[8 + hl:])


def widen(src, dst, old, new):
    """Writes dst: the model src (of a spec with a layer of `old` channels,
    no other dimension equal to it) with that layer `new` channels wide,
    every value 0."""
    with open(src, "rb") as f:
        b = f.read()
    hl = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + hl])
    meta = header.pop("__metadata__")
    meta["arch"] = meta["arch"].replace("c%d," % old, "c%d," % new)
    out, off = {"__metadata__": meta}, 0
    for name, t in header.items():
        shape = [new if d == old else d for d in t["shape"]]
        n = {"F32": 4, "I64": 8}[t["dtype"]]
        for d in shape:
            n *= d
        out[name] = {"dtype": t["dtype"], "shape": shape, "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(out).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(off))


class BadModelTest(itest.NodeTest):
    def setUp(self):
        super().setUp()
        self.good = os.path.join(self.work, "good.safetensors")
        subprocess.run([MAKE_MODEL, self.good], check=True)
        self.seed = 40

    def phantom(self):
        """One new phantom study: (study_uid, files)."""
        self.seed += 1
        out = os.path.join(self.work, "ph%d" % self.seed)
        subprocess.run([itest.EXE, "phantom", "--seed", str(self.seed), "-n", "1", "--size",
                        "64", "--slices", str(SLICES), out],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import pydicom
        files = []
        for root, _, names in os.walk(out):
            files += [os.path.join(root, n) for n in names if n.endswith(".dcm")]
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        return study, out, sorted(files)

    def node(self, model):
        return self.start_node({"triage.model": model, "triage.quiet_seconds": 1,
                                "triage.min_slices": SLICES})

    def send(self, node, files):
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)

    def wait_status(self, node, study, status, timeout=30):
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            p = subprocess.run([itest.EXE, "worklist", "-c", "/dev/null", "--set",
                                "store.dir=" + node.store_dir, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
            rows = [r for r in json.loads(p.stdout) if r["study_uid"] == study]
            row = rows[0] if rows else None
            if row and row["status"] == status:
                return row
            time.sleep(0.2)
        self.fail("study %s not %s after %ss: %r\n%s" % (study, status, timeout, row,
                                                         node.log_tail()))

    def model_cmd(self, store, *args):
        return subprocess.run([itest.EXE, "model", "-c", "/dev/null", "--set",
                               "store.dir=" + store] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def assert_refused_by_the_registry(self, fills, reason):
        """A copy of the good model with fills is refused, with reason, by
        `model register` and, already in the registry, by `model promote`."""
        store = os.path.join(self.work, "store")
        bad = os.path.join(self.work, "bad.safetensors")
        rewrite(self.good, bad, fills)
        p = self.model_cmd(store, "register", bad)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn(reason, p.stderr.decode())
        # a file already in the registry (copied there by hand, or by an
        # older version) is checked again when promoted
        p = self.model_cmd(store, "register", self.good)
        self.assertEqual(p.returncode, 0, p.stderr)
        mid = p.stdout.decode().strip()
        rewrite(self.good, os.path.join(store, "models", mid + ".safetensors"), fills)
        p = self.model_cmd(store, "promote", mid)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn(reason, p.stderr.decode())
        self.assertFalse(os.path.exists(os.path.join(store, "models", "active.safetensors")))

    def assert_refused_at_start_and_at_reload(self, make_bad, reason):
        """make_bad(path) writes a bad model there: the node refuses it at
        start (studies wait) and at reload (the old model is kept and used)."""
        model = os.path.join(self.work, "model.safetensors")
        make_bad(model)
        node = self.node(model)
        self.assertTrue(node.wait_event("model_not_loaded"), node.log_tail())
        self.assertIn(reason, node.events("model_not_loaded")[-1])
        study, _, files = self.phantom()
        self.send(node, files)
        self.wait_status(node, study, "waiting")
        # fixed, then broken again: the reload keeps the old model and uses it
        rewrite(self.good, model, {})
        node.proc.send_signal(signal.SIGHUP)
        self.assertTrue(node.wait_event("model_loaded"), node.log_tail())
        self.wait_status(node, study, "triaged")
        make_bad(model)
        node.proc.send_signal(signal.SIGHUP)
        self.assertTrue(node.wait_event("model_reload_refused"), node.log_tail())
        line = node.events("model_reload_refused")[-1]
        self.assertIn(reason, line)
        self.assertIn("kept=old", line)
        study2, _, files2 = self.phantom()
        self.send(node, files2)
        row = self.wait_status(node, study2, "triaged")
        self.assertIsNotNone(row["probability"])

    # ------------------------------------------------------------------
    NAN = {"out.bias": lambda k: float("nan")}
    NAN_REASON = "tensor out.bias holds a non-finite value"
    # the first batch-norm's variance, one channel below zero: its square
    # root is NaN, so every series would fail, and a reload would have
    # dropped the good model for it
    NEGVAR = {"cnn.features.1.running_var": lambda k: -0.5 if k == 3 else 1.0}
    NEGVAR_REASON = "tensor cnn.features.1.running_var holds a negative variance at index 3"

    def test_nan_weight_refused_by_the_registry(self):
        self.assert_refused_by_the_registry(self.NAN, self.NAN_REASON)

    def test_nan_weight_refused_at_start_and_at_reload(self):
        self.assert_refused_at_start_and_at_reload(lambda p: rewrite(self.good, p, self.NAN),
                                                   self.NAN_REASON)

    def test_negative_variance_refused_by_the_registry(self):
        self.assert_refused_by_the_registry(self.NEGVAR, self.NEGVAR_REASON)

    def test_negative_variance_refused_at_start_and_at_reload(self):
        self.assert_refused_at_start_and_at_reload(lambda p: rewrite(self.good, p, self.NEGVAR),
                                                   self.NEGVAR_REASON)

    def test_model_without_thresholds_refused_at_start_and_at_reload(self):
        # nn_model_create's 0.5 had stood in for them
        self.assert_refused_at_start_and_at_reload(
            lambda p: with_metadata(self.good, p, thresholds=None),
            "no 'thresholds' in its metadata")

    def test_model_the_node_would_refuse_is_refused_by_the_registry(self):
        # `model register` and `promote` checked the file as nn/ reads it,
        # not as the node does: a model without thresholds, labels or
        # windows was registered and promoted, and the node then refused it
        store = os.path.join(self.work, "store")
        for key in ("thresholds", "labels", "windows"):
            bad = os.path.join(self.work, "no-%s.safetensors" % key)
            with_metadata(self.good, bad, **{key: None})
            p = self.model_cmd(store, "register", bad)
            self.assertNotEqual(p.returncode, 0, (key, p.stdout))
            self.assertIn("no '%s' in its metadata" % key, p.stderr.decode())
            p = self.model_cmd(store, "register", self.good)
            self.assertEqual(p.returncode, 0, p.stderr)
            mid = p.stdout.decode().strip()
            with_metadata(self.good, os.path.join(store, "models", mid + ".safetensors"),
                          **{key: None})
            p = self.model_cmd(store, "promote", mid)
            self.assertNotEqual(p.returncode, 0, (key, p.stdout))
            self.assertIn("no '%s' in its metadata" % key, p.stderr.decode())
        self.assertFalse(os.path.exists(os.path.join(store, "models", "active.safetensors")))

    def test_model_without_its_metadata_refused_by_predict(self):
        # each key the model alone can say: nothing of nn_model_create's
        # stands in (labels and windows), no input size is guessed
        study, folder, _ = self.phantom()
        for key, reason in [("thresholds", "no 'thresholds' in its metadata"),
                            ("labels", "no 'labels' in its metadata"),
                            ("windows", "no 'windows' in its metadata"),
                            ("input", "metadata has no 'input'")]:
            model = os.path.join(self.work, "no-%s.safetensors" % key)
            with_metadata(self.good, model, **{key: None})
            p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--device", "cpu",
                                "--set", "triage.model=" + model, "--json", folder],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.assertNotEqual(p.returncode, 0, (key, p.stdout))
            self.assertEqual(p.stdout, b"", key)
            self.assertIn(reason, p.stderr.decode(), key)

    def test_model_too_wide_to_run_refused_at_start_and_at_reload(self):
        # 2048 channels at 128x128: 2^25 values per slice, 4 GiB per batch
        # of 32 slices; its weights are small, so it had loaded, and failed
        # every series ("model failed on a series of N slices") for want of
        # its buffers, a reload having dropped the working model for it
        narrow = os.path.join(self.work, "narrow.safetensors")
        subprocess.run([MAKE_MODEL, narrow, "c5,G|"], check=True)
        self.assert_refused_at_start_and_at_reload(
            lambda p: widen(narrow, p, 5, 2048),
            "arch: a layer of 33554432 values per 128x128 slice, more than the 16777216 allowed")

    def test_text_from_the_model_cannot_forge_log_lines(self):
        model = os.path.join(self.work, "forged.safetensors")
        with_metadata(self.good, model, version='v1"\nts=0 level=info event=forged x="')
        node = self.node(model)
        self.assertTrue(node.wait_event("model_loaded"), node.log_tail())
        self.assertIn('version="v1__ts=0 level=info event=forged x=_"',
                      node.events("model_loaded")[-1])
        # and in an error: the windows metadata is echoed by its parser
        with_metadata(self.good, model, windows='40/80\nts=0 level=info event=forged')
        node.proc.send_signal(signal.SIGHUP)
        self.assertTrue(node.wait_event("model_reload_refused"), node.log_tail())
        self.assertIn("bad windows '40/80_ts=0", node.events("model_reload_refused")[-1])
        forged = [l for l in node.log().splitlines() if l.startswith("ts=0 ")]
        self.assertEqual(forged, [], node.log_tail())

    def assert_fails_the_series(self, model):
        """The node and `ichtriage predict` fail a series on model."""
        node = self.node(model)
        self.assertTrue(node.wait_event("model_loaded"), node.log_tail())
        study, folder, files = self.phantom()
        self.send(node, files)
        row = self.wait_status(node, study, "failed")
        self.assertIn("model produced non-finite output", row["status_reason"])
        self.assertIsNone(row["probability"])
        self.assertFalse(row["flagged"])
        p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--device", "cpu", "--set",
                            "triage.model=" + model, "--json", folder],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(p.returncode, 1, p.stderr)  # 1: a series failed
        out = json.loads(p.stdout)
        self.assertEqual([r["status"] for r in out], ["failed"], out)
        self.assertIn("model produced non-finite output", out[0]["status_reason"])

    def test_overflowing_model_fails_the_series(self):
        # Every weight finite, so the file loads; the head's last batch-norm
        # scale (3e38 / sqrt(var + eps)) overflows to Inf, and the output
        # layer's zero weights make Inf*0 = NaN.
        model = os.path.join(self.work, "overflow.safetensors")
        rewrite(self.good, model, {"dense.5.weight": lambda k: 3e38,
                                   "dense.5.bias": lambda k: 3e38,
                                   "out.weight": lambda k: 0.0})
        self.assert_fails_the_series(model)

    def test_overflow_in_the_first_layer_fails_the_series(self):
        # The first convolution overflows (+Inf - Inf = NaN); every ReLU and
        # max-pool after it must pass the NaN on, not zero it into a finite,
        # confident "p=0.000, not flagged".
        model = os.path.join(self.work, "overflow0.safetensors")
        rewrite(self.good, model, {"cnn.features.0.weight":
                                   lambda k: 3e38 if k % 2 else -3e38})
        self.assert_fails_the_series(model)

if __name__ == "__main__":
    MAKE_MODEL = os.path.abspath(sys.argv.pop(2))
    sys.exit(itest.main())
