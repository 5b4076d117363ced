"""No cached answer for a different question.

- The session's caches (slice embeddings per axis and intensity window; results only for an identical
  request): two jobs that differ only in window, only in axis or only in their "absent if" sentences each
  get their own answer, equal to the same request computed with no cache at all. Through the service's
  core (Service.submit -> the job queue -> Session) as a client's jobs run, and through the Session.
- The text-embedding disk cache is kept per model: a CLIP fine-tuned with finetune-clip keeps the base
  model's file names, so two models whose files have the same names but other weights must not share
  vectors.
- The Slicer module reuses an upload while the volume's voxels and geometry are unchanged: a moved origin,
  a turned direction or another spacing (voxels untouched) makes the next run upload again.
"""

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from MedCLIPSAMLib.io import write_volume
from MedCLIPSAMLib.phantoms import make_volume
from MedCLIPSAMLib.pipeline.session import SegmentRequest, Session, pick_axis
from MedCLIPSAMLib.pipeline.volume import VolumeSegmenter

# what is compared is what the caches hold: the slice embeddings (each slice's similarity to the prompt,
# its lead over the absent sentences) and the report; no slice reaches similarity 1, so no slice goes on to
# saliency (which would only add minutes on a CPU)
BASE = {"preset": "fast", "sam": "none", "prompts": ["liver"], "gate_min_similarity": 1.0}


@pytest.fixture(scope="module")
def session(tiny_clip):
    return Session("tiny-random", None, "cpu")


@pytest.fixture(scope="module")
def ct():
    # a CT in HU: the soft-tissue and lung windows give different slice images
    return make_volume("ct", shape=(4, 10, 12), spacing=(0.9, 0.8, 2.5), origin=(3.0, -7.0, 11.0),
                       direction="oblique", seed=3).image


def uncached(session, image, request):
    """The same request computed from scratch: no session cache in the way."""
    prompts, settings, options = request.validate()
    options = dataclasses.replace(options, axis=pick_axis(image, options.axis))
    return VolumeSegmenter(session.clip, None, settings, options)(image, prompts)


def assert_same_answer(result, reference):
    for got, want in zip(result.report, reference.report, strict=True):
        assert (got["axis"], got["absent"], got["kept_slices"], got["found"]) == \
            (want["axis"], want["absent"], want["kept_slices"], want["found"])
        np.testing.assert_allclose(got["similarity"], want["similarity"], rtol=0, atol=1e-5)
        if want["lead"] is not None:
            np.testing.assert_allclose(got["lead"], want["lead"], rtol=0, atol=1e-5)
    for got, want in zip(result.segments, reference.segments, strict=True):
        np.testing.assert_array_equal(got["mask"], want["mask"])


@pytest.mark.parametrize("first, second", [
    ({"window": "soft_tissue"}, {"window": "lung"}),
    ({"axis": "axial"}, {"axis": "coronal"}),
    ({"absent_if": ["a normal abdomen CT without a liver"]}, {"absent_if": ["a chest x-ray of the lungs"]}),
], ids=["window", "axis", "absent-if"])
def test_jobs_differing_in_one_option_get_their_own_answer(session, ct, first, second):
    volume = session.add_volume(ct)
    try:
        a, b = SegmentRequest(**BASE, **first), SegmentRequest(**BASE, **second)
        result_a = session.segment(volume, *a.validate())
        result_b = session.segment(volume, *b.validate())
        reference_b = uncached(session, ct, b)
        # the two questions have different answers (else this test could not tell them apart)
        assert result_a.report[0]["similarity"] != reference_b.report[0]["similarity"] or \
            result_a.report[0]["absent"] != reference_b.report[0]["absent"]
        assert_same_answer(result_b, reference_b)
        # and asking the first again gives the first's answer, from the cache
        hits = session.cache.hits
        again = session.segment(volume, *a.validate())
        assert again is result_a and session.cache.hits == hits + 1
    finally:
        session.forget(volume)


def test_service_jobs_differing_only_in_window_get_their_own_report(session, ct, tmp_path):
    from MedCLIPSAMLib.service.core import Service

    service = Service(session, 1 << 30)
    try:
        path = tmp_path / "ct.nrrd"
        write_volume(path, ct)
        volume = service.add_volume(str(path))["volume_id"]   # the upload as the server saved it
        reports = {}
        for window in ("soft_tissue", "lung"):
            job = service.submit(volume, SegmentRequest(**BASE, window=window))
            deadline = time.monotonic() + 300
            while service.job(job["job_id"]).state not in ("done", "failed", "cancelled"):
                assert time.monotonic() < deadline, "the job did not end"
                time.sleep(0.02)
            done = service.job(job["job_id"])
            assert done.state == "done", done.error
            reports[window] = done.output["report"][0]
        for window in ("soft_tissue", "lung"):
            want = uncached(session, ct, SegmentRequest(**BASE, window=window)).report[0]
            np.testing.assert_allclose(reports[window]["similarity"], want["similarity"], rtol=0, atol=1e-5)
            assert reports[window]["kept_slices"] == want["kept_slices"]
    finally:
        service.close()


