"""cpu_runtime=openvino: SAM2's image encoder converted to OpenVINO once, checked against PyTorch, cached
under MEDCLIPSAM_HOME by the encoder's identity, and PyTorch whenever the package or the check fails.
Real sam2 and openvino classes with the tiny-random SAM2; no timings (benchmarks/cpu_runtime.py)."""

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from MedCLIPSAMLib.models import cpu_runtime
from MedCLIPSAMLib.models.cpu_runtime import accelerate_sam_encoder, encoder_runtime, rel_diff

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sam(tiny_sam2):
    """A private copy of the tiny SAM2 (OpenVINO goes into its encoder). The converted-model cache is the test
    session's MEDCLIPSAM_HOME, shared by these tests so the tiny encoder is converted once (tens of seconds)."""
    return copy.deepcopy(tiny_sam2)


def converted(model):
    """The folder a conversion of this encoder's weights at this input size lives in."""
    shape = (1, 3, model.image_size, model.image_size)
    key = cpu_runtime.encoder_key(model.image_encoder, shape, cpu_runtime._versions())
    return cpu_runtime.converted_root() / f"sam2-encoder-{key[:32]}"


def check_input(model):
    return torch.randn(1, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(3))


def features(model, x):
    with torch.inference_mode():
        out = model.image_encoder(x)
    return [t.float().numpy() for t in (*out["backbone_fpn"], *out["vision_pos_enc"])]


