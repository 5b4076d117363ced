"""The service without HTTP: one Session (models loaded once, caches), the uploaded volumes, the job queue."""

import os
import sys
import tempfile
import time

from .. import __version__
from ..errors import MedCLIPSAMError
from .jobs import JobQueue
from .model_jobs import ModelCache
from .refusals import Conflict, NotFound  # noqa: F401 (api.py imports them from here)
from .training_jobs import Trainings
from .uploads import read_upload
from .validation import Invalid


def memory_info():
    """This process's resident memory now and at its peak (bytes), and the GPU's, when there is one."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["rss_bytes"] = int(fields["VmRSS"].split()[0]) * 1024
        out["peak_rss_bytes"] = int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):   # not Linux: the peak only
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = int(peak if sys.platform == "darwin" else peak * 1024)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["gpu_allocated_bytes"] = int(torch.cuda.memory_allocated())
        out["gpu_total_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    return out


def changed_slices(axis, planes, view):
    """The reply of refine / undo: the numpy axis of the (z, y, x) mask the slices are taken along and each
    changed slice as np.take(mask, index, axis) packed (base64 of np.packbits, C order, with its shape)."""
    from ..pipeline.session_refine import pack_bits

    return {"axis": int(axis), "view": view,
            "slices": [{"index": int(k), "shape": list(p.shape), "bits": pack_bits(p)} for k, p in sorted(planes.items())]}


def service_folder():
    """The service's private folder (mode 0700: uploads and results), named by its owner's pid in the
    project's scratch root; the folders of services that died without cleaning up (SIGKILL) go first."""
    from ..runtime import owned_prefix, remove_stale, scratch_root

    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root, SERVICE_PREFIX)
    return tempfile.mkdtemp(prefix=owned_prefix(SERVICE_PREFIX), dir=root)


SERVICE_PREFIX = "serve-"


