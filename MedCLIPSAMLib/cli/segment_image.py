"""`medclipsam segment-image IMAGE --prompt TEXT --output MASK.png`: one 2D image (PNG, JPEG, DICOM, ...)."""

from .options import add_model_options, add_pipeline_options


def register(sub):
    p = sub.add_parser("segment-image", help="segment one 2D image (PNG/JPEG/DICOM/...) from a text prompt")
    p.add_argument("image", help="2D image: PNG, JPEG, TIFF, BMP (8 or 16 bit), or anything SimpleITK reads")
    p.add_argument("--prompt", required=True, help="what to segment, e.g. 'breast tumor' (sentences: 'a | b | c')")
    p.add_argument("--output", required=True, help="mask PNG (0 background, 255 foreground)")
    p.add_argument("--saliency-output", help="saliency map PNG (0..255)")
    p.add_argument("--overlay-output", help="PNG of the image with the saliency and the mask drawn on it")
    p.add_argument("--absent-if", metavar="SENTENCES",
                   help="what the image looks like WITHOUT the target, sentences separated by '|' (e.g. 'a normal "
                        "chest x-ray'): if one of these matches better than the prompt, the mask is empty")
    p.add_argument("--absent-margin", type=float, default=0.0,
                   help="cosine by which the image must match the prompt better than every --absent-if sentence")
    add_pipeline_options(p)
    add_model_options(p)
    p.set_defaults(func=run)


def run(args):
    import numpy as np

    from ..io.images import read_image_2d
    from ..models import load_clip, load_sam2
    from ..overlay import overlay, save_png
    from ..pipeline.image import ImageSegmenter
    from ..imageops import normalize_to_uint8
    from ..pipeline.text import make_prompt
    from .options import model_names, pipeline_settings, runtime_device

    settings = pipeline_settings(args)
    prompt = make_prompt(args.prompt, settings.ensemble, args.absent_if)
    image = read_image_2d(args.image)
    device = runtime_device(args)
    clip_name, sam_name = model_names(args)
    clip = load_clip(clip_name, device)
    sam = load_sam2(sam_name, device) if settings.sam == "sam" else None
    result = ImageSegmenter(clip, sam, settings)(image, prompt, absent_margin=args.absent_margin)
    save_png(args.output, result.mask.astype(np.uint8) * 255)
    if args.saliency_output:
        save_png(args.saliency_output, (result.saliency * 255).round().astype(np.uint8))
    if args.overlay_output:
        from ..pipeline.image import to_gray

        gray = to_gray(image)
        gray8 = gray if gray.dtype == np.uint8 else normalize_to_uint8(gray)
        save_png(args.overlay_output, overlay(gray8, [result.mask], result.saliency))
    if clip.is_random:
        print("NOTE: random-weight models were used: this mask is MEANINGLESS (a test of the flow only)")
    if result.absent:
        print(f"'{prompt.text}': {result.absent}; the mask is empty")
    print(f"{args.output}: {int(result.mask.sum())} foreground pixels; prompts {_describe(result.prompts)}")
    return 0


def _describe(prompts):
    if prompts["boxes"] is not None:
        return "boxes " + "; ".join(",".join(str(int(v)) for v in b) for b in prompts["boxes"])
    if prompts["points"] is not None:
        return f"{len(prompts['points'])} points"
    return "none (empty coarse mask)"
