"""Weak-supervision training as one service job: pseudo-labels from the zero-shot pipeline, then a network
trained on them (`medclipsam pseudo-label` then `train-weak`, their own parsers and code), in a CHILD
process of the service (cli/chain.py) so the service keeps answering and segmenting.

One training at a time (a second is refused while one runs). The training data are volumes clients
uploaded (by volume id; written into the service's private folder for the child). The model is trained
into a hidden folder under MEDCLIPSAM_HOME/trained and, only once the training succeeded, moved to its
own folder there and registered (trained_models.py): a cancelled or failed training leaves nothing behind.
Cancel stops the child's whole process group. The status carries the step, the progress and the metrics
(metrics.jsonl: one record per epoch), as the segmentation jobs' status does.
"""

import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import OrderedDict

from ..errors import MedCLIPSAMError
from ..runtime import log
from .children import Child

KEEP_FINISHED = 16
FINAL = ("done", "failed", "cancelled")
STEPS = ("pseudo-label", "train")


class TrainingJob:
    def __init__(self, job_id, request):
        self.id, self.request = job_id, request
        self.state, self.step = "queued", None
        self.stage, self.done, self.total, self.message = None, 0, 0, "starting"
        self.error = self.model = None
        self.metrics = []
        self.child = None
        self.cancelled = threading.Event()
        self.staging = None           # the model folder while it trains (hidden, under the service's home)
        self.created = time.time()
        self.seconds = None

    def on_line(self, record):
        """A JSON line of the child: {"step"} between commands, else {"stage", "done", "total", "message"}."""
        if "step" in record:
            self.step = "train" if record["step"] == "train-weak" else str(record["step"])
            return
        if record.get("stage") in ("finished", "error", "cancelled"):
            if record.get("stage") == "error":
                self.error = str(record.get("message") or "")
            return
        self.stage = record.get("stage")
        self.done, self.total = int(record.get("done") or 0), int(record.get("total") or 0)
        self.message = str(record.get("message") or "")

    def status(self):
        from ..training.run_records import read_metrics

        metrics = self.metrics
        if self.state == "running" and self.staging is not None:
            try:
                metrics = read_metrics(self.staging) or self.metrics
            except (OSError, ValueError):
                metrics = self.metrics
        out = {"job_id": self.id, "kind": "train", "state": self.state, "step": self.step, "stage": self.stage,
               "done": self.done, "total": self.total, "message": self.message, "metrics": metrics,
               "model": self.model, "volume_ids": list(self.request["volume_ids"])}
        if self.error and self.state == "failed":
            out["error"] = self.error
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


def public_entry(entry):
    """A registry entry as a client sees it: no server folder."""
    return {k: entry[k] for k in ("name", "kind", "labels", "date", "present") if k in entry}


