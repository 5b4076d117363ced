"""The "Refine" section of the MedCLIPSAM panel, built in code around a RefineLogic (refine.py).

Choose the segment; place positive (green) / negative (red) points or a box (ROI) in the slice view of the
segmentation's axis: each placement is applied at once (the markups nodes' PointPositionDefinedEvent, and
PointEndInteractionEvent when a box is resized); Undo; "Propagate" or "This slice only"; "New segment from
box" for an object with no words. Keyboard shortcuts (QShortcut on the main window, on only while the
module is shown) are in the tooltips; place mode is put back as found (PlaceMode, refine.py).
The segmentation stays a normal one: the Segment Editor keeps working on it.

Slicer facts used (v5.10.0): vtkMRMLMarkupsNode::PointPositionDefinedEvent / PointEndInteractionEvent
(Libs/MRML/Core/vtkMRMLMarkupsNode.h:240, 247); place mode as vtkSlicerMarkupsLogic::StartPlaceMode does it
(selection node SetReferenceActivePlaceNodeClassName + SetActivePlaceNodeID, interaction node
SetCurrentInteractionMode(Place) + SetPlaceModePersistence; vtkSlicerMarkupsLogic.cxx:1985-1999,
vtkMRMLSelectionNode.h:87,94, vtkMRMLInteractionNode.h:31,43,52); qMRMLSegmentSelectorWidget
(Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.h:65,71,149). qt is imported where the section is built.
"""

import slicer

from ..i18n import tr as _
from ..clickrefine import VIEW_NAMES, PlaceMode, RefineLogic, RefineRunner, sentence

POSITIVE_COLOR = (0.0, 0.85, 0.0)     # SegmentWithSAM / nnInteractive: green includes, red excludes
NEGATIVE_COLOR = (0.95, 0.1, 0.1)
BOX_COLOR = (1.0, 0.85, 0.0)
# Keys no part of Slicer v5.10.0 nor Qt's standard keys take: Ctrl+Shift+A is the Markups toolbar's
# (qMRMLMarkupsToolBar.cxx:84-86 also Ctrl+Shift+T / Space) and Qt's Deselect on X11, Ctrl+Shift+Z is Redo
# (the Segment Editor's, qMRMLSegmentEditorWidget.cxx:2350), Ctrl+Shift+Down/Left/Right the Sequences
# player's (qMRMLSequenceBrowserPlayWidget.cxx:41-43); Qt's table (qplatformtheme.cpp keyBindings) also
# has Ctrl+Shift+S/N/G/F; Ctrl+Shift+U is Unicode input in IBus / GTK. Made on the main window, as the
# Segment Editor does (qMRMLSegmentEditorWidget.cxx:2299-2307), and enabled only while the module is
# shown (enter / exit, as SegmentEditor.py:118,136 installs and removes its own).
SHORTCUTS = {"positive": "Ctrl+Shift+P", "negative": "Ctrl+Shift+M", "box": "Ctrl+Shift+B", "undo": "Ctrl+Shift+R"}


