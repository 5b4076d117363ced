"""The 3D path: slicing in patient space, exact output geometry, the CLI's progress, cancel and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import geometry_equal, read_segmentation, write_volume
from MedCLIPSAMLib.phantoms import make_volume
from MedCLIPSAMLib.pipeline.slices import SliceView

DIRECTIONS = ["lps", "ras", "oblique", "sagittal", "coronal"]
FAST = ["--models", "tiny-random", "--preset", "fast", "--progress", "none", "--device", "cpu"]


def small_phantom(direction="lps", kind="mr", seed=0, shape=(8, 40, 36), spacing=(1.1, 0.9, 3.0), **kw):
    return make_volume(kind, shape=shape, spacing=spacing, origin=(10.0, -20.0, 5.0), direction=direction,
                       seed=seed, **kw)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_slices_are_shown_in_radiological_orientation(direction):
    """The same anatomy looks the same in every storage layout: a left-sided tumour appears on the image's
    right (radiological convention) and the slice count is the number of S-I positions."""
    ph = make_volume("mr", shape=(20, 48, 40), direction=direction, seed=3,
                     lesion={"side": "left", "size": "large"})
    view = SliceView(ph.image, "axial")
    tumor, brain = ph.labels["tumor"], ph.labels["brain"]
    k = max(range(view.count), key=lambda i: view.get(tumor, i).sum())
    t, b = view.get(tumor, k), view.get(brain, k)
    cols = np.arange(t.shape[1])
    tumor_col = (t.sum(0) * cols).sum() / t.sum()
    brain_col = (b.sum(0) * cols).sum() / b.sum()
    assert tumor_col > brain_col, "patient left must be on the image's right"
    # put() is the exact inverse of get()
    out = np.zeros_like(tumor)
    for i in range(view.count):
        view.put(out, i, view.get(tumor, i))
    assert np.array_equal(out, tumor)


# LPS unit vectors: where the image's downward rows and rightward columns must point in the patient
DOWN = {"axial": (0, 1, 0), "coronal": (0, 0, -1), "sagittal": (0, 0, -1)}     # posterior / inferior
RIGHT = {"axial": (1, 0, 0), "coronal": (1, 0, 0), "sagittal": (0, 1, 0)}      # patient left / posterior


def _physical_step(image, view, k, pixel):
    """Physical (LPS) displacement from display pixel (0, 0) to `pixel` on slice k, found by writing a
    marker through SliceView.put and reading its voxel's position from the image's own geometry."""
    points = []
    for where in ((0, 0), pixel):
        volume = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
        plane = np.zeros(SliceView(image, view).get(volume, k).shape, np.uint8)
        plane[where] = 1
        SliceView(image, view).put(volume, k, plane)
        (z, y, x), = np.argwhere(volume)
        points.append(np.array(image.TransformIndexToPhysicalPoint([int(x), int(y), int(z)])))
    return points[1] - points[0]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_views_put_anterior_or_superior_at_the_top(direction, view):
    """Axial: anterior at the top, the patient's right on the image's left; coronal and sagittal: superior at
    the top (coronal: patient right on the left, sagittal: anterior on the left). Checked in patient
    space: one row down and one column right must move mostly along the expected patient direction."""
    ph = make_volume("mr", shape=(6, 10, 8), spacing=(1.1, 0.9, 3.0), direction=direction, seed=0, lesion=False)
    k = SliceView(ph.image, view).count // 2
    for step, expected in ((_physical_step(ph.image, view, k, (1, 0)), DOWN[view]),
                           (_physical_step(ph.image, view, k, (0, 1)), RIGHT[view])):
        unit = step / np.linalg.norm(step)
        assert unit @ np.array(expected) > 0.7, (view, direction, unit.round(3), expected)


@pytest.mark.parametrize("direction,ext", [("oblique", ".nrrd"), ("ras", ".nii.gz"), ("lps", ".mha"),
                                           ("sagittal", ".nrrd")])
def test_output_is_on_the_input_grid(tmp_path, direction, ext):
    ph = small_phantom(direction)
    src = tmp_path / f"in{ext}"
    write_volume(str(src), ph.image)
    out = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(src), "--prompt", "brain tumor", "--prompt", "brain", "--output", str(out),
                 "--sam", "none"] + FAST) == 0
    segments, ref = read_segmentation(str(out))
    original = sitk.ReadImage(str(src))
    assert geometry_equal(ref, original, tol=1e-5)
    assert [s["name"] for s in segments] == ["brain tumor", "brain"]
    assert all(s["mask"].shape == sitk.GetArrayViewFromImage(original).shape for s in segments)


def test_dicom_series_input(tmp_path):
    ph = small_phantom("oblique", kind="ct", shape=(6, 32, 32))
    folder = tmp_path / "dicom"
    folder.mkdir()
    image = sitk.Cast(ph.image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1.99"
    for z in range(image.GetDepth()):
        s = image[:, :, z]
        for tag, value in {"0020|000e": series, "0020|0037": "\\".join(f"{v:.8f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])),
                           "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
                           "0020|0013": str(z + 1), "0008|0060": "CT", "0018|0050": f"{image.GetSpacing()[2]:.6f}",
                           "0028|1052": "0", "0028|1053": "1"}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(s)
    out = tmp_path / "ct.seg.nrrd"
    assert main(["segment", str(folder), "--prompt", "liver", "--output", str(out), "--sam", "none"] + FAST) == 0
    segments, ref = read_segmentation(str(out))
    assert geometry_equal(ref, image, tol=1e-4) and segments[0]["name"] == "liver"
    # a known structure gets its terminology colour
    assert np.allclose(segments[0]["color"], (0.87, 0.51, 0.4), atol=0.01)


def test_seg_nrrd_loads_in_slicer_core(tmp_path):
    slicer = pytest.importorskip("slicer")
    ph = small_phantom("ras")
    src = tmp_path / "in.nrrd"
    write_volume(str(src), ph.image)
    out = tmp_path / "out.seg.nrrd"
    assert main(["segment", str(src), "--prompt", "brain tumor", "--prompt", "left kidney", "--output", str(out),
                 "--sam", "none"] + FAST) == 0
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == ["brain tumor", "left kidney"]


@pytest.mark.parametrize("mode", ["per-slice", "carry", "propagate"])
def test_sam2_modes_run_and_keep_geometry(tmp_path, mode):
    ph = small_phantom("oblique", shape=(5, 36, 32))
    src = tmp_path / "in.nrrd"
    write_volume(str(src), ph.image)
    out, unc = tmp_path / "out.seg.nrrd", tmp_path / "u.nrrd"
    assert main(["segment", str(src), "--prompt", "brain tumor", "--output", str(out), "--mode", mode,
                 "--key-slices", "1", "--uncertainty-output", str(unc)] + FAST) == 0
    segments, ref = read_segmentation(str(out))
    assert geometry_equal(ref, ph.image, tol=1e-5)
    u = sitk.ReadImage(str(unc))
    assert geometry_equal(u, ph.image, tol=1e-5)
    values = sitk.GetArrayFromImage(u)
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1.0


def test_single_slice_rgb_and_constant_volumes(tmp_path, caplog):
    # a single-slice "volume" (an X-ray frame) runs the 2D path
    xray = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (1, 40, 50)).astype(np.uint8))
    write_volume(str(tmp_path / "x.nrrd"), xray)
    assert main(["segment", str(tmp_path / "x.nrrd"), "--prompt", "lung", "--output", str(tmp_path / "x.seg.nrrd"),
                 "--sam", "none"] + FAST) == 0
    segs, ref = read_segmentation(str(tmp_path / "x.seg.nrrd"))
    assert ref.GetSize() == (50, 40, 1)
    # an all-constant volume is valid input and gives an empty segment
    flat = sitk.Image(20, 20, 4, sitk.sitkFloat32) + 7.0
    write_volume(str(tmp_path / "flat.nrrd"), flat)
    assert main(["segment", str(tmp_path / "flat.nrrd"), "--prompt", "liver", "--output",
                 str(tmp_path / "flat.seg.nrrd")] + FAST) == 0
    segs, _ = read_segmentation(str(tmp_path / "flat.seg.nrrd"))
    assert segs[0]["mask"].sum() == 0


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", *args], capture_output=True, text=True, **kw)


def test_json_progress_stream_is_valid_and_ends_with_a_final_record(tmp_path):
    ph = small_phantom("lps", shape=(4, 32, 32))
    write_volume(str(tmp_path / "in.nrrd"), ph.image)
    r = _cli("segment", str(tmp_path / "in.nrrd"), "--prompt", "brain tumor", "--output", str(tmp_path / "o.seg.nrrd"),
             "--models", "tiny-random", "--preset", "fast", "--progress", "json", "--sam", "none")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert records and all(set(rec) == {"stage", "done", "total", "message"} for rec in records)
    assert records[-1]["stage"] == "finished" and "o.seg.nrrd" in records[-1]["message"]
    stages = [rec["stage"] for rec in records]
    assert stages.index("load") < stages.index("gate") < stages.index("write")


def test_sigterm_cancels_cleanly_and_writes_nothing(tmp_path):
    ph = small_phantom("lps", shape=(12, 40, 40))
    write_volume(str(tmp_path / "in.nrrd"), ph.image)
    out = tmp_path / "o.seg.nrrd"
    proc = subprocess.Popen([sys.executable, "-m", "MedCLIPSAMLib", "segment", str(tmp_path / "in.nrrd"), "--prompt",
                             "brain tumor", "--output", str(out), "--models", "tiny-random", "--preset", "v1",
                             "--mode", "per-slice", "--no-gate", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until real work has started
        if json.loads(line)["stage"] == "segment":
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert json.loads(rest.splitlines()[-1])["stage"] == "cancelled"
    assert "Traceback" not in err and "cancelled" in err
    assert sorted(os.listdir(tmp_path)) == ["in.nrrd"]


# Runs the real CLI in a process that sends itself a real SIGTERM from inside the real .seg.nrrd writer, once
# the file is complete on disk: the moment a late cancel check would let a "cancelled" run leave its output.
# Test-only and deterministic (a signal from outside could arrive before or after the short write).
SIGTERM_WHILE_WRITING = """
import os, signal, sys
import MedCLIPSAMLib.io as mio
real = mio.write_segmentation
def write_then_sigterm(*args, **kwargs):
    written = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return written
