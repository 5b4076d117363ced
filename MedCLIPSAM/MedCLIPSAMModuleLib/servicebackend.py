"""The panel's one backend: the segmentation service (`medclipsam serve`, local by default, remote by URL
and token). startSegmentation returns a ServiceJob (poll, wait, cancel, isRunning, result, the callbacks,
process.wait) for a zero-shot preset (POST /jobs) or a registered trained model (POST /jobs/trained: a
weak-supervision ensemble or MedCLIPSeg); startTraining (training.py) uses the same service.

Threads: everything that waits on the network (start or reach the service, upload, submit, follow the job,
download) runs on the job's worker thread; the scene is touched only on the thread that calls poll() (the
panel's QTimer, or wait()): poll drains the worker's queue, writes the input volume when the worker asks
for it, reports progress, and at the end brings the downloaded files in through jobs.importRun.

Uploads are kept: a volume node whose voxels and geometry did not change since its last upload to this
service is not sent again (its CLIP and SAM2 encodings stay warm there); a changed or removed node's upload
is forgotten at the service. A local service that died is reported in one sentence; the next Apply
starts a new one (LocalService.ensure) and the panel shows its notice.
"""

import importlib.util
import logging
import os
import threading
import time

from . import choices
from .i18n import tr as _
from .paths import mrml
from .prompts import cleanPrompts
from .results import SegmentationResult, WorkerJob, endJob, importRun
from .serviceclient import (LocalService, RemoteService, ServiceClient, ServiceError, ServiceUnavailable, localReport,
                            submitTrained, trainedModels)

MODES = ("local", "remote")   # a local service (default) or a remote one
FINAL = ("done", "failed", "cancelled")
# One local service per Slicer process, whichever Logic asks (the panel's, a script's, the self-test's):
# (models, device) -> LocalService. A new models/device choice stops the one before (each holds models).
_localServices = {}


def serviceCanRun():
    """True when this Python has what `medclipsam serve` needs (fastapi and uvicorn); looked up, not
    imported, so that asking costs nothing."""
    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn"))


def stopLocalServices():
    """Stop every local service this process started (the module reloads; a test file ends)."""
    services = list(_localServices.values())
    _localServices.clear()
    for service in services:
        service.stop()


