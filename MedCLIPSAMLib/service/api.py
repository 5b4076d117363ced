"""The HTTP routes (FastAPI) over a Service. Every error is a 4xx with one sentence in {"detail": ...}."""

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import MedCLIPSAMError
from .core import Conflict, NotFound

Text = Annotated[str, Field(max_length=4000)]


class JobBody(BaseModel):
    """A segmentation job: the options of `medclipsam segment`, by the same names."""
    model_config = ConfigDict(extra="forbid")
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
    gate_min_similarity: Optional[float] = None
    absent_if: Optional[list[Text]] = Field(None, max_length=32)
    absent_margin: float = 0.0
    key_slices: int = Field(3, ge=1, le=64)
    min_size_mm3: float = Field(10.0, ge=0)
    uncertainty: bool = False
    saliency: bool = False     # each prompt's saliency volume (`segment --saliency-output`)
    report: bool = False       # the per-prompt report JSON (`segment --report-output`)


Point = Annotated[list[float], Field(min_length=3, max_length=3)]


class RefinePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: Point                                  # patient mm, in the request's frame
    label: Literal[0, 1] = 1                         # 1 positive (inside), 0 negative (outside)


class RefineBody(BaseModel):
    """Clicks and/or a box on one slice of a segment; see pipeline/session_refine.py."""
    model_config = ConfigDict(extra="forbid")
    segment_id: str = Field(min_length=1, max_length=256)
    points: list[RefinePoint] = Field(default_factory=list, max_length=256)
    box: Optional[list[Point]] = Field(None, min_length=2, max_length=2)   # two opposite corners
    frame: Literal["RAS", "LPS"] = "RAS"
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    propagate: bool = True
    mask: Optional[str] = None                       # the segment now: base64 of np.packbits (z, y, x), C order
    window: Optional[str] = Field(None, max_length=64)   # the segmentation job's window (its encodings)
    plane_normal: Optional[Point] = None             # the view's normal, same frame: refused when not aligned
    max_distance: Optional[int] = Field(None, ge=0)


class UndoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segment_id: str = Field(min_length=1, max_length=256)


def _sentence(errors):
    """The first validation error as one sentence."""
    if not errors:
        return "the request is malformed"
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    msg = str(e.get("msg", "is invalid")).rstrip(".")
    return f"'{where}': {msg[0].lower() + msg[1:]}" if where else f"the request body: {msg}"


def create_app(service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from ..pipeline.session import SegmentRequest

    app = FastAPI(title="MedCLIP-SAM segmentation service", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status, text):
        return JSONResponse({"detail": text}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc):
        return error(422, _sentence(exc.errors()))

    @app.exception_handler(MedCLIPSAMError)
    async def refused(_, exc):
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
        return error(status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc):
        return error(exc.status_code, str(exc.detail))

    @app.get("/info")
    def info():
        return service.info()

    @app.post("/volumes")
    async def upload(request: Request):
        limit = service.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error(413 if length.isdigit() else 400,
                         f"the upload is larger than the service's limit of {limit} bytes" if length.isdigit()
                         else "the Content-Length header is not a number")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                return error(413, f"the upload is larger than the service's limit of {limit} bytes")
            chunks.append(chunk)
        if not total:
            return error(400, "the upload is empty; send the bytes of a NRRD or NIfTI volume")
        return await run_in_threadpool(service.add_volume, b"".join(chunks))

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
