#!/usr/bin/python3
"""Where a model fails on phantoms: joins `ichtriage predict --json` output
with the phantom folder's own truth (studies.csv, lesions.csv) and prints

  - per subtype and lesion size: positive studies, how many the stored
    threshold flags, and their median study probability;
  - per mimic (calcified pineal, choroid plexus, basal ganglia, dense falx,
    dense sinuses, motion, streaks): negative studies, how many are flagged;
  - the study-level AUC of "any" overall and between the clear cases the
    node's tests use (hemorrhage on at least a third of the slices, against
    none);
  - that AUC by what the positive studies hold, each group against every
    negative: only tiny lesions, only subarachnoid blood (not all tiny),
    the rest.

A study with several lesions counts under each. Decision support, not a
diagnosis; phantoms are synthetic.

    ichtriage predict --json PHANTOM_DIR... > pred.json
    models/breakdown.py pred.json PHANTOM_DIR..."""
import csv
import json
import os
import statistics
import sys


def auc(pos, neg):
    """Mann-Whitney AUC, ties counted half."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def read_studies(folders):
    """The phantom folders' studies.csv rows, by study UID."""
    studies = {}
    for folder in folders:
        with open(os.path.join(folder, "studies.csv")) as f:
            studies.update({r["study_uid"]: r for r in csv.DictReader(f)})
    return studies


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    with open(argv[1]) as f:
        pred = {r["study_uid"]: r for r in json.load(f)}
    studies, lesions = read_studies(argv[2:]), {}
    for folder in argv[2:]:
        with open(os.path.join(folder, "lesions.csv")) as f:
            for r in csv.DictReader(f):
                lesions.setdefault(r["study_uid"], []).append(r)
    missing = [u for u in studies if u not in pred or pred[u].get("probability") is None]
    if missing:
        sys.stderr.write("breakdown: %d of %d studies have no prediction\n"
                         % (len(missing), len(studies)))
        return 1

    groups = {}
    for uid, les in lesions.items():
        for key in {(x["subtype"], x["size"]) for x in les}:
            groups.setdefault(key, []).append(pred[uid])
    sizes = ["tiny", "small", "medium", "large"]
    print("positive studies by lesion subtype and size (a study counts under each of its lesions)")
    print("%-18s %-7s %7s %8s %9s" % ("subtype", "size", "studies", "flagged", "median p"))
    for sub in sorted({k[0] for k in groups}):
        for size in sizes:
            g = groups.get((sub, size))
            if not g:
                continue
            print("%-18s %-7s %7d %8d %9.3f" % (sub, size, len(g), sum(bool(x["flagged"]) for x in g),
                                              statistics.median(x["probability"] for x in g)))

    negs = [u for u, r in studies.items() if int(r["any"]) == 0]
    mimic = {}
    for u in negs:
        kinds = [m.split("=")[0] for m in studies[u]["mimics"].split(";") if m] or ["none"]
        for k in set(kinds):
            mimic.setdefault(k, []).append(pred[u])
    print()
    print("negative studies by mimic (a study counts under each of its mimics)")
    print("%-18s %7s %8s %9s" % ("mimic", "studies", "flagged", "median p"))
    for k in sorted(mimic):
        g = mimic[k]
        print("%-18s %7d %8d %9.3f" % (k, len(g), sum(bool(x["flagged"]) for x in g),
                                     statistics.median(x["probability"] for x in g)))

    p_all = [pred[u]["probability"] for u, r in studies.items() if int(r["any"]) > 0]
    n_all = [pred[u]["probability"] for u in negs]
    clear = [pred[u]["probability"] for u, r in studies.items()
             if int(r["any"]) > 0 and int(r["any"]) >= int(r["slices"]) // 3]
    print()
    print("study AUC of \"any\": %.3f (%d positive, %d negative); between clear cases: %.3f "
          "(%d clear positives)" % (auc(p_all, n_all), len(p_all), len(n_all),
                                    auc(clear, n_all), len(clear)))
    print("flagged at the stored threshold: %d of %d positives, %d of %d negatives, "
          "%d of %d clear positives" % (
              sum(bool(pred[u]["flagged"]) for u, r in studies.items() if int(r["any"]) > 0),
              len(p_all), sum(bool(pred[u]["flagged"]) for u in negs), len(negs),
              sum(bool(pred[u]["flagged"]) for u, r in studies.items()
                  if int(r["any"]) > 0 and int(r["any"]) >= int(r["slices"]) // 3), len(clear)))

    kinds = {"only tiny lesions": [], "only subarachnoid, not all tiny": [], "the rest": []}
    for u, r in studies.items():
        if int(r["any"]) == 0:
            continue
        les = lesions.get(u, [])
        if les and all(x["size"] == "tiny" for x in les):
            k = "only tiny lesions"
        elif les and all(x["subtype"] == "subarachnoid" for x in les):
            k = "only subarachnoid, not all tiny"
        else:
            k = "the rest"
        kinds[k].append(pred[u]["probability"])
    print()
    print("study AUC of \"any\" by what the positives hold (each against all %d negatives)"
          % len(n_all))
    for k, g in kinds.items():
        print("%-34s %4d positives  AUC %.3f" % (k, len(g), auc(g, n_all)))
    rest = kinds["only subarachnoid, not all tiny"] + kinds["the rest"]
    print("%-34s %4d positives  AUC %.3f" % ("all but the only-tiny", len(rest), auc(rest, n_all)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
