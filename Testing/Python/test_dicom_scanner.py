"""DICOM written the way scanners write it (issue 33): a slice step that is not exactly along the slice
normal (step (0, 0, 3) mm, normal (0, 0.005236, 0.999986)), files in shuffled order, several series in one
folder, and a SEG and an RT Structure Set (pydicom's own test files) beside the images.

- segment / predict write a DICOM SEG from such a folder; its frames reference the right instances and it is
  valid for dciodvfy (dicom3tools; skipped with the reason where it is not installed);
- a series a SEG cannot reference is refused before any model loads;
- a non-image object (SEG, RTSTRUCT, SR, RT plan) is refused in one sentence, as a file and as a folder, and a
  folder with several series says which it read and which it skipped.
"""

import contextlib
import io
import logging
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import read_volume

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.data import get_testdata_file  # noqa: E402

NORMAL = np.array([0.0, 0.005236, 0.999986])          # a Siemens MR series' slice normal (issue 33)
ROW = np.array([1.0, 0.0, 0.0])
COLUMN = np.cross(NORMAL, ROW)                         # (0, 0.999986, -0.005236): row x column = normal
STEP = np.array([0.0, 0.0, 3.0])                       # what the scanner wrote between slices: not along NORMAL


def write_scanner_series(folder, slices, step=STEP, seed=0, series_number=3, description="t1_tse_tra",
                         rows=24, columns=20, frame_of_reference=True):
    """One MR Image Storage file per slice as a scanner writes them: positions origin + k * step, orientation
    with 6 decimals, files named in an order unrelated to the slices. Returns the SOP Instance UIDs by slice."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = "1.2.826.0.1.3680043.8.498.1", generate_uid(), "1.2.826.0.1.3680043.8.498.2"
    order = rng.permutation(slices) + 100 * series_number
    uids = []
    for k in range(slices):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Scanner^Phantom", "SC0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "SIEMENS"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "MR", series_number, k + 1, description
        ds.ImagePositionPatient = [f"{v:.6g}" for v in np.array([-12.0, -10.0, 40.0]) + k * np.asarray(step)]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*ROW, *COLUMN)]
        ds.PixelSpacing, ds.SliceThickness = ["0.9", "0.8"], "3"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        yy, xx = np.mgrid[:rows, :columns]
        blob = ((yy - rows / 2) ** 2 + (xx - columns / 2 - k) ** 2 < (rows / 4) ** 2)
        ds.PixelData = (100 + 800 * blob + rng.integers(0, 20, blob.shape)).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{order[k]:05d}", enforce_file_format=True)   # no extension, as scanners do
        uids.append(uid)
    return uids


def part10(name, target):
    """A pydicom test file saved as a Part 10 file (rtstruct.dcm ships without a file meta header)."""
    ds = pydicom.dcmread(get_testdata_file(name), force=True)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ImplicitVRLittleEndian

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture(scope="module")
def scanner(tmp_path_factory):
    """A folder as a PACS export gives it: the main series (3 slices), a 2-slice localizer series, a SEG and
    an RT Structure Set."""
    root = tmp_path_factory.mktemp("scanner")
    folder = root / "study"
    uids = write_scanner_series(folder, 3)
    write_scanner_series(folder, 2, series_number=1, description="localizer", seed=1)
    shutil.copy(get_testdata_file("liver_1frame.dcm"), folder / "SEG00001")
    part10("rtstruct.dcm", folder / "RS00001")
    return {"root": root, "folder": folder, "uids": uids}


def run_cli(argv):
    """(exit code, stderr lines, log records) of one command line."""
    err, records = io.StringIO(), []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("medclipsam").addHandler(handler)
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        logging.getLogger("medclipsam").removeHandler(handler)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()], records


def frame_instances(path):
    """{referenced SOP Instance UID: (frame position, mask)} of a DICOM SEG's frames (one segment)."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out = {}
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        out[uid] = (position, pixels[f])
    return out


