"""Options shared by the segmentation commands (models, device, preset, settings)."""

MODELS_HELP = ("'default' (BiomedCLIP + MedSAM2, SAM 2.1 tiny at 512 px), 'sam2.1-hiera-tiny' (SAM 2.1 tiny at "
               "1024 px: slower on a CPU), 'tiny-random' (random test models: meaningless output), a registry name, "
               "or 'CLIP,SAM2' (names or folders)")


def add_model_options(p):
    p.add_argument("--models", default="default", help=MODELS_HELP)
    p.add_argument("--clip-model", help="CLIP model name or folder (e.g. a fine-tuned checkpoint); overrides --models")
    p.add_argument("--clip-checkpoint", dest="clip_model", help="alias of --clip-model")
    p.add_argument("--sam-model", help="SAM2 model name or folder; overrides --models")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: $MEDCLIPSAM_THREADS, else every core this process may use; "
                        "3D Slicer passes one fewer so its window stays responsive)")


def add_pipeline_options(p):
    from ..pipeline.presets import DEFAULT_PRESET

    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help="v1 (gScoreCAM+CRF+box+SAM), v2 (M2IB+KMeans+boxes+SAM), fast (GradCAM); default: %(default)s")
    p.add_argument("--sam", choices=("sam", "none"), help="'none' returns the post-processed saliency mask (no SAM)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset setting, e.g. --set top_n=2 --set saliency_settings.topk=100")
    p.add_argument("--no-ensemble", action="store_true", help="embed the prompt as written (no sentence ensemble)")
    p.add_argument("--seed", type=int, default=0)


def pipeline_settings(args):
    """The preset with the command line's changes: the same rules as a segmentation request's (session.py)."""
    from ..pipeline.session import SegmentRequest

    return SegmentRequest([], preset=args.preset, overrides=list(args.overrides), sam=args.sam,
                          no_ensemble=args.no_ensemble, seed=args.seed).settings()


def model_names(args):
    from ..models import resolve_model_set

    clip, sam = resolve_model_set(args.models)
    return args.clip_model or clip, args.sam_model or sam


def runtime_device(args):
    from ..runtime import configure_threads, seed_everything, select_device

    configure_threads(getattr(args, "threads", None))
    seed_everything(getattr(args, "seed", 0))
    return select_device(args.device)
