"""Refine a segment with clicks: Markups point lists (positive / negative) and an ROI box -> the service's
POST /volumes/{id}/refine -> only the changed slices written into the segment. Qt-free (slicer-core scene).

The segmentation service (`medclipsam serve`, MedCLIPSAMModuleLib/service.py) does the work on its
cached SAM2 encodings; this logic is its client in the scene:
- the input volume is uploaded once (again when its voxels change or the service forgot it);
- the segment is sent as it is now (packed bits) only when it differs from what the service last gave
  back, so edits made meanwhile in the Segment Editor are the starting mask, and the service keys the
  segment by (volume id, "<segmentation node id>:<segment id>");
- the reply's slices (np.take(mask, index, axis) of the (k, j, i) array) replace those slices of the
  segment as read on the volume's grid, written back with vtkSlicerSegmentationsModuleLogic.
  SetBinaryLabelmapToSegment: the other slices come back bit for bit, and the segment's name, colour and
  terminology and the other segments are left as they were.
Points and ROI are read in world RAS (GetNthControlPointPositionWorld, GetRASBounds) and brought into the
volume's own frame when it sits under a transform. Loading this file imports no qt, numpy or vtk.
"""

from .i18n import tr as _

VIEW_NAMES = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


class RefineError(Exception):
    """A refine request that could not be made; str() is one sentence for the user."""


def _digest(array):
    import hashlib

    return hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest() + str(array.shape)


