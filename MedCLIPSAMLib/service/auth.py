"""The service's bearer token: made at start or read from a file only the user can read, and checked on
every request (before routing, so an unknown path without a token is a 401 too) in constant time."""

import hmac
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


UNAUTHORISED = "a valid bearer token is required (Authorization: Bearer TOKEN)"


def token_of(header):
    """The token of an `Authorization: Bearer TOKEN` header value (bytes); the scheme's case does not
    matter (RFC 9110 section 11.1), one space separates it from the token. None when it is no bearer token."""
    scheme, space, token = header.partition(b" ")
    return token if space and scheme.lower() == b"bearer" else None


class BearerAuth:
    """ASGI middleware: a request without the right bearer token gets 401 and nothing else; a connection
    that is neither HTTP nor the server's lifespan (a websocket) is closed unread: the API has none."""

    def __init__(self, app, token, on_request=None):
        self.app = app
        self.expected = token.encode()
        self.on_request = on_request      # called on every authorised request (the idle timer)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})   # before accept: HTTP 403
            return
        given = token_of(dict(scope.get("headers") or []).get(b"authorization", b""))
        if given is None or not hmac.compare_digest(given, self.expected):
            from .limits import answer

            await answer(send, 401, UNAUTHORISED, [(b"www-authenticate", b"Bearer")])
            return
        if self.on_request is not None:
            self.on_request()
        await self.app(scope, receive, send)
