#!/usr/bin/python3
"""models/detectability.py on real phantom files: one row per positive study
with the blood's excess as the files show it, the noise correlation it
assumes checked against an explicit covariance matrix, the share of
negatives each positive outranks, and a pair of folders that are not the same
studies refused. The location-unknown observer (--search): at one known
position its AUC is Phi(d'/sqrt 2); searching thousands of positions, a d' of
3 is found far less often, one of 12 always.

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

from checks import Checks

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
    check = Checks()

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

    # the location-unknown observer on a drawn lesion: a plus of 5 pixels on
    # one slice of a flat head at 40 HU, noise SD 5
    head = np.full((2, 64, 64), 40.0, np.float32)
    blob = np.zeros_like(head)
    blob[1, 31:34, 32] = 1
    blob[1, 32, 31:34] = 1
    one = (blob[1] * det.correlate(blob[1])).sum()
    unit = float((blob * blob).sum() / np.sqrt(25 * one))  # d' of amplitude 1

    def search(dprime, k, **kw):
        return det.search(head + blob * (dprime / unit), head, 5.0, k,
                          np.random.default_rng(7), **kw)

    dp, auc, npos = search(1.0, 400, only_blood=True)
    # location known: pos = d' + Z, neg = Z', AUC = Phi(d'/sqrt 2) = 0.760
    check(abs(dp - 1.0) < 1e-4 and npos == 1 and abs(auc - 0.760) < 0.05,
          "known location: d' %.3f (1), AUC %.3f against Phi(1/sqrt 2) = 0.760" % (dp, auc))
    dp, auc, npos = search(3.0, 100)
    check(abs(dp - 3.0) < 1e-3 and npos > 7000 and auc < 0.75,
          "location unknown, %d positions: d' 3 is found far less often than the "
          "known location's 0.983 (AUC %.3f)" % (npos, auc))
    dp, auc, _ = search(12.0, 40)
    check(auc == 1.0, "location unknown: d' 12 always wins (AUC %.3f)" % auc)
    dp2, _, npos2 = search(3.0, 2, f=2)
    check(npos2 < npos / 3 and 0 < dp2 < 3.0,
          "2x2 pixels averaged: a quarter of the positions, %d; the plus's d' %.2f, "
          "below the files' grid's 3" % (npos2, dp2))

    with tempfile.TemporaryDirectory() as t:
        ph, nb, other = (os.path.join(t, x) for x in ("ph", "nb", "other"))
        # seed 22: 3 positives, one of them with only a tiny lesion, 3 negatives
        phantom(ich, ph, 22)
        phantom(ich, nb, 22, "--omit-blood", ALL)
        phantom(ich, other, 23, "--omit-blood", ALL)
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

        r = run("--search", "3", ph, nb)
        srows = list(csv.DictReader(io.StringIO(r.stdout)))
        check(r.returncode == 0 and len(srows) == len(rows) and
              all(0 <= float(x[c]) <= 1 for x in srows for c in ("search_auc", "search_auc_half")) and
              all(int(x["search_positions"]) > int(x["search_positions_half"]) > 0 for x in srows),
              "--search: an AUC on both grids for every positive")
        check(all(float(x["dprime_npw_best_slice"]) > 0 and
                  float(x["dprime_npw_best_slice_half"]) > 0 for x in srows),
              "--search: every template has a d' above 0 on both grids")
        r = run("--tiny-only", ph, nb)
        trows = list(csv.DictReader(io.StringIO(r.stdout)))
        check(r.returncode == 0 and all(x["only_tiny"] == "yes" for x in trows) and
              len(trows) >= 1 and len(trows) == sum(x["only_tiny"] == "yes" for x in rows),
              "--tiny-only: the positives whose lesions are all tiny (%d of %d)"
              % (len(trows), len(rows)))
        for bad in ("1", "x"):
            r = run("--search", bad, ph, nb)
            check(r.returncode == 2 and "--search" in r.stderr, "--search %s: refused" % bad)

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
    return check.status()


if __name__ == "__main__":
    sys.exit(main())
