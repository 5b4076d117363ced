"""Refine a segment with clicks: Markups point lists (positive / negative) and an ROI box -> the service's
POST /volumes/{id}/refine -> only the changed slices written into the segment. Qt-free (slicer-core scene).

The segmentation service (`medclipsam serve`, MedCLIPSAMModuleLib/serviceclient.py) does the work on its
cached SAM2 encodings; this logic is its client in the scene:
- the input volume is uploaded once (again when its voxels change or the service forgot it);
- the segment is sent as it is now (packed bits) only when it differs from what the service last gave
  back, so edits made meanwhile in the Segment Editor are the starting mask, and the service keys the
  segment by (volume id, "<segmentation node id>:<segment id>");
- the segment is read on the volume's grid without adding a node (GenerateMergedLabelmapInReferenceGeometry);
  the reply's slices (np.take(mask, index, axis) of the (k, j, i) array) are written onto the segment's
  own grid and frame (oversampled by the Segment Editor or not, under linear parent transforms): only
  voxels whose centre lies in a changed slice change, the rest stays bit for bit, and the segment's name,
  colour and terminology and the other segments are left as they were; an undo of the last steps puts
  the segment's own voxels back exactly.
Threads: a request is prepared from the scene on the GUI thread (points, ROI, the segment's voxels, a
snapshot of the volume when it may have to be uploaded), sent on a worker thread by RefineRunner (network
only: start or reach the service, upload, refine), and written into the segment back on the GUI thread
(finish). refine() / undo() / newSegmentFromBox() do all three in the calling thread.
Points and ROI are read in world RAS (GetNthControlPointPositionWorld, GetRASBounds) and brought into the
volume's own frame when it sits under a transform. Loading this file imports no qt, numpy or vtk.
"""

from .i18n import tr as _

VIEW_NAMES = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}
UNDO_KEPT = 20      # refine steps whose own-grid changes are kept for an exact undo


class RefineError(Exception):
    """A refine request that could not be made; str() is one sentence for the user."""


