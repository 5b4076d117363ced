"""MedCLIPSAMLib.io: volumes, DICOM series, labelmaps and .seg.nrrd with exact geometry."""

import logging
import os

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from MedCLIPSAMLib import io as mio  # noqa: E402
from MedCLIPSAMLib.errors import MedCLIPSAMError  # noqa: E402
from MedCLIPSAMLib.phantoms import DIRECTIONS, direction_preset, make_volume  # noqa: E402

GRID = dict(shape=(10, 18, 22), spacing=(0.7, 1.3, 3.1), origin=(-101.3, 57.25, 13.0))
RIGHT_HANDED = ("lps", "ras", "oblique", "sagittal", "coronal")


@pytest.fixture(scope="module")
def phantoms():
    """One small CT phantom (with a liver tumour, so segments overlap) per direction preset."""
    return {d: make_volume("ct", direction=d, seed=1, lesion={"organ": "liver"}, **GRID) for d in DIRECTIONS}


def array(image):
    return sitk.GetArrayFromImage(image)


def leftovers(folder):
    """Temporary files that an interrupted atomic write would leave behind."""
    return [n for n in os.listdir(folder) if ".part" in n]


# --------------------------------------------------------------------------------------------------
# volumes


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("ext", ["nrrd", "nii.gz", "mha"])
def test_volume_roundtrip_keeps_geometry_and_voxels(tmp_path, phantoms, direction, ext):
    image = phantoms[direction].image
    path = mio.write_volume(tmp_path / f"ct.{ext}", image)
    back = mio.read_volume(path)
    assert mio.geometry_equal(back, image)
    assert back.GetPixelID() == sitk.sitkInt16  # integer CT keeps its type
    np.testing.assert_array_equal(array(back), array(image))
    assert leftovers(tmp_path) == []


def test_nii_gz_is_read_even_next_to_a_nii_of_the_same_name(tmp_path, phantoms):
    # ITK's NIfTI reader silently opens X.nii when asked for X.nii.gz and both exist
    image = phantoms["lps"].image
    mio.write_volume(tmp_path / "v.nii.gz", image)
    sitk.WriteImage(sitk.Image(3, 3, 3, sitk.sitkInt16), str(tmp_path / "v.nii"))
    np.testing.assert_array_equal(array(mio.read_volume(tmp_path / "v.nii.gz")), array(image))


def test_float64_becomes_float32_and_2d_becomes_one_slice(tmp_path):
    vol = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6)))
    sitk.WriteImage(vol, str(tmp_path / "f.mha"))
    assert mio.read_volume(tmp_path / "f.mha").GetPixelID() == sitk.sitkFloat32

    flat = sitk.GetImageFromArray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20))
    flat.SetSpacing((0.5, 0.25))
    sitk.WriteImage(flat, str(tmp_path / "x.png"))
    img = mio.read_volume(tmp_path / "x.png")
    assert img.GetDimension() == 3 and img.GetSize() == (20, 12, 1)
    np.testing.assert_array_equal(array(img)[0], array(flat))


def test_rgb_image_becomes_luminance_with_a_warning(tmp_path, caplog):
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    with caplog.at_level(logging.WARNING, logger="medclipsam"):
        img = mio.read_volume(tmp_path / "c.png")
    assert "greyscale" in caplog.text and "colour" in caplog.text
    assert img.GetNumberOfComponentsPerPixel() == 1 and img.GetSize() == (7, 6, 1)
    np.testing.assert_allclose(array(img), 0.299 * 200 + 0.587 * 100 + 0.114 * 50, rtol=1e-5)