class RefineLogic:
    """service: an object with ensure() -> ServiceClient (LocalService / RemoteService of service.py)."""

    def __init__(self, scene, service, temporaryDirectory=None, knownVolume=None):
        self.scene = scene
        self.service = service
        self.temporaryDirectory = temporaryDirectory
        # knownVolume(volumeNode, client) -> the id of an upload made by someone else (Apply's service
        # backend) that is still valid, or None: a click then reuses that segmentation's encodings
        self.knownVolume = knownVolume
        self._uploads = {}      # volume node id -> (volume id, image data MTime)
        self._synced = {}       # (volume id, key) -> digest of the segment as the service holds it
        self.lastReply = None

    # -- geometry (numpy, MedCLIPSAMLib's own rules) -------------------------------------------------
    @staticmethod
    def _mrml():
        from .paths import mrml

        return mrml()

    def slicingAxis(self, volumeNode, axis="axial"):
        """The numpy axis of the volume's (k, j, i) array that `axis` slices step along (io.slicing_axis)."""
        import numpy as np

        from MedCLIPSAMLib.io.geometry import VIEW_ROWS, patient_axes

        m = self._mrml().ijk_to_ras_from_node(volumeNode)[:3, :3]
        lps = np.diag([-1.0, -1.0, 1.0]) @ (m / np.linalg.norm(m, axis=0))
        return 2 - patient_axes(lps)[VIEW_ROWS[axis]]

    def _toLocal(self, volumeNode, points):
        """World RAS points -> the volume's own RAS frame (its parent transform undone)."""
        import numpy as np

        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is None or not len(points):
            return [list(map(float, p)) for p in points]
        import slicer
        import vtk

        worldToLocal = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, transformNode, worldToLocal)
        return [list(worldToLocal.TransformPoint(*map(float, p))) for p in np.asarray(points, float)]

    def _sliceOf(self, volumeNode, axis, rasPoints):
        import numpy as np

        ijkToRas = self._mrml().ijk_to_ras_from_node(volumeNode)
        ijk = np.linalg.solve(ijkToRas, np.c_[np.asarray(rasPoints, float), np.ones(len(rasPoints))].T).T
        return np.floor(ijk[:, 2 - self.slicingAxis(volumeNode, axis)] + 0.5).astype(int)

    @staticmethod
    def controlPoints(markupsNode):
        """World RAS positions of a markups node's defined control points (placement order)."""
        if markupsNode is None:
            return []
        out = []
        for i in range(markupsNode.GetNumberOfControlPoints()):
            if markupsNode.GetNthControlPointPositionStatus(i) != markupsNode.PositionDefined:
                continue
            p = [0.0, 0.0, 0.0]
            markupsNode.GetNthControlPointPositionWorld(i, p)
            out.append(p)
        return out

    def boxCorners(self, volumeNode, roiNode, axis="axial"):
        """Two opposite corners (volume RAS) of an ROI's extent on the slice through the ROI's centre."""
        import numpy as np

        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        corners = [[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
        center = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        local = np.asarray(self._toLocal(volumeNode, corners + [center]), float)
        ijkToRas = self._mrml().ijk_to_ras_from_node(volumeNode)
        ijk = np.linalg.solve(ijkToRas, np.c_[local, np.ones(len(local))].T).T[:, :3]
        along = 2 - self.slicingAxis(volumeNode, axis)
        lo, hi = ijk[:-1].min(axis=0), ijk[:-1].max(axis=0)
        lo[along] = hi[along] = np.floor(ijk[-1, along] + 0.5)
        return [list((ijkToRas @ np.r_[c, 1.0])[:3]) for c in (lo, hi)]

    # -- the segment's voxels on the volume's grid ---------------------------------------------------
    def segmentArray(self, segmentationNode, segmentId, volumeNode):
        """The segment as a (k, j, i) uint8 array on the volume's grid (Slicer's own export)."""
        import slicer
        import vtk
        from vtk.util import numpy_support

        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__medclipsam_refine__")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, volumeNode):
                raise RefineError(_("The segment could not be read on the volume's grid."))
            image = labelmap.GetImageData()
            dims = image.GetDimensions()
            array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
            return (array != 0).astype("uint8")
        finally:
            display = labelmap.GetDisplayNode()
            if display is not None:
                self.scene.RemoveNode(display)
            self.scene.RemoveNode(labelmap)

    def writeSlices(self, segmentationNode, segmentId, volumeNode, array, numpyAxis, indices):
        """Write `array` (the segment read by segmentArray with the slices `indices` replaced) into the segment.

        SetBinaryLabelmapToSegment in MODE_REPLACE empties the segment outside the extent it is given
        (vtkSegmentationModifier::AppendLabelmapToSegment), so the whole array goes in: every other slice
        holds the segment's own voxels, read on the same grid, and comes back bit for bit (checked by
        Testing/Python/test_slicer_refine.py). Nothing is written when no slice changed."""
        import slicer
        from vtk.util import numpy_support

        if not indices:
            return
        segmentationNode.GetSegmentation().SeparateSegmentLabelmap(segmentId)   # other segments untouched
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volumeNode)
        image.AllocateScalars(3, 1)     # VTK_UNSIGNED_CHAR
        scalars = numpy_support.numpy_to_vtk(array.astype("uint8").ravel(), deep=True, array_type=3)
        image.GetPointData().SetScalars(scalars)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, segmentationNode, segmentId, 0):    # MODE_REPLACE
            raise RefineError(_("The changed slices could not be written into the segment."))

    # -- service ---------------------------------------------------------------------------------------
    def _client(self):
        return self.service.ensure()

    def rememberUpload(self, volumeNode, volumeId):
        """Use a volume id uploaded by someone else (the service backend of Apply), so a click reuses the
        encodings that segmentation left in the service's cache instead of uploading a second copy."""
        image = volumeNode.GetImageData()
        self._uploads[volumeNode.GetID()] = (volumeId, image.GetMTime() if image is not None else None)

    def volumeId(self, volumeNode, force=False):
        """The service's id of the volume, uploading it first when needed."""
        import os
        import tempfile

        client = self._client()
        image = volumeNode.GetImageData()
        if image is None:
            raise RefineError(_("The input volume has no voxels."))
        stamp = image.GetMTime()
        held = self._uploads.get(volumeNode.GetID())
        if held and held[1] == stamp and not force:
            return held[0]
        shared = self.knownVolume(volumeNode, client) if self.knownVolume is not None and not force else None
        if shared:
            self._uploads[volumeNode.GetID()] = (shared, stamp)
            return shared
        folder = tempfile.mkdtemp(prefix="medclipsam-refine-", dir=self.temporaryDirectory)
        path = os.path.join(folder, "volume.nrrd")
        try:
            self._mrml().write_volume_node(volumeNode, path)
            volumeId = client.upload(path)["volume_id"]
        finally:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        self._uploads[volumeNode.GetID()] = (volumeId, stamp)
        return volumeId

    def _call(self, volumeNode, request):
        """request(client, volume id); uploads again once when the service forgot the volume."""
        from .service import ServiceError

        volumeId = self.volumeId(volumeNode)
        try:
            return volumeId, request(self._client(), volumeId)
        except ServiceError as exc:
            if exc.status != 404 or "volume" not in str(exc).lower():
                raise RefineError(str(exc)) from None
        volumeId = self.volumeId(volumeNode, force=True)
        try:
            return volumeId, request(self._client(), volumeId)
        except ServiceError as exc:
            raise RefineError(str(exc)) from None

    @staticmethod
    def key(segmentationNode, segmentId):
        return f"{segmentationNode.GetID()}:{segmentId}"

    def _apply(self, reply, segmentationNode, segmentId, volumeNode, array, volumeId, key):
        """Write a refine / undo reply into the segment; returns the changed slice indices."""
        import base64

        import numpy as np

        axis = int(reply["axis"])
        indices = []
        for s in reply["slices"]:
            n = int(np.prod(s["shape"]))
            plane = np.unpackbits(np.frombuffer(base64.b64decode(s["bits"]), np.uint8), count=n).reshape(s["shape"])
            index = [slice(None)] * 3
            index[axis] = int(s["index"])
            array[tuple(index)] = plane
            indices.append(int(s["index"]))
        self.writeSlices(segmentationNode, segmentId, volumeNode, array, axis, indices)
        self._synced[(volumeId, key)] = _digest(array)
        self.lastReply = reply
        return indices

    # -- the requests ----------------------------------------------------------------------------------
    def refine(self, segmentationNode, segmentId, volumeNode, positiveNode=None, negativeNode=None, roiNode=None,
               propagate=True, axis="axial", planeNormal=None, window=None, latestPoint=None):
        """Refine a segment from the points of two point lists and/or an ROI; returns the changed slices.

        The request uses the points on one slice: the slice of `latestPoint` (a world RAS position, e.g.
        the one just placed), else of the last point of the positive list, else of the negative one.
        Points on other slices stay in their lists (they were applied when they were placed)."""
        import base64

        import numpy as np

        if segmentationNode is None or not segmentId or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise RefineError(_("Choose the segment to refine."))
        if volumeNode is None:
            raise RefineError(_("Choose the input volume the segment was made on."))
        positive = self._toLocal(volumeNode, self.controlPoints(positiveNode))
        negative = self._toLocal(volumeNode, self.controlPoints(negativeNode))
        box = self.boxCorners(volumeNode, roiNode, axis) if roiNode is not None else None
        if not positive and not negative and box is None:
            raise RefineError(_("Place a positive or negative point or a box on the slice to correct."))
        points = positive + negative
        if points:
            last = self._toLocal(volumeNode, [latestPoint])[0] if latestPoint is not None else (positive or negative)[-1]
            dims = volumeNode.GetImageData().GetDimensions()
            k = int(self._sliceOf(volumeNode, axis, [last])[0])
            along = 2 - self.slicingAxis(volumeNode, axis)
            if 0 <= k < dims[along]:   # outside the volume: only that point goes, and the service says why
                keep = self._sliceOf(volumeNode, axis, points) == k
                count = len(positive)
                positive = [p for p, ok in zip(positive, keep[:count]) if ok]
                negative = [p for p, ok in zip(negative, keep[count:]) if ok]
                if box is not None and int(self._sliceOf(volumeNode, axis, box[:1])[0]) != k:
                    box = None
            else:
                positive, negative, box = [last], [], None
        array = self.segmentArray(segmentationNode, segmentId, volumeNode)
        key = self.key(segmentationNode, segmentId)

        def request(client, volumeId):
            mask = None
            if self._synced.get((volumeId, key)) != _digest(array):
                mask = base64.b64encode(np.packbits(array.astype(bool).ravel()).tobytes()).decode("ascii")
            return client.refine(volumeId, key, positive=positive, negative=negative, box=box, frame="RAS",
                                 axis=axis, propagate=propagate, mask=mask, window=window, plane_normal=planeNormal)

        volumeId, reply = self._call(volumeNode, request)
        return self._apply(reply, segmentationNode, segmentId, volumeNode, array, volumeId, key)

    def undo(self, segmentationNode, segmentId, volumeNode):
        """Undo the segment's last refine step (the service's copy); returns the restored slices."""
        if segmentationNode is None or not segmentId:
            raise RefineError(_("Choose the segment to refine."))
        array = self.segmentArray(segmentationNode, segmentId, volumeNode)
        key = self.key(segmentationNode, segmentId)
        volumeId, reply = self._call(volumeNode, lambda client, volumeId: client.undo(volumeId, key))
        return self._apply(reply, segmentationNode, segmentId, volumeNode, array, volumeId, key)

    def newSegmentFromBox(self, segmentationNode, volumeNode, roiNode, name=None, propagate=True, axis="axial",
                          planeNormal=None, window=None):
        """A new segment (no text) from an ROI box, carried to the neighbouring slices when `propagate`.
        Returns its segment id; nothing is added when the request fails."""
        if roiNode is None:
            raise RefineError(_("Place a box (ROI) around the object first."))
        if volumeNode is None or segmentationNode is None:
            raise RefineError(_("Choose the input volume and the output segmentation."))
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            segmentationNode.SetSourceRepresentationToBinaryLabelmap()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentation.AddEmptySegment("", name or _("Boxed object"))
        try:
            self.refine(segmentationNode, segmentId, volumeNode, roiNode=roiNode, propagate=propagate, axis=axis,
                        planeNormal=planeNormal, window=window)
        except Exception:
            segmentation.RemoveSegment(segmentId)
            raise
        return segmentId
