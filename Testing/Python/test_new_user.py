"""What a new user hit (issue 33): one default preset everywhere, the README's phantoms flow on what
`phantoms make` writes, evaluate's label pair, and the small things (summary wording, volumes of tiny masks,
`serve --help`)."""

import ast
import contextlib
import io
import re
from pathlib import Path

from MedCLIPSAMLib.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subparsers(sub))


def test_one_default_preset_everywhere_shown_in_every_help():
    from MedCLIPSAMLib.pipeline.presets import DEFAULT_PRESET
    from MedCLIPSAMLib.pipeline.session import SegmentRequest

    assert DEFAULT_PRESET == "v2"
    with_preset = {}
    for name, sub in subparsers(build_parser()):
        for action in sub._actions:
            if "--preset" in action.option_strings:
                with_preset[name] = (action.default, sub.format_help())
    assert {"segment", "segment-batch", "segment-image", "pseudo-label"} <= set(with_preset)
    for name, (default, text) in with_preset.items():
        assert default == "v2", name
        assert "default: v2" in " ".join(text.split()), name
    assert SegmentRequest(["liver"]).preset == "v2"
    # the service API's default and the Slicer panel's (read from the source: the panel needs Slicer)
    api = ast.parse((ROOT / "MedCLIPSAMLib/service/api.py").read_text())
    job = next(n for n in ast.walk(api) if isinstance(n, ast.ClassDef) and n.name == "JobBody")
    preset = next(s for s in job.body if isinstance(s, ast.AnnAssign) and s.target.id == "preset")
    assert preset.value.args[0].value == "v2"
    panel = ast.parse((ROOT / "MedCLIPSAM/MedCLIPSAM.py").read_text())
    defaults = [s.value.value for n in ast.walk(panel) if isinstance(n, ast.ClassDef)
                for s in n.body if isinstance(s, ast.AnnAssign) and getattr(s.target, "id", "") == "preset"]
    assert defaults == ["v2"]
    import inspect

    from MedCLIPSAMLib.pipeline.image import segment_image

    assert inspect.signature(segment_image).parameters["preset"].default == "v2"


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), [ln for ln in err.getvalue().splitlines() if ln.strip()]


def test_serve_help_shows_the_limits_defaults():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert re.search(r"--max-volumes MAX_VOLUMES volumes held at once; the least recently used is forgotten "
                     r"\(default 8\)", text)
    assert re.search(r"--max-upload-mb MAX_UPLOAD_MB largest volume accepted, in MB: .* \(default 1024\)", text)


def readme_phantom_flow():
    """The command lines of the README's phantom flow (the bash block after 'The whole flow on a phantom')."""
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("The whole flow on a phantom"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip().startswith("medclipsam ")]
    return [shlex.split(ln)[1:] for ln in lines]


def test_the_readme_phantom_flow_runs_as_written(tmp_path, monkeypatch):
    import json

    import numpy as np

    from MedCLIPSAMLib.io import read_segmentation

    commands = readme_phantom_flow()
    assert [c[0] for c in commands] == ["phantoms", "segment", "pseudo-label", "evaluate", "evaluate"]
    monkeypatch.chdir(tmp_path)
    said = []
    for argv in commands:
        code, out, err = run(argv)
        assert code == 0, (argv, err)
        said.append(out)
    # phantoms make wrote the image and its ground truth side by side: the flow read the image as the input
    # and the .seg.nrrd as the reference
    assert sorted(p.name for p in (tmp_path / "ph").iterdir()) == ["captions.json", "mr_000.nrrd", "mr_000.seg.nrrd"]
    assert json.loads((tmp_path / "pl" / "pseudo_labels.json").read_text())["selected"] == ["mr_000"]
    assert (tmp_path / "pl" / "labels.txt").read_text() == "labels/mr_000.nrrd\n"
    # evaluate scored the tumour (the phantom's 'tumor' segment), not every labelled voxel
    segments, _ = read_segmentation(str(tmp_path / "mr_000.seg.nrrd"))
    truth = {s["name"]: s["mask"] > 0 for s in read_segmentation(str(tmp_path / "ph" / "mr_000.seg.nrrd"))[0]}
    pred = segments[0]["mask"] > 0
    dice = 2 * (pred & truth["tumor"]).sum() / (pred.sum() + truth["tumor"].sum())
    assert f"mr_000   {dice:.4f}" in said[3]
    # without the pair, the 5-label reference is refused in one sentence
    code, out, err = run(["evaluate", "--pred", "mr_000.seg.nrrd", "--gt", "ph"])
    assert code == 2 and err == [
        f"medclipsam: error: reference '{Path('ph') / 'mr_000.seg.nrrd'}' holds 5 labels ('head', 'skull', 'brain', "
        "'ventricles', 'tumor'); say which to score with --label PRED=REF (the prediction's segment = the "
        "reference's, e.g. --label 'brain tumor=tumor'), or --label NAME when both name it alike"]


