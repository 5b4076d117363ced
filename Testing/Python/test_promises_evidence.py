"""The "not found" reason names what actually happened, in every branch of the volume driver's decision,
and the same sentence reaches the report's summary, the Slicer module's summary line and the chart title:
- the volume has no non-blank slice;
- no slice matched (the gate: no slice reaches the minimum similarity);
- the absent sentences won (the summary names the sentence that won);
- slices were kept but the saliency and SAM gave no mask on the key slices tried;
- key slices had masks but the 3D clean-up removed every component.
Each branch is produced for real (tiny-random CLIP, no SAM), not by writing a report by hand."""

import json
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from MedCLIPSAMLib import evidence
from MedCLIPSAMLib.phantoms import make_volume
from MedCLIPSAMLib.pipeline.session import SegmentRequest
from MedCLIPSAMLib.pipeline.volume import VolumeSegmenter

ABSENT = ["a chest x-ray", "a photograph of a cat"]
# without SAM the driver segments slice by slice: every kept slice is a key slice tried
BASE = {"preset": "fast", "sam": "none", "prompts": ["liver"], "no_ensemble": True}


@pytest.fixture(scope="module")
def image():
    return make_volume("mr", shape=(2, 24, 24), spacing=(1.0, 1.0, 2.0), direction="oblique", seed=1).image


def run(tiny_clip, image, **options):
    prompts, settings, opts = SegmentRequest(**BASE, **options).validate()
    report = VolumeSegmenter(tiny_clip, None, settings, opts)(image, prompts).report[0]
    return evidence.report_document([report], {"clip": "tiny-random", "sam": None, "random": True})["prompts"][0]


def expected(branch):
    """(options, the reason the report must give, the summary line) for one branch."""
    if branch == "blank":
        return {}, "the volume has no non-blank slice", "not found: the volume has no non-blank slice"
    if branch == "no slice matched":
        why = "no slice reaches the minimum similarity 1.000"
        return {"gate_min_similarity": 1.0}, why, f"not found: {why}"
    if branch == "absent won":
        return {"absent_if": [" | ".join(ABSENT)], "absent_margin": 10.0}, None, None   # checked below
    # saliency -> a threshold no map reaches (no mask) / that each min-max normalised map passes (a mask on each
    # key slice: its maximum is 1; sub-settings are non-negative since overrides are typed)
    if branch == "no mask on the key slices":
        return ({"overrides": ["postprocess=threshold", "postprocess_settings.threshold=2"], "no_gate": True},
                "the saliency and SAM gave no mask on the 2 slices tried",
                "not found: the saliency and SAM gave no mask on the 2 slices tried")
    why = "the 3D clean-up removed every component (each under 1e+12 mm^3 or not meeting a key slice's mask)"
    return ({"overrides": ["postprocess=threshold", "postprocess_settings.threshold=0"], "no_gate": True,
             "min_size_mm3": 1e12}, why, f"not found: {why}")


BRANCHES = ["blank", "no slice matched", "absent won", "no mask on the key slices", "clean-up removed all"]


@pytest.mark.parametrize("branch", BRANCHES)
def test_the_not_found_reason_names_the_branch_taken(tiny_clip, image, branch, tmp_path):
    if branch == "blank":
        blank = sitk.Image(image.GetSize(), sitk.sitkFloat32)
        blank.CopyInformation(image)
        image = blank
    options, why, summary = expected(branch)
    entry = run(tiny_clip, image, **options)
    assert not entry["found"] and entry["voxels"] == 0
    if branch == "absent won":
        # the sentence that won is one of the absent sentences, and the prompt never led by the margin
        assert entry["absent_winner"] in ABSENT and max(entry["lead"]) <= 10.0
        why_start = f"absent: '{entry['absent_winner']}' fits better than the prompt (best lead "
        assert entry["why"].startswith(why_start) and entry["why"].endswith(", needed > +10.000)")
        summary = f"not found: no slice matches 'liver' better than '{entry['absent_winner']}'"
    else:
        assert entry["absent_winner"] is None and entry["why"] == why
    if branch == "no mask on the key slices":
        assert entry["kept"] == 2 and entry["saliency_slices"] == [0, 1] and entry["key_slices"] == []
    if branch == "clean-up removed all":
        assert entry["key_slices"] == [0, 1]
    assert entry["summary"] == summary

    # the Slicer module: the summary line of the panel and the chart's title, from the report file
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
    from MedCLIPSAMModuleLib import results

    from MedCLIPSAMLib import evidence_mrml

    scene = slicer.vtkMRMLScene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "run")
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"version": 1, "input": None, "output": None, "prompts": [entry]}))
    _report, summaries, _saliency = results.importEvidence(scene, segmentation, reportPath=str(path))
    assert summaries == {"liver": summary}
    chart = evidence_mrml.update_evidence_chart(scene, segmentation, entry)
    assert chart.GetTitle() == f"'liver': {summary}"
