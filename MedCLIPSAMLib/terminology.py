"""The shipped prompt ensembles' targets and their coded terminology (SNOMED CT), read from
MedCLIPSAMLib/resources/prompt_ensembles.json. Below every stage: the text prompts (pipeline/text.py) and the
DICOM SEG writer (io/dicom_seg.py) both name structures by these codes."""

import functools
import json
from importlib import resources

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
CATEGORIES = {
    "anatomy": ("123037004", "Anatomical Structure"),
    "morphology": ("49755003", "Morphologically Altered Structure"),
}


@functools.lru_cache(maxsize=1)
def load_ensembles():
    """{target name: {"aliases", "sentences", "terminology", "color"}} of the shipped ensembles."""
    text = resources.files("MedCLIPSAMLib").joinpath("resources/prompt_ensembles.json").read_text()
    return json.loads(text)["targets"]


def known_targets():
    return sorted(load_ensembles())


def find_target(prompt):
    """The ensemble key a prompt names (case-insensitive, aliases included), or None."""
    key = " ".join(prompt.lower().split())
    for name, target in load_ensembles().items():
        if key == name or key in target["aliases"]:
            return name
    return None
