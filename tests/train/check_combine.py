#!/usr/bin/python3
"""models/combine.py on real phantom folders and made-up predictions: members
averaged slice by slice before the study takes its highest slice (not the
members' study scores averaged), the threshold chosen on the first set at the
target sensitivity and applied to the others, missing or mismatched
predictions refused, and --flip writing a mirrored copy of a phantom folder
with the same UIDs and truth files.

    check_combine.py ICHTRIAGE_BINARY"""
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pydicom

from checks import Checks

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "models", "combine.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def rows(out):
    """The table's rows: name -> [AUC, sens, spec, AUC, sens, spec, ...]."""
    return {line.split()[0]: [float(x) for x in line.split()[1:]]
            for line in out.splitlines()[2:] if line.strip()}


def main():
    ich = sys.argv[1]
    check = Checks()

    with tempfile.TemporaryDirectory() as t:
        sets = {}
        for name, seed in (("cal", 22), ("test", 23)):
            d = os.path.join(t, name)
            subprocess.run([ich, "phantom", d, "--seed", str(seed), "-n", "8", "--size", "64",
                            "--prevalence", "0.5"], check=True, stderr=subprocess.DEVNULL)
            with open(os.path.join(d, "studies.csv")) as f:
                sets[name] = (d, [(r["study_uid"], int(r["slices"]), int(r["any"]) > 0)
                                  for r in csv.DictReader(f)])
        for name, (_, studies) in sets.items():
            check(any(p for *_, p in studies) and not all(p for *_, p in studies),
                  "phantom set %s has positives and negatives" % name)

        def write(path, studies, probs):
            with open(path, "w") as f:
                json.dump([{"study_uid": u, "slice_probabilities": probs(i, n, pos)}
                           for i, (u, n, pos) in enumerate(studies)], f)

        # member a: a positive peaks at 0.9 on its first slice, member b on its
        # last; a negative peaks at 0.7 on its middle slice in both; 0.1
        # elsewhere. Each alone ranks every positive first. Averaged slice by
        # slice, a positive's highest slice is 0.5 and a negative's 0.7: every
        # negative first (the members' study scores averaged would give 0.9
        # against 0.7, every positive first).
        def peak(first):
            def probs(i, n, pos):
                p = [0.1] * n
                if pos:
                    p[0 if first else n - 1] = 0.9
                else:
                    p[n // 2] = 0.7
                return p
            return probs

        for name, (_, studies) in sets.items():
            write(os.path.join(t, "a-%s.json" % name), studies, peak(True))
            write(os.path.join(t, "b-%s.json" % name), studies, peak(False))
        setargs = ["--set", "cal=" + sets["cal"][0], "--set", "test=" + sets["test"][0]]
        a, b = os.path.join(t, "a-{set}.json"), os.path.join(t, "b-{set}.json")
        r = run(*setargs, "a=" + a, "b=" + b, "ab=%s,%s" % (a, b))
        got = rows(r.stdout)
        check(r.returncode == 0 and got.get("a") == [1.0, 1.0, 1.0] * 2 and
              got.get("b") == [1.0, 1.0, 1.0] * 2,
              "each member alone separates: AUC, sensitivity and specificity 1 on both sets")
        check(got.get("ab", [None, None, None, None])[0::3] == [0.0, 0.0],
              "the two averaged slice by slice: positives 0.5 under negatives 0.7, AUC 0 (%s)"
              % got.get("ab"))

        # the threshold: on the calibration set, the highest that reaches the
        # sensitivity; applied unchanged to the test set. Positives score their
        # rank among the calibration positives, from 0.9 down; the test set's
        # positives all score 0.05, below it: sensitivity 0 there.
        cal_pos = [u for u, _, p in sets["cal"][1] if p]

        def ranked(i, n, pos):
            if not pos:
                return [0.01] * n
            return [0.9 - 0.1 * cal_pos.index(sets["cal"][1][i][0])] * n

        write(os.path.join(t, "d-cal.json"), sets["cal"][1], ranked)
        write(os.path.join(t, "d-test.json"), sets["test"][1],
              lambda i, n, pos: [0.05 if pos else 0.01] * n)
        d = os.path.join(t, "d-{set}.json")
        r = run(*setargs, "--sensitivity", "0.5", "d=" + d)
        got = rows(r.stdout).get("d", [])
        k = -(-len(cal_pos) // 2)  # ceil(0.5 * positives)
        check(r.returncode == 0 and len(got) == 6 and abs(got[1] - k / len(cal_pos)) < 1e-3 and
              got[2] == 1.0 and got[3] == 1.0 and got[4] == 0.0 and got[5] == 1.0,
              "the threshold from the calibration set (sensitivity %.3f there) leaves the test "
              "set's positives below it: %s" % (k / len(cal_pos), got))

        # refusals
        with open(os.path.join(t, "short-test.json"), "w") as f:
            json.dump([], f)
        os.symlink(os.path.join(t, "a-cal.json"), os.path.join(t, "short-cal.json"))
        r = run(*setargs, "s=" + os.path.join(t, "short-{set}.json"))
        check(r.returncode != 0 and "no prediction" in r.stderr,
              "a set without its predictions: refused")
        write(os.path.join(t, "e-cal.json"), sets["cal"][1], lambda i, n, pos: [0.5] * (n + 1))
        r = run("--set", "cal=" + sets["cal"][0],
                "x=%s,%s" % (a, os.path.join(t, "e-{set}.json")))
        check(r.returncode != 0 and "different slice counts" in r.stderr,
              "members with different slice counts for a study: refused")
        r = run("a=" + a)
        check(r.returncode == 2, "no --set: the usage, status 2")
        r = run(*setargs, "--sensitivity", "0", "a=" + a)
        check(r.returncode == 2 and "--sensitivity" in r.stderr, "--sensitivity 0: refused")
        # a member without one study (a failed series has no probabilities)
        with open(os.path.join(t, "b-cal.json")) as f:
            gap = json.load(f)
        gap[0]["slice_probabilities"] = None
        with open(os.path.join(t, "g-cal.json"), "w") as f:
            json.dump(gap, f)
        r = run("--set", "cal=" + sets["cal"][0], "x=%s,%s" % (a, os.path.join(t, "g-{set}.json")))
        check(r.returncode != 0 and "1 studies of set cal have no prediction" in r.stderr,
              "a member without a result for one study: refused, the study counted")
        os.makedirs(os.path.join(t, "negonly"))
        with open(os.path.join(t, "negonly", "studies.csv"), "w") as f:
            f.write("study_uid,any\n%s,0\n" % sets["cal"][1][0][0])
        r = run("--set", "n=" + os.path.join(t, "negonly"), "a=" + os.path.join(t, "a-cal.json"))
        check(r.returncode != 0 and "positive and negative" in r.stderr,
              "a set of negatives only: refused")

        # --flip: a mirrored copy, same files and UIDs, truth copied
        src = sets["cal"][0]
        dst = os.path.join(t, "flipped")
        r = run("--flip", src, dst)
        check(r.returncode == 0, "--flip runs (status %d: %s)" % (r.returncode, r.stderr[-200:]))
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, "stage_2_train", "*")))
        check(names == sorted(os.listdir(os.path.join(dst, "stage_2_train"))),
              "--flip: the same %d files" % len(names))
        check(all(open(os.path.join(src, f), "rb").read() == open(os.path.join(dst, f), "rb").read()
                  for f in ("studies.csv", "lesions.csv", "stage_2_train.csv")),
              "--flip: the truth files copied unchanged")
        same = True
        for f in names[:10]:
            x = pydicom.dcmread(os.path.join(src, "stage_2_train", f))
            y = pydicom.dcmread(os.path.join(dst, "stage_2_train", f))
            same &= x.SOPInstanceUID == y.SOPInstanceUID and np.array_equal(
                x.pixel_array[:, ::-1], y.pixel_array) and not np.array_equal(
                x.pixel_array, y.pixel_array)
        check(same, "--flip: every image mirrored left to right, its UIDs kept")
    return check.status()


if __name__ == "__main__":
    sys.exit(main())
