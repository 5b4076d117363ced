"""The routes for trained models (the "one door": everything the Slicer panel runs goes through the service):

  GET    /models/trained             the service's registered models: name, kind, labels, date, present
  POST   /jobs/trained               {"volume_id", "model", ...} -> a job in the segmentation queue, followed
                                     and fetched like a segmentation job (/jobs/{id}, result, uncertainty)
  POST   /trainings                  {"volume_ids", "prompts", "name", ...} -> a weak-supervision training
                                     (pseudo-labels, then training) in a child process; one at a time (409)
  GET    /trainings                  the trainings the service remembers
  GET    /trainings/{id}             state, step, stage, done, total, message, metrics (per epoch), model
  POST   /trainings/{id}/cancel      stop it (the child's whole process tree); nothing is registered

Every field is checked here (types, ranges, finite numbers: allow_inf_nan=False, bounded lists, ids);
errors are one sentence.
"""

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, Field, field_validator

from ..errors import MedCLIPSAMError
from .validation import STRICT

Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
# model names: what a user types in the panel (letters, digits, spaces, . _ -), never a path
ModelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]
Prompt = Annotated[str, Field(min_length=1, max_length=200)]


def _prompts(values):
    if values is None:
        return values
    cleaned = [" ".join(v.split()) for v in values]
    if any(not v for v in cleaned):
        raise ValueError("a prompt is empty")
    if len({v.lower() for v in cleaned}) != len(cleaned):
        raise ValueError("the same prompt is given twice")
    return cleaned


class PredictBody(BaseModel):
    """Prediction with a registered model (its kind, weak or medclipseg, is the registry's)."""
    model_config = STRICT
    volume_id: Id
    model: ModelName
    uncertainty: bool = False
    # weak: the foreground probability threshold
    threshold: Optional[float] = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False)
    prompts: Optional[list[Prompt]] = Field(None, min_length=1, max_length=8)   # medclipseg: one segment each
    samples: Optional[int] = Field(None, ge=0, le=100)               # medclipseg: stochastic passes
    window: Optional[str] = Field(None, max_length=32)               # medclipseg: CT window
    seed: int = Field(0, ge=0, le=2**31 - 1)

    _prompts = field_validator("prompts")(_prompts)

    @field_validator("window")
    @classmethod
    def _window(cls, value):
        from ..pipeline.session import parse_window   # the rule segmentation jobs and the CLI use

        try:
            parse_window(value)
        except MedCLIPSAMError:
            raise ValueError("must be soft_tissue, lung, brain, bone or LEVEL,WIDTH") from None
        return value


class TrainBody(BaseModel):
    """A weak-supervision training: the options the panel gives `pseudo-label` and `train-weak`."""
    model_config = STRICT
    volume_ids: list[Id] = Field(min_length=1, max_length=64)
    prompts: list[Prompt] = Field(min_length=1, max_length=8)      # the targets, also the label names
    name: ModelName
    preset: Literal["v1", "v2", "fast"] = "v2"
    sam: Literal["sam", "none"] = "sam"                            # none: pseudo-labels without SAM (cheaper)
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    trainer: Literal["dynunet", "nnunetv2"] = "dynunet"
    dims: Literal[2, 3] = 2
    epochs: int = Field(50, ge=1, le=2000)
    snapshots: Optional[int] = Field(None, ge=1, le=20)             # default: min(5, epochs)
    batch_size: Optional[int] = Field(None, ge=1, le=512)
    base_filters: Optional[int] = Field(None, ge=2, le=128)
    samples_per_epoch: Optional[int] = Field(None, ge=1, le=1_000_000)
    patch_size: Optional[list[Annotated[int, Field(ge=8, le=1024)]]] = Field(None, min_length=2, max_length=3)
    lr: Optional[float] = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    val_fraction: Optional[float] = Field(None, ge=0.0, lt=1.0, allow_inf_nan=False)
    threshold: Optional[float] = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    _prompts = field_validator("prompts")(_prompts)

    @field_validator("snapshots")
    @classmethod
    def _snapshots(cls, value, info):
        epochs = info.data.get("epochs")
        if value is not None and epochs is not None and value > epochs:
            raise ValueError("cannot be more than 'epochs' (one snapshot at most per epoch)")
        return value

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value, info):
        dims = info.data.get("dims")
        if value is not None and dims is not None and len(value) != dims:
            raise ValueError(f"needs {dims} numbers for a {dims}D network")
        return value


def add_routes(app, service):
    from .. import trained_models
    from .model_jobs import check_request, registered, run as run_model
    from .training_jobs import public_entry

    @app.get("/models/trained")
    def trained():
        return {"models": [public_entry(e) for e in trained_models.list_models()]}

    @app.post("/jobs/trained")
    def predict(body: PredictBody):
        fields = body.model_dump()
        service.check_volume(body.volume_id)
        entry = registered(body.model)
        check_request(entry, fields)
        return service.jobs.submit(body.volume_id, fields, lambda job: run_model(service, job, entry, fields))

    @app.post("/trainings")
    def train(body: TrainBody):
        return service.trainings.submit(body.model_dump())

    @app.get("/trainings")
    def trainings():
        return {"trainings": service.trainings.list()}

    @app.get("/trainings/{job_id}")
    def training(job_id: str):
        return service.trainings.status(job_id)

    @app.post("/trainings/{job_id}/cancel")
    def cancel(job_id: str):
        return service.trainings.cancel(job_id)
