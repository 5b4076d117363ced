"""`medclipsam phantoms make OUTDIR`: synthetic volumes, ground-truth .seg.nrrd files and captions JSON."""

DIRECTION_CYCLE = ("lps", "ras", "oblique", "sagittal", "oblique-flipped", "coronal")


def register(subparsers):
    parser = subparsers.add_parser(
        "phantoms", help="synthetic CT/MR phantoms with ground truth and captions",
        description="Synthetic CT-like and MR-like phantoms with exact ground truth, for tests and demos.",
    )
    sub = parser.add_subparsers(dest="phantoms_command", metavar="ACTION")
    make = sub.add_parser(
        "make", help="write phantom volumes, their .seg.nrrd ground truth and captions.json",
        description="Write COUNT phantoms per kind into OUTDIR: NAME.<format> (the volume), NAME.seg.nrrd "
                    "(ground truth on the same grid) and captions.json (captions, lesion, per-slice captions). "
                    "Grids vary: anisotropic spacing, shifted origins, LPS/RAS/oblique/permuted directions.",
    )
    make.add_argument("outdir", help="output folder (created if missing)")
    make.add_argument("--count", type=int, default=4, help="phantoms per kind (default 4)")
    make.add_argument("--kind", choices=("ct", "mr", "both"), default="both", help="phantom kind (default both)")
    make.add_argument("--seed", type=int, default=0, help="first seed; phantom i uses seed + i (default 0)")
    make.add_argument("--format", choices=("nrrd", "nii.gz"), default="nrrd", help="volume file format")
    make.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96), metavar=("Z", "Y", "X"),
                      help="array shape of each volume (default 48 96 96)")
    make.set_defaults(func=run_make)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_make(args):
    import json
    import os

    import numpy as np

    from ..errors import MedCLIPSAMError
    from ..io import write_segmentation, write_volume
    from ..phantoms import DEFAULT_SPACING, make_volume
    from ..runtime import atomic_output

    if args.count < 1:
        raise MedCLIPSAMError("--count must be at least 1")
    if min(args.shape) < 4:
        raise MedCLIPSAMError("--shape sizes must be at least 4")
    try:
        os.makedirs(args.outdir, exist_ok=True)
    except OSError as exc:
        raise MedCLIPSAMError(f"cannot create output folder '{args.outdir}': {exc.strerror}") from None
    kinds = ("ct", "mr") if args.kind == "both" else (args.kind,)
    entries = []
    for kind in kinds:
        for i in range(args.count):
            seed = args.seed + i
            rng = np.random.default_rng([seed, 7])  # geometry varies with the seed, independently of anatomy
            spacing = np.asarray(DEFAULT_SPACING[kind]) * rng.uniform(0.8, 1.25, size=3)
            origin = rng.uniform(-150, 150, size=3)
            direction = DIRECTION_CYCLE[i % len(DIRECTION_CYCLE)]
            phantom = make_volume(kind, args.shape, spacing=spacing, origin=origin, direction=direction, seed=seed)
            name = f"{kind}_{i:03d}"
            volume_file, seg_file = f"{name}.{args.format}", f"{name}.seg.nrrd"
            write_volume(os.path.join(args.outdir, volume_file), phantom.image)
            write_segmentation(os.path.join(args.outdir, seg_file), phantom.segments(), phantom.image)
            axial = [phantom.slice_caption(k, "axial")
                     for k in range(phantom.image.GetSize()[2 - _axial_axis(phantom.image)])]
            entries.append({"name": name, "image": volume_file, "segmentation": seg_file, "direction": direction,
                            **phantom.to_dict(), "axial_slice_captions": axial})
            print(f"{name}: {phantom.caption}")
    with atomic_output(os.path.join(args.outdir, "captions.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"phantoms": entries}, f, indent=1)
    print(f"wrote {len(entries)} phantoms to {args.outdir}")
    return 0


def _axial_axis(image):
    from ..io import slicing_axis

    return slicing_axis(image, "axial")
