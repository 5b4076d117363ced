"""Volumes and segmentations between files, SimpleITK images and MRML nodes (slicer-core or Slicer; no Qt).

The Slicer module uses these to hand the input volume to `medclipsam segment` and to bring its .seg.nrrd back
into the scene; the pytest suite uses them with slicer-core's real MRML scene.

Coordinates: MRML nodes are RAS, ITK/SimpleITK images and files are LPS. Every function here keeps the voxel
grid exactly (size, origin, spacing, direction); nothing is resampled except by Slicer's own segmentation
logic when a segment is exported onto the reference volume's grid.

A volume's parent transform is not applied: the file written for the CLI is in the volume's own (local)
frame, and the segmentation that comes back is placed under the same parent transform, as Slicer does when
it saves a transformed volume.
"""

import os

import numpy as np

# Node reference roles on the segmentation node, so that re-running and re-exporting reuse nodes instead of
# piling them up.
LABELMAP_REFERENCE_ROLE = "MedCLIPSAM.labelmap"
UNCERTAINTY_REFERENCE_ROLE = "MedCLIPSAM.uncertainty"

# Slicer gives a new segment this generic terminology; a segment carrying it has no real terminology yet.
_GENERIC_TYPE_CODE = "SCT^85756007^Tissue"
_NO_COLOR = (127, 127, 127)  # what the terminology logic reports when an entry has no recommended colour

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _slicer():
    import slicer  # slicer-core outside Slicer, the application's module inside it

    return slicer


# ------------------------------------------------------------------------------------------------ geometry
def ijk_to_ras_from_sitk(image):
    """4x4 IJK->RAS matrix (numpy) of a SimpleITK image (whose geometry is LPS)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ ijk_to_lps


def ijk_to_ras_from_node(node):
    """4x4 IJK->RAS matrix (numpy) of a volume node, without its parent transform."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _geometry_from_ijk_to_ras(ijk_to_ras):
    """(origin, spacing, direction) in LPS, as SimpleITK wants them."""
    ijk_to_lps = _LPS_TO_RAS @ ijk_to_ras
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    return tuple(ijk_to_lps[:3, 3]), tuple(spacing), tuple(direction.flatten())


def _set_ijk_to_ras(node, ijk_to_ras):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(matrix)


# ---------------------------------------------------------------------------------------- file checks
# NRRD type names (Teem's spellings) -> bytes per voxel; also what the service checks uploads against
NRRD_TYPE_BYTES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4,
    "uint32_t": 4, "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8,
    "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8,
    "unsigned long long int": 8, "uint64": 8, "uint64_t": 8, "float": 4, "double": 8,
}


def check_nrrd_file(path):
    """Raise ValueError unless `path` is a complete, attached-data NRRD file.

    Slicer's NRRD readers can abort the whole process on a malformed or truncated file (seen with
    slicer-core), so files from another process are checked here first: header fields, and for raw and
    gzip encodings that the data holds every voxel.
    """
    import zlib

    path = os.fspath(path)
    with open(path, "rb") as f:
        if not f.readline().startswith(b"NRRD000"):
            raise ValueError(f"'{path}' is not a NRRD file")
        fields = {}
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"'{path}' is truncated (its header does not end)")
            line = line.rstrip(b"\r\n")
            if not line:
                break
            text = line.decode("latin-1")
            if text.startswith("#") or ":=" in text:  # comments, key/value pairs
                continue
            if ": " not in text:
                raise ValueError(f"'{path}' has a malformed header line: {text[:60]!r}")
            key, value = text.split(": ", 1)
            fields[key.strip().lower()] = value.strip()
        for key in ("type", "dimension", "sizes", "encoding"):
            if key not in fields:
                raise ValueError(f"'{path}' lacks the NRRD field '{key}'")
        if "data file" in fields or "datafile" in fields:
            raise ValueError(f"'{path}' keeps its voxels in a separate file, which is not supported here")
        try:
            sizes = [int(v) for v in fields["sizes"].split()]
        except ValueError:
            raise ValueError(f"'{path}' has invalid sizes: {fields['sizes']!r}") from None
        item = NRRD_TYPE_BYTES.get(fields["type"].lower())
        encoding = fields["encoding"].lower()
        if item is None or encoding not in ("raw", "gzip", "gz"):
            return  # other types and encodings are left to the reader
        expected = item * int(np.prod(sizes))
        if encoding == "raw":
            available = os.path.getsize(path) - f.tell()
        else:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            available = 0
            try:
                while available < expected:  # count the bytes, holding at most 16 MB of them at a time
                    data = decompressor.unconsumed_tail or f.read(1 << 20)
                    if not data:
                        break
                    available += len(decompressor.decompress(data, min(1 << 24, expected - available + 1)))
            except zlib.error as exc:
                raise ValueError(f"'{path}' has corrupt compressed data ({exc})") from None
        if available < expected:
            raise ValueError(f"'{path}' is truncated: {available} of {expected} bytes of voxel data")