@pytest.mark.parametrize("precision, hint", [("fp32", "f32"), ("bf16", "bf16")])
def test_openvino_encoder_matches_pytorch_within_the_stated_tolerance(sam, precision, hint):
    x = check_input(sam)
    reference = features(sam, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sam.image_encoder(x)
    half = [t.float().numpy() for t in (*out["backbone_fpn"], *out["vision_pos_enc"])]
    status = accelerate_sam_encoder(sam, "cpu", "openvino", precision)
    assert status["sam_encoder"] == f"openvino {hint}" and encoder_runtime(sam) == f"openvino {hint}"
    assert status["reason"].startswith("cpu_runtime=openvino; outputs within ")
    assert json.loads((converted(sam) / "verified.json").read_text())[hint]["rule"] == cpu_runtime.RULE
    got = features(sam, x)   # served by OpenVINO now
    served = vars(sam.image_encoder)["forward"]
    assert accelerate_sam_encoder(sam, "cpu", "openvino", precision) == status   # a service's next request:
    assert vars(sam.image_encoder)["forward"] is served                           # kept, not compiled again
    limit = cpu_runtime.FP32_TOLERANCE if hint == "f32" else cpu_runtime.TOLERANCE_FACTOR * rel_diff(half, reference)
    assert rel_diff(got, reference) <= limit
    assert accelerate_sam_encoder(sam, "cpu", "torch") == {"sam_encoder": "torch", "reason": "cpu_runtime=torch"}
    assert all((a == b).all() for a, b in zip(features(sam, x), reference))   # PyTorch's own forward again


def test_a_call_it_was_not_converted_for_runs_pytorch(sam):
    accelerate_sam_encoder(sam, "cpu", "openvino", "fp32")
    x = torch.randn(1, 3, sam.image_size // 2, sam.image_size // 2, generator=torch.Generator().manual_seed(4))
    got = features(sam, x)   # another input size: PyTorch's own forward, bit for bit
    vars(sam.image_encoder).pop("forward")
    assert all((a == b).all() for a, b in zip(got, features(sam, x)))


def test_without_the_package_it_runs_pytorch_and_says_why_once(sam, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)   # `import openvino` raises ImportError
    with caplog.at_level(logging.INFO, logger="medclipsam"):
        status = accelerate_sam_encoder(sam, "cpu", "openvino", "bf16")
    why = "the openvino package is not installed (pip install openvino)"
    assert status == {"sam_encoder": "torch", "reason": f"cpu_runtime=openvino fell back: {why}"}
    assert encoder_runtime(sam) == "torch" and "forward" not in vars(sam.image_encoder)
    assert [r.getMessage() for r in caplog.records] == [
        f"cpu_runtime=openvino: SAM2's image encoder runs in PyTorch: {why}"]


def test_a_failed_check_falls_back_and_is_not_kept(sam, caplog):
    accelerate_sam_encoder(sam, "cpu", "openvino", "fp32")   # converted and checked (or found so)
    kept = (converted(sam) / "verified.json").read_text()
    with caplog.at_level(logging.INFO, logger="medclipsam"):
        status = accelerate_sam_encoder(sam, "cpu", "openvino", "fp32", limit=0.0)   # f32 is not bit-exact
    assert status["sam_encoder"] == "torch" and encoder_runtime(sam) == "torch"
    assert status["reason"].startswith("cpu_runtime=openvino fell back: its f32 outputs differ from PyTorch fp32 by ")
    assert status["reason"].endswith(" on the check input, over the limit 0.0e+00")
    assert [r.getMessage()[:61] for r in caplog.records] == [
        "cpu_runtime=openvino: SAM2's image encoder runs in PyTorch: i"]
    assert (converted(sam) / "verified.json").read_text() == kept


def test_other_weights_or_versions_get_their_own_conversion_never_a_stale_one(sam):
    accelerate_sam_encoder(sam, "cpu", "openvino", "fp32")
    assert (converted(sam) / "encoder.xml").is_file()   # the conversion is filed under the encoder's key
    shape, versions = (1, 3, 64, 64), {"openvino": "a", "torch": "b", "sam2": "c"}
    key = cpu_runtime.encoder_key(sam.image_encoder, shape, versions)
    assert cpu_runtime.encoder_key(sam.image_encoder, (1, 3, 32, 32), versions) != key
    assert cpu_runtime.encoder_key(sam.image_encoder, shape, dict(versions, openvino="a2")) != key
    before = converted(sam)
    with torch.no_grad():
        sam.image_encoder.neck.convs[0].conv.weight[0, 0, 0, 0] += 1e-3   # a fine-tuned checkpoint, say
    assert cpu_runtime.encoder_key(sam.image_encoder, shape, versions) != key
    assert converted(sam) != before


def test_the_setting_is_checked_and_a_segmentation_reports_its_choice(tmp_path):
    from MedCLIPSAMLib.errors import MedCLIPSAMError
    from MedCLIPSAMLib.io import write_volume
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.presets import get_preset

    assert get_preset("v2", ["cpu_runtime=openvino"]).cpu_runtime == "openvino"
    assert get_preset("v2").cpu_runtime == "torch"
    with pytest.raises(MedCLIPSAMError, match="^cpu_runtime must be one of torch, openvino, got 'onnx'$"):
        get_preset("v2", ["cpu_runtime=onnx"])
    src, out, report = tmp_path / "in.nrrd", tmp_path / "out.seg.nrrd", tmp_path / "r.json"
    write_volume(str(src), make_volume("mr", shape=(4, 32, 32), seed=1, lesion={"size": "large"}).image)
    env = dict(os.environ, PYTHONPATH=REPO, MEDCLIPSAM_OFFLINE="1", MEDCLIPSAM_HOME=os.environ["MEDCLIPSAM_HOME"])
    proc = subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "segment", str(src), "--prompt", "brain tumor",
                           "--output", str(out), "--preset", "v2", "--key-slices", "1", "--models", "tiny-random",
                           "--device", "cpu", "--threads", "1", "--progress", "none", "--report-output", str(report),
                           "--set", "cpu_runtime=openvino", "--set", "autocast=false"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runtime = json.loads(report.read_text())["runtime"]["cpu_runtime"]
    assert runtime["sam_encoder"] == "openvino f32", runtime
    assert "; SAM2 encoder in openvino f32 (cpu_runtime=openvino; outputs within " in proc.stderr


def test_a_session_does_not_hand_pytorch_features_to_openvino_or_back(sam):
    import numpy as np

    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.pipeline.session import ByteLRU, CachedPredictor

    predictor = CachedPredictor(image_predictor(sam), ByteLRU(10**9))
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    predictor.set_image(image)
    torch_features = predictor._features["image_embed"].clone()
    accelerate_sam_encoder(sam, "cpu", "openvino", "fp32")
    predictor.set_image(image)   # the same slice: a miss, encoded by OpenVINO (not bit for bit PyTorch's)
    assert not torch.equal(predictor._features["image_embed"], torch_features)
