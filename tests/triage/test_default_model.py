"""The shipped default model in the node (issue 6): a mix of positive and
negative phantom studies sent with storescu appears on the worklist within
the quiet period plus a few seconds, clear positives flagged and above clear
negatives, clear negatives not flagged. Skipped (exit 77) while no default
model ships in models/.

"Clear" is read from the phantom's own per-study summary: a clear positive
has hemorrhage visible on at least a third of its slices; a clear negative
has none (and is generated without any). Phantoms of a seed the default model
took no part in (models/make-default.sh trains on seed 101, calibrates on
303 and tests on 202).

    python3 test_default_model.py ICHTRIAGE [DefaultModel.TEST]"""
import csv
import glob
import json
import os
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

# The shipped model's known gap (issue 5): how many of this test's clear
# negatives it flags. test_clear_negatives_not_flagged is should_fail in
# meson, which takes any failure for the expected one; so anything else
# going wrong in it (the node, storescu, a study not triaged, more negatives
# flagged than this) ends the script with 99, an error meson reports even
# for a test expected to fail.
KNOWN_FLAGGED_NEGATIVES = int(os.environ.get("ICHTRIAGE_KNOWN_FLAGGED_NEGATIVES", "1"))
HARD_ERRORS = []

MODEL = os.environ.get("ICHTRIAGE_TEST_MODEL") or os.path.join(HERE, "..", "..", "models",
                                                              "default.safetensors")
QUIET = 2


class DefaultModel(itest.NodeTest):
    def triage_phantoms(self):
        """Sends 8 phantom studies to a node with the default model; returns
        (worklist rows once all are triaged, clear positives, clear negatives)."""
        if not os.path.exists(MODEL):
            self.skipTest("no default model in models/ yet")
        out = os.path.join(self.work, "ph")
        subprocess.run([itest.EXE, "phantom", "--seed", "606", "-n", "8", "--size", "256",
                        "--slices", "24", "--prevalence", "0.6", out], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(out, "studies.csv")) as f:
            summary = {r["study_uid"]: r for r in csv.DictReader(f)}
        clear_pos = [s for s, r in summary.items() if int(r["any"]) >= int(r["slices"]) // 3]
        clear_neg = [s for s, r in summary.items() if int(r["any"]) == 0]
        self.assertTrue(clear_pos and clear_neg, "seed gives no clear cases: %s" % summary)
        node = self.start_node({"triage.model": os.path.abspath(MODEL),
                                "triage.quiet_seconds": QUIET})
        files = sorted(glob.glob(os.path.join(out, "stage_2_train", "*.dcm")))
        r = dt.storescu(node.port, files, workdir=self.work)
        self.assert_all_success(r, files)
        t_sent = time.monotonic()
        rows = []
        while time.monotonic() < t_sent + QUIET + 90:
            p = subprocess.run([itest.EXE, "worklist", "-c", "/dev/null", "--set",
                                "store.dir=" + node.store_dir, "--json"],
                               stdout=subprocess.PIPE, check=True)
            rows = json.loads(p.stdout)
            if len(rows) == len(summary) and all(x["status"] == "triaged" for x in rows):
                break
            time.sleep(0.25)
        self.assertEqual([x["status"] for x in rows], ["triaged"] * len(summary), rows)
        for x in rows:
            kind = ("clear positive" if x["study_uid"] in clear_pos else
                    "clear negative" if x["study_uid"] in clear_neg else "other")
            sys.stderr.write("%-14s p=%.4f flagged=%s\n" % (kind, x["probability"], x["flagged"]))
        return rows, clear_pos, clear_neg

    def test_clear_positives_flagged(self):
        rows, clear_pos, _ = self.triage_phantoms()
        flagged = {x["study_uid"]: x["flagged"] for x in rows}
        for s in clear_pos:
            self.assertTrue(flagged[s], "clear positive %s not flagged" % s)

    def test_clear_positives_above_clear_negatives(self):
        rows, clear_pos, clear_neg = self.triage_phantoms()
        order = [x["study_uid"] for x in rows]
        self.assertLess(max(order.index(s) for s in clear_pos),
                        min(order.index(s) for s in clear_neg))

    def test_clear_negatives_not_flagged(self):
        try:
            rows, clear_pos, clear_neg = self.triage_phantoms()
        except unittest.SkipTest:
            raise
        except BaseException as e:
            HARD_ERRORS.append("the run itself failed: %r" % e)
            raise
        flagged = {x["study_uid"]: x["flagged"] for x in rows}
        wrong = [s for s in clear_neg if flagged[s]]
        if len(wrong) > KNOWN_FLAGGED_NEGATIVES:
            HARD_ERRORS.append("%d of %d clear negatives flagged, more than the known %d"
                               % (len(wrong), len(clear_neg), KNOWN_FLAGGED_NEGATIVES))
        self.assertEqual(wrong, [], "clear negatives flagged (%d known)" % KNOWN_FLAGGED_NEGATIVES)


if __name__ == "__main__":
    rc = itest.main()
    for e in HARD_ERRORS:
        sys.stderr.write("not the known gap: %s\n" % e)
    sys.exit(99 if HARD_ERRORS else rc)