def test_4d_needs_a_frame_and_the_frame_keeps_spatial_geometry(tmp_path):
    data = np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32)  # t, z, y, x
    frames = []
    for t in range(3):
        frames.append(sitk.GetImageFromArray(data[t]))
        frames[-1].SetSpacing((0.5, 0.6, 2.0))
        frames[-1].SetOrigin((1.0, 2.0, 3.0))
    img4 = sitk.JoinSeries(frames)
    path = str(tmp_path / "t.nii.gz")
    sitk.WriteImage(img4, path)
    with pytest.raises(MedCLIPSAMError, match=r"4D time series with 3 frames; pick one frame"):
        mio.read_volume(path)
    with pytest.raises(MedCLIPSAMError, match="frame 3 is out of range"):
        mio.read_volume(path, frame=3)
    frame = mio.read_volume(path, frame=2)
    assert frame.GetSize() == (6, 5, 4)
    np.testing.assert_allclose(frame.GetSpacing(), (0.5, 0.6, 2.0), rtol=1e-6)
    np.testing.assert_allclose(frame.GetOrigin(), (1.0, 2.0, 3.0), rtol=1e-6)
    np.testing.assert_array_equal(array(frame), data[2])
    single = str(tmp_path / "one.nrrd")
    sitk.WriteImage(sitk.JoinSeries([frames[0]]), single)  # a 4D file with one frame is just a volume
    np.testing.assert_array_equal(array(mio.read_volume(single)), data[0])
    with pytest.raises(MedCLIPSAMError, match="not a time series"):
        mio.read_volume(_write_3d(tmp_path), frame=1)


def _write_3d(tmp_path):
    path = str(tmp_path / "plain.nrrd")
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkInt16), path)
    return path


def test_nrrd_list_of_frames_is_a_time_series(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    data = np.random.default_rng(1).random((2, 5, 6, 7)).astype(np.float32)  # list axis first (Fortran order)
    header = {"kinds": ["list", "domain", "domain", "domain"], "space": "left-posterior-superior",
              "space directions": np.vstack([[np.nan] * 3, np.diag([0.5, 0.7, 2.0])]), "space origin": [1, 2, 3]}
    path = str(tmp_path / "seq.nrrd")
    nrrd.write(path, data, header)
    with pytest.raises(MedCLIPSAMError, match="2 frames"):
        mio.read_volume(path)
    frame = mio.read_volume(path, frame=1)
    assert frame.GetSize() == (5, 6, 7)
    np.testing.assert_allclose(frame.GetSpacing(), (0.5, 0.7, 2.0))
    np.testing.assert_array_equal(array(frame), data[1].transpose(2, 1, 0))


def test_other_vector_images_are_refused(tmp_path):
    vec = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=True)  # 6 components per voxel
    sitk.WriteImage(vec, str(tmp_path / "tensor.mha"))
    with pytest.raises(MedCLIPSAMError, match="6-component vectors"):
        mio.read_volume(tmp_path / "tensor.mha")


def test_nan_and_inf_voxels_are_rejected_with_their_count(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, 0], data[1, 2, 3], data[3, 4, 5] = np.nan, np.inf, -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "bad.nrrd"))
    with pytest.raises(MedCLIPSAMError, match=r"contains 3 NaN or infinite voxel\(s\) out of 120"):
        mio.read_volume(tmp_path / "bad.nrrd")


