"""Why and how sure (issue 21): saliency volumes on the input's grid, the per-prompt report carrying the
driver's own numbers, the one-line summaries, and the MRML evidence nodes (overlays, chart, jumping) in
slicer-core's real scene."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib import evidence
from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import read_segmentation, write_volume
from MedCLIPSAMLib.phantoms import make_volume
from MedCLIPSAMLib.pipeline.slices import SliceView

FAST = ["--models", "tiny-random", "--preset", "fast", "--progress", "none", "--device", "cpu"]
ABSENT = ("a brain MRI", "liver")  # "liver" among its own absent sentences can never lead


def phantom(direction, shape=(6, 30, 26), spacing=(1.1, 0.7, 3.3), seed=0):
    return make_volume("mr", shape=shape, spacing=spacing, origin=(-31.5, 12.25, 47.0), direction=direction,
                       seed=seed, lesion={"size": "large"})


def run_cli(tmp_path, image, *extra, prompts=("brain tumor",)):
    """`medclipsam segment` with saliency, report and uncertainty outputs; returns (input file, report)."""
    src = tmp_path / "in.nrrd"
    write_volume(str(src), image)
    args = ["segment", str(src), "--output", str(tmp_path / "out.seg.nrrd"), "--saliency-output",
            str(tmp_path / "s.nrrd"), "--report-output", str(tmp_path / "r.json"), "--uncertainty-output",
            str(tmp_path / "u.nrrd")]
    for p in prompts:
        args += ["--prompt", p]
    assert main(args + list(extra) + FAST) == 0
    return src, evidence.read_report(tmp_path / "r.json")


def nonzero_slices(array, view):
    return [k for k in range(view.count) if view.get(array, k).any()]


# ------------------------------------------------------------------------------------ saliency volume
@pytest.mark.parametrize("direction,axis", [("oblique", "axial"), ("ras", "axial"), ("sagittal", "axial"),
                                            ("coronal", "coronal")])
def test_saliency_volume_has_the_input_grid_and_maps_only_on_slices_that_got_one(tmp_path, direction, axis):
    """Oblique, anisotropic, permuted (sagittal / coronal storage) grids: each prompt's saliency file has
    the input file's exact geometry, float values in [0, 1], and is non-zero exactly on the slices the
    report says got a map (per-slice mode: the kept ones)."""
    src, report = run_cli(tmp_path, phantom(direction, shape=(5, 16, 14)).image, "--axis", axis, "--sam", "none", "--mode", "per-slice",
                          prompts=("brain tumor", "ventricles"))
    original = sitk.ReadImage(str(src))
    view = SliceView(original, axis)
    assert [p["saliency_file"] for p in report["prompts"]] == [str(tmp_path / "s_brain-tumor.nrrd"),
                                                               str(tmp_path / "s_ventricles.nrrd")]
    for entry in report["prompts"]:
        saliency = sitk.ReadImage(entry["saliency_file"])
        assert saliency.GetSize() == original.GetSize()
        assert saliency.GetOrigin() == original.GetOrigin()
        assert saliency.GetSpacing() == original.GetSpacing()
        assert saliency.GetDirection() == original.GetDirection()
        assert saliency.GetPixelID() == sitk.sitkFloat32
        values = sitk.GetArrayFromImage(saliency)
        assert values.min() >= 0.0 and values.max() <= 1.0
        assert entry["axis"] == axis and entry["slices"] == view.count
        assert entry["saliency_slices"] == entry["kept_slices"] and entry["saliency_slices"]
        assert nonzero_slices(values, view) == entry["saliency_slices"]


def test_carry_mode_has_saliency_on_the_key_slice_only(tmp_path):
    """Propagating modes run saliency on the best-scoring kept slices only: the rest stay 0."""
    src, report = run_cli(tmp_path, phantom("oblique", shape=(4, 20, 18)).image, "--mode", "carry",
                          "--key-slices", "1")
    entry = report["prompts"][0]
    similarity = dict(zip(entry["scored"], entry["similarity"]))
    best = max(entry["kept_slices"], key=lambda k: similarity[k])
    assert entry["saliency_slices"] == [best] and entry["mode"] == "carry"
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s.nrrd")))  # one prompt: the path itself
    assert nonzero_slices(values, SliceView(sitk.ReadImage(str(src)))) == [best]
    assert entry["models"] == {"clip": "tiny-random", "sam": "tiny-random", "random": True}


def test_saliency_file_names():
    assert evidence.saliency_paths("out/s.nrrd", ["liver"]) == ["out/s.nrrd"]
    assert evidence.saliency_paths("out/s.nii.gz", ["Brain tumor", "left kidney", "brain-tumor?"]) == [
        "out/s_brain-tumor.nii.gz", "out/s_left-kidney.nii.gz", "out/s_brain-tumor-3.nii.gz"]


# ------------------------------------------------------------------------------------ report
def test_report_numbers_are_those_the_driver_used(tmp_path, tiny_clip):
    """The driver's gate outputs (kept slices, similarity, lead, reason) land in the report unchanged, and
    the JSON file holds exactly the driver's report."""
    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.text import make_prompt
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

    class Recording(VolumeSegmenter):  # the real driver, remembering what its gate returned
        def gate(self, text_embedding, prompt):
            self.gated = super().gate(text_embedding, prompt)
            return self.gated

    image = phantom("oblique").image
    settings = get_preset("fast", ["sam=none", "autocast=false"])
    options = VolumeOptions(mode="per-slice", uncertainty=True, saliency=True, absent_margin=-2.0)
    driver = Recording(tiny_clip, None, settings, options)
    result = driver(image, [make_prompt("brain tumor", absent="a normal brain MRI")])
    report = result.report[0]
    kept, scores, candidates, reason, lead, winner = driver.gated
    assert report["scored"] == candidates.tolist() and report["kept_slices"] == kept.tolist()
    assert report["similarity"] == scores.tolist() and report["lead"] == lead.tolist()
    assert report["reason"] == reason and winner is None and report["absent_winner"] is None
    mask = result.segments[0]["mask"]
    assert report["voxels"] == int(mask.sum()) > 0 and report["found"]
    assert report["volume_ml"] == report["voxels"] * float(np.prod(image.GetSpacing())) / 1000
    assert report["mean_uncertainty"] == pytest.approx(float(result.uncertainty[mask > 0].mean()))
    assert report["mask_slices"] == nonzero_slices(mask, driver.view)
    assert set(report["key_slices"]) <= set(report["mask_slices"]) <= set(report["kept_slices"])
    assert nonzero_slices(result.saliency[0], driver.view) == report["saliency_slices"] == report["kept_slices"]

    models = {"clip": "tiny-random", "sam": None, "random": True}
    path = tmp_path / "r.json"
    evidence.write_report(path, evidence.report_document(result.report, models))
    written = evidence.read_report(path)["prompts"][0]
    assert {k: written[k] for k in report} == report  # floats included: JSON keeps them exactly
    assert written["models"] == models and written["summary"] == evidence.summary_line(report)


