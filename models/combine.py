#!/usr/bin/python3
"""Would averaging help? Scores combinations of `ichtriage predict --json`
outputs on phantom sets: several trained models (an ensemble), or one model
on the slices as they are and mirrored left to right (test-time flips).

Each member's per-slice "any" probabilities are averaged slice by slice
(the slices are in the same order in every output of one set), and a study
scores the highest average, as the node scores a study. For each
combination it prints the study-level AUC of "any" on every set, and the
sensitivity and specificity at a threshold chosen on the first set (the
calibration set: the highest threshold that reaches the target
sensitivity, as `ichtriage calibrate` does).

    models/combine.py --sensitivity 0.95 \\
        --set 303=PH_CALIB_A,PH_CALIB_B --set 202=PH_TEST \\
        shipped=pred/shipped-{set}.json \\
        shipped+flipped=pred/shipped-{set}.json,pred/flipped-{set}.json

A member is a path with {set} in it, replaced by each set's name.
`--flip SRC DST` instead writes a copy of the phantom folder SRC with every
image mirrored left to right (same UIDs and truth files), for predict.

Decision support, not a diagnosis; phantoms are synthetic."""
import argparse
import glob
import json
import math
import os
import shutil
import sys

from breakdown import auc, read_studies


def flip(src, dst):
    import pydicom

    os.makedirs(os.path.join(dst, "stage_2_train"), exist_ok=True)
    for f in glob.glob(os.path.join(src, "*.csv")):
        shutil.copy(f, dst)
    for f in glob.glob(os.path.join(src, "stage_2_train", "*.dcm")):
        d = pydicom.dcmread(f)
        d.PixelData = d.pixel_array[:, ::-1].copy().tobytes()
        d.save_as(os.path.join(dst, "stage_2_train", os.path.basename(f)))


def study_scores(paths):
    members = []
    for p in paths:
        with open(p) as f:
            members.append({r["study_uid"]: r["slice_probabilities"] for r in json.load(f)
                            if r.get("slice_probabilities")})
    scores = {}
    for uid in members[0]:
        slices = [m.get(uid) for m in members]
        if None in slices:
            continue  # reported as a study without a prediction
        if any(len(s) != len(slices[0]) for s in slices):
            raise SystemExit("combine: %s has different slice counts in %s" % (uid, paths))
        scores[uid] = max(sum(s[i] for s in slices) / len(slices) for i in range(len(slices[0])))
    return scores


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="NAME=PHANTOM_DIR[,DIR...]")
    ap.add_argument("--sensitivity", type=float, default=0.95)
    ap.add_argument("--flip", nargs=2, metavar=("SRC", "DST"))
    ap.add_argument("combination", nargs="*", help="NAME=MEMBER[,MEMBER...]")
    a = ap.parse_args(argv[1:])
    if a.flip:
        flip(*a.flip)
        return 0
    if not a.set or not a.combination:
        ap.error("give at least one --set and one combination")
    if not 0 < a.sensitivity <= 1:
        ap.error("--sensitivity: above 0, at most 1")
    sets = []  # (name, {study UID: positive})
    for n, _, folders in (s.partition("=") for s in a.set):
        t = {u: int(r["any"]) > 0 for u, r in read_studies(folders.split(",")).items()}
        if all(t.values()) or not any(t.values()):
            raise SystemExit("combine: set %s needs positive and negative studies" % n)
        sets.append((n, t))
    print("%-24s %s" % ("set:", "   ".join("%-17s" % n for n, _ in sets)))
    print("%-24s %s" % ("combination", "   ".join("AUC   sens  spec " for _ in sets)))
    for combo in a.combination:
        name, _, members = combo.partition("=")
        thr, cells = None, []
        for n, t in sets:
            sc = study_scores([m.format(set=n) for m in members.split(",")])
            missing = [u for u in t if u not in sc]
            if missing:
                raise SystemExit("combine: %d studies of set %s have no prediction" % (len(missing), n))
            pos = sorted((sc[u] for u in t if t[u]), reverse=True)
            neg = [sc[u] for u in t if not t[u]]
            if thr is None:
                thr = pos[math.ceil(a.sensitivity * len(pos)) - 1]
            sens = sum(p >= thr for p in pos) / len(pos)
            spec = sum(x < thr for x in neg) / len(neg)
            cells.append("%.3f %.3f %.3f" % (auc(pos, neg), sens, spec))
        print("%-24s %s" % (name, "   ".join(cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