# ------------------------------------------------------------------------------------------------- volumes
def volume_node_from_sitk(scene, image, name, node=None):
    """Add (or fill `node`) a scalar volume node with a 3D SimpleITK image's voxels and exact geometry.

    Images with several components per voxel become a vtkMRMLVectorVolumeNode.
    """
    import SimpleITK as sitk
    import vtk
    from vtk.util import numpy_support

    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayViewFromImage(image)  # (k, j, i[, c]): vtkImageData's memory order, x fastest
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    flat = np.ascontiguousarray(array).reshape(-1, components)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    scalars = numpy_support.numpy_to_vtk(flat if components > 1 else flat[:, 0], deep=True,
                                         array_type=numpy_support.get_vtk_array_type(flat.dtype))
    image_data.GetPointData().SetScalars(scalars)

    if node is None:
        class_name = "vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(class_name, name)
    node.SetAndObserveImageData(image_data)
    _set_ijk_to_ras(node, ijk_to_ras_from_sitk(image))
    node.CreateDefaultDisplayNodes()
    return node


def sitk_image_from_volume_node(node):
    """SimpleITK image (LPS) with the node's voxels and exact geometry (parent transform not applied)."""
    import SimpleITK as sitk
    from vtk.util import numpy_support

    image_data = node.GetImageData() if node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{node.GetName() if node else None}' has no image data")
    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars)
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    image = sitk.GetImageFromArray(array.reshape(shape), isVector=components > 1)
    origin, spacing, direction = _geometry_from_ijk_to_ras(ijk_to_ras_from_node(node))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def write_volume_node(node, path, compress=False):
    """Write a volume node to a file SimpleITK can write (.nrrd, .nii.gz, ...), in its local frame."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk_image_from_volume_node(node), os.fspath(path), useCompression=compress)


def read_volume_into_node(scene, path, name, node=None):
    """Read a volume file with Slicer's own reader into `node` (or a new scalar volume node).

    The file is read before any node is added, so a failed read leaves the scene unchanged.
    """
    slicer = _slicer()

    if os.fspath(path).lower().endswith(".nrrd"):
        check_nrrd_file(path)
    temporary = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    if not storage.ReadData(temporary):
        raise ValueError(f"cannot read volume file '{path}'")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(temporary.GetImageData())
    import vtk

    matrix = vtk.vtkMatrix4x4()
    temporary.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


# ------------------------------------------------------------------------------------------- segmentations
def read_segmentation_file(path):
    """Read a .seg.nrrd into a segmentation node that lives in a private scene (the caller's is untouched).

    Returns (private_scene, node); keep the scene alive while the node is used.
    """
    slicer = _slicer()

    if not os.path.isfile(path):
        raise ValueError(f"segmentation file '{path}' does not exist")
    check_nrrd_file(path)
    private_scene = slicer.vtkMRMLScene()
    node = private_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(os.fspath(path))
    if not storage.ReadData(node):
        raise ValueError(f"cannot read segmentation file '{path}'")
    return private_scene, node


def segment_names(segmentation_node):
    """Segment names in display order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def get_segment_tag(segment, tag):
    """A segment's tag value, or "" when it has none."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else ""


def terminology_of(segment):
    """The segment's serialized terminology entry ("" when none)."""
    slicer = _slicer()

    return get_segment_tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName())


