"""The service's bearer token: made at start or read from a file only the user can read, and checked on
every request (before routing, so an unknown path without a token is a 401 too) in constant time."""

import hmac
import json
import os
import secrets
import stat
import tempfile

from ..errors import MedCLIPSAMError


def load_or_create_token(path):
    """The token in `path`, or a new one written there with mode 0600 (atomically: the file never exists
    with wider permissions or half written)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        if os.name == "posix" and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MedCLIPSAMError(f"the token file '{path}' can be read by other users; run chmod 600 on it")
        with open(path) as f:
            token = f.read().strip()
        if len(token) < 16:
            raise MedCLIPSAMError(f"the token in '{path}' is shorter than 16 characters")
        return token
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".token-")   # mkstemp creates it with mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token


class BearerAuth:
    """ASGI middleware: a request without the right bearer token gets 401 and nothing else."""

    def __init__(self, app, token, on_request=None):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.on_request = on_request      # called on every authorised request (the idle timer)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            body = json.dumps({"detail": "a valid bearer token is required (Authorization: Bearer TOKEN)"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if self.on_request is not None:
            self.on_request()
        await self.app(scope, receive, send)
