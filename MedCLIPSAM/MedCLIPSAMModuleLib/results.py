"""A finished run's files into the scene: segments into one segmentation node (named by the prompts,
on the input volume's grid), and the uncertainty map as a volume."""

import os

from .paths import mrml


def importResult(scene, segmentationPath, inputVolume, segmentationNode=None, uncertaintyPath=None, show3D=False,
                 terminologiesLogic=None):
    """(segmentation node, segment IDs, uncertainty node). Several files (MedCLIPSeg: one run per prompt)
    go into one node, and their uncertainty maps are merged."""
    lib = mrml()
    paths = [segmentationPath] if isinstance(segmentationPath, (str, os.PathLike)) else list(segmentationPath)
    node, segmentIds = segmentationNode, []
    for path in paths:
        imported = lib.import_segmentation_file(scene, path, inputVolume, node, replace_existing=True,
                                                terminologies_logic=terminologiesLogic)
        node = imported["node"]
        segmentIds += imported["segment_ids"]
    if show3D:
        node.CreateClosedSurfaceRepresentation()
    uncertainty = None
    uncertaintyPath = mergedUncertainty(uncertaintyPath)
    if uncertaintyPath and os.path.isfile(uncertaintyPath):
        uncertainty = lib.load_uncertainty_volume(scene, uncertaintyPath, node)
    return node, segmentIds, uncertainty


def mergedUncertainty(paths):
    """One uncertainty file: the path itself, or the voxel-wise maximum of several (same grid)."""
    if not paths or isinstance(paths, (str, os.PathLike)):
        return paths
    paths = [p for p in paths if os.path.isfile(p)]
    if len(paths) <= 1:
        return paths[0] if paths else None
    import SimpleITK as sitk

    merged = sitk.ReadImage(os.fspath(paths[0]), sitk.sitkFloat32)
    for path in paths[1:]:
        merged = sitk.Maximum(merged, sitk.ReadImage(os.fspath(path), sitk.sitkFloat32))
    target = os.path.join(os.path.dirname(paths[0]), "uncertainty-max.nrrd")
    sitk.WriteImage(merged, target)
    return target
