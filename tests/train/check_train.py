#!/usr/bin/python3
"""tests/train/check_train.py: `ichtriage train`, `eval` and `model` from
outside, on a few small phantom studies (64x64, 8-12 slices, a small
architecture at 64x64 input), so that the whole thing runs in a few minutes
on 2 cores.

- a training run must beat chance on its own held-out test split;
- a run killed after its first checkpoint and started again resumes there
  and ends on the same weights as an uninterrupted run (optimizer state kept)
  and finishes;
- two runs with the same seed give the same model (reproducible);
- `--loc-loss` trains on blood masks where the data has them, refuses data
  without, and resumes with its head;
- `eval` reads the model's thresholds and writes the report and JSON;
- `calibrate` re-picks temperatures and thresholds on another set: the
  sensitivity asked for holds there, the ranking and all but the last
  layers are unchanged, and a set without positives is refused;
- a model whose outputs are in another label order ("labels" says which)
  gives the same eval figures, calibrated predictions and --init weights;
- bad data folders fail with a message that says what is wrong;
- `model register|promote|list|rollback` manage <store.dir>/models.

Usage: check_train.py ICHTRIAGE"""
import glob
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pydicom
from pydicom.uid import generate_uid

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")

ICH = sys.argv[1]
ARCH = "b8,M,b16,M,b32,M,b32,G|"
FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)


def run(*args, **kw):
    return subprocess.run([ICH, *args], capture_output=True, text=True, **kw)


def train_args(data, out, workdir, seed=1, epochs1=8, epochs2=6, spe=0, hard=0, crop=None,
               val_slices=0, context=0, small=0, ema=0):
    a = ["train", data, "-o", out, "--workdir", workdir, "--arch", ARCH, "--input", "64",
         "--seed", str(seed), "--epochs1", str(epochs1), "--epochs2", str(epochs2),
         "--patience", "8", "--val", "0.2", "--test", "0.3", "--threads", "2",
         "--batch", "16", "--series-batch", "4", "--lr1", "3e-3", "--lr-decay", "0.85",
         "--lr2", "3e-3", "--val-metric", "any", "--no-augment"]
    return (a + (["--slices-per-epoch", str(spe)] if spe else [])
            + (["--hard-negatives", str(hard)] if hard else [])
            + (["--small-bleeds", str(small)] if small else [])
            + (["--ema", str(ema)] if ema else [])
            + (["--crop", crop] if crop else [])
            + (["--val-slices", str(val_slices)] if val_slices else [])
            + (["--context", str(context)] if context else []))


