"""DICOM Segmentation output (highdicom): `segment DICOM_FOLDER --output result.dcm` and `predict`.

A binary SEG referencing the source series, one segment per prompt. Each segment's coded terminology is
the prompt's shipped target (resources/prompt_ensembles.json: SNOMED CT category and type, the codes Slicer's
terminology shows); a prompt without one gets the generic SNOMED CT "Tissue" category and type, its text
as the segment label. The algorithm identification names the method and the models, and says whether the
weights were random (a smoke-test run must never pass for a clinical result).

Frames follow the source instances: the volume's slice k is matched to the instance whose Image Position
(Patient) lies where voxel (0, 0, k) does along the slice normal (within a tenth of the slice spacing), so
an oblique or sheared series read in any file order maps back exactly. prepare() does that matching, and
builds the SEG once with empty masks, before any model loads: a series a SEG cannot reference is refused
before the work, not after it. Only the final write (disk full, a vanished folder) can fail after.
"""

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..runtime import atomic_output

SUFFIX = ".dcm"
GENERIC = ("85756007", "Tissue")      # SNOMED CT, as in DICOM CID 7150 (segmentation property categories)
# A volume slice matches the instance whose Image Position (Patient) lies within this fraction of the slice
# spacing of it, measured along the slice normal. Neighbouring instances are one spacing apart along the
# normal, so any fraction below 0.5 is unambiguous; 0.1 keeps a fivefold margin against taking a neighbour
# while accepting what real series carry: positions rounded to DICOM's 16-character decimal strings
# (~1e-4 mm), and a step that is not exactly along the normal (shear, rounding of the orientation: a step
# (0, 0, 3) with normal (0, 0.005236, 0.999986) puts the reconstructed slice 0.016 mm off in-plane, which
# is why the in-plane offset is not compared at all).
POSITION_TOLERANCE = 0.1


def is_dicom_output(path):
    return str(path).lower().endswith(SUFFIX)


def series_files(folder):
    """The files of the image series read_volume reads from `folder`; one sentence otherwise."""
    from .volumes import dicom_series_files

    if not os.path.isdir(folder):
        raise MedCLIPSAMError(f"a DICOM SEG output ({SUFFIX}) needs a DICOM series folder as input, because the "
                              f"segmentation references its source images; '{folder}' is not a folder")
    return dicom_series_files(folder, report=False)   # read_volume says once what it read and skipped


def check_input(path):
    """Refuse early (before the volume is read and any model loads) an input a DICOM SEG cannot reference,
    or a missing extra. prepare() then checks the series against the volume, still before any model."""
    from ..errors import optional_import

    optional_import("highdicom", "dicom", "DICOM SEG output")
    series_files(path)


def source_datasets(folder, image):
    """The source instances in the volume's slice order (slice k = array[k]), matched along the slice
    normal (POSITION_TOLERANCE); one sentence for a slice that matches no instance."""
    import pydicom

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(folder)]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    along = positions @ normal                      # each instance's position along the normal
    spacing = float(image.GetSpacing()[2])
    tolerance = POSITION_TOLERANCE * spacing
    ordered, used = [], set()
    for k in range(image.GetSize()[2]):
        offset = np.abs(along - float(np.dot(image.TransformIndexToPhysicalPoint((0, 0, k)), normal)))
        best = int(offset.argmin())
        if offset[best] > tolerance or best in used:
            raise MedCLIPSAMError(
                f"slice {k} of the volume matches no instance of the DICOM series in '{folder}' (nearest "
                f"{offset[best]:.3g} mm along the slice normal, tolerance {tolerance:.3g} mm: a tenth of the "
                f"{spacing:.3g} mm slice spacing); a DICOM SEG cannot reference this series")
        used.add(best)
        ordered.append(datasets[best])
    return ordered