class ServiceBackend:
    def __init__(self, logic):
        self.logic = logic          # python(), environment(), temporaryDirectory(), importResult(), scene
        self.mode = "local"
        self.url = ""
        # The token is held here in memory; the panel keeps it in the user's settings (QSettings), never in
        # the parameter node: its parameters are written into .mrml scene files (vtkMRMLScriptedModuleNode::
        # WriteXML, Libs/MRML/Core/vtkMRMLScriptedModuleNode.cxx:64 in v5.10.0), which get shared.
        self.token = ""
        self.localArguments = []    # more `serve` options for a local service
        self.jobOptions = {}        # more POST /jobs fields (the service's names; tests: a slower mode)
        self.idleExit = 1800.0      # a local service stops after this long without a request
        self.wantReport = True      # ask for the per-prompt report (small JSON) with every run
        self.wantSaliency = True    # and the saliency volumes (one per prompt), as a local run writes them
        self.service = None
        self.notice = None          # one sentence after the service was restarted, for the panel
        self.uploads = 0            # volumes sent so far (the panel and the tests read it)
        self.starting = False       # a worker is starting (or reaching) the service
        self._key = None
        self._sent = {}             # volume node ID -> (stamp, volume id, client)
        self._forget = []           # (client, volume id) to drop at the service
        self._lock = threading.RLock()
        self._observed = None       # (scene, observer tag)
        # Slicer never turns on PythonQt's thread support (PythonQtThreadSupport.cpp:45 defaults off): the
        # main thread keeps the Python lock while Qt idles, so a worker thread moves only while a timer
        # callback runs Python. wake() is the panel's timer start: called when a thread starts here
        # outside a job (the forget thread), so that the panel polls (busy) until it is done.
        self.wake = None
        self._forgetThread = None
        self._retired = []          # local services replaced by refineService, for the refine worker to stop

    # -- the seam -------------------------------------------------------------------------------
    def startSegmentation(self, inputVolume, prompts, segmentationNode=None, preset="v2", axis="axial",
                          device="auto", models="", computeUncertainty=False, show3D=False, progressCallback=None,
                          logCallback=None, completedCallback=None, trainedModel=None, samples=None, absentIf=""):
        """Start a run on the service; returns a ServiceJob at once (nothing here waits on the network).

        trainedModel: a model registered at the service instead of the zero-shot preset. A weak-supervision
        model segments its own labels (prompts are not sent); a MedCLIPSeg model one segment per prompt (its
        first training prompt when none), with `samples` stochastic passes."""
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError(_("Select an input volume that has image data."))
        prompts = cleanPrompts(prompts)
        choices.check(preset, axis, device)
        if trainedModel:
            options = {"model": trainedModel, "uncertainty": bool(computeUncertainty), "samples": samples}
        elif not prompts:
            raise ValueError(_("Enter at least one prompt (one target per line)."))
        else:   # the options of `medclipsam segment` (absentIf: one --absent-if)
            options = {"preset": preset, "axis": axis, "uncertainty": bool(computeUncertainty),
                       "report": bool(self.wantReport), "saliency": bool(self.wantSaliency)}
            if absentIf and absentIf.strip():
                options["absent_if"] = [absentIf.strip()]
            options.update(self.jobOptions)
        retired = self._serviceFor(models, device)
        self._watchScene()
        self._dropRemoved()
        job = ServiceJob(self, self.service, retired, inputVolume, prompts, options, segmentationNode,
                         bool(computeUncertainty), show3D, progressCallback, logCallback, completedCallback)
        job.start()
        return job

    # -- the service ------------------------------------------------------------------------------
    def configure(self, mode, url="", token=""):
        """The panel's settings; a change takes effect with the next run (a local service then stops)."""
        mode = "local" if mode == "off" else mode   # the former "process per run" setting
        if mode not in MODES:
            raise ValueError(f"unknown service mode '{mode}'; choose one of {', '.join(MODES)}")
        self.mode, self.url, self.token = mode, (url or "").strip(), (token or "").strip()

    def _serviceFor(self, models, device):
        """Make self.service fit the settings and this run's models and device; returns the service it
        replaces (to be stopped by the worker: a list)."""
        if self.mode == "remote":
            if not self.url:
                raise ValueError(_("Enter the remote service's URL in 'Setup and advanced'."))
            key = ("remote", self.url, self.token)
        else:
            key = ("local", (models or "").strip(), device or "auto")
        if key == self._key and self.service is not None and (key[0] == "remote" or
                                                               _localServices.get(key) is self.service):
            return []
        self._key = key
        with self._lock:
            self._forget += [(client, volumeId) for _stamp, volumeId, client in self._sent.values()]
            self._sent.clear()
        retired = []
        if key[0] == "remote" or key not in _localServices:
            retired = list(_localServices.values())     # another models/device, or remote now: stop it
            _localServices.clear()
        if key[0] == "remote":
            self.service = RemoteService(self.url, self.token)
        else:
            extra = (["--models", key[1]] if key[1] else []) + ["--device", key[2]] + list(self.localArguments)
            self.service = _localServices.get(key) or _localServices.setdefault(key, LocalService(
                self.logic.python(), extra, env=self.logic.environment(), idle_exit=self.idleExit))
        return retired

    def refineService(self, models="", device="auto"):
        """The service click refinement sends to: the one Apply uses with the panel's settings (mode, URL,
        token, models, device), started by the refine worker on its first use; ValueError (one sentence)
        when the settings give none. Called on the GUI thread; a replaced local service is stopped by the
        refine worker (stopRetired)."""
        if self.mode == "local" and not serviceCanRun():
            raise ValueError(_("Click refinement needs the local segmentation service, and fastapi and uvicorn are "
                               "not installed in Slicer's Python."))
        retired = self._serviceFor(models, device)
        with self._lock:
            self._retired += retired        # stopped by the refine worker (stopRetired), not on this thread
        self._watchScene()
        return self.service

    def stopRetired(self):
        """Worker threads: stop the local services refineService replaced (another models / device)."""
        with self._lock:
            retired, self._retired = self._retired, []
        for service in retired:
            service.stop()

    def stop(self):
        """Stop a local service (Slicer closes, the module reloads); a remote one is left alone."""
        if self.service is not None:
            self.service.stop()
            for key in [k for k, v in _localServices.items() if v is self.service]:
                del _localServices[key]
        self.service, self._key = None, None
        self.stopRetired()          # replaced by refineService and not yet stopped by a refine worker
        with self._lock:
            self._sent.clear()
            self._forget.clear()
        if self._observed is not None:
            scene, tag = self._observed
            scene.RemoveObserver(tag)
            self._observed = None

    def testConnection(self):
        """(ok, one sentence) for "Test connection" (waits on the network: call it off the GUI thread)."""
        if self.mode == "remote":
            if not self.url:
                return False, _("Enter the remote service's URL first.")
            return ServiceClient(self.url, self.token, timeout=10.0).test_connection()
        if not serviceCanRun():
            return False, _("fastapi and uvicorn are not installed in Slicer's Python: install them with pip to "
                            "use the local service, or use a remote one.")
        service = self.service
        if isinstance(service, LocalService) and service.process is not None and service.process.poll() is None:
            return service.client.test_connection()
        return True, _("The local service can run; the next Apply starts it.")

    def describe(self):
        """The panel's state line (may ask the service for /info: call it off the GUI thread)."""
        service = self.service
        if isinstance(service, LocalService) and self.starting:
            return _("Local service: starting (the models load once)...")
        if service is None or (isinstance(service, LocalService) and service.process is None):
            return _("Local service: not running; the next Apply starts it.") if self.mode == "local" else \
                _("Remote service at {url}; not used yet.").format(url=self.url)
        if isinstance(service, LocalService) and service.process.poll() is not None:
            return _("Local service: not running ({why}); the next Apply starts a new one.").format(
                why=service._exit_text())
        try:
            info = service.client.info()
        except ServiceError as exc:
            return str(exc)
        cache = info.get("cache", {})
        where = _("Local service: running on port {port}").format(port=service.client.url.rsplit(":", 1)[-1]) \
            if isinstance(service, LocalService) else _("Remote service at {url}").format(url=service.client.url)
        text = _("{where}, {device}; cache {used:.0f} of {budget:.0f} MB, {hits} hits; {volumes} volume(s).").format(
            where=where, device=info.get("device", "?"), used=cache.get("used_bytes", 0) / 2**20,
            budget=cache.get("budget_bytes", 0) / 2**20, hits=cache.get("hits", 0), volumes=info.get("volumes", 0))
        if self.notice:
            text += " " + _("(Restarted after it stopped.)")
        return text

    def trainedModels(self):
        """The trained models of the service in use ({name, kind, labels, date, present}, no server folder):
        GET /models/trained of a remote or running local service (a short timeout: the panel asks on the GUI
        thread when it is shown); a local service not started yet would answer from the user's own registry
        (it runs with this environment's MEDCLIPSAM_HOME), so that is read rather than starting one."""
        if self.mode == "remote":
            return trainedModels(ServiceClient(self.url, self.token, timeout=5.0)) if self.url else []
        service = self.service
        if isinstance(service, LocalService) and service.process is not None and service.process.poll() is None:
            return trainedModels(service.client)
        from . import trained

        return [{k: m[k] for k in ("name", "kind", "labels", "date", "present")} for m in trained.call("list_models")]

    # -- uploads ---------------------------------------------------------------------------------
    @staticmethod
    def stamp(volumeNode):
        """What decides whether an upload is still valid: the voxels' modification time and the geometry."""
        import vtk

        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return (volumeNode.GetImageData().GetMTime(),
                tuple(matrix.GetElement(i, j) for i in range(4) for j in range(4)))

    def sentVolume(self, nodeId, stamp, client):
        """The service's id of this node's earlier upload when it is still valid, else None (a changed
        node's old upload is forgotten)."""
        with self._lock:
            entry = self._sent.get(nodeId)
            if entry is None:
                return None
            if entry[0] == stamp and entry[2] is client:
                return entry[1]
            del self._sent[nodeId]
            if entry[2] is client:
                self._forget.append((client, entry[1]))
            return None

    def remember(self, nodeId, stamp, volumeId, client):
        with self._lock:
            self._sent[nodeId] = (stamp, volumeId, client)
            self.uploads += 1

    def forgetPending(self):
        """Drop the uploads of changed or removed nodes at the service (worker threads only)."""
        with self._lock:
            pending, self._forget = self._forget, []
        for client, volumeId in pending:
            try:
                client.forget(volumeId)
            except ServiceError:
                pass  # gone already (restarted, evicted): nothing to drop

    def _dropRemoved(self):
        scene = self.logic.scene
        with self._lock:
            for nodeId in [n for n in self._sent if scene.GetNodeByID(n) is None]:
                _stamp, volumeId, client = self._sent.pop(nodeId)
                self._forget.append((client, volumeId))
            return bool(self._forget)

    def _watchScene(self):
        """Forget a volume's upload as soon as its node leaves the scene (NodeRemovedEvent comes after the
        node's ID is gone: vtkMRMLScene::RemoveNode, Libs/MRML/Core/vtkMRMLScene.cxx:1553-1555, v5.10.0)."""
        scene = self.logic.scene
        if self._observed is not None and self._observed[0] is scene:
            return
        if self._observed is not None:
            self._observed[0].RemoveObserver(self._observed[1])
        self._observed = (scene, scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved))

    def _onNodeRemoved(self, caller=None, event=None):
        if getattr(self, "_sent", None) and self._dropRemoved():   # (no _sent: Python is shutting down)
            if not self.busy:
                self._forgetThread = threading.Thread(target=self.forgetPending, name="medclipsam-forget",
                                                      daemon=True)
                self._forgetThread.start()
            if self.wake is not None:
                self.wake()

    @property
    def busy(self):
        """A thread of the backend's own (not a job's) still runs: the panel's timer keeps ticking."""
        return self._forgetThread is not None and self._forgetThread.is_alive()


