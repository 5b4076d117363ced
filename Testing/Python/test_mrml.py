"""MedCLIPSAMLib.mrml with slicer-core's real MRML scene: volumes, .seg.nrrd import (new node, re-run into
an existing node), labelmap export on the input grid, uncertainty volumes, terminology, RAS vs LPS."""

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
sitk = pytest.importorskip("SimpleITK")

from MedCLIPSAMLib import io, mrml, phantoms  # noqa: E402


def oblique_phantom(seed=3):
    """A small head MR on an oblique, anisotropic grid with an origin far from zero."""
    return phantoms.make_volume("mr", shape=(10, 36, 30), spacing=(1.3, 0.9, 3.2), origin=(-31.5, 12.25, 47.0),
                                direction="oblique", seed=seed, lesion={"size": "large"})


def node_count(scene, class_name=None):
    return scene.GetNumberOfNodesByClass(class_name) if class_name else scene.GetNumberOfNodes()


def labelmap_array(node):
    return sitk.GetArrayFromImage(mrml.sitk_image_from_volume_node(node))


def assert_same_grid(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-9)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def phantom():
    return oblique_phantom()


@pytest.fixture
def volume(scene, phantom):
    return mrml.volume_node_from_sitk(scene, phantom.image, "phantom")


def write_seg(path, masks, reference, colors=None, terminologies=None):
    """A .seg.nrrd as `medclipsam segment` writes it (MedCLIPSAMLib.io, the CLI's own writer)."""
    segments = []
    for i, (name, mask) in enumerate(masks.items()):
        segment = {"name": name, "mask": mask}
        if colors and name in colors:
            segment["color"] = colors[name]
        if terminologies and name in terminologies:
            segment["terminology"] = terminologies[name]
        segments.append(segment)
    io.write_segmentation(str(path), segments, reference)
    return str(path)


# ------------------------------------------------------------------------------------------ volumes
def test_volume_round_trip_keeps_voxels_and_geometry(scene, phantom, volume):
    image = phantom.image
    np.testing.assert_array_equal(labelmap_array(volume), sitk.GetArrayFromImage(image))
    assert_same_grid(mrml.sitk_image_from_volume_node(volume), image)
    assert volume.GetImageData().GetDimensions() == image.GetSize()
    assert volume.GetDisplayNode() is not None


def test_mrml_is_ras_and_files_are_lps(volume, phantom):
    """A voxel's MRML (RAS) position is its ITK (LPS) position with x and y negated."""
    ijk_to_ras = mrml.ijk_to_ras_from_node(volume)
    for index in [(0, 0, 0), (29, 35, 9), (7, 20, 4)]:
        lps = np.array(phantom.image.TransformIndexToPhysicalPoint(index))
        ras = ijk_to_ras @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


def test_write_volume_node_file_matches(tmp_path, volume, phantom):
    path = tmp_path / "input.nrrd"
    mrml.write_volume_node(volume, path)
    back = sitk.ReadImage(str(path))
    assert_same_grid(back, phantom.image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(phantom.image))


def test_vector_volume_round_trip(scene):
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 6, 3)).astype(np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing((0.5, 0.7, 2.0))
    node = mrml.volume_node_from_sitk(scene, image, "rgb")
    assert node.IsA("vtkMRMLVectorVolumeNode")
    back = mrml.sitk_image_from_volume_node(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), rgb)


def test_volume_without_image_data_is_an_error(scene):
    with pytest.raises(ValueError, match="no image data"):
        mrml.sitk_image_from_volume_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


# ------------------------------------------------------------------------------------ segmentations
def test_import_new_segmentation_node(tmp_path, scene, phantom, volume):
    masks = {"tumor": phantom.labels["tumor"], "ventricles": phantom.labels["ventricles"]}
    colors = {"tumor": (0.9, 0.85, 0.2), "ventricles": (0.35, 0.7, 0.9)}
    path = write_seg(tmp_path / "out.seg.nrrd", masks, phantom.image, colors)

    result = mrml.import_segmentation_file(scene, path, volume)
    node = result["node"]
    assert result["created"] and result["replaced"] == []
    assert node.GetName() == "phantom segmentation"
    assert mrml.segment_names(node) == ["tumor", "ventricles"]
    segmentation = node.GetSegmentation()
    for segment_id, name in zip(result["segment_ids"], masks):
        np.testing.assert_allclose(segmentation.GetSegment(segment_id).GetColor(), colors[name], atol=1e-6)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    assert node.GetDisplayNode() is not None
    # placed beside the volume in the subject hierarchy
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemParent(sh.GetItemByDataNode(volume))


