"""Request body limits, enforced at the ASGI level (before any route reads a byte): a declared
Content-Length over the limit is refused at once, and a body without one (chunked) is counted as it
streams and refused the moment it passes the limit, so no body is ever read whole first.

Limits per route: volume uploads get the upload limit, a refine request (it may carry a segment's mask,
a bit per voxel in base64) gets the JSON limit plus a quarter of the upload limit, every other body the
JSON limit (--max-body-kb)."""

import json

from starlette.exceptions import HTTPException

DRAIN = 64 * 1024      # bytes still read (and dropped) after a refused body, so the client sees the answer


def sentence(limit, upload):
    what = "the upload" if upload else "the request body"
    return f"{what} is larger than the service's limit of {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body parsing passes it on to the 413 answer."""

    def __init__(self, limit, upload):
        super().__init__(413, sentence(limit, upload))


class BodyLimit:
    """ASGI middleware: reading past the limit raises BodyTooLarge from `receive`; the app's HTTPException
    handler answers it with a 413 (and this middleware, should it get here before any answer started)."""

    def __init__(self, app, max_body, max_upload):
        self.app, self.max_body, self.max_upload = app, int(max_body), int(max_upload)

    def limit(self, scope):
        """(limit in bytes, whether it is a volume upload)."""
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "POST" and path.rstrip("/") == "/volumes":
            return self.max_upload, True
        if method == "POST" and path.endswith("/refine"):
            return self.max_body + self.max_upload // 4, False
        return self.max_body, False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, upload = self.limit(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await answer(send, 400, "the Content-Length header is not a number")
            if int(length) > limit:
                return await answer(send, 413, sentence(limit, upload))
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    drained = 0
                    while message.get("more_body") and drained < DRAIN:   # the rest of a small excess
                        message = await receive()
                        drained += len(message.get("body", b""))
                    raise BodyTooLarge(limit, upload)
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await answer(send, 413, sentence(limit, upload))


async def answer(send, status, text, extra=()):
    body = json.dumps({"detail": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
