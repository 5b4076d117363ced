"""Starting the service: token, socket, models, uvicorn; and stopping it when its parent process dies or
after an idle time (how the Slicer module's local service cleans up after itself)."""

import json
import os
import signal
import socket
import sys
import threading
import time

from ..errors import MedCLIPSAMError
from ..runtime import log

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def pid_alive(pid):
    """Whether process `pid` still runs (signal 0 on POSIX; on Windows os.kill would terminate it)."""
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, int(pid))   # QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259                                            # STILL_ACTIVE
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Watchdog(threading.Thread):
    """Asks the server to exit when the parent process is gone, or when no request came for `idle`
    seconds and no job is running or waiting."""

    def __init__(self, server, service, parent_pid=None, idle=None, every=1.0):
        super().__init__(name="medclipsam-watchdog", daemon=True)
        self.server, self.service, self.parent_pid, self.idle, self.every = server, service, parent_pid, idle, every
        self.last_request = time.monotonic()
        self._halt = threading.Event()

    def touch(self):
        self.last_request = time.monotonic()

    def run(self):
        while not self._halt.wait(self.every):
            if self.parent_pid and not pid_alive(self.parent_pid):
                print(f"medclipsam serve: parent process {self.parent_pid} exited; stopping", file=sys.stderr)
                break
            if self.service.jobs.busy() or self.service.trainings.busy():
                self.touch()
            elif self.idle and time.monotonic() - self.last_request > self.idle:
                print(f"medclipsam serve: idle for {self.idle:g} s; stopping", file=sys.stderr)
                break
        self.server.should_exit = True


def bind(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MedCLIPSAMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def write_ready_file(path, info):
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)   # the launcher never reads half a file


def serve(session, host="127.0.0.1", port=8765, token_file=None, max_upload_bytes=1024**3, parent_pid=None,
          idle_timeout=None, ready_file=None, ssl_keyfile=None, ssl_certfile=None, max_body_bytes=1024**2,
          max_queue=16, encode_ahead=True):
    import uvicorn

    from .api import create_app
    from .auth import BearerAuth, load_or_create_token
    from .core import Service
    from .limits import BodyLimit

    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise MedCLIPSAMError("TLS needs both --ssl-keyfile and --ssl-certfile")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if token_file is None:
        from ..models.cache import home

        token_file = home() / "service" / f"token-{port}"
    token = load_or_create_token(token_file)
    service = Service(session, max_upload_bytes, max_queue, encode_ahead)
    holder = {}
    app = BearerAuth(BodyLimit(create_app(service), max_body_bytes, max_upload_bytes), token,
                     on_request=lambda: holder["watchdog"].touch())
    config = uvicorn.Config(app, log_level="warning", ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    holder["watchdog"] = Watchdog(server, service, parent_pid, idle_timeout)
    scheme = "https" if ssl_certfile else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
    if host not in LOCAL_HOSTS:
        print(f"medclipsam serve: WARNING: listening on {host}, reachable from other machines; the token is then "
              "the only protection and travels in clear text over plain HTTP: give --ssl-keyfile/--ssl-certfile "
              "(uvicorn's own TLS) or put an HTTPS reverse proxy in front", file=sys.stderr)
    print(f"medclipsam serve: {url} (device {session.device}); token in {token_file} (mode 0600)", file=sys.stderr)
    if ready_file:
        write_ready_file(ready_file, {"url": url, "pid": os.getpid(), "token_file": str(token_file)})
    signals = []
    try:
        # SIGTERM (how the Slicer module stops it) and SIGINT: uvicorn catches them while it runs, shuts down,
        # puts these handlers back and raises the signal again (uvicorn/server.py, capture_signals); recorded
        # here, it ends server.run normally, so the clean-up below runs and the exit code is 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda number, frame: signals.append(number))
        holder["watchdog"].start()
        if not signals:
            server.run(sockets=[sock])
    finally:
        service.close()             # cancels the running job, waits for it, removes the service's folder
        log.info("service stopped")
    return 0
