#!/usr/bin/python3
"""`ichtriage phantom` from the outside: option errors, then a small run
checked with pydicom, dcmdump and dciodvfy, the label CSV against the files,
the study summary against the labels, the preview PNGs, how dense its
subarachnoid blood is, and a disk that fills up during a run.

usage: check_phantom.py ICHTRIAGE"""
import csv
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict

import pydicom

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
from checks import small_tmpfs  # noqa: E402

LABELS = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
EXE = sys.argv[1]


def phantom(*args):
    return subprocess.run([EXE, "phantom", *args], capture_output=True, text=True, timeout=300)


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def interrupted(out):
    """A run killed halfway leaves no CSV that looks like data (they are
    .part until every study is written), and a new run into its folder is
    refused with a clear message rather than mixed with it."""
    p = subprocess.Popen([EXE, "phantom", "--seed", "5", "-n", "200", "--size", "64", out],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = os.path.join(out, "stage_2_train")
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not (
            os.path.isdir(files) and len(os.listdir(files)) > 10):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    check(p.returncode == -signal.SIGKILL, "the run was killed halfway")
    for name in ("stage_2_train.csv", "studies.csv", "lesions.csv"):
        check(not os.path.exists(os.path.join(out, name)),
              f"an interrupted run left {name}, which looks complete")
    check(os.path.exists(os.path.join(out, "stage_2_train.csv.part")),
          "an interrupted run leaves its labels as .part")
    r = phantom("-n", "1", out)
    check(r.returncode == 1 and "interrupted" in r.stderr,
          f"a run into an interrupted run's folder: exit {r.returncode}, {r.stderr!r}")


def bad_options(tmp):
    cases = [
        (["--count", "0", tmp], "--count"),
        (["--count", "ten", tmp], "--count"),
        (["--prevalence", "1.5", tmp], "--prevalence"),
        (["--subtype", "stroke=0.5", tmp], "--subtype"),
        (["--subtype", "subdural=x", tmp], "--subtype"),
        (["--slices", "0", tmp], "--slices"),
        (["--slices", "30-10", tmp], "--slices"),
        (["--thickness", "20", tmp], "--thickness"),
        (["--size", "16", tmp], "--size"),
        (["--noise", "-2", tmp], "--noise"),
        (["--seed", "-3", tmp], "--seed"),
        (["--omit-blood", "any", tmp], "--omit-blood"),
        (["--sizes", "1,1,1", tmp], "--sizes"),
        (["--sizes", "1,1,1,1,1", tmp], "--sizes"),
        (["--sizes", "0,0,0,0", tmp], "--sizes"),
        (["--sizes", "-1,1,1,1", tmp], "--sizes"),
        (["--sizes", "1,,1,1", tmp], "--sizes"),
        (["--sizes", "a,b,c,d", tmp], "--sizes"),
        ([*(f"--subtype={n}=0" for n in LABELS[1:]), tmp], "needs a subtype"),
        (["--frobnicate", tmp], "unknown option"),
        (["--seed"], "needs a value"),
        ([], "OUTDIR is required"),
        ([tmp, tmp + "2"], "exactly one OUTDIR"),
    ]
    for args, needle in cases:
        r = phantom(*args)
        check(r.returncode == 2, f"{args}: exit {r.returncode}, expected 2")
        check(needle in r.stderr, f"{args}: stderr lacks {needle!r}: {r.stderr!r}")
        check(not os.path.exists(os.path.join(tmp, "stage_2_train.csv")),
              f"{args}: wrote output despite the error")
    r = phantom("-n", "1", "/proc/no/such/dir")
    check(r.returncode == 1 and "ichtriage phantom:" in r.stderr,
          f"unwritable OUTDIR: exit {r.returncode}, {r.stderr!r}")
    r = phantom("--help")
    check(r.returncode == 0 and "--seed" in r.stdout and "--preview" in r.stdout, "--help")


# outline colours of the preview, in subtype order (train/phantom_png.c)
COLOURS = [(255, 40, 40), (255, 230, 0), (0, 220, 255), (40, 255, 40), (255, 60, 255)]


def png_colours(path):
    """The set of RGB colours of an 8-bit RGB, non-interlaced PNG."""
    with open(path, "rb") as f:
        data = f.read()
    check(data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG")
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            check(depth == 8 and ctype == 2, f"{path}: not 8-bit RGB")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride = zlib.decompress(idat), 3 * w
    prev, colours = bytearray(stride), set()
    for y in range(len(raw) // (stride + 1)):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b = prev[i]
            c = prev[i - 3] if i >= 3 else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        colours.update(zip(line[0::3], line[1::3], line[2::3]))
        prev = line
    return colours


TYPE1 = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
         "FrameOfReferenceUID", "ImageType", "PixelSpacing", "ImageOrientationPatient",
         "ImagePositionPatient", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
         "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
         "RescaleIntercept", "RescaleSlope", "PixelData", "SpecificCharacterSet"]
TYPE2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber",
         "PositionReferenceIndicator", "Manufacturer", "InstanceNumber", "SliceThickness",
         "KVP", "AcquisitionNumber", "PatientPosition"]
UID = re.compile(r"^2\.25\.[1-9][0-9]*$")


def check_run(out, count):
    files = sorted(os.listdir(os.path.join(out, "stage_2_train")))
    check(len(files) >= count * 12, f"only {len(files)} files")
    series = defaultdict(list)
    study_of = {}
    for name in files:
        ds = pydicom.dcmread(os.path.join(out, "stage_2_train", name))
        for kw in TYPE1:
            check(kw in ds and ds.data_element(kw).value not in (None, ""), f"{name}: {kw}")
        for kw in TYPE2:
            check(kw in ds, f"{name}: Type 2 {kw} missing")
        check(ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2", f"{name}: not CT Image Storage")
        check(name == f"ID_{ds.SOPInstanceUID}.dcm", f"{name}: named after another SOP UID")
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                    ds.FrameOfReferenceUID):
            check(len(uid) <= 64 and UID.match(uid), f"{name}: bad UID {uid}")
        check(float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1,
              f"{name}: rescale")
        check(abs(float(ds.SliceLocation) - float(ds.ImagePositionPatient[2])) < 1e-3,
              f"{name}: SliceLocation")
        check(ds.pixel_array.shape == (ds.Rows, ds.Columns), f"{name}: pixel data shape")
        series[ds.SeriesInstanceUID].append(ds)
        study_of[ds.SOPInstanceUID] = ds.StudyInstanceUID
    check(len(series) == count, f"{len(series)} series, {count} expected")
    for uid, items in series.items():
        items.sort(key=lambda d: int(d.InstanceNumber))
        check([int(d.InstanceNumber) for d in items] == list(range(1, len(items) + 1)),
              f"series {uid}: instance numbers")
        t = float(items[0].SliceThickness)
        z = [float(d.ImagePositionPatient[2]) for d in items]
        for a, b in zip(z, z[1:]):
            check(abs((b - a) - t) < 1e-3, f"series {uid}: spacing {b - a} != thickness {t}")
        for kw in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate",
                   "FrameOfReferenceUID", "AccessionNumber"):
            check(len({str(d.data_element(kw).value) for d in items}) == 1,
                  f"series {uid}: {kw} varies")
        first = os.path.join(out, "stage_2_train", f"ID_{items[0].SOPInstanceUID}.dcm")
        r = subprocess.run(["dciodvfy", first], capture_output=True, text=True)
        errors = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("Error")]
        check(not errors, f"dciodvfy: {errors[:5]}")
        r = subprocess.run(["dcmdump", "-q", first], capture_output=True, text=True)
        check(r.returncode == 0 and "ImagePositionPatient" in r.stdout, "dcmdump")

    # labels: six rows per image, in the project's order, for exactly these files
    with open(os.path.join(out, "stage_2_train.csv")) as f:
        rows = list(csv.reader(f))
    check(rows[0] == ["ID", "Label"], "label CSV header")
    rows = rows[1:]
    check(len(rows) == 6 * len(files), "six label rows per image")
    per_study = defaultdict(lambda: [0] * 6)
    images = set()
    for i in range(0, len(rows), 6):
        group = rows[i:i + 6]
        image = group[0][0][: -len("_any")]
        for k, (rid, value) in enumerate(group):
            check(rid == f"{image}_{LABELS[k]}", f"row {rid}: expected {LABELS[k]}")
            check(value in ("0", "1"), f"row {rid}: value {value}")
        values = [int(v) for _, v in group]
        check(values[0] == max(values[1:]), f"{image}: any is not the OR of the subtypes")
        images.add(image + ".dcm")
        study = study_of[image[len("ID_"):]]
        for k in range(6):
            per_study[study][k] += values[k]
    check(images == set(files), "label rows and files do not match")

    # --masks: a grey 8-bit PNG of the slice's size for exactly the images
    # with a positive label (test_phantom checks their pixels)
    positive = {rows[i][0][: -len("_any")] for i in range(0, len(rows), 6) if rows[i][1] == "1"}
    masks = sorted(os.listdir(os.path.join(out, "masks")))
    check({m[: -len(".png")] for m in masks} == positive,
          f"{len(masks)} masks for {len(positive)} images with a positive label")
    for m in masks:
        with open(os.path.join(out, "masks", m), "rb") as f:
            head = f.read(26)
        w, h = struct.unpack(">II", head[16:24])
        ds = pydicom.dcmread(os.path.join(out, "stage_2_train", m[: -len(".png")] + ".dcm"),
                             stop_before_pixels=True)
        check(head[:8] == b"\x89PNG\r\n\x1a\n" and (w, h) == (ds.Columns, ds.Rows)
              and head[24:26] == b"\x08\x00", f"{m}: not an 8-bit grey PNG of the slice's size")

    with open(os.path.join(out, "studies.csv")) as f:
        studies = list(csv.DictReader(f))
    check(len(studies) == count, "one summary row per study")
    for s in studies:
        counted = [int(s[name]) for name in LABELS]
        check(counted == per_study[s["study_uid"]],
              f"study {s['study_uid']}: summary {counted} != labels {per_study[s['study_uid']]}")
        check(int(s["slices"]) == len(series[s["series_uid"]]), "summary slice count")
    check(any(v[0] > 0 for v in per_study.values()), "no positive slice at all")

    # previews: one per study; each subtype's outline colour is there when the
    # study has slices positive for it, and absent when it has no such lesion
    with open(os.path.join(out, "lesions.csv")) as f:
        placed = defaultdict(set)
        for row in csv.DictReader(f):
            placed[row["study_uid"]].add(row["subtype"])
    pngs = sorted(os.listdir(os.path.join(out, "preview")))
    check(len(pngs) == count, f"{len(pngs)} previews")
    for s in studies:
        name = f"{int(s['index']):06d}_{s['study_uid']}.png"
        check(name in pngs, f"no preview {name}")
        colours = png_colours(os.path.join(out, "preview", name))
        for k, label in enumerate(LABELS[1:]):
            if int(s[label]) > 0:
                check(COLOURS[k] in colours, f"{name}: no {label} outline")
            elif label not in placed[s["study_uid"]] and not (
                    label == "intraventricular" and "intraparenchymal" in placed[s["study_uid"]]):
                check(COLOURS[k] not in colours, f"{name}: {label} outline without a lesion")


