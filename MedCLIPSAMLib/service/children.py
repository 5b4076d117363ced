"""Child processes of the service (a training runs in one, so the service keeps answering and segmenting):
started in a process group of their own, their `--progress json` lines read as they come, and stopped
as a whole tree (the group) on cancel or when the service stops. (The child's side, which ends its group
when the service is gone, is in cli/chain.py.)"""

import json
import os
import signal
import subprocess
import threading
import time

GRACE_S = 5.0      # a cancelled child's time to stop by itself (SIGTERM: cooperative) before SIGKILL


class Child:
    """One child process: `on_line(dict)` gets each JSON object it prints on stdout; stderr goes to
    `log_path`. stop() ends the whole process group and waits for it."""

    def __init__(self, command, log_path, on_line, env=None, cwd=None):
        self.log_path = log_path
        log = open(log_path, "wb")
        kwargs = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                            env=env, cwd=cwd, **kwargs)
        finally:
            log.close()
        self.pid = self.process.pid            # also the process group's id (POSIX: a new session)
        self._reader = threading.Thread(target=self._read, args=(on_line,), name="medclipsam-child-out",
                                        daemon=True)
        self._reader.start()

    def _read(self, on_line):
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                on_line(record)
        self.process.stdout.close()

    def wait(self):
        """The exit code, once the process ended and its output was read (a process that escaped the group
        and still holds the pipe does not keep us waiting: the reader is a daemon)."""
        code = self.process.wait()
        self._reader.join(timeout=10)
        return code

    def running(self):
        return self.process.poll() is None

    def stop(self, grace=GRACE_S):
        """Stop the whole tree: SIGTERM to the group (the CLI cancels cooperatively), SIGKILL to what is
        left after `grace` seconds; returns once the child has exited. Windows: taskkill /T /F."""
        if os.name == "nt":
            subprocess.run(["taskkill", "/PID", str(self.pid), "/T", "/F"], capture_output=True)
            return self.wait()
        _signal_group(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(self.pid, signal.SIGKILL)    # grandchildren too, even when the child itself is gone
        return self.wait()

    def last_error(self):
        """The last 'medclipsam: error: ...' sentence of its stderr, or None."""
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read()[-65536:].decode("utf-8", "replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if line.startswith("medclipsam: error: "):
                return line[len("medclipsam: error: "):].strip()
        return None


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid):
    """Whether any process of group `pgid` is left (POSIX)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
