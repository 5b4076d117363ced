"""Weak supervision from the panel: pseudo-label the images with the zero-shot pipeline, train a
network on them (`medclipsam pseudo-label` then `train-weak`, one ProcessChain), mirror the metrics into
a table node with a loss / validation-Dice chart, and register the model (WeakSupervisionJob)."""

import logging
import os
import shutil

from . import commands
from .i18n import tr as _
from .jobs import WeakSupervisionJob
from .panelstate import inputVolumes
from .paths import mrml
from .process import ProcessChain
from .prompts import cleanPrompts, safeName

METRICS_COLUMNS = ("epoch", "loss", "val_dice", "lr")


def start(logic, images, prompts, modelName="weak-model", outputFolder="", epochs=50, dims=2, device="auto",
          axis="axial", preset="v2", models="", snapshots=None, batchSize=None, baseFilters=None,
          samplesPerEpoch=None, patchSize=None, pseudoLabelArgs=(), trainArgs=(), progressCallback=None,
          logCallback=None, metricsCallback=None, completedCallback=None):
    """images: a folder of images/volumes, or volume nodes (written to a temporary folder as .nrrd). The
    model goes to outputFolder/modelName (outputFolder empty: the cache's 'trained' folder); the
    pseudo-labels live in a temporary folder removed at the end. Returns a WeakSupervisionJob."""
    prompts = cleanPrompts(prompts)
    name = " ".join((modelName or "").split())
    if not name:
        raise ValueError(_("Enter a name for the trained model."))
    folder = outputFolder or logic.defaultTrainingFolder()
    modelDir = os.path.join(os.path.expanduser(folder), safeName(name, "model"))
    tempDir = logic.temporaryDirectory()
    try:
        data = trainingImages(images, tempDir)
        pseudoDir = os.path.join(tempDir, "pseudo-labels")
        cli = logic.cliCommand()
        chain = [
            commands.pseudoLabel(cli, [data], pseudoDir, prompts, preset, axis, device, models, pseudoLabelArgs),
            commands.trainWeak(cli, data, os.path.join(pseudoDir, "labels.txt"), modelDir, prompts, epochs, dims, axis,
                               device, snapshots, batchSize, baseFilters, samplesPerEpoch, patchSize, trainArgs),
        ]
        # train-weak makes the model folder but wants its parent (the default one may not exist yet)
        os.makedirs(os.path.dirname(modelDir), exist_ok=True)
        for command in chain:
            logging.info("MedCLIP-SAM: running " + " ".join(command))
        process = ProcessChain(chain, env=logic.environment(), cwd=tempDir)
        process.start()
    except Exception:
        shutil.rmtree(tempDir, ignore_errors=True)
        raise
    return WeakSupervisionJob(logic, process, tempDir, modelDir, name, progressCallback, logCallback,
                              metricsCallback, completedCallback)


def trainingImages(images, tempDir):
    """The folder the CLI reads: the user's folder as is, or the volume nodes written as <name>.nrrd."""
    if isinstance(images, (str, os.PathLike)):
        folder = os.path.expanduser(os.fspath(images))
        if not os.path.isdir(folder):
            raise ValueError(_("The training image folder '{folder}' does not exist.").format(folder=folder))
        return folder
    nodes = [n for n in images or [] if n is not None]
    if not nodes:
        raise ValueError(_("Load at least one volume, or choose a folder of training images."))
    folder = os.path.join(tempDir, "images")
    os.makedirs(folder)
    used = set()
    for node in nodes:
        if node.GetImageData() is None:
            raise ValueError(_("Volume '{name}' has no image data.").format(name=node.GetName()))
        base = name = safeName(node.GetName(), "volume")
        k = 2
        while name.lower() in used:  # case names must differ (labels are matched by name)
            name, k = f"{base}_{k}", k + 1
        used.add(name.lower())
        mrml().write_volume_node(node, os.path.join(folder, name + ".nrrd"))
    return folder


def trainingVolumes(scene):
    """The 'loaded volumes' image source: the volumes the input selector offers."""
    return inputVolumes(scene)


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
