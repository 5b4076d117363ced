"""`medclipsam segment VOLUME --prompt TEXT --output OUT.seg.nrrd` (the main job) and `segment-batch`."""

from .options import add_model_options, add_pipeline_options


def add_volume_options(p):
    p.add_argument("--prompt", action="append", required=True, help="what to segment; repeat for several segments")
    p.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slicing axis (patient space)")
    p.add_argument("--mode", default="auto", choices=("auto", "per-slice", "propagate", "carry"),
                   help="per-slice: the papers' method on every kept slice; propagate: SAM2 video propagation "
                        "from key slices; carry: box carried slice to slice; auto: propagate on GPU, carry on CPU")
    p.add_argument("--window", help="CT window: soft_tissue, lung, brain, bone, or LEVEL,WIDTH (default: automatic)")
    p.add_argument("--no-gate", action="store_true", help="run on every slice instead of only those that match the prompt")
    p.add_argument("--gate-min-similarity", type=float,
                   help="absolute slice-prompt similarity a slice must reach (an absent target then gives an empty segment)")
    p.add_argument("--absent-if", metavar="SENTENCES", action="append",
                   help="what a slice WITHOUT the target looks like, sentences separated by '|' (e.g. 'a normal "
                        "brain MRI | an MRI of a healthy brain'): a target that no slice matches better than all "
                        "of these gives an empty segment. Once: for every prompt; or once per --prompt, in order")
    p.add_argument("--absent-margin", type=float, default=0.0,
                   help="cosine by which a slice must match the prompt better than every --absent-if sentence")
    p.add_argument("--key-slices", type=int, default=3, help="slices that get the full 2D pipeline (propagate / carry)")
    p.add_argument("--min-size-mm3", type=float, default=10.0, help="drop 3D specks smaller than this")
    p.add_argument("--frame", type=int, help="frame of a 4D (time series) image to segment")
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                   help="bar: terminal progress bar; json: one JSON object per line on stdout")
    add_pipeline_options(p)
    add_model_options(p)


def register(sub):
    p = sub.add_parser("segment", help="segment a 3D volume (file or DICOM folder) from text prompts into a .seg.nrrd")
    p.add_argument("volume", help="NRRD, NIfTI, MHA/MHD, a DICOM series folder, or a 2D image file")
    p.add_argument("--output", required=True, help="OUT.seg.nrrd (segments named by prompt), a .nrrd/.nii.gz labelmap, or "
                                                "OUT.dcm: a DICOM SEG (input: a DICOM series folder)")
    p.add_argument("--uncertainty-output", help="write a per-voxel uncertainty volume (entropy of the mask probability)")
    p.add_argument("--saliency-output", metavar="S.nrrd",
                   help="write the saliency maps (float in [0, 1] on the input's grid, 0 on slices without a map): "
                        "S.nrrd for one prompt, S_<prompt>.nrrd per prompt for several")
    p.add_argument("--report-output", metavar="R.json",
                   help="write a JSON report per prompt: slices scored and kept, similarity and lead per slice, key "
                        "slices, found / not found and why, volume in ml, mean uncertainty, mode and models")
    add_volume_options(p)
    p.set_defaults(func=run)

    b = sub.add_parser("segment-batch", help="segment many volumes (a folder or a list file); resumable, shards under torchrun")
    b.add_argument("inputs", help="a folder of volumes, or a text file with one path per line")
    b.add_argument("--output-dir", required=True, help="each case's CASE.seg.nrrd goes here")
    b.add_argument("--saliency-output", action="store_true",
                   help="also write each case's saliency maps next to its output, as `segment --saliency-output` "
                        "does: CASE-saliency.nrrd for one prompt, CASE-saliency_<prompt>.nrrd per prompt for several")
    b.add_argument("--report-output", action="store_true",
                   help="also write each case's JSON report (as `segment --report-output`) next to its output: "
                        "CASE-report.json")
    add_volume_options(b)
    b.set_defaults(func=run_batch)