def test_export_to_labelmap_matches_ground_truth_on_input_grid(tmp_path, scene, phantom, volume):
    """All phantom structures (they overlap: brain holds the tumour) -> labelmap on the input's exact grid."""
    path = write_seg(tmp_path / "all.seg.nrrd", phantom.labels, phantom.image)
    node = mrml.import_segmentation_file(scene, path, volume)["node"]

    labelmap = mrml.export_segments_to_labelmap(scene, node, volume)
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    exported = mrml.sitk_image_from_volume_node(labelmap)
    assert_same_grid(exported, phantom.image)
    np.testing.assert_allclose(mrml.ijk_to_ras_from_node(labelmap), mrml.ijk_to_ras_from_node(volume), atol=1e-9)
    expected, names = phantom.label_map()  # later structures drawn on top, as Slicer's export does
    assert names == mrml.segment_names(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), expected)

    # each segment on its own keeps its full mask, overlaps included
    segmentation = node.GetSegmentation()
    for name, mask in phantom.labels.items():
        single = mrml.export_segments_to_labelmap(scene, node, volume,
                                                  labelmap_node=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"),
                                                  segment_ids=[segmentation.GetSegmentIdBySegmentName(name)])
        np.testing.assert_array_equal(labelmap_array(single) > 0, mask > 0, err_msg=name)


