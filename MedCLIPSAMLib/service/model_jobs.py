"""Prediction with a registered trained model as a service job, in the segmentation queue (the device is
shared): a weak-supervision model (`medclipsam predict`: its snapshot ensemble, segments named by its
labels, the ensemble's entropy as uncertainty) or a MedCLIPSeg model (`medclipseg predict`, once per prompt:
one segment each, the voxel-wise maximum of their uncertainties, as the panel merges its runs). The result
comes back as a segmentation job's: .seg.nrrd on the input's exact grid, uncertainty .nrrd, a report.

The last model used stays loaded (a second prediction with it costs no loading)."""

import threading

import numpy as np

from ..errors import MedCLIPSAMError


class ModelCache:
    """The last loaded trained model, by (folder, kind, the config file's modification time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = self._model = None

    def get(self, key, load):
        with self._lock:
            if key != self._key:
                self._key, self._model = None, None     # free the old one before loading the next
                self._model = load()
                self._key = key
            return self._model


def registered(name):
    """The registry entry of a usable model named `name`: NotFound / Conflict sentences otherwise."""
    from .. import trained_models
    from .refusals import Conflict, NotFound

    try:
        entry = trained_models.get(name)
    except MedCLIPSAMError:
        raise NotFound(f"no trained model named '{name}' is registered on the service (GET /models/trained "
                       "lists them)") from None
    if not entry["present"]:
        raise Conflict(f"the trained model '{name}' is no longer complete on the service")
    return entry


def check_request(entry, body):
    """What a prediction request may ask of this model's kind (one sentence otherwise)."""
    if entry["kind"] == "weak":
        if body.get("prompts"):
            raise MedCLIPSAMError(f"'{entry['name']}' is a weak-supervision model: it segments what it was trained "
                                  f"on ({', '.join(entry['labels'])}) and takes no prompts")
        if body.get("samples") is not None or body.get("window") is not None:
            raise MedCLIPSAMError("'samples' and 'window' are MedCLIPSeg options; "
                                  f"'{entry['name']}' is a weak-supervision model")
    elif body.get("threshold") is not None:
        raise MedCLIPSAMError(f"'threshold' is a weak-supervision option; '{entry['name']}' is a MedCLIPSeg model")


def _config_stamp(folder):
    import os

    from ..trained_models import MEDCLIPSEG_CONFIG, WEAK_CONFIG

    for name in (WEAK_CONFIG, MEDCLIPSEG_CONFIG):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return os.stat(path).st_mtime_ns
    return None


def run(service, job, entry, body):
    """The job's work: segments and uncertainty, then the result bytes (as Service._run returns them)."""
    from ..evidence import format_ml
    from ..io import image_from_array, write_segmentation, write_volume

    session = service.session
    image = session.volume(job.volume_id)
    progress = job.progress
    key = (entry["folder"], entry["kind"], _config_stamp(entry["folder"]))
    progress.stage("load", 1, f"loading the trained model '{entry['name']}'")
    if entry["kind"] == "weak":
        from ..training.predict import load_model, predict_volume

        model = service.trained_cache.get(key, lambda: load_model(entry["folder"], session.device))
        progress.advance(1)
        prediction = predict_volume(model, image, body.get("threshold"), progress=progress)
        segments = [{"name": name, "mask": (prediction.labels == k).astype(np.uint8)}
                    for k, name in enumerate(model.label_names, 1)]
        uncertainty = prediction.uncertainty
    else:
        from ..pipeline.session import parse_window
        from ..runtime import seed_everything
        from ..training.medclipseg import MedCLIPSegPredictor, predict_volume

        predictor = service.trained_cache.get(key, lambda: MedCLIPSegPredictor(entry["folder"], session.device))
        progress.advance(1)
        prompts = list(body.get("prompts") or entry["labels"][:1])
        samples = 30 if body.get("samples") is None else int(body["samples"])
        window = parse_window(body.get("window"))      # checked at submission: a name or (level, width)
        seed_everything(int(body.get("seed") or 0))
        segments, uncertainty = [], None
        for prompt in prompts:
            mask, h = predict_volume(predictor, image, prompt, samples, window, progress)
            segments.append({"name": prompt, "mask": mask})
            uncertainty = h if uncertainty is None else np.maximum(uncertainty, h)
    progress.stage("write", 1, "writing the segmentation")
    seg = service._bytes_of(lambda path: write_segmentation(path, segments, image), ".seg.nrrd")
    unc = None
    if body.get("uncertainty") and uncertainty is not None:
        unc = service._bytes_of(lambda path: write_volume(path, image_from_array(uncertainty, image)), ".nrrd")
    spacing = float(np.prod(image.GetSpacing()))
    report = []
    for s in segments:
        voxels = int(np.count_nonzero(s["mask"]))
        volume_ml = voxels * spacing / 1000.0
        entry_report = {"prompt": s["name"], "voxels": voxels, "volume_ml": round(volume_ml, 3),
                        "model": entry["name"], "kind": entry["kind"]}
        if uncertainty is not None and voxels:
            entry_report["mean_uncertainty"] = round(float(uncertainty[s["mask"] > 0].mean()), 4)
        entry_report["summary"] = f"{voxels} voxels ({format_ml(volume_ml)} ml)"   # a tiny mask never reads 0.0
        report.append(entry_report)
    progress.advance(1)
    return {"result": seg, "uncertainty": unc, "report": report, "saliency": None, "report_document": None}
