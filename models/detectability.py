#!/usr/bin/python3
"""How visible the blood of each positive phantom study is, and how a model
scored it: tells blood that noise hides from blood a model has not learnt.

The phantom is made twice with the same seed and studies, once as it is and
once with `--omit-blood` for every subtype (same anatomy, noise and UIDs), so
that the difference of two files is exactly the blood's excess in HU. For each
positive study:

  - d' of the non-prewhitening matched filter with the signal and the
    background known exactly (the image quality literature's NPW observer):
    d'^2 = (s.s)^2 / (s.C.s), s the excess over all slices, C the generator's
    noise covariance (white noise smoothed by [1 2 1]/4 both ways, so the
    correlation is [1/6 2/3 1 2/3 1/6] per axis, times the study's noise SD
    squared). It says how far noise alone lets the blood be told apart when
    one knows where it is and what the head looks like without it: a bound
    for the noise, not for the anatomy, which a real reader does not know;
  - the largest excess and the median excess over the pixels that count for
    the labels (>= 10 HU);
  - with `ichtriage predict --json` output: the study's probability and the
    share of negative studies it outranks (its part of the study AUC).

Then the AUC and these figures by group: positive studies with subarachnoid
blood alone, with subarachnoid blood and another subtype, without it.

    ichtriage phantom ph --seed S -n N --size 256
    ichtriage phantom ph-nb --seed S -n N --size 256 \\
        --omit-blood epidural,intraparenchymal,intraventricular,subarachnoid,subdural
    ichtriage predict --json ph > pred.json        # optional
    models/detectability.py [--pred pred.json] ph ph-nb [ph2 ph2-nb ...] > per-study.csv

Several pairs of folders count as one set (a set made in parts with --first).

Reads every file with pydicom (Debian's python3-pydicom) and numpy.
Phantoms are synthetic; decision support, not a diagnosis."""
import csv
import glob
import json
import os
import statistics
import sys

import numpy as np
import pydicom

RHO = np.array([1 / 6, 2 / 3, 1, 2 / 3, 1 / 6])


def correlate(d):
    """d filtered by the noise correlation RHO along both axes (zeros outside)."""
    p = np.pad(d, 2)
    t = sum(w * p[:, k:k + d.shape[1]] for k, w in enumerate(RHO))
    return sum(w * t[k:k + d.shape[0], :] for k, w in enumerate(RHO))


def hu(path):
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def main(argv):
    args = argv[1:]
    pred = None
    if args[:1] == ["--pred"] and len(args) >= 2:
        with open(args[1]) as f:
            pred = {r["study_uid"]: r["probability"] for r in json.load(f)}
        args = args[2:]
    if not args or len(args) % 2:
        sys.stderr.write(__doc__)
        return 2
    studies, lesions, files = {}, {}, {}
    for a_dir, b_dir in zip(args[::2], args[1::2]):
        with open(os.path.join(a_dir, "studies.csv")) as f:
            mine = {r["study_uid"]: r for r in csv.DictReader(f)}
        with open(os.path.join(b_dir, "studies.csv")) as f:
            if [r["study_uid"] for r in csv.DictReader(f)] != list(mine):
                sys.stderr.write("detectability: %s is not %s made again (other studies)\n"
                                 % (b_dir, a_dir))
                return 1
        studies.update(mine)
        with open(os.path.join(a_dir, "lesions.csv")) as f:
            for r in csv.DictReader(f):
                if int(r["positive_slices"]) > 0:
                    lesions.setdefault(r["study_uid"], set()).add((r["subtype"], r["size"]))
        for path in sorted(glob.glob(os.path.join(a_dir, "**", "*.dcm"), recursive=True)):
            uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
            if uid in mine and int(mine[uid]["any"]) > 0:
                rel = os.path.relpath(path, a_dir)
                files.setdefault(uid, []).append((path, os.path.join(b_dir, rel)))
    if pred is not None:
        missing = [u for u in studies if pred.get(u) is None]
        if missing:
            sys.stderr.write("detectability: %d of %d studies have no prediction\n"
                             % (len(missing), len(studies)))
            return 1
    negatives = [pred[u] for u in studies if int(studies[u]["any"]) == 0] if pred else []

    def outranks(p):
        return (sum(n < p for n in negatives) + 0.5 * sum(n == p for n in negatives)) / len(negatives)

    rows = []
    for uid, pairs in files.items():
        sd = float(studies[uid]["noise_sd"])
        ss = scs = top = 0.0
        counted = []
        for a, b in pairs:
            s = hu(a) - hu(b)
            if not s.any():
                continue
            ss += (s * s).sum()
            scs += sd * sd * (s * correlate(s)).sum()
            top = max(top, s.max())
            counted.extend(s[s >= 10].tolist())
        if ss == 0:
            sys.stderr.write("detectability: positive study %s has no blood in %s: is the "
                             "second folder of its pair made with --omit-blood?\n"
                             % (uid, os.path.dirname(pairs[0][0])))
            return 1
        kinds = {k for k, _ in lesions.get(uid, ())}
        group = ("subarachnoid alone" if kinds == {"subarachnoid"} else
                 "subarachnoid and other" if "subarachnoid" in kinds else "no subarachnoid")
        row = {"study_uid": uid, "group": group, "noise_sd": sd,
               "positive_slices": int(studies[uid]["any"]),
               "lesions": ";".join("%s:%s" % k for k in sorted(lesions.get(uid, ()))),
               "dprime_npw": ss / np.sqrt(scs) if scs > 0 else float("inf"),
               "max_excess_hu": top,
               "median_counted_excess_hu": statistics.median(counted) if counted else 0.0}
        if pred:
            row["probability"] = pred[uid]
            row["outranks_negatives"] = outranks(pred[uid])
        rows.append(row)
    rows.sort(key=lambda r: (r.get("outranks_negatives", 0), r["dprime_npw"]))
    w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["study_uid"])
    w.writeheader()
    for r in rows:
        w.writerow({k: ("%.3f" % v if isinstance(v, float) else v) for k, v in r.items()})

    sys.stderr.write("%-24s %7s %6s %12s %12s %14s\n" % (
        "positive studies", "studies", "AUC", "d' min", "d' median", "median max HU"))
    for g in ("subarachnoid alone", "subarachnoid and other", "no subarachnoid", None):
        rs = [r for r in rows if g is None or r["group"] == g]
        if not rs:
            continue
        auc = ("%.3f" % statistics.mean(r["outranks_negatives"] for r in rs)) if pred else "-"
        sys.stderr.write("%-24s %7d %6s %12.1f %12.1f %14.0f\n" % (
            g or "all", len(rs), auc, min(r["dprime_npw"] for r in rs),
            statistics.median(r["dprime_npw"] for r in rs),
            statistics.median(r["max_excess_hu"] for r in rs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