def test_rerun_replaces_same_named_segments_and_adds_new(tmp_path, scene, phantom, volume):
    first = write_seg(tmp_path / "first.seg.nrrd",
                      {"brain": phantom.labels["brain"], "tumor": phantom.labels["tumor"]}, phantom.image)
    node = mrml.import_segmentation_file(scene, first, volume)["node"]
    segmentation = node.GetSegmentation()
    brain_id = segmentation.GetSegmentIdBySegmentName("brain")
    tumor_id = segmentation.GetSegmentIdBySegmentName("tumor")
    segmentation.GetSegment(tumor_id).SetColor(0.1, 0.2, 0.3)  # the user recoloured it
    manual_id = segmentation.AddEmptySegment("", "my notes")  # and added a segment by hand
    nodes_before = node_count(scene)

    grown = phantom.labels["ventricles"] | phantom.labels["tumor"]  # different voxels under the same name
    second = write_seg(tmp_path / "second.seg.nrrd", {"tumor": grown, "ventricles": phantom.labels["ventricles"]},
                       phantom.image, colors={"tumor": (1.0, 0.0, 0.0)})
    result = mrml.import_segmentation_file(scene, second, volume, node)

    assert result["node"] is node and not result["created"]
    assert result["replaced"] == [tumor_id] and len(result["added"]) == 1
    assert mrml.segment_names(node) == ["brain", "tumor", "my notes", "ventricles"]
    assert segmentation.GetSegmentIdBySegmentName("tumor") == tumor_id  # same ID, same place
    np.testing.assert_allclose(segmentation.GetSegment(tumor_id).GetColor(), (0.1, 0.2, 0.3))  # user's colour kept
    assert manual_id in [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    # no node pile-up: the only new nodes are none (same segmentation, display and storage nodes)
    assert node_count(scene) == nodes_before
    assert node_count(scene, "vtkMRMLSegmentationNode") == 1

    def exported(name):
        labelmap = mrml.export_segments_to_labelmap(scene, node, volume,
                                                    labelmap_node=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"),
                                                    segment_ids=[segmentation.GetSegmentIdBySegmentName(name)])
        return labelmap_array(labelmap) > 0

    np.testing.assert_array_equal(exported("tumor"), grown > 0)  # replaced, not merged with the old voxels
    np.testing.assert_array_equal(exported("brain"), phantom.labels["brain"] > 0)  # untouched
    np.testing.assert_array_equal(exported("ventricles"), phantom.labels["ventricles"] > 0)


def test_replace_existing_false_adds_alongside(tmp_path, scene, phantom, volume):
    path = write_seg(tmp_path / "t.seg.nrrd", {"tumor": phantom.labels["tumor"]}, phantom.image)
    node = mrml.import_segmentation_file(scene, path, volume)["node"]
    mrml.import_segmentation_file(scene, path, volume, node, replace_existing=False)
    assert mrml.segment_names(node) == ["tumor", "tumor"]


def test_bad_file_leaves_scene_unchanged(tmp_path, scene, volume):
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_bytes(b"NRRD0004\nthis is not a segmentation\n")
    before = node_count(scene)
    with pytest.raises(ValueError):
        mrml.import_segmentation_file(scene, str(bad), volume)
    with pytest.raises(ValueError, match="does not exist"):
        mrml.import_segmentation_file(scene, str(tmp_path / "missing.seg.nrrd"), volume)
    assert node_count(scene) == before


def test_segmentation_follows_the_volume_transform(tmp_path, scene, phantom, volume):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    path = write_seg(tmp_path / "t.seg.nrrd", {"tumor": phantom.labels["tumor"]}, phantom.image)
    node = mrml.import_segmentation_file(scene, path, volume)["node"]
    assert node.GetTransformNodeID() == transform.GetID()


def test_reexport_reuses_the_labelmap_node(tmp_path, scene, phantom, volume):
    path = write_seg(tmp_path / "t.seg.nrrd", {"tumor": phantom.labels["tumor"]}, phantom.image)
    node = mrml.import_segmentation_file(scene, path, volume)["node"]
    first = mrml.export_segments_to_labelmap(scene, node, volume)
    before = node_count(scene)
    second = mrml.export_segments_to_labelmap(scene, node, volume)
    assert second is first
    assert node_count(scene) == before


def test_export_without_segments_is_an_error(scene, volume):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="no segments"):
        mrml.export_segments_to_labelmap(scene, node, volume)


def test_uncertainty_volume_loaded_and_reused(tmp_path, scene, phantom, volume):
    path = write_seg(tmp_path / "t.seg.nrrd", {"tumor": phantom.labels["tumor"]}, phantom.image)
    node = mrml.import_segmentation_file(scene, path, volume)["node"]
    values = np.random.default_rng(1).random(sitk.GetArrayFromImage(phantom.image).shape).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(phantom.image)
    sitk.WriteImage(image, str(tmp_path / "u.nrrd"))

    uncertainty = mrml.load_uncertainty_volume(scene, str(tmp_path / "u.nrrd"), node)
    assert uncertainty.IsA("vtkMRMLScalarVolumeNode") and uncertainty.GetDisplayNode() is not None
    assert_same_grid(mrml.sitk_image_from_volume_node(uncertainty), phantom.image)
    np.testing.assert_array_equal(labelmap_array(uncertainty), values)
    before = node_count(scene)
    assert mrml.load_uncertainty_volume(scene, str(tmp_path / "u.nrrd"), node) is uncertainty
    assert node_count(scene) == before


# --------------------------------------------------------------------------------------- terminology
def _test_terminology(tmp_path):
    """A tiny terminology in Slicer's format (test codes), loaded as Slicer loads its own."""
    term = {
        "SegmentationCategoryTypeContextName": "MedCLIPSAM test terminology",
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
        "SegmentationCodes": {"Category": [{
            "CodeMeaning": "Test structures", "CodingSchemeDesignator": "TEST", "CodeValue": "100",
            "Type": [
                {"CodeMeaning": "Mass", "CodingSchemeDesignator": "TEST", "CodeValue": "101", "3dSlicerLabel": "mass",
                 "recommendedDisplayRGBValue": [144, 238, 144]},
                {"CodeMeaning": "Kidney", "CodingSchemeDesignator": "TEST", "CodeValue": "102",
                 "Modifier": [{"CodeMeaning": "Left", "CodingSchemeDesignator": "TEST", "CodeValue": "201",
                               "3dSlicerLabel": "left kidney", "recommendedDisplayRGBValue": [185, 102, 83]}]},
            ]}]},
    }
    path = tmp_path / "test.term.json"
    path.write_text(json.dumps(term))
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(path)) == "MedCLIPSAM test terminology"
    return logic