mio.write_segmentation = write_then_sigterm
from MedCLIPSAMLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_writing_leaves_no_output(tmp_path):
    ph = small_phantom("lps", shape=(4, 32, 32))
    write_volume(str(tmp_path / "in.nrrd"), ph.image)
    r = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_WRITING, "segment", str(tmp_path / "in.nrrd"),
                        "--prompt", "brain tumor", "--output", str(tmp_path / "o.seg.nrrd"), "--uncertainty-output",
                        str(tmp_path / "u.nrrd"), "--sam", "none", *FAST[:4], "--device", "cpu", "--progress", "json"],
                       capture_output=True, text=True)
    assert r.returncode == 130, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    # the signal is answered at once ("stopping", issue 33), then the run ends cancelled
    assert [r["stage"] for r in records[-3:]] == ["write", "stopping", "cancelled"]
    assert sorted(os.listdir(tmp_path)) == ["in.nrrd"]  # neither output nor a temporary file


def _bad(tmp_path, *args):
    """Bad input: exit 2 and the whole of stderr is one sentence (no log lines, warnings or traceback)."""
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("medclipsam: error: ") and "\n" not in err, r.stderr
    return err


def test_bad_input_gets_one_clear_sentence_and_no_output(tmp_path):
    ph = small_phantom("lps", shape=(4, 24, 24))
    good = tmp_path / "in.nrrd"
    write_volume(str(good), ph.image)
    out = tmp_path / "o.seg.nrrd"
    base = ["--models", "tiny-random", "--progress", "none"]
    assert "does not exist" in _bad(tmp_path, "segment", str(tmp_path / "missing.nrrd"), "--prompt", "x", "--output", str(out), *base)
    (tmp_path / "corrupt.nrrd").write_text("NRRD0004\ngarbage\n")
    _bad(tmp_path, "segment", str(tmp_path / "corrupt.nrrd"), "--prompt", "x", "--output", str(out), *base)
    assert "empty" in _bad(tmp_path, "segment", str(good), "--prompt", "   ", "--output", str(out), *base)
    assert "unknown model" in _bad(tmp_path, "segment", str(good), "--prompt", "liver", "--output", str(out),
                                   "--models", "no-such-model,tiny-random", "--progress", "none")
    assert "unknown preset" in _bad(tmp_path, "segment", str(good), "--prompt", "liver", "--output", str(out),
                                    "--preset", "v9", *base)
    assert "cannot write" in _bad(tmp_path, "segment", str(good), "--prompt", "liver", "--output",
                                  str(tmp_path / "no" / "dir" / "o.seg.nrrd"), *base)
    # 4D time series needs --frame
    four_d = sitk.JoinSeries([ph.image, ph.image])
    sitk.WriteImage(four_d, str(tmp_path / "4d.nrrd"))
    assert "--frame" in _bad(tmp_path, "segment", str(tmp_path / "4d.nrrd"), "--prompt", "liver", "--output", str(out), *base)
    # NaN voxels
    arr = sitk.GetArrayFromImage(ph.image).astype(np.float32)
    arr[1, 2, 3] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(ph.image)
    sitk.WriteImage(nan_img, str(tmp_path / "nan.nrrd"))
    assert "NaN" in _bad(tmp_path, "segment", str(tmp_path / "nan.nrrd"), "--prompt", "liver", "--output", str(out), *base)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4d.nrrd", "corrupt.nrrd", "in.nrrd", "nan.nrrd"]