def sentence(exc):
    """What the panel shows of an error: its first line (its type's name when it has no text)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _digest(array):
    import hashlib

    return hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest() + str(array.shape)


class RefineLogic:
    """service: an object with ensure() -> ServiceClient (LocalService / RemoteService of service.py)."""

    def __init__(self, scene, service, temporaryDirectory=None, knownVolume=None):
        self.scene = scene
        self.service = service
        self.temporaryDirectory = temporaryDirectory
        # knownVolume(nodeId, stamp, client) -> the id of an upload made by someone else (Apply's service
        # backend) that is still valid, or None: a click then reuses that segmentation's encodings
        self.knownVolume = knownVolume
        self._uploads = {}      # volume node id -> (volume id, stamp(): voxels MTime + geometry)
        self._synced = {}       # (volume id, key) -> digest of the segment as the service holds it
        self._history = {}      # key -> the last refines' own-grid changes (writeSlices), for exact undo
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

    # -- the segment's voxels on the volume's grid, written back on the segment's own grid -------------
    @staticmethod
    def _segmentationToVolume(segmentationNode, volumeNode):
        """4x4 (numpy): the segmentation's own RAS frame -> the volume's own RAS frame (parent transforms);
        RefineError when a non-linear transform lies between them (slices cannot be mapped voxel to voxel)."""
        import numpy as np
        import slicer
        import vtk

        matrix = vtk.vtkMatrix4x4()
        # Libs/MRML/Core/vtkMRMLTransformNode.h:176 (v5.10.0): 0 when the transform is not linear
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
                segmentationNode.GetParentTransformNode(), volumeNode.GetParentTransformNode(), matrix):
            raise RefineError(_("The segmentation is under a non-linear transform relative to the input volume; "
                                "harden the transform before refining."))
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    def segmentArray(self, segmentationNode, segmentId, volumeNode):
        """The segment as a (k, j, i) uint8 array on the volume's grid (Slicer's own resampling).

        GenerateMergedLabelmapInReferenceGeometry is what ExportSegmentsToLabelmapNode runs before it puts
        the image into a labelmap node (vtkSlicerSegmentationsModuleLogic.cxx:1150-1200, v5.10.0); called
        directly, no node is added: the export would also add a "<segmentation>_ColorTable" node on every
        call (.cxx:1235-1244). It maps the segment through both parent transforms (.cxx:1008-1035)."""
        import numpy as np
        import slicer
        import vtk
        from vtk.util import numpy_support

        self._segmentationToVolume(segmentationNode, volumeNode)    # refused before anything is sent
        segmentationNode.GetSegmentation().CreateRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        image = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
            segmentationNode, volumeNode, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, image)
        dims = volumeNode.GetImageData().GetDimensions()
        out = np.zeros(dims[::-1], np.uint8)
        e = image.GetExtent()
        if image.GetPointData().GetScalars() is None or e[0] > e[1] or e[2] > e[3] or e[4] > e[5]:
            return out
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
        lo = [max(e[2 * a], 0) for a in range(3)]
        hi = [min(e[2 * a + 1], dims[a] - 1) for a in range(3)]
        if all(lo[a] <= hi[a] for a in range(3)):
            out[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = array[
                lo[2] - e[4]:hi[2] - e[4] + 1, lo[1] - e[2]:hi[1] - e[2] + 1, lo[0] - e[0]:hi[0] - e[0] + 1] != 0
        return out

    def _ownGrid(self, segmentationNode, segmentId, volumeNode):
        """(the segment's own labelmap (a copy, in the segmentation's frame), its lattice's IJK -> own RAS
        matrix): the segment's grid when it has voxels, else the segmentation's reference geometry (the
        Segment Editor's grid, oversampled or not), else the volume's."""
        import numpy as np
        import slicer
        import vtk

        image = slicer.vtkOrientedImageData()
        # applyParentTransform=False: the segmentation's own frame (vtkSlicerSegmentationsModuleLogic.h:395-405)
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, image, False)
        e = image.GetExtent()
        lattice = image
        if e[0] > e[1] or e[2] > e[3] or e[4] > e[5]:
            lattice = slicer.vtkOrientedImageData()
            text = segmentationNode.GetSegmentation().GetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
            if not text or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, lattice, False):
                matrix = np.linalg.inv(self._segmentationToVolume(segmentationNode, volumeNode)) @ \
                    self._mrml().ijk_to_ras_from_node(volumeNode)
                return image, matrix
        matrix = vtk.vtkMatrix4x4()
        lattice.GetImageToWorldMatrix(matrix)
        return image, np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    def writeSlices(self, segmentationNode, segmentId, volumeNode, array, numpyAxis, indices):
        """Write the slices `indices` of `array` (the segment on the volume's (k, j, i) grid) into the segment,
        on the segment's own grid and in the segmentation's own frame: a voxel of that grid changes only
        when its centre lies in one of those slices of the volume (it takes the value of the volume voxel it
        lies in), every other voxel stays bit for bit, whatever the segmentation's geometry (oversampled
        by the Segment Editor) or the parent transforms of the volume and the segmentation (linear).

        The image is made here in Python, so nothing is left to unregister: CreateOrientedImageDataFromVolumeNode
        would return a new reference Python must UnRegister (vtkSlicerSegmentationsModuleLogic.h:107,
        v5.10.0; SegmentEditorMaskVolumeEffect.py:364 does) and would copy the volume's voxels. MODE_REPLACE
        makes the given image the segment's labelmap (vtkSegmentationModifier.cxx:315-358, CopyImage at 354:
        vtkOrientedImageDataResample.cxx:1205-1221), so it holds the segment's own voxels around the changed
        ones. Nothing is written when no slice changed.
        Returns the voxels it changed (positions, values before and after), for restore()."""
        import numpy as np

        if not indices:
            return None
        toVolume = self._segmentationToVolume(segmentationNode, volumeNode)
        segmentationNode.GetSegmentation().SeparateSegmentLabelmap(segmentId)   # other segments untouched
        current, ownIjkToRas = self._ownGrid(segmentationNode, segmentId, volumeNode)
        toVolumeIjk = np.linalg.inv(self._mrml().ijk_to_ras_from_node(volumeNode)) @ toVolume @ ownIjkToRas
        dims = array.shape[::-1]                      # (i, j, k) of the volume
        along = 2 - int(numpyAxis)
        lo, hi = [-0.5] * 3, [d - 0.5 for d in dims]
        lo[along], hi[along] = min(indices) - 0.5, max(indices) + 0.5
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        own = (np.linalg.inv(toVolumeIjk) @ corners.T).T[:, :3]
        region = [(int(np.floor(own[:, a].min())), int(np.ceil(own[:, a].max()))) for a in range(3)]
        # the image written: the segment's own extent and the changed region, on its own lattice
        extent, out = self._ownVoxels(segmentationNode, segmentId, current, region)
        before = out.copy()
        changed = np.zeros(dims[along], bool)
        changed[list(indices)] = True
        jj, ii = np.meshgrid(np.arange(region[1][0], region[1][1] + 1), np.arange(region[0][0], region[0][1] + 1),
                             indexing="ij")
        for k in range(region[2][0], region[2][1] + 1):     # one plane at a time: bounded memory
            p = toVolumeIjk @ np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])
            v = np.floor(p[:3] + 0.5).astype(np.int64)     # the volume voxel each centre lies in
            inside = np.all((v >= 0) & (v < np.array(dims)[:, None]), axis=0)
            inside[inside] = changed[v[along, inside]]
            plane = out[k - extent[4], region[1][0] - extent[2]:region[1][1] - extent[2] + 1,
                        region[0][0] - extent[0]:region[0][1] - extent[0] + 1].reshape(-1)
            plane[inside] = array[v[2, inside], v[1, inside], v[0, inside]] != 0
            out[k - extent[4], region[1][0] - extent[2]:region[1][1] - extent[2] + 1,
                region[0][0] - extent[0]:region[0][1] - extent[0] + 1] = plane.reshape(jj.shape)
        self._writeOwn(segmentationNode, segmentId, extent, ownIjkToRas, out)
        where = np.nonzero(before != out)
        return {"lattice": ownIjkToRas, "positions": tuple(w + extent[4 - 2 * a] for a, w in enumerate(where)),
                "before": before[where], "after": out[where]}

    def _ownVoxels(self, segmentationNode, segmentId, current, region):
        """(extent, (k, j, i) uint8 array): the segment's own voxels (`current`, its labelmap) on an extent
        that also holds `region` ([(lo, hi)] per i, j, k of its lattice)."""
        import numpy as np
        from vtk.util import numpy_support

        e = current.GetExtent()
        hasOwn = e[0] <= e[1] and e[2] <= e[3] and e[4] <= e[5]
        extent = [region[a][s] if not hasOwn else (min if s == 0 else max)(region[a][s], e[2 * a + s])
                  for a in range(3) for s in (0, 1)]
        out = np.zeros(tuple(extent[2 * a + 1] - extent[2 * a] + 1 for a in (2, 1, 0)), np.uint8)
        if hasOwn and current.GetPointData().GetScalars() is not None:
            label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
            values = numpy_support.vtk_to_numpy(current.GetPointData().GetScalars()).reshape(
                e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
            out[e[4] - extent[4]:e[5] - extent[4] + 1, e[2] - extent[2]:e[3] - extent[2] + 1,
                e[0] - extent[0]:e[1] - extent[0] + 1] = values == label
        return extent, out

    @staticmethod
    def _writeOwn(segmentationNode, segmentId, extent, ownIjkToRas, out):
        import slicer
        import vtk
        from vtk.util import numpy_support

        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(ownIjkToRas[r, c]))
        image.SetGeometryFromImageToWorldMatrix(matrix)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(out.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, segmentationNode, segmentId, 0):    # MODE_REPLACE
            raise RefineError(_("The changed slices could not be written into the segment."))

    def restore(self, segmentationNode, segmentId, volumeNode, patch):
        """Undo a write exactly on the segment's own grid: the voxels `patch` (writeSlices' return) changed
        get their values back, when the segment still holds what was written there (no edit since) on the
        same grid; returns False (nothing done) otherwise. On a grid finer than the volume's, the service's
        undo alone would bring the slices back at the volume's resolution."""
        import numpy as np

        segmentationNode.GetSegmentation().SeparateSegmentLabelmap(segmentId)
        current, ownIjkToRas = self._ownGrid(segmentationNode, segmentId, volumeNode)
        if not np.allclose(ownIjkToRas, patch["lattice"], atol=1e-9):
            return False
        k, j, i = patch["positions"]
        if not len(k):
            return True
        region = [(int(i.min()), int(i.max())), (int(j.min()), int(j.max())), (int(k.min()), int(k.max()))]
        extent, out = self._ownVoxels(segmentationNode, segmentId, current, region)
        at = (k - extent[4], j - extent[2], i - extent[0])
        if not np.array_equal(out[at], patch["after"]):
            return False
        out[at] = patch["before"]
        self._writeOwn(segmentationNode, segmentId, extent, ownIjkToRas, out)
        return True

    # -- service (send() runs on any thread: network only, no scene access) ------------------------------
    def _client(self):
        return self.service.ensure()

    @staticmethod
    def stamp(volumeNode):
        from .servicebackend import ServiceBackend

        return ServiceBackend.stamp(volumeNode)

    def rememberUpload(self, volumeNode, volumeId):
        """Use a volume id uploaded by someone else (the service backend of Apply), so a click reuses the
        encodings that segmentation left in the service's cache instead of uploading a second copy."""
        self._uploads[volumeNode.GetID()] = (volumeId, self.stamp(volumeNode))

    def _snapshot(self, volumeNode):
        """The volume's voxels and geometry as a SimpleITK image (a copy: written to a file off the GUI thread)."""
        if volumeNode.GetImageData() is None:
            raise RefineError(_("The input volume has no voxels."))
        return self._mrml().sitk_image_from_volume_node(volumeNode)

    def _upload(self, client, image):
        import os
        import shutil
        import tempfile

        import SimpleITK as sitk

        folder = tempfile.mkdtemp(prefix="medclipsam-refine-", dir=self.temporaryDirectory)
        try:
            path = os.path.join(folder, "volume.nrrd")
            sitk.WriteImage(image, path)
            return client.upload(path)["volume_id"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _request(self, volumeNode, segmentationNode, segmentId, array, call, force=False):
        """A request on the GUI thread: the scene is read here, never in send()."""
        request = RefineRequest(volumeNode, segmentationNode, segmentId, array, call, self.stamp(volumeNode))
        held = self._uploads.get(request.nodeId)
        if held and held[1] == request.stamp and not force:
            request.volumeId = held[0]
        else:
            # the upload that may be needed: Apply's (knownVolume) is asked for in send(), with the client
            request.image, request.force = self._snapshot(volumeNode), force
        return request

    def volumeId(self, volumeNode, force=False):
        """The service's id of the volume, uploading it first when needed (synchronously)."""
        request = self._request(volumeNode, None, None, None, None, force=force)
        if request.volumeId is None:
            request.volumeId = self._resolve(self._client(), request)
            self._uploads[request.nodeId] = (request.volumeId, request.stamp)
        return request.volumeId

    def _resolve(self, client, request):
        if request.volumeId is not None:
            return request.volumeId
        if self.knownVolume is not None and not request.force:
            shared = self.knownVolume(request.nodeId, request.stamp, client)
            if shared:
                return shared
        return self._upload(client, request.image)

    def send(self, request):
        """The network part (worker thread): upload when needed, then the request; one upload again when the
        service forgot the volume. Sets request.reply, or request.needsUpload when the volume must be read
        from the scene first (withVolume() on the GUI thread, then send again)."""
        from .serviceclient import ServiceError

        client = self._client()
        for attempt in range(2):
            if request.volumeId is None and request.image is None:
                request.needsUpload = True
                return request
            request.volumeId = self._resolve(client, request)
            try:
                request.reply = request.call(client, request.volumeId)
                return request
            except ServiceError as exc:
                if attempt or exc.status != 404 or "volume" not in str(exc).lower():
                    raise RefineError(str(exc)) from None
            request.volumeId, request.force = None, True
        return request

    def withVolume(self, request):
        """GUI thread: the same request with the volume read from the scene, for an upload."""
        self._uploads.pop(request.nodeId, None)
        request.image, request.force, request.volumeId, request.needsUpload = (
            self._snapshot(request.volumeNode), True, None, False)
        return request

    def finish(self, request):
        """GUI thread: write a sent request's reply into the segment; returns the changed slice indices.
        The segment is read again here, so edits made while the request ran stay on the other slices."""
        if request.error is not None:
            raise request.error
        self._uploads[request.nodeId] = (request.volumeId, request.stamp)
        segmentation = request.segmentationNode
        if segmentation is None or segmentation.GetSegmentation().GetSegment(request.segmentId) is None:
            raise RefineError(_("The segment was removed while its correction was computed."))
        current = self.segmentArray(segmentation, request.segmentId, request.volumeNode)
        indices = self._apply(request.reply, request.array, current)
        # each refine's own-grid change is kept, so an undo puts back exactly what was there (finer grid
        # included) when the service undoes those same slices and the segment was not edited since
        history = self._history.setdefault(request.key, [])
        axis = int(request.reply["axis"])
        if request.undo:
            top = history[-1] if history else None
            if top is not None and top["indices"] == sorted(indices) and (
                    not indices or self.restore(segmentation, request.segmentId, request.volumeNode, top)):
                history.pop()
            else:       # not the step kept (edited since, or older than UNDO_KEPT): the service's slices
                history.clear()
                self.writeSlices(segmentation, request.segmentId, request.volumeNode, current, axis, indices)
        else:
            patch = self.writeSlices(segmentation, request.segmentId, request.volumeNode, current, axis, indices)
            history[:] = history[-(UNDO_KEPT - 1):] + [dict(patch or {}, indices=sorted(indices))]
        self._synced[(request.volumeId, request.key)] = _digest(request.array)
        self.lastReply = request.reply
        return indices

    def abandon(self, request):
        """GUI thread, after a failed request: a segment made for it (new segment from box) goes again."""
        if request.createdSegment and request.segmentationNode is not None:
            request.segmentationNode.GetSegmentation().RemoveSegment(request.segmentId)

    def run(self, request):
        """prepare -> send -> finish in the calling thread (scripts and tests; the panel uses RefineRunner)."""
        try:
            self.send(request)
            if request.needsUpload:
                self.send(self.withVolume(request))
            return self.finish(request)
        except Exception:
            self.abandon(request)
            raise

    @staticmethod
    def key(segmentationNode, segmentId):
        return f"{segmentationNode.GetID()}:{segmentId}"

    @staticmethod
    def _apply(reply, *arrays):
        """Put a refine / undo reply's slices into each array; returns their indices."""
        import base64

        import numpy as np

        axis = int(reply["axis"])
        indices = []
        for s in reply["slices"]:
            n = int(np.prod(s["shape"]))
            plane = np.unpackbits(np.frombuffer(base64.b64decode(s["bits"]), np.uint8), count=n).reshape(s["shape"])
            index = [slice(None)] * 3
            index[axis] = int(s["index"])
            for array in arrays:
                array[tuple(index)] = plane
            indices.append(int(s["index"]))
        return indices

    # -- the requests: prepare* on the GUI thread, then run() here or RefineRunner on a worker thread --------
    def prepareRefine(self, segmentationNode, segmentId, volumeNode, positiveNode=None, negativeNode=None,
                      roiNode=None, propagate=True, axis="axial", planeNormal=None, window=None, latestPoint=None):
        """A refine request from the points of two point lists and/or an ROI.

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
        synced = self._synced

        def call(client, volumeId):
            mask = None
            if synced.get((volumeId, key)) != _digest(array):
                mask = base64.b64encode(np.packbits(array.astype(bool).ravel()).tobytes()).decode("ascii")
            return client.refine(volumeId, key, positive=positive, negative=negative, box=box, frame="RAS",
                                 axis=axis, propagate=propagate, mask=mask, window=window, plane_normal=planeNormal)

        return self._request(volumeNode, segmentationNode, segmentId, array, call)

    def prepareUndo(self, segmentationNode, segmentId, volumeNode):
        """A request to undo the segment's last refine step (the service's copy)."""
        if segmentationNode is None or not segmentId or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise RefineError(_("Choose the segment to refine."))
        if volumeNode is None:
            raise RefineError(_("Choose the input volume the segment was made on."))
        array = self.segmentArray(segmentationNode, segmentId, volumeNode)
        key = self.key(segmentationNode, segmentId)
        request = self._request(volumeNode, segmentationNode, segmentId, array,
                                lambda client, volumeId: client.undo(volumeId, key))
        request.undo = True
        return request

    def prepareNewSegmentFromBox(self, segmentationNode, volumeNode, roiNode, name=None, propagate=True,
                                 axis="axial", planeNormal=None, window=None):
        """A request for a new segment (no text) from an ROI box, carried to the neighbouring slices when
        `propagate`. The (empty) segment is added now; abandon() removes it when the request fails."""
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
            request = self.prepareRefine(segmentationNode, segmentId, volumeNode, roiNode=roiNode,
                                         propagate=propagate, axis=axis, planeNormal=planeNormal, window=window)
        except Exception:
            segmentation.RemoveSegment(segmentId)
            raise
        request.createdSegment = True
        return request

    def refine(self, *args, **kwargs):
        """prepareRefine + run: refine now, in this thread; returns the changed slices."""
        return self.run(self.prepareRefine(*args, **kwargs))

    def undo(self, segmentationNode, segmentId, volumeNode):
        """Undo the segment's last refine step now; returns the restored slices."""
        return self.run(self.prepareUndo(segmentationNode, segmentId, volumeNode))

    def newSegmentFromBox(self, *args, **kwargs):
        """A new segment from an ROI box, now; returns its segment id (nothing is added when it fails)."""
        request = self.prepareNewSegmentFromBox(*args, **kwargs)
        self.run(request)
        return request.segmentId


