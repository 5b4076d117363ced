"""MedCLIP-SAM for 3D Slicer: segment structures in a volume from text prompts.

Thin on purpose: everything the panel runs goes to the segmentation service (a local `medclipsam serve`
kept warm, or a remote one): zero-shot runs, click refinement, trained-model prediction and weak-supervision
training; only the setup's model checks run as CLI processes. Slicer stays responsive and Cancel stops any. The Qt-free parts are in
MedCLIPSAMModuleLib/ (one concern a file), scene import/export in MedCLIPSAMLib.mrml. Loading this file
imports no qt, numpy or torch, and it keeps Python 3.9 syntax so that an older Slicer can say what it needs.
"""

import os
import sys
from typing import Annotated, Union

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # a checkout loaded by path, as in pytest
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from MedCLIPSAMModuleLib import dependencies, devices, modeljobs, panelstate, prompts, results, trained  # noqa: E402
from MedCLIPSAMModuleLib import trainingjob  # noqa: E402
from MedCLIPSAMModuleLib.choices import AXES, DEVICES, DIMS, PRESETS  # noqa: E402
from MedCLIPSAMModuleLib.modeljobs import ModelsJob, requiredModels  # noqa: E402
from MedCLIPSAMModuleLib.panels import refinepanel, resultspanel, trainedpanel  # noqa: E402
from MedCLIPSAMModuleLib.panels.evidencepanel import EvidenceSection  # noqa: E402
from MedCLIPSAMModuleLib.panels.servicepanel import ServicePanel  # noqa: E402
from MedCLIPSAMModuleLib.panels.trainingpanel import WeakSupervisionSection  # noqa: E402
from MedCLIPSAMModuleLib.paths import mrml, resourcePath, useShippedLibrary  # noqa: E402
from MedCLIPSAMModuleLib.servicebackend import ServiceBackend  # noqa: E402
from MedCLIPSAMModuleLib.setupflow import SetupFlow  # noqa: E402

IMAGE_SOURCES = ("scene", "folder")  # weak supervision: the loaded volumes, or a folder of images
SETTINGS_GROUP = "MedCLIPSAM"


class MedCLIPSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedCLIP-SAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedCLIP-SAM for 3D Slicer contributors"]
        self.parent.helpText = _("""
Segment structures in a volume by describing them in words ("brain tumor", "left kidney"), with the
MedCLIP-SAM methods: BiomedCLIP finds where the text matches the image, SAM2 turns that into a mask.
The result is an ordinary segmentation, ready for the Segment Editor. Needs 3D Slicer 5.10 or later.
See the <a href="https://github.com/medclipsam/SlicerMedCLIPSAM">extension documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Implements MedCLIP-SAM (Koleilat, Asgariandehkordi, Rivaz and Xiao, MICCAI 2024), MedCLIP-SAMv2 and
MedCLIPSeg, on top of BiomedCLIP (Microsoft) and SAM 2 (Meta). Please cite the papers when you use the results.
""")
        iconPath = resourcePath("Icons/MedCLIPSAM.png")
        if os.path.isfile(iconPath):  # a source checkout keeps Resources/ one folder up
            import qt

            self.parent.icon = qt.QIcon(iconPath)


@parameterNodeWrapper
class MedCLIPSAMParameterNode:
    """What the panel remembers with the scene (and, except nodes and prompts, between sessions).

    inputVolume - the volume to segment: grey or colour (the Union sets the combo's node types).
    prompts / weakPrompts - targets, one per line; kept in step with their text boxes by the widget.
    preset / axis / device / models / absentIf - passed to `medclipsam segment`.
    trainedModel - a registered trained model to segment with instead of the preset ("": the preset).
    weak* - the weak-supervision section (image source, folder, epochs, 2D/3D, device, model name).
    """

    # None must be in a node Union (parameterNodeWrapper/util.py isNodeOrUnionOfNodes, v5.10.0)
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    prompts: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "v2"
    axis: Annotated[str, Choice(AXES)] = "axial"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    models: str = ""
    absentIf: str = ""
    computeUncertainty: bool = False
    show3D: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    trainedModel: str = ""
    weakImageSource: Annotated[str, Choice(IMAGE_SOURCES)] = "scene"
    weakImagesFolder: str = ""
    weakPrompts: str = ""
    weakEpochs: Annotated[int, WithinRange(1, 10000)] = 50
    weakDims: Annotated[int, Choice(DIMS)] = 2
    weakDevice: Annotated[str, Choice(DEVICES)] = "auto"
    weakModelName: str = "weak-model"


