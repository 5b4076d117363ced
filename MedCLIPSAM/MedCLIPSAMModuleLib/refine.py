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
Threads: a request is prepared from the scene on the GUI thread (points, ROI, the segment's voxels, a
snapshot of the volume when it may have to be uploaded), sent on a worker thread by RefineRunner (network
only: start or reach the service, upload, refine), and written into the segment back on the GUI thread
(finish). refine() / undo() / newSegmentFromBox() do all three in the calling thread.
Points and ROI are read in world RAS (GetNthControlPointPositionWorld, GetRASBounds) and brought into the
volume's own frame when it sits under a transform. Loading this file imports no qt, numpy or vtk.
"""

from .i18n import tr as _

VIEW_NAMES = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


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
        from .service import ServiceError

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
        self.writeSlices(segmentation, request.segmentId, request.volumeNode, current, int(request.reply["axis"]),
                         indices)
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
        return self._request(volumeNode, segmentationNode, segmentId, array,
                             lambda client, volumeId: client.undo(volumeId, key))

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
