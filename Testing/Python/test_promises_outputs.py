"""segment-batch writes each case's outputs together or none: a case whose evidence cannot be written
leaves no .seg.nrrd (which a resumed batch would skip as done), the batch goes on with the next case and
says in one line why that case was skipped, and the resumed batch segments exactly that case."""

import contextlib
import io
import os

from MedCLIPSAMLib.cli import main
from MedCLIPSAMLib.io import write_volume
from MedCLIPSAMLib.phantoms import make_volume

FAST = ["--models", "tiny-random", "--preset", "fast", "--progress", "none", "--device", "cpu", "--sam", "none",
        "--mode", "carry", "--key-slices", "1", "--gate-min-similarity", "1.0"]   # no slice segmented: cheap


def batch(cases, out):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["segment-batch", str(cases), "--output-dir", str(out), "--prompt", "liver",
                     "--saliency-output", "--report-output"] + FAST)
    return code, stdout.getvalue(), stderr.getvalue()


def test_a_case_whose_evidence_write_fails_leaves_nothing_and_is_redone_on_resume(tmp_path, tiny_clip):
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    out.mkdir()
    for i in range(3):
        write_volume(str(cases / f"case{i}.nrrd"),
                     make_volume("mr", shape=(2, 12, 12), spacing=(1.0, 1.0, 2.0), seed=i).image)
    (out / "case1-report.json").mkdir()          # case1's report cannot replace a folder
    code, stdout, stderr = batch(cases, out)
    assert code == 1 and "Traceback" not in stderr + stdout
    done = [f"case{i}{s}" for i in (0, 2) for s in (".seg.nrrd", "-report.json", "-saliency.nrrd")]
    assert sorted(os.listdir(out)) == sorted(done + ["case1-report.json"])
    assert not os.listdir(out / "case1-report.json")
    skipped = [line for line in stdout.splitlines() if line.startswith(str(cases / "case1.nrrd"))]
    assert len(skipped) == 1 and skipped[0].startswith(f"{cases / 'case1.nrrd'}: skipped: ") and \
        "case1-report.json" in skipped[0]
    # resumed once the folder is gone: case1 alone is segmented, the others are skipped as done
    os.rmdir(out / "case1-report.json")
    code, stdout, stderr = batch(cases, out)
    assert code == 0, stdout + stderr
    assert "1 to segment, 2 already done" in stdout
    assert sorted(os.listdir(out)) == sorted(f"case{i}{s}" for i in range(3)
                                             for s in (".seg.nrrd", "-report.json", "-saliency.nrrd"))