def has_specific_terminology(segment):
    """True when the segment carries a terminology other than Slicer's generic 'Tissue' default."""
    fields = terminology_of(segment).split("~")
    return len(fields) > 2 and fields[2].strip("^") != "" and fields[2] != _GENERIC_TYPE_CODE


def _label_candidates(name):
    """Names to try in the terminologies, most specific first: 'brain tumor' -> ..., 'tumor', 'mass'."""
    words = name.lower().replace("_", " ").split()
    synonyms = {"tumor": "mass", "tumour": "mass", "lesion": "mass", "neoplasm": "mass", "nodule": "mass",
                "lungs": "lung", "kidneys": "kidney"}
    candidates = []
    for start in range(len(words)):
        tail = words[start:]
        for variant in (tail, [synonyms.get(w, w) for w in tail]):
            text = " ".join(variant)
            if text and text not in candidates:
                candidates.append(text)
    return candidates


def terminology_for_name(terminologies_logic, name):
    """Look a prompt up in the loaded terminologies: (serialized entry, rgb 0..1 or None), or None.

    Matches a type's or modifier's 3D Slicer label ('liver', 'left kidney'), then a type's code meaning
    ('Kidney'), trying shorter tails and a few synonyms of the prompt ('brain tumor' -> 'mass'). Nothing
    is matched from memory: the codes and colours are those of the terminologies Slicer has loaded.
    """
    if terminologies_logic is None or not name:
        return None
    slicer = _slicer()
    import vtk

    names = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(names)
    terminologies = [names.GetValue(i) for i in range(names.GetNumberOfValues())]

    def result(entry):
        colour = None
        for code in (entry.GetTypeModifierObject(), entry.GetTypeObject()):
            rgb = tuple(code.GetRecommendedDisplayRGBValue())
            if code.GetCodeValue() and rgb != _NO_COLOR:
                colour = tuple(c / 255.0 for c in rgb)
                break
        return terminologies_logic.SerializeTerminologyEntry(entry), colour

    for candidate in _label_candidates(name):
        for terminology in terminologies:
            entry = slicer.vtkSlicerTerminologyEntry()
            if terminologies_logic.FindTypeInTerminologyBy3dSlicerLabel(terminology, candidate, entry):
                return result(entry)
        for terminology in terminologies:  # code meaning of a type, e.g. 'Kidney'
            for c in range(terminologies_logic.GetNumberOfCategoriesInTerminology(terminology)):
                category = slicer.vtkSlicerTerminologyCategory()
                terminologies_logic.GetNthCategoryInTerminology(terminology, c, category)
                for t in range(terminologies_logic.GetNumberOfTypesInTerminologyCategory(terminology, category)):
                    type_object = slicer.vtkSlicerTerminologyType()
                    terminologies_logic.GetNthTypeInTerminologyCategory(terminology, category, t, type_object)
                    if (type_object.GetCodeMeaning() or "").lower() == candidate:
                        entry = slicer.vtkSlicerTerminologyEntry()
                        entry.SetTerminologyContextName(terminology)
                        entry.GetCategoryObject().Copy(category)
                        entry.GetTypeObject().Copy(type_object)
                        return result(entry)
    return None


def _source_representation_name(segmentation):
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    return getter()