def folder_name(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


STAGING_PREFIX = ".training-"     # + "<pid>-<training id>": the model folder until it is registered


class Trainings:
    """The service's trainings: one runs at a time, each on its own thread watching its child."""

    def __init__(self, service):
        from .. import trained_models
        from ..runtime import remove_stale

        self.service = service
        # a training's hidden folder (.training-<pid>-<id>) outlives a SIGKILLed service: reclaim those of
        # services that are gone, as service_folder() does for the service's own folder
        remove_stale(trained_models.default_output_dir(), STAGING_PREFIX)
        self._jobs = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = False

    # -- requests -----------------------------------------------------------------------------------
    def submit(self, request):
        """request: the validated body (TrainBody.model_dump()). Refuses while another training runs."""
        from .refusals import Conflict

        images = {v: self.service.session.volume(v) for v in self._checked_volumes(request["volume_ids"])}
        with self._lock:
            running = [j for j in self._jobs.values() if j.state not in FINAL]
            if running:
                raise Conflict(f"a training is already running ({running[0].id}); one runs at a time: wait for it "
                               "to end or cancel it")
            if self._stopping:
                raise Conflict("the service is stopping")
            job = TrainingJob(f"train-{next(self._ids)}", request)
            self._jobs[job.id] = job
            job.state = "running"
        threading.Thread(target=self._run, args=(job, images), name=f"medclipsam-{job.id}", daemon=True).start()
        return job.status()

    def _checked_volumes(self, volume_ids):
        if len(set(volume_ids)) != len(volume_ids):
            raise MedCLIPSAMError("'volume_ids' names the same volume twice")
        for v in volume_ids:
            self.service.check_volume(v)
        return volume_ids

    def get(self, job_id):
        from .refusals import NotFound

        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown training '{job_id}'")
        return job

    def status(self, job_id):
        return self.get(job_id).status()

    def list(self):
        with self._lock:
            jobs = list(self._jobs.values())
        return [{k: v for k, v in j.status().items() if k != "metrics"} for j in jobs]

    def cancel(self, job_id):
        """Stop a training: its child's process group is stopped, nothing is registered."""
        job = self.get(job_id)
        with self._lock:
            if job.state in FINAL:
                return job.status()
            job.cancelled.set()
            job.state = "cancelling"
            child = job.child
        if child is not None:
            threading.Thread(target=child.stop, name="medclipsam-cancel", daemon=True).start()
        return job.status()

    def busy(self):
        with self._lock:
            return any(j.state not in FINAL for j in self._jobs.values())

    def info(self):
        with self._lock:
            running = [j.id for j in self._jobs.values() if j.state not in FINAL]
        return {"running": running[0] if running else None}

    def stop(self):
        """The service stops: end a running training (its tree) and wait for its thread's clean-up."""
        with self._lock:
            self._stopping = True
            jobs = [j for j in self._jobs.values() if j.state not in FINAL]
        for job in jobs:
            self.cancel(job.id)
        deadline = time.monotonic() + 15
        while any(j.state not in FINAL for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- the training's thread ----------------------------------------------------------------------
    def _run(self, job, images):
        from .. import trained_models
        from ..runtime import owned_prefix

        start = time.perf_counter()
        work = os.path.join(self.service.workdir, job.id)
        trained_root = trained_models.default_output_dir()
        state, error, code = "failed", None, None
        try:
            os.makedirs(work, mode=0o700)
            trained_root.mkdir(parents=True, exist_ok=True)
            job.staging = str(trained_root / f"{owned_prefix(STAGING_PREFIX)}{job.id}")
            shutil.rmtree(job.staging, ignore_errors=True)
            spec = self._spec(job, images, work)
            if not job.cancelled.is_set():
                job.child = Child([sys.executable, "-m", "MedCLIPSAMLib.cli.chain", spec],
                                  os.path.join(work, "child.log"), job.on_line, env=self._environment(), cwd=work)
                if job.cancelled.is_set():     # cancelled while it started: cancel() saw no child yet
                    job.child.stop()
                code = job.child.wait()
            if job.cancelled.is_set():
                state = "cancelled"
            elif code != 0:
                error = self._sentence(job, work)
            else:
                job.metrics = _read_metrics(job.staging)
                job.model = public_entry(self._register(job))
                state = "done"
        except MedCLIPSAMError as exc:
            error = str(exc)
        except Exception as exc:   # a bug: the training fails with one line, the service goes on
            log.exception("training %s failed", job.id)
            error = f"unexpected failure ({type(exc).__name__}: {exc})"
        finally:
            if job.staging:
                shutil.rmtree(job.staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        if job.cancelled.is_set():
            state, error = "cancelled", None
        with self._lock:
            job.error = error if state == "failed" else None
            job.state, job.seconds = state, round(time.perf_counter() - start, 3)
            job.message = {"done": f"trained and registered '{job.model['name']}'" if job.model else "done",
                           "cancelled": "cancelled; nothing was registered",
                           "failed": error or "failed"}[state]
            done = [j for j in self._jobs.values() if j.state in FINAL]
            for old in done[: max(0, len(done) - KEEP_FINISHED)]:
                self._jobs.pop(old.id, None)

    def _environment(self):
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
        return env

    def _spec(self, job, images, work):
        """Write the volumes and the child's SPEC.json; returns its path."""
        from ..io import write_volume

        folder = os.path.join(work, "images")
        os.makedirs(folder)
        for k, (volume_id, image) in enumerate(images.items()):
            write_volume(os.path.join(folder, f"case{k:03d}.nrrd"), image)   # names matched to the labels
        steps = training_steps(job.request, self.service.session, folder, os.path.join(work, "pseudo"), job.staging)
        path = os.path.join(work, "spec.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"parent_pid": os.getpid(), "steps": steps}, f)
        return path

    def _sentence(self, job, work):
        """The failed step's sentence, without the service's folders."""
        text = job.error or (job.child.last_error() if job.child else None) or "the training process failed"
        for path, name in ((job.staging, "the model folder"), (work, "the training folder")):
            if path:
                text = text.replace(path, name)
        step = {"pseudo-label": "pseudo-labelling", "train": "training"}.get(job.step, "training")
        return f"{step} failed: {text}"

    def _register(self, job):
        """Move the finished model to its own folder under the home and register it there."""
        from .. import trained_models

        name = job.request["name"]
        root = trained_models.default_output_dir()
        base = folder_name(name)
        target, k = root / base, 2
        while target.exists():
            target, k = root / f"{base}-{k}", k + 1
        os.replace(job.staging, target)
        try:
            return trained_models.add(str(target), name)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise


def _read_metrics(folder):
    from ..training.run_records import read_metrics

    return read_metrics(folder)


def training_steps(request, session, images, pseudo, output):
    """The two commands of a training (CLI arguments, the parser checks them once more): pseudo-label on
    the service's own models and device, then train-weak on its labels."""
    device = getattr(session.device, "type", str(session.device))
    prompts = list(request["prompts"])
    label = ["pseudo-label", images, "--output-dir", pseudo, "--preset", request["preset"], "--axis",
             request["axis"], "--device", device, "--clip-model", session.clip_name, "--seed", str(request["seed"]),
             "--min-confidence", repr(float(request["min_confidence"])), "--progress", "json"]
    for prompt in prompts:
        label += ["--prompt", prompt]
    if session.sam_name and request["sam"] != "none":
        label += ["--sam-model", session.sam_name]
    else:
        label += ["--sam", "none"]
    train = ["train-weak", "--output", output, "--epochs", str(request["epochs"]), "--dims", str(request["dims"]),
             "--axis", request["axis"], "--device", device, "--seed", str(request["seed"]), "--progress", "json",
             "--snapshots", str(request["snapshots"] or min(5, request["epochs"]))]
    if request["trainer"] == "nnunetv2":
        dataset = "Dataset501_MedCLIPSAM"
        label += ["--nnunet-dataset", dataset]
        train += ["--trainer", "nnunetv2", "--dataset", os.path.join(pseudo, "nnUNet_raw", dataset)]
    else:
        train += ["--images", images, "--labels", os.path.join(pseudo, "labels.txt")]
    for name in prompts:
        train += ["--label-name", name]
    for flag, key in (("--batch-size", "batch_size"), ("--base-filters", "base_filters"),
                      ("--samples-per-epoch", "samples_per_epoch"), ("--lr", "lr"),
                      ("--val-fraction", "val_fraction"), ("--threshold", "threshold")):
        if request.get(key) is not None:
            train += [flag, repr(request[key]) if isinstance(request[key], float) else str(request[key])]
    if request.get("patch_size"):
        train += ["--patch-size"] + [str(int(v)) for v in request["patch_size"]]
    return [["pseudo-label", label], ["train-weak", train]]