def _check_output(path, suffixes):
    import os

    from ..errors import MedCLIPSAMError

    if not any(path.endswith(s) for s in suffixes):
        raise MedCLIPSAMError(f"output '{path}' must end with one of {', '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise MedCLIPSAMError(f"cannot write '{path}': folder '{folder}' does not exist or is not writable")


def request_from_args(args):
    """The library's SegmentRequest from `segment` / `segment-batch` arguments (the service builds the same
    request from JSON)."""
    from ..pipeline.session import SegmentRequest

    return SegmentRequest(
        prompts=list(args.prompt), preset=args.preset, overrides=list(args.overrides), sam=args.sam,
        no_ensemble=args.no_ensemble, seed=args.seed, axis=args.axis, mode=args.mode, window=args.window,
        no_gate=args.no_gate, gate_min_similarity=args.gate_min_similarity,
        absent_if=getattr(args, "absent_if", None), absent_margin=args.absent_margin, key_slices=args.key_slices,
        min_size_mm3=args.min_size_mm3,
        # the report gives the mean uncertainty inside each mask
        uncertainty=bool(getattr(args, "uncertainty_output", None) or getattr(args, "report_output", None)),
        saliency=bool(getattr(args, "saliency_output", None)))


def make_prompts(args, ensemble):
    """The prompts with their absent sentences: one --absent-if for all, or one per --prompt."""
    from ..pipeline.session import SegmentRequest

    return SegmentRequest(list(args.prompt), absent_if=getattr(args, "absent_if", None)).make_prompts(ensemble)


class Session:
    """The command line's segmentation session: the request from the arguments, and a pipeline Session
    (models loaded once) that segments each volume given to segment()."""

    def __init__(self, args, progress):
        from ..pipeline import session
        from ..pipeline.volume import resolve_mode
        from .options import model_names, runtime_device

        self.prompts, self.settings, self.options = request_from_args(args).validate()
        device = runtime_device(args)
        clip_name, sam_name = model_names(args)
        self.model_names = (clip_name, sam_name if self.settings.sam == "sam" else None)
        self.pipeline = session.Session(clip_name, sam_name if self.settings.sam == "sam" else None, device,
                                        video=resolve_mode(args.mode, device) == "propagate", progress=progress)
        self.progress = progress
        self.random = self.pipeline.random

    def segment(self, image):
        volume_id = self.pipeline.add_volume(image)
        try:
            return self.pipeline.segment(volume_id, self.prompts, self.settings, self.options, self.progress)
        finally:
            self.pipeline.forget(volume_id)   # a batch goes through many volumes: keep memory flat


def write_result(result, image, output, uncertainty_output=None, progress=None, provenance=None):
    """Write the outputs to temporary files, then rename them into place. With `progress`, the write is
    reported and a cancel that came in by then (e.g. a SIGTERM while writing) removes the temporary
    files before anything is renamed: cancelled means nothing written. After the rename the run is done.
    provenance: see write_outputs."""
    from ..runtime import staged_outputs

    with staged_outputs() as staged:
        uncertainty = uncertainty_output if result.uncertainty is not None else None
        write_outputs(result, image, staged(output), staged(uncertainty), provenance)
        if progress is not None:
            progress.advance(1)  # raises Cancelled if a cancel came in: the temporary files are removed


def write_outputs(result, image, output, uncertainty_output=None, provenance=None):
    """Write the segmentation (and uncertainty) to these paths as they are (the caller stages them).
    provenance: how the segments were made, {"method", "models", "random", "description"} (plus, for a .dcm
    output, write_dicom_seg's "source_folder" and "sources"): the DICOM SEG's algorithm identification and
    content description, the .seg.nrrd's header fields."""
    import numpy as np

    from ..io import write_labelmap, write_segmentation, write_volume
    from ..io.geometry import image_from_array

    if output.endswith(".dcm"):
        from ..io.dicom_seg import write_dicom_seg

        write_dicom_seg(output, result.segments, image, **provenance)
    elif output.endswith(".seg.nrrd"):
        write_segmentation(output, result.segments, image, provenance_metadata(provenance))
    else:
        labels = np.zeros(result.segments[0]["mask"].shape, np.uint8)
        for value, seg in enumerate(result.segments, start=1):
            labels[seg["mask"] > 0] = value
        write_labelmap(output, labels, image)
    if uncertainty_output and result.uncertainty is not None:
        write_volume(uncertainty_output, image_from_array(result.uncertainty, image))


def provenance_metadata(provenance):
    """The .seg.nrrd header fields of a provenance (None: none)."""
    if not provenance:
        return None
    models = " ".join(f"{k}={v}" for k, v in provenance.get("models", {}).items())
    return {"MedCLIPSAM_method": provenance["method"], "MedCLIPSAM_models": models,
            "MedCLIPSAM_random_weights": "yes" if provenance.get("random") else "no",
            "MedCLIPSAM_description": provenance.get("description", "text-prompted segmentation")}


def write_evidence(args, session, result, image, staged, saliency_output=None, report_output=None, source=None,
                   output=None):
    """The saliency volumes and the report (evidence.py); staged(path) gives the temporary path to write.
    The paths, input and output are `args`' own (segment) unless given (segment-batch: per case)."""
    from .. import evidence

    saliency_output = saliency_output or args.saliency_output
    report_output = report_output or args.report_output
    files = None
    if saliency_output:
        files = evidence.saliency_paths(saliency_output, [r["prompt"] for r in result.report])
        evidence.write_saliency([staged(f) for f in files], result.saliency, image)
    if report_output:
        clip_name, sam_name = session.model_names
        models = {"clip": clip_name, "sam": sam_name, "random": session.random}
        document = evidence.report_document(result.report, models, files, source=source or args.volume,
                                            output=output or args.output, runtime=result.runtime)
        evidence.write_report(staged(report_output), document)


def batch_evidence_paths(args, output):
    """(saliency, report) paths of a segment-batch case: beside its output (None where not asked for)."""
    stem = output[: -len(".seg.nrrd")]
    return (f"{stem}-saliency.nrrd" if args.saliency_output else None,
            f"{stem}-report.json" if args.report_output else None)


def _provenance(args, session):
    """How a zero-shot result was made (write_outputs' provenance)."""
    from .options import model_names

    clip, sam = model_names(args)
    return {"method": f"MedCLIP-SAM zero-shot, preset {args.preset}",
            "models": {"clip": clip, "sam": sam if session.settings.sam == "sam" else "none"},
            "random": session.random, "description": "text-prompted segmentation"}


def run(args):
    from ..evidence import summary_line
    from ..io import read_volume
    from ..pipeline.text import make_prompt
    from ..progress import ProgressReporter
    from ..runtime import staged_outputs

    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    for p in args.prompt:  # cheap checks first: no model loading for a bad command line
        make_prompt(p)
    _check_output(args.output, (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".dcm"))
    if args.output.endswith(".dcm"):
        from ..io.dicom_seg import check_input

        check_input(args.volume)
    if args.uncertainty_output:
        _check_output(args.uncertainty_output, (".nrrd", ".nii.gz", ".nii", ".mha"))
    if args.saliency_output:
        _check_output(args.saliency_output, (".nrrd", ".nii.gz", ".nii", ".mha"))
    if args.report_output:
        _check_output(args.report_output, (".json",))

    def work():
        image = read_volume(args.volume, frame=args.frame)
        sources = None
        if args.output.endswith(".dcm"):   # the series checked against the volume before any model loads
            from ..io.dicom_seg import prepare

            sources = prepare(args.volume, image, args.prompt)
        session = Session(args, progress)
        result = session.segment(image)
        progress.stage("write", 1, "writing the segmentation")
        # every file goes to a temporary path and all are renamed together at the end: an error or a
        # cancel while writing leaves none of them
        with staged_outputs() as staged:
            uncertainty = args.uncertainty_output if result.uncertainty is not None else None
            provenance = _provenance(args, session)
            if args.output.endswith(".dcm"):
                provenance.update(source_folder=args.volume, sources=sources)
            write_outputs(result, image, staged(args.output), staged(uncertainty), provenance)
            write_evidence(args, session, result, image, staged)
            progress.check_cancelled()
        progress.advance(1)
        return session, result

    session, result = progress.run(work)
    summary = "; ".join(f"{r['prompt']}: {summary_line(r)}" for r in result.report)
    if session.random:
        summary = "RANDOM-WEIGHT MODELS (meaningless output): " + summary
    progress.finish("finished", f"wrote {args.output}: {summary}")
    if args.progress != "json":
        print(f"wrote {args.output}: {summary}")
    return 0


def _batch_inputs(path):
    import os
    from pathlib import Path

    from ..errors import MedCLIPSAMError

    from ..training.weak_data import list_inputs

    p = Path(path)
    if p.is_dir():   # its images and DICOM folders, never a .seg.nrrd (phantoms make writes one per image)
        entries = [Path(q) for q in list_inputs(str(p), "inputs", role="images")]
    elif p.is_file():
        entries = [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
    else:
        raise MedCLIPSAMError(f"'{path}' is neither a folder nor a list file")
    if not entries:
        raise MedCLIPSAMError(f"no inputs found in '{path}'")
    return [str(e) for e in entries if e.is_dir() or os.path.isfile(e)]


def _case_name(path):
    from pathlib import Path

    name = Path(path).name
    for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".png", ".dcm"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def run_batch(args):
    """Each rank (torchrun's RANK / WORLD_SIZE) takes every WORLD_SIZE-th case; finished outputs are skipped."""
    import os

    from ..errors import MedCLIPSAMError
    from ..io import read_volume
    from ..progress import ProgressReporter
    from ..runtime import staged_outputs

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.makedirs(args.output_dir, exist_ok=True)
    cases = _batch_inputs(args.inputs)[rank::world]
    todo = [(c, os.path.join(args.output_dir, _case_name(c) + ".seg.nrrd")) for c in cases]
    skipped = [c for c, out in todo if os.path.exists(out)]
    todo = [(c, out) for c, out in todo if not os.path.exists(out)]
    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    print(f"rank {rank}/{world}: {len(todo)} to segment, {len(skipped)} already done")
    if not todo:
        return 0
    session = Session(args, progress)
    failures = 0
    for case, out in todo:
        try:
            image = read_volume(case, frame=args.frame)
            result = session.segment(image)
            saliency, report = batch_evidence_paths(args, out)
            with staged_outputs() as staged:  # the case's files renamed into place together
                write_outputs(result, image, staged(out), None, _provenance(args, session))
                write_evidence(args, session, result, image, staged, saliency, report, case, out)
            print(f"{case} -> {out}")
        except MedCLIPSAMError as exc:
            failures += 1
            print(f"{case}: skipped: {exc}")
    progress.finish("finished", f"{len(todo) - failures} segmented, {failures} failed")
    return 1 if failures else 0