def test_bad_inputs_give_one_clear_error(tmp_path):
    with pytest.raises(MedCLIPSAMError, match="does not exist"):
        mio.read_volume(tmp_path / "missing.nrrd")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(MedCLIPSAMError, match="holds no DICOM series"):
        mio.read_volume(tmp_path / "empty")
    (tmp_path / "garbage.nrrd").write_bytes(b"NRRD0004\nthis is not a header\n")
    (tmp_path / "text.nii.gz").write_text("hello")
    (tmp_path / "unknown.xyz").write_text("hello")
    full = _write_3d(tmp_path)
    data = open(full, "rb").read()
    (tmp_path / "truncated.nrrd").write_bytes(data[: len(data) - 40])
    for name in ("garbage.nrrd", "text.nii.gz", "unknown.xyz", "truncated.nrrd"):
        with pytest.raises(MedCLIPSAMError, match="cannot read") as err:
            mio.read_volume(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# DICOM


def write_dicom_series(image, folder, series_uid="1.2.826.0.1.3680043.2.1125.1", first_uid_index=0):
    """Write a 3D int16 image as one CT DICOM file per slice, with position, orientation and spacing tags."""
    os.makedirs(folder, exist_ok=True)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{first_uid_index + k + 1}",
            "0008|0060": "CT", "0010|0010": "Phantom^CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
            "0020|000e": series_uid, "0020|0052": "1.2.826.0.1.3680043.2.1125.98",
            "0020|0013": str(k + 1), "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0028|1052": "0", "0028|1053": "1",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(os.path.join(folder, f"slice{k:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize("direction", RIGHT_HANDED)
def test_dicom_series_roundtrip(tmp_path, phantoms, direction):
    image = phantoms[direction].image
    write_dicom_series(image, tmp_path / "dcm")
    back = mio.read_volume(tmp_path / "dcm")
    assert mio.geometry_equal(back, image, tol=1e-5)
    np.testing.assert_array_equal(array(back), array(image))


def test_dicom_left_handed_grid_comes_back_physically_identical(tmp_path, phantoms):
    # DICOM derives the slice axis from the row/column cross product: the stack is reversed, not moved
    image = phantoms["oblique-flipped"].image
    write_dicom_series(image, tmp_path / "dcm")
    back = mio.read_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(array(back), array(image)[::-1])
    last = image.TransformIndexToPhysicalPoint((0, 0, image.GetSize()[2] - 1))
    np.testing.assert_allclose(back.GetOrigin(), last, atol=1e-5)
    # every voxel keeps its physical position
    idx = (3, 5, 2)
    p = image.TransformIndexToPhysicalPoint(idx)
    assert back[back.TransformPhysicalPointToIndex(p)] == image[idx]


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path, phantoms, caplog):
    big = phantoms["lps"].image
    small = big[:, :, :4]
    write_dicom_series(big, tmp_path / "dcm", series_uid="1.2.826.0.1.3680043.2.1125.7")
    write_dicom_series(small, tmp_path / "dcm2", series_uid="1.2.826.0.1.3680043.2.1125.8")
    for name in os.listdir(tmp_path / "dcm2"):
        os.rename(tmp_path / "dcm2" / name, tmp_path / "dcm" / f"b_{name}")
    with caplog.at_level(logging.WARNING, logger="medclipsam"):
        back = mio.read_volume(tmp_path / "dcm")
    assert back.GetSize() == big.GetSize()
    assert "2 DICOM series" in caplog.text


# --------------------------------------------------------------------------------------------------
# labelmaps and atomic writes


@pytest.mark.parametrize("ext", ["nrrd", "nii.gz"])
def test_labelmap_roundtrip(tmp_path, phantoms, ext):
    ph = phantoms["oblique-flipped"]
    labels, _ = ph.label_map()
    path = mio.write_labelmap(tmp_path / f"lab.{ext}", labels, ph.image)
    back = mio.read_volume(path)
    assert mio.geometry_equal(back, ph.image) and back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(array(back), labels)
    with pytest.raises(MedCLIPSAMError, match="does not match the reference grid"):
        mio.write_labelmap(tmp_path / "x.nrrd", labels[1:], ph.image)
    with pytest.raises(MedCLIPSAMError, match="integer labels"):
        mio.write_labelmap(tmp_path / "x.nrrd", labels.astype(np.float32), ph.image)
    assert not (tmp_path / "x.nrrd").exists()


def test_failed_writes_leave_nothing_and_keep_the_old_file(tmp_path, phantoms, monkeypatch):
    image = phantoms["lps"].image
    target = tmp_path / "out.png"
    target.write_bytes(b"old content")
    with pytest.raises(MedCLIPSAMError, match="cannot write"):
        mio.write_volume(target, image)  # PNG cannot hold a 3D int16 volume
    assert target.read_bytes() == b"old content" and leftovers(tmp_path) == []

    with pytest.raises(MedCLIPSAMError, match="does not exist"):
        mio.write_volume(tmp_path / "no" / "such" / "folder.nrrd", image)

    # a writer that dies half-way: the partial file is removed, the destination never appears
    import slicerio

    def half_write(file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(b"NRRD0004\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(slicerio, "write_segmentation", half_write)
    ph = phantoms["lps"]
    with pytest.raises(MedCLIPSAMError, match="disk full"):
        mio.write_segmentation(tmp_path / "gt.seg.nrrd", ph.segments(), ph.image)
    assert not (tmp_path / "gt.seg.nrrd").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder_is_a_clear_error(tmp_path, phantoms):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(MedCLIPSAMError, match="not writable"):
            mio.write_volume(folder / "v.nrrd", phantoms["lps"].image)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------------------------------
# segmentations


def test_seg_nrrd_roundtrip_with_overlaps(tmp_path, phantoms):
    slicerio = pytest.importorskip("slicerio")
    ph = phantoms["oblique"]
    assert (ph.labels["tumor"] & ph.labels["liver"]).any()  # the tumour overlaps its organ
    segments = ph.segments()
    path = mio.write_segmentation(tmp_path / "gt.seg.nrrd", segments, ph.image)

    seg = slicerio.read_segmentation(path)
    assert seg["voxels"].ndim == 4  # overlapping segments: Slicer's layered form
    assert [s["name"] for s in seg["segments"]] == [s["name"] for s in segments]
    np.testing.assert_allclose(seg["segments"][0]["color"], segments[0]["color"], atol=1e-6)
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "tumor").transpose(2, 1, 0), ph.labels["tumor"])

    back, reference = mio.read_segmentation(path)
    assert mio.geometry_equal(reference, ph.image)
    assert [s["name"] for s in back] == list(ph.labels)
    for s in back:
        np.testing.assert_array_equal(s["mask"], ph.labels[s["name"]])
        assert s["color"] == pytest.approx(ph.segments()[list(ph.labels).index(s["name"])]["color"])


def test_disjoint_segments_share_one_layer_and_keep_terminology(tmp_path, phantoms):
    slicerio = pytest.importorskip("slicerio")
    ph = phantoms["ras"]
    term = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
            "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    segments = [{"name": "liver", "mask": ph.labels["liver"] & ~ph.labels["tumor"], "terminology": term},
                {"name": "spleen", "mask": ph.labels["spleen"].astype(bool)}]
    path = mio.write_segmentation(tmp_path / "two.seg.nrrd", segments, ph.image)
    seg = slicerio.read_segmentation(path)
    assert seg["voxels"].ndim == 3 and sorted(s["labelValue"] for s in seg["segments"]) == [1, 2]
    back, _ = mio.read_segmentation(path)
    assert back[0]["terminology"] == term and "terminology" not in back[1]
    assert back[0]["color"] != back[1]["color"]  # default colours differ
    np.testing.assert_array_equal(back[1]["mask"], ph.labels["spleen"])


def test_bad_segments_are_rejected_before_writing(tmp_path, phantoms):
    ph = phantoms["lps"]
    mask = ph.labels["liver"]
    bad = [
        ([{"name": "x", "mask": mask[:, :, 1:]}], "does not match|shape"),
        ([{"name": " ", "mask": mask}], "non-empty name"),
        ([{"name": "x", "mask": mask, "color": (1, 2, 3)}], "three numbers in 0..1"),
        ([{"name": "x", "mask": mask, "terminology": "liver"}], "terminology"),
        ([{"mask": mask}], "'name' and 'mask'"),
    ]
    for segments, message in bad:
        with pytest.raises(MedCLIPSAMError, match=message):
            mio.write_segmentation(tmp_path / "bad.seg.nrrd", segments, ph.image)
    assert os.listdir(tmp_path) == []
    with pytest.raises(MedCLIPSAMError, match="does not exist"):
        mio.read_segmentation(tmp_path / "none.seg.nrrd")
    (tmp_path / "junk.seg.nrrd").write_text("junk")
    with pytest.raises(MedCLIPSAMError, match="cannot read segmentation"):
        mio.read_segmentation(tmp_path / "junk.seg.nrrd")


def _matrix(vtk_matrix):
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def slicer_segments(path, reference_file):
    """Load a .seg.nrrd with slicer-core and export every segment onto the grid of the input volume,
    which Slicer reads from `reference_file` itself (so the expected geometry is the file's, as Slicer
    sees it, not something this package computed).

    Returns ({name: (color, mask z/y/x)}, reference-geometry conversion parameter, the input's IJK-to-RAS,
    [the IJK-to-RAS of each exported labelmap]).
    """
    slicer = pytest.importorskip("slicer")
    import vtk
    from vtk.util import numpy_support

    # the Slicer application registers this rule at startup; it owns the "Reference image geometry" parameter
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rule = slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule
    if not any(r.GetClassName() == rule.__name__ for r in factory.GetConverterRules()):
        factory.RegisterConverterRule(rule())
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(seg_node)

    ref_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    ref_storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    ref_storage.SetFileName(str(reference_file))
    assert ref_storage.ReadData(ref_node)
    matrix = vtk.vtkMatrix4x4()
    ref_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _matrix(matrix)

    segmentation = seg_node.GetSegmentation()
    out, grids = {}, []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert logic.ExportSegmentsToLabelmapNode(seg_node, ids, labelmap, ref_node)
        image = labelmap.GetImageData()
        dims = image.GetDimensions()
        mask = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        got = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(got)
        grids.append(_matrix(got))
        out[segment.GetName()] = (segment.GetColor(), mask != 0)
    geometry = segmentation.GetConversionParameter("Reference image geometry")
    return out, geometry, ijk_to_ras, grids


def _on_slicer_grid(mask, image, ijk_to_ras, shape):
    """`mask` (z, y, x on `image`'s grid) resampled, by nearest voxel centre, onto the grid Slicer uses
    (`ijk_to_ras`, `shape` z/y/x); the image's geometry is taken from its own origin, spacing and
    direction. Slicer stores a left-handed file's slices reversed, so its grid may be the same voxels in
    another index order."""
    index_to_lps = np.eye(4)
    index_to_lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    index_to_lps[:3, 3] = image.GetOrigin()
    k, j, i = np.indices(shape).reshape(3, -1)
    ras = ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)])
    ijk = np.linalg.solve(index_to_lps, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras)[:3]
    nearest = np.rint(ijk).astype(int)
    assert np.abs(ijk - nearest).max() < 1e-4, "Slicer's grid is not the input's voxel grid"
    return mask[nearest[2], nearest[1], nearest[0]].reshape(shape)


