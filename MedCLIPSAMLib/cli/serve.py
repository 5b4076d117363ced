"""`medclipsam serve`: the segmentation service (models and encodings kept warm between requests)."""

DESCRIPTION = """\
Run the segmentation service: models load once, and each volume's CLIP and SAM2 encodings are kept (within
--cache-mb) so a second prompt on the same volume costs seconds and a repeated one returns the kept result.
Between requests it encodes the rest of the last volume's slices for SAM2 (nearest the last result first,
within --cache-mb; it stops within one slice when a request comes; --no-encode-ahead turns it off), so the
next prompt and clicks anywhere in the volume find their encodings ready.

HTTP API (every request needs 'Authorization: Bearer TOKEN'; errors are {"detail": one sentence}):
  GET    /info                        version, device, models, memory, cache, queue, limits
  POST   /volumes                     body: a NRRD / NIfTI (.nii, .nii.gz) file's bytes -> {"volume_id", ...}
  DELETE /volumes/ID                  forget a volume and its encodings
  POST   /jobs                        JSON: volume_id, prompts, preset, overrides ["key=value"], ... -> job_id
  GET    /jobs/ID                     state and progress
  POST   /jobs/ID/cancel              cancel a waiting or running job
  GET    /jobs/ID/result              the .seg.nrrd; /uncertainty, /report and /saliency/K when asked for
  POST   /volumes/ID/refine           clicks / a box on one slice of a segment -> the changed slices
  POST   /volumes/ID/undo             undo a segment's last refinement
  GET    /models/trained              the trained models this service registered (no server folders)
  POST   /jobs/trained                JSON: volume_id, model, ...: a trained model's prediction, as a job
  POST   /trainings                   JSON: volume_ids, prompts, name, ...: weak supervision in a child process
  GET    /trainings, /trainings/ID    state, step, progress, metrics per epoch, the registered model
  POST   /trainings/ID/cancel         stop the training's whole process tree; nothing is registered
  GET    /openapi.json                the schema of every request and answer

Limits (a request past one gets 413, 422 or 429 with one sentence): uploads --max-upload-mb (default 1024 MB,
also the voxels' bytes once decompressed; headers naming other files are refused); JSON bodies --max-body-kb
(default 1024 KB; a refine request may add a quarter of --max-upload-mb for its mask); jobs waiting
--max-queue (default 16); volumes held --max-volumes (default 8); cache --cache-mb (default 2048 MB).

Local use (the default; what the Slicer module does by itself): the service listens on 127.0.0.1 only, makes
a random token and writes it to a file only you can read (printed at start; --token-file to choose it).
  medclipsam serve --port 8765

Remote use (a GPU machine serving a laptop's Slicer): listen on the network, then give the Slicer module
the URL and the token file's contents ("Setup and advanced" > Service, then "Test connection"). The token
is then the only protection, so a remote deployment must add: TLS, either uvicorn's own
(--ssl-keyfile/--ssl-certfile) or an HTTPS reverse proxy in front (or keep 127.0.0.1 and use an SSH tunnel:
ssh -L 8765:127.0.0.1:8765 gpu-box); a token per team (one service per --token-file; anyone holding it can
use and read everything the service holds); and body and upload limits sized for its users (the options
above; a proxy may enforce its own too).
  medclipsam serve --host 0.0.0.0 --port 8765 --token-file ~/.medclipsam-token \\
                   --ssl-keyfile key.pem --ssl-certfile cert.pem
"""


def register(sub):
    import argparse

    from .options import add_model_options

    p = sub.add_parser("serve", help="run the segmentation service (HTTP, token; used by the Slicer module)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: a free one, written to --ready-file)")
    p.add_argument("--token-file", help="file holding the token; made with a new token (mode 0600) when absent "
                                        "(default: MEDCLIPSAM_HOME/service/token-PORT)")
    p.add_argument("--cache-mb", type=float, default=2048,
                   help="memory budget of the encoding and result cache, in MB (default 2048)")
    p.add_argument("--max-volumes", type=int, default=8,
                   help="volumes held at once; the least recently used is forgotten (default 8)")
    p.add_argument("--max-upload-mb", type=float, default=1024,
                   help="largest volume accepted, in MB: the upload's bytes and its voxels' bytes once "
                        "decompressed (default 1024)")
    p.add_argument("--max-body-kb", type=float, default=1024,
                   help="largest JSON request body, in KB (default 1024); a refine request may add a quarter of "
                        "--max-upload-mb for its mask")
    p.add_argument("--max-queue", type=int, default=16,
                   help="jobs waiting at once; one more is refused with 429 (default 16)")
    p.add_argument("--no-encode-ahead", action="store_true",
                   help="do not use the time between requests to encode the rest of the last volume's slices "
                        "for SAM2 (by default it does, nearest the last result first, within --cache-mb, and "
                        "stops within one slice when a request comes: the next prompt and clicks then find them)")
    p.add_argument("--idle-exit", type=float, metavar="SECONDS", help="stop after this long without a request")
    p.add_argument("--parent-pid", type=int, help="stop when this process exits (the Slicer that started it)")
    p.add_argument("--ready-file", help="write {url, pid, token_file} as JSON here once listening")
    p.add_argument("--ssl-keyfile", help="TLS private key (with --ssl-certfile: serve HTTPS)")
    p.add_argument("--ssl-certfile", help="TLS certificate chain")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args):
    from ..errors import MedCLIPSAMError
    from ..pipeline.session import Session
    from ..service.server import serve
    from .options import model_names, runtime_device

    if min(args.cache_mb, args.max_upload_mb, args.max_body_kb) <= 0 or min(args.max_volumes, args.max_queue) < 1:
        raise MedCLIPSAMError("--cache-mb, --max-upload-mb, --max-body-kb, --max-volumes and --max-queue "
                              "must be positive")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MedCLIPSAMError("the service needs fastapi and uvicorn: pip install 'medclipsam[serve]'") from None
    clip, sam = model_names(args)
    session = Session(clip, sam, runtime_device(args), cache_bytes=int(args.cache_mb * 1024**2),
                      max_volumes=args.max_volumes)
    return serve(session, args.host, args.port, args.token_file, int(args.max_upload_mb * 1024**2),
                 args.parent_pid, args.idle_exit, args.ready_file, args.ssl_keyfile, args.ssl_certfile,
                 int(args.max_body_kb * 1024), args.max_queue, not args.no_encode_ahead)