def kill_after_checkpoint(args, workdir, meanwhile=None):
    """Runs ichtriage ARGS and kills it (SIGKILL) once WORKDIR/state exists,
    after calling meanwhile() if given (the run still going)."""
    p = subprocess.Popen([ICH, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(workdir, "state")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not os.path.exists(state):
        time.sleep(0.05)
    if meanwhile:
        meanwhile(p)
    p.send_signal(signal.SIGKILL)
    p.wait()


def auc_se(auc, npos, nneg):
    """Hanley & McNeil's standard error of an AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    v = (auc * (1 - auc) + (npos - 1) * (q1 - auc * auc) + (nneg - 1) * (q2 - auc * auc))
    return math.sqrt(max(v, 0) / (npos * nneg))


def metadata(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]


def weights(path):
    """The tensor bytes of a model file (what follows its JSON header)."""
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        return f.read()


def with_metadata(src, dst, key, value):
    """A copy of the model file src with one metadata value changed."""
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
        rest = f.read()
    head["__metadata__"][key] = value
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + rest)


def outputs_rotated(src, dst):
    """A copy of the model file src with its outputs in another order (each
    moved one place on, "any" last) and its "labels" and thresholds saying
    so: the same model to anything that reads its outputs by name, as a
    model made in PyTorch may be."""
    with open(src, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
        data = bytearray(f.read())
    meta = head["__metadata__"]
    k = len(meta["labels"].split(","))
    order = list(range(1, k)) + [0]  # new output i is old output order[i]
    layers = [x for x in head if x.startswith("cnn.classifier.") and x.endswith(".weight")]
    last = max(layers, key=lambda x: int(x.split(".")[2]))[:-len(".weight")]
    for name in ("out.weight", "out.bias", last + ".weight", last + ".bias"):
        assert head[name]["shape"][0] == k
        a, b = head[name]["data_offsets"]
        row, old = (b - a) // k, bytes(data[a:b])
        data[a:b] = b"".join(old[i * row:(i + 1) * row] for i in order)
    for key in ("labels", "thresholds", "cnn_thresholds"):
        if key in meta:
            v = meta[key].split(",")
            meta[key] = ",".join(v[i] for i in order)
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + bytes(data))


def second_series(src, dst):
    """A copy of the phantom folder src in which every series is also a
    second series of its study (new Series and SOP Instance UIDs, the same
    pixels and labels), as a study with a brain and a bone kernel is."""
    shutil.copytree(src, dst)
    csvp = os.path.join(dst, "stage_2_train.csv")
    rows = open(csvp).read().splitlines()
    series = {}
    for path in sorted(glob.glob(os.path.join(dst, "stage_2_train", "*.dcm"))):
        ds = pydicom.dcmread(path)
        old = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series.setdefault(
            ds.SeriesInstanceUID, generate_uid(entropy_srcs=["series", ds.SeriesInstanceUID]))
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["sop", old])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(os.path.join(dst, "stage_2_train", "ID_%s.dcm" % ds.SOPInstanceUID))
        rows += [x.replace("ID_%s_" % old, "ID_%s_" % ds.SOPInstanceUID)
                 for x in rows if x.startswith("ID_%s_" % old)]
    with open(csvp, "w") as f:
        f.write("\n".join(rows) + "\n")


def by_label(path, key):
    """A model file's per-output metadata value key as {label: float}."""
    m = metadata(path)
    return dict(zip(m["labels"].split(","), map(float, m[key].split(","))))


def close(a, b, tol=1e-5):
    """The same JSON-like figures within tol."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= tol or (math.isnan(a) and math.isnan(b))
    return a == b


def main():
    tmp = tempfile.mkdtemp(prefix="ichtriage-train-")
    data = os.path.join(tmp, "ph")
    r = run("phantom", data, "--seed", "11", "-n", "60", "--size", "64", "--slices", "8",
            "--noise", "2", "--no-artifacts", "--prevalence", "0.6",
            "--subtype", "intraparenchymal=0.9", "--subtype", "subdural=0.6")
    check(r.returncode == 0, "phantom data written: " + r.stderr[-200:])

    # 1. A training run that must beat chance on its own test split.
    out = os.path.join(tmp, "a.safetensors")
    t0 = time.time()
    r = run(*train_args(data, out, os.path.join(tmp, "a.work")))
    check(r.returncode == 0, "train exits 0: " + r.stderr[-400:])
    print(f"     training took {time.time() - t0:.0f} s", flush=True)
    meta = metadata(out)
    m = json.load(open(os.path.join(tmp, "a.work", "metrics.json")))
    sl = m["levels"]["slice"]["lrcn"]["any"]
    slice_auc, study_auc = sl["auc"], m["levels"]["study"]["lrcn"]["any"]["auc"]
    se = auc_se(slice_auc, sl["positives"], sl["n"] - sl["positives"])
    print(f"     test split: slice AUC any {slice_auc:.3f} (SE {se:.3f}, {sl['positives']} of "
          f"{sl['n']} slices positive), study AUC any {study_auc}", flush=True)
    # Off a terminal: one line per epoch, with the speed of its training steps.
    ep = re.findall(r"event=train_epoch stage=(\d) epoch=(\d+) .*seconds=\S+ "
                    r"(slices|series)_per_s=([0-9.]+)", r.stderr)
    check(len([e for e in ep if e[0] == "1"]) == 8 and all(float(e[3]) > 0 for e in ep)
          and {e[2] for e in ep if e[0] == "2"} <= {"series"},
          "one line per epoch with its speed: %s" % ep[:3])
    check(slice_auc > 0.5 + 2 * se, "the LRCN beats chance on its own test split (slice-level "
          "AUC for any more than 2 standard errors above 0.5)")
    st = m["levels"]["study"]["lrcn"]["any"]
    check(sl["auc_ci95"] is None and st["auc_ci95"] is not None
          and st["auc_ci95"][0] <= study_auc <= st["auc_ci95"][1]
          and st["sensitivity_ci95"][0] <= st["sensitivity"] <= st["sensitivity_ci95"][1],
          "95% intervals around the study-level AUC and sensitivity, none per slice")
    thr = [float(v) for v in meta["thresholds"].split(",")]
    check(len(thr) == 6 and all(0 < v < 1 for v in thr), "six thresholds in (0,1) stored")
    for key in ("provenance", "metrics", "data", "training", "calibration", "date"):
        check(key in meta, f"metadata has {key}")
    html = open(os.path.join(tmp, "a.work", "report.html")).read()
    check("not a diagnosis" in html and "<svg" in html and "ROC" in html,
          "HTML report with inline SVG and the notice")
    check("validation AUC of any per epoch" in html and "mean AUC" not in html,
          "the history chart names the validation metric (--val-metric any)")

    # 1b. A folder with a link back into itself (again -> .) is walked once:
    #     every slice had been read eight times.
    loop = os.path.join(tmp, "loop")
    r = run("phantom", loop, "--seed", "12", "-n", "3", "--size", "64", "--slices", "8")
    os.symlink(".", os.path.join(loop, "stage_2_train", "again"))
    r = run("eval", out, loop, "--report", os.path.join(tmp, "loop.html"),
            "--json", os.path.join(tmp, "loop.json"))
    check(r.returncode == 0 and "3 series, 24 slices" in r.stdout
          and "event=train_folder_again" in r.stderr,
          "a folder linked into itself is read once: " + r.stdout[:120])

    # 2. Reproducible: the same seed again gives the same weights, hard
    # negatives (chosen by the model of the epoch before) and small bleeds
    # (drawn with the seed) included.
    outs = []
    for k in "bc":
        outs.append(os.path.join(tmp, k + ".safetensors"))
        r = run(*train_args(data, outs[-1], os.path.join(tmp, k + ".work"), epochs1=2, epochs2=2,
                            spe=96, hard=0.25, small=0.125))
        check(r.returncode == 0, "short run exits 0")
        check("event=train_hard_negatives epoch=2 slices=24 " in r.stderr,
              "the second epoch drew 24 hard negatives")
        pools = re.findall(r"event=train_small_bleeds epoch=(\d) slices=(\d+) pool=(\d+) "
                           r"max_slices=3", r.stderr)
        check([p[:2] for p in pools] == [("1", "12"), ("2", "12")] and int(pools[0][2]) > 0,
              "each epoch drew 12 slices of small bleeds: %s" % pools)
    check("small_bleeds=0.125/3 " in metadata(outs[0])["training"],
          "the share of small bleeds is in the model's training metadata")
    check(weights(outs[0]) == weights(outs[1]), "same seed, same weights")
    check(metadata(outs[0])["thresholds"] == metadata(outs[1])["thresholds"],
          "same seed, same thresholds")
    out_b = outs[1]

    # 2b. The head crop: recorded in the model, so that eval, predict and the
    # node crop as training did; a model asking for a crop the node does not
    # know is refused, not run without it. The same run validates stage 1 on
    # a sample of 40 validation slices (--val-slices).
    out_h = os.path.join(tmp, "h.safetensors")
    r = run(*train_args(data, out_h, os.path.join(tmp, "h.work"), epochs1=2, epochs2=1, spe=96,
                        crop="head", val_slices=40))
    check(r.returncode == 0, "a run with --crop head exits 0: " + r.stderr[-300:])
    mh = metadata(out_h)
    check(re.search(r"event=train_val_sample stage=1 slices=40 of=\d+", r.stderr)
          and "val_slices=40" in mh["training"].split(),
          "stage 1 validated on 40 slices, and the model says so: " + mh["training"])
    check("crop=head" in mh["preprocessing"].split(";") and "crop=head" in mh["training"],
          "the crop is in the model's preprocessing and training metadata: "
          + mh["preprocessing"])
    check("crop=" not in metadata(out_b)["preprocessing"], "a run without --crop records none")
    r = run("eval", out_h, data, "--json", os.path.join(tmp, "h-eval.json"),
            "--report", os.path.join(tmp, "h-eval.html"))
    check(r.returncode == 0, "eval of the cropped model: " + r.stderr[-200:])
    # eval --compare: the uncropped model against the cropped one on the same
    # studies (each preprocessed its own way), and against itself. (The JSON
    # holds 6 significant digits.)
    js_c, html_c = os.path.join(tmp, "c-eval.json"), os.path.join(tmp, "c-eval.html")
    r = run("eval", out_b, data, "--compare", out_h, "--json", js_c, "--report", html_c)
    check(r.returncode == 0, "eval --compare exits 0: " + r.stderr[-300:])
    ec, eh = json.load(open(js_c)), json.load(open(os.path.join(tmp, "h-eval.json")))
    c = ec.get("compare") or {}
    auc_b = ec["levels"]["study"]["lrcn"]["any"]["auc"]
    auc_h = eh["levels"]["study"]["lrcn"]["any"]["auc"]
    check(c.get("model") == out_h and abs(c["auc"] - auc_b) < 1e-5
          and abs(c["other_auc"] - auc_h) < 1e-5 and abs(c["difference"] - (auc_b - auc_h)) < 1e-5
          and c["difference_ci95"][0] <= c["difference"] <= c["difference_ci95"][1]
          and 0 <= c["p_value"] <= 1
          and abs(c["other_sensitivity"]
                  - eh["levels"]["study"]["lrcn"]["any"]["sensitivity"]) < 1e-5,
          "eval --compare: each model's study AUC as its own eval gives it, the difference "
          "inside its 95%% interval, a p-value: %s" % c)
    check("Compared with " + out_h in r.stdout and "DeLong, paired" in r.stdout
          and "Compared with another model" in open(html_c).read(),
          "the comparison is printed and in the HTML report")
    r = run("eval", out_b, data, "--compare", out_b, "--json", js_c, "--report", html_c)
    c = (json.load(open(js_c)).get("compare") or {}) if r.returncode == 0 else {}
    check(c.get("difference") == 0 and c.get("p_value") == 1,
          "a model compared with itself: no difference, p = 1: %s" % c)
    r = run("eval", out_b, data, "--compare", os.path.join(tmp, "none.safetensors"),
            "--json", js_c, "--report", html_c)
    check(r.returncode == 1 and "--compare" in r.stderr and "none.safetensors" in r.stderr,
          "--compare with a missing model file: a clear error: " + r.stderr.strip()[-160:])
    r = run("predict", "-c", "/dev/null", "--set", "triage.model=" + out_h, "--json", data)
    rows = json.loads(r.stdout) if r.returncode == 0 else []
    check(len(rows) == 60, "predict runs the cropped model on all 60 studies: " + r.stderr[-200:])
    bad = os.path.join(tmp, "brain.safetensors")
    with_metadata(out_h, bad, "preprocessing", "hu=stored*slope+intercept;crop=brain")
    r = run("predict", "-c", "/dev/null", "--set", "triage.model=" + bad, "--json", data)
    check(r.returncode != 0 and "crop=brain" in r.stderr,
          "a model asking for an unknown crop is refused: " + r.stderr.strip()[-160:])
    r = run("train", data, "-o", os.path.join(tmp, "x.safetensors"), "--crop", "brain")
    check(r.returncode == 2 and not os.path.exists(os.path.join(tmp, "x.safetensors")),
          "--crop brain refused before any work")

    # 2c. Neighbouring slices as channels (--context 1): 3 windows x 3 slices
    # in, recorded in the model; eval, eval --compare (the same decoded slices,
    # seen with each model's own context) and predict run it; a checkpoint is
    # not resumed with another context.
    out_x, work_x = os.path.join(tmp, "ctx.safetensors"), os.path.join(tmp, "ctx.work")
    r = run(*train_args(data, out_x, work_x, epochs1=2, epochs2=1, spe=96, context=1))
    check(r.returncode == 0, "a run with --context 1 exits 0: " + r.stderr[-300:])
    mx = metadata(out_x)
    check(mx.get("context") == "1" and mx["input"] == "9x64x64"
          and "context=1" in mx["training"].split(),
          "the model takes 9 channels and records its context: %s, %s" % (
              mx.get("context"), mx["input"]))
    check("context" not in metadata(out_b), "a run without --context records none")
    js_x = os.path.join(tmp, "ctx-eval.json")
    r = run("eval", out_x, data, "--json", js_x, "--report", os.path.join(tmp, "ctx-eval.html"))
    check(r.returncode == 0, "eval of the context model: " + r.stderr[-200:])
    r = run("eval", out_b, data, "--compare", out_x, "--json", js_c, "--report", html_c)
    c = (json.load(open(js_c)).get("compare") or {}) if r.returncode == 0 else {}
    ex = json.load(open(js_x))["levels"]["study"]["lrcn"]["any"]
    check(abs(c.get("other_auc", -1) - ex["auc"]) < 1e-5
          and abs(c.get("other_sensitivity", -1) - ex["sensitivity"]) < 1e-5,
          "eval --compare scores the context model as its own eval does: %s" % c)
    r = run("predict", "-c", "/dev/null", "--set", "triage.model=" + out_x, "--json", data)
    rows = json.loads(r.stdout) if r.returncode == 0 else []
    check(len(rows) == 60 and all(len(x["slice_probabilities"]) == 8 for x in rows),
          "predict runs the context model on all 60 studies: " + r.stderr[-200:])
    r = run(*train_args(data, out_x, work_x, epochs1=2, epochs2=1, spe=96, context=2))
    check(r.returncode == 1 and "--context" in r.stderr and "context 1" in r.stderr,
          "a checkpoint made with context 1 is not resumed with --context 2: "
          + r.stderr.strip()[-240:])
    # --init from a model without context: its first convolution goes to the
    # centre slice's channels (the neighbours' start at zero), so before any
    # training the CNN scores every slice as the model it came from.
    out_i = os.path.join(tmp, "ctx-init.safetensors")
    r = run(*train_args(data, out_i, os.path.join(tmp, "ctx-init.work"), epochs1=0, epochs2=0,
                        context=1), "--init", out)
    check(r.returncode == 0 and re.search(r"event=train_init .* inflated=1", r.stderr),
          "--context 1 --init a model without context, no epochs: " + r.stderr[-300:])
    check(r.returncode == 0 and "event=train_features " not in r.stderr,
          "--epochs2 0: no stage-2 features are computed")
    if r.returncode == 0:
        mi = json.load(open(os.path.join(tmp, "ctx-init.work", "metrics.json")))
        ma = json.load(open(os.path.join(tmp, "a.work", "metrics.json")))
        a_cnn = ma["levels"]["slice"]["cnn"]["any"]["auc"]
        i_cnn = mi["levels"]["slice"]["cnn"]["any"]["auc"]
        check(abs(a_cnn - i_cnn) < 1e-4,
              f"the inflated CNN scores the test slices as the model it came from "
              f"(slice AUC {i_cnn} against {a_cnn})")
    r = run("train", data, "-o", os.path.join(tmp, "y.safetensors"), "--context", "5")
    check(r.returncode == 2 and not os.path.exists(os.path.join(tmp, "y.safetensors")),
          "--context 5 refused before any work")

    # 3. Kill after the first checkpoint, run again: it resumes and finishes.
    work = os.path.join(tmp, "r.work")
    out_c = os.path.join(tmp, "r.safetensors")
    resumable = dict(epochs1=4, epochs2=2, spe=96, hard=0.25)
    def second_run(first):
        # One run per workdir: a second one at the same time is refused (they
        # had interleaved their history and overwritten each other's
        # checkpoints).
        r = run(*train_args(data, out_c, work, **resumable))
        check(first.poll() is None and r.returncode == 1
              and "another ichtriage train runs in this workdir" in r.stderr,
              "a second run in the same workdir is refused: " + r.stderr[-200:])
    kill_after_checkpoint(train_args(data, out_c, work, **resumable), work, second_run)
    check(os.path.exists(os.path.join(work, "state")), "a checkpoint was written before the kill")
    # As a kill between an epoch's history row and its checkpoint leaves it:
    # the next epoch's row is there, its checkpoint is not.
    st = dict(kv.split("=") for kv in open(os.path.join(work, "state")).read().split())
    with open(os.path.join(work, "history.csv"), "a") as f:
        f.write("%s,%d,0.5,0.5,0.5,1.0\n" % (st["stage"], int(st["epoch"]) + 1))
    r = run(*train_args(data, out_c, work, **resumable))
    check(r.returncode == 0 and "event=train_resume" in r.stderr,
          "the rerun resumes: " + r.stderr[-300:])
    hist = [l.split(",")[:2] for l in open(os.path.join(work, "history.csv"))]
    check(len(hist) == len(set(map(tuple, hist))), "no epoch trained twice after resuming")
    check(os.path.exists(out_c), "the resumed run wrote its model")
    # With the optimizer's state saved at every checkpoint, the resumed run
    # ends on the very weights of a run that was never interrupted.
    check("train_resume_optimizer" not in r.stderr,
          "the optimizer state was restored: " + "".join(
              l for l in r.stderr.splitlines(True) if "train_resume_optimizer" in l))
    out_u = os.path.join(tmp, "u.safetensors")
    r = run(*train_args(data, out_u, os.path.join(tmp, "u.work"), **resumable))
    check(r.returncode == 0 and weights(out_c) == weights(out_u),
          "killed and resumed: the same weights as an uninterrupted run")
    # 3b. The finished run's workdir with another seed (another split): its
    # patients may be in the new validation and test splits, so it is not
    # resumed (it was, and, finished, stood for the new run with no epoch
    # trained: the weekly timer reuses its workdir on new reviews).
    r = run(*train_args(data, out_c, work, seed=2, **resumable))
    check(r.returncode == 0 and "event=train_workdir_reset" in r.stderr
          and "event=train_resume " not in r.stderr
          and "event=train_epoch stage=1 epoch=1 " in r.stderr,
          "another split in a finished workdir trains again: " + r.stderr[-300:])

    # 3a. --ema: stage 1 validates an average of its weights and keeps it as
    # the best epoch's; the average is checkpointed with the run, so killed
    # and resumed, the run ends on the weights of an uninterrupted one.
    work_e = os.path.join(tmp, "ema.work")
    out_e, out_eu = os.path.join(tmp, "ema.safetensors"), os.path.join(tmp, "ema-u.safetensors")
    averaged = dict(epochs1=4, epochs2=2, spe=96, ema=0.9)
    kill_after_checkpoint(train_args(data, out_e, work_e, **averaged), work_e)
    hist = open(os.path.join(work_e, "history.csv")).read().splitlines()
    best1, avg1, last1 = (weights(os.path.join(work_e, f)) for f in (
        "best-stage1.safetensors", "last-ema.safetensors", "last.safetensors"))
    check(len(hist) == 1 and best1 == avg1 and avg1 != last1,
          "after the first epoch the best weights kept are the average, not the trained ones "
          "(%d epochs)" % len(hist))
    check(metadata(os.path.join(work_e, "last-ema.safetensors")).get("train_ema_steps") == "6",
          "the average records the optimizer step it belongs to (96 slices in batches of 16)")
    r = run(*train_args(data, out_e, work_e, **averaged))
    check(r.returncode == 0 and "event=train_resume" in r.stderr
          and "train_resume_ema" not in r.stderr, "the rerun resumes the average: "
          + r.stderr[-300:])
    r = run(*train_args(data, out_eu, os.path.join(tmp, "ema-u.work"), **averaged))
    check(r.returncode == 0 and "event=train_ema decay=0.9 " in r.stderr,
          "an uninterrupted --ema run: " + r.stderr[-300:])
    check(os.path.exists(out_e) and weights(out_e) == weights(out_eu),
          "--ema killed and resumed: the same weights as an uninterrupted run")
    check("ema=0.9 " in metadata(out_eu)["training"], "the decay is in the training metadata")
    # The average lost on resume: a warning, and the run goes on.
    work_f = os.path.join(tmp, "ema-lost.work")
    kill_after_checkpoint(train_args(data, out_e, work_f, **averaged), work_f)
    os.unlink(os.path.join(work_f, "last-ema.safetensors"))
    r = run(*train_args(data, os.path.join(tmp, "ema-lost.safetensors"), work_f, **averaged))
    check(r.returncode == 0 and "level=warn event=train_resume_ema state=fresh" in r.stderr,
          "a lost average is a warning, not a failed run: " + r.stderr[-300:])

    # 3b. --loc-loss: a localisation loss where the data has blood masks. The
    # same studies with masks/ (phantom --masks); on data without masks the
    # option is refused with a reason; killed and resumed, the run ends on the
    # weights of an uninterrupted one (the head is checkpointed too).
    r = run("train", data, "-o", os.path.join(tmp, "l0.safetensors"), "--workdir",
            os.path.join(tmp, "l0.work"), "--input", "64", "--loc-loss", "1")
    check(r.returncode == 1 and "--masks" in r.stderr,
          "--loc-loss on data without masks: a clear error: " + r.stderr.strip()[-200:])
    for opt, bad in (("--loc-loss", "-1"), ("--loc-loss", "abc"), ("--epochs1", "x"),
                     ("--lr1", "1e-3x")):
        r = run("train", data, "-o", os.path.join(tmp, "l1.safetensors"), opt, bad)
        check(r.returncode == 2 and not os.path.exists(os.path.join(tmp, "l1.safetensors"))
              and (bad == "-1" or f'"{bad}" is not a number' in r.stderr),
              f"{opt} {bad} refused before any work: " + r.stderr.strip()[:120])
    # eval and calibrate read their numbers the same way: refused, exit 2,
    # before the model or the data is read
    for cmd, opt, bad in (("eval", "--seed", "-1"), ("eval", "--val", "abc"),
                          ("eval", "--test", "0.9"), ("eval", "--threads", "2x"),
                          ("calibrate", "--threads", "x"), ("calibrate", "--sensitivity", "1e-3x")):
        r = run(cmd, out, data, opt, bad, *(["-o", os.path.join(tmp, "c1.safetensors")]
                                            if cmd == "calibrate" else []))
        check(r.returncode == 2 and f'"{bad}"' in r.stderr
              and not os.path.exists(os.path.join(tmp, "c1.safetensors")),
              f"{cmd} {opt} {bad} refused before any work: " + r.stderr.strip()[:160])
    masked = os.path.join(tmp, "phm")
    r = run("phantom", masked, "--seed", "11", "-n", "60", "--size", "64", "--slices", "8",
            "--noise", "2", "--no-artifacts", "--prevalence", "0.6",
            "--subtype", "intraparenchymal=0.9", "--subtype", "subdural=0.6", "--masks")
    check(r.returncode == 0, "masked phantom data written: " + r.stderr[-200:])
    lwork = os.path.join(tmp, "l.work")
    out_l = os.path.join(tmp, "l.safetensors")
    largs = train_args(masked, out_l, lwork, epochs1=3, epochs2=1, spe=96) + ["--loc-loss", "1"]
    kill_after_checkpoint(largs, lwork)
    check(os.path.exists(os.path.join(lwork, "last-loc.bin")),
          "--loc-loss: the head was checkpointed before the kill")
    r = run(*largs)
    check(r.returncode == 0 and "event=train_resume" in r.stderr and "event=train_loc" in r.stderr
          and "loc_loss=" in r.stderr and "train_resume_loc" not in r.stderr,
          "--loc-loss: the rerun resumes with its head: " + r.stderr[-400:])
    out_lu = os.path.join(tmp, "lu.safetensors")
    r = run(*train_args(masked, out_lu, os.path.join(tmp, "lu.work"), epochs1=3, epochs2=1,
                        spe=96), "--loc-loss", "1")
    check(r.returncode == 0 and weights(out_l) == weights(out_lu),
          "--loc-loss, killed and resumed: the same weights as an uninterrupted run")
    check("loc_loss=1" in metadata(out_l)["training"], "the model records its --loc-loss")
    out_n = os.path.join(tmp, "ln.safetensors")
    r = run(*train_args(masked, out_n, os.path.join(tmp, "ln.work"), epochs1=3, epochs2=1,
                        spe=96))
    check(r.returncode == 0 and weights(out_n) != weights(out_lu),
          "the localisation loss changes what is learnt (a run without it ends elsewhere)")
    # --loc-cell-weights: the cells' own positive-class weights, logged and
    # recorded; they change what is learnt; without --loc-loss, refused.
    r = run("train", masked, "-o", os.path.join(tmp, "l2.safetensors"), "--loc-cell-weights")
    check(r.returncode == 2 and "--loc-cell-weights needs --loc-loss" in r.stderr
          and not os.path.exists(os.path.join(tmp, "l2.safetensors")),
          "--loc-cell-weights without --loc-loss refused: " + r.stderr.strip()[:120])
    out_c = os.path.join(tmp, "lc.safetensors")
    r = run(*train_args(masked, out_c, os.path.join(tmp, "lc.work"), epochs1=3, epochs2=1,
                        spe=96), "--loc-loss", "1", "--loc-cell-weights")
    loc_lines = [ln for ln in r.stderr.splitlines() if "event=train_loc " in ln]
    check(r.returncode == 0 and loc_lines and "from=cells" in loc_lines[0]
          and "loc_weights=cells" in metadata(out_c)["training"]
          and weights(out_c) != weights(out_lu),
          "--loc-cell-weights: logged, recorded, and another run than the slices' weights: "
          + (loc_lines[0] if loc_lines else r.stderr[-300:]))

    # 4. eval on the same folder, test split as train made it.
    rep = os.path.join(tmp, "eval.html")
    js = os.path.join(tmp, "eval.json")
    r = run("eval", out, data, "--split", "test", "--seed", "1", "--val", "0.2", "--test", "0.3",
            "--report", rep, "--json", js)
    check(r.returncode == 0, "eval exits 0: " + r.stderr[-300:])
    e = json.load(open(js))
    check(close(e["levels"], m["levels"]) and e["studies"] == m["studies"]
          and e["series"] == m["series"],
          "eval of the test split reproduces train's figures: every level, model and label, "
          "counts, sensitivity, specificity and intervals (study AUC of any %s against %s)" % (
              e["levels"]["study"]["lrcn"]["any"]["auc"], study_auc))
    # Every series also as a second series of its study (a brain and a bone
    # kernel): the studies are the same 12, with the same figures, and
    # calibrate picks the same thresholds. Each series had counted as a
    # study: "24 series ... 10 positive and 14 negative studies".
    one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
    run("phantom", one, "--seed", "21", "-n", "12", "--size", "64", "--slices", "8",
        "--prevalence", "0.5")
    second_series(one, two)
    lv, cal_thr = {}, {}
    for name in ("one", "two"):
        js_o = os.path.join(tmp, name + ".json")
        r = run("eval", out, os.path.join(tmp, name), "--json", js_o,
                "--report", os.path.join(tmp, name + ".html"))
        lv[name] = json.load(open(js_o)) if r.returncode == 0 else {}
        if name == "two":
            check(r.returncode == 0 and "12 studies, 24 series, 192 slices" in r.stdout,
                  "two series of each of 12 studies are 12 studies: " + r.stdout[:120])
        out_o = os.path.join(tmp, name + "-cal.safetensors")
        r = run("calibrate", out, os.path.join(tmp, name), "-o", out_o, "--threads", "2",
                "--report", os.path.join(tmp, name + "-cal.html"),
                "--json", os.path.join(tmp, name + "-cal.json"))
        cal_thr[name] = metadata(out_o)["thresholds"] if r.returncode == 0 else None
    check(lv["one"] and lv["two"] and close(lv["one"]["levels"]["study"],
                                            lv["two"]["levels"]["study"]),
          "each series twice: the same study-level figures (any: %s positive of %s)" % (
              lv["two"] and lv["two"]["levels"]["study"]["lrcn"]["any"]["positives"],
              lv["two"] and lv["two"]["levels"]["study"]["lrcn"]["any"]["n"]))
    check(cal_thr["one"] is not None and cal_thr["one"] == cal_thr["two"],
          "each series twice: calibrate picks the same thresholds: %s against %s" % (
              cal_thr["two"], cal_thr["one"]))
    check("CNN" in r.stdout and "LRCN" in r.stdout, "eval prints CNN and LRCN side by side")
    # Only negative studies: what needs positives is "n/a", not "nan".
    neg = os.path.join(tmp, "neg")
    r = run("phantom", neg, "--seed", "12", "-n", "4", "--size", "64", "--slices", "8",
            "--prevalence", "0")
    check(r.returncode == 0, "negative phantoms written")
    r = run("eval", out, neg, "--json", js, "--report", rep, "--compare", out_b)
    check(r.returncode == 0 and "n/a" in r.stdout and "nan" not in r.stdout.lower()
          and "nan" not in open(rep).read().lower() and "p = n/a" in r.stdout,
          "eval --compare of negatives only: n/a where a figure needs positives, no nan: "
          + r.stdout[-300:] + r.stderr[-200:])
    cmp_line = [x for x in r.stderr.splitlines() if "event=eval_compare" in x]
    check(cmp_line and not re.search(r"=(-?nan|[^ ]*,-?nan)\b", cmp_line[0], re.I)
          and "p=n/a" in cmp_line[0],
          "eval --compare of negatives only: its log line says n/a, not nan: %r" % cmp_line)

    # 4b. calibrate: new temperatures and thresholds on studies the model
    # never saw (another seed), no retraining.
    cal = os.path.join(tmp, "cal")
    r = run("phantom", cal, "--seed", "12", "-n", "40", "--size", "64", "--slices", "8",
            "--noise", "2", "--no-artifacts", "--prevalence", "0.5",
            "--subtype", "intraparenchymal=0.9", "--subtype", "subdural=0.6")
    check(r.returncode == 0, "calibration phantoms written")
    out_k = os.path.join(tmp, "k.safetensors")
    js_k = os.path.join(tmp, "k.json")
    r = run("calibrate", out, cal, "-o", out_k, "--sensitivity", "0.95", "--threads", "2",
            "--report", os.path.join(tmp, "k.html"), "--json", js_k)
    check(r.returncode == 0 and "before (stored threshold)" in r.stdout and "after" in r.stdout,
          "calibrate exits 0 and prints the operating point before and after: " +
          r.stderr[-300:])
    print("     " + "\n     ".join(l for l in r.stdout.splitlines()
                                   if l.startswith(("before", "after"))), flush=True)
    mk = metadata(out_k)
    check("ichtriage calibrate" in mk.get("threshold_rule", "") and
          mk.get("calibration", "").startswith(meta["calibration"] + "; then ichtriage calibrate")
          and "calibration_metrics" in mk, "the calibrated model says how it was calibrated")
    check(mk["thresholds"] != meta["thresholds"], "new thresholds stored")
    js_a, js_b = os.path.join(tmp, "ka.json"), os.path.join(tmp, "kb.json")
    ra = run("eval", out, cal, "--report", os.path.join(tmp, "ka.html"), "--json", js_a)
    rb = run("eval", out_k, cal, "--report", os.path.join(tmp, "kb.html"), "--json", js_b)
    check(ra.returncode == 0 and rb.returncode == 0, "eval of both models on the calibration set")
    ea = json.load(open(js_a))["levels"]["study"]["lrcn"]["any"]
    eb = json.load(open(js_b))["levels"]["study"]["lrcn"]["any"]
    print(f"     on the calibration set: sensitivity {ea['sensitivity']:.3f} -> "
          f"{eb['sensitivity']:.3f}, AUC {ea['auc']:.4f} -> {eb['auc']:.4f}", flush=True)
    check(eb["sensitivity"] >= 0.95, "at the new threshold the study-level sensitivity on the "
          "calibration set is at least the 0.95 asked for")
    check(abs(ea["auc"] - eb["auc"]) < 1e-4, "the ranking is unchanged (same AUC): a temperature "
          "is monotonic")
    # --sensitivity 0.85 on 20 positive studies flags 17: read as a float
    # (0.85f x 20 = 17.0000005) it had asked for 18.
    cal20 = os.path.join(tmp, "cal20")
    run("phantom", cal20, "--seed", "14", "-n", "40", "--size", "64", "--slices", "8",
        "--noise", "2", "--no-artifacts", "--prevalence", "0.5",
        "--subtype", "intraparenchymal=0.9", "--subtype", "subdural=0.6")
    js_85 = os.path.join(tmp, "k85.json")
    r = run("calibrate", out, cal20, "-o", os.path.join(tmp, "k85.safetensors"), "--sensitivity",
            "0.85", "--threads", "2", "--report", os.path.join(tmp, "k85.html"), "--json", js_85)
    a85 = json.load(open(js_85))["levels"]["study"]["lrcn"]["any"] if r.returncode == 0 else {}
    check(r.returncode == 0 and a85["positives"] == 20 and a85["tp"] == 17,
          "--sensitivity 0.85: %s of %s positive studies flagged, 17 of 20 asked for" % (
              a85.get("tp"), a85.get("positives")))
    with open(out, "rb") as f:
        ha = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        wa = f.read()
    with open(out_k, "rb") as f:
        hk = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        wk = f.read()
    changed = sorted(k for k in ha if k != "__metadata__" and
                     wa[slice(*ha[k]["data_offsets"])] != wk[slice(*hk[k]["data_offsets"])])
    check(changed and all(k.startswith(("out.", "cnn.classifier.")) for k in changed),
          "only the last layers changed: " + ", ".join(changed))
    neg = os.path.join(tmp, "neg")
    run("phantom", neg, "--seed", "13", "-n", "6", "--size", "64", "--slices", "8",
        "--prevalence", "0")
    out_n = os.path.join(tmp, "n.safetensors")
    r = run("calibrate", out, neg, "-o", out_n)
    check(r.returncode != 0 and "both labels" in r.stderr and not os.path.exists(out_n),
          "calibration data without a positive study: refused, nothing written: " +
          r.stderr.strip()[-200:])
    r = run("calibrate", out, cal)
    check(r.returncode == 2 and "--out" in r.stderr, "calibrate without --out: usage error")

    # 4c. The same model with its outputs in another order, its "labels"
    # saying which: eval, eval --compare, calibrate and train --init read each
    # output by its name, as the node does (they had read them in our order:
    # other figures, and thresholds and temperatures put on other labels'
    # outputs); a checkpoint in another order is refused, not resumed.
    rot = os.path.join(tmp, "rot.safetensors")
    outputs_rotated(out, rot)
    lv = {}
    for name, model in (("same", out), ("rot", rot)):
        js_o = os.path.join(tmp, name + "-eval.json")
        r = run("eval", model, cal, "--report", os.path.join(tmp, name + "-eval.html"),
                "--json", js_o)
        lv[name] = json.load(open(js_o))["levels"] if r.returncode == 0 else None
    ls, lr = (lv[k] and lv[k]["study"]["lrcn"]["any"] for k in ("same", "rot"))
    check(lv["same"] is not None and close(lv["same"], lv["rot"]),
          "eval of the model with rotated outputs: the same figures for every label, level and "
          "model (study AUC of any %s, sensitivity %s, specificity %s; as stored: %s, %s, %s)" % (
              lr and lr["auc"], lr and lr["sensitivity"], lr and lr["specificity"],
              ls and ls["auc"], ls and ls["sensitivity"], ls and ls["specificity"]))
    r = run("eval", out, cal, "--compare", rot, "--json", js_c, "--report", html_c)
    c = (json.load(open(js_c)).get("compare") or {}) if r.returncode == 0 else {}
    check(c.get("difference") is not None and abs(c["difference"]) < 1e-6
          and ls and abs(c["other_sensitivity"] - ls["sensitivity"]) < 1e-6,
          "eval --compare of the model with its rotated self: no difference: %s" % c)
    for name, model in (("same", out), ("rot", rot)):
        r = run("calibrate", model, cal, "-o", os.path.join(tmp, name + "-cal.safetensors"),
                "--threads", "2", "--report", os.path.join(tmp, name + "-cal.html"),
                "--json", os.path.join(tmp, name + "-cal.json"))
        check(r.returncode == 0, "calibrate %s exits 0: %s" % (name, r.stderr[-200:]))
    cal_s, cal_r = (os.path.join(tmp, k + "-cal.safetensors") for k in ("same", "rot"))
    check(metadata(cal_r)["labels"] == metadata(rot)["labels"]
          and all(close(by_label(cal_s, k), by_label(cal_r, k)) for k in
                  ("thresholds", "cnn_thresholds")),
          "calibrated, the rotated model keeps its order and stores each label's thresholds at "
          "its own output: %s against %s" % (by_label(cal_r, "thresholds"),
                                              by_label(cal_s, "thresholds")))
    rows = {}
    for name, model in (("same", cal_s), ("rot", cal_r)):
        r = run("predict", "-c", "/dev/null", "--set", "triage.model=" + model, "--json", data)
        rows[name] = [(x["study_uid"], x["flagged"], x["probability"], x["subtypes"])
                      for x in json.loads(r.stdout)] if r.returncode == 0 else None
    check(rows["same"] and close(rows["same"], rows["rot"]),
          "the two calibrated models predict alike: %s of %s flagged against %s" % (
              sum(x[1] for x in rows["rot"] or []), len(rows["rot"] or []),
              sum(x[1] for x in rows["same"] or [])))
    # --init from it: the rows of its last layers go to the outputs they
    # belong to, so that the run starts from the very weights --init of the
    # model in our order gives.
    inits = {}
    for name, model in (("same", out), ("rot", rot)):
        inits[name] = os.path.join(tmp, name + "-init.safetensors")
        r = run(*train_args(data, inits[name], os.path.join(tmp, name + "-init.work"),
                            epochs1=0, epochs2=0), "--init", model)
        check(r.returncode == 0 and (name == "same") != ("event=train_init_labels" in r.stderr),
              "--init %s, no epochs: %s" % (name, r.stderr[-300:]))
    check(os.path.exists(inits["rot"]) and weights(inits["same"]) == weights(inits["rot"])
          and metadata(inits["rot"])["labels"] == metadata(out)["labels"],
          "--init from the rotated model: the same weights as from the model itself, in our order")
    # That run's checkpoint turned round: refused with a reason.
    work_r = os.path.join(tmp, "rot-init.work")
    last = os.path.join(work_r, "last.safetensors")
    outputs_rotated(last, last)
    r = run(*train_args(data, inits["rot"], work_r, epochs1=0, epochs2=0), "--init", rot)
    check(r.returncode == 1 and "not made by ichtriage train" in r.stderr,
          "a checkpoint with its outputs in another order is not resumed: "
          + r.stderr.strip()[-240:])
    r = run("train", data, "-o", os.path.join(tmp, "x.safetensors"), "--val-slices", "-5")
    check(r.returncode == 2 and "out of range" in r.stderr
          and not os.path.exists(os.path.join(tmp, "x.safetensors")),
          "--val-slices -5 refused before any work")
    for share in ("0.6", "-0.1"):
        r = run("train", data, "-o", os.path.join(tmp, "x.safetensors"), "--hard-negatives", share)
        check(r.returncode == 2 and "out of range" in r.stderr
              and not os.path.exists(os.path.join(tmp, "x.safetensors")),
              "--hard-negatives %s refused before any work: %s" % (share, r.stderr.strip()[:80]))
    for opt, value in (("--small-bleeds", "0.6"), ("--small-bleeds", "x"), ("--ema", "1"),
                       ("--ema", "0.3"), ("--ema", "-0.5"), ("--sharp", "1.5"),
                       ("--sharp", "-0.1"), ("--sharp", "half"),
                       ("--small-bleed-slices", "0")):
        r = run("train", data, "-o", os.path.join(tmp, "x.safetensors"), opt, value)
        check(r.returncode == 2 and ("out of range" in r.stderr or "not a number" in r.stderr)
              and not os.path.exists(os.path.join(tmp, "x.safetensors")),
              "%s %s refused before any work: %s" % (opt, value, r.stderr.strip()[:80]))

    # 5. Bad data folders.
    r = run("train", os.path.join(tmp, "missing"), "-o", os.path.join(tmp, "x.safetensors"))
    check(r.returncode != 0 and "not a folder" in r.stderr, "missing folder: " + r.stderr.strip())
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    r = run("train", empty, "-o", os.path.join(tmp, "x.safetensors"))
    check(r.returncode != 0 and "no labels file" in r.stderr, "no CSV: " + r.stderr.strip())
    with open(os.path.join(empty, "stage_2_train.csv"), "w") as f:
        f.write("ID,Label\nID_1.2.3_any,0\n")
    r = run("train", empty, "-o", os.path.join(tmp, "x.safetensors"))
    check(r.returncode != 0 and "no DICOM files" in r.stderr, "no DICOM: " + r.stderr.strip())
    with open(os.path.join(empty, "stage_2_train.csv"), "w") as f:
        f.write("ID,Label\nID_1.2.3_bleeding,1\n")
    os.symlink(os.path.join(data, "stage_2_train"), os.path.join(empty, "dcm"))
    r = run("train", empty, "-o", os.path.join(tmp, "x.safetensors"))
    check(r.returncode != 0 and "bad row" in r.stderr, "bad CSV row: " + r.stderr.strip())
    for value in ("0.7", "1x", ""):
        with open(os.path.join(empty, "stage_2_train.csv"), "w") as f:
            f.write("ID,Label\nID_1.2.3_any,%s\n" % value)
        r = run("train", empty, "-o", os.path.join(tmp, "x.safetensors"))
        check(r.returncode != 0 and "bad row" in r.stderr,
              "label value %r is not 0 or 1: %s" % (value, r.stderr.strip()))
    with open(os.path.join(empty, "stage_2_train.csv"), "w") as f:
        f.write("ID,Label\nID_9.9.9_any,1\n")
    r = run("train", empty, "-o", os.path.join(tmp, "x.safetensors"))
    check(r.returncode != 0 and "has a row in" in r.stderr, "labels of other files: " +
          r.stderr.strip())
    # Files that are not DICOM images: a warning naming the first (it was an
    # info count), and an error that says so when none is readable (it said
    # none had a row in the CSV).
    junk = os.path.join(tmp, "junk")
    r = run("phantom", junk, "--seed", "13", "-n", "2", "--size", "64", "--slices", "8")
    dcm = sorted(glob.glob(os.path.join(junk, "stage_2_train", "*.dcm")))
    with open(dcm[0], "w") as f:
        f.write("not DICOM\n")
    r = run("eval", out, junk, "--report", os.path.join(tmp, "junk.html"),
            "--json", os.path.join(tmp, "junk.json"))
    check(r.returncode == 0 and "level=warn event=train_files_unreadable" in r.stderr
          and "files=1 of=16" in r.stderr and os.path.basename(dcm[0]) in r.stderr,
          "an unreadable file is a warning naming it: " + r.stderr[-300:])
    for p in dcm:
        with open(p, "w") as f:
            f.write("not DICOM\n")
    r = run("eval", out, junk, "--report", os.path.join(tmp, "junk.html"),
            "--json", os.path.join(tmp, "junk.json"))
    check(r.returncode != 0 and "none of its 16 .dcm files is a readable DICOM image"
          in r.stderr, "no readable file: " + r.stderr.strip()[-200:])
    # Labels under another name, exported by a spreadsheet (a UTF-8 byte
    # order mark first): found (it was not); two such files: refused, not
    # whichever the folder listing gives first.
    bom = os.path.join(tmp, "bom")
    run("phantom", bom, "--seed", "14", "-n", "2", "--size", "64", "--slices", "8")
    with open(os.path.join(bom, "stage_2_train.csv"), "rb") as f:
        labels = f.read()
    os.unlink(os.path.join(bom, "stage_2_train.csv"))
    with open(os.path.join(bom, "export.csv"), "wb") as f:
        f.write(b"\xef\xbb\xbf" + labels)
    ev = ["--report", os.path.join(tmp, "bom.html"), "--json", os.path.join(tmp, "bom.json")]
    r = run("eval", out, bom, *ev)
    check(r.returncode == 0 and "2 series, 16 slices" in r.stdout,
          "labels in a CSV that starts with a byte order mark: " + r.stderr.strip()[-200:])
    with open(os.path.join(bom, "older.csv"), "wb") as f:
        f.write(labels)
    r = run("eval", out, bom, *ev)
    check(r.returncode != 0 and "more than one CSV with header ID,Label" in r.stderr,
          "two labels CSVs: refused: " + r.stderr.strip()[-200:])
    # A copy of a file beside it is one instance: one slice, with a warning
    # (it was the same slice twice in its series).
    dup = os.path.join(tmp, "dup")
    run("phantom", dup, "--seed", "15", "-n", "2", "--size", "64", "--slices", "8")
    first = sorted(glob.glob(os.path.join(dup, "stage_2_train", "*.dcm")))[0]
    with open(first, "rb") as a, open(os.path.join(dup, "stage_2_train", "zz-copy.dcm"),
                                      "wb") as b:
        b.write(a.read())
    r = run("eval", out, dup, "--report", os.path.join(tmp, "dup.html"),
            "--json", os.path.join(tmp, "dup.json"))
    check(r.returncode == 0 and "2 series, 16 slices" in r.stdout
          and "event=train_files_duplicate" in r.stderr,
          "a copied file is one slice: " + r.stdout[:100])
    # Labels of "any" only: the subtypes, absent from the CSV, are unknown,
    # and said. They are neither scored (they had been scored as absent, and
    # before that trained on as absent, silently) nor trained on.
    anyonly = os.path.join(tmp, "anyonly")
    run("phantom", anyonly, "--seed", "16", "-n", "12", "--size", "64", "--slices", "8")
    csvp = os.path.join(anyonly, "stage_2_train.csv")
    rows = open(csvp).read().splitlines()
    with open(csvp, "w") as f:
        f.write("\n".join([rows[0]] + [x for x in rows[1:] if "_any," in x]) + "\n")
    r = run("eval", out, anyonly, "--report", os.path.join(tmp, "anyonly.html"),
            "--json", os.path.join(tmp, "anyonly.json"))
    check(r.returncode == 0 and "event=train_labels_missing" in r.stderr
          and "labels=480 " in r.stderr, "an any-only CSV is said: " + r.stderr[-300:])
    if r.returncode == 0:
        lv = json.load(open(os.path.join(tmp, "anyonly.json")))["levels"]
        for level in ("slice", "study"):
            m = lv[level]["lrcn"]
            check(m["any"]["n"] > 0 and all(m[x]["n"] == 0 for x in SUBTYPES),
                  "any-only CSV, %s level: 'any' scored, subtypes not: %s" % (
                      level, [m[x]["n"] for x in ("any",) + SUBTYPES]))
            check(m["weighted_logloss"] is not None and math.isfinite(m["weighted_logloss"]),
                  "any-only CSV, %s level: a weighted log loss over 'any'" % level)
    r = run(*train_args(anyonly, os.path.join(tmp, "anyonly.safetensors"),
                        os.path.join(tmp, "anyonly.work"), epochs1=2, epochs2=2))
    losses = [float(x) for x in re.findall(r"event=train_epoch .*? loss=(\S+)", r.stderr)]
    check(r.returncode == 0 and losses and all(math.isfinite(x) for x in losses),
          "training on an any-only CSV: finite losses %s: %s" % (losses, r.stderr[-300:]))
    # No subtype has a positive validation study: warned, and the threshold
    # rule says so (it claimed sensitivity 0.950 for all, at 0.49995).
    nf = re.search(r"level=warn event=train_labels_not_fitted no_positive=(\S+)", r.stderr)
    rule = metadata(os.path.join(tmp, "anyonly.safetensors")).get("threshold_rule", "") \
        if r.returncode == 0 else ""
    check(nf and set(SUBTYPES) <= set(nf.group(1).split(","))
          and "not fitted: no positive validation study (threshold 0.5, temperature 1): "
          in rule and all(x in rule for x in SUBTYPES),
          "labels without a positive validation study are warned of and named in the "
          "threshold rule: %s; %s" % (nf and nf.group(0), rule))

    # 6. The registry.
    store = os.path.join(tmp, "store")
    s = ["--set", "store.dir=" + store]
    r1 = run("model", "register", out, *s)
    time.sleep(1.1)
    r2 = run("model", "register", out_b, *s)
    check(r1.returncode == 0 and r2.returncode == 0, "register two models")
    id1, id2 = r1.stdout.strip(), r2.stdout.strip()
    check(run("model", "promote", id1, *s).returncode == 0, "promote the first")
    check(run("model", "promote", id2, *s).returncode == 0, "promote the second")
    lst = run("model", "list", *s).stdout
    check(any(l.startswith("*") and id2 in l for l in lst.splitlines()), "list marks the active")
    r = run("model", "rollback", *s)
    check(r.returncode == 0 and id1 in r.stdout, "rollback puts the first back")
    with open(os.path.join(store, "models", "active.safetensors"), "rb") as f:
        check(f.read() == open(os.path.join(store, "models", id1 + ".safetensors"), "rb").read(),
              "active.safetensors is the first again")
    r = run("model", "promote", "nonexistent", *s)
    check(r.returncode != 0 and "no registered model" in r.stderr, "unknown id refused")

    # 7. --auto-promote: promoted when nothing is active; afterwards only when
    #    the log line's comparison says so, and active.log agrees. The first
    #    registered run freezes its test patients; the second (another seed,
    #    so another split of its own, and promotion by the config key instead
    #    of the flag) holds out exactly those and is compared on them.
    store2 = os.path.join(tmp, "store2")
    log = os.path.join(store2, "models", "active.log")
    frozen_file = os.path.join(store2, "models", "test-patients.txt")
    frozen = None
    for k, seed in enumerate((1, 2)):
        args = train_args(data, os.path.join(tmp, f"ap{k}.safetensors"),
                          os.path.join(tmp, f"ap{k}.work"), seed=seed, epochs1=1, epochs2=1, spe=64)
        how = ["--auto-promote"] if k == 0 else ["--register", "--set", "train.auto_promote=yes"]
        r = run(*args, *how, "--set", "store.dir=" + store2)
        lines = open(log).read().split() if os.path.exists(log) else []
        test_series = re.search(r"event=train_data .* test=(\d+)/", r.stderr)
        if k == 0:
            check(r.returncode == 0 and "promoted" in r.stdout and len(lines) == 1,
                  "auto-promote with nothing active promotes: " + r.stdout.strip())
            frozen = [l for l in open(frozen_file).read().splitlines()
                      if l and not l.startswith("#")] if os.path.exists(frozen_file) else []
            check(frozen and test_series and int(test_series.group(1)) == len(frozen),
                  "the first registered run freezes its %s test patients: %d listed" %
                  (test_series.group(1) if test_series else "?", len(frozen)))
        else:
            said = "promote=yes" in r.stderr
            check(r.returncode == 0 and "model_compare" in r.stderr and
                  ("promoted" in r.stdout) == said and len(lines) == (2 if said else 1),
                  "train.auto_promote=yes follows the comparison on the frozen test patients: " +
                  r.stdout.strip())
            mc = re.search(r"event=model_compare new_auc=(\S+) new_sensitivity=\S+ "
                           r"active_auc=(\S+) active_sensitivity=\S+ auc_difference=(\S+) "
                           r"auc_difference_ci95=(\S+),(\S+) p=(\S+) series=(\d+)", r.stderr)
            v = [float(x) for x in mc.groups()] if mc else []
            check(mc and abs(v[2] - (v[0] - v[1])) < 2e-4 and v[3] <= v[2] <= v[4]
                  and 0 <= v[5] <= 1 and int(v[6]) == int(test_series.group(1))
                  and "DeLong, paired" in r.stdout,
                  "the comparison gives the AUC difference, its interval and DeLong's paired "
                  "p on the frozen test series: " + (mc.group(0) if mc else "no model_compare"))
            held = re.search(r"event=test_split frozen_patients=(\d+) series_held_out=(\d+)",
                             r.stderr)
            check(held and int(held.group(1)) == len(frozen) and
                  int(held.group(2)) == len(frozen) and test_series and
                  int(test_series.group(1)) == len(frozen),
                  "another seed holds out the same frozen patients: " +
                  (held.group(0) if held else "no test_split line"))
            again = [l for l in open(frozen_file).read().splitlines()
                     if l and not l.startswith("#")]
            check(again == frozen, "the frozen test split is not rewritten")
        time.sleep(1.1)
    # A plain run (not registered) on the store's data holds the frozen
    # patients out too (it trained on them, and could be registered after),
    # and so does eval's --split.
    r = run(*train_args(data, os.path.join(tmp, "plain.safetensors"),
                        os.path.join(tmp, "plain.work"), seed=5, epochs1=1, epochs2=1, spe=64),
            "--set", "store.dir=" + store2)
    held = re.search(r"event=test_split frozen_patients=(\d+) series_held_out=(\d+)", r.stderr)
    check(r.returncode == 0 and held and int(held.group(2)) == len(frozen),
          "a plain run holds out the frozen patients: " + (held.group(0) if held else "none"))
    r = run("eval", os.path.join(tmp, "plain.safetensors"), data, "--split", "test", "--seed", "5",
            "--val", "0.2", "--test", "0.3", "--set", "store.dir=" + store2,
            "--report", os.path.join(tmp, "plain-eval.html"),
            "--json", os.path.join(tmp, "plain-eval.json"))
    check(r.returncode == 0 and "event=test_split" in r.stderr,
          "eval --split holds out the frozen patients: " + r.stderr[-300:])
    # A registered run that finds none of the frozen patients in its data
    # has nothing to compare on and leaves promotion to a person.
    store3 = os.path.join(tmp, "store3")
    os.makedirs(os.path.join(store3, "models"))
    with open(os.path.join(store3, "models", "test-patients.txt"), "w") as f:
        f.write("# frozen by another data set\nNOT-IN-THIS-DATA-1\nNOT-IN-THIS-DATA-2\n")
    r = run(*train_args(data, os.path.join(tmp, "ap3.safetensors"), os.path.join(tmp, "ap3.work"),
                        seed=3, epochs1=1, epochs2=1, spe=64),
            "--auto-promote", "--set", "store.dir=" + store3)
    check(r.returncode == 0 and "kept the active model (no test patients" in r.stdout and
          not os.path.exists(os.path.join(store3, "models", "active.safetensors")) and
          re.search(r"event=train_data .* test=0/", r.stderr) is not None,
          "no frozen patient in the data: registered, not promoted: " + r.stdout.strip())

    if FAILS:
        print(f"{len(FAILS)} check(s) failed")
        sys.exit(1)
    subprocess.run(["rm", "-rf", tmp])
    print("all checks passed")


if __name__ == "__main__":
    main()
