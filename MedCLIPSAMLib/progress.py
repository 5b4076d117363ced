"""Progress reporting for long work: a terminal bar, JSON lines for the Slicer panel, or nothing.

JSON mode prints one object per line on stdout: {"stage", "done", "total", "message"}; the last line of
a run has stage "finished" (or "cancelled" / "error"). Cancellation is cooperative: loops call
`reporter.check_cancelled()`, which raises Cancelled once SIGTERM/SIGINT arrived or `cancel()` was called.
Loops deep inside a stage that have no reporter of their own (the saliency methods' batches and steps) call
`checkpoint()`: it checks the reporter that last started a stage on this thread. A signal is answered at
once: "stopping..." on the terminal, a {"stage": "stopping"} line in JSON mode.
"""

import json
import signal
import sys
import threading

from .errors import Cancelled

PROGRESS_MODES = ("bar", "json", "none")
STOPPING = "stopping..."
_current = threading.local()    # .reporter: the one that last started a stage on this thread


def checkpoint():
    """Raise Cancelled if the reporter running this thread's current stage was cancelled (for inner loops)."""
    reporter = getattr(_current, "reporter", None)
    if reporter is not None:
        reporter.check_cancelled()


class ProgressReporter:
    def __init__(self, mode="bar", stream=None):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {PROGRESS_MODES}")
        self.mode = mode
        self.stream = stream
        self._cancel = threading.Event()
        self._bar = None
        self.stage_name = None
        self.total = 0
        self.done = 0

    # cancellation -------------------------------------------------------------------------------
    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self):
        return self._cancel.is_set()

    def check_cancelled(self):
        if self._cancel.is_set():
            self._release()   # a cancelled run is over: later work on this thread is not its concern
            raise Cancelled("cancelled")

    def _release(self):
        if getattr(_current, "reporter", None) is self:
            _current.reporter = None

    def install_signal_handlers(self, announcer=None):
        """Turn SIGTERM and SIGINT into a cooperative cancel (the main thread only), announced at once by
        `announcer` (default: this reporter; pseudo-label's silent inner reporter lets its outer one speak)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self._cancel.is_set():  # second signal: stop now
                raise KeyboardInterrupt
            self._cancel.set()
            (announcer or self).announce_stopping()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def announce_stopping(self):
        """Say at once that a cancel came in (the work stops at its next checkpoint, within a batch)."""
        try:
            if self.mode == "json":
                self._emit("stopping", self.done, self.total, STOPPING)
            else:   # a terminal line also with --progress none: the user pressed Ctrl-C and waits
                out = self.stream or sys.stderr
                out.write(f"\n{STOPPING} (press Ctrl-C again to stop at once)\n")
                out.flush()
        except (OSError, ValueError, RuntimeError):   # a closed stream, or a signal inside a write to it
            pass

    # reporting ----------------------------------------------------------------------------------
    def _emit(self, stage, done, total, message):
        out = self.stream or sys.stdout
        out.write(json.dumps({"stage": stage, "done": done, "total": total, "message": message}) + "\n")
        out.flush()

    def stage(self, name, total, message=""):
        """Start a stage of `total` steps."""
        self.check_cancelled()
        _current.reporter = self
        self._close_bar()
        self.stage_name, self.total, self.done = name, int(total), 0
        if self.mode == "json":
            self._emit(name, 0, self.total, message or name)
        elif self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=message or name, file=self.stream or sys.stderr,
                             leave=False, dynamic_ncols=True)

    def advance(self, n=1, message=""):
        self.done += n
        if self.mode == "json":
            self._emit(self.stage_name, self.done, self.total, message or self.stage_name)
        elif self._bar is not None:
            self._bar.update(n)
            if message:
                self._bar.set_postfix_str(message, refresh=False)
        self.check_cancelled()

    def finish(self, stage="finished", message="done"):
        self._release()
        self._close_bar()
        if self.mode == "json":
            self._emit(stage, 1, 1, message)

    def run(self, work):
        """Return work(); if it fails, first close the stream with an "error" or "cancelled" record
        (a crash is an error, not a cancel), then re-raise for the CLI to report."""
        from .errors import MedCLIPSAMError

        try:
            return work()
        except MedCLIPSAMError as exc:
            self.finish("error", str(exc))
            raise
        except (Cancelled, KeyboardInterrupt):
            self.finish("cancelled", "cancelled; nothing was written")
            raise
        except Exception as exc:
            self.finish("error", f"unexpected failure: {type(exc).__name__}: {exc}")
            raise

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None



def null_progress():
    """A silent reporter for library calls that were given none."""
    return ProgressReporter("none")
