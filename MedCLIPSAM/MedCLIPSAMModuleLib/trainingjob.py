"""Weak-supervision training through the service (POST /trainings): the scene's volumes (or each file of a
folder) are uploaded, the service pseudo-labels them with the zero-shot pipeline and trains a network in
a child process of its own, registers it in its registry (GET /models/trained lists it), and streams the
epochs' metrics in the training's status; here they go into a table node with a loss / validation-Dice
chart. A TrainingJob has a ServiceJob's surface (poll, wait, cancel, isRunning, result, process.wait):
the network waits on a worker thread, the scene is touched only in poll() (the panel's QTimer, or wait()).
"""

import logging
import os
import time

from . import choices
from .i18n import tr as _
from .panelstate import inputVolumes
from .paths import mrml
from .prompts import cleanPrompts, safeName
from .results import WorkerJob, endJob
from .serviceclient import FINAL, ServiceError, cancelTraining, fraction, startTraining, training

METRICS_COLUMNS = ("epoch", "loss", "val_dice", "lr")


class WeakSupervisionResult:
    """How a training ended. status: 'succeeded', 'failed' or 'cancelled'; on success `model` is the
    service's registry entry of the trained model (name, kind, labels, date, present)."""

    def __init__(self, status, message="", model=None, tableNode=None, chartNode=None, elapsedSeconds=0.0):
        self.status, self.message, self.model = status, message, model
        self.tableNode, self.chartNode, self.elapsedSeconds = tableNode, chartNode, elapsedSeconds

    @property
    def succeeded(self):
        return self.status == "succeeded"

    def __repr__(self):
        return f"WeakSupervisionResult({self.status!r}, {self.message!r})"


def start(backend, images, prompts, modelName="weak-model", epochs=50, dims=2, device="auto", axis="axial",
          preset="v2", models="", sam=None, snapshots=None, batchSize=None, baseFilters=None, samplesPerEpoch=None,
          patchSize=None, progressCallback=None, logCallback=None, metricsCallback=None, completedCallback=None):
    """images: volume nodes (written here, on the scene's thread) or a folder whose files are uploaded one
    by one (the service never reads a client path). The service's models and device are those of
    (models, device), as for segmentation. Returns a TrainingJob, already running."""
    prompts = cleanPrompts(prompts)
    if not prompts:
        raise ValueError(_("Enter at least one prompt for the pseudo-labels."))
    name = " ".join((modelName or "").split())
    if not name:
        raise ValueError(_("Enter a name for the trained model."))
    choices.check(preset, axis, device)
    if int(epochs) < 1:
        raise ValueError(_("Train for at least one epoch."))
    body = {"preset": preset, "axis": axis, "dims": int(dims), "epochs": int(epochs), "sam": sam,
            "snapshots": snapshots, "batch_size": batchSize, "base_filters": baseFilters,
            "samples_per_epoch": samplesPerEpoch, "patch_size": list(patchSize) if patchSize else None}
    tempDir = backend.logic.temporaryDirectory()
    try:
        paths = trainingFiles(images, tempDir)
        retired = backend._serviceFor(models, device)
    except Exception:
        import shutil

        shutil.rmtree(tempDir, ignore_errors=True)
        raise
    job = TrainingJob(backend, retired, paths, tempDir, prompts, name, body, progressCallback, logCallback,
                      metricsCallback, completedCallback)
    job.process.thread.start()
    return job


def trainingFiles(images, tempDir):
    """The files to upload: each file of the user's folder, or the volume nodes written as <name>.nrrd."""
    if isinstance(images, (str, os.PathLike)):
        folder = os.path.expanduser(os.fspath(images))
        if not os.path.isdir(folder):
            raise ValueError(_("The training image folder '{folder}' does not exist.").format(folder=folder))
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise ValueError(_("The training image folder '{folder}' has no files.").format(folder=folder))
        return files
    nodes = [n for n in images or [] if n is not None]
    if not nodes:
        raise ValueError(_("Load at least one volume, or choose a folder of training images."))
    paths, used = [], set()
    for node in nodes:
        if node.GetImageData() is None:
            raise ValueError(_("Volume '{name}' has no image data.").format(name=node.GetName()))
        base = name = safeName(node.GetName(), "volume")
        k = 2
        while name.lower() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.lower())
        paths.append(os.path.join(tempDir, name + ".nrrd"))
        mrml().write_volume_node(node, paths[-1])
    return paths


def trainingVolumes(scene):
    """The 'loaded volumes' image source: the volumes the input selector offers."""
    return inputVolumes(scene)