@pytest.mark.parametrize("direction", ["oblique", "oblique-flipped", "ras", "sagittal"])
def test_seg_nrrd_loads_in_slicer_with_names_colours_and_masks(tmp_path, phantoms, direction):
    ph = phantoms[direction]
    segments = ph.segments()
    # the input volume as a file written by SimpleITK itself: Slicer reads the geometry every check expects
    reference_file = tmp_path / "input.nrrd"
    sitk.WriteImage(ph.image, str(reference_file))
    path = mio.write_segmentation(tmp_path / "gt.seg.nrrd", segments, ph.image)
    loaded, geometry, ijk_to_ras, grids = slicer_segments(path, reference_file)
    assert list(loaded) == [s["name"] for s in segments]
    for got in grids:
        np.testing.assert_allclose(got, ijk_to_ras, atol=1e-6)
    for s in segments:
        color, mask = loaded[s["name"]]
        assert color == pytest.approx(s["color"], abs=1e-6)
        np.testing.assert_array_equal(mask, _on_slicer_grid(s["mask"] > 0, ph.image, ijk_to_ras, mask.shape))
    # the segmentation's own reference grid (IJK-to-RAS, then the extent) holds the input's voxels
    values = [float(v) for v in geometry.strip(";").split(";")]
    size = ph.image.GetSize()
    assert values[16:] == [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1]
    own = np.reshape(values[:16], (4, 4))
    corners = np.array([[x, y, z, 1] for x in (0, size[0] - 1) for y in (0, size[1] - 1) for z in (0, size[2] - 1)]).T
    in_input = np.linalg.solve(ijk_to_ras, own @ corners)
    np.testing.assert_allclose(in_input, np.rint(in_input), atol=1e-4)
    assert {tuple(c) for c in np.rint(in_input).astype(int).T} == {tuple(c) for c in corners.T}