class Service:
    def __init__(self, session, max_upload_bytes, max_queue=16, encode_ahead=True):
        self.session = session
        self.encode_ahead = bool(encode_ahead)   # idle time: SAM2-encode the rest of the last volume
        self.max_upload_bytes = int(max_upload_bytes)
        self.jobs = JobQueue(max_waiting=max_queue)
        self.workdir = service_folder()
        self.started = time.time()
        self.trainings = Trainings(self)       # weak-supervision trainings, in child processes
        self.trained_cache = ModelCache()      # the last trained model used for a prediction

    def info(self):
        return {"version": __version__, "device": str(self.session.device),
                "models": {"clip": self.session.clip_name, "sam": self.session.sam_name,
                           "random_weights": self.session.random},
                "memory": memory_info(), "cache": self.session.info()["cache"],
                "sam2_cache_dtype": self.session.info()["sam2_storage"],
                "volumes": len(self.session.volume_ids()), "queue": self.jobs.queue_info(),
                "training": self.trainings.info(),
                "max_upload_bytes": self.max_upload_bytes,
                "max_queue": self.jobs.max_waiting, "uptime_s": round(time.time() - self.started, 1)}

    def add_volume(self, upload):
        """A volume from the upload saved at path `upload` (its voxels may take max_upload_bytes)."""
        image = read_upload(upload, self.workdir, self.max_upload_bytes)
        volume_id = self.session.add_volume(image)
        return {"volume_id": volume_id, "size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                "origin": list(image.GetOrigin()), "direction": list(image.GetDirection()),
                "pixel_type": image.GetPixelIDTypeAsString()}

    def check_volume(self, volume_id):
        if volume_id not in self.session.volume_ids():
            raise NotFound(f"unknown volume '{volume_id}': it was never uploaded here or was forgotten; upload it again")

    def submit(self, volume_id, request, report=False):
        """Queue a job. report: also make the per-prompt report (`segment --report-output`); as on the
        command line it needs the uncertainty (its mean inside each mask), which is then computed but
        offered for download only when the request asked for it."""
        try:
            request.validate()                     # a bad preset, override, window or prompt: 422 now, not a failed job
        except MedCLIPSAMError as exc:
            raise Invalid(str(exc)) from None
        self.check_volume(volume_id)
        offer_uncertainty = bool(request.uncertainty)
        if report:
            request.uncertainty = True
        return self.jobs.submit(volume_id, request, lambda job: self._run(job, report, offer_uncertainty))

    def job(self, job_id):
        try:
            return self.jobs.get(job_id)
        except KeyError:
            raise NotFound(f"unknown job '{job_id}'") from None

    def _run(self, job, report=False, offer_uncertainty=None):
        from ..io import image_from_array, write_segmentation, write_volume

        prompts, settings, options = job.request.validate()
        result = self.session.segment(job.volume_id, prompts, settings, options, job.progress)
        if self.encode_ahead:
            self._leave_encode_ahead(job.volume_id, settings, options, result.report)
        image = self.session.volume(job.volume_id)
        job.progress.stage("write", 1, "writing the segmentation")
        seg = self._bytes_of(lambda path: write_segmentation(path, result.segments, image), ".seg.nrrd")
        uncertainty = None
        if options.uncertainty and result.uncertainty is not None and offer_uncertainty is not False:
            unc_image = image_from_array(result.uncertainty, image)
            uncertainty = self._bytes_of(lambda path: write_volume(path, unc_image), ".nrrd")
        saliency, document = self._evidence(result, image, settings, options.saliency, report)
        job.progress.advance(1)
        return {"result": seg, "uncertainty": uncertainty, "report": result.report, "saliency": saliency,
                "report_document": document}

    def _leave_encode_ahead(self, volume_id, settings, options, report):
        """Until the next request: encode the volume's other slices for SAM2, from the middle of the slices
        this request kept outwards (a next prompt or a click there then costs no encoding)."""
        kept = [k for entry in report for k in entry.get("kept_slices") or ()]
        near = (min(kept) + max(kept)) // 2 if kept else 0

        def work(should_stop):
            if volume_id in self.session.volume_ids():
                self.session.encode_ahead(volume_id, settings, options, near, should_stop)
        self.jobs.leave_idle_work(work)

    def _evidence(self, result, image, settings, saliency, report):
        """What `segment --saliency-output saliency.nrrd --report-output R.json` writes, as bytes:
        ([(file name, NRRD bytes) per prompt] or None, the report JSON or None). The report names the
        saliency files by these names and has no input or output path (the client has its own)."""
        import json

        from .. import evidence
        from ..io import image_from_array, write_volume

        names = files = None
        if saliency and result.saliency is not None:
            names = [os.path.basename(p) for p in
                     evidence.saliency_paths("saliency.nrrd", [r["prompt"] for r in result.report])]
            files = [(name, self._bytes_of(lambda path, v=volume: write_volume(path, image_from_array(v, image)),
                                           ".nrrd"))
                     for name, volume in zip(names, result.saliency)]
        document = None
        if report:
            models = {"clip": self.session.clip_name, "sam": self.session.sam_name if settings.sam == "sam" else None,
                      "random": self.session.random}
            text = json.dumps(evidence.report_document(result.report, models, names, runtime=result.runtime),
                              indent=1) + "\n"
            document = text.encode("utf-8")
        return files, document

    # -- refinement: clicks on a segment, the changed slices back ------------------------------------
    def refine(self, volume_id, body):
        points = body.pop("points", None) or []
        body["positive"] = [p["position"] for p in points if p["label"] == 1]
        body["negative"] = [p["position"] for p in points if p["label"] == 0]
        segment_id = body.pop("segment_id")
        result = self.session.refine(volume_id, segment_id, **body)
        reply = changed_slices(result.axis, result.changed, body.get("axis", "axial"))
        reply.update(segment_id=segment_id, clicked_slice=int(result.slice_index),
                     stops={("+" if k > 0 else "-"): v for k, v in result.stops.items()},
                     can_undo=result.segment.can_undo)
        return reply

    def undo(self, volume_id, segment_id):
        axis, planes = self.session.undo(volume_id, segment_id)
        segment = self.session.segments.get(volume_id, segment_id)
        reply = changed_slices(axis, planes, None)
        reply.update(segment_id=segment_id, can_undo=bool(segment and segment.can_undo))
        return reply

    def _bytes_of(self, write, suffix):
        fd, path = tempfile.mkstemp(dir=self.workdir, suffix=suffix)
        os.close(fd)
        try:
            write(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            if os.path.exists(path):
                os.remove(path)

    MISSING = {"uncertainty": "no uncertainty volume (ask for one with \"uncertainty\": true)",
               "report": "no report (ask for one with \"report\": true)",
               "saliency": "no saliency volumes (ask for them with \"saliency\": true)"}

    def result(self, job_id, kind="result", index=0):
        """A finished job's bytes: "result" (.seg.nrrd), "uncertainty", "report" (JSON) or "saliency"
        (the index-th prompt's volume)."""
        job = self.job(job_id)
        if job.state != "done":
            why = "was cancelled and has no result" if job.state in ("cancelled", "cancelling") else \
                f"is {job.state}" + (f": {job.error}" if job.error else "; ask again when it is done")
            raise Conflict(f"job '{job_id}' {why}")
        data = job.output.get("report_document" if kind == "report" else kind)
        if data is None:
            raise NotFound(f"job '{job_id}' has {self.MISSING[kind]}")
        if kind == "saliency":
            if not 0 <= index < len(data):
                raise NotFound(f"job '{job_id}' has {len(data)} saliency volume(s), one per prompt; "
                               f"there is no number {index}")
            data = data[index][1]
        return data

    def close(self):
        import shutil

        self.jobs.stop()          # cancels the running job and waits for it (it writes into workdir)
        self.trainings.stop()     # a training child's whole process group
        shutil.rmtree(self.workdir, ignore_errors=True)
