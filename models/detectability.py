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
    share of negative studies it outranks (its part of the study AUC);
  - with `--search K`: the same observer when it knows the blood's shape and
    the head but not where the blood is (location unknown). It takes the
    largest matched-filter response over every position in the head of every
    slice, template = the blood of the slice that holds most of it; K noise
    fields drawn the generator's way give the largest response without blood
    and with it, and their AUC is the share of pairs the blood wins
    (`search_auc`). Once on the files' grid, once with 2x2 pixels averaged
    (`_half`: about the 128x128 input's pixel for 256x256 phantoms). Searching
    some 10^5-10^6 positions, the noise alone reaches about 4.5 standard
    deviations, so a d' of 5-6 is found only most of the time. Still a bound
    for the noise, not for the anatomy: a reader who does not know the head
    without blood does worse. About 30 s a study at K 40.

Then the AUC and these figures by group: positive studies with subarachnoid
blood alone, with subarachnoid blood and another subtype, without it.

    ichtriage phantom ph --seed S -n N --size 256
    ichtriage phantom ph-nb --seed S -n N --size 256 \\
        --omit-blood epidural,intraparenchymal,intraventricular,subarachnoid,subdural
    ichtriage predict --json ph > pred.json        # optional
    models/detectability.py [--pred pred.json] [--search K] [--tiny-only] \\
        ph ph-nb [ph2 ph2-nb ...] > per-study.csv

`--tiny-only` keeps the positive studies whose lesions are all tiny.

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


def noise(rng, shape, sd):
    """Noise fields as the generator draws them: white, smoothed by [1 2 1]/4
    along both axes (edges repeated), scaled to standard deviation sd."""
    w = rng.standard_normal(shape, dtype=np.float32)
    p = np.concatenate([w[..., :1], w, w[..., -1:]], axis=-1)
    w = 0.25 * p[..., :-2] + 0.5 * p[..., 1:-1] + 0.25 * p[..., 2:]
    p = np.concatenate([w[..., :1, :], w, w[..., -1:, :]], axis=-2)
    w = 0.25 * p[..., :-2, :] + 0.5 * p[..., 1:-1, :] + 0.25 * p[..., 2:, :]
    return w * np.float32(sd / 0.375)


def coarser(x, f):
    """x with each f x f block of pixels averaged (the last two axes)."""
    if f == 1:
        return x
    s = x.shape
    return x.reshape(s[:-2] + (s[-2] // f, f, s[-1] // f, f)).mean(axis=(-3, -1))


def search(with_blood, without, sd, k, rng, f=1, only_blood=False):
    """The NPW observer with the location unknown, on (slices, H, W) arrays in
    HU with f x f pixels averaged: returns (d' at the blood's own position, the
    AUC of its largest response with blood against without, positions
    searched). Positions: where the template's centre falls on 0-100 HU of the
    head without blood, and wherever the blood's own response is at least half
    its peak (a subdural rim's centre can share a pixel with bone); with
    only_blood, the blood's peak alone (location known: the AUC is then
    Phi(d'/sqrt 2), which the tests check)."""
    sig_img = coarser(with_blood - without, f)
    head = coarser(without, f)
    best = int(np.argmax((sig_img * sig_img).sum(axis=(1, 2))))
    ys, xs = np.nonzero(np.abs(sig_img[best]) > 1e-6)
    y0, x0 = ys.min(), xs.min()
    t = sig_img[best, y0:ys.max() + 1, x0:xs.max() + 1]
    th, tw = t.shape
    n, h, w = sig_img.shape
    ph, pw = h + th, w + tw  # zero padding: no wrap-around
    tf = np.conj(np.fft.rfft2(t, s=(ph, pw)))
    # the template as a filter on the files' grid: its response's variance
    native = np.kron(t, np.ones((f, f))) / (f * f)
    scale = np.sqrt((native * correlate(native)).sum()) * sd

    def response(x):
        r = np.fft.irfft2(np.fft.rfft2(x, s=(ph, pw)) * tf, s=(ph, pw))
        return r[:, :h - th + 1, :w - tw + 1] / scale

    sig = response(sig_img)
    dprime = float(sig[best, y0, x0])
    own = sig >= 0.5 * dprime
    if only_blood:
        where = np.zeros_like(own)
        where[best, y0, x0] = True
    else:
        cy, cx = th // 2, tw // 2
        region = (head >= 0) & (head <= 100)
        where = region[:, cy:cy + h - th + 1, cx:cx + w - tw + 1] | own
    full = (n,) + with_blood.shape[1:]
    neg = np.array([response(coarser(noise(rng, full, sd), f))[where].max() for _ in range(k)])
    pos = np.array([(response(coarser(noise(rng, full, sd), f)) + sig)[where].max()
                    for _ in range(k)])
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return dprime, auc, int(where.sum())


def main(argv):
    args = argv[1:]
    pred = None
    search_k = 0
    tiny_only = False
    while args[:1] == ["--tiny-only"] or (args[:1] in (["--pred"], ["--search"]) and len(args) >= 2):
        if args[0] == "--tiny-only":
            tiny_only = True
            args = args[1:]
            continue
        if args[0] == "--pred":
            with open(args[1]) as f:
                pred = {r["study_uid"]: r["probability"] for r in json.load(f)}
        else:
            try:
                search_k = int(args[1], 10)
            except ValueError:
                search_k = 0
            if search_k < 2:
                sys.stderr.write("detectability: --search %s: an integer of 2 or more\n"
                                 % args[1])
                return 2
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
        kinds = {k for k, _ in lesions.get(uid, ())}
        tiny = bool(kinds) and all(size == "tiny" for _, size in lesions[uid])
        if tiny_only and not tiny:
            continue  # before any pixel is read
        sd = float(studies[uid]["noise_sd"])
        ss = scs = top = 0.0
        counted = []
        # each file decoded once: kept for --search, which needs every slice
        with_blood = [hu(a) for a, _ in pairs]
        without = [hu(b) for _, b in pairs]
        for a, b in zip(with_blood, without):
            s = a - b
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
        group = ("subarachnoid alone" if kinds == {"subarachnoid"} else
                 "subarachnoid and other" if "subarachnoid" in kinds else "no subarachnoid")
        row = {"study_uid": uid, "group": group, "only_tiny": "yes" if tiny else "no",
               "noise_sd": sd,
               "positive_slices": int(studies[uid]["any"]),
               "lesions": ";".join("%s:%s" % k for k in sorted(lesions.get(uid, ()))),
               "dprime_npw": ss / np.sqrt(scs) if scs > 0 else float("inf"),
               "max_excess_hu": top,
               "median_counted_excess_hu": statistics.median(counted) if counted else 0.0}
        if search_k:
            # seeded by the study, so each row is the same whatever else is read
            rng = np.random.default_rng(int(uid.replace(".", "")[-18:]))
            a = np.array(with_blood, np.float32)
            b = np.array(without, np.float32)
            for f, tag in ((1, ""), (2, "_half")):
                if a.shape[1] % f or a.shape[2] % f:
                    continue
                dp, auc, npos = search(a, b, sd, search_k, rng, f)
                row["dprime_npw_best_slice" + tag] = dp
                row["search_auc" + tag] = auc
                row["search_positions" + tag] = npos
        if pred:
            row["probability"] = pred[uid]
            row["outranks_negatives"] = outranks(pred[uid])
        rows.append(row)
    rows.sort(key=lambda r: (r.get("outranks_negatives", 0), r["dprime_npw"]))
    w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["study_uid"])
    w.writeheader()
    for r in rows:
        w.writerow({k: ("%.3f" % v if isinstance(v, float) else v) for k, v in r.items()})

    sys.stderr.write("%-24s %7s %6s %12s %12s %14s%s\n" % (
        "positive studies", "studies", "AUC", "d' min", "d' median", "median max HU",
        "  search AUC (files' grid; 2x2)" if search_k else ""))
    groups = (("subarachnoid alone", lambda r: r["group"] == "subarachnoid alone"),
              ("subarachnoid and other", lambda r: r["group"] == "subarachnoid and other"),
              ("no subarachnoid", lambda r: r["group"] == "no subarachnoid"),
              ("only tiny lesions", lambda r: r["only_tiny"] == "yes"),
              ("all", lambda r: True))
    for name, keep in groups:
        rs = [r for r in rows if keep(r)]
        if not rs:
            continue
        auc = ("%.3f" % statistics.mean(r["outranks_negatives"] for r in rs)) if pred else "-"
        found = ""
        if search_k:
            # the mean of the studies' own AUCs: each against the same head without blood
            found = "  " + "; ".join("%.3f" % statistics.mean(r[c] for r in rs)
                                     for c in ("search_auc", "search_auc_half") if c in rs[0])
        sys.stderr.write("%-24s %7d %6s %12.1f %12.1f %14.0f%s\n" % (
            name, len(rs), auc, min(r["dprime_npw"] for r in rs),
            statistics.median(r["dprime_npw"] for r in rs),
            statistics.median(r["max_excess_hu"] for r in rs), found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
