"""What the panel's Evidence area does with the scene, without Qt (runs in slicer-core): the last run's
saliency / uncertainty overlays for the chosen prompt, its per-slice chart, jumping to a chosen plot
point, and removing a segmentation's evidence when the segmentation is removed. The widgets are in
evidencepanel.py."""

import vtk

from .paths import useShippedLibrary


def _lib():
    useShippedLibrary()
    from MedCLIPSAMLib import evidence_mrml

    return evidence_mrml


KINDS = ("saliency", "uncertainty")


class EvidenceView:
    """The evidence of one SegmentationResult: setResult() after each run, clear() on scene close."""

    OPACITY = 0.4  # as the uncertainty overlay was shown before

    def __init__(self, scene):
        self.scene = scene
        self.result = None
        self.prompt = None

    # ------------------------------------------------------------------------------ state
    def setResult(self, result):
        """A finished run (None: nothing). Overlays of the previous result are taken off the views."""
        for kind in KINDS:
            self.setOverlay(kind, False)
        self.result = result if result is not None and result.succeeded else None
        prompts = self.prompts()
        self.prompt = self.prompt if self.prompt in prompts else (prompts[0] if prompts else None)

    def clear(self):
        self.result, self.prompt = None, None

    def prompts(self):
        """The prompts of the last run that have evidence (report or saliency), in the run's order."""
        if self.result is None:
            return []
        names = list(self.result.summaries) + [p for p in self.result.saliencyVolumeNodes
                                               if p not in self.result.summaries]
        return names

    def setPrompt(self, prompt):
        """Choose the prompt whose evidence is shown; a saliency overlay shown follows it."""
        shown = self.overlayShown("saliency")
        if shown:
            self.setOverlay("saliency", False)
        self.prompt = prompt if prompt in self.prompts() else self.prompt
        if shown:
            self.setOverlay("saliency", True)

    def summaryLines(self):
        """One line per prompt: 'prompt: found on slices 40-72, 33 of 112; 12.4 ml' or '...: not found: ...'."""
        if self.result is None:
            return []
        return [f"{prompt}: {line}" for prompt, line in self.result.summaries.items()]

    def _node(self, node):
        return node if node is not None and self.scene.IsNodePresent(node) else None

    def overlayNode(self, kind):
        """The volume behind an overlay: the chosen prompt's saliency, or the run's uncertainty."""
        if self.result is None:
            return None
        if kind == "uncertainty":
            return self._node(self.result.uncertaintyVolumeNode)
        return self._node(self.result.saliencyVolumeNodes.get(self.prompt))

    def entry(self):
        """The chosen prompt's report entry, or None."""
        report = self.result.report if self.result is not None else None
        return next((e for e in (report or {}).get("prompts", []) if e["prompt"] == self.prompt), None)

    # ------------------------------------------------------------------------------ overlays
    def setOverlay(self, kind, on):
        """Show (in the foreground of every slice view) or hide a heat map; the foreground holds one, so
        showing one kind takes the other off. Returns whether it is shown now."""
        lib = _lib()
        node = self.overlayNode(kind)
        if node is None:
            return False
        if on:
            lib.show_overlay(self.scene, node, self.OPACITY)
        else:
            lib.hide_overlay(self.scene, node)
        return self.overlayShown(kind)

    def overlayShown(self, kind):
        node = self.overlayNode(kind)
        if node is None:
            return False
        composites = [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                      for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
        return any(c.GetForegroundVolumeID() == node.GetID() for c in composites)

    # ------------------------------------------------------------------------------ chart
    def chartNode(self):
        """The chosen prompt's chart (made, or updated, from the report); None without a report."""
        entry = self.entry()
        segmentation = self._node(self.result.segmentationNode) if self.result is not None else None
        if entry is None or segmentation is None:
            return None
        return _lib().update_evidence_chart(self.scene, segmentation, entry)

    def jumpToPlotPoint(self, seriesNodeId, pointIndex):
        """Move the slice views to the slice of a chosen plot point; returns the slice, or None when the
        point is not one of our series."""
        lib = _lib()
        series = self.scene.GetNodeByID(seriesNodeId) if seriesNodeId else None
        entry = self.entry()
        if series is None or entry is None or series.GetAttribute(lib.KIND_ATTRIBUTE) is None:
            return None
        prompt = series.GetAttribute(lib.PROMPT_ATTRIBUTE)
        entry = next((e for e in self.result.report["prompts"] if e["prompt"] == prompt), entry)
        k = lib.slice_of_plot_point(self.scene, seriesNodeId, pointIndex)
        volume = self.result.saliencyVolumeNodes.get(prompt) or self.overlayNode("uncertainty")
        if k is None or self._node(volume) is None:
            return None
        lib.jump_to_slice(self.scene, volume, entry.get("axis", "axial"), k)
        return k

    def jumpToSelection(self, seriesNodeIds, pointIndexLists):
        """qMRMLPlotView's dataSelected, as lists: the first selected point of the first of our series."""
        for seriesId, points in zip(seriesNodeIds, pointIndexLists):
            if points:
                k = self.jumpToPlotPoint(seriesId, points[0])
                if k is not None:
                    return k
        return None


class EvidenceCleaner:
    """Removes a segmentation node's evidence nodes when the segmentation node is removed (not on scene
    close, which removes them itself). The scene's NodeAboutToBeRemovedEvent still has the node's
    references; the evidence goes on NodeRemovedEvent, once the scene has finished with the node."""

    def __init__(self, removedCallback=None):
        self.scene = None
        self.removedCallback = removedCallback  # called with the segmentation node's ID after its evidence went
        self._tags = []
        self._pending = {}

    def attach(self, scene):
        self.detach()
        self.scene = scene
        self._tags = [scene.AddObserver(scene.NodeAboutToBeRemovedEvent, self._onAboutToRemove),
                      scene.AddObserver(scene.NodeRemovedEvent, self._onRemoved)]

    def detach(self):
        if self.scene is not None:
            for tag in self._tags:
                self.scene.RemoveObserver(tag)
        self.scene, self._tags, self._pending = None, [], {}

    def _evidenceIds(self, node):
        lib = _lib()
        if node is None or not node.IsA("vtkMRMLSegmentationNode"):
            return []
        return [n.GetID() for n in lib.evidence_nodes(node)]

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onAboutToRemove(self, caller, event, node=None):
        ids = self._evidenceIds(node)
        if ids:
            self._pending[node.GetID()] = ids

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onRemoved(self, caller, event, node=None):
        if node is None:
            return
        ids = self._pending.pop(node.GetID(), [])
        if not ids or self.scene.IsClosing():
            return
        _lib().remove_evidence_nodes(self.scene, [self.scene.GetNodeByID(i) for i in ids])
        if self.removedCallback:
            self.removedCallback(node.GetID())
