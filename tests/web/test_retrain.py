"""Retraining from what radiologists reviewed on the node (issue 5), end to
end: phantom studies sent to a real node and triaged, each reviewed through
the JSON API (positives with the slices that show the bleed marked, as the
page does), then `ichtriage train --reviews` on the node's store, alone and
with a folder of phantoms besides, each a tiny run that must finish with a
model; with no review yet, nothing to do.

Stage 1 had sized its list of slices on the slice-labelled series only:
from reviews alone it had none and always failed ("stage 1 failed at
epoch 1", what the weekly timer runs), and with a folder besides it wrote
past the list (heap corruption).

    python3 test_retrain.py ICHTRIAGE MAKE_TEST_MODEL"""
import os
import subprocess

import webtest as wt

TINY = ["--epochs1", "1", "--epochs2", "1", "--slices-per-epoch", "32", "--input", "32",
        "--threads", "1", "--val", "0.2", "--test", "0.2", "--seed", "1"]


class RetrainTest(wt.WebTest):
    def setUp(self):
        super().setUp()
        self.node = self.web_node()

    def review_all(self):
        self.studies = wt.phantom(os.path.join(self.work, "ph"), seed=61, count=10)
        self.send(self.node, [f for fs in self.studies.values() for f in fs])
        self.wait_rows(self.node, list(self.studies), timeout=90)
        tok = "X-CSRF-Token: " + self.get_json(self.node, "/api/session")["csrf"]
        for i, uid in enumerate(self.studies):
            body = {"hemorrhage": False}
            if i % 2 == 0:
                # Studies 0, 4, 8 with a subtype named, 2 and 6 without.
                sl = self.get_json(self.node, "/api/studies/" + uid)["slice_probabilities"]
                body = {"hemorrhage": True, "subtypes": ["subdural"] if i % 4 == 0 else [],
                        "slices": [{"sop_uid": s["sop_uid"], "frame": s["frame"]}
                                   for s in sl[4:6]]}
            status, _, resp = wt.curl("%s/api/studies/%s/review" % (self.node.base, uid),
                                      "POST", body, headers=[tok])
            self.assertEqual(status, 201, resp)

    def train(self, name, *data, made=True):
        out = os.path.join(self.work, name + ".safetensors")
        p = subprocess.run([wt.itest.EXE, "train", *data, "--reviews", "-c", "/dev/null",
                            "--set", "store.dir=" + self.node.store_dir, "-o", out] + TINY,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=600)
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        self.assertEqual(os.path.isfile(out), made)
        return p

    def test_no_review_yet_is_nothing_to_do(self):
        # The weekly timer before the first review: not a failed unit (it
        # exited 1, "no labelled series found"), and no workdir left.
        p = self.train("none", made=False)
        self.assertIn("nothing to learn yet", p.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.work, "none.safetensors.work")))

    def test_reviews_alone_train_a_model(self):
        self.review_all()
        p = self.train("reviews")
        self.assertIn("event=train_reviews studies=10 series=10 marked_slices=10", p.stderr)
        # Validated at the study level, which reviews label (it was 0 and NAN
        # every epoch: no slice labels in a validation split of reviews).
        epochs = [l for l in p.stderr.splitlines() if "event=train_epoch" in l]
        self.assertEqual(len(epochs), 2, p.stderr[-2000:])
        for l in epochs:
            self.assertNotIn("val_loss=nan", l)
            self.assertNotIn("val_auc=0.0000", l)

    def test_a_bleed_without_subtypes_leaves_them_unknown(self):
        # Scored on the reviews (calibrate --reviews): the two bleeds whose
        # review names no subtype count for "any" and for no subtype (they
        # had counted as negatives of all five).
        self.review_all()
        self.train("model")
        out = os.path.join(self.work, "cal.safetensors")
        js = os.path.join(self.work, "cal.json")
        p = subprocess.run([wt.itest.EXE, "calibrate", os.path.join(self.work, "model.safetensors"),
                            "--reviews", "-c", "/dev/null", "--set",
                            "store.dir=" + self.node.store_dir, "-o", out, "--json", js,
                            "--report", os.path.join(self.work, "cal.html"), "--threads", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        import json
        study = json.load(open(js))["levels"]["study"]["lrcn"]
        self.assertEqual((study["any"]["n"], study["any"]["positives"]), (10, 5), study["any"])
        self.assertEqual((study["subdural"]["n"], study["subdural"]["positives"]), (8, 3),
                         study["subdural"])
        self.assertEqual((study["epidural"]["n"], study["epidural"]["positives"]), (8, 0))

    def test_reviews_and_a_folder_train_a_model(self):
        self.review_all()
        folder = os.path.join(self.work, "more")
        wt.phantom(folder, seed=62, count=4)
        self.train("both", folder)


if __name__ == "__main__":
    raise SystemExit(wt.main())