def import_segmentation_file(scene, path, reference_volume_node, segmentation_node=None, replace_existing=True,
                             name=None, terminologies_logic=None):
    """Bring the segments of a .seg.nrrd into a segmentation node that references the input volume.

    - segmentation_node None: a new node is created (named `name` or '<volume> segmentation').
    - A segment whose name is already in the node replaces that segment's voxels when replace_existing;
      it keeps its ID, place in the list, colour and terminology (what the user may have set). Other
      segments are added after the existing ones; segments of the node that are not in the file stay.
    - New segments keep the file's colour and terminology; when the file has no specific terminology and
      a terminologies logic is given, the segment name is looked up there (terminology_for_name).
    The file is read before the scene is touched, so a bad file leaves the scene as it was.

    Returns a dict: node, segment_ids (one per file segment, in file order), added, replaced (IDs), created.
    """
    slicer = _slicer()

    if reference_volume_node is None or reference_volume_node.GetImageData() is None:
        raise ValueError("the reference volume has no image data")
    private_scene, source_node = read_segmentation_file(path)
    source = source_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if source.GetNumberOfSegments() and _source_representation_name(source) != labelmap_name:
        raise ValueError(f"'{path}' does not hold binary labelmaps")
    if segmentation_node is not None:
        target = segmentation_node.GetSegmentation()
        if target.GetNumberOfSegments() and _source_representation_name(target) != labelmap_name:
            raise ValueError(f"segmentation '{segmentation_node.GetName()}' is not based on binary labelmaps; "
                             "choose another output segmentation or create a new one")

    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{reference_volume_node.GetName()} segmentation")
    target = segmentation_node.GetSegmentation()
    if target.GetNumberOfSegments() == 0:
        segmentation_node.SetSourceRepresentationToBinaryLabelmap()

    was_modifying = segmentation_node.StartModify()
    segment_ids, added, replaced = [], [], []
    try:
        for index in range(source.GetNumberOfSegments()):
            source_id = source.GetNthSegmentID(index)
            segment = _copy_segment(source, source_id, labelmap_name)
            segment_name = segment.GetName()
            existing_id = target.GetSegmentIdBySegmentName(segment_name) if replace_existing else ""
            if existing_id:
                _replace_voxels(segmentation_node, existing_id, segment, labelmap_name)
                segment_ids.append(existing_id)
                replaced.append(existing_id)
            else:
                if not has_specific_terminology(segment):
                    found = terminology_for_name(terminologies_logic, segment_name)
                    if found:
                        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), found[0])
                        if found[1] is not None:
                            segment.SetColor(*found[1])
                new_id = target.GenerateUniqueSegmentID(source_id or segment_name)
                target.AddSegment(segment, new_id)
                segment_ids.append(new_id)
                added.append(new_id)

        # The input volume defines the grid: editing, display and export all use it.
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                             reference_volume_node.GetID())
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    finally:
        segmentation_node.EndModify(was_modifying)
    segmentation_node.CreateDefaultDisplayNodes()
    if created:
        _place_beside(scene, segmentation_node, reference_volume_node)
    del private_scene
    return {"node": segmentation_node, "segment_ids": segment_ids, "added": added, "replaced": replaced,
            "created": created}


def _replace_voxels(segmentation_node, segment_id, segment, labelmap_name):
    """The voxels of `segment` (a copy from a file) become those of the node's segment `segment_id`, in
    place: the segment keeps its ID, place, name, colour, terminology and the display node's per-segment
    visibility and opacity (keyed by ID), and the Segment Editor keeps it selected - removing and adding
    it again would reset these. Its own layer first, so that the segments it shared one with stay; then
    MODE_REPLACE makes the given image its labelmap (vtkSegmentationModifier.cxx:315-358, v5.10.0)."""
    slicer = _slicer()
    from vtk.util import numpy_support

    segmentation_node.GetSegmentation().SeparateSegmentLabelmap(segment_id)
    image = slicer.vtkOrientedImageData()
    image.DeepCopy(segment.GetRepresentation(labelmap_name))
    scalars = image.GetPointData().GetScalars()
    if scalars is not None:     # 0 / 1: the file's label value is not the segment's
        mask = (numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue()).astype(np.uint8)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask, deep=True, array_type=3))
    else:
        image.SetExtent(0, -1, 0, -1, 0, -1)
        image.AllocateScalars(3, 1)
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, 0):
        raise ValueError(f"the voxels of segment '{segment.GetName()}' could not be replaced")


