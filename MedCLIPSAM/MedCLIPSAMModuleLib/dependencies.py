"""The Python packages the CLI needs in Slicer's Python: which are missing or too old, and installing them
(PyTorch through the PyTorch extension's PyTorchUtils, the rest with pip). Nothing here needs a compiler:
the CRF's compiled backend (pydensecrf2, source only) is an optional extra, and sam2 is pure Python when
built with SAM2_BUILD_CUDA=0.
"""

import importlib.metadata
import os
import re

from .i18n import tr as _

# (import name, distribution, minimum version or None). Keep in step with pyproject.toml (a test checks it).
TORCH = ("torch", "torch", "2.5")
TORCHVISION = ("torchvision", "torchvision", "0.20")
PYTHON_PACKAGES = [
    TORCH,
    TORCHVISION,
    ("open_clip", "open_clip_torch", "3.0"),
    ("transformers", "transformers", "4.40"),
    ("huggingface_hub", "huggingface_hub", "0.23"),
    ("safetensors", "safetensors", "0.4"),
    ("numpy", "numpy", "1.24"),
    ("scipy", "scipy", "1.10"),
    ("skimage", "scikit-image", "0.22"),
    ("sklearn", "scikit-learn", "1.3"),
    ("SimpleITK", "SimpleITK", "2.3"),
    ("vtk", "vtk", "9.2"),
    ("PIL", "pillow", "10"),
    ("tqdm", "tqdm", "4.66"),
    ("matplotlib", "matplotlib", "3.7"),
    ("slicerio", "slicerio", "1.1"),  # writes the .seg.nrrd
    ("nrrd", "pynrrd", "1.0"),
    ("fastapi", "fastapi", "0.110"),  # the segmentation service the panel keeps warm (pure Python)
    ("uvicorn", "uvicorn", "0.29"),
    ("sam2", "sam2", "1.1.0"),  # PyPI's sam2 is a repackaging of Meta's code: pinned exactly (SAM2_PIN)
]
SAM2_PIN = "sam2==1.1.0"
TRAINING_PACKAGES = [("monai", "monai", "1.3")]  # train-weak's network (pyproject's "train" extra)
TORCH_PACKAGES = {TORCH[0], TORCHVISION[0]}


def versionTuple(text):
    """(2, 5, 1) from '2.5.1+cu121' / '2.5.1rc1' / '2.5': the leading numbers only."""
    numbers = []
    for part in str(text).split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


def isNewEnough(installed, minimum):
    if minimum is None:
        return True
    a, b = versionTuple(installed), versionTuple(minimum)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def installedVersion(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement(package):
    """The pip requirement of a (module, distribution, minimum) entry."""
    _module, distribution, minimum = package
    if distribution == "sam2":
        return SAM2_PIN
    return distribution + (f">={minimum}" if minimum else "")


def missingPackages(packages=None, version=installedVersion):
    """[(module, distribution, minimum, installed or None)] of the packages absent or older than needed."""
    missing = []
    for module, distribution, minimum in PYTHON_PACKAGES if packages is None else packages:
        installed = version(distribution)
        if installed is None or not isNewEnough(installed, minimum):
            missing.append((module, distribution, minimum, installed))
    return missing


def describeMissing(missing):
    """'torch (2.1.0 installed, 2.5 or later needed), monai' for a message."""
    parts = []
    for module, _distribution, minimum, installed in missing:
        if installed is None:
            parts.append(module)
        else:
            parts.append(_("{name} ({installed} installed, {minimum} or later needed)").format(
                name=module, installed=installed, minimum=minimum))
    return ", ".join(parts)


def installPackages(missing, pipInstall, torchUtilsLogic=None, askTorchConfirmation=True,
                    version=installedVersion):
    """Install what `missing` lists; RuntimeError naming exactly what is still missing afterwards.

    pipInstall: slicer.util.pip_install. torchUtilsLogic: PyTorchUtils.PyTorchUtilsLogic() (needed when
    torch or torchvision is missing or too old): installTorch(askConfirmation, forceComputationBackend,
    torchVersionRequirement, torchvisionVersionRequirement) installs both with light-the-torch (the CUDA
    build that matches the driver) and returns None when the user declines.
    """
    names = {m[0] for m in missing}
    if names & TORCH_PACKAGES:
        if torchUtilsLogic is None:
            raise RuntimeError(_("MedCLIP-SAM needs PyTorch: install the 'PyTorch' extension from the "
                                 "Extensions Manager, restart Slicer, and try again."))
        if torchUtilsLogic.installTorch(askTorchConfirmation, None, f">={TORCH[2]}", f">={TORCHVISION[2]}") is None:
            raise RuntimeError(_("PyTorch was not installed; MedCLIPSAM cannot run without it."))
    plain = [requirement(m[:3]) for m in missing if m[0] not in TORCH_PACKAGES and m[0] != "sam2"]
    if plain:
        pipInstall(plain)
    if "sam2" in names:
        # sam2's setup imports torch: build it against the installed torch, without its optional CUDA
        # extension (that needs a compiler and is not needed for inference).
        os.environ["SAM2_BUILD_CUDA"] = "0"
        pipInstall(["--no-build-isolation", SAM2_PIN])
    still = missingPackages([m[:3] for m in missing], version)
    if still:
        raise RuntimeError(_("These Python packages are still missing or too old: {names}").format(
            names=describeMissing(still)))


def unsupportedSlicerMessage(slicerVersion, pythonVersion):
    """One sentence for a Slicer this extension cannot run in (None when it can): sam2 and MedCLIPSAMLib
    need Python 3.10+, and Slicer ships Python 3.12 from 5.10 on (5.6 and 5.8 ship 3.9)."""
    if tuple(slicerVersion) >= (5, 10) and tuple(pythonVersion) >= (3, 10):
        return None
    return _("MedCLIP-SAM needs 3D Slicer 5.10 or later (Python 3.10 or later); this is Slicer {slicer} with "
             "Python {python}, so segmentation cannot run here.").format(
        slicer=".".join(map(str, slicerVersion)), python=".".join(map(str, pythonVersion)))


def installInSlicer(missing, askTorchConfirmation=True):
    """installPackages with Slicer's pip and the PyTorch extension. slicer.util.pip_install keeps the GUI
    painted while pip runs (Slicer v5.10.0 Base/Python/slicer/util.py: logProcessOutput calls
    processEvents for every line of pip's output)."""
    import slicer

    torchLogic = None
    if {m[0] for m in missing} & TORCH_PACKAGES:
        try:
            import PyTorchUtils

            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        except ImportError:
            pass  # installPackages says to install the PyTorch extension
    installPackages(missing, slicer.util.pip_install, torchLogic, askTorchConfirmation)
