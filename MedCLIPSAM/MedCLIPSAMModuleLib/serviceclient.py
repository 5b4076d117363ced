"""The Slicer module's side of the segmentation service (`medclipsam serve`): an HTTP client, and a launcher
that keeps a local service running. Qt-free and standard-library only (it runs in Slicer's Python).

    service = LocalService(python, env=env)          # or RemoteService(url, token) for a GPU machine
    client = service.ensure()                         # starts it, or restarts it once if it died
    if service.notice: show(service.notice)           # one sentence: it had stopped and was restarted
    volume = client.upload(path)["volume_id"]
    job = client.submit(volume, ["brain tumor"], preset="v2")["job_id"]
    status = client.job(job)                          # poll: state, stage, done, total, message
    client.result(job, "out.seg.nrrd")
    client.result(job, "report.json", "report")     # submitted with report=True (saliency=True: "saliency")
    models = trainedModels(client)                    # the service's registry: name, kind, labels, ...
    job = submitTrained(client, volume, "my model", uncertainty=True)["job_id"]   # then as above
    training = startTraining(client, [v1, v2], ["brain tumor"], "my model", epochs=20)["job_id"]
    status = waitTraining(client, training, onStatus=show)     # or training(); cancelTraining() stops it

A local service exits by itself when the Slicer process that started it exits (--parent-pid) or after
an idle time (--idle-exit), and listens on 127.0.0.1 with a token in a private folder.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

START_TIMEOUT = 300.0       # seconds for a new service to load its models and listen


class ServiceError(Exception):
    """A request the service refused or could not answer; str() is one sentence for the user."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ServiceUnavailable(ServiceError):
    """The service could not be reached (not running, wrong URL, network down)."""


