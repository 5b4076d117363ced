"""Optional OpenVINO runtime for SAM2's image encoder on a CPU (setting cpu_runtime=openvino).

benchmarks/cpu_runtime.py measured, on a 2-core AMD EPYC (AVX512-BF16, no AMX) shared with other work (load
4-7): OpenVINO in bf16 with its threads not pinned ran MedSAM2's encoder (Hiera tiny, 512 px, 1 slice) 1.24-1.31x
faster than PyTorch bf16 autocast (3 runs, minimum of 3-10 interleaved repeats), beside another 2-thread
PyTorch process 0.96-1.34x; its outputs differ from PyTorch fp32 as much as PyTorch's own bf16 does (1.3e-2).
ONNX Runtime (no bf16 on x86) and OpenVINO in f32 were slower than PyTorch bf16; BiomedCLIP's tower gained
0.9-1.17x. Not the default: beside another process it was not reliably faster, the first use converts
(15-40 s, then cached), and random weights cannot show what it does to masks. So this is opt-in, for
SAM2's encoder only, and every failure falls back to PyTorch with one log
line:
- the encoder is converted once (ov.convert_model on the PyTorch module), saved in full fp32 under
  MEDCLIPSAM_HOME/converted/, in a folder named by a key over the encoder's weights, the input shape and
  the openvino, torch and sam2 versions: a changed checkpoint or package gets a new conversion, never a
  stale one;
- before first use in each precision, its outputs on a fixed input are compared with PyTorch fp32: the
  worst max |a - b| / max |b| over the feature maps must stay within TOLERANCE_FACTOR times the
  difference PyTorch's own bf16 autocast makes on the same input (the difference the default already
  accepts), or within FP32_TOLERANCE in fp32; the figure is kept beside the model (verified.json);
- it serves only calls it was converted for (CPU, no gradient, the converted input shape); any other
  call runs PyTorch's encoder.
"""

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ..runtime import log, owned_prefix, remove_stale
from .cache import home

CPU_RUNTIMES = ("torch", "openvino")
TOLERANCE_FACTOR = 1.5     # OpenVINO bf16 may differ from fp32 by up to 1.5x PyTorch bf16's own difference
FP32_TOLERANCE = 1e-4      # OpenVINO f32 against PyTorch fp32 (measured 1.5e-6 on MedSAM2)
SEED = 0
RULE = f"bf16 {TOLERANCE_FACTOR}x torch bf16, f32 {FP32_TOLERANCE}"   # verified.json entries hold the rule they passed


def converted_root():
    return home() / "converted"


def encoder_key(encoder, shape, versions):
    """sha256 over the encoder's class, every weight and buffer (name, dtype, shape, bytes), the input
    shape and the package versions the conversion depends on."""
    import torch

    h = hashlib.sha256(json.dumps([type(encoder).__qualname__, list(shape), versions]).encode())
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions():
    import openvino
    import sam2
    import torch

    return {"openvino": openvino.__version__, "torch": torch.__version__,
            "sam2": getattr(sam2, "__version__", None) or _dist_version("sam2")}


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _features(encoder, x):
    """The encoder's outputs as a tuple: backbone_fpn (vision_features is its last) then vision_pos_enc."""
    out = encoder(x)
    return (*out["backbone_fpn"], *out["vision_pos_enc"])


def rel_diff(outs, refs):
    """Worst over outputs of max |a - b| / max |b|."""
    import numpy as np

    return float(max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                     / max(float(np.abs(np.asarray(b, np.float32)).max()), 1e-12) for a, b in zip(outs, refs)))