def test_cli_report_agrees_with_the_files_it_describes(tmp_path):
    src, document = run_cli(tmp_path, phantom("sagittal").image, "--sam", "none", "--mode", "per-slice")
    entry = document["prompts"][0]
    assert document["input"] == str(src) and document["output"] == str(tmp_path / "out.seg.nrrd")
    segments, reference = read_segmentation(str(tmp_path / "out.seg.nrrd"))
    mask = segments[0]["mask"] > 0
    view = SliceView(reference, "axial")
    assert entry["voxels"] == int(mask.sum())
    assert entry["mask_slices"] == nonzero_slices(mask, view)
    assert entry["volume_ml"] == pytest.approx(mask.sum() * np.prod(reference.GetSpacing()) / 1000)
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "u.nrrd")))
    if entry["voxels"]:
        assert entry["mean_uncertainty"] == pytest.approx(float(uncertainty[mask].mean()), rel=1e-6)
    assert len(entry["similarity"]) == len(entry["scored"]) and entry["lead"] is None  # no absent sentences
    assert entry["summary"] == evidence.summary_line(entry)


def test_absent_sentences_that_win_give_an_empty_segment_and_a_report_that_says_why(tmp_path, tiny_clip):
    src, document = run_cli(tmp_path, phantom("oblique").image, "--no-ensemble", "--absent-if", " | ".join(ABSENT),
                            "--sam", "none", prompts=("liver",))
    entry = document["prompts"][0]
    segments, _ = read_segmentation(str(tmp_path / "out.seg.nrrd"))
    assert segments[0]["name"] == "liver" and segments[0]["mask"].sum() == 0
    assert not entry["found"] and entry["voxels"] == 0 and entry["volume_ml"] == 0
    assert entry["kept_slices"] == [] and entry["saliency_slices"] == [] and entry["mean_uncertainty"] is None
    assert max(entry["lead"]) <= 0 and entry["why"].startswith("absent:")
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s.nrrd"))).max() == 0

    # the winner is the absent sentence closest to the slice where the prompt leads most
    import torch

    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.volume import VolumeSegmenter

    driver = VolumeSegmenter(tiny_clip, None, get_preset("fast", ["sam=none"]))
    driver._prepare(sitk.ReadImage(str(src)))
    _, feats = driver.slice_embeddings()
    best = feats[int(np.argmax(entry["lead"]))].float()
    texts = torch.nn.functional.normalize(tiny_clip.encode_text(list(ABSENT)).float(), dim=1)
    winner = ABSENT[int(torch.argmax(texts @ best))]
    assert entry["absent_winner"] == winner
    assert entry["summary"] == f"not found: no slice matches 'liver' better than '{winner}'"


