"""Image-grid geometry helpers: patient-axis lookup, grid comparison, arrays on a reference grid.

SimpleITK geometry is LPS: physical = origin + direction @ (spacing * index), with index in (x, y, z) order,
while `sitk.GetArrayFromImage` returns arrays in (z, y, x) order, so index axis c is numpy axis 2 - c.
"""

import itertools

import numpy as np

from ..errors import MedCLIPSAMError

# row of the LPS direction matrix that each view slices across (L-R = 0, A-P = 1, S-I = 2)
VIEW_ROWS = {"sagittal": 0, "coronal": 1, "axial": 2}


def direction_matrix(image):
    """The image's direction cosines as a 3x3 matrix whose columns are the index axes (x, y, z) in LPS."""
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


def index_to_lps_matrix(image):
    """4x4 matrix from continuous index (x, y, z, 1) to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = direction_matrix(image) * np.asarray(image.GetSpacing(), dtype=float)
    m[:3, 3] = image.GetOrigin()
    return m


def patient_axes(image):
    """For each patient axis (L-R, A-P, S-I) the index axis (0=x, 1=y, 2=z) that runs along it.

    Chosen as the one-to-one assignment with the largest total |cosine|, so three distinct axes come back
    even for strongly oblique grids where two patient axes are closest to the same index axis.
    `image` may also be a 3x3 direction matrix (columns = index axes in LPS).
    """
    matrix = image if isinstance(image, np.ndarray) else direction_matrix(image)
    cos = np.abs(np.asarray(matrix, dtype=float).reshape(3, 3))
    best, best_score = None, -1.0
    for perm in itertools.permutations(range(3)):  # perm[row] = index axis for patient axis `row`
        score = sum(cos[row, perm[row]] for row in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    return tuple(best)


def slicing_axis(image, axis="axial"):
    """The numpy axis (of `sitk.GetArrayFromImage(image)`, z/y/x order) to step along to get `axis` slices.

    Axial slices stack along the patient S-I axis, coronal along A-P, sagittal along L-R; the answer follows
    the direction matrix, so it is right for permuted, flipped and oblique grids.
    """
    if axis not in VIEW_ROWS:
        raise MedCLIPSAMError(f"unknown slicing axis '{axis}'; choose axial, coronal or sagittal")
    if image.GetDimension() != 3:
        raise MedCLIPSAMError(f"slicing needs a 3D image, got a {image.GetDimension()}D one")
    index_axis = patient_axes(image)[VIEW_ROWS[axis]]
    return 2 - index_axis


def geometry_equal(a, b, tol=1e-6):
    """True when two images share size, origin, spacing and direction (within `tol`, relative for big values)."""
    if a.GetDimension() != b.GetDimension() or tuple(a.GetSize()) != tuple(b.GetSize()):
        return False
    return all(
        np.allclose(get(a), get(b), rtol=tol, atol=tol)
        for get in (lambda im: im.GetOrigin(), lambda im: im.GetSpacing(), lambda im: im.GetDirection())
    )


def image_from_array(array, reference):
    """A SimpleITK image holding `array` (z, y, x order) on `reference`'s exact grid."""
    import SimpleITK as sitk

    array = np.asarray(array)
    expected = tuple(reversed(reference.GetSize()))
    if array.shape != expected:
        raise MedCLIPSAMError(
            f"array of shape {array.shape} does not match the reference grid (z, y, x) = {expected}"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
