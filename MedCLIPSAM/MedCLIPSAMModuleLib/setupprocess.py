"""Background processes (the model checks and downloads of the setup) whose output is read by threads and that Cancel really stops.

Inside Slicer the command starts with `PythonSlicer`, which is CTK's app launcher: it runs `python-real`
as a child and forwards no signal (Slicer: CMake/SlicerBlockInstallPython.cmake installs the launcher as
PythonSlicer; CTK: Applications/AppLauncher/ctkAppLauncher.cpp starts the real program with QProcess and
waits). A SIGTERM kills the launcher at once and leaves python-real running, so "the launcher exited"
never means "the job is gone". On POSIX the command gets its own process group (the launcher's children
stay in it); Cancel signals the whole group and the process counts as finished only when no member of
the group is left. On Windows the tree is ended with taskkill /T while the launcher still lives.
"""

import codecs
import os
import queue
import re
import signal
import subprocess
import threading
import time


class LineSplitter:
    """Chunks of bytes from a pipe -> complete lines (UTF-8 safe across chunk borders).

    Lines end at '\\n' or '\\r' (tqdm redraws its bar with '\\r'); blank lines are dropped. flush() returns
    the unterminated rest at end of stream.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, chunk):
        text = self._pending + self._decoder.decode(chunk)
        parts = re.split(r"\r\n|\r|\n", text)
        self._pending = parts.pop()
        return [p for p in parts if p.strip()]

    def flush(self):
        rest = (self._pending + self._decoder.decode(b"", final=True)).strip()
        self._pending = ""
        return [rest] if rest else []


def groupMembers(pgid):
    """PIDs of the live processes in process group `pgid` (POSIX). Zombies do not count: an orphan
    that has exited may wait a while for its new parent to reap it."""
    if os.path.isdir("/proc/self"):
        members = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # exited while we looked
            # after the command name: state, ppid, pgrp
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                members.append(int(name))
        return members
    try:  # no /proc (macOS): signal 0 tells whether any member exists
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    return [pgid]


class BackgroundProcess:
    """A child process (and everything it starts) whose stdout/stderr lines are collected by threads.

    cancel() sends SIGTERM to the process group once (the CLI stops cleanly and writes nothing) and
    SIGKILL to the group KILL_GRACE_SECONDS later; isFinished() is True only when no process of the group
    is left, however the leader ended. Poll isFinished() (or call wait()) to drive the escalation.
    """

    KILL_GRACE_SECONDS = 3.0
    PIPE_GRACE_SECONDS = 2.0  # after the group is gone, wait this long for stray holders of the pipes

    def __init__(self, command, env=None, cwd=None):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.proc = None
        self.cancelRequested = False
        self._stopping = False
        self._killDeadline = None
        self._goneTime = None
        self._queue = queue.Queue()
        self._threads = []

    def start(self):
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: the launcher's children are in it
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env, cwd=self.cwd, bufsize=0, **kwargs)
        for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            thread = threading.Thread(target=self._read, args=(name, pipe), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, name, pipe):
        splitter = LineSplitter()
        try:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                for line in splitter.feed(chunk):
                    self._queue.put((name, line))
        except (OSError, ValueError):
            pass
        for line in splitter.flush():
            self._queue.put((name, line))
        pipe.close()

    def lines(self):
        """(stream, line) pairs received since the last call."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def hasPendingLines(self):
        return not self._queue.empty()

    @property
    def returnCode(self):
        return None if self.proc is None else self.proc.poll()

    def aliveMembers(self):
        """PIDs of the processes of this job still running (the leader included)."""
        if self.proc is None:
            return []
        if os.name == "nt":
            return [self.proc.pid] if self.proc.poll() is None else []
        self.proc.poll()  # reap the leader, so it does not count as a member
        return groupMembers(self.proc.pid)

    def isFinished(self):
        """True once every process of the job has exited and its output has been read."""
        if self.proc is None:
            return False
        self._escalateIfDue()
        if self.proc.poll() is None:
            return False
        if self.aliveMembers():
            # the leader ended but left processes behind (a launcher that died): they are orphans
            self._stopGroup()
            return False
        if self._goneTime is None:
            self._goneTime = time.monotonic()
        readersDone = not any(t.is_alive() for t in self._threads)
        return readersDone or time.monotonic() - self._goneTime > self.PIPE_GRACE_SECONDS

    def wait(self, timeout=None, pollInterval=0.05):
        """Block until finished (scripts, tests, Slicer's exit); cancels when `timeout` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.isFinished():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(pollInterval)
        return self.returnCode

    def cancel(self):
        """Ask the process tree to stop; whatever still runs KILL_GRACE_SECONDS later is killed.
        Calling it again neither re-sends the signal nor moves the deadline."""
        if not self.cancelRequested:
            self.cancelRequested = True
            self._stopGroup()

    def _stopGroup(self):
        if self.proc is None or self._stopping:
            return
        self._stopping = True
        if os.name == "nt":
            self._killTree()  # no SIGTERM to a console-less tree on Windows
            return
        self._signalGroup(signal.SIGTERM)
        self._killDeadline = time.monotonic() + self.KILL_GRACE_SECONDS

    def _escalateIfDue(self):
        if self._killDeadline is not None and time.monotonic() >= self._killDeadline:
            self._killDeadline = None
            self._killTree()

    def _signalGroup(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _killTree(self):
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True, check=False)
        else:
            # the group outlives its leader: this reaches python-real after the launcher has gone
            self._signalGroup(signal.SIGKILL)