class RefineRequest:
    """One refine / undo request: made from the scene on the GUI thread, sent on any thread (send() reads
    only what is here), written into the segment on the GUI thread (finish)."""

    def __init__(self, volumeNode, segmentationNode, segmentId, array, call, stamp):
        self.volumeNode, self.nodeId, self.stamp = volumeNode, volumeNode.GetID(), stamp
        self.segmentationNode, self.segmentId, self.array, self.call = segmentationNode, segmentId, array, call
        self.key = RefineLogic.key(segmentationNode, segmentId) if segmentationNode is not None else None
        self.volumeId = None          # the service's id of the volume, when known
        self.image = None             # the volume's snapshot, when it may have to be uploaded
        self.force = False            # upload even when Apply's upload is known
        self.createdSegment = False
        self.undo = False             # an undo request (finish restores the own-grid voxels it can)
        self.needsUpload = False
        self.reply = None
        self.error = None


class RefineRunner:
    """Sends one request at a time on a worker thread, so Slicer stays responsive while the service works;
    poll() (GUI thread, e.g. from a QTimer) returns the request once it is done, with .reply or .error."""

    def __init__(self, logic):
        self.logic = logic
        self._thread = None
        self._request = None

    @property
    def busy(self):
        return self._request is not None

    def start(self, request):
        import threading

        if self.busy:
            raise RuntimeError("a refine request is already running")
        request.error, self._request = None, request
        self._thread = threading.Thread(target=self._send, args=(request,), name="medclipsam-refine", daemon=True)
        self._thread.start()

    def _send(self, request):
        try:
            self.logic.send(request)
        except Exception as exc:        # handed to the GUI thread, which shows its sentence
            request.error = exc if isinstance(exc, RefineError) else RefineError(sentence(exc))

    def poll(self):
        if self._request is None or self._thread.is_alive():
            return None
        request, self._request = self._request, None
        return request

    def wait(self, timeout=None):
        """Block until the running request is done (tests, module cleanup)."""
        if self._thread is not None:
            self._thread.join(timeout)