def hu(path):
    d = pydicom.dcmread(path)
    return d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)


def subarachnoid_blood_is_dense(tmp):
    """Acute subarachnoid blood replaces most of the CSF it reaches (the
    basal cisterns of an aneurysmal bleed turn white), thinning only at its
    edge. The blood's excess over the CSF it replaced, as the files show it
    (each study against the same study made with --omit-blood), through
    partial volume with the thin sulci it fills: for the bleeds above the
    tiny class, the median of their largest excess is at least 45 HU and the
    median of their 90th percentile at least 35 HU. (Generators that mixed
    30-100 % blood fading as 1 - q^2 from its centre gave 36 and 27 HU:
    blood at grey matter's density.)"""
    only = ["--subtype=subarachnoid=1", *(f"--subtype={n}=0" for n in LABELS[1:] if n != "subarachnoid")]
    common = ["--seed", "7", "-n", "16", "--size", "256", "--prevalence", "1", *only]
    ph, nb = os.path.join(tmp, "sah"), os.path.join(tmp, "sah-nb")
    for out, extra in ((ph, []), (nb, ["--omit-blood", ",".join(LABELS[1:])])):
        r = phantom(*common, *extra, out)
        check(r.returncode == 0, f"subarachnoid run failed: {r.stderr}")
    sizes = {}
    with open(os.path.join(ph, "lesions.csv")) as f:
        order = ["tiny", "small", "medium", "large"]
        for row in csv.DictReader(f):
            check(row["subtype"] == "subarachnoid", f"a {row['subtype']} lesion in a subarachnoid-only run")
            u = row["study_uid"]
            sizes[u] = max(sizes.get(u, 0), order.index(row["size"]))
    by_study = defaultdict(list)
    for name in sorted(os.listdir(os.path.join(ph, "stage_2_train"))):
        d = pydicom.dcmread(os.path.join(ph, "stage_2_train", name), stop_before_pixels=True)
        by_study[d.StudyInstanceUID].append(name)
    largest, p90 = [], []
    for u, names in by_study.items():
        if sizes.get(u, 0) == 0:
            continue
        ex = []
        for name in names:
            e = hu(os.path.join(ph, "stage_2_train", name)) - hu(os.path.join(nb, "stage_2_train", name))
            ex.extend(e[e >= 10].tolist())
        check(ex, f"study {u}: no blood of 10 HU or more")
        ex.sort()
        largest.append(ex[-1])
        p90.append(ex[int(0.9 * (len(ex) - 1))])
    check(len(largest) >= 8, f"only {len(largest)} subarachnoid bleeds above the tiny class")
    med_largest, med_p90 = statistics.median(largest), statistics.median(p90)
    check(med_largest >= 45, f"subarachnoid blood's largest excess: median {med_largest} HU < 45")
    check(med_p90 >= 35, f"subarachnoid blood's 90th percentile excess: median {med_p90} HU < 35")


