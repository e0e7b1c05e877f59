#!/usr/bin/python3
"""Generates synthetic DICOM series for the integration tests and benchmarks.

A head-shaped phantom (skull ring, brain, a little noise) per slice, fresh UIDs,
one series per call. Uncompressed syntaxes are written by pydicom; deflated and
the compressed syntaxes are produced with dcmtk's own converters so that the
file's dataset is byte for byte what dcmtk's storescu sends (storescu re-encodes
what it reads; dcmtk writing dcmtk-encoded data is the fixed point).

    gen_ct.py OUTDIR [--count N] [--rows R] [--cols C] [--ts NAME] [--sop ct|mr|sc]

Importable: generate(outdir, ...) returns the list of written paths.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

SOP_CLASSES = {
    "ct": "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "mr": "1.2.840.10008.5.1.4.1.1.4",      # MR Image Storage
    "sc": "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture Image Storage
    "enhanced-ct": "1.2.840.10008.5.1.4.1.1.2.1",  # one multi-frame instance
}

# name -> (transfer syntax UID, how it is made)
TRANSFER_SYNTAXES = {
    "implicit": ("1.2.840.10008.1.2", None),
    "explicit": ("1.2.840.10008.1.2.1", None),
    "bigendian": ("1.2.840.10008.1.2.2", None),
    "deflated": ("1.2.840.10008.1.2.1.99", ["dcmconv", "+td", "+cl", "6"]),
    "rle": ("1.2.840.10008.1.2.5", ["dcmcrle"]),
    "jpegls": ("1.2.840.10008.1.2.4.80", ["dcmcjpls", "+el"]),
    "jpeg-lossless": ("1.2.840.10008.1.2.4.70", ["dcmcjpeg", "+e1"]),
    "jpeg-lossless-p14": ("1.2.840.10008.1.2.4.57", ["dcmcjpeg", "+el"]),
    "jpeg-extended": ("1.2.840.10008.1.2.4.51", ["dcmcjpeg", "+ee"]),  # 12-bit lossy
    "jpeg-baseline": ("1.2.840.10008.1.2.4.50", ["dcmcjpeg", "+eb"]),  # 8-bit data only
}

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses


def _phantom(rows, cols, index, count, bits, rng):
    """Stored values of one slice: air, a skull ring, brain, mild noise."""
    y, x = np.ogrid[:rows, :cols]
    cy, cx = rows / 2.0, cols / 2.0
    # The head grows then shrinks along the series, as an axial stack does.
    scale = 0.30 + 0.12 * np.sin(np.pi * (index + 0.5) / max(count, 1))
    r = np.sqrt(((y - cy) / rows) ** 2 + ((x - cx) / cols) ** 2)
    if bits == 8:
        img = np.where(r < scale, 90, 0) + np.where((r > scale - 0.03) & (r < scale), 160, 0)
        img = img + rng.integers(0, 4, size=(rows, cols))
        return np.clip(img, 0, 255).astype(np.uint8)
    # 12 bits stored, intercept -1024: air 0, brain ~1064 (40 HU), bone ~2024
    img = np.where(r < scale, 1064, 24) + np.where((r > scale - 0.03) & (r < scale), 960, 0)
    img = img + rng.integers(-8, 9, size=(rows, cols))
    return np.clip(img, 0, 4095).astype(np.uint16)


def _base_dataset(sop, rows, cols, bits, study_uid, series_uid, frame_uid, patient_id):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = SOP_CLASSES[sop]
    ds.StudyDate = "20260101"
    ds.SeriesDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC" + patient_id[-6:]
    ds.Modality = {"ct": "CT", "enhanced-ct": "CT", "mr": "MR", "sc": "OT"}[sop]
    if sop == "sc":
        ds.ConversionType = "WSD"
    ds.Manufacturer = "ichtriage-tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "HEAD WO CONTRAST"
    ds.SeriesDescription = "AXIAL 5MM"
    ds.PatientName = "TEST^PHANTOM"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    if sop == "ct":
        ds.SliceThickness = "5"
        ds.KVP = "120"
    if sop == "mr":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTrainLength = "1"
        ds.SliceThickness = "5"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = "2"
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = ["0.488281", "0.488281"]
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = 8 if bits == 8 else 12
    ds.HighBit = 7 if bits == 8 else 11
    ds.PixelRepresentation = 0
    if sop == "ct":
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    return ds


def _enhanced_ct(base, frames, rows, cols, bits, rng):
    """Turns base into a minimal Enhanced CT Image of frames axial frames:
    shared and per-frame functional groups (pixel measures, orientation,
    rescale; plane position and frame content per frame)."""
    from pydicom.sequence import Sequence
    ds = base
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    for k in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness", "WindowCenter",
              "WindowWidth", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        if k in ds:
            delattr(ds, k)
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20260101120000"
    ds.NumberOfFrames = str(frames)
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    measures, orient, rescale, shared = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = ["0.488281", "0.488281"]
    measures.SliceThickness = "5"
    orient.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    rescale.RescaleIntercept = "-1024"
    rescale.RescaleSlope = "1"
    rescale.RescaleType = "HU"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame, pixels = [], []
    for i in range(frames):
        pos, content, item = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = ["-125", "-125", "%g" % (-100.0 + 5.0 * i)]
        content.InStackPositionNumber = i + 1
        content.StackID = "1"
        item.PlanePositionSequence = Sequence([pos])
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
        pixels.append(_phantom(rows, cols, i, frames, bits, rng))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds, np.stack(pixels)


def generate(outdir, count=200, rows=512, cols=512, ts="explicit", sop="ct",
             study_uid=None, series_uid=None, patient_id=None, seed=None, bits=None):
    """Writes count instances of one new series into outdir (created if
    needed) and returns their paths in slice order. Names are NNNNN.dcm.
    With sop="enhanced-ct" it writes one multi-frame instance of count
    frames instead."""
    if ts not in TRANSFER_SYNTAXES:
        raise ValueError("unknown transfer syntax %r" % ts)
    if bits is None:
        bits = 8 if ts == "jpeg-baseline" else 16
    ts_uid, converter = TRANSFER_SYNTAXES[ts]
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    patient_id = patient_id or "PAT%06d" % int(rng.integers(0, 10**6))
    base = _base_dataset(sop, rows, cols, bits, study_uid, series_uid, frame_uid, patient_id)
    # Uncompressed ones are written directly; the others start as explicit LE.
    write_ts = ts_uid if converter is None else "1.2.840.10008.1.2.1"
    workdir = outdir if converter is None else tempfile.mkdtemp(prefix="gen_ct.", dir=outdir)
    paths = []
    try:
        for i in range(count if sop != "enhanced-ct" else 1):
            ds = base.copy()
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = str(i + 1)
            z = -100.0 + 5.0 * i
            ds.ImagePositionPatient = ["-125", "-125", "%g" % z]
            ds.SliceLocation = "%g" % z
            if sop == "enhanced-ct":
                for k in ("ImagePositionPatient", "SliceLocation"):
                    delattr(ds, k)
                ds, pixels = _enhanced_ct(ds, count, rows, cols, bits, rng)
            else:
                pixels = _phantom(rows, cols, i, count, bits, rng)
            ds.PixelData = pixels.tobytes()
            ds["PixelData"].VR = "OB" if bits == 8 else "OW"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = write_ts
            meta.ImplementationClassUID = UID_ROOT + "1"
            ds.file_meta = meta
            ds.is_little_endian = write_ts != "1.2.840.10008.1.2.2"
            ds.is_implicit_VR = write_ts == "1.2.840.10008.1.2"
            if write_ts == "1.2.840.10008.1.2.2" and bits != 8:
                ds.PixelData = pixels.astype(">u2").tobytes()
            ds.preamble = b"\0" * 128
            path = os.path.join(workdir, "%05d.dcm" % (i + 1))
            pydicom.dcmwrite(path, ds, write_like_original=False)
            paths.append(path)
        if converter is not None:
            out = []
            for p in paths:
                dst = os.path.join(outdir, os.path.basename(p))
                subprocess.run(converter + [p, dst], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                out.append(dst)
            paths = out
    finally:
        if workdir != outdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return paths


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--ts", default="explicit", choices=sorted(TRANSFER_SYNTAXES))
    ap.add_argument("--sop", default="ct", choices=sorted(SOP_CLASSES))
    ap.add_argument("--study-uid")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    paths = generate(args.outdir, args.count, args.rows, args.cols, args.ts, args.sop,
                     study_uid=args.study_uid, seed=args.seed)
    print("%d files in %s" % (len(paths), args.outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