def _convert(encoder, shape, folder):
    """Convert the encoder to OpenVINO IR (fp32 weights) in `folder`, written whole or not at all."""
    import openvino as ov
    import torch

    class Features(torch.nn.Module):   # holds the encoder so its weights convert as parameters
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            return _features(self.encoder, x)

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder.parent, ".")
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix("."), dir=folder.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # sam2's padding checks are Python ifs on the shape: constants for the one shape converted
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)   # OpenVINO's tracer, not ours
            model = ov.convert_model(Features().eval(), example_input=torch.zeros(shape))
        ov.save_model(model, str(tmp / "encoder.xml"), compress_to_fp16=False)
        try:
            os.rename(tmp, folder)
        except OSError:   # another process converted it meanwhile: keep theirs
            if not (folder / "encoder.xml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OpenVinoEncoder:
    """The callable that replaces encoder.forward: OpenVINO for the calls it was converted for, else the
    encoder's own forward."""

    def __init__(self, encoder, compiled, shape, precision):
        self.encoder, self.compiled, self.shape, self.precision = encoder, compiled, tuple(shape), precision
        self.threads = compiled.get_property("INFERENCE_NUM_THREADS")
        self.request = compiled.create_infer_request()
        self.levels = len(compiled.outputs) // 2
        self.torch_forward = type(encoder).forward.__get__(encoder)

    def __call__(self, sample):
        import torch

        if sample.device.type != "cpu" or tuple(sample.shape) != self.shape or torch.is_grad_enabled():
            return self.torch_forward(sample)
        res = self.request.infer([sample.detach().float().numpy()])
        outs = [torch.from_numpy(res[o].copy()) for o in self.compiled.outputs]
        fpn, pos = outs[:self.levels], outs[self.levels:]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


def accelerate_sam_encoder(sam_model, device, setting="torch", precision="bf16", limit=None):
    """Use OpenVINO for sam_model.image_encoder where the setting asks for it and it passes its check;
    else leave (or put back) PyTorch's. Returns {"sam_encoder": "openvino bf16" | "torch", "reason"} for
    the runtime log line and the report. An encoder this process already accelerated in the same precision
    and thread count is kept as it is (its weights are not expected to change in place). limit: a fixed
    limit on the check's difference instead of the module's rule (tests)."""
    import torch

    encoder = sam_model.image_encoder
    hint = "bf16" if precision == "bf16" else "f32"
    current = vars(encoder).get("forward")
    if (setting == "openvino" and limit is None and isinstance(current, OpenVinoEncoder)
            and current.precision == hint and torch.device(device).type == "cpu"
            and current.threads == torch.get_num_threads()):
        return dict(current.status)   # a service's next request: no second hash, compile or check
    vars(encoder).pop("forward", None)   # PyTorch's forward unless this call installs OpenVINO's again
    if setting not in CPU_RUNTIMES:
        from ..errors import MedCLIPSAMError

        raise MedCLIPSAMError(f"unknown cpu_runtime '{setting}'; choose one of {', '.join(CPU_RUNTIMES)}")
    if setting == "torch":
        return {"sam_encoder": "torch", "reason": "cpu_runtime=torch"}
    if torch.device(device).type != "cpu":
        return {"sam_encoder": "torch", "reason": f"cpu_runtime=openvino applies to a CPU only, not {device}"}
    try:
        import openvino as ov
    except ImportError:
        return _fallback("the openvino package is not installed (pip install openvino)")
    size = sam_model.image_size
    shape = (1, 3, size, size)
    try:
        folder = converted_root() / f"sam2-encoder-{encoder_key(encoder, shape, _versions())[:32]}"
        if not (folder / "encoder.xml").is_file():
            log.info("converting SAM2's image encoder for OpenVINO (once; kept in %s)", folder)
            _convert(encoder, shape, folder)
        compiled = ov.Core().compile_model(str(folder / "encoder.xml"), "CPU",
                                           {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                            # pinned to cores (its default) it was 1.03-1.13x, not 1.24-1.31x
                                            # faster than PyTorch bf16 (benchmarks/cpu_runtime.py)
                                            "ENABLE_CPU_PINNING": False})
        accelerated = OpenVinoEncoder(encoder, compiled, shape, hint)
        ok, why = _verified(folder, accelerated, shape, hint, limit)
    except Exception as e:   # a conversion the runtime cannot do must never stop a segmentation
        return _fallback(f"OpenVINO could not convert or compile it ({type(e).__name__}: {e})")
    if not ok:
        return _fallback(why)
    accelerated.status = {"sam_encoder": f"openvino {hint}", "reason": f"cpu_runtime=openvino; {why}"}
    encoder.forward = accelerated
    return dict(accelerated.status)


def encoder_runtime(sam_model):
    """"openvino bf16" / "openvino f32" where accelerate_sam_encoder installed OpenVINO, else "torch"."""
    accelerated = vars(sam_model.image_encoder).get("forward")
    return f"openvino {accelerated.precision}" if isinstance(accelerated, OpenVinoEncoder) else "torch"


def _fallback(why):
    log.info("cpu_runtime=openvino: SAM2's image encoder runs in PyTorch: %s", why)
    return {"sam_encoder": "torch", "reason": f"cpu_runtime=openvino fell back: {why}"}


def _verified(folder, accelerated, shape, hint, limit=None):
    """(ok, sentence): the accelerated encoder against PyTorch fp32 on a fixed input, within the limit
    (module docstring; or a given `limit`). A precision that passed the module's rule once is read from
    verified.json; a failure is not kept."""
    import torch

    record_path = folder / "verified.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    done = record.get(hint)
    if limit is None and done and done.get("rule") == RULE:
        return True, f"outputs within {done['diff']:.1e} of PyTorch fp32 (limit {done['limit']:.1e}, checked once)"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        ref = [t.float().numpy() for t in _features_torch(accelerated, x)]
        got = [t.numpy() for t in _features_ov(accelerated, x)]
        rule = limit is None
        if rule and hint == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = [t.float().numpy() for t in _features_torch(accelerated, x)]
            limit = TOLERANCE_FACTOR * rel_diff(half, ref)
        elif rule:
            limit = FP32_TOLERANCE
    diff = rel_diff(got, ref)
    if not diff <= limit:
        return False, (f"its {hint} outputs differ from PyTorch fp32 by {diff:.1e} on the check input, over "
                       f"the limit {limit:.1e}")
    if rule:
        record[hint] = {"diff": diff, "limit": limit, "rule": RULE}
        try:
            record_path.write_text(json.dumps(record))
        except OSError:
            pass   # a read-only cache: the check runs again next time
    return True, f"outputs within {diff:.1e} of PyTorch fp32 (limit {limit:.1e})"


def _features_torch(accelerated, x):
    out = accelerated.torch_forward(x)
    return (*out["backbone_fpn"], *out["vision_pos_enc"])


def _features_ov(accelerated, x):
    out = accelerated(x)
    return (*out["backbone_fpn"], *out["vision_pos_enc"])
