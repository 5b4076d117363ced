"""How a segmentation computes on a CPU: the OpenMP wait policy set before torch loads, the precision per
stage, and both shown in the log and the report (decisions only, no timings: benchmarks/contention.py)."""

import json
import os
import subprocess
import sys

import pytest

from MedCLIPSAMLib import runtime
from MedCLIPSAMLib.io import write_volume
from MedCLIPSAMLib.phantoms import make_volume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("device, setting, native, expected, reason", [
    ("cpu", "auto", True, "bf16", "auto: this CPU computes bf16 natively (avx512_bf16 or amx_bf16)"),
    ("cpu", "auto", False, "fp32", "auto: this CPU has no native bf16 (it would be emulated: slower)"),
    ("cpu", False, True, "fp32", "autocast=false was asked for"),
    ("cpu", True, False, "bf16", "autocast=true was asked for"),
    ("cuda", "auto", False, "bf16", "auto: bf16 on cuda"),
    ("mps", "auto", False, "fp16", "auto: fp16 on mps"),
])
def test_precision_per_stage(device, setting, native, expected, reason):
    precision, why = runtime.precision_plan(device, setting, native)
    assert precision == {"gate": expected, "saliency": expected, "sam": expected}
    assert why == reason


def test_a_wait_policy_from_the_environment_is_kept_and_none_is_set_once_torch_runs(monkeypatch):
    import torch  # noqa: F401  (loaded: too late to set a policy in this process)

    monkeypatch.setattr(runtime, "openmp_setup", dict(runtime.openmp_setup))
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runtime.prepare_openmp(env) == {"omp_wait_policy": "ACTIVE", "set_by": "environment", "before_torch": False}
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "300000"}   # GNU OpenMP's own knob counts as a choice too
    assert runtime.prepare_openmp(env)["omp_wait_policy"] == "GOMP_SPINCOUNT=300000"
    assert env == {"GOMP_SPINCOUNT": "300000"}
    env = {}
    assert runtime.prepare_openmp(env)["set_by"] is None and env == {}


def test_segment_sets_passive_before_torch_loads_and_reports_it(tmp_path):
    # a real `medclipsam segment` process: libgomp prints the settings it started with (OMP_DISPLAY_ENV),
    # so this sees what the OpenMP runtime itself uses, not only our variable
    src, out, report = tmp_path / "in.nrrd", tmp_path / "out.seg.nrrd", tmp_path / "r.json"
    write_volume(str(src), make_volume("mr", shape=(4, 32, 32), seed=1, lesion={"size": "large"}).image)
    env = dict(os.environ, PYTHONPATH=REPO, MEDCLIPSAM_OFFLINE="1", OMP_DISPLAY_ENV="VERBOSE")
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MEDCLIPSAM_THREADS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "segment", str(src), "--prompt", "brain tumor",
                           "--output", str(out), "--preset", "v2", "--key-slices", "1", "--models", "tiny-random",
                           "--device", "cpu", "--threads", "1", "--progress", "none", "--report-output", str(report)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "OPENMP DISPLAY ENVIRONMENT" in proc.stderr:   # GNU OpenMP (Linux wheels): passive means no spinning
        assert "GOMP_SPINCOUNT = '0'" in proc.stderr
    precision, reason = runtime.precision_plan("cpu", "auto", runtime.cpu_has_native_bf16())
    p = precision["gate"]
    assert (f"runtime: cpu, 1 threads, OpenMP wait policy PASSIVE (set by medclipsam); gate {p}, saliency {p}, "
            f"sam {p} ({reason}); SAM2 encoder in torch (cpu_runtime=torch)") in proc.stderr
    document = json.loads(report.read_text())
    assert document["runtime"] == {"device": "cpu", "threads": 1, "usable_cpus": runtime.usable_cpus(),
                                   "omp_wait_policy": "PASSIVE", "wait_policy_set_by": "medclipsam",
                                   "precision": precision, "reason": reason,
                                   "cpu_runtime": {"sam_encoder": "torch", "reason": "cpu_runtime=torch"}}