def test_summary_lines():
    found = {"prompt": "liver", "found": True, "mask_slices": list(range(40, 73)), "slices": 112,
             "volume_ml": 12.44}
    assert evidence.summary_line(found) == "found on slices 40-72, 33 of 112; 12.4 ml"
    found.update(mask_slices=[3, 4, 5, 9], volume_ml=0.25)
    assert evidence.summary_line(found) == "found on slices 3-5, 9, 4 of 112; 0.25 ml"
    # one slice, a tiny mask (issue 33): not "slices 0, 1 of 1; 0.0 ml"
    found.update(mask_slices=[0], slices=1, volume_ml=0.001234)
    assert evidence.summary_line(found) == "found on slice 0 of 1; 0.0012 ml"
    absent = {"prompt": "liver", "found": False, "absent_winner": "a brain MRI", "why": "absent: ..."}
    assert evidence.summary_line(absent) == "not found: no slice matches 'liver' better than 'a brain MRI'"
    gate = {"prompt": "liver", "found": False, "absent_winner": None,
            "why": "no slice reaches the minimum similarity 0.300"}
    assert evidence.summary_line(gate) == "not found: no slice reaches the minimum similarity 0.300"


def test_a_failed_write_leaves_no_output(tmp_path):
    """All outputs are renamed together at the end: when one cannot be put in place, none is."""
    src = tmp_path / "in.nrrd"
    write_volume(str(src), phantom("lps", shape=(3, 24, 24)).image)
    (tmp_path / "r.json").mkdir()  # the report cannot replace a folder
    rc = main(["segment", str(src), "--prompt", "liver", "--output", str(tmp_path / "o.seg.nrrd"), "--sam", "none",
               "--saliency-output", str(tmp_path / "s.nrrd"), "--report-output", str(tmp_path / "r.json")] + FAST)
    assert rc != 0
    assert sorted(os.listdir(tmp_path)) == ["in.nrrd", "r.json"] and not os.listdir(tmp_path / "r.json")


