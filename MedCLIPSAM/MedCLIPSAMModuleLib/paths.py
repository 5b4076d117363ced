"""Where the extension's files are: beside the module file when installed (the build copies Resources/
and MedCLIPSAMLib/ next to MedCLIPSAM.py), one folder up in a source checkout."""

import os
import sys

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def candidateRoots():
    return [MODULE_DIR, os.path.dirname(MODULE_DIR)]


def resourcePath(relativePath):
    """Absolute path of a file in Resources/, installed or in a source checkout."""
    for root in candidateRoots():
        path = os.path.join(root, "Resources", relativePath)
        if os.path.exists(path):
            return path
    return os.path.join(MODULE_DIR, "Resources", relativePath)


def libraryParentDir():
    """The folder that holds the MedCLIPSAMLib package shipped with the module (None if not shipped)."""
    for root in candidateRoots():
        if os.path.isfile(os.path.join(root, "MedCLIPSAMLib", "__init__.py")):
            return root
    return None


def useShippedLibrary():
    """Make `import MedCLIPSAMLib` find the shipped package (Slicer does not put a checkout's root on sys.path)."""
    parent = libraryParentDir()
    if parent and parent not in sys.path:
        sys.path.insert(0, parent)


def mrml():
    """MedCLIPSAMLib.mrml (numpy and, when used, SimpleITK; never torch)."""
    useShippedLibrary()
    from MedCLIPSAMLib import mrml

    return mrml