def _copy_segment(segmentation, segment_id, labelmap_name):
    """A standalone copy of one segment: its metadata and a binary labelmap holding only its own voxels."""
    slicer = _slicer()

    # Give the segment its own layer first, so the copy carries no voxels of segments that shared it.
    segmentation.SeparateSegmentLabelmap(segment_id)
    source = segmentation.GetSegment(segment_id)
    segment = slicer.vtkSegment()
    segment.DeepCopyMetadata(source)  # name, colour, tags, label value
    # (vtkSegment.DeepCopy would build the image through the object factory, which slicer-core lacks)
    image = slicer.vtkOrientedImageData()
    labelmap = source.GetRepresentation(labelmap_name)
    if labelmap is not None:
        image.DeepCopy(labelmap)
    segment.AddRepresentation(labelmap_name, image)
    return segment


def _place_beside(scene, node, reference_node):
    """Put `node` in the same subject hierarchy folder/study as `reference_node`."""
    slicer = _slicer()

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    reference_item = sh.GetItemByDataNode(reference_node)
    item = sh.GetItemByDataNode(node)
    if reference_item and item:
        sh.SetItemParent(item, sh.GetItemParent(reference_item))


def export_segments_to_labelmap(scene, segmentation_node, reference_volume_node, labelmap_node=None,
                                segment_ids=None, name=None):
    """Export segments to a labelmap volume on the reference volume's exact grid (Slicer's own logic).

    Label values follow the segment order (1, 2, ...). Without labelmap_node, the node made by an earlier
    export of this segmentation is reused (node reference LABELMAP_REFERENCE_ROLE), else one is created.
    """
    slicer = _slicer()
    import vtk

    if reference_volume_node is None:
        raise ValueError("a reference volume is needed to export on its grid")
    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not segment_ids:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)

    if labelmap_node is None:
        labelmap_node = segmentation_node.GetNodeReference(LABELMAP_REFERENCE_ROLE)
    created = labelmap_node is None
    if created:
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                                name or f"{segmentation_node.GetName()} labelmap")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap_node, reference_volume_node)
    if not ok:
        if created:
            scene.RemoveNode(labelmap_node)
        raise ValueError(f"exporting '{segmentation_node.GetName()}' to a labelmap failed")
    segmentation_node.SetNodeReferenceID(LABELMAP_REFERENCE_ROLE, labelmap_node.GetID())
    return labelmap_node


def load_uncertainty_volume(scene, path, segmentation_node, name=None):
    """Load an uncertainty map as a scalar volume shown with a heat colour map.

    Reuses the volume loaded by an earlier run for the same segmentation (node reference
    UNCERTAINTY_REFERENCE_ROLE) instead of adding another node.
    """
    node = segmentation_node.GetNodeReference(UNCERTAINTY_REFERENCE_ROLE)
    node = read_volume_into_node(scene, path, name or f"{segmentation_node.GetName()} uncertainty", node)
    node.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
    display = node.GetDisplayNode()
    if display is not None:
        # A perceptual heat map where Slicer has it, else the built-in 'Iron' table.
        for color_id in ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron"):
            if scene.GetNodeByID(color_id) is not None:
                display.SetAndObserveColorNodeID(color_id)
                break
        display.AutoWindowLevelOn()
    segmentation_node.SetNodeReferenceID(UNCERTAINTY_REFERENCE_ROLE, node.GetID())
    return node