def test_cancel_writes_no_evidence(tmp_path):
    src = tmp_path / "in.nrrd"
    write_volume(str(src), phantom("lps", shape=(10, 32, 32)).image)
    proc = subprocess.Popen([sys.executable, "-m", "MedCLIPSAMLib", "segment", str(src), "--prompt", "brain tumor",
                             "--output", str(tmp_path / "o.seg.nrrd"), "--saliency-output", str(tmp_path / "s.nrrd"),
                             "--report-output", str(tmp_path / "r.json"), "--models", "tiny-random", "--preset", "v1",
                             "--mode", "per-slice", "--no-gate", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until real work has started
        if json.loads(line)["stage"] == "segment":
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert sorted(os.listdir(tmp_path)) == ["in.nrrd"]


# ------------------------------------------------------------------------------------ MRML
@pytest.fixture(scope="module")
def evidence_files(tmp_path_factory):
    """One run's files on an oblique, permuted, anisotropic grid: two prompts, one with absent sentences."""
    tmp = tmp_path_factory.mktemp("evidence")
    image = phantom("coronal", shape=(6, 12, 26), seed=2).image
    src = tmp / "in.nrrd"
    write_volume(str(src), image)
    assert main(["segment", str(src), "--prompt", "brain tumor", "--prompt", "liver", "--no-ensemble",
                 "--absent-if", "a normal brain MRI", "--absent-if", " | ".join(ABSENT), "--absent-margin", "-2",
                 "--output", str(tmp / "out.seg.nrrd"), "--saliency-output", str(tmp / "s.nrrd"),
                 "--uncertainty-output", str(tmp / "u.nrrd"), "--report-output", str(tmp / "r.json"),
                 "--sam", "none", "--mode", "per-slice"] + FAST) == 0
    return tmp


@pytest.fixture
def scene():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()  # the built-in tables (Iron ...), as in Slicer
    colors.SetMRMLScene(scene)
    for _ in range(3):  # what a three-view layout holds
        scene.AddNewNodeByClass("vtkMRMLSliceNode")
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    yield scene  # the colour logic must outlive the test: it removes its tables when deleted
    del colors


def composites(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def show_run(scene, segmentation, files, document):
    """What the Slicer module does after a run: saliency + uncertainty volumes, charts, an overlay."""
    from MedCLIPSAMLib import evidence_mrml

    saliency = {p["prompt"]: evidence_mrml.load_evidence_volume(scene, p["saliency_file"], segmentation, p["prompt"])
                for p in document["prompts"]}
    uncertainty = evidence_mrml.load_evidence_volume(scene, str(files / "u.nrrd"), segmentation, "", "uncertainty")
    charts = evidence_mrml.show_evidence(scene, segmentation, document)
    evidence_mrml.show_overlay(scene, saliency["brain tumor"], opacity=0.4)
    return saliency, uncertainty, charts


def test_overlays_and_charts_are_replaced_on_re_runs_and_removed(scene, evidence_files):
    from MedCLIPSAMLib import evidence_mrml, mrml

    document = evidence.read_report(evidence_files / "r.json")
    volume = mrml.read_volume_into_node(scene, str(evidence_files / "in.nrrd"), "input")
    segmentation = mrml.import_segmentation_file(scene, str(evidence_files / "out.seg.nrrd"), volume)["node"]
    baseline = node_ids(scene)

    saliency, uncertainty, charts = show_run(scene, segmentation, evidence_files, document)
    after_first = node_ids(scene)
    for _ in range(2):
        again = show_run(scene, segmentation, evidence_files, document)
        assert node_ids(scene) == after_first  # updated in place: no extra nodes
        assert again[0]["brain tumor"] is saliency["brain tumor"] and again[2]["liver"] is charts["liver"]

    # saliency and uncertainty: heat maps on the input's exact grid, in the foreground of every view
    for node in (*saliency.values(), uncertainty):
        np.testing.assert_allclose(mrml.ijk_to_ras_from_node(node), mrml.ijk_to_ras_from_node(volume), atol=1e-9)
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == "vtkMRMLColorTableNodeIron"  # no Inferno in this scene
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
        assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.05)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(evidence_files / "s_liver.nrrd")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.sitk_image_from_volume_node(saliency["liver"])),
                                  expected)
    for composite in composites(scene):
        assert composite.GetForegroundVolumeID() == saliency["brain tumor"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    evidence_mrml.show_overlay(scene, uncertainty)  # the other checkbox: replaces it
    assert {c.GetForegroundVolumeID() for c in composites(scene)} == {uncertainty.GetID()}
    evidence_mrml.hide_overlay(scene, saliency["liver"])  # not shown: nothing changes
    assert {c.GetForegroundVolumeID() for c in composites(scene)} == {uncertainty.GetID()}
    evidence_mrml.hide_overlay(scene, uncertainty)
    assert {c.GetForegroundVolumeID() for c in composites(scene)} == {None}

    # charts: similarity and lead (with absent sentences), kept and key slices, from the report's numbers
    for entry in document["prompts"]:
        chart = charts[entry["prompt"]]
        series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        assert [s.GetName() for s in series] == ["kept range", "similarity to the prompt",
                                                 "lead over the absent sentences", "kept slices", "key slices"]
        columns = [s.GetTableNode().GetTable().GetColumnByName(s.GetYColumnName()) for s in series]
        values = [[c.GetValue(i) for i in range(c.GetNumberOfTuples())] for c in columns]
        assert values[1] == entry["similarity"] and values[2] == entry["lead"]
        # the kept range: bars (x: slice) up to the curve's top on exactly the kept slices, a row a slice
        slices = series[0].GetTableNode().GetTable().GetColumnByName("slice")
        assert [int(slices.GetValue(i)) for i in range(slices.GetNumberOfTuples())] == list(range(entry["slices"]))
        top = max(entry["similarity"])
        assert values[0] == [top if k in entry["kept_slices"] else 0.0 for k in range(entry["slices"])]
        assert series[0].GetPlotType() == series[0].PlotTypeScatterBar
        assert chart.GetTitle() == f"'{entry['prompt']}': {entry['summary']}"

    # a later run without absent sentences: the lead series and its table go, nothing else is added
    plain = json.loads(json.dumps(document))
    for entry in plain["prompts"]:
        entry["lead"] = None
    evidence_mrml.show_evidence(scene, segmentation, plain)
    assert len(node_ids(scene)) == len(after_first) - 4
    assert charts["liver"].GetNumberOfPlotSeriesNodes() == 4

    evidence_mrml.show_overlay(scene, saliency["liver"])
    evidence_mrml.remove_evidence(scene, segmentation)
    assert node_ids(scene) == baseline
    assert {c.GetForegroundVolumeID() for c in composites(scene)} == {None}


def test_slicer_perceptual_colour_table_is_preferred(scene, evidence_files):
    """Slicer loads its Inferno table from ColorFiles under the ID vtkMRMLColorLogic gives file tables."""
    import slicer

    from MedCLIPSAMLib import evidence_mrml, mrml

    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetTypeToGrey()
    inferno.SetSingletonTag(slicer.vtkMRMLColorLogic.GetFileColorNodeSingletonTag("Inferno.txt"))
    scene.AddNode(inferno)
    volume = mrml.read_volume_into_node(scene, str(evidence_files / "in.nrrd"), "input")
    segmentation = mrml.import_segmentation_file(scene, str(evidence_files / "out.seg.nrrd"), volume)["node"]
    node = evidence_mrml.load_evidence_volume(scene, str(evidence_files / "s_liver.nrrd"), segmentation, "liver")
    assert node.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt" == inferno.GetID()


def test_a_chosen_plot_point_moves_the_slice_views_to_its_slice(scene, evidence_files):
    import vtk

    from MedCLIPSAMLib import evidence_mrml, mrml

    document = evidence.read_report(evidence_files / "r.json")
    entry = document["prompts"][0]
    volume = mrml.read_volume_into_node(scene, str(evidence_files / "in.nrrd"), "input")
    segmentation = mrml.import_segmentation_file(scene, str(evidence_files / "out.seg.nrrd"), volume)["node"]
    chart = evidence_mrml.update_evidence_chart(scene, segmentation, entry)
    key_series = chart.GetNthPlotSeriesNode(chart.GetNumberOfPlotSeriesNodes() - 1)
    similarity_series = chart.GetNthPlotSeriesNode(1)
    assert [evidence_mrml.slice_of_plot_point(scene, key_series.GetID(), i)
            for i in range(len(entry["key_slices"]))] == entry["key_slices"]
    assert [evidence_mrml.slice_of_plot_point(scene, similarity_series.GetID(), i)
            for i in range(len(entry["scored"]))] == entry["scored"]
    assert evidence_mrml.slice_of_plot_point(scene, key_series.GetID(), 99) is None

    # the RAS position is the centre of slice k along the CLI's slicing axis (coronal storage: not array z)
    image = sitk.ReadImage(str(evidence_files / "in.nrrd"))
    view = SliceView(image, entry["axis"])
    k = entry["key_slices"][0]
    marker = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    view.put(marker, k, np.ones_like(view.get(marker, k)))  # the whole of slice k
    ijk = np.argwhere(marker)[:, ::-1].mean(axis=0)  # its centre, (i, j, k) order
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    ras = evidence_mrml.slice_center_ras(volume, entry["axis"], k)
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)

    # under a parent transform the views go to the transformed (world) position
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)
    matrix.SetElement(2, 3, -7.5)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = evidence_mrml.jump_to_slice(scene, volume, entry["axis"], k)
    np.testing.assert_allclose(world, ras + [5.0, 0.0, -7.5], atol=1e-6)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):  # each view's plane holds the point
        slice_to_ras = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetSliceToRAS()
        normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
        origin = np.array([slice_to_ras.GetElement(r, 3) for r in range(3)])
        assert abs(normal @ (world - origin)) < 1e-6


