"""What a new user hit (issue 33): one default preset everywhere, the README's phantoms flow on what
`phantoms make` writes, evaluate's label pair, and the small things (summary wording, volumes of tiny masks,
`serve --help`)."""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

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
    from MedCLIPSAMLib.pipeline.image import segment_image
    import inspect

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
    assert re.search(r"--max-upload-mb MAX_UPLOAD_MB largest volume upload accepted, in MB \(default 1024\)", text)