class PlaceMode:
    """Place mode for the Refine section's markups nodes on Slicer's one interaction node, put back as it was.

    start(node, persistent, onEnded) makes `node` the active place node and enters Place mode with the
    persistence asked for, remembering the persistence found the first time (SetPlaceModePersistence is
    global to the interaction node: vtkMRMLInteractionNode.h:43, v5.10.0). Whatever ends it - a one-time
    placement done (Slicer returns to ViewTransform itself: vtkSlicerMarkupsWidget.cxx:1198), Escape, the
    mouse-mode toolbar, another module's place node (vtkMRMLSelectionNode.h:154), stop() - calls onEnded()
    once (the panel unchecks its button) and restores the persistence, unless someone changed it since.
    Observed: InteractionModeChangedEvent (vtkMRMLInteractionNode.cxx:105-118) and the selection node's
    ActivePlaceNodeIDChangedEvent. Qt-free (slicer-core scene)."""

    def __init__(self, interactionNode, selectionNode):
        self.interaction, self.selection = interactionNode, selectionNode
        self.nodeId = None
        self._onEnded = None
        self._saved = None          # (persistence found, persistence set) while active
        self._tags = []
        self._starting = False

    @property
    def active(self):
        return self._saved is not None

    def start(self, node, persistent, onEnded=None):
        interaction = self.interaction
        if not self.active:
            self._saved = (interaction.GetPlaceModePersistence(), None)
            self._tags = [(interaction, interaction.AddObserver(interaction.InteractionModeChangedEvent, self._check)),
                          (self.selection, self.selection.AddObserver(
                              self.selection.ActivePlaceNodeIDChangedEvent, self._check))]
        elif self._onEnded is not None and self.nodeId != node.GetID():
            previous, self._onEnded = self._onEnded, None
            previous()                       # another button takes over: the previous one unchecks
        wanted = 1 if persistent else 0
        self.nodeId, self._onEnded, self._saved = None, onEnded, (self._saved[0], wanted)
        self._starting = True                # the events of our own changes are not an end
        try:
            self.selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
            self.selection.SetActivePlaceNodeID(node.GetID())
            interaction.SetPlaceModePersistence(wanted)
            interaction.SetCurrentInteractionMode(interaction.Place)
        finally:
            self._starting = False
        self.nodeId = node.GetID()

    def stop(self):
        """Leave place mode if it is still ours (the panel's button unchecked, the module left)."""
        if not self.active:
            return
        if self.interaction.GetCurrentInteractionMode() == self.interaction.Place and \
                self.selection.GetActivePlaceNodeID() == self.nodeId:
            self.interaction.SetCurrentInteractionMode(self.interaction.ViewTransform)   # -> _check -> _end
        self._end()

    def _check(self, caller=None, event=None):
        if self.active and not self._starting and (
                self.interaction.GetCurrentInteractionMode() != self.interaction.Place or
                self.selection.GetActivePlaceNodeID() != self.nodeId):
            self._end()

    def _end(self):
        if not self.active:
            return
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []
        found, wanted = self._saved
        if self.interaction.GetPlaceModePersistence() == wanted:     # nobody changed it since
            self.interaction.SetPlaceModePersistence(found)
        onEnded, self._onEnded, self.nodeId, self._saved = self._onEnded, None, None, None
        if onEnded is not None:
            onEnded()