REMEMBERED_SETTINGS = {"prompts": str, "preset": str, "axis": str, "device": str, "models": str, "absentIf": str,
                       "computeUncertainty": bool, "show3D": bool, "trainedModel": str,
                       "weakImageSource": str, "weakImagesFolder": str, "weakEpochs": int, "weakDims": int,
                       "weakDevice": str, "weakModelName": str}


class MedCLIPSAMLogic(ScriptedLoadableModuleLogic):
    """Segments in the background and brings the result into the scene; usable without the GUI:

        logic = MedCLIPSAMLogic()
        result = logic.process(volumeNode, ["brain tumor"], preset="v2")   # waits
        job = logic.startSegmentation(volumeNode, ["liver"], progressCallback=print)  # returns at once

    Every run goes to `serviceBackend` (a local `medclipsam serve` kept warm, or a remote one).
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        # Test hooks: another interpreter, the setup's `medclipsam` command, more environment for both.
        self.pythonExecutable = None
        self.cliPrefix = None
        self.extraEnvironment = {}
        self.verifiedModels = set()
        self.serviceBackend = ServiceBackend(self)  # .configure(mode, url, token); .stop()

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return MedCLIPSAMParameterNode(super().getParameterNode())

    def python(self):
        """Slicer's Python launcher inside Slicer (as slicer.util.pip_install uses), else this interpreter."""
        if self.pythonExecutable:
            return self.pythonExecutable
        import shutil

        found = shutil.which("PythonSlicer") if hasattr(slicer, "app") else None
        return found or sys.executable

    def environment(self):
        """The child's environment: this one, with the shipped MedCLIPSAMLib first on the Python path."""
        from MedCLIPSAMModuleLib.paths import libraryParentDir

        env = dict(os.environ)
        parent = libraryParentDir()
        if parent:
            env["PYTHONPATH"] = os.pathsep.join([parent] + [p for p in [env.get("PYTHONPATH")] if p])
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        env.update(self.extraEnvironment)
        return env

    def temporaryDirectory(self):
        import tempfile

        base = slicer.app.temporaryPath if hasattr(slicer, "app") else None
        return tempfile.mkdtemp(prefix="MedCLIPSAM-", dir=base if base and os.path.isdir(base) else None)

    # ------------------------------------------------------------------------------ segmentation
    def startSegmentation(self, inputVolume, prompts, segmentationNode=None, **options):
        """Start a run and return its job (poll() or wait()). Options: preset, axis, device, models,
        computeUncertainty, show3D, trainedModel (a registered model's name), samples, absentIf, and
        progressCallback / logCallback / completedCallback."""
        return self.serviceBackend.startSegmentation(inputVolume, prompts, segmentationNode, **options)

    def process(self, inputVolume, prompts, segmentationNode=None, timeout=None, **options):
        """Run and wait; returns a SegmentationResult (check .status)."""
        return self.startSegmentation(inputVolume, prompts, segmentationNode, **options).wait(timeout)

    def importResult(self, segmentationPath, inputVolume, segmentationNode=None, uncertaintyPath=None,
                     show3D=False):
        """A finished run's files into the scene: (segmentation node, segment IDs, uncertainty node)."""
        return results.importResult(self.scene, segmentationPath, inputVolume, segmentationNode, uncertaintyPath,
                                    show3D, self.terminologiesLogic())

    @staticmethod
    def terminologiesLogic():
        """Slicer's terminologies logic (with its standard terminologies loaded), None outside Slicer."""
        terminologies = getattr(getattr(slicer, "modules", None), "terminologies", None)
        return terminologies.logic() if terminologies is not None else None

    def exportToLabelmap(self, segmentationNode, referenceVolume=None):
        """All segments onto the input volume's grid as a labelmap volume node (reused on re-export)."""
        if referenceVolume is None:
            referenceVolume = segmentationNode.GetNodeReference(
                segmentationNode.GetReferenceImageGeometryReferenceRole())
        return mrml().export_segments_to_labelmap(self.scene, segmentationNode, referenceVolume)

    def createPhantomVolume(self, name="MedCLIP-SAM phantom", seed=0, shape=(6, 40, 32)):
        """A small synthetic head MR (oblique, anisotropic) with a tumour, to try the module offline.
        Returns (volume node, MedCLIPSAMLib.phantoms.Phantom with the ground truth)."""
        useShippedLibrary()
        from MedCLIPSAMLib import phantoms

        phantom = phantoms.make_volume("mr", shape=shape, spacing=(1.2, 1.0, 3.0), direction="oblique",
                                       origin=(-20.0, 15.0, 40.0), seed=seed, lesion={"size": "large"})
        return mrml().volume_node_from_sitk(self.scene, phantom.image, name), phantom

    # ---------------------------------------------------------------- trained models, weak supervision
    def trainedModels(self, presentOnly=True):
        """The trained models of the service in use (dicts: name, kind, labels, date, present)."""
        return [m for m in self.serviceBackend.trainedModels() if m["present"] or not presentOnly]

    def trainedModel(self, name):
        """The service's entry of a usable trained model; ValueError (one sentence) otherwise."""
        for entry in self.trainedModels(presentOnly=False):
            if entry["name"] == name and entry["present"]:
                return entry
        raise ValueError(_("The trained model '{name}' is not usable at the service in use.").format(name=name))

    def registerTrainedModel(self, folder, name=None):
        """Add a model folder made on this computer (train-weak or medclipseg train) to this user's registry,
        which a local service uses; ValueError if it is not one."""
        return trained.call("add", folder, name)

    def removeTrainedModel(self, name):
        trained.call("remove", name)

    def startWeakSupervision(self, images, prompts, modelName="weak-model", **options):
        """Train at the service: upload `images` (volume nodes, or each file of a folder), pseudo-label them,
        train a network, register it there: a TrainingJob (see MedCLIPSAMModuleLib.trainingjob.start)."""
        return trainingjob.start(self.serviceBackend, images, prompts, modelName, **options)

    # ----------------------------------------------------------------------------------- setup
    def startModelsJob(self, action, names, *extra, progressCallback=None, completedCallback=None):
        """`medclipsam models ACTION NAME` for each name, one after another (a ModelsJob; poll it)."""
        def command(name):
            return modeljobs.command(self.cliPrefix or [self.python(), "-m", "MedCLIPSAMLib"], action, name, *extra)

        return ModelsJob(names, command, self.environment(), progressCallback, completedCallback).start()


class MedCLIPSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Qt is imported inside the methods: loading the module file needs no GUI. Nothing here
    waits: processes, model checks and the GPU query are polled from QTimers."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.weakSection = WeakSupervisionSection(self)
        self.evidenceSection = EvidenceSection(self)
        self.setupFlow = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updating = False
        self._gpus = []
        self._gpuQuery = None
        self._settings = panelstate.RememberedSettings(REMEMBERED_SETTINGS, SETTINGS_GROUP)
        self._volumeWatcher = panelstate.SceneVolumeWatcher(self.weakSection.updateWeakButtons)

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/MedCLIPSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedCLIPSAMLogic()
        self.setupFlow = SetupFlow(self.logic, self)
        self.evidenceSection.setup(uiWidget, self.ui.outputsCollapsibleButton)

        unsupported = dependencies.unsupportedSlicerMessage(
            (slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2])
        if unsupported:
            self.ui.setupStatusLabel.text = unsupported
            self.ui.setupStatusLabel.setStyleSheet("color: #c05000")

        # Combo boxes show translated labels and keep the CLI's value as item data.
        devicesItems = [("auto", _("auto (CUDA, then Apple MPS, then CPU)")), ("cuda", _("cuda (NVIDIA GPU)")),
                        ("mps", _("mps (Apple GPU)")), ("cpu", _("cpu"))]
        for combo, items in (
            (self.ui.axisComboBox, [("axial", _("axial")), ("coronal", _("coronal")), ("sagittal", _("sagittal"))]),
            (self.ui.deviceComboBox, devicesItems), (self.ui.weakDeviceComboBox, devicesItems),
        ) + self.weakSection.comboItems():
            combo.clear()
            for value, label in items:
                combo.addItem(label, value)
        self.populateMethodCombo()
        for combo in (self.ui.presetComboBox, self.ui.axisComboBox, self.ui.deviceComboBox,
                      self.ui.weakSourceComboBox, self.ui.weakDimsComboBox, self.ui.weakDeviceComboBox):
            combo.connect("currentIndexChanged(int)", self.onComboChanged)
        # The prompt boxes are synced by hand (see MedCLIPSAMModuleLib/panelstate.py: Slicer's QTextEdit
        # connector rewrites the text on every change and reverses what is typed).
        self.ui.promptsTextEdit.connect("textChanged()", self.onPromptsEdited)
        self.ui.weakPromptsTextEdit.connect("textChanged()", self.onPromptsEdited)

        self.ui.promptSuggestionsComboBox.clear()
        self.ui.promptSuggestionsComboBox.addItem(_("Add a suggested target..."))
        for name in prompts.promptSuggestions():
            self.ui.promptSuggestionsComboBox.addItem(name)
        self.ui.promptSuggestionsComboBox.enabled = self.ui.promptSuggestionsComboBox.count > 1
        self.ui.promptSuggestionsComboBox.connect("activated(int)", self.onSuggestionActivated)

        for button, slot in ((self.ui.applyButton, self.onApplyButton), (self.ui.cancelButton, self.onCancelButton),
                             (self.ui.deviceRefreshButton, self.refreshDeviceInfo),
                             (self.ui.openSegmentEditorButton, lambda: resultspanel.openSegmentEditor(self)),
                             (self.ui.exportLabelmapButton, lambda: resultspanel.exportLabelmap(self)),
                             (self.ui.exportFileButton, lambda: resultspanel.exportFile(self)),
                             (self.ui.setupCheckButton, self.onSetupCheck),
                             (self.ui.downloadModelsButton, self.onDownloadModels),
                             (self.ui.registerModelsButton, self.onRegisterModels),
                             (self.ui.registerTrainedModelButton, lambda: trainedpanel.registerFolder(self)),
                             (self.ui.removeTrainedModelButton, lambda: trainedpanel.removeSelected(self))):
            button.connect("clicked(bool)", slot)
        self.weakSection.connect()
        self.servicePanel = ServicePanel(self.logic.serviceBackend, self.ui.advancedCollapsibleButton.layout())
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()

        # One timer polls whatever runs (segmentation, weak supervision, model checks, GPU query).
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)
        self.logic.serviceBackend.wake = self._timer.start  # its forget thread moves only while we tick
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.refreshDeviceInfo()
        self.refineSection = refinepanel.RefineSection(self).build(self.layout)

    def cleanup(self):
        getattr(self, "refineSection", None) and self.refineSection.cleanup()
        # Slicer closes or the module reloads: stop every process tree (killed after a grace period).
        for job in (self.job, self.weakSection.job, self.setupFlow and self.setupFlow.job):
            if job is not None and job.isRunning:
                job.completedCallback = None
                job.cancel()
                if job.process is not None:
                    job.process.wait(timeout=10)
        if getattr(self, "_timer", None) is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.serviceBackend.stop()  # the local service, if one runs (a remote one is left alone)
        self._volumeWatcher.detach()
        self.evidenceSection.cleanup()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self._volumeWatcher.attach(slicer.mrmlScene)  # the 'loaded volumes' count, only while shown
        getattr(self, "refineSection", None) and self.refineSection.enter()  # its shortcuts, only while shown

    def exit(self):
        getattr(self, "refineSection", None) and self.refineSection.exit()
        self._volumeWatcher.detach()
        self.saveSettings()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.job is not None and self.job.isRunning:
            self.job.cancel()  # its result would land in a closed scene
        self.weakSection.onSceneStartClose()  # training goes on: it needs nothing from the scene
        self.evidenceSection.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        marker = "MedCLIPSAM.settingsLoaded"
        if not parameterNode.parameterNode.GetParameter(marker):
            self._settings.load(lambda key, default, kind: slicer.util.settingsValue(
                key, default, converter=slicer.util.toBool if kind is bool else kind), parameterNode)
            parameterNode.parameterNode.SetParameter(marker, "1")
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = panelstate.activeVolume(
                slicer.mrmlScene, slicer.app.applicationLogic().GetSelectionNode())
        self.setParameterNode(parameterNode)
        self.populateMethodCombo()  # the registry may have changed (another Slicer, the command line)

    def saveSettings(self):
        import qt

        if self._parameterNode:
            settings = qt.QSettings()
            self._settings.save(settings.setValue, self._parameterNode)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" in the .ui are connected here; the combo boxes and the
            # prompt boxes are kept in step by onComboChanged / onPromptsEdited / onParameterNodeModified.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        if not self._parameterNode:
            return
        self._updating = True
        try:
            node = self._parameterNode
            method = "trained:" + node.trainedModel if node.trainedModel else node.preset
            if self.ui.presetComboBox.findData(method) < 0:
                method = node.preset  # the trained model was removed from the registry
            for combo, value in ((self.ui.presetComboBox, method), (self.ui.axisComboBox, node.axis),
                                 (self.ui.deviceComboBox, node.device),
                                 (self.ui.weakSourceComboBox, node.weakImageSource),
                                 (self.ui.weakDimsComboBox, node.weakDims),
                                 (self.ui.weakDeviceComboBox, node.weakDevice)):
                index = combo.findData(value)
                if index >= 0 and combo.currentIndex != index:
                    combo.currentIndex = index
            panelstate.setPlainTextIfChanged(self.ui.promptsTextEdit, node.prompts)
            panelstate.setPlainTextIfChanged(self.ui.weakPromptsTextEdit, node.weakPrompts)
        finally:
            self._updating = False
        self.updateDeviceLabel()
        self.updateButtons()

    def onPromptsEdited(self):
        if not self._updating and self._parameterNode:
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.prompts = self.ui.promptsTextEdit.toPlainText()
                self._parameterNode.weakPrompts = self.ui.weakPromptsTextEdit.toPlainText()

    def onComboChanged(self, index=None):
        if self._updating or not self._parameterNode:
            return
        def data(combo):
            return combo.itemData(combo.currentIndex)

        node = self._parameterNode
        with slicer.util.NodeModify(node.parameterNode):
            method = data(self.ui.presetComboBox) or node.preset
            if method.startswith("trained:"):  # a registered model: the preset stays for later
                node.trainedModel = method[len("trained:"):]
            else:
                node.preset, node.trainedModel = method, ""
            node.axis = data(self.ui.axisComboBox)
            node.device = data(self.ui.deviceComboBox)
            node.weakImageSource = data(self.ui.weakSourceComboBox)
            node.weakDims = int(data(self.ui.weakDimsComboBox))
            node.weakDevice = data(self.ui.weakDeviceComboBox)

    def populateMethodCombo(self):
        trainedpanel.populateMethodCombo(self)

    # ---------------------------------------------------------------------------------- inputs
    def onSuggestionActivated(self, index):
        if index <= 0 or not self._parameterNode:
            return
        name = self.ui.promptSuggestionsComboBox.itemText(index)
        current = prompts.cleanPrompts(self._parameterNode.prompts)
        if name.lower() not in (p.lower() for p in current):
            self._parameterNode.prompts = "\n".join(current + [name])
        self.ui.promptSuggestionsComboBox.currentIndex = 0

    def refreshDeviceInfo(self):
        self._gpuQuery = devices.GpuQuery().start()  # nvidia-smi may take seconds: the timer collects it
        self._timer.start()

    def updateDeviceLabel(self):
        if not self._parameterNode:
            return
        text, warning = devices.describeDevice(self._parameterNode.device, self._gpus, devices.isAppleSilicon())
        self.ui.deviceInfoLabel.text = text
        self.ui.deviceInfoLabel.setStyleSheet("color: #c05000" if warning else "")

    def updateButtons(self, caller=None, event=None):
        running = self.job is not None and self.job.isRunning
        busy = running or (self.setupFlow is not None and self.setupFlow.isRunning)
        node = self._parameterNode
        problems = []
        if node and not node.inputVolume:
            problems.append(_("Select an input volume."))
        # a trained model segments its own targets when no prompt is given
        if node and not prompts.cleanPrompts(node.prompts) and not node.trainedModel:
            problems.append(_("Enter at least one prompt (one target per line)."))
        self.ui.applyButton.enabled = bool(node) and not problems and not busy
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Segment the prompts in the background")
        self.ui.cancelButton.visible = busy
        self.ui.cancelButton.enabled = busy
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        hasSegments = segmentation is not None and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        for button in (self.ui.openSegmentEditorButton, self.ui.exportLabelmapButton, self.ui.exportFileButton):
            button.enabled = hasSegments and not running
        self.ui.removeTrainedModelButton.enabled = bool(node and node.trainedModel)
        self.weakSection.updateWeakButtons()

    # ----------------------------------------------------------------------------------- run
    def onTimer(self):
        """Poll everything that runs; stop when nothing does."""
        running = self.logic.serviceBackend.busy
        for job in (self.job, self.weakSection.job, self.setupFlow.job):
            running = (job is not None and job.poll()) or running
        if self._gpuQuery is not None:
            if self._gpuQuery.result() is None:
                running = True
            else:
                self._gpus, self._gpuQuery = self._gpuQuery.result(), None
                self.updateDeviceLabel()
        if not running:
            self._timer.stop()

    def onApplyButton(self):
        with slicer.util.tryWithErrorDisplay(_("MedCLIP-SAM could not start."), waitCursor=True):
            node = self._parameterNode
            entry = self.logic.trainedModel(node.trainedModel) if node.trainedModel else None
            self.saveSettings()
            self.setupFlow.ensure(self.startSegmentation, node.models, training=bool(entry and entry["kind"] == "weak"),
                              zeroShotModels=not entry)

    def startSegmentation(self):
        with panelstate.errorShownOnce(_("MedCLIP-SAM could not start.")):  # inside Apply's: one dialog
            node = self._parameterNode
            self.showProgress(self.ui.progressBar, self.ui.statusLabel, _("Starting..."))
            try:
                self.job = self.logic.startSegmentation(
                    node.inputVolume, node.prompts, node.outputSegmentation, preset=node.preset, axis=node.axis,
                    device=node.device, models=node.models, computeUncertainty=node.computeUncertainty,
                    show3D=node.show3D, progressCallback=self.onProgress, logCallback=self.onLog,
                    completedCallback=self.onCompleted, trainedModel=node.trainedModel or None,
                    absentIf=node.absentIf)
            except Exception:
                self.ui.progressBar.hide()
                self.ui.statusLabel.text = ""
                raise
            self._timer.start()
            self.updateButtons()

    @staticmethod
    def showProgress(bar, label, text):
        label.text = text
        bar.value = 0
        bar.setFormat(text)
        bar.show()

    def onCancelButton(self):
        for job in (self.job, self.setupFlow):
            if job is not None and job.isRunning:
                job.cancel()
                self.ui.statusLabel.text = _("Cancelling...")
        self.ui.cancelButton.enabled = False

    def onProgress(self, progress):
        text = progress["message"] or progress["stage"]
        if progress["total"] > 1:
            text += f" ({progress['done']}/{progress['total']})"
        self.ui.statusLabel.text = text
        if progress["fraction"] is not None:
            self.ui.progressBar.value = int(round(100 * progress["fraction"]))
        self.ui.progressBar.setFormat(progress["stage"] + " %p%")

    def onLog(self, line):
        self.ui.statusLabel.toolTip = line  # the latest log line, without flooding the panel

    def onCompleted(self, result):
        import qt

        self.ui.progressBar.hide()
        if result.status == "succeeded":
            self._parameterNode.outputSegmentation = result.segmentationNode
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s. {message}").format(
                seconds=result.elapsedSeconds, message=result.message)
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=False)
            self.evidenceSection.showResult(result)  # the uncertainty shown, as before; saliency and chart on ask
        elif result.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=result.message)
            slicer.util.errorDisplay(_("Segmentation failed:\n{message}").format(message=result.message),
                                     windowTitle=_("MedCLIP-SAM"))
        qt.QTimer.singleShot(0, self.updateButtons)
        self.servicePanel.refresh()  # the service's state line (port, cache use, a restart)

    # ----------------------------------------------------------------------------------- setup
    # SetupFlow's view of the panel: dialogs, the setup status line and the progress bar.
    def confirm(self, text):
        return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("MedCLIP-SAM setup"))

    def inform(self, text):
        slicer.util.infoDisplay(text, windowTitle=_("MedCLIP-SAM setup"))

    def status(self, text):
        self.ui.setupStatusLabel.text = text

    def progress(self, percent, text):
        self.ui.statusLabel.text = text
        if percent is not None:
            self.ui.progressBar.value = percent

    def jobStarted(self, job):
        self.showProgress(self.ui.progressBar, self.ui.statusLabel, _("Models..."))
        self._timer.start()
        self.updateButtons()

    def jobEnded(self):
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = ""
        self.updateButtons()

    def onSetupCheck(self):
        with slicer.util.tryWithErrorDisplay(_("Setup check failed."), waitCursor=True):
            self.logic.verifiedModels.clear()
            self.setupFlow.ensure(lambda: self.status(_("Python packages and models are ready.")), self._parameterNode.models)

    def onDownloadModels(self):
        names = requiredModels(self._parameterNode.models)
        self.setupFlow.offerDownload([(name, _("download requested")) for name in names])

    def onRegisterModels(self):
        self.setupFlow.registerPlacedByHand(self._parameterNode.models)