def size_shares(tmp):
    """--sizes T,S,M,L sets the share of each lesion size class: all tiny,
    or all large, as lesions.csv records them, on the same heads with the
    same subtypes (the draws before the sizes are the same), and the default
    shares give both."""
    common = ["--seed", "11", "-n", "8", "--size", "128", "--slices", "16", "--prevalence", "1"]
    seen = {}
    for name, extra in (("tiny", ["--sizes", "1,0,0,0"]), ("large", ["--sizes", "0,0,0,2"]),
                        ("default", [])):
        out = os.path.join(tmp, "sizes-" + name)
        r = phantom(*common, *extra, out)
        check(r.returncode == 0, f"--sizes {extra}: {r.stderr}")
        with open(os.path.join(out, "lesions.csv")) as f:
            rows = list(csv.DictReader(f))
        check(rows, f"{name}: no lesions at prevalence 1")
        with open(os.path.join(out, "studies.csv")) as f:
            # the anatomy's mimics; streaks and motion are drawn after the lesions
            mimics = [(row["index"], [m for m in row["mimics"].split(";") if "=" not in m])
                      for row in csv.DictReader(f)]
        subtypes = sorted({(row["index"], row["subtype"]) for row in rows})
        seen[name] = ({row["size"] for row in rows}, (mimics, subtypes))
    check(seen["tiny"][0] == {"tiny"}, f"--sizes 1,0,0,0 gave sizes {seen['tiny'][0]}")
    check(seen["large"][0] == {"large"}, f"--sizes 0,0,0,2 gave sizes {seen['large'][0]}")
    check(len(seen["default"][0]) >= 2, f"the default shares gave only {seen['default'][0]}")
    check(seen["tiny"][1] == seen["large"][1] == seen["default"][1],
          "other size shares changed the studies' mimics or subtypes")


