"""Bookkeeping the panel does without Qt: which volumes it offers, the text boxes it keeps in step with
the parameter node, the settings it remembers, and the scene events it listens to (only while shown).

Slicer facts these rest on (v5.10.0):
- Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: QTextEditPlainTextToStrConnector.write calls
  setPlainText on every parameter change (the cursor goes to 0, typed text comes out reversed), so the
  prompt boxes are not bound through the wrapper; qMRMLNodeComboBoxToNodeConnector sets the combo's
  nodeTypes to the annotated classes (util.getNodeTypes: a Union gives several); the int connector sets
  the range to +-2**31 unless the annotation has WithinRange.
- Libs/MRML/Widgets/qMRMLSortFilterProxyModel.cxx: with showChildNodeTypes false a node is listed only
  when its class name equals one of nodeTypes. vtkMRMLVectorVolumeNode and vtkMRMLLabelMapVolumeNode
  both derive from vtkMRMLScalarVolumeNode, so the input combo lists these two exact classes.
"""

import contextlib

import vtk

INPUT_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")


def isInputVolume(node):
    """Grey or colour volume; not a labelmap (nor a DTI, or any other subclass)."""
    return node is not None and node.GetClassName() in INPUT_VOLUME_CLASSES


def inputVolumes(scene):
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if isInputVolume(node) and node.GetImageData() is not None:
            nodes.append(node)
    return nodes


def activeVolume(scene, selectionNode=None):
    """The background volume of the views if it can be segmented, else the first volume that can."""
    node = scene.GetNodeByID(selectionNode.GetActiveVolumeID()) if selectionNode is not None else None
    if isInputVolume(node):
        return node
    volumes = inputVolumes(scene)
    return volumes[0] if volumes else None


def setPlainTextIfChanged(textEdit, text):
    """Write a QTextEdit only when its text differs: writing moves the cursor to the start."""
    if textEdit.toPlainText() != text:
        textEdit.setPlainText(text)
        return True
    return False


class RememberedSettings:
    """Panel values kept between sessions. save() writes only the keys whose value changed since the
    last load or save, and the panel calls it when a run starts and when the module is left - not on
    every parameter change (a keystroke in a prompt box changes the parameter node)."""

    def __init__(self, types, group):
        self.types = dict(types)
        self.group = group
        self._saved = {}

    def load(self, read, parameters):
        """read(key, default, type) -> value (slicer.util.settingsValue); sets the values on `parameters`."""
        for name, kind in self.types.items():
            value = read(f"{self.group}/{name}", getattr(parameters, name), kind)
            try:
                setattr(parameters, name, value)
            except (ValueError, TypeError):  # a remembered value that is no longer a valid choice
                continue
            self._saved[name] = getattr(parameters, name)

    def save(self, write, parameters):
        """write(key, value) (qt.QSettings().setValue); returns the names written."""
        written = []
        for name in self.types:
            value = getattr(parameters, name)
            if self._saved.get(name, object()) != value:
                write(f"{self.group}/{name}", value)
                self._saved[name] = value
                written.append(name)
        return written


class SceneVolumeWatcher:
    """Calls `callback()` when a volume the panel could use is added to or removed from the scene.
    attach() when the module is shown, detach() when it is left: a hidden panel does no work."""

    def __init__(self, callback):
        self.callback = callback
        self.scene = None
        self._tags = []

    @property
    def attached(self):
        return self.scene is not None

    def attach(self, scene):
        if self.scene is scene:
            return
        self.detach()
        self.scene = scene
        self._tags = [scene.AddObserver(event, self._onNodeEvent)
                      for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent)]

    def detach(self):
        if self.scene is not None:
            for tag in self._tags:
                self.scene.RemoveObserver(tag)
        self.scene, self._tags = None, []

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeEvent(self, caller, event, node):
        if isInputVolume(node):
            self.callback()


@contextlib.contextmanager
def errorShownOnce(message, waitCursor=True):
    """slicer.util.tryWithErrorDisplay that stops the error once shown. Slicer's shows its dialog and
    re-raises (Base/Python/slicer/util.py:3395-3409, v5.10.0), so a start-up step run inside another one
    (Apply -> setup -> startSegmentation) showed two dialogs for one error."""
    import slicer

    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
            yield
    except Exception:
        pass        # shown, with its traceback in the dialog's details
