"""What checking a DICOM series for SEG output before any model loads costs (issue 33), and whether the SEG
written from a scanner-like series is valid for dciodvfy.

A scanner-like MR series (slice step (0, 0, 3) mm not along the normal (0, 0.005236, 0.999986), files in
shuffled order) is written with pydicom; then, timed: read_volume, dicom_seg.prepare (slice matching along
the normal + a SEG built in memory with empty masks: what `segment`/`predict` now do before loading
models), and write_dicom_seg with a real mask. dciodvfy (dicom3tools) checks the written SEG; where it is
not installed the check is skipped with that reason.

    python -m benchmarks.dicom_seg_check [--slices 60] [--size 256] [--json F]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

NORMAL = np.array([0.0, 0.005236, 0.999986])
ROW = np.array([1.0, 0.0, 0.0])
STEP = np.array([0.0, 0.0, 3.0])


def write_series(folder, slices, size, seed=0):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    column = np.cross(NORMAL, ROW)
    for k, name in enumerate(rng.permutation(slices)):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Mark", "B1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer, ds.Modality = "", "SIEMENS", "MR"
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.ImagePositionPatient = [f"{v:.6g}" for v in np.array([-100.0, -120.0, 0.0]) + k * STEP]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*ROW, *column)]
        ds.PixelSpacing, ds.SliceThickness = ["0.9", "0.9"], "3"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = rng.integers(0, 1000, (size, size)).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{name:05d}", enforce_file_format=True)


def dciodvfy(path):
    tool = shutil.which("dciodvfy")
    if tool is None:
        return {"skipped": "dciodvfy (dicom3tools) is not installed: apt-get install -y dicom3tools"}
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=300)
    lines = (done.stdout + done.stderr).splitlines()
    return {"errors": [ln for ln in lines if ln.startswith("Error")],
            "warnings": [ln for ln in lines if ln.startswith("Warning")]}


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args()

    from MedCLIPSAMLib.io import read_volume
    from MedCLIPSAMLib.io import dicom_seg

    import highdicom  # noqa: F401  imported before timing: its import is not the check's cost

    with tempfile.TemporaryDirectory(prefix="medclipsam-bench-") as tmp:
        folder = Path(tmp) / "series"
        write_series(folder, args.slices, args.size)
        times = {}
        start = time.perf_counter()
        image = read_volume(str(folder))
        times["read_volume"] = time.perf_counter() - start
        start = time.perf_counter()
        sources = dicom_seg.prepare(str(folder), image, ["brain tumor"])
        times["prepare (match + in-memory SEG)"] = time.perf_counter() - start
        mask = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
        mask[args.slices // 3: 2 * args.slices // 3, 60:120, 80:140] = 1
        out = Path(tmp) / "out.dcm"
        start = time.perf_counter()
        dicom_seg.write_dicom_seg(out, [{"name": "brain tumor", "mask": mask}], image, str(folder), "benchmark",
                                  {"clip": "none"}, sources=sources)
        times["write_dicom_seg"] = time.perf_counter() - start
        check = dciodvfy(out)
    record = {"slices": args.slices, "size": args.size, "seconds": {k: round(v, 3) for k, v in times.items()},
              "dciodvfy": check, "cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{args.slices} slices of {args.size}x{args.size}, {record['cpu']}, load {record['load_average'][0]:.1f}")
    for name, seconds in times.items():
        print(f"  {name:<34} {seconds:8.3f} s")
    print("  dciodvfy: " + (check["skipped"] if "skipped" in check else
                            f"{len(check['errors'])} errors, {len(check['warnings'])} warnings"))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