def prepare(folder, image, segment_names=("segment",)):
    """The source instances for write_dicom_seg, checked before any model loads: every slice matched to
    its instance, and a SEG built in memory (empty masks, not saved) so that whatever highdicom needs from
    the series (frame of reference, patient and study modules...) is known to be there."""
    sources = source_datasets(folder, image)
    empty = [{"name": n, "mask": np.zeros(tuple(reversed(image.GetSize())), np.uint8)} for n in segment_names]
    try:
        build_segmentation(empty, image, sources, "check", {}, False, "check")
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise MedCLIPSAMError(f"a DICOM SEG cannot reference the series in '{folder}': {exc}") from None
    return sources


def segment_codes(name):
    """(category, type) coded concepts of a segment named by its prompt; generic codes for an unknown one."""
    import highdicom as hd

    from ..terminology import CATEGORIES, find_target, load_ensembles

    target = find_target(name)
    term = load_ensembles()[target].get("terminology") if target else None
    if term:
        category = CATEGORIES[term["category"]]
        return (hd.sr.CodedConcept(category[0], "SCT", category[1]),
                hd.sr.CodedConcept(term["type_code"], "SCT", term["type_meaning"]))
    generic = hd.sr.CodedConcept(GENERIC[0], "SCT", GENERIC[1])
    return generic, generic


def algorithm_identification(method, models, random):
    """highdicom AlgorithmIdentificationSequence: method, models (name -> model) and random weights."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    parameters = {**{str(k): str(v) for k, v in models.items()}, "random_weights": "yes" if random else "no"}
    return hd.AlgorithmIdentificationSequence(name=str(method)[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=str(__version__), source="MedCLIP-SAM for 3D Slicer",
                                              parameters=parameters)


def build_segmentation(segments, image, sources, method, models, random, description):
    """The highdicom Segmentation of `segments` on the source instances (in the volume's slice order)."""
    import highdicom as hd

    from .. import __version__

    masks = np.stack([np.asarray(s["mask"]) > 0 for s in segments], axis=-1).astype(np.uint8)   # (F, R, C, S)
    if masks.shape[:3] != tuple(reversed(image.GetSize())):
        raise MedCLIPSAMError("the segmentation does not lie on the DICOM series' grid")
    algorithm = algorithm_identification(method, models, random)
    descriptions = []
    for number, seg in enumerate(segments, start=1):
        category, kind = segment_codes(seg["name"])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(seg["name"])[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    with quiet_highdicom():
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedCLIP-SAM",
            manufacturer_model_name=str(method)[:64], software_versions=str(__version__),
            device_serial_number="none", omit_empty_frames=bool(masks.any()),    # highdicom needs a frame
            content_label="MEDCLIPSAM",
            content_description=_content_description(description, random))
    seg.SeriesDescription = ("MedCLIP-SAM: " + ", ".join(s["name"] for s in segments))[:64]
    return seg


def _content_description(description, random):
    """The SEG's Content Description: how it was made, and a warning where random weights were involved."""
    if not random:
        return description[:64]
    if description.startswith("trained model"):     # a model trained on random-weight pseudo-labels
        return "TRAINED MODEL, RANDOM-WEIGHT PSEUDO-LABELS, NOT A RESULT"
    return "RANDOM-WEIGHT MODELS, NOT A RESULT"


@contextlib.contextmanager
def quiet_highdicom():
    """highdicom warns about source attributes it copies as they are (a one-component patient name such as
    "dft": UserWarning from highdicom/base.py) and logs notes: the SEG is valid either way and the user can
    do nothing about the scanner's values, so only errors get through."""
    logger = logging.getLogger("highdicom")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
            yield
    finally:
        logger.setLevel(previous)


def write_dicom_seg(path, segments, image, source_folder, method, models, random=False,
                    description="text-prompted segmentation", sources=None):
    """Write `segments` ([{"name", "mask" (z, y, x) on `image`'s grid}]) as a DICOM SEG referencing the
    series in `source_folder` (the one `image` was read from; `sources`: prepare()'s instances)."""
    if not segments:
        raise MedCLIPSAMError("there is no segment to write")
    if sources is None:
        sources = source_datasets(source_folder, image)
    seg = build_segmentation(segments, image, sources, method, models, random, description)
    with atomic_output(Path(path)) as tmp:
        seg.save_as(tmp)
