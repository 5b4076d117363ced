"""DICOM SEG output: an oblique, anisotropic DICOM series written slice by slice (files in shuffled order),
segmented, and read back with highdicom and pydicom: the masks lie on the right source frames, segments
carry their labels and SNOMED CT codes, the SEG references the source series, and a non-DICOM input is
refused with one sentence."""

import contextlib
import io

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, read_volume, write_volume
from MedCLIPSAMLib.phantoms import make_volume

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")


def write_series(image, folder, seed=0):
    """One MR Image Storage file per slice, written with pydicom from the image's exact LPS geometry."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir()
    array = sitk.GetArrayFromImage(image)
    scale = 1000.0 / max(1e-6, float(array.max()))
    pixels = np.round(array * scale).astype(np.int16)
    d = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(array.shape[0])   # file names unrelated to slice order
    uids = {}
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uids.setdefault(k, generate_uid())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uids[k]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Oblique", "PH0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "phantom"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]   # row (x) then column (y) axis
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]                              # between rows, then columns
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", f"{1.0 / scale:.10g}"
        ds.PixelData = pixels[k].tobytes()
        ds.save_as(folder / f"IM{order[k]:04d}.dcm", enforce_file_format=True)
    return [uids[k] for k in range(array.shape[0])], series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomseg")
    ph = make_volume("mr", shape=(6, 40, 36), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0),
                     direction="oblique", seed=2)
    uids, series_uid = write_series(ph.image, root / "series")
    return {"root": root, "phantom": ph, "uids": uids, "series_uid": series_uid}


def read_back(path, uids, segments):
    """(pydicom dataset, highdicom Segmentation, masks (slices, rows, cols, segments) per source instance)."""
    ds = pydicom.dcmread(path)
    seg = hd.seg.segread(path)
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=list(range(1, segments + 1)),
                                              assert_missing_frames_are_empty=True)
    return ds, seg, masks


def test_series_reads_back_on_the_phantom_grid(series):
    image = read_volume(str(series["root"] / "series"))
    assert geometry_equal(image, series["phantom"].image)


def test_writer_puts_each_mask_on_its_source_frame_with_codes(series, tmp_path):
    from MedCLIPSAMLib.io.dicom_seg import write_dicom_seg

    ph, folder = series["phantom"], series["root"] / "series"
    image = read_volume(str(folder))
    segments = [{"name": "brain", "mask": ph.labels["brain"]},
                {"name": "brain tumor", "mask": ph.labels["tumor"]},
                {"name": "odd blob", "mask": np.zeros_like(ph.labels["brain"])}]
    segments[2]["mask"][2, 5:9, 6:10] = 1      # one small patch on slice 2 only
    out = tmp_path / "result.dcm"
    write_dicom_seg(out, segments, image, str(folder), "MedCLIP-SAM zero-shot, preset v2",
                    {"clip": "biomedclip", "sam": "sam2.1-tiny"}, random=True)
    ds, seg, masks = read_back(out, series["uids"], 3)
    for i, s in enumerate(segments):
        np.testing.assert_array_equal(masks[..., i], s["mask"] > 0)
    # the frames it kept are exactly the non-empty ones, each referencing its own source instance
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series["series_uid"]
    kept = {(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
             int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)) for f in ds.PerFrameFunctionalGroupsSequence}
    expected = {(series["uids"][k], i + 1) for i, s in enumerate(segments) for k in range(6) if s["mask"][k].any()}
    assert kept == expected
    # labels and codes: SNOMED CT from the prompt ensembles, generic Tissue for an unknown prompt
    described = {int(d.SegmentNumber): d for d in ds.SegmentSequence}
    assert [described[i].SegmentLabel for i in (1, 2, 3)] == ["brain", "brain tumor", "odd blob"]
    codes = {i: (d.SegmentedPropertyCategoryCodeSequence[0].CodeValue, d.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                 d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for i, d in described.items()}
    assert codes == {1: ("123037004", "12738006", "SCT"), 2: ("49755003", "108369006", "SCT"),
                     3: ("85756007", "85756007", "SCT")}
    algorithm = described[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "MedCLIP-SAM zero-shot, preset v2"
    params = dict(p.split("=", 1) for p in algorithm.AlgorithmParameters.split(","))
    assert params == {"clip": "biomedclip", "sam": "sam2.1-tiny", "random_weights": "yes"}
    assert described[1].SegmentAlgorithmType == "AUTOMATIC"


def test_segment_cli_writes_the_same_masks_as_seg_nrrd(series, tmp_path):
    folder = series["root"] / "series"
    common = ["segment", str(folder), "--prompt", "brain", "--prompt", "odd blob", "--models", "tiny-random",
              "--sam", "none", "--preset", "fast", "--device", "cpu", "--progress", "none"]
    assert main(common + ["--output", str(tmp_path / "out.dcm")]) == 0
    assert main(common + ["--output", str(tmp_path / "out.seg.nrrd")]) == 0
    segments, reference = read_segmentation(str(tmp_path / "out.seg.nrrd"))
    ds, seg, masks = read_back(str(tmp_path / "out.dcm"), series["uids"], 2)
    for i, s in enumerate(segments):
        np.testing.assert_array_equal(masks[..., i], s["mask"] > 0)
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "random_weights=yes" in algorithm.AlgorithmParameters      # tiny-random models say so
    assert [d.SegmentLabel for d in ds.SegmentSequence] == ["brain", "odd blob"]


def test_non_dicom_input_is_refused_with_one_sentence(series, tmp_path):
    vol = tmp_path / "vol.nrrd"
    write_volume(vol, series["phantom"].image)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["segment", str(vol), "--prompt", "brain", "--output", str(tmp_path / "x.dcm"),
                     "--models", "tiny-random", "--device", "cpu"])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err.getvalue()
    assert lines[-1].startswith("medclipsam: error: ") and "DICOM series" in lines[-1]
    assert not (tmp_path / "x.dcm").exists()