class RefineSection:
    """panel: the MedCLIPSAMWidget (its ui, parameter node and logic). Requests go to `service` when given
    (LocalService / RemoteService of service.py), else to the service the Logic's serviceBackend uses for
    Apply with the panel's settings (uploads and encodings shared)."""

    def __init__(self, panel, service=None):
        self.panel = panel
        self.service = service
        self.logic = None
        self.nodes = {}
        self._observations = []
        self._shortcuts = []
        self.placeMode = None       # PlaceMode on Slicer's interaction and selection nodes, made on first use
        self.runner = None
        self._pending = None        # the latest placement made while a request ran: sent after it
        self._done = None
        self._chosenService = None

    # -- building --------------------------------------------------------------------------------------
    def build(self, layout):
        """Add the section to `layout`; returns self."""
        import ctk
        import qt

        box = ctk.ctkCollapsibleButton()
        box.text = _("Refine")
        box.collapsed = True
        form = qt.QFormLayout(box)
        self.segmentSelector = slicer.qMRMLSegmentSelectorWidget()
        self.segmentSelector.setMRMLScene(slicer.mrmlScene)
        self.segmentSelector.setToolTip(_("The segment to correct (any segment: from a prompt, a box or the "
                                          "Segment Editor)."))
        form.addRow(_("Segment:"), self.segmentSelector)
        # follows the panel's output segmentation (the one Apply fills)
        self.panel.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                         self.segmentSelector.setCurrentNode)

        row = qt.QHBoxLayout()
        self.buttons = {}
        for kind, text, tip, color in (
                ("positive", _("+ Point"), _("Place points inside the object (green); each is applied at once."),
                 POSITIVE_COLOR),
                ("negative", _("- Point"), _("Place points outside the object (red); each is applied at once."),
                 NEGATIVE_COLOR),
                ("box", _("Box"), _("Draw a box (ROI) around the object on one slice; applied at once."), BOX_COLOR)):
            button = qt.QPushButton(text)
            button.checkable = True
            button.setToolTip(f"{tip} ({SHORTCUTS[kind]})")
            button.setStyleSheet("QPushButton { color: rgb(%d, %d, %d); font-weight: bold; }"
                                 % tuple(int(255 * c) for c in color))
            button.connect("toggled(bool)", lambda on, kind=kind: self.onPlaceToggled(kind, on))
            row.addWidget(button)
            self.buttons[kind] = button
        form.addRow(_("Place:"), row)

        options = qt.QHBoxLayout()
        self.propagateRadio = qt.QRadioButton(_("Propagate"))
        self.propagateRadio.setToolTip(_("Carry the correction to the neighbouring slices until the object ends "
                                         "or a slice you corrected."))
        self.sliceOnlyRadio = qt.QRadioButton(_("This slice only"))
        self.propagateRadio.checked = True
        options.addWidget(self.propagateRadio)
        options.addWidget(self.sliceOnlyRadio)
        form.addRow(_("Apply to:"), options)

        actions = qt.QHBoxLayout()
        self.undoButton = qt.QPushButton(_("Undo"))
        self.undoButton.setToolTip(_("Undo the last correction of this segment ({key}).").format(key=SHORTCUTS["undo"]))
        self.undoButton.connect("clicked(bool)", lambda _checked=False: self.onUndo())
        self.newFromBoxButton = qt.QPushButton(_("New segment from box"))
        self.newFromBoxButton.setToolTip(_("Make a new segment from the box alone, without a text prompt."))
        self.newFromBoxButton.connect("clicked(bool)", lambda _checked=False: self.onNewSegmentFromBox())
        actions.addWidget(self.undoButton)
        actions.addWidget(self.newFromBoxButton)
        form.addRow(actions)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        layout.addWidget(box)
        self.section = box
        self.timer = qt.QTimer()
        self.timer.setInterval(50)
        self.timer.connect("timeout()", self._poll)

        self.makeShortcuts(qt, slicer.util.mainWindow())
        return self

    def makeShortcuts(self, qt, window):
        """The section's shortcuts on `window`, off until enter()."""
        for kind, slot in (("positive", lambda: self.toggle("positive")), ("negative", lambda: self.toggle("negative")),
                           ("box", lambda: self.toggle("box")), ("undo", self.onUndo)):
            shortcut = qt.QShortcut(qt.QKeySequence(SHORTCUTS[kind]), window)
            shortcut.setEnabled(False)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def enter(self):
        """The module is shown: its shortcuts work."""
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self):
        """The module is left: its shortcuts stop, and its place mode ends (persistence put back)."""
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        if self.placeMode is not None:
            self.placeMode.stop()

    def toggle(self, kind):
        self.buttons[kind].checked = not self.buttons[kind].checked

    # -- nodes -----------------------------------------------------------------------------------------
    def _node(self, kind):
        node = self.nodes.get(kind)
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            return node
        className = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
        name = {"positive": _("MedCLIP-SAM positive"), "negative": _("MedCLIP-SAM negative"),
                "box": _("MedCLIP-SAM box")}[kind]
        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        node.CreateDefaultDisplayNodes()
        color = {"positive": POSITIVE_COLOR, "negative": NEGATIVE_COLOR, "box": BOX_COLOR}[kind]
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        if kind != "box":
            display.SetPointLabelsVisibility(False)
        events = [slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent]
        if kind == "box":
            events.append(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
        for event in events:
            tag = node.AddObserver(event, lambda caller, event, kind=kind: self.onPlaced(kind))
            self._observations.append((node, tag))
        self.nodes[kind] = node
        return node

    def onPlaceToggled(self, kind, on):
        if self.placeMode is None:
            logic = slicer.app.applicationLogic()
            self.placeMode = PlaceMode(logic.GetInteractionNode(), logic.GetSelectionNode())
        if not on:
            self.placeMode.stop()
            return
        node = self._node(kind)
        if kind == "box" and node.GetNumberOfControlPoints():
            node.RemoveAllControlPoints()      # a new box replaces the previous one
        # points stay in place mode; a box is one placement, after which Slicer leaves place mode
        self.placeMode.start(node, persistent=kind != "box", onEnded=lambda kind=kind: self._uncheck(kind))

    def _uncheck(self, kind):
        """Place mode ended (placement done, Escape, another tool): the button shows it, without a signal."""
        button = self.buttons[kind]
        button.blockSignals(True)
        button.checked = False
        button.blockSignals(False)

    # -- requests --------------------------------------------------------------------------------------
    def _service(self):
        """GUI thread: the service to use: the one given (scripts, tests), else the one Apply's backend uses
        with the panel's mode, models and device (uploads and encodings shared); ValueError (one sentence)
        when the settings give none (no local service is started behind the settings' back)."""
        if self.service is not None:
            return self.service
        node = self.panel._parameterNode
        return self.panel.logic.serviceBackend.refineService(node.models if node else "",
                                                             node.device if node else "auto")

    def ensure(self):
        """The client (RefineLogic calls this on the worker thread): of the service _run chose; the worker
        also stops a local service the settings replaced and drops removed volumes' uploads."""
        backend = getattr(self.panel.logic, "serviceBackend", None) if self.service is None else None
        if backend is not None:
            backend.stopRetired()
        client = self._chosenService.ensure()
        if backend is not None:
            backend.forgetPending()
        return client

    def _knownVolume(self, nodeId, stamp, client):
        """The id under which Apply's service backend uploaded this node, while still valid (None else).
        Called on the refine worker thread: sentVolume only reads the backend's table under its lock."""
        backend = getattr(self.panel.logic, "serviceBackend", None)
        if backend is None or not hasattr(backend, "sentVolume"):
            return None
        return backend.sentVolume(nodeId, stamp, client)

    def _logic(self):
        if self.logic is None:
            self.logic = RefineLogic(slicer.mrmlScene, self, knownVolume=self._knownVolume)
            self.runner = RefineRunner(self.logic)
        return self.logic

    def _context(self):
        node = self.panel._parameterNode
        volume = node.inputVolume if node else None
        axis = node.axis if node else "axial"
        sliceNode = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{VIEW_NAMES[axis]}")
        normal = None
        if sliceNode is not None:
            m = sliceNode.GetSliceToRAS()
            normal = [m.GetElement(r, 2) for r in range(3)]
        return volume, axis, normal

    @property
    def busy(self):
        return self.runner is not None and self.runner.busy

    def _run(self, prepare, done):
        """prepare() reads the scene now (GUI thread) and returns a RefineRequest; the service call runs on
        the runner's thread; _poll writes the result and shows done(changed). A placement made meanwhile
        waits and is sent next (it reads the scene then, so every point placed meanwhile is in it)."""
        self._logic()
        if self.busy:
            self._pending = (prepare, done)
            return
        try:
            self._chosenService = self._service()
            request = prepare()
        except Exception as exc:
            self.statusLabel.text = sentence(exc)
            return
        self._done = done
        self.statusLabel.text = _("Correcting...")
        self.runner.start(request)
        self.timer.start()

    def _poll(self):
        request = self.runner.poll() if self.runner is not None else None
        if request is None:
            return
        logic = self._logic()
        try:
            if request.error is None and request.needsUpload:    # the service forgot the volume
                self.runner.start(logic.withVolume(request))
                return
            self.statusLabel.text = self._done(logic.finish(request))
        except Exception as exc:     # the service's own sentence, or an unexpected failure
            logic.abandon(request)
            self.statusLabel.text = sentence(exc)
        self.timer.stop()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._run(*pending)

    @staticmethod
    def _changedText(changed):
        if not changed:
            return _("Nothing changed.")
        return _("{count} slice(s) changed: {first}-{last}.").format(count=len(changed), first=min(changed),
                                                                   last=max(changed))

    def onPlaced(self, kind):
        node = self.nodes.get(kind)
        if kind == "box":
            bounds = [0.0] * 6
            node.GetRASBounds(bounds)
            if sorted(bounds[2 * a + 1] - bounds[2 * a] for a in range(3))[1] <= 0:
                return                      # the box's first corner: wait for its extent
        segmentation = self.segmentSelector.currentNode()
        segmentId = self.segmentSelector.currentSegmentID()
        volume, axis, normal = self._context()
        latest = None
        if kind != "box" and node is not None and node.GetNumberOfControlPoints():
            latest = RefineLogic.controlPoints(node)[-1:] or None
            latest = latest[0] if latest else None
        self._run(lambda: self._logic().prepareRefine(
            segmentation, segmentId, volume, self.nodes.get("positive"), self.nodes.get("negative"),
            self.nodes.get("box") if kind == "box" else None, propagate=self.propagateRadio.checked, axis=axis,
            planeNormal=normal, latestPoint=latest), self._changedText)

    def onUndo(self):
        segmentation = self.segmentSelector.currentNode()
        volume, _axis, _normal = self._context()
        self._run(lambda: self._logic().prepareUndo(segmentation, self.segmentSelector.currentSegmentID(), volume),
                  lambda changed: _("Undone: ") + self._changedText(changed))

    def onNewSegmentFromBox(self):
        segmentation = self.segmentSelector.currentNode() or self.panel.ui.outputSegmentationSelector.currentNode()
        volume, axis, normal = self._context()
        made = {}

        def prepare():
            made["request"] = self._logic().prepareNewSegmentFromBox(
                segmentation, volume, self.nodes.get("box"), propagate=self.propagateRadio.checked, axis=axis,
                planeNormal=normal)
            return made["request"]

        def done(changed):
            self.segmentSelector.setCurrentNode(segmentation)
            self.segmentSelector.setCurrentSegmentID(made["request"].segmentId)
            return _("New segment: ") + self._changedText(changed)

        self._run(prepare, done)

    def cleanup(self):
        if getattr(self, "timer", None) is not None:
            self.timer.stop()
        if self.runner is not None:
            self.runner.wait(timeout=5)      # a daemon thread: it cannot keep Slicer from exiting
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        if self.placeMode is not None:
            self.placeMode.stop()
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