# -- the text-embedding disk cache, per model ---------------------------------------------------------------
def test_two_models_with_the_same_file_names_but_other_weights_do_not_share_text_embeddings(tiny_clip, tmp_path,
                                                                                            monkeypatch):
    """A fine-tuned CLIP is a folder with the base model's file names and other weights (finetune-clip)."""
    import torch

    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.pipeline import text_cache
    from MedCLIPSAMLib.pipeline.text import TextEmbeddings
    from MedCLIPSAMLib.training.clip_finetune import export_clip_folder

    monkeypatch.setenv(text_cache.ENV, str(tmp_path / "text"))
    # finetune-clip's own export: the base folder's file names, the tuned weights, a checksum manifest
    tuned_model = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        for p in tuned_model.parameters():
            p.add_(0.05)
    tuned = tmp_path / "tuned"
    export_clip_folder(tuned_model, tiny_clip.folder, tuned)
    assert sorted(p.name for p in tuned.rglob("*") if p.is_file()) == \
        sorted(p.name for p in Path(tiny_clip.folder).rglob("*") if p.is_file())
    other = load_clip(str(tuned), "cpu")
    sentences = ("a CT of the liver", "an axial slice showing the liver")
    TextEmbeddings(tiny_clip).sentences(sentences)                     # the base model's vectors on disk
    reference = TextEmbeddings(other, disk=False).sentences(sentences)  # the tuned model's own
    assert not torch.allclose(reference, TextEmbeddings(tiny_clip, disk=False).sentences(sentences), atol=1e-3)
    got = TextEmbeddings(other).sentences(sentences)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)


# -- the Slicer module's upload: reused only while voxels and geometry are unchanged -----------------------
@pytest.mark.parametrize("change", ["origin", "direction", "spacing"])
def test_a_moved_turned_or_rescaled_volume_is_uploaded_again(change):
    """Apply (ServiceBackend.sentVolume) and the clicks (RefineLogic) both decide on ServiceBackend.stamp;
    the voxels stay as they are (their MTime too): only the geometry changes."""
    import types

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedCLIPSAM"))
    from MedCLIPSAMModuleLib.clickrefine import RefineLogic
    from MedCLIPSAMModuleLib.servicebackend import ServiceBackend

    from MedCLIPSAMLib import mrml

    scene = slicer.vtkMRMLScene()
    image = make_volume("mr", shape=(4, 12, 10), spacing=(1.1, 0.9, 3.0), origin=(10.0, -20.0, 5.0),
                        direction="oblique", seed=0).image
    node = mrml.volume_node_from_sitk(scene, image, "phantom")
    client = object()
    backend = ServiceBackend(types.SimpleNamespace(scene=scene))
    backend.remember(node.GetID(), ServiceBackend.stamp(node), "upload-1", client)
    refine = RefineLogic(scene, service=None)
    refine.rememberUpload(node, "upload-1")
    # unchanged: both reuse the upload
    assert backend.sentVolume(node.GetID(), ServiceBackend.stamp(node), client) == "upload-1"
    assert refine._request(node, None, None, None, None).volumeId == "upload-1"

    voxels = node.GetImageData().GetMTime()
    if change == "origin":
        node.SetOrigin(*(np.array(node.GetOrigin()) + [0.0, 0.0, 2.5]))
    elif change == "direction":
        import vtk

        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASDirectionMatrix(matrix)
        turned = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(matrix, _rotation_z(np.pi / 2), turned)
        node.SetIJKToRASDirectionMatrix(turned)
    else:
        node.SetSpacing(*(np.array(node.GetSpacing()) * [1.0, 1.0, 0.5]))
    assert node.GetImageData().GetMTime() == voxels      # the voxels did not change

    assert backend.sentVolume(node.GetID(), ServiceBackend.stamp(node), client) is None
    assert backend._forget == [(client, "upload-1")]    # and the stale upload is dropped at the service
    request = refine._request(node, None, None, None, None)
    assert request.volumeId is None
    # the upload it makes instead carries the new geometry
    sent = request.image
    want = mrml.sitk_image_from_volume_node(node)
    assert sent.GetOrigin() == want.GetOrigin() and sent.GetDirection() == want.GetDirection() and \
        sent.GetSpacing() == want.GetSpacing()
    assert (sent.GetOrigin(), sent.GetDirection(), sent.GetSpacing()) != \
        (image.GetOrigin(), image.GetDirection(), image.GetSpacing())


def _rotation_z(angle):
    import vtk

    m = vtk.vtkMatrix4x4()
    c, s = np.cos(angle), np.sin(angle)
    for (i, j), v in {(0, 0): c, (0, 1): -s, (1, 0): s, (1, 1): c}.items():
        m.SetElement(i, j, float(v))
    return m
