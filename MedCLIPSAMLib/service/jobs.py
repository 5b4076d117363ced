"""Segmentation jobs: one runs at a time on one worker thread (the device and models are shared), the
others wait in order. A job reports its stage and progress, can be cancelled (then it keeps no result),
and a bounded number of finished jobs are kept for their results.

Idle work: a finished job may leave work for the time until the next request (the service encodes the
rest of the volume's slices for SAM2, Service.encode_ahead). It runs on the same worker thread after the
job is already reported finished, and is handed `should_stop`, true as soon as a job is waiting or the
service stops: it must return within one small step of that."""

import itertools
import threading
import time
from collections import OrderedDict

from ..errors import Cancelled, MedCLIPSAMError
from ..progress import ProgressReporter
from ..runtime import log

KEEP_FINISHED = 32     # finished jobs (and their result bytes) kept for clients to fetch
FINAL = ("done", "failed", "cancelled")
STOP_WAIT = 60         # seconds a stopping service waits for its cancelled job to reach its next step


class QueueFull(MedCLIPSAMError):
    """Too many jobs waiting (HTTP 429)."""


class JobProgress(ProgressReporter):
    """A silent reporter that remembers the latest message for status requests."""

    def __init__(self):
        super().__init__("none")
        self.message = ""

    def stage(self, name, total, message=""):
        self.message = message or name
        super().stage(name, total, message)

    def advance(self, n=1, message=""):
        if message:
            self.message = message
        super().advance(n, message)


class Job:
    def __init__(self, job_id, volume_id, request, work):
        self.id, self.volume_id, self.request = job_id, volume_id, request
        self.work = work                  # work(job) -> {"result": bytes, "uncertainty": bytes or None, ...}
        self.state = "queued"
        self.progress = JobProgress()
        self.error = None
        self.output = None
        self.created = time.time()
        self.seconds = None

    def status(self):
        p = self.progress
        out = {"job_id": self.id, "volume_id": self.volume_id, "state": self.state, "stage": p.stage_name,
               "done": p.done, "total": p.total, "message": p.message}
        if self.error:
            out["error"] = self.error
        if self.output is not None:
            out["report"] = self.output.get("report")
            out["seconds"] = self.seconds
            out["uncertainty"] = self.output.get("uncertainty") is not None
            out["saliency"] = [name for name, _ in self.output.get("saliency") or ()]   # file names, per prompt
            out["report_file"] = self.output.get("report_document") is not None
        return out


class JobQueue:
    def __init__(self, max_waiting=16):
        self.max_waiting = int(max_waiting)
        self._jobs = OrderedDict()
        self._waiting = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self.running = None
        self._idle_work = None            # idle_work(should_stop), left by the last finished job
        self._idle_running = False
        self._thread = threading.Thread(target=self._loop, name="medclipsam-jobs", daemon=True)
        self._thread.start()

    def submit(self, volume_id, request, work):
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} jobs are already waiting, the service's limit; "
                                "submit again when one has finished, or cancel one")
            job = Job(f"job-{next(self._ids)}", volume_id, request, work)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._lock.notify_all()
            return self.status(job.id)

    def get(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def status(self, job_id):
        with self._lock:
            job = self.get(job_id)
            out = job.status()
            if job.state == "queued":
                ahead = self._waiting.index(job) + (self.running is not None)
                out["position"] = ahead
                out["message"] = (f"waiting: {ahead} job(s) ahead on the device" if ahead else "starting")
            return out

    def cancel(self, job_id):
        """Cancel a job: a queued one is dropped at once, a running one stops at its next step."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "queued":
                self._waiting.remove(job)
                job.state = job.progress.message = "cancelled"
                self._finished(job)
            elif job.state == "running":
                job.progress.cancel()
                job.state = "cancelling"
            return job.status()

    def queue_info(self):
        with self._lock:
            return {"running": self.running.id if self.running else None, "waiting": len(self._waiting),
                    "jobs": len(self._jobs), "idle_work": bool(self._idle_work or self._idle_running)}

    def leave_idle_work(self, work):
        """Run work(should_stop) once the queue is empty (replaces any idle work not yet started)."""
        with self._lock:
            self._idle_work = work

    def _should_stop_idle(self):
        with self._lock:
            return self._stop or bool(self._waiting)

    def _run_idle_work(self):
        with self._lock:
            work, self._idle_work = self._idle_work, None
            if work is None or self._waiting or self._stop:
                return
            self._idle_running = True
        try:
            work(self._should_stop_idle)
        except Exception:   # idle work is an optimisation: a failure is logged, the service goes on
            log.exception("idle work failed")
        finally:
            with self._lock:
                self._idle_running = False
                self._lock.notify_all()

    def wait_idle(self, timeout):
        """Wait (bounded) until no job runs or waits and no idle work is left; True if so."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.running is not None or self._waiting or self._idle_work or self._idle_running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def busy(self):
        with self._lock:
            return self.running is not None or bool(self._waiting)

    def stop(self):
        """Cancel the running job and wait (bounded) until it has stopped: the service removes its folder next."""
        with self._lock:
            self._stop = True
            if self.running is not None:
                self.running.progress.cancel()
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT)

    def _loop(self):
        while True:
            with self._lock:
                while not self._waiting and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                job = self._waiting.pop(0)
                job.state, self.running = "running", job
            start = time.perf_counter()
            try:
                output = job.work(job)
                state, error = "done", None
            except Cancelled:
                output, state, error = None, "cancelled", None
            except MedCLIPSAMError as exc:
                output, state, error = None, "failed", str(exc)
            except Exception as exc:   # a bug: the job fails with one line, the service goes on
                log.exception("job %s failed", job.id)
                output, state, error = None, "failed", f"unexpected failure ({type(exc).__name__}: {exc})"
            with self._lock:
                if state == "done" and job.progress.cancelled:   # cancelled after its last step: no result
                    output, state = None, "cancelled"
                job.output, job.state, job.error = output, state, error
                job.progress.message = error or state          # no longer the last stage's "writing ..."
                job.seconds = round(time.perf_counter() - start, 3)
                self.running = None
                self._finished(job)
                self._lock.notify_all()
            self._run_idle_work()

    def _finished(self, job):
        done = [j for j in self._jobs.values() if j.state in FINAL]
        for old in done[: max(0, len(done) - KEEP_FINISHED)]:
            self._jobs.pop(old.id, None)
