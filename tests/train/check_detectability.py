#!/usr/bin/python3
"""models/detectability.py on real phantom files: one row per positive study
with the blood's excess as the files show it, the noise correlation it
assumes checked against an explicit covariance matrix, the share of
negatives each positive outranks, and a pair of folders that are not the same
studies refused.

    check_detectability.py ICHTRIAGE_BINARY"""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "models", "detectability.py")
ALL = "epidural,intraparenchymal,intraventricular,subarachnoid,subdural"


def phantom(ich, out, seed, *extra):
    subprocess.run([ich, "phantom", out, "--seed", str(seed), "-n", "6", "--size", "96",
                    "--prevalence", "0.7", *extra], check=True, stderr=subprocess.DEVNULL)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def main():
    ich = sys.argv[1]
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    # the noise correlation: against the covariance matrix of the generator's
    # noise, built from its kernel ([1 2 1]/4 both ways, unit variance)
    spec = importlib.util.spec_from_file_location("detectability", SCRIPT)
    det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(det)
    n = 9
    k1 = np.zeros((n, n + 2))
    for i in range(n):
        k1[i, i:i + 3] = [0.25, 0.5, 0.25]
    K = np.kron(k1, k1) / 0.375  # (n*n) x ((n+2)*(n+2)): white noise -> image
    C = K @ K.T
    s = np.random.default_rng(3).normal(size=(n, n))
    check(np.allclose((s * det.correlate(s)).sum(), s.ravel() @ C @ s.ravel()),
          "s.C.s from correlate() equals the explicit covariance's")

    with tempfile.TemporaryDirectory() as t:
        ph, nb, other = (os.path.join(t, x) for x in ("ph", "nb", "other"))
        phantom(ich, ph, 11)
        phantom(ich, nb, 11, "--omit-blood", ALL)
        phantom(ich, other, 12, "--omit-blood", ALL)
        with open(os.path.join(ph, "studies.csv")) as f:
            studies = list(csv.DictReader(f))
        pos = [r["study_uid"] for r in studies if int(r["any"]) > 0]
        neg = [r["study_uid"] for r in studies if int(r["any"]) == 0]
        check(len(pos) >= 2 and len(neg) >= 1, "the phantom set has positives and negatives")

        r = run(ph, nb)
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        check(r.returncode == 0, "runs without predictions (status %d)" % r.returncode)
        check(sorted(x["study_uid"] for x in rows) == sorted(pos),
              "one row per positive study, none for the negatives")
        # a positive slice has >= 10 mm^2 at >= 10 HU (stored values round: 9)
        check(all(float(x["max_excess_hu"]) >= 9 and float(x["median_counted_excess_hu"]) >= 10
                  for x in rows), "every positive shows blood of at least 10 HU in its files")
        check(all(float(x["dprime_npw"]) > 0 for x in rows), "every positive has a d' above 0")
        check(all(x["group"] in ("subarachnoid alone", "subarachnoid and other", "no subarachnoid")
                  for x in rows), "every positive falls in a group")

        r = run(ph, ph)
        check(r.returncode == 1 and "--omit-blood" in r.stderr,
              "a folder against itself (no blood in the difference): refused")

        pred = os.path.join(t, "pred.json")
        low, tie = pos[0], pos[1]  # below every negative, level with them
        with open(pred, "w") as f:
            json.dump([{"study_uid": u, "probability": 0.5 if u in neg or u == tie else
                        0.1 if u == low else 0.9} for u in pos + neg], f)
        r = run("--pred", pred, ph, nb)
        rows = {x["study_uid"]: x for x in csv.DictReader(io.StringIO(r.stdout))}
        check(r.returncode == 0 and float(rows[low]["outranks_negatives"]) == 0.0 and
              float(rows[tie]["outranks_negatives"]) == 0.5 and
              all(float(rows[u]["outranks_negatives"]) == 1.0 for u in pos if u not in (low, tie)),
              "the share of negatives each positive outranks (ties count half)")
        want = (len(pos) - 1.5) / len(pos)
        check(any(line.split()[:1] == ["all"] and abs(float(line.split()[2]) - want) < 1e-3
                  for line in r.stderr.splitlines()), "the AUC of all positives (%.3f)" % want)

        with open(pred, "w") as f:
            json.dump([{"study_uid": pos[0], "probability": 0.3}], f)
        r = run("--pred", pred, ph, nb)
        check(r.returncode == 1 and "have no prediction" in r.stderr,
              "predictions missing for some studies: refused")
        r = run(ph, other)
        check(r.returncode == 1 and "not" in r.stderr and "made again" in r.stderr,
              "a folder of other studies as the blood-free twin: refused")
        r = run(ph)
        check(r.returncode == 2, "an odd number of folders: the usage, status 2")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