class ServiceClient:
    def __init__(self, url, token, timeout=60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method, path, data=None, body=None, raw=False, timeout=None):
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise ServiceError(_detail(exc), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceUnavailable(f"Cannot reach the segmentation service at {self.url} ({reason}).") from None
        return payload if raw else json.loads(payload or b"null")

    # -- the API -----------------------------------------------------------------------------------
    def info(self):
        return self._request("GET", "/info")

    def test_connection(self):
        """(ok, one sentence) for the "Test connection" button."""
        try:
            info = self.info()
        except ServiceError as exc:
            if exc.status == 401:
                return False, "The service refused the token; copy it again from the service's token file."
            return False, str(exc)
        models = info["models"]
        random = " (RANDOM-WEIGHT test models)" if models.get("random_weights") else ""
        return True, (f"Connected: medclipsam {info['version']} on {info['device']}, "
                      f"{models['clip']} + {models['sam']}{random}.")

    def upload(self, volume):
        """Upload a volume file (NRRD or NIfTI path, or its bytes); returns {"volume_id", "size", ...}."""
        if isinstance(volume, (bytes, bytearray)):
            data = bytes(volume)
        else:
            with open(volume, "rb") as f:
                data = f.read()
        return self._request("POST", "/volumes", data=data, timeout=max(self.timeout, 600))

    def forget(self, volume_id):
        return self._request("DELETE", f"/volumes/{volume_id}")

    def submit(self, volume_id, prompts, **options):
        """Queue a segmentation job; options are `medclipsam segment`'s (preset, axis, mode, window,
        no_gate, absent_if, overrides, uncertainty, ...). Returns the job's status."""
        return self._request("POST", "/jobs", body=dict(options, volume_id=volume_id, prompts=list(prompts)))

    def job(self, job_id):
        return self._request("GET", f"/jobs/{job_id}")

    def cancel(self, job_id):
        return self._request("POST", f"/jobs/{job_id}/cancel")

    def result(self, job_id, path, kind="result"):
        """Write a finished job's file(s) to `path` atomically and return what was written.

        kind "result": its .seg.nrrd; "uncertainty": its uncertainty .nrrd; "report": the per-prompt report
        JSON (`segment --report-output`; the job was submitted with report=True); "saliency": one .nrrd
        per prompt (saliency=True), named as `segment --saliency-output PATH` names them (PATH itself for
        one prompt, PATH_<prompt>.nrrd for several): returns the list of paths."""
        if kind == "saliency":
            names = self.job(job_id).get("saliency") or []
            if not names:      # none asked for (or not done yet): the service's 404 / 409 sentence
                self._request("GET", f"/jobs/{job_id}/saliency/0", raw=True)
            paths = saliencyPaths(path, names)
            for k, local in enumerate(paths):
                self._download(f"/jobs/{job_id}/saliency/{k}", local)
            return paths
        return self._download(f"/jobs/{job_id}/{kind}", path)

    def _download(self, route, path):
        data = self._request("GET", route, raw=True, timeout=max(self.timeout, 600))
        tmp = f"{path}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path

    def wait(self, job_id, on_status=None, should_cancel=None, every=0.25, timeout=None):
        """Poll a job until it ends (blocking: for scripts and tests; Slicer polls job() from a timer).
        Returns the final status; should_cancel() -> True cancels it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = threading.Event()
        while True:
            status = self.job(job_id)
            if on_status is not None:
                on_status(status)
            if status["state"] in ("done", "failed", "cancelled"):
                return status
            if should_cancel is not None and should_cancel():
                self.cancel(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(f"Job {job_id} did not end within {timeout:g} s.")
            pause.wait(every)

    # -- refinement (kept last in the class: other work adds methods above) ------------------------
    def refine(self, volume_id, segment_id, positive=(), negative=(), box=None, frame="RAS", axis="axial",
               propagate=True, mask=None, window=None, plane_normal=None, max_distance=None):
        """Correct a segment with points (patient mm in `frame`) and/or a box (two opposite corners) on one
        slice of `axis`; `mask`: the segment as it is now (base64 of np.packbits of the (z, y, x) voxels,
        C order), else the service's own copy. Returns {"axis", "slices": [{"index", "shape", "bits"}], ...}:
        the changed slices only (np.take(mask, index, axis))."""
        points = [{"position": [float(v) for v in p], "label": 1} for p in positive]
        points += [{"position": [float(v) for v in p], "label": 0} for p in negative]
        body = {"segment_id": segment_id, "points": points, "frame": frame, "axis": axis,
                "propagate": bool(propagate)}
        optional = {"box": None if box is None else [[float(v) for v in c] for c in box], "mask": mask,
                    "window": window, "plane_normal": None if plane_normal is None else [float(v) for v in plane_normal],
                    "max_distance": max_distance}
        body.update({k: v for k, v in optional.items() if v is not None})
        return self._request("POST", f"/volumes/{volume_id}/refine", body=body, timeout=max(self.timeout, 600))

    def undo(self, volume_id, segment_id):
        """Undo a segment's last refine step: the slices it restores, as refine() returns them."""
        return self._request("POST", f"/volumes/{volume_id}/undo", body={"segment_id": segment_id})


def saliencyPaths(path, names):
    """Local paths for the service's saliency file names ("saliency.nrrd", "saliency_<prompt>.nrrd"): the
    command line's names for `--saliency-output path` (path must end in .nrrd, the service's format)."""
    path = os.fspath(path)
    if not path.endswith(".nrrd"):
        raise ValueError(f"saliency volumes come as NRRD: give a path ending in .nrrd, not '{path}'")
    return [path[: -len(".nrrd")] + name[len("saliency"):] for name in names]


def localReport(path, saliencyFiles=None, source=None, output=None):
    """Name this computer's files in a downloaded report (the service's has its own saliency file names
    and no input or output path), as `segment --report-output` would have written it here."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    document["input"], document["output"] = source, output
    for k, entry in enumerate(document.get("prompts", [])):
        entry["saliency_file"] = saliencyFiles[k] if saliencyFiles else None
    tmp = f"{path}.part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return document


def _detail(exc):
    try:
        detail = json.loads(exc.read() or b"{}").get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    if exc.code == 401:
        return "The segmentation service refused the token (401)."
    text = str(detail or exc.reason).rstrip(".")
    return text[0].upper() + text[1:] + "." if text else f"The service answered {exc.code}."


class RemoteService:
    """A service someone else runs (a GPU machine): URL and token from "Setup and advanced"."""

    def __init__(self, url, token, timeout=60.0):
        self.client = ServiceClient(url, token, timeout)
        self.notice = None

    def ensure(self):
        return self.client

    def state(self):
        return f"remote service at {self.client.url}"

    def explain(self, error):
        return str(error)

    def stop(self):
        pass


class LocalService:
    """A `medclipsam serve` started and owned by this process: free port, private token file, stops with
    its parent or after `idle_exit` seconds without a request. ensure() restarts it once when it died."""

    def __init__(self, python, extra_args=(), env=None, idle_exit=1800.0, start_timeout=START_TIMEOUT):
        self.command = [python, "-m", "MedCLIPSAMLib", "serve"]
        self.extra_args = list(extra_args)      # e.g. ["--models", "tiny-random", "--device", "cpu"]
        self.env, self.idle_exit, self.start_timeout = env, idle_exit, start_timeout
        self.process = self.client = self.folder = None
        self.notice = None                      # one sentence after a restart, for the status line
        self._lock = threading.Lock()           # Apply's and Refine's worker threads may both ensure()

    # -- lifecycle ---------------------------------------------------------------------------------
    def ensure(self):
        """A client of a running service: started now if there was none, restarted once if it died."""
        with self._lock:
            return self._ensure()

    def _ensure(self):
        self.notice = None
        if self.process is not None and self.process.poll() is None:
            try:
                self.client.info()
                return self.client
            except ServiceUnavailable:          # alive but not answering: replace it
                self._kill()
        if self.process is not None:
            self.notice = (f"The local segmentation service had stopped ({self._exit_text()}); "
                           "a new one was started (volumes are uploaded again).")
            self._cleanup()
        self._start()
        return self.client

    def state(self):
        if self.process is None:
            return "not started"
        if self.process.poll() is not None:
            return f"stopped ({self._exit_text()})"
        return f"running at {self.client.url} (process {self.process.pid})"

    def explain(self, error):
        """One sentence for an error met while using the client (the service may have died meanwhile)."""
        if isinstance(error, ServiceUnavailable) and self.process is not None and self.process.poll() is not None:
            return (f"The local segmentation service stopped unexpectedly ({self._exit_text()}); "
                    "a new one starts with the next Apply.")
        return str(error)

    def stop(self):
        """Stop the service (when Slicer closes the module or exits)."""
        self._kill()
        self._cleanup()
        self.process = self.client = None

    # -- internals ----------------------------------------------------------------------------------
    def _start(self):
        self.folder = tempfile.mkdtemp(prefix="medclipsam-service-")     # mode 0700
        ready = os.path.join(self.folder, "ready.json")
        command = self.command + ["--port", "0", "--token-file", os.path.join(self.folder, "token"),
                                  "--ready-file", ready, "--parent-pid", str(os.getpid())]
        if self.idle_exit:
            command += ["--idle-exit", str(self.idle_exit)]
        kwargs = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
        log = open(os.path.join(self.folder, "service.log"), "wb")
        try:
            self.process = subprocess.Popen(command + self.extra_args, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env, **kwargs)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        pause = threading.Event()
        while not os.path.exists(ready):
            if self.process.poll() is not None:
                raise ServiceError(f"The local segmentation service did not start: {self._last_log_line()}")
            if time.monotonic() > deadline:
                self._kill()
                raise ServiceError(f"The local segmentation service did not start within {self.start_timeout:g} s.")
            pause.wait(0.1)
        with open(ready) as f:
            url = json.load(f)["url"]
        with open(os.path.join(self.folder, "token")) as f:
            self.client = ServiceClient(url, f.read().strip())
        self.client.info()

    def _exit_text(self):
        code = self.process.poll()
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    def _last_log_line(self):
        try:
            with open(os.path.join(self.folder, "service.log"), errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else f"it exited ({self._exit_text()})"

    def _kill(self):
        if self.process is None or self.process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)    # its own group: PythonSlicer's child too
            except ProcessLookupError:
                pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            if os.name != "nt":
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(10)

    def _cleanup(self):
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# -- trained models and trainings ("one door"): functions taking a ServiceClient ----------------------
# A training's status has a job's fields (state, stage, done, total, message, error) plus step
# ("pseudo-label" / "train"), metrics (one record per epoch: epoch, loss, val_dice, lr...) and, once done,
# model (the registered entry).
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
