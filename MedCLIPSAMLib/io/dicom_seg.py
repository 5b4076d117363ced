"""DICOM Segmentation output (highdicom): `segment DICOM_FOLDER --output result.dcm` and `predict`.

A binary SEG referencing the source series, one segment per prompt. Each segment's coded terminology is
the prompt's shipped target (resources/prompt_ensembles.json: SNOMED CT category and type, the codes Slicer's
terminology shows); a prompt without one gets the generic SNOMED CT "Tissue" category and type, its text
as the segment label. The algorithm identification names the method and the models, and says whether the
weights were random (a smoke-test run must never pass for a clinical result).

Frames follow the source instances: the volume's slice k is matched to the instance whose Image Position
(Patient) is the position of voxel (0, 0, k), so an oblique series read in any file order maps back exactly.
"""

import os
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..runtime import atomic_output

SUFFIX = ".dcm"
GENERIC = ("85756007", "Tissue")      # SNOMED CT, as in DICOM CID 7150 (segmentation property categories)
POSITION_TOLERANCE_MM = 0.01


def is_dicom_output(path):
    return str(path).lower().endswith(SUFFIX)


def series_files(folder):
    """The files of the series read_volume reads from `folder` (the largest); one sentence otherwise."""
    import SimpleITK as sitk

    if not os.path.isdir(folder):
        raise MedCLIPSAMError(f"a DICOM SEG output ({SUFFIX}) needs a DICOM series folder as input, because the "
                              f"segmentation references its source images; '{folder}' is not a folder")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise MedCLIPSAMError(f"a DICOM SEG output ({SUFFIX}) needs a DICOM series as input; '{folder}' holds none")
    return list(max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i) for i in ids), key=len))


def check_input(path):
    """Refuse early (before any model loads) an input a DICOM SEG cannot reference, or a missing extra."""
    from ..errors import optional_import

    optional_import("highdicom", "dicom", "DICOM SEG output")
    series_files(path)


def _source_datasets(folder, image):
    """The source instances in the volume's slice order (slice k = array[k])."""
    import pydicom

    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(folder)]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    ordered = []
    for k in range(image.GetSize()[2]):
        point = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        distance = np.linalg.norm(positions - point, axis=1)
        best = int(distance.argmin())
        if distance[best] > POSITION_TOLERANCE_MM:
            raise MedCLIPSAMError(f"slice {k} of the volume matches no instance of the DICOM series in '{folder}'")
        ordered.append(datasets[best])
    return ordered


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


def write_dicom_seg(path, segments, image, source_folder, method, models, random=False):
    """Write `segments` ([{"name", "mask" (z, y, x) on `image`'s grid}]) as a DICOM SEG referencing the
    series in `source_folder` (the one `image` was read from)."""
    import highdicom as hd

    from .. import __version__

    if not segments:
        raise MedCLIPSAMError("there is no segment to write")
    sources = _source_datasets(source_folder, image)
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
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedCLIP-SAM",
        manufacturer_model_name=str(method)[:64], software_versions=str(__version__), device_serial_number="none",
        omit_empty_frames=bool(masks.any()),    # highdicom needs at least one frame
        content_label="MEDCLIPSAM", content_description=("RANDOM-WEIGHT MODELS, NOT A RESULT" if random
                                                         else "text-prompted segmentation")[:64])
    seg.SeriesDescription = ("MedCLIP-SAM: " + ", ".join(s["name"] for s in segments))[:64]
    with atomic_output(Path(path)) as tmp:
        seg.save_as(tmp)
