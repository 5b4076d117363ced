"""The weak-supervision section of the MedCLIPSAM panel: its buttons, progress, log and chart, around a
TrainingJob at the service (MedCLIPSAMModuleLib.trainingjob). It works on the panel's widgets; qt is imported where used."""

import os

import slicer

from .. import panelstate, prompts, trainingjob
from ..i18n import tr as _


class WeakSupervisionSection:
    def __init__(self, panel):
        self.panel = panel  # the MedCLIPSAMWidget: ui, logic, parameter node, setup flow, timer
        self.job = None
        self._shownChart = None

    def comboItems(self):
        """(combo, [(value, translated label)]) of this section's combo boxes (the panel fills them)."""
        ui = self.panel.ui
        return ((ui.weakSourceComboBox, [("scene", _("the volumes loaded in the scene")),
                                         ("folder", _("a folder of images or volumes"))]),
                (ui.weakDimsComboBox, [(2, _("2D (slices, as the MedCLIP-SAMv2 paper)")), (3, _("3D (patches)"))]))

    def connect(self):
        ui = self.panel.ui
        for button, slot in ((ui.weakFolderBrowseButton, self.onBrowseWeakFolder),
                             (ui.weakStartButton, self.onWeakStart), (ui.weakCancelButton, self.onWeakCancel)):
            button.connect("clicked(bool)", slot)
        ui.weakLogTextEdit.setMaximumBlockCount(5000)
        ui.weakProgressBar.setRange(0, 100)
        ui.weakProgressBar.hide()
        ui.weakCancelButton.hide()

    def updateWeakButtons(self):
        node = self.panel._parameterNode
        running = self.job is not None and self.job.isRunning
        problems = []
        if node and node.weakImageSource == "scene":
            count = len(trainingjob.trainingVolumes(slicer.mrmlScene))
            self.panel.ui.weakSourceInfoLabel.text = _("{count} volume(s) loaded").format(count=count)
            if not count:
                problems.append(_("Load the training volumes, or choose a folder."))
        elif node:
            self.panel.ui.weakSourceInfoLabel.text = ""
            if not os.path.isdir(os.path.expanduser(node.weakImagesFolder or "")):
                problems.append(_("Choose an existing folder of training images."))
        self.panel.ui.weakFolderLineEdit.enabled = bool(node) and node.weakImageSource == "folder"
        self.panel.ui.weakFolderBrowseButton.enabled = self.panel.ui.weakFolderLineEdit.enabled
        if node and not prompts.cleanPrompts(node.weakPrompts):
            problems.append(_("Enter at least one prompt for the pseudo-labels."))
        if node and not node.weakModelName.strip():
            problems.append(_("Enter a name for the trained model."))
        self.panel.ui.weakStartButton.enabled = bool(node) and not problems and not running
        self.panel.ui.weakStartButton.toolTip = "\n".join(problems) if problems else _(
            "Pseudo-label the images with the zero-shot method above, then train a network on them")
        self.panel.ui.weakCancelButton.visible = running
        self.panel.ui.weakCancelButton.enabled = running and not self.job.process.cancelRequested

    def browseFolder(self, title, current):
        import qt

        return qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title, current or "")

    def onBrowseWeakFolder(self):
        folder = self.browseFolder(_("Training images"), self.panel._parameterNode.weakImagesFolder)
        if folder:
            self.panel._parameterNode.weakImagesFolder = folder

    def onWeakStart(self):
        self.panel.saveSettings()
        self.panel.setupFlow.ensure(self.startWeakSupervision, self.panel._parameterNode.models, training=True)

    def startWeakSupervision(self):
        with panelstate.errorShownOnce(_("Weak supervision could not start.")):
            node = self.panel._parameterNode
            images = node.weakImagesFolder if node.weakImageSource == "folder" else trainingjob.trainingVolumes(
                slicer.mrmlScene)
            self.panel.ui.weakLogTextEdit.clear()
            self.panel.showProgress(self.panel.ui.weakProgressBar, self.panel.ui.weakStatusLabel, _("Starting..."))
            try:
                self.job = self.panel.logic.startWeakSupervision(
                    images, node.weakPrompts, node.weakModelName, epochs=node.weakEpochs,
                    dims=node.weakDims, device=node.weakDevice, axis=node.axis, preset=node.preset,
                    models=node.models, progressCallback=self.onWeakProgress, logCallback=self.onWeakLog,
                    metricsCallback=self.onWeakMetrics, completedCallback=self.onWeakCompleted)
            except Exception:
                self.panel.ui.weakProgressBar.hide()
                self.panel.ui.weakStatusLabel.text = ""
                raise
            self.panel._timer.start()
            self.updateWeakButtons()

    def onSceneStartClose(self):
        """File > Close Scene: training keeps running (its volumes were uploaded when it started); its chart
        comes back in the new scene with the next epoch."""
        if self.job is not None and self.job.isRunning:
            self.job.sceneClosed()
        self._shownChart = None

    def onWeakCancel(self):
        if self.job is not None and self.job.isRunning:
            self.job.cancel()
            self.panel.ui.weakStatusLabel.text = _("Cancelling...")
            self.updateWeakButtons()

    def onWeakProgress(self, progress):
        self.panel.ui.weakStatusLabel.text = f"{progress['step']}: {progress['message'] or progress['stage']}"
        self.panel.ui.weakProgressBar.value = int(round(100 * progress["fraction"]))
        self.panel.ui.weakProgressBar.setFormat(f"{progress['step']} %p%")
        self.panel.ui.weakLogTextEdit.appendPlainText(self.panel.ui.weakStatusLabel.text)

    def onWeakLog(self, line):
        self.panel.ui.weakLogTextEdit.appendPlainText(line)

    def onWeakMetrics(self, tableNode, chartNode):
        if self._shownChart is chartNode:
            return
        self._shownChart = chartNode
        plots = getattr(slicer.modules, "plots", None)
        if plots is not None:  # the plot view of the current layout (switches to a layout that has one)
            plots.logic().ShowChartInLayout(chartNode)

    def onWeakCompleted(self, result):
        import qt

        self.panel.ui.weakProgressBar.hide()
        if result.status == "succeeded":
            self.panel.populateMethodCombo()
            self.panel.ui.weakStatusLabel.text = _("Trained '{name}' in {seconds:.0f} s; it is now a method above. "
                                             "{message}").format(name=result.model["name"],
                                                                 seconds=result.elapsedSeconds, message=result.message)
        elif result.status == "cancelled":
            self.panel.ui.weakStatusLabel.text = _("Cancelled; no model was registered.")
        else:
            self.panel.ui.weakStatusLabel.text = _("Failed: {message}").format(message=result.message)
            slicer.util.errorDisplay(_("Weak supervision failed:\n{message}").format(message=result.message),
                                     windowTitle=_("MedCLIP-SAM"))
        self.panel.ui.weakLogTextEdit.appendPlainText(self.panel.ui.weakStatusLabel.text)
        qt.QTimer.singleShot(0, self.updateWeakButtons)
