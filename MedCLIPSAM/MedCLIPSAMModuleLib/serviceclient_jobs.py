"""The service calls for trained models and training (the "one door"), beside service.py's ServiceClient
(segmentation, refinement). Qt-free and standard-library only: each takes a ServiceClient.

    models = trainedModels(client)                                   # [{"name", "kind", "labels", ...}]
    job = submitTrained(client, volumeId, "my model", uncertainty=True)["job_id"]
    client.wait(job); client.result(job, "out.seg.nrrd")             # as a segmentation job
    training = startTraining(client, [v1, v2], ["brain tumor"], "my model", epochs=20)["job_id"]
    status = waitTraining(client, training, onStatus=show)           # progress, status["metrics"] per epoch
    cancelTraining(client, training)                                 # the service stops its whole tree

A status has the same fields whatever the job: state, stage, done, total, message (error when failed);
a training's also has step ("pseudo-label" / "train"), metrics (one record per epoch: epoch, loss,
val_dice, lr...) and, once done, model (the registered entry).
"""

import threading
import time

from .service import ServiceError

FINAL = ("done", "failed", "cancelled")


def trainedModels(client):
    """The service's registered trained models (no server folders): [{name, kind, labels, date, present}]."""
    return client._request("GET", "/models/trained")["models"]


def submitTrained(client, volumeId, model, uncertainty=False, prompts=None, samples=None, threshold=None,
                  window=None, seed=0):
    """Queue a prediction with a registered model on an uploaded volume; returns the job's status. A
    weak-supervision model segments its labels (no prompts); a MedCLIPSeg model one segment per prompt
    (its first training prompt when none), with `samples` stochastic passes."""
    body = {"volume_id": volumeId, "model": model, "uncertainty": bool(uncertainty), "seed": int(seed)}
    optional = {"prompts": list(prompts) if prompts else None, "samples": samples, "threshold": threshold,
                "window": window}
    body.update({k: v for k, v in optional.items() if v is not None})
    return client._request("POST", "/jobs/trained", body=body)


def startTraining(client, volumeIds, prompts, name, **options):
    """Start a weak-supervision training on uploaded volumes: pseudo-labels for `prompts`, then a network
    named `name`. options: preset, sam ("none": pseudo-labels without SAM), axis, min_confidence, trainer,
    dims, epochs, snapshots, batch_size, base_filters, samples_per_epoch, patch_size, lr, val_fraction,
    threshold, seed. A training already running: ServiceError with status 409."""
    body = dict(options, volume_ids=list(volumeIds), prompts=list(prompts), name=name)
    return client._request("POST", "/trainings", body={k: v for k, v in body.items() if v is not None})


def training(client, trainingId):
    return client._request("GET", f"/trainings/{trainingId}")


def trainings(client):
    return client._request("GET", "/trainings")["trainings"]


def cancelTraining(client, trainingId):
    return client._request("POST", f"/trainings/{trainingId}/cancel")


def waitTraining(client, trainingId, onStatus=None, shouldCancel=None, every=0.5, timeout=None):
    """Poll a training until it ends (scripts and tests; the panel polls training() from its timer);
    shouldCancel() -> True cancels it once. Returns the final status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause, cancelSent = threading.Event(), False
    while True:
        status = training(client, trainingId)
        if onStatus is not None:
            onStatus(status)
        if status["state"] in FINAL:
            return status
        if shouldCancel is not None and not cancelSent and shouldCancel():
            cancelTraining(client, trainingId)
            cancelSent = True
        if deadline is not None and time.monotonic() > deadline:
            raise ServiceError(f"Training {trainingId} did not end within {timeout:g} s.")
        pause.wait(every)


def fraction(status):
    """0..1 over a training's two steps (labelling the cases: the first 30 %, the epochs: the rest; loading
    and preparing count as nothing new), or a job's done/total; None when unknown."""
    if status.get("state") == "done":
        return 1.0
    total = status.get("total") or 0
    part = min(1.0, (status.get("done") or 0) / total) if total else 0.0
    step, stage = status.get("step"), status.get("stage")
    if status.get("kind") != "train":
        return part if total else None
    if step == "train":
        return 0.3 + 0.7 * part if stage == "train" else 0.3
    if step == "pseudo-label" and stage not in (None, "load"):
        return 0.3 * part if stage == "pseudo-label" else 0.3
    return 0.0
