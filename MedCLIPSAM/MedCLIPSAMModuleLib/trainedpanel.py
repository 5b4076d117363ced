"""The panel's two trained-model buttons: register a model folder made on the command line (train-weak or
medclipseg train) so it appears in the method list, and remove one from that list (its folder is kept)."""

import slicer

from .i18n import tr as _


def registerFolder(panel):
    folder = panel.weakSection.browseFolder(_("Trained model folder"), "")
    if not folder:
        return
    with slicer.util.tryWithErrorDisplay(_("This folder cannot be used as a trained model."), waitCursor=True):
        entry = panel.logic.registerTrainedModel(folder)
        panel.populateMethodCombo()
        panel._parameterNode.trainedModel = entry["name"]
        panel.ui.setupStatusLabel.text = _("Registered '{name}' ({kind}).").format(name=entry["name"],
                                                                                kind=entry["kind"])


def removeSelected(panel):
    name = panel._parameterNode.trainedModel if panel._parameterNode else ""
    if not name or not slicer.util.confirmOkCancelDisplay(
            _("Remove '{name}' from the list of trained models? Its folder is kept.").format(name=name),
            windowTitle=_("MedCLIP-SAM")):
        return
    with slicer.util.tryWithErrorDisplay(_("Removing the trained model failed."), waitCursor=True):
        panel.logic.removeTrainedModel(name)
        panel._parameterNode.trainedModel = ""
        panel.populateMethodCombo()