class TrainingJob(WorkerJob):
    def __init__(self, backend, retired, paths, tempDir, prompts, name, body, progressCallback=None,
                 logCallback=None, metricsCallback=None, completedCallback=None):
        self.backend, self.service, self.retired = backend, backend.service, retired
        self.logic = backend.logic
        self.paths, self.tempDir, self.prompts, self.modelName, self.body = paths, tempDir, prompts, name, body
        self.metricsCallback = metricsCallback
        self.lastStatus = None
        self.trainingId = None
        self.tableNode, self.chartNode, self.seriesNodes = None, None, []
        self._shownRecords = 0
        super().__init__(self._work, "medclipsam-training", progressCallback, logCallback, completedCallback)

    # -- the scene's thread ---------------------------------------------------------------------
    def _handle(self, kind, payload):
        if kind == "status":
            self._status(payload)
            return True
        self.process.wait(10)
        endJob(self, lambda: self._outcome(kind, payload), "MedCLIP-SAM weak supervision")
        return False

    def _status(self, status):
        step = status.get("step") or "training"
        progress = {"stage": status.get("stage") or "", "step": step, "message": status.get("message") or "",
                    "done": status.get("done") or 0, "total": status.get("total") or 0,
                    "fraction": fraction(status) or 0.0}
        changed = self.lastStatus is None or any(progress[k] != self.lastProgress.get(k) for k in progress)
        self.lastStatus, self.lastProgress = status, progress
        if changed and self.progressCallback:   # (the status is asked for twice a second)
            self.progressCallback(progress)
        records = [r for r in status.get("metrics") or []     # the epochs (the ensemble record has no loss)
                   if isinstance(r, dict) and "epoch" in r and isinstance(r.get("loss"), (int, float))]
        if len(records) != self._shownRecords and records:
            self._shownRecords = len(records)
            if self.tableNode is None:
                self.tableNode, self.seriesNodes, self.chartNode = createMetricsPlot(self.logic.scene,
                                                                                     self.modelName)
            updateMetricsTable(self.tableNode, records)
            if self.metricsCallback:
                self.metricsCallback(self.tableNode, self.chartNode)

    def sceneClosed(self):
        """The scene is closing: the training goes on at the service (its volumes were uploaded); the table
        and chart go with the scene and come back, with every epoch so far, at the next status."""
        self.tableNode, self.chartNode, self.seriesNodes, self._shownRecords = None, None, [], 0

    def _outcome(self, kind, payload):
        elapsed = time.monotonic() - self.startTime
        if kind == "cancelled" or (kind != "done" and self._cancel.is_set()):
            scene = self.logic.scene
            for node in [self.chartNode, *self.seriesNodes, self.tableNode]:
                if node is not None and scene.IsNodePresent(node):
                    scene.RemoveNode(node)
            self.tableNode, self.chartNode, self.seriesNodes = None, None, []
            return WeakSupervisionResult("cancelled", _("cancelled; no model was registered"), elapsedSeconds=elapsed)
        if kind == "failed":
            return WeakSupervisionResult("failed", payload, tableNode=self.tableNode, chartNode=self.chartNode,
                                         elapsedSeconds=elapsed)
        self._status(payload)   # the last epoch and the ensemble record
        return WeakSupervisionResult("succeeded", payload.get("message") or "", payload.get("model"), self.tableNode,
                                     self.chartNode, elapsed)

    # -- the worker thread ------------------------------------------------------------------------
    def _work(self):
        try:
            outcome = self._run()
        except ServiceError as exc:
            outcome = ("failed", self.service.explain(exc))
        except Exception as exc:  # a bug must end the job with a sentence, not leave it running
            logging.exception("MedCLIP-SAM: the training failed")
            outcome = ("failed", _("unexpected failure ({error})").format(error=f"{type(exc).__name__}: {exc}"))
        self._post(*outcome)

    def _run(self):
        for service in self.retired:
            service.stop()
        self._post("progress", {"stage": "service", "step": "upload", "message": _("reaching the service"),
                                "done": 0, "total": 0, "fraction": 0.0})
        client = self.service.ensure()
        volumeIds = []
        for k, path in enumerate(self.paths):
            if self._cancel.is_set():
                return ("cancelled", None)
            self._post("progress", {"stage": "upload", "step": "upload", "done": k, "total": len(self.paths),
                                    "message": _("sending the training volumes"), "fraction": 0.0})
            volumeIds.append(client.upload(path)["volume_id"])
        if self._cancel.is_set():
            return ("cancelled", None)
        body = {k: v for k, v in self.body.items() if v is not None}
        status = startTraining(client, volumeIds, self.prompts, self.modelName, **body)
        self.trainingId = status["job_id"]
        cancelSent = False
        while True:
            self._post("status", status)
            if status["state"] in FINAL:
                break
            if self._cancel.is_set() and not cancelSent:
                cancelTraining(client, self.trainingId)
                cancelSent = True
            self._cancel.wait(0.5) if not cancelSent else time.sleep(0.2)
            status = training(client, self.trainingId)
        for volumeId in volumeIds:      # the service keeps its own copies for the training
            try:
                client.forget(volumeId)
            except ServiceError:
                pass
        if status["state"] == "done":
            return ("done", status)
        if status["state"] == "cancelled":
            return ("cancelled", None)
        return ("failed", f"{status.get('step') or 'training'}: {status.get('error') or status.get('message')}")


def createMetricsPlot(scene, modelName):
    """A table node for the training metrics, loss and validation-Dice series, and a chart of both."""
    import vtk

    import slicer

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{modelName} training metrics")
    for column in METRICS_COLUMNS:
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        table.AddColumn(array)
    series = []
    for column, title, color in (("loss", _("training loss"), (0.12, 0.47, 0.71)),
                                 ("val_dice", _("validation Dice"), (0.84, 0.15, 0.16))):
        node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{modelName} {title}")
        node.SetAndObserveTableNodeID(table.GetID())
        node.SetXColumnName("epoch")
        node.SetYColumnName(column)
        node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        node.SetColor(*color)
        series.append(node)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{modelName} training")
    for node in series:
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
    chart.SetTitle(_("Training of '{name}'").format(name=modelName))
    chart.SetXAxisTitle(_("epoch"))
    chart.SetYAxisTitle(_("loss / Dice"))
    return table, series, chart


def updateMetricsTable(tableNode, records):
    """One row per epoch record (val_dice null -> NaN, a gap in the plot)."""
    table = tableNode.GetTable()
    for column in METRICS_COLUMNS:
        array = table.GetColumnByName(column)
        array.SetNumberOfTuples(len(records))
        for row, record in enumerate(records):
            value = record.get(column)
            array.SetValue(row, float(value) if isinstance(value, (int, float)) else float("nan"))
        array.Modified()
    table.Modified()
    tableNode.Modified()