class ServiceJob(WorkerJob):
    """One segmentation on the service. poll() must be called from the thread that owns the scene."""

    def __init__(self, backend, service, retired, inputVolume, prompts, options, segmentationNode,
                 offerUncertainty, show3D, progressCallback=None, logCallback=None, completedCallback=None):
        self.backend, self.service, self.retired = backend, service, retired
        self.logic = backend.logic
        self.inputVolume = inputVolume
        self.nodeId = inputVolume.GetID()
        self.stamp = ServiceBackend.stamp(inputVolume)   # read here, on the scene's thread
        self.prompts = list(prompts)
        self.options = options
        self.segmentationNode = segmentationNode
        self.offerUncertainty = offerUncertainty
        self.show3D = show3D
        super().__init__(self._work, "medclipsam-service-job", progressCallback, logCallback, completedCallback)
        self.tempDir = self.logic.temporaryDirectory()
        self.jobId = None
        self.uploaded = False       # this run sent the volume (False: the service had it)
        self._inputReady = threading.Event()
        self._inputPath = None

    def start(self):
        self.process.thread.start()

    # -- the scene's thread ---------------------------------------------------------------------
    def _handle(self, kind, payload):
        if kind == "log":
            logging.info(f"MedCLIP-SAM service: {payload}")
            if self.logCallback:
                self.logCallback(payload)
        elif kind == "input":
            self._writeInput()
        else:
            self._finish(kind, payload)
            return False
        return True

    def _writeInput(self):
        """The worker needs the volume's file (first upload, or the service lost it): write it here."""
        path = None
        try:
            if self.logic.scene.IsNodePresent(self.inputVolume) and self.inputVolume.GetImageData() is not None:
                path = os.path.join(self.tempDir, "input.nrrd")
                self.stamp = ServiceBackend.stamp(self.inputVolume)
                mrml().write_volume_node(self.inputVolume, path)
        except Exception as exc:  # reported by the worker as the run's failure
            logging.exception("MedCLIP-SAM: writing the input volume failed")
            path = exc
        self._inputPath = path
        self._inputReady.set()

    def _finish(self, kind, payload):
        self.process.wait(10)   # it has sent its last message
        endJob(self, lambda: self._outcome(kind, payload))

    def _outcome(self, kind, payload):
        elapsed = time.monotonic() - self.startTime
        if kind == "cancelled" or self._cancel.is_set():
            return SegmentationResult("cancelled", _("cancelled; the scene was not changed"), elapsedSeconds=elapsed)
        if kind == "failed":
            return SegmentationResult("failed", payload, elapsedSeconds=elapsed)
        return importRun(self.logic, self.inputVolume, self.segmentationNode, payload["output"],
                         payload.get("uncertainty"), self.show3D, elapsed, payload["message"],
                         payload.get("saliency"), payload.get("report"))

    # -- the worker thread ------------------------------------------------------------------------
    def _progress(self, stage, message, done=0, total=0):
        fraction = min(1.0, done / total) if total else None
        self._post("progress", {"stage": stage, "done": done, "total": total, "message": message,
                                "fraction": fraction})

    def _work(self):
        try:
            outcome = self._run()
        except ServiceError as exc:
            outcome = ("failed", self._explain(exc))
        except Exception as exc:  # a bug must end the job with a sentence, not leave it running
            logging.exception("MedCLIP-SAM: the service job failed")
            outcome = ("failed", _("unexpected failure ({error})").format(error=f"{type(exc).__name__}: {exc}"))
        if outcome[0] == "failed" and self._cancel.is_set():
            outcome = ("cancelled", None)
        self._post(*outcome)

    def _explain(self, error):
        """One sentence; a local service that died is waited for briefly so that it is named as such."""
        process = getattr(self.service, "process", None)
        if isinstance(error, ServiceUnavailable) and process is not None:
            try:
                process.wait(2)
            except Exception:
                pass
        return self.service.explain(error)

    def _run(self):
        for service in self.retired:
            service.stop()
        if self._cancel.is_set():
            return ("cancelled", None)
        local = isinstance(self.service, LocalService)
        if local and (self.service.process is None or self.service.process.poll() is not None):
            self._progress("service", _("starting the local segmentation service (the models load once)"))
        with self.backend._lock:
            self.backend.starting = True
            try:
                client = self.service.ensure()
            finally:
                self.backend.starting = False
            self.backend.notice = self.service.notice or (self.backend.notice if local else None)
        if self.service.notice:
            self._post("log", self.service.notice)
            self._progress("service", self.service.notice)
        volumeId = self._volumeOn(client)
        if volumeId is None or self._cancel.is_set():   # (a long upload may end after Widget.cleanup)
            return ("cancelled", None)
        self.backend.forgetPending()     # changed (as found just now) or removed nodes' uploads
        try:
            status = self._submit(client, volumeId)
        except ServiceError as exc:
            if exc.status != 404 or self.uploaded:
                raise
            volumeId = self._volumeOn(client, again=True)   # the service let it go (restarted, too many)
            if volumeId is None:
                return ("cancelled", None)
            status = self._submit(client, volumeId)
        self.jobId = status["job_id"]
        status = self._follow(client, status)
        if status["state"] == "cancelled" or self._cancel.is_set():
            return ("cancelled", None)
        if status["state"] != "done":
            return ("failed", status.get("error") or _("the service ended the job as {state}").format(
                state=status["state"]))
        return ("done", self._download(client, status))

    def _submit(self, client, volumeId):
        if "model" not in self.options:
            return client.submit(volumeId, self.prompts, **self.options)
        kinds = {m["name"]: m["kind"] for m in trainedModels(client)}
        if self.options["model"] not in kinds:
            raise ServiceError(_("The trained model '{name}' is not registered at this service.").format(
                name=self.options["model"]))
        prompts = self.prompts if kinds[self.options["model"]] == "medclipseg" else None  # weak: its own labels
        return submitTrained(client, volumeId, prompts=prompts, **self.options)

    def _volumeOn(self, client, again=False):
        """The service's id of the input volume: the earlier upload while the node is unchanged, else a new
        upload of the file the scene's thread writes. None when cancelled meanwhile."""
        if not again:
            volumeId = self.backend.sentVolume(self.nodeId, self.stamp, client)
            if volumeId is not None:
                return volumeId
        self._post("input")
        while not self._inputReady.wait(0.1):
            if self._cancel.is_set():
                return None
        self._inputReady.clear()
        path = self._inputPath
        if isinstance(path, Exception):
            raise path
        if path is None:
            raise ServiceError(_("The input volume was removed from the scene during the run."))
        self._progress("upload", _("sending the volume to the service"))
        volumeId = client.upload(path)["volume_id"]
        os.remove(path)
        self.uploaded = True
        self.backend.remember(self.nodeId, self.stamp, volumeId, client)
        return volumeId

    def _follow(self, client, status):
        """Report the job's progress until it ends; a cancel is passed on to the service once."""
        cancelSent = False
        while True:
            self._report(status)
            if status["state"] in FINAL:
                return status
            if self._cancel.is_set() and not cancelSent:
                status = client.cancel(self.jobId)
                cancelSent = True
                continue
            self._cancel.wait(0.2) if not cancelSent else time.sleep(0.1)
            status = client.job(self.jobId)

    def _report(self, status):
        if status["state"] == "queued":
            ahead = int(status.get("position") or 0)
            message = (_("queued: {n} job ahead") if ahead == 1 else _("queued: {n} jobs ahead")).format(n=ahead) \
                if ahead else _("starting")
            self._progress("queued", message)
        elif status["state"] in ("running", "cancelling", "done"):
            self._progress(status.get("stage") or "running", status.get("message") or "", status.get("done") or 0,
                           status.get("total") or 0)

    def _download(self, client, status):
        files = {"output": client.result(self.jobId, os.path.join(self.tempDir, "output.seg.nrrd"))}
        if self.offerUncertainty and status.get("uncertainty"):
            files["uncertainty"] = client.result(self.jobId, os.path.join(self.tempDir, "uncertainty.nrrd"),
                                                 "uncertainty")
        if status.get("saliency"):
            files["saliency"] = client.result(self.jobId, os.path.join(self.tempDir, "saliency.nrrd"), "saliency")
        document = None
        if "model" in self.options:     # a trained model's job: its status has one line per segment
            files["message"] = "; ".join(f"{e['prompt']}: {e['summary']}" for e in status["report"])
            return files
        if status.get("report_file"):
            files["report"] = client.result(self.jobId, os.path.join(self.tempDir, "report.json"), "report")
            document = localReport(files["report"], files.get("saliency"), output=files["output"])
        files["message"] = self._summary(status, document)
        return files

    @staticmethod
    def _summary(status, document):
        """The run's line for the panel, as `medclipsam segment` ends: each prompt's summary."""
        if not document:
            return status.get("message") or ""
        entries = document.get("prompts", [])
        text = "; ".join(f"{e['prompt']}: {e['summary']}" for e in entries)
        if any(e.get("models", {}).get("random") for e in entries):
            text = "RANDOM-WEIGHT MODELS (meaningless output): " + text
        return text