def test_terminology_lookup_by_label_meaning_and_synonym(tmp_path):
    logic = _test_terminology(tmp_path)
    entry, color = mrml.terminology_for_name(logic, "left kidney")
    assert "TEST^102^Kidney~TEST^201^Left" in entry
    np.testing.assert_allclose(color, np.array([185, 102, 83]) / 255)
    entry, color = mrml.terminology_for_name(logic, "Brain Tumor")  # tail 'tumor' -> 'mass'
    assert "TEST^101^Mass" in entry
    entry, color = mrml.terminology_for_name(logic, "kidney")  # type's code meaning, no colour of its own
    assert "TEST^102^Kidney" in entry and color is None
    assert mrml.terminology_for_name(logic, "zebra") is None
    assert mrml.terminology_for_name(None, "kidney") is None


def test_import_sets_terminology_but_keeps_the_files(tmp_path, scene, phantom, volume):
    logic = _test_terminology(tmp_path)
    given = "Other~SCT^49755003^Morphologically Altered Structure~SCT^108369006^Neoplasm~^^~~^^~^^"
    path = write_seg(tmp_path / "t.seg.nrrd",
                     {"brain tumor": phantom.labels["tumor"], "ventricles": phantom.labels["ventricles"],
                      "lesion": phantom.labels["tumor"]},
                     phantom.image, terminologies={"lesion": given})
    node = mrml.import_segmentation_file(scene, path, volume, terminologies_logic=logic)["node"]
    segmentation = node.GetSegmentation()
    tumor = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("brain tumor"))
    assert "TEST^101^Mass" in mrml.terminology_of(tumor)
    np.testing.assert_allclose(tumor.GetColor(), np.array([144, 238, 144]) / 255, atol=1e-6)
    ventricles = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("ventricles"))
    assert not mrml.has_specific_terminology(ventricles)  # not in the terminology: left generic
    lesion = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("lesion"))
    assert mrml.terminology_of(lesion) == given  # the file's own terminology wins


def test_damaged_files_are_refused_before_slicer_reads_them(tmp_path, scene, phantom, volume):
    """Slicer's NRRD reader can abort the process on these; they must be refused with a ValueError."""
    good = write_seg(tmp_path / "good.seg.nrrd", {"brain": phantom.labels["brain"]}, phantom.image)
    mrml.check_nrrd_file(good)
    data = open(good, "rb").read()
    header = data[: data.index(b"\n\n") + 2]
    cases = {
        "truncated": data[: len(header) + (len(data) - len(header)) // 2],
        "header only": header,
        "no header end": header[:-2],
        "garbage": b"NRRD0004\nthis is not a segmentation\n\n",
        "not nrrd": b"hello world\n",
        "empty": b"",
        "corrupt gzip": header + b"\x1f\x8b\x08\x00" + b"\x00" * 50,
    }
    raw = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    sitk.WriteImage(raw, str(tmp_path / "raw.nrrd"), useCompression=False)
    raw_data = open(tmp_path / "raw.nrrd", "rb").read()
    mrml.check_nrrd_file(tmp_path / "raw.nrrd")
    cases["raw truncated"] = raw_data[:-10]
    before = node_count(scene)
    for name, content in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.seg.nrrd"
        path.write_bytes(content)
        with pytest.raises(ValueError):
            mrml.check_nrrd_file(path)
        with pytest.raises(ValueError):
            mrml.import_segmentation_file(scene, str(path), volume)
    with pytest.raises(ValueError):
        mrml.read_volume_into_node(scene, str(tmp_path / "truncated.seg.nrrd"), "u")
    assert node_count(scene) == before
