"""Trained models in the panel: the method list (the zero-shot presets, then the models of the service in
use), and the two buttons that register a model folder made on the command line (train-weak or
medclipseg train) in this user's registry, which a local service uses, or remove one (the folder is kept)."""

import logging

import slicer

from .. import trained
from ..i18n import tr as _


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


def populateMethodCombo(panel):
    """The zero-shot presets, then one entry per usable registered trained model (data 'trained:NAME')."""
    combo = panel.ui.presetComboBox
    wasUpdating, panel._updating = panel._updating, True
    try:
        combo.clear()
        for value, label in (("v1", _("v1: gScoreCAM + CRF + SAM (MedCLIP-SAM)")),
                             ("v2", _("v2: M2IB + KMeans + SAM (MedCLIP-SAMv2)")),
                             ("fast", _("fast: GradCAM + SAM (quick look)"))):
            combo.addItem(label, value)
        try:
            models = panel.logic.trainedModels()
        except Exception as exc:  # an unreadable registry must not break the panel
            logging.warning(f"MedCLIP-SAM: trained models not listed: {exc}")
            models = []
        for entry in models:
            combo.addItem(trained.label(entry), "trained:" + entry["name"])
            combo.setItemData(combo.count - 1, ", ".join(entry["labels"]), 3)  # 3 = Qt.ToolTipRole
    finally:
        panel._updating = wasUpdating
    node = panel._parameterNode
    if node and node.trainedModel and combo.findData("trained:" + node.trainedModel) < 0:
        node.trainedModel = ""  # removed, or its folder is gone: back to the preset
    elif node:
        panel.onParameterNodeModified()