# --------------------------------------------------------------------------------------------------
# geometry helpers


def _image_with(direction):
    img = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return img


def test_slicing_axis_follows_patient_axes():
    ident = _image_with(np.eye(3))
    assert [mio.slicing_axis(ident, a) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    # RAS-flipped and oblique grids are still stacked along S-I
    assert mio.slicing_axis(_image_with(direction_preset("ras")), "axial") == 0
    assert mio.slicing_axis(_image_with(direction_preset("oblique")), "axial") == 0
    assert mio.slicing_axis(_image_with(direction_preset("oblique-flipped")), "axial") == 0
    # sagittal acquisition: index x along A-P, y along S-I, z along L-R (numpy axes z, y, x = 0, 1, 2)
    sag = _image_with(direction_preset("sagittal"))
    assert (mio.slicing_axis(sag, "axial"), mio.slicing_axis(sag, "coronal"), mio.slicing_axis(sag, "sagittal")) \
        == (1, 2, 0)
    with pytest.raises(MedCLIPSAMError, match="unknown slicing axis"):
        mio.slicing_axis(ident, "oblique")


def test_slicing_axis_on_random_signed_permutations_with_tilt():
    rng = np.random.default_rng(0)
    rows = {"sagittal": 0, "coronal": 1, "axial": 2}
    for _ in range(50):
        perm = rng.permutation(3)
        signed = np.zeros((3, 3))
        signed[perm, np.arange(3)] = rng.choice([-1.0, 1.0], size=3)  # column c runs along patient axis perm[c]
        q, _ = np.linalg.qr(np.eye(3) + rng.normal(0, 0.25, (3, 3)))  # a tilt of up to ~30 degrees
        direction = q @ signed
        if np.abs(direction)[perm, np.arange(3)].min() < 0.75:
            continue  # tilt too strong to call it unambiguous
        img = _image_with(direction)
        for view, row in rows.items():
            index_axis = int(np.where(perm == row)[0][0])
            assert mio.slicing_axis(img, view) == 2 - index_axis


def test_slicing_axis_gives_distinct_axes_at_45_degrees():
    c = np.cos(np.pi / 4)
    tilted = np.array([[c, 0, -c], [0, 1, 0], [c, 0, c]])  # x and z both 45 degrees from S-I and L-R
    img = _image_with(tilted)
    axes = {mio.slicing_axis(img, a) for a in ("axial", "coronal", "sagittal")}
    assert axes == {0, 1, 2}


def test_geometry_equal():
    a = sitk.Image(4, 5, 6, sitk.sitkUInt8)
    a.SetSpacing((0.5, 0.7, 2.0))
    a.SetOrigin((-100.0, 20.0, 5.0))
    b = sitk.Image(a)
    assert mio.geometry_equal(a, b)
    b.SetOrigin((-100.0 + 1e-9, 20.0, 5.0))
    assert mio.geometry_equal(a, b)
    for change in (lambda im: im.SetOrigin((-100.1, 20.0, 5.0)), lambda im: im.SetSpacing((0.5, 0.7, 2.01)),
                   lambda im: im.SetDirection(direction_preset("ras"))):
        c = sitk.Image(a)
        change(c)
        assert not mio.geometry_equal(a, c)
    assert not mio.geometry_equal(a, sitk.Image(4, 5, 7, sitk.sitkUInt8))
