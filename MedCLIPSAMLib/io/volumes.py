"""Reading volumes (NRRD, NIfTI, MHA/MHD, 2D images, DICOM series) and writing images atomically.

`read_volume` always returns a 3D scalar SimpleITK image with the file's geometry untouched. Pixel type:
integer inputs keep their type (CT stays int16), float64 becomes float32, and anything derived by this
module (a luminance image from RGB) is float32.
"""

import contextlib
import logging
import os
import shutil
import tempfile

import numpy as np

from ..errors import MedCLIPSAMError
from ..runtime import atomic_output

log = logging.getLogger("medclipsam")

# ITU-R BT.601 luma weights, the usual RGB -> grey conversion
LUMA = (0.299, 0.587, 0.114)
COLOR_KINDS = ("RGB-color", "RGBA-color", "HSV-color", "XYZ-color", "3-color", "4-color")


@contextlib.contextmanager
def _quiet_itk():
    """Hide ITK's own stderr warnings (e.g. GDCM's 'No Series were found'): we raise a clearer error."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _first_line(exc):
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _read_dicom_series(folder):
    import SimpleITK as sitk

    with _quiet_itk():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series_ids:
        raise MedCLIPSAMError(f"folder '{folder}' holds no DICOM series; give a volume file or a DICOM folder")
    # several series in one folder: take the one with the most slices (the main acquisition)
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in series_ids), key=len)
    if len(series_ids) > 1:
        log.warning("folder '%s' holds %d DICOM series; reading the largest (%d files)",
                    folder, len(series_ids), len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise MedCLIPSAMError(f"cannot read the DICOM series in '{folder}': {_first_line(exc)}") from None


@contextlib.contextmanager
def _unambiguous_name(path):
    """ITK's NIfTI reader opens X.nii when asked for X.nii.gz and both exist: read through a lone link."""
    if not (path.endswith(".nii.gz") and os.path.exists(path[:-3])):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="medclipsam-") as folder:
        alias = os.path.join(folder, "volume.nii.gz")
        try:
            os.symlink(os.path.abspath(path), alias)
        except OSError:  # no symlinks (Windows without the privilege): copy instead
            shutil.copyfile(path, alias)
        yield alias


def _read_file(path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    try:
        with _quiet_itk(), _unambiguous_name(path) as name:
            reader.SetFileName(name)
            image = reader.Execute()
    except RuntimeError as exc:
        raise MedCLIPSAMError(
            f"cannot read '{path}': not a readable image file or it is corrupt ({_first_line(exc)})"
        ) from None
    kind = reader.GetMetaData("NRRD_kinds[pixel]") if reader.HasMetaDataKey("NRRD_kinds[pixel]") else ""
    return image, kind


def _pick_frame(image, frame, frames, path):
    """Extract frame `frame` of a time series: a 4D image, or a vector image whose components are frames."""
    import SimpleITK as sitk

    if frame is None and frames == 1:
        frame = 0  # a 4D file holding one frame is just a volume
    if frame is None:
        raise MedCLIPSAMError(
            f"'{path}' is a 4D time series with {frames} frames; pick one frame with --frame K (0..{frames - 1})"
        )
    if not 0 <= int(frame) < frames:
        raise MedCLIPSAMError(f"frame {frame} is out of range: '{path}' has {frames} frames (0..{frames - 1})")
    frame = int(frame)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        size[3] = 0  # collapse the time axis, keep the spatial 3x3 direction block
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size)
        extract.SetIndex([0, 0, 0, frame])
        extract.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        return extract.Execute(image)
    return sitk.VectorIndexSelectionCast(image, frame)


def _luminance(image, path):
    import SimpleITK as sitk

    n = image.GetNumberOfComponentsPerPixel()
    log.warning("'%s' is a colour image (%d components); converting it to greyscale (luminance)", path, n)
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)
    grey = sum(w * array[..., c] for c, w in enumerate(LUMA))  # an alpha channel is ignored
    out = sitk.GetImageFromArray(grey.astype(np.float32))
    out.CopyInformation(image)
    return out


def read_volume(path, frame=None):
    """Read a 3D scalar volume from a file SimpleITK reads (NRRD, NIfTI, MHA/MHD, PNG...) or a DICOM folder.

    - geometry (origin, spacing, direction) is kept exactly;
    - a 2D image becomes a one-slice volume (size z = 1);
    - a 4D time series (or a NRRD 'list' of frames) needs `frame`, which picks one frame;
    - an RGB(A) or 3/4-component vector image is converted to luminance with a warning (other vector
      images are refused);
    - NaN or infinite voxels are rejected.
    Integer pixel types are kept; float64 becomes float32. Every problem raises MedCLIPSAMError.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MedCLIPSAMError(f"input '{path}' does not exist")
    if os.path.isdir(path):
        image, kind = _read_dicom_series(path), ""
    else:
        image, kind = _read_file(path)

    if "complex" in image.GetPixelIDTypeAsString():
        raise MedCLIPSAMError(f"'{path}' holds complex-valued voxels; give a magnitude image")
    dim = image.GetDimension()
    if dim not in (2, 3, 4):
        raise MedCLIPSAMError(f"'{path}' is a {dim}D image; a 3D volume (or a 2D image) is needed")
    comps = image.GetNumberOfComponentsPerPixel()
    if dim == 4:
        if comps != 1:
            raise MedCLIPSAMError(f"'{path}' is a 4D image of {comps}-component vectors; a scalar volume is needed")
        image = _pick_frame(image, frame, image.GetSize()[3], path)
    elif comps > 1:
        if kind == "list":  # how ITK reads Slicer's sequence NRRD files
            image = _pick_frame(image, frame, comps, path)
        elif kind in COLOR_KINDS or comps in (3, 4):
            image = _luminance(image, path)
        else:
            raise MedCLIPSAMError(f"'{path}' holds {comps}-component vectors per voxel; a scalar volume is needed")
    elif frame not in (None, 0):
        raise MedCLIPSAMError(f"frame {frame} was asked for but '{path}' is not a time series (it has one frame)")

    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])  # one slice: z spacing 1, direction extended with the identity
    if image.GetPixelID() == sitk.sitkFloat64:
        image = sitk.Cast(image, sitk.sitkFloat32)

    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise MedCLIPSAMError(
                f"'{path}' contains {bad} NaN or infinite voxel(s) out of {array.size}; fix or mask them first"
            )
    return image


def write_volume(path, image, compress=True):
    """Write a SimpleITK image (format from the extension: .nrrd, .nii.gz, .mha ...) atomically."""
    import SimpleITK as sitk

    path = os.fspath(path)
    with atomic_output(path) as tmp:
        try:
            with _quiet_itk():
                sitk.WriteImage(image, tmp, useCompression=compress)
        except RuntimeError as exc:
            raise MedCLIPSAMError(f"cannot write '{path}': {_first_line(exc)}") from None
    return path


def write_labelmap(path, array, reference, compress=True):
    """Write an integer labelmap (numpy, z/y/x order) on `reference`'s grid as .nrrd / .nii.gz, atomically."""
    from .geometry import image_from_array

    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise MedCLIPSAMError(f"a labelmap must hold integer labels, got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise MedCLIPSAMError("labelmap values must lie in 0..65535")
    dtype = np.uint8 if not array.size or array.max() <= 255 else np.uint16
    return write_volume(path, image_from_array(array.astype(dtype, copy=False), reference), compress)
