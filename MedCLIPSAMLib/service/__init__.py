"""`medclipsam serve`: an HTTP service over one segmentation Session (pipeline/session.py).

FastAPI on uvicorn. Every request carries `Authorization: Bearer TOKEN`; everything is JSON except volume
uploads (raw NRRD / NIfTI bytes) and results (.seg.nrrd / .nrrd bytes).

  GET    /info                       version, device, models, memory, cache use, queue
  POST   /volumes                    body: the volume file's bytes -> {"volume_id", "size", "spacing", ...}
  DELETE /volumes/{id}               forget a volume and its cached encodings
  POST   /jobs                       {"volume_id", "prompts": [...], "preset", ...} -> {"job_id", "state", ...}
  GET    /jobs/{id}                  state (queued / running / done / failed / cancelled), progress, queue place
  POST   /jobs/{id}/cancel           cancel a queued or running job (no result is kept)
  GET    /jobs/{id}/result           the .seg.nrrd of a finished job
  GET    /jobs/{id}/uncertainty      its uncertainty volume (.nrrd), when the job asked for one
  GET    /jobs/{id}/report           the per-prompt report JSON (`segment --report-output`), with "report": true
  GET    /jobs/{id}/saliency/{k}     prompt k's saliency volume (`segment --saliency-output`), with "saliency": true
  POST   /volumes/{id}/refine        clicks / a box on one slice of a segment -> the changed slices
  POST   /volumes/{id}/undo          undo a segment's last refinement
  GET    /models/trained             the service's registered trained models (no server folders)
  POST   /jobs/trained               {"volume_id", "model", ...}: a trained model's prediction, as a job
  POST   /trainings                  {"volume_ids", "prompts", "name", ...}: weak supervision in a child process
  GET    /trainings/{id}             state, step, progress, metrics per epoch, the registered model
  POST   /trainings/{id}/cancel      stop the child's process tree; nothing is registered (model_routes.py)

Limits (limits.py, uploads.py, validation.py): every body is capped as it streams, an upload's header is
checked before anything it promises is allocated, the queue is bounded, every number is finite.

One job runs at a time (the models and the device are shared); the others wait in order and say where.
"""
