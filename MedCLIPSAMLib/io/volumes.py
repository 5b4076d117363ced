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


# DICOM objects that are not images: they annotate, plan or describe images (SOP classes from DICOM PS3.4
# Annex B.5; a Modality (0008,0060) from PS3.3 C.7.3.1.1.1 where the SOP class is not one of these)
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66": "a DICOM Raw Data object",
    "1.2.840.10008.5.1.4.1.1.66.1": "a DICOM Spatial Registration (REG)",
    "1.2.840.10008.5.1.4.1.1.66.2": "a DICOM Spatial Fiducials object (FID)",
    "1.2.840.10008.5.1.4.1.1.66.3": "a DICOM Deformable Registration (REG)",
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.66.5": "a DICOM Surface Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.66.7": "a DICOM Label Map Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.2": "a DICOM RT Dose (RTDOSE)",
    "1.2.840.10008.5.1.4.1.1.481.3": "a DICOM RT Structure Set (RTSTRUCT)",
    "1.2.840.10008.5.1.4.1.1.481.4": "a DICOM RT Treatment Record (RTRECORD)",
    "1.2.840.10008.5.1.4.1.1.481.5": "a DICOM RT Plan (RTPLAN)",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF (DOC)",
}
NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a DICOM Structured Report (SR) or Key Object Selection (KO)",
    "1.2.840.10008.5.1.4.1.1.11.": "a DICOM Presentation State (PR)",
    "1.2.840.10008.5.1.4.1.1.481.": "a DICOM RT object",   # RT Image (.481.1) is an image: listed below
}
NON_IMAGE_MODALITIES = {
    "SEG": "a DICOM Segmentation (SEG)", "RTSTRUCT": "a DICOM RT Structure Set (RTSTRUCT)",
    "RTPLAN": "a DICOM RT Plan (RTPLAN)", "RTDOSE": "a DICOM RT Dose (RTDOSE)",
    "RTRECORD": "a DICOM RT Treatment Record (RTRECORD)", "SR": "a DICOM Structured Report (SR)",
    "PR": "a DICOM Presentation State (PR)", "KO": "a DICOM Key Object Selection (KO)",
    "REG": "a DICOM Registration (REG)", "FID": "a DICOM Spatial Fiducials object (FID)",
    "DOC": "an encapsulated document (DOC)", "PLAN": "a DICOM Plan (PLAN)",
}
RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"
SOP_CLASS_TAG, MODALITY_TAG = "0008|0016", "0008|0060"
SERIES_DESCRIPTION_TAG, SERIES_UID_TAG = "0008|103e", "0020|000e"


def non_image_kind(sop_class, modality):
    """What a DICOM object is when it is not an image ('a DICOM Segmentation (SEG)'), or None for an image."""
    sop_class, modality = (sop_class or "").strip().rstrip("\0"), (modality or "").strip().upper()
    if sop_class in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop_class]
    if sop_class != RT_IMAGE:
        for prefix, kind in NON_IMAGE_SOP_PREFIXES.items():
            if sop_class.startswith(prefix):
                return kind
    return NON_IMAGE_MODALITIES.get(modality)


def _dicom_tags(path):
    """{tag: value} of a DICOM file's header as GDCM reads it; None when GDCM cannot read it as an image
    (an object without pixel data, such as an RT Structure Set or a Structured Report)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        return None
    return {k: reader.GetMetaData(k).strip() for k in reader.GetMetaDataKeys()}


def _describe_unlisted(path):
    """What a file GDCM lists in no series is, where pydicom (the dicom extra) can tell: None for a file
    that is not DICOM, or when pydicom is not installed."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        return None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "Modality", "SeriesInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return None
    return non_image_kind(str(ds.get("SOPClassUID", "")), str(ds.get("Modality", ""))) or "a DICOM object"


def _series_label(uid, tags, count):
    modality = (tags or {}).get(MODALITY_TAG, "") or "?"
    description = (tags or {}).get(SERIES_DESCRIPTION_TAG, "")
    return f"series {uid} ({modality}{', ' + repr(description) if description else ''}, {count} file(s))"


def dicom_series_files(folder, report=True):
    """The files of the image series read from a DICOM `folder`: the one with the most files among its
    image series. Non-image objects (SEG, RTSTRUCT, SR, PR, KO, RT plans and doses) are never read; one
    sentence when the folder holds no image series, and (`report`) a warning naming the chosen series and
    every one skipped (with why) when there was a choice."""
    import SimpleITK as sitk

    folder = os.fspath(folder)
    with _quiet_itk():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    images, skipped, listed = [], [], set()
    for uid in series_ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        listed.update(os.path.abspath(f) for f in files)
        tags = _dicom_tags(files[0])
        kind = non_image_kind((tags or {}).get(SOP_CLASS_TAG), (tags or {}).get(MODALITY_TAG))
        if kind:
            skipped.append(f"{_series_label(uid, tags, len(files))}: {kind}, not an image")
        else:
            images.append((uid, tags, files))
    # objects without pixel data (RTSTRUCT, SR, RTPLAN...) are in no GDCM series: name them too
    others = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.path.abspath(path) not in listed and not name.startswith("."):
            kind = _describe_unlisted(path)
            if kind:
                others[kind] = others.get(kind, 0) + 1
    skipped += [f"{n} file(s) holding {kind}, not an image" for kind, n in others.items()]
    if not images and not skipped:
        raise MedCLIPSAMError(f"folder '{folder}' holds no DICOM series; give a volume file or a DICOM folder")
    if not images:
        raise MedCLIPSAMError(f"folder '{folder}' holds no DICOM image series (it holds {'; '.join(skipped)}); "
                              "give a volume file or a folder of DICOM images")
    # several image series: the one with the most files (the main acquisition)
    uid, tags, files = max(images, key=lambda s: len(s[2]))
    skipped += [f"{_series_label(u, t, len(f))}: fewer files" for u, t, f in images if u != uid]
    if skipped and report:
        log.warning("folder '%s' holds %d DICOM series: reading %s; skipped %s", folder,
                    len(series_ids) + sum(others.values()), _series_label(uid, tags, len(files)), "; ".join(skipped))
    return files


def check_not_non_image(path):
    """Refuse a single DICOM file that is not an image (a SEG, an RT Structure Set...) in one sentence."""
    tags = _dicom_tags(path)
    kind = (non_image_kind(tags.get(SOP_CLASS_TAG), tags.get(MODALITY_TAG)) if tags is not None
            else _describe_unlisted(path))
    if kind and kind != "a DICOM object":
        raise MedCLIPSAMError(f"'{path}' is {kind}, not an image; give the image (or DICOM image series) it "
                              "refers to")


def _is_dicom_file(path):
    """A DICOM Part 10 file ('DICM' after the 128-byte preamble) or a .dcm file."""
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read_dicom_series(folder):
    import SimpleITK as sitk

    files = dicom_series_files(folder)
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
        if _is_dicom_file(path):
            check_not_non_image(path)
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