def test_folder_readers_never_take_a_segmentation_for_an_image(tmp_path):
    from MedCLIPSAMLib.cli.segment import _batch_inputs
    from MedCLIPSAMLib.training.medclipseg_data import expand_inputs
    from MedCLIPSAMLib.training.weak_data import list_inputs

    for name in ("a.nrrd", "a.seg.nrrd", "b.nii.gz", "b.seg.nrrd", "c.nrrd", "captions.json"):
        (tmp_path / name).write_bytes(b"")
    images = [str(tmp_path / n) for n in ("a.nrrd", "b.nii.gz", "c.nrrd")]
    assert list_inputs(str(tmp_path), "inputs", role="images") == images
    assert _batch_inputs(str(tmp_path)) == images
    assert expand_inputs(str(tmp_path), "image") == images
    labels = [str(tmp_path / n) for n in ("a.seg.nrrd", "b.seg.nrrd", "c.nrrd")]
    assert list_inputs(str(tmp_path), "references", False, role="labels") == labels
    assert expand_inputs(str(tmp_path), "label") == labels
    code, out, err = run(["pseudo-label", str(tmp_path / "a.seg.nrrd"), "--prompt", "tumor", "--output-dir",
                          str(tmp_path / "pl"), "--models", "tiny-random"])
    assert code == 2 and err == [f"medclipsam: error: inputs '{tmp_path / 'a.seg.nrrd'}' is a segmentation "
                                 "(.seg.nrrd), not an image; give the image it segments"]


def test_evaluate_label_pairs(tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from MedCLIPSAMLib.io import write_labelmap, write_segmentation
    from MedCLIPSAMLib.training.evaluation import evaluate_files

    ref = sitk.Image(8, 8, 4, sitk.sitkUInt8)
    tumor = np.zeros((4, 8, 8), np.uint8)
    tumor[1:3, 2:5, 2:5] = 1
    brain = np.zeros_like(tumor)
    brain[:, 1:7, 1:7] = 1
    write_segmentation(tmp_path / "gt.seg.nrrd", [{"name": "brain", "mask": brain}, {"name": "tumor", "mask": tumor}], ref)
    write_segmentation(tmp_path / "pred.seg.nrrd", [{"name": "brain tumor", "mask": tumor}], ref)
    pair = evaluate_files([str(tmp_path / "pred.seg.nrrd")], [str(tmp_path / "gt.seg.nrrd")], label="brain tumor=tumor")
    assert pair["cases"][0]["dice"] == 1.0
    same = evaluate_files([str(tmp_path / "gt.seg.nrrd")], [str(tmp_path / "gt.seg.nrrd")], label="tumor")
    assert same["cases"][0]["dice"] == 1.0
    # a one-label reference needs no --label; a multi-label labelmap without one is refused
    write_labelmap(tmp_path / "one.nrrd", tumor, ref)
    assert evaluate_files([str(tmp_path / "pred.seg.nrrd")], [str(tmp_path / "one.nrrd")])["cases"][0]["dice"] == 1.0
    write_labelmap(tmp_path / "two.nrrd", brain + tumor, ref)
    code, out, err = run(["evaluate", "--pred", str(tmp_path / "pred.seg.nrrd"), "--gt", str(tmp_path / "two.nrrd")])
    assert code == 2 and err[0].startswith(f"medclipsam: error: reference '{tmp_path / 'two.nrrd'}' holds 2 labels "
                                           "(1, 2); say which to score with --label PRED=REF")
    code, out, err = run(["evaluate", "--pred", str(tmp_path / "pred.seg.nrrd"), "--gt", str(tmp_path / "two.nrrd"),
                          "--label", "=2"])
    assert code == 2 and err == ["medclipsam: error: --label '=2' needs a label on both sides of '=': PRED=REF, "
                                 "e.g. --label 'brain tumor=tumor'"]


def test_a_failed_download_leaves_no_folder_and_list_and_verify_agree(tmp_path, monkeypatch):
    import huggingface_hub  # noqa: F401  imported while HF_HUB_OFFLINE=1: its client refuses the network

    from MedCLIPSAMLib.models.registry import DEFAULT_CLIP

    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path))
    monkeypatch.delenv("MEDCLIPSAM_OFFLINE", raising=False)   # so that download() gets as far as the hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, out, err = run(["models", "download", DEFAULT_CLIP])
    assert code == 2 and len(err) == 1 and err[0].startswith("medclipsam: error: cannot reach the model hub for ")
    assert not (tmp_path / "models" / DEFAULT_CLIP).exists()
    code, out, err = run(["models", "verify"])
    assert code == 0 and out.strip() == "no models in the cache yet"
    code, out, err = run(["models", "list"])
    row = next(ln for ln in out.splitlines() if ln.startswith(DEFAULT_CLIP + " "))
    assert row.split()[4] == "no"
    # a model folder holding a file is a (partial) model for both
    (tmp_path / "models" / DEFAULT_CLIP).mkdir(parents=True)
    (tmp_path / "models" / DEFAULT_CLIP / "open_clip_config.json").write_text("{}")
    code, out, err = run(["models", "list"])
    assert next(ln for ln in out.splitlines() if ln.startswith(DEFAULT_CLIP + " ")).split()[4] == "partial"
    code, out, err = run(["models", "verify"])
    assert code == 1 and out.startswith(f"{DEFAULT_CLIP}: FAILED: ")