def disk_full(tmp):
    """A run into a disk that fills up stops with the system's reason, leaves
    no labels CSV that looks complete and no half-written DICOM file. Needs
    a 1 MB tmpfs (root, as in CI); skipped with a note where mount is not
    permitted."""
    mnt = os.path.join(tmp, "tiny")
    with small_tmpfs(mnt, 1, check, "disk_full") as mounted:
        if not mounted:
            return
        out = os.path.join(mnt, "ph")
        r = phantom("--seed", "3", "-n", "4", "--size", "128", out)
        check(r.returncode == 1 and "No space left on device" in r.stderr,
              f"a full disk: exit {r.returncode}, {r.stderr!r}")
        check(not os.path.exists(os.path.join(out, "stage_2_train.csv")),
              "a run stopped by a full disk left a labels CSV that looks complete")
        names = os.listdir(os.path.join(out, "stage_2_train"))
        check(names, "nothing was written before the disk filled")
        for name in names:
            d = pydicom.dcmread(os.path.join(out, "stage_2_train", name))
            check(len(d.PixelData) == 2 * d.Rows * d.Columns, f"{name}: written in part")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        disk_full(tmp)
        subarachnoid_blood_is_dense(tmp)
        size_shares(tmp)
        bad_options(os.path.join(tmp, "bad"))
        out = os.path.join(tmp, "run")
        r = phantom("--seed", "9", "-n", "3", "--size", "192", "--slices", "12-16",
                    "--prevalence", "0.8", "--preview", "--masks", out)
        check(r.returncode == 0, f"run failed: {r.stderr}")
        check_run(out, 3)
        r = phantom("-n", "1", out)
        check(r.returncode == 1 and "exists" in r.stderr,
              f"second run into one folder: exit {r.returncode}, {r.stderr!r}")
        check(not [f for f in os.listdir(out) if f.endswith(".part")],
              "a finished run leaves no .part files")
        interrupted(os.path.join(tmp, "killed"))
    print("ok")


if __name__ == "__main__":
    main()