def test_segment_batch_is_resumable(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(2):
        write_volume(str(cases / f"case{i}.nrrd"), small_phantom("lps", seed=i, shape=(3, 24, 24)).image)
    args = ["segment-batch", str(cases), "--prompt", "brain tumor", "--output-dir", str(tmp_path / "out"),
            "--sam", "none"] + FAST
    assert main(args) == 0
    done = sorted(os.listdir(tmp_path / "out"))
    assert done == ["case0.seg.nrrd", "case1.seg.nrrd"]
    stamp = os.path.getmtime(tmp_path / "out" / "case0.seg.nrrd")
    time.sleep(0.01)
    assert main(args) == 0
    assert os.path.getmtime(tmp_path / "out" / "case0.seg.nrrd") == stamp


def test_absolute_gate_gives_an_empty_segment_for_an_absent_target(tmp_path):
    """With a minimum similarity no slice reaches, nothing is segmented and the report says why."""
    ph = small_phantom("lps", shape=(4, 24, 24))
    write_volume(str(tmp_path / "in.nrrd"), ph.image)
    out = tmp_path / "o.seg.nrrd"
    assert main(["segment", str(tmp_path / "in.nrrd"), "--prompt", "liver", "--output", str(out),
                 "--gate-min-similarity", "1.01", "--sam", "none"] + FAST) == 0
    segments, _ = read_segmentation(str(out))
    assert segments[0]["name"] == "liver" and segments[0]["mask"].sum() == 0


def test_absent_sentences_keep_a_target_only_where_a_slice_matches_the_prompt_better(tiny_clip):
    """The presence test against its formula: lead = max over the prompt's sentences of cos(slice, s)
    - max over the absent sentences of cos(slice, a); present iff the best slice's lead > the margin."""
    import dataclasses

    import torch

    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.text import make_prompt
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

    ph = small_phantom("lps", shape=(6, 32, 32), lesion={"side": "left", "size": "large"})
    settings = get_preset("fast", ["sam=none", "autocast=false"])
    absent = ("a normal brain MRI", "a chest x-ray", "an MRI of the brain with no tumor")
    prompt = make_prompt("brain tumor | a glioma on brain MRI", absent=" | ".join(absent))
    assert prompt.sentences == ("brain tumor", "a glioma on brain MRI") and prompt.absent == absent

    def run(prompt, margin=0.0):
        seg = VolumeSegmenter(tiny_clip, None, settings, VolumeOptions(mode="per-slice", absent_margin=margin))
        result = seg(ph.image, [prompt])
        return seg, result.report[0], result.segments[0]["mask"]

    seg, report, _ = run(dataclasses.replace(prompt, absent=()))
    assert not report["reason"].startswith("absent")  # no absent sentences: no presence test
    _, feats = seg.slice_embeddings()

    def cos(texts):
        text = torch.nn.functional.normalize(tiny_clip.encode_text(list(texts)).float(), dim=1)
        return (feats.float() @ text.T).numpy()

    lead = cos(prompt.sentences).max(axis=1) - cos(absent).max(axis=1)
    best = float(lead.max())
    assert np.allclose(seg.presence_lead(feats, prompt), lead, atol=1e-5)

    _, report, mask = run(prompt, margin=best - 1e-4)
    assert not report["reason"].startswith("absent") and report["kept"] > 0
    assert report["kept"] <= 3  # only the best slice wins: it and its neighbours can be kept
    _, report, mask = run(prompt, margin=-2.0)  # every slice wins: the gate alone decides
    _, plain, _ = run(dataclasses.replace(prompt, absent=()))
    assert report["kept"] == plain["kept"]
    _, report, mask = run(prompt, margin=best + 1e-4)
    assert report["reason"].startswith("absent") and report["kept"] == 0 and mask.sum() == 0
    assert f"{best:+.3f}" in report["reason"]
    # one of the prompt's own sentences as an absent one: the lead is at most 0 everywhere, so absent
    _, report, mask = run(dataclasses.replace(prompt, absent=("a glioma on brain MRI", "brain tumor")))
    assert report["reason"].startswith("absent") and mask.sum() == 0


def test_absent_if_on_the_command_line(tmp_path):
    """Once for every prompt or once per prompt; "liver" (as written) against itself is never beaten."""
    ph = small_phantom("lps", shape=(4, 24, 24))
    write_volume(str(tmp_path / "in.nrrd"), ph.image)
    out = tmp_path / "o.seg.nrrd"
    base = ["segment", str(tmp_path / "in.nrrd"), "--prompt", "liver", "--prompt", "brain", "--no-ensemble",
            "--output", str(out), "--sam", "none"] + FAST
    assert main(base + ["--absent-if", "a normal head MRI | liver", "--absent-if", "brain"]) == 0  # paired
    segments, _ = read_segmentation(str(out))
    assert [s["name"] for s in segments] == ["liver", "brain"]
    assert segments[0]["mask"].sum() == 0 and segments[1]["mask"].sum() == 0
    assert main(base + ["--absent-if", "liver | brain"]) == 0  # one set for both: each prompt meets itself
    segments, _ = read_segmentation(str(out))
    assert segments[0]["mask"].sum() == 0 and segments[1]["mask"].sum() == 0
    assert main(base + ["--absent-if", "liver | brain", "--absent-margin", "-2"]) == 0
    segments, _ = read_segmentation(str(out))
    assert segments[0]["mask"].sum() > 0


def test_absent_if_pairs_with_the_prompts_in_order():
    from types import SimpleNamespace

    from MedCLIPSAMLib.cli.segment import make_prompts

    args = SimpleNamespace(prompt=["liver", "brain tumor"], absent_if=["a head MRI", "a normal brain | no mass"])
    liver, tumor = make_prompts(args, ensemble=True)
    assert liver.absent == ("a head MRI",) and tumor.absent == ("a normal brain", "no mass")
    assert tumor.target == "brain tumor" and len(tumor.sentences) > 1  # the ensemble is kept
    args.absent_if = ["a normal scan"]
    assert [p.absent for p in make_prompts(args, ensemble=False)] == [("a normal scan",)] * 2
    args.absent_if = None
    assert [p.absent for p in make_prompts(args, ensemble=False)] == [(), ()]


def test_absent_if_given_a_wrong_number_of_times_is_a_one_line_error(tmp_path, capsys):
    ph = small_phantom("lps", shape=(4, 24, 24))
    write_volume(str(tmp_path / "in.nrrd"), ph.image)
    out = tmp_path / "o.seg.nrrd"
    rc = main(["segment", str(tmp_path / "in.nrrd"), "--prompt", "a", "--prompt", "b", "--prompt", "c",
               "--output", str(out), "--absent-if", "x", "--absent-if", "y"] + FAST)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--absent-if was given 2 times for 3 prompts" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("axis", [0, 2])
def test_mask_cleanup_on_the_bounding_box_equals_the_whole_volume(axis):
    """The 3D clean-up works on the mask's bounding box (memory); it must give the whole-volume result:
    holes filled slice by slice, specks dropped, key-slice components kept, at the box's edges too."""
    from scipy import ndimage

    from MedCLIPSAMLib.pipeline.volume import clean_volume_mask

    rng = np.random.default_rng(axis)
    mask = np.zeros((24, 40, 36), np.uint8)
    blobs = ndimage.gaussian_filter(rng.random((14, 26, 22)), 1.5)
    mask[6:20, 8:34, 10:32] = blobs > np.quantile(blobs, 0.6)     # lumpy components with holes
    mask[14:17, 12:20, 13:21] = 1                                   # a block ...
    mask[15, 14:18, 15:19] = 0                                      # ... with a hole enclosed in both views
    mask[10:14, 20:24, 0:4] = 1                                     # a block on the volume's edge ...
    mask[11, 22, 0] = 0                                             # ... with a notch open to the edge
    mask[22, 2, 30] = 1                                             # a speck
    spacing = (2.0, 1.0, 1.0)
    keys = [15] if axis == 0 else [2]   # meets the inner block only / the edge block only
    for k, largest in ((keys, 0), ((), 1), ((), 0)):
        cropped = clean_volume_mask(mask, axis, spacing, 8.0, k, largest)
        whole = clean_volume_mask(mask, axis, spacing, 8.0, k, largest, crop=False)
        np.testing.assert_array_equal(cropped, whole)
        assert cropped.dtype == bool and not cropped[22, 2, 30]     # the speck is gone
    everything = clean_volume_mask(mask, axis, spacing, 8.0)
    assert everything[15, 16, 16]                      # an enclosed hole is filled
    assert everything[11, 22, 0] == (axis == 2)        # open to the edge in an axial plane, not in a sagittal one
    kept = clean_volume_mask(mask, axis, spacing, 8.0, keys)
    assert kept[15, 16, 16] == (axis == 0)   # the inner block, its hole filled, or dropped
    assert kept[11, 21, 2] == (axis == 2)    # the edge block kept, or dropped
    assert not clean_volume_mask(np.zeros_like(mask), axis, spacing, 8.0, keys).any()


# fast settings of the two saliency methods the key slices use (v2: M2IB, v1: gScoreCAM)
KEY_SLICE_SETTINGS = {"v2": ["saliency_settings.steps=3", "saliency_settings.batch_size=4"],
                      "v1": ["saliency_settings.topk=24"]}


@pytest.mark.parametrize("preset", ["v2", "v1"])
def test_batched_key_slices_equal_the_2d_pipeline_slice_by_slice(tiny_clip, tiny_sam2, preset):
    """The key slices get their saliency in one batch, then the rest slice by slice: each slice's maps,
    coarse mask, prompts, SAM mask and probability are those the 2D pipeline gives it alone, and land on
    that slice. Maps within 1e-5: a batch may round differently (another GEMM blocking, ~1e-7 per step on
    [0, 1] maps; with the tiny model and 3 steps they are bit for bit here), everything derived from them
    exactly. v1's gScoreCAM runs slice by slice inside saliency_maps (saliency.BATCHED_METHODS)."""
    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.text import make_prompt
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

    ph = small_phantom("lps", shape=(8, 48, 40), lesion={"side": "left", "size": "large"})
    settings = get_preset(preset, ["autocast=false"] + KEY_SLICE_SETTINGS[preset])
    seg = VolumeSegmenter(tiny_clip, tiny_sam2, settings,
                          VolumeOptions(mode="carry", key_slices=3, saliency=True, uncertainty=True))
    seg._prepare(ph.image)
    seg.saliency_maps = {}
    prompt = make_prompt("brain tumor", settings.ensemble)
    batched, calls = [], []  # what each key slice got from the rest of the pipeline; the saliency calls
    rest, maps = seg.segmenter.segment_from_saliency, seg.segmenter.saliency_maps
    seg.segmenter.segment_from_saliency = lambda *a: batched.append(rest(*a)) or batched[-1]
    seg.segmenter.saliency_maps = lambda grays, text: calls.append(len(grays)) or maps(grays, text)
    labels, uncertainty = np.zeros(seg.volume.shape, np.uint8), np.zeros(seg.volume.shape, np.float32)
    ranked = [5, 2, 3, 4]  # best first; not in slice order, so a batch put back in the wrong order shows
    keys = seg._key_slices(prompt, ranked, labels, uncertainty)
    assert calls == [3]  # one saliency call for the three key slices

    del seg.segmenter.segment_from_saliency, seg.segmenter.saliency_maps
    alone = [seg.segmenter(seg.gray8(k), prompt) for k in ranked[:3]]
    # the slices' maps differ, so a slice given another slice's map would fail below
    assert min(np.abs(a.saliency - b.saliency).max() for a, b in [alone[:2], alone[1:], alone[::2]]) > 0.05
    assert sorted(seg.saliency_maps) == [2, 3, 5]
    for k, got, want in zip(ranked, batched, alone):
        np.testing.assert_allclose(got.saliency, want.saliency, rtol=0, atol=1e-5)
        np.testing.assert_allclose(seg.saliency_maps[k], want.saliency, rtol=0, atol=1e-5)
        assert np.array_equal(got.coarse_mask, want.coarse_mask) and want.coarse_mask.any()
        for name in ("boxes", "points", "labels"):
            assert np.array_equal(got.prompts[name], want.prompts[name])
        assert np.array_equal(got.mask, want.mask) and np.array_equal(got.probability, want.probability)
        stored = seg.view.get(labels, k)
        assert np.array_equal(stored, want.mask) and (k in keys) == bool(want.mask.any())
    assert any(k in keys for k in ranked[:3])  # SAM found something on a key slice: the masks were compared
    assert labels.sum() == sum(int(keys[k].sum()) for k in keys)  # nothing stored elsewhere
