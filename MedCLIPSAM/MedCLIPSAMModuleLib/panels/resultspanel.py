"""The panel's Results buttons: open the output in the Segment Editor, export it to a labelmap volume, or to
a file through Slicer's own export dialog."""

import slicer

from ..i18n import tr as _


def openSegmentEditor(panel):
    segmentation = panel.ui.outputSegmentationSelector.currentNode()
    volume = panel._parameterNode.inputVolume if panel._parameterNode else None
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(segmentation)
    if volume is not None:
        editor.setSourceVolumeNode(volume)


def exportLabelmap(panel):
    with slicer.util.tryWithErrorDisplay(_("Export to a labelmap failed."), waitCursor=True):
        segmentation = panel.ui.outputSegmentationSelector.currentNode()
        reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        labelmap = panel.logic.exportToLabelmap(segmentation, reference or panel._parameterNode.inputVolume)
        panel.ui.statusLabel.text = _("Exported to labelmap volume '{name}'.").format(name=labelmap.GetName())
        return labelmap


def exportFile(panel):
    labelmap = exportLabelmap(panel)
    if labelmap is None:
        return
    # Slicer's own export dialog (file name, format, compression), as in the Data module's context menu
    saved = slicer.app.ioManager().openDialog("GenericNodeExport", slicer.qSlicerFileDialog.Write,
                                              {"selectedNodeID": labelmap.GetID()})
    if not saved:
        panel.ui.statusLabel.text = _("Labelmap '{name}' was not saved to a file.").format(name=labelmap.GetName())