def dciodvfy_errors(path):
    """dciodvfy's 'Error' lines for a file; skip the test with the reason where dicom3tools is absent."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: apt-get install -y dicom3tools")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def test_segment_writes_a_valid_seg_from_a_sheared_shuffled_series(scanner, tmp_path):
    folder = scanner["folder"]
    common = ["segment", str(folder), "--prompt", "brain tumor", "--models", "tiny-random", "--sam", "none",
              "--preset", "fast", "--device", "cpu", "--progress", "none", "--no-gate", "--min-size-mm3", "0",
              "--set", "body_only=false"]
    code, err, records = run_cli(common + ["--output", str(tmp_path / "out.dcm")])
    assert code == 0, err
    # each frame references the instance written at that slice (same position), and the masks lie on the
    # slices the volume has them on: the volume's slice k is instance k whatever the file order
    frames = frame_instances(tmp_path / "out.dcm")
    assert frames and set(frames) <= set(scanner["uids"])
    volume = sitk.GetArrayFromImage(read_volume(str(scanner["folder"])))
    for k, uid in enumerate(scanner["uids"]):
        if uid in frames:
            position, pixels = frames[uid]
            np.testing.assert_allclose(position, np.array([-12.0, -10.0, 40.0]) + k * STEP, atol=1e-4)
            assert pixels.shape == volume[k].shape and pixels.any()
    assert dciodvfy_errors(tmp_path / "out.dcm") == []
    # the folder's other objects were named, and which series was read
    said = [r for r in records if "holds 4 DICOM series: reading series" in r]
    assert len(said) == 1
    assert "(MR, 't1_tse_tra', 3 file(s))" in said[0].split("; skipped")[0]
    skipped = said[0].split("; skipped ", 1)[1]
    assert "(SEG, 'Liver Segmentation', 1 file(s)): a DICOM Segmentation (SEG), not an image" in skipped
    assert "1 file(s) holding a DICOM RT Structure Set (RTSTRUCT), not an image" in skipped
    assert "(MR, 'localizer', 2 file(s)): fewer files" in skipped


def test_a_series_a_seg_cannot_reference_is_refused_before_models_load(tmp_path):
    folder = tmp_path / "noframe"
    write_scanner_series(folder, 2, frame_of_reference=False)
    # a model name that does not exist: had the models been loaded first, that would be the error
    code, err, _ = run_cli(["segment", str(folder), "--prompt", "brain tumor", "--models", "no-such,models",
                            "--device", "cpu", "--progress", "none", "--output", str(tmp_path / "x.dcm")])
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"medclipsam: error: a DICOM SEG cannot reference the series in '{folder}': ")
    assert err[0].endswith("Source images have no Frame Of Reference UID, but it is required by the IOD.")
    assert not (tmp_path / "x.dcm").exists()


def test_slice_matching_is_along_the_normal_with_a_relative_tolerance(tmp_path):
    from MedCLIPSAMLib.io.dicom_seg import source_datasets

    folder = tmp_path / "tall"
    uids = write_scanner_series(folder, 12, rows=8, columns=8)   # 12 slices: 0.17 mm in-plane drift at the end
    image = read_volume(str(folder))
    assert [ds.SOPInstanceUID for ds in source_datasets(str(folder), image)] == uids
    # a volume whose slices lie half a spacing off matches nothing, in one sentence
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(np.array(image.GetOrigin()) + 1.5 * NORMAL))
    from MedCLIPSAMLib.errors import MedCLIPSAMError

    with pytest.raises(MedCLIPSAMError, match=r"^slice 0 of the volume matches no instance of the DICOM series in "
                                              r".*\(nearest 1\.5 mm along the slice normal, tolerance 0\.3 mm"):
        source_datasets(str(folder), shifted)


@pytest.mark.parametrize("name, kind", [("liver_1frame.dcm", "a DICOM Segmentation (SEG)"),
                                        ("rtstruct.dcm", "a DICOM RT Structure Set (RTSTRUCT)"),
                                        ("test-SR.dcm", "a DICOM Structured Report (SR) or Key Object Selection (KO)"),
                                        ("rtplan.dcm", "a DICOM RT Plan (RTPLAN)"),
                                        # a dose grid has pixels (GDCM reads it) but is no picture of anatomy
                                        ("rtdose.dcm", "a DICOM RT Dose (RTDOSE)")])
def test_a_non_image_object_is_refused_as_a_file_and_as_a_folder(tmp_path, name, kind):
    single = part10(name, tmp_path / name)
    code, err, _ = run_cli(["segment", str(single), "--prompt", "liver", "--models", "tiny-random", "--device", "cpu",
                            "--progress", "none", "--output", str(tmp_path / "a.seg.nrrd")])
    assert code == 2 and err == [f"medclipsam: error: '{single}' is {kind}, not an image; give the image (or DICOM "
                                 "image series) it refers to"]
    folder = tmp_path / "only"
    folder.mkdir()
    part10(name, folder / "OBJ00001")
    code, err, _ = run_cli(["segment", str(folder), "--prompt", "liver", "--models", "tiny-random", "--device", "cpu",
                            "--progress", "none", "--output", str(tmp_path / "b.seg.nrrd")])
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"medclipsam: error: folder '{folder}' holds no DICOM image series (it holds ")
    assert f"{kind}, not an image); give a volume file or a folder of DICOM images" in err[0]
    assert not (tmp_path / "a.seg.nrrd").exists() and not (tmp_path / "b.seg.nrrd").exists()


def test_highdicom_warnings_about_the_scanners_values_do_not_reach_the_user(tmp_path):
    import warnings

    from MedCLIPSAMLib.io.dicom_seg import prepare

    folder = tmp_path / "dft"
    write_scanner_series(folder, 2, rows=8, columns=8)
    for f in folder.iterdir():     # a one-component patient name, as some scanners write it
        ds = pydicom.dcmread(f)
        ds.PatientName = "dft"
        ds.save_as(f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(str(folder), read_volume(str(folder)))
    assert [str(w.message) for w in caught] == []


def test_nnunet_notes_go_to_the_debug_log_not_the_terminal(capsys, caplog):
    pytest.importorskip("nnunetv2")
    import torch

    from MedCLIPSAMLib.training.nnunet import quiet_prints

    with caplog.at_level(logging.DEBUG, logger="medclipsam"), quiet_prints():
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor   # its import-time notes too

        # nnU-Net's own note (printed on stdout) when asked to run on the device with a CPU
        nnUNetPredictor(perform_everything_on_device=True, device=torch.device("cpu"), allow_tqdm=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert "nnU-Net: perform_everything_on_device=True is only supported for cuda devices!" in caplog.text


def test_a_model_trained_on_random_weight_pseudo_labels_says_so_in_every_output(scanner, tmp_path):
    """pseudo-label (tiny random models) -> train-weak -> predict on the scanner folder: the DICOM SEG and the
    .seg.nrrd say 'trained model' and random_weights=yes, and the SEG is valid and on the right instances."""
    from MedCLIPSAMLib.io import write_volume
    from MedCLIPSAMLib.phantoms import make_volume

    images = tmp_path / "images"
    images.mkdir()
    for i in range(1):
        write_volume(images / f"mr_{i}.nrrd", make_volume("mr", shape=(4, 24, 20), seed=i).image)
    assert run_cli(["pseudo-label", str(images), "--prompt", "brain tumor", "--models", "tiny-random", "--preset",
                    "fast", "--sam", "none", "--no-gate", "--device", "cpu", "--progress", "none", "--output-dir",
                    str(tmp_path / "pl")])[0] == 0
    model = tmp_path / "model"
    assert run_cli(["train-weak", "--images", str(images), "--labels", str(tmp_path / "pl" / "labels.txt"),
                    "--output", str(model), "--epochs", "1", "--snapshots", "1", "--batch-size", "2",
                    "--base-filters", "4", "--samples-per-epoch", "2", "--val-fraction", "0", "--device", "cpu",
                    "--progress", "none"])[0] == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, err, _ = run_cli(["predict", str(model), str(scanner["folder"]), "--output", str(tmp_path / "p.dcm"),
                                "--threshold", "0.01", "--device", "cpu", "--progress", "none"])
    assert code == 0, err
    assert out.getvalue().startswith("TRAINED ON PSEUDO-LABELS OF RANDOM-WEIGHT MODELS (meaningless output): wrote ")
    ds = pydicom.dcmread(tmp_path / "p.dcm")
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "MedCLIP-SAM trained model (dynunet)"
    params = dict(p.split("=", 1) for p in algorithm.AlgorithmParameters.split(","))
    assert params == {"model": "model", "trainer": "dynunet", "labels": "pseudo-labels",
                      "pseudo_label_clip": "tiny-random", "pseudo_label_sam": "none",
                      "pseudo_label_preset": "fast", "random_weights": "yes"}
    assert ds.ContentDescription == "TRAINED MODEL, RANDOM-WEIGHT PSEUDO-LABELS, NOT A RESULT"
    for uid, (position, _) in frame_instances(tmp_path / "p.dcm").items():
        k = scanner["uids"].index(uid)
        np.testing.assert_allclose(position, np.array([-12.0, -10.0, 40.0]) + k * STEP, atol=1e-4)
    assert dciodvfy_errors(tmp_path / "p.dcm") == []
    # the .seg.nrrd carries the same provenance in its header
    assert run_cli(["predict", str(model), str(scanner["folder"]), "--output", str(tmp_path / "p.seg.nrrd"),
                    "--device", "cpu", "--progress", "none"])[0] == 0
    import slicerio

    header = slicerio.read_segmentation(str(tmp_path / "p.seg.nrrd"), skip_voxels=True)
    assert {k: header.get(k) for k in ("MedCLIPSAM_method", "MedCLIPSAM_random_weights", "MedCLIPSAM_description")} \
        == {"MedCLIPSAM_method": "MedCLIP-SAM trained model (dynunet)", "MedCLIPSAM_random_weights": "yes",
            "MedCLIPSAM_description": "trained model, on pseudo-labels"}