# ------------------------------------------------------------------------------------ segment-batch
def test_segment_batch_writes_each_cases_saliency_and_report_beside_its_output(tmp_path):
    """segment-batch --saliency-output --report-output: per case CASE-saliency[_<prompt>].nrrd and
    CASE-report.json in the output folder, written by the same code as `segment` (the report names the
    case's own files; the saliency is on the case's grid)."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for i, direction in enumerate(("oblique", "ras")):
        write_volume(str(cases / f"case{i}.nrrd"), phantom(direction, shape=(3, 12, 12), seed=i).image)
    out = tmp_path / "out"
    assert main(["segment-batch", str(cases), "--output-dir", str(out), "--prompt", "brain tumor", "--prompt",
                 "ventricles", "--saliency-output", "--report-output", "--sam", "none", "--mode", "carry",
                 "--key-slices", "1"]
                + FAST) == 0
    assert sorted(os.listdir(out)) == sorted(
        f"case{i}{suffix}" for i in range(2) for suffix in (".seg.nrrd", "-report.json",
                                                            "-saliency_brain-tumor.nrrd", "-saliency_ventricles.nrrd"))
    for i in range(2):
        report = evidence.read_report(out / f"case{i}-report.json")
        assert report["input"] == str(cases / f"case{i}.nrrd") and report["output"] == str(out / f"case{i}.seg.nrrd")
        assert [p["saliency_file"] for p in report["prompts"]] == [str(out / f"case{i}-saliency_brain-tumor.nrrd"),
                                                                   str(out / f"case{i}-saliency_ventricles.nrrd")]
        original = sitk.ReadImage(str(cases / f"case{i}.nrrd"))
        for entry in report["prompts"]:
            saliency = sitk.ReadImage(entry["saliency_file"])
            assert saliency.GetSize() == original.GetSize() and saliency.GetDirection() == original.GetDirection()
            assert entry["summary"] == evidence.summary_line(entry)
    # without the flags: only the segmentation (a list file of one case)
    (tmp_path / "list.txt").write_text(str(cases / "case0.nrrd") + "\n")
    plain = tmp_path / "plain"
    assert main(["segment-batch", str(tmp_path / "list.txt"), "--output-dir", str(plain), "--prompt", "brain tumor",
                 "--sam", "none", "--mode", "carry", "--key-slices", "1"] + FAST) == 0
    assert os.listdir(plain) == ["case0.seg.nrrd"]
    # documented in --help
    from MedCLIPSAMLib.cli import build_parser

    batch = build_parser()._subparsers._group_actions[0].choices["segment-batch"]
    helps = {a.dest: a.help for a in batch._actions}
    assert "CASE-saliency.nrrd" in helps["saliency_output"] and "CASE-report.json" in helps["report_output"]
