"""This user's registry of trained models (MedCLIPSAMLib.trained_models: the one a local service uses) as
the panel uses it: one-sentence errors become ValueError; each entry gets its label for the method combo."""

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


def label(entry):
    """The method-combo text of a trained model."""
    if entry["kind"] == "medclipseg":
        return _("MedCLIPSeg (trained): {name}").format(name=entry["name"])
    return _("Trained: {name} (weak supervision)").format(name=entry["name"])
