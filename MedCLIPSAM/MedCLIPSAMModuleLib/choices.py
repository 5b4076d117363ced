"""The choices the panel offers and the service accepts (preset, axis, device, 2D/3D), checked before a
request is sent so that a typo is one sentence here rather than a 422 from the service."""

from .i18n import tr as _

PRESETS = ("v1", "v2", "fast")
AXES = ("axial", "coronal", "sagittal")
DEVICES = ("auto", "cuda", "mps", "cpu")
DIMS = (2, 3)


def check(preset="v2", axis="axial", device="auto"):
    if preset not in PRESETS or axis not in AXES or device not in DEVICES:
        raise ValueError(_("Unknown preset, axis or device: {values}").format(values=(preset, axis, device)))
