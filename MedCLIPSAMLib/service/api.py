"""The HTTP routes (FastAPI) over a Service. Every error is a 4xx with one sentence in {"detail": ...}."""

import os
import tempfile
from typing import Literal, Optional

from pydantic import BaseModel, Field

from ..errors import MedCLIPSAMError
from .core import Conflict, NotFound
from .jobs import QueueFull
from .uploads import TooLarge
from .validation import STRICT, Invalid, Point, Text, api_words, body_sentence, number, optional_number


class JobBody(BaseModel):
    """A segmentation job: the options of `medclipsam segment`, by the same names."""
    model_config = STRICT
    volume_id: str = Field(max_length=64)
    prompts: list[Text] = Field(min_length=1, max_length=32)
    preset: str = Field("v2", max_length=32)
    overrides: list[Text] = Field(default_factory=list, max_length=64)
    sam: Optional[Literal["sam", "none"]] = None
    no_ensemble: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    mode: Literal["auto", "per-slice", "propagate", "carry"] = "auto"
    window: Optional[str] = Field(None, max_length=64)
    no_gate: bool = False
    gate_min_similarity: optional_number(-1.0, 1.0) = None     # a cosine similarity
    absent_if: Optional[list[Text]] = Field(None, max_length=32)
    absent_margin: number(-2.0, 2.0) = 0.0                      # a difference of two cosines
    key_slices: int = Field(3, ge=1, le=64)
    min_size_mm3: number(0.0, 1e12) = 10.0
    uncertainty: bool = False
    saliency: bool = False     # each prompt's saliency volume (`segment --saliency-output`)
    report: bool = False       # the per-prompt report JSON (`segment --report-output`)


class RefinePoint(BaseModel):
    model_config = STRICT
    position: Point                                  # patient mm, in the request's frame
    label: Literal[0, 1] = 1                         # 1 positive (inside), 0 negative (outside)


class RefineBody(BaseModel):
    """Clicks and/or a box on one slice of a segment; see pipeline/session_refine.py."""
    model_config = STRICT
    segment_id: str = Field(min_length=1, max_length=256)
    points: list[RefinePoint] = Field(default_factory=list, max_length=256)
    box: Optional[list[Point]] = Field(None, min_length=2, max_length=2)   # two opposite corners
    frame: Literal["RAS", "LPS"] = "RAS"
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    propagate: bool = True
    mask: Optional[str] = None                       # the segment now: base64 of np.packbits (z, y, x), C order
    window: Optional[str] = Field(None, max_length=64)   # the segmentation job's window (its encodings)
    plane_normal: Optional[Point] = None             # the view's normal, same frame: refused when not aligned
    max_distance: Optional[int] = Field(None, ge=0, le=100000)


class UndoBody(BaseModel):
    model_config = STRICT
    segment_id: str = Field(min_length=1, max_length=256)


def create_app(service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from ..pipeline.session import SegmentRequest

    # strict_content_type=False: a JSON body sent without a Content-Type is read as JSON. The OpenAPI schema
    # is served at /openapi.json (behind the token like every route), what docs/service-api.md points to
    app = FastAPI(title="MedCLIP-SAM segmentation service", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", strict_content_type=False)

    def error(status, text):
        return JSONResponse({"detail": text}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc):
        return error(422, body_sentence(exc.errors()))

    STATUS = ((NotFound, 404), (Conflict, 409), (TooLarge, 413), (Invalid, 422), (QueueFull, 429))

    @app.exception_handler(MedCLIPSAMError)
    async def refused(_, exc):
        status = next((code for kind, code in STATUS if isinstance(exc, kind)), 400)
        return error(status, api_words(str(exc)))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc):
        return error(exc.status_code, str(exc.detail))

    @app.get("/info")
    def info():
        return service.info()

    @app.post("/volumes")
    async def upload(request: Request):
        # streamed to the service's folder, never held whole; its size limit is BodyLimit's (limits.py)
        fd, path = tempfile.mkstemp(dir=service.workdir, prefix="upload-")
        try:
            total = 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    total += len(chunk)
                    f.write(chunk)
            if not total:
                return error(400, "the upload is empty; send the bytes of a NRRD or NIfTI volume")
            return await run_in_threadpool(service.add_volume, path)
        finally:
            os.remove(path)

    @app.delete("/volumes/{volume_id}")
    def forget(volume_id: str):
        service.check_volume(volume_id)
        service.session.forget(volume_id)
        return {"forgotten": volume_id}

    @app.post("/jobs")
    def submit(body: JobBody):
        fields = body.model_dump()
        volume_id, report = fields.pop("volume_id"), fields.pop("report")
        return service.submit(volume_id, SegmentRequest(**fields), report=report)

    @app.get("/jobs/{job_id}")
    def job(job_id: str):
        service.job(job_id)
        return service.jobs.status(job_id)

    @app.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        service.job(job_id)
        return service.jobs.cancel(job_id)

    @app.get("/jobs/{job_id}/result")
    def result(job_id: str):
        return Response(service.result(job_id), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.seg.nrrd"'})

    @app.post("/volumes/{volume_id}/refine")
    def refine(volume_id: str, body: RefineBody):
        service.check_volume(volume_id)
        return service.refine(volume_id, body.model_dump())

    @app.post("/volumes/{volume_id}/undo")
    def undo(volume_id: str, body: UndoBody):
        service.check_volume(volume_id)
        return service.undo(volume_id, body.segment_id)

    @app.get("/jobs/{job_id}/uncertainty")
    def uncertainty(job_id: str):
        return Response(service.result(job_id, "uncertainty"), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-uncertainty.nrrd"'})

    @app.get("/jobs/{job_id}/report")
    def report(job_id: str):
        return Response(service.result(job_id, "report"), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-report.json"'})

    @app.get("/jobs/{job_id}/saliency/{index}")
    def saliency(job_id: str, index: int):
        return Response(service.result(job_id, "saliency", index), media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-saliency-{index}.nrrd"'})

    from .model_routes import add_routes

    add_routes(app, service)          # trained models: prediction jobs, trainings, the registry
    return app
