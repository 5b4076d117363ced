"""The registry of trained models (MedCLIPSAMLib.trained_models) as the panel uses it: one-sentence
errors become ValueError, and each entry gets its label for the method combo box."""

from .i18n import tr as _
from .paths import useShippedLibrary


def registry():
    useShippedLibrary()
    from MedCLIPSAMLib import trained_models

    return trained_models


def call(action, *args):
    """MedCLIPSAMLib.trained_models.<action>(*args); its MedCLIPSAMError becomes ValueError."""
    module = registry()
    from MedCLIPSAMLib.errors import MedCLIPSAMError

    try:
        return getattr(module, action)(*args)
    except MedCLIPSAMError as exc:
        raise ValueError(str(exc)) from None


def usable(name):
    """The registry entry of a usable trained model; ValueError (one sentence) otherwise."""
    entry = call("get", name)
    if not entry["present"]:
        raise ValueError(_("The trained model '{name}' is no longer complete in '{folder}'.").format(
            name=name, folder=entry["folder"]))
    return entry


def label(entry):
    """The method-combo text of a trained model."""
    if entry["kind"] == "medclipseg":
        return _("MedCLIPSeg (trained): {name}").format(name=entry["name"])
    return _("Trained: {name} (weak supervision)").format(name=entry["name"])