class MedCLIPSAMTest(ScriptedLoadableModuleTest):
    """Self-test: the local segmentation service with random test models on a small phantom (offline).

    Random weights make the masks meaningless; the test checks the plumbing: segment names, the reference
    volume, the exported labelmap's grid, re-running into the same node, Cancel, click refinement, and
    training at the service then predicting with the trained model.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = dependencies.missingPackages()
        if missing:  # e.g. on an extension build machine: nothing to run the CLI with
            self.delayDisplay("MedCLIPSAM self-test skipped: missing Python packages " +
                              dependencies.describeMissing(missing))
            return
        self.setUp()
        self.test_SegmentPhantom()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_RefineLeavesNoNodes()
        if dependencies.missingPackages(dependencies.TRAINING_PACKAGES):
            self.delayDisplay("Weak-supervision self-test skipped: MONAI is not installed")
            return
        self.setUp()
        self.test_WeakSupervisionPhantom()

    def _run(self, logic, volume, targets, segmentation=None):
        result = logic.process(volume, targets, segmentation, models="tiny-random", preset="fast", device="cpu",
                               timeout=900)
        self.assertEqual(result.status, "succeeded", result.message)
        return result

    def test_SegmentPhantom(self):
        import numpy as np

        self.delayDisplay("Segmenting a phantom with random test models")
        logic = MedCLIPSAMLogic()
        volume, _phantom = logic.createPhantomVolume()
        segmentation = self._run(logic, volume, ["tumor"]).segmentationNode
        lib = mrml()
        self.assertEqual(lib.segment_names(segmentation), ["tumor"])
        self.assertEqual(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)
        labelmap = logic.exportToLabelmap(segmentation)
        self.assertEqual(labelmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(lib.ijk_to_ras_from_node(labelmap), lib.ijk_to_ras_from_node(volume), atol=1e-6)

        self.delayDisplay("Running again into the same segmentation")
        tumorId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("tumor")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        result = self._run(logic, volume, ["tumor", "brain"], segmentation)
        self.assertIs(result.segmentationNode, segmentation)
        self.assertEqual(lib.segment_names(segmentation), ["tumor", "brain"])
        self.assertEqual(segmentation.GetSegmentation().GetSegmentIdBySegmentName("tumor"), tumorId)
        self.assertEqual(sorted(result.saliencyVolumeNodes), ["brain", "tumor"])  # 'brain' brought its evidence
        self.assertEqual(set(result.summaries), {"brain", "tumor"})
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        self._run(logic, volume, ["tumor", "brain"], segmentation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)  # replaced, not piled up
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        import time

        logic = MedCLIPSAMLogic()
        volume, _phantom = logic.createPhantomVolume()
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        events = []
        job = logic.startSegmentation(volume, ["tumor"], models="tiny-random", preset="fast", device="cpu",
                                      progressCallback=events.append)
        while job.poll() and not events:
            time.sleep(0.05)
        job.cancel()
        result = job.wait(timeout=60)
        self.assertEqual(result.status, "cancelled", result.message)
        self.assertEqual(job.process.aliveMembers(), [])  # no process of the job is left
        self.assertFalse(os.path.exists(job.tempDir))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.delayDisplay("Cancel test passed")

    def test_RefineLeavesNoNodes(self):
        """Clicks through the service with random test models: 5 refines, 2 undos and a new segment from a
        box leave the scene's node count as it was (no colour table or labelmap per click)."""
        import numpy as np

        from MedCLIPSAMModuleLib.clickrefine import RefineLogic
        from MedCLIPSAMModuleLib.servicebackend import serviceCanRun

        if not serviceCanRun():
            self.delayDisplay("Refine self-test skipped: fastapi and uvicorn are not installed")
            return
        self.delayDisplay("Refining a segment with clicks")
        logic = MedCLIPSAMLogic()
        volume, _phantom = logic.createPhantomVolume()
        segmentation = self._run(logic, volume, ["tumor"]).segmentationNode
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("tumor")
        scene = slicer.mrmlScene
        ijkToRas = mrml().ijk_to_ras_from_node(volume)

        def ras(i, j, k):
            return list((ijkToRas @ np.array([i, j, k, 1.0]))[:3])

        positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
        negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
        box = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        a, b = np.array(ras(6, 6, 2)), np.array(ras(24, 30, 2))
        box.SetCenter(*((a + b) / 2))
        box.SetSize(*np.abs(b - a))
        refine = RefineLogic(scene, logic.serviceBackend.refineService("tiny-random", "cpu"),
                             logic.temporaryDirectory())
        nodeCount = scene.GetNumberOfNodes()
        for n, (i, j, k) in enumerate([(16, 20, 3), (18, 22, 3), (15, 19, 2), (4, 4, 4), (17, 18, 1)]):
            (negative if n == 3 else positive).AddControlPoint(*ras(i, j, k))
            refine.refine(segmentation, segmentId, volume, positive, negative, propagate=False,
                          latestPoint=ras(i, j, k))
        refine.undo(segmentation, segmentId, volume)
        refine.undo(segmentation, segmentId, volume)
        refine.newSegmentFromBox(segmentation, volume, box, propagate=False)
        self.assertEqual(scene.GetNumberOfNodes(), nodeCount)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        self.delayDisplay("Refine test passed")

    def test_WeakSupervisionPhantom(self):
        """Train at the local service on two phantoms (pseudo-labels of the random test models without SAM,
        a 4-filter network, 2 epochs), check the metrics chart and the service's listing, predict with the
        model through the service, then forget it again."""
        import shutil

        self.delayDisplay("Weak supervision at the service on two phantoms with random test models")
        logic = MedCLIPSAMLogic()
        volumes = [logic.createPhantomVolume(f"phantom {seed}", seed=seed)[0] for seed in (0, 1)]
        name = f"self-test {os.getpid()}"
        try:
            job = logic.startWeakSupervision(
                volumes, ["tumor"], name, epochs=2, dims=2, device="cpu", preset="fast", models="tiny-random",
                sam="none", snapshots=2, batchSize=4, baseFilters=4, samplesPerEpoch=8)
            result = job.wait(timeout=900)
            self.assertEqual(result.status, "succeeded", result.message)
            self.assertEqual(result.tableNode.GetNumberOfRows(), 2)
            self.assertEqual(result.chartNode.GetNumberOfPlotSeriesNodes(), 2)
            self.assertEqual(logic.trainedModel(name)["kind"], "weak")

            self.delayDisplay("Segmenting with the trained model through the service")
            seg = logic.process(volumes[0], [], trainedModel=name, device="cpu", models="tiny-random",
                                computeUncertainty=True, timeout=600)
            self.assertEqual(seg.status, "succeeded", seg.message)
            self.assertEqual(mrml().segment_names(seg.segmentationNode), ["tumor"])
            self.assertIsNotNone(seg.uncertaintyVolumeNode)
        finally:
            try:  # the local service trained into this user's registry: take the model out again
                folder = trained.call("get", name)["folder"]
                logic.removeTrainedModel(name)
                shutil.rmtree(folder, ignore_errors=True)
            except ValueError:
                pass  # training failed before registration
        self.delayDisplay("Weak-supervision test passed")
