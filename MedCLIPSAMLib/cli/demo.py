"""`medclipsam demo`, the README's first command: segment a sample volume from a text prompt, end to end.

The sample is 3D Slicer's MRBrainTumor1 (a brain MR with a tumour), fetched once with its published
sha256 when the internet can be reached; otherwise a synthetic brain-MR phantom with a known tumour.
The models are BiomedCLIP + MedSAM2 (the defaults) when they are in the cache or can be downloaded; otherwise the
same flow runs on random-weight models and every output says that its masks are meaningless.
"""

import hashlib
import os
from pathlib import Path

from ..errors import MedCLIPSAMError
from ..runtime import log

SAMPLE = {
    "name": "MRBrainTumor1",
    "file": "RegLib_C01_1.nrrd",
    "sha256": "998cb522173839c78657f4bc0ea907cea09fd04e44601f17c82ea27927937b95",
    "prompt": "brain tumor",
}
SAMPLE_URL = "https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/{sha256}"


def register(sub):
    p = sub.add_parser("demo", help="segment a sample volume from a text prompt and write .seg.nrrd + PNG overview")
    p.add_argument("--output-dir", default="demo-output")
    p.add_argument("--prompt", default=None, help="text prompt (default: the sample's own target)")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    p.set_defaults(func=run_demo)


def fetch_sample(folder):
    """Path of the sample volume (downloaded once, checked against its sha256), or None when offline."""
    import urllib.request

    path = Path(folder) / SAMPLE["file"]
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE["sha256"]:
        return path
    if os.environ.get("MEDCLIPSAM_OFFLINE", "") not in ("", "0"):
        return None
    try:
        with urllib.request.urlopen(SAMPLE_URL.format(**SAMPLE), timeout=20) as response:
            data = response.read()
    except OSError as exc:
        log.info("sample download not possible (%s)", exc.__class__.__name__)
        return None
    if hashlib.sha256(data).hexdigest() != SAMPLE["sha256"]:
        log.warning("the downloaded sample does not match its published sha256; not using it")
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def choose_models():
    """The default models (BiomedCLIP, MedSAM2) if available (cached or downloadable), else the random test models."""
    from ..models import DEFAULT_CLIP, DEFAULT_SAM2
    from ..models.download import download

    try:
        for name in (DEFAULT_CLIP, DEFAULT_SAM2):
            download(name)
        return DEFAULT_CLIP, DEFAULT_SAM2, None
    except MedCLIPSAMError as exc:
        return "tiny-random", "tiny-random", str(exc)


def run_demo(args):
    import SimpleITK as sitk

    from ..evidence import summary_line
    from ..progress import ProgressReporter
    from ..runtime import staged_outputs
    from ..pipeline.presets import DEFAULT_PRESET
    from .segment import Session, write_evidence, write_outputs

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("MEDCLIPSAM_HOME") or Path.home() / ".cache" / "medclipsam") / "samples"
    sample = fetch_sample(cache)
    truth = None
    if sample is not None:
        image, name, prompt = sitk.ReadImage(str(sample)), SAMPLE["name"], args.prompt or SAMPLE["prompt"]
        print(f"sample: {SAMPLE['name']} (3D Slicer sample data, sha256 verified)")
    else:
        from ..phantoms import make_volume

        phantom = make_volume("mr", shape=(40, 128, 128), seed=7, lesion={"size": "large", "brightness": "bright"})
        image, name, prompt = phantom.image, "brain-mr-phantom", args.prompt or "brain tumor"
        truth = phantom.labels.get("tumor")
        print("sample: the real sample volume cannot be downloaded here (offline); using a synthetic brain-MR "
              "phantom with a known tumour instead")
    clip_name, sam_name, why = choose_models()
    if why:
        print("models: BiomedCLIP / SAM2 weights are not available here, so this run uses TINY RANDOM-WEIGHT "
              "models of the same architectures. The flow is real; the masks are MEANINGLESS.")
        print(f"        ({why})")

    class Args:  # the same options `medclipsam segment` takes
        pass

    a = Args()
    a.prompt, a.preset, a.sam, a.overrides, a.no_ensemble, a.seed = [prompt], DEFAULT_PRESET, None, [], False, 0
    a.models, a.clip_model, a.sam_model, a.device = f"{clip_name},{sam_name}", None, None, args.device
    a.axis, a.mode, a.window, a.no_gate, a.key_slices, a.min_size_mm3 = "axial", "auto", None, False, 3, 10.0
    a.gate_min_similarity, a.absent_if, a.absent_margin = None, None, 0.0
    seg_path = out / f"{name}.seg.nrrd"
    a.volume, a.output = str(sample) if sample is not None else name, str(seg_path)
    a.uncertainty_output = None
    a.saliency_output, a.report_output = str(out / f"{name}-saliency.nrrd"), str(out / f"{name}-report.json")
    progress = ProgressReporter(args.progress)
    progress.install_signal_handlers()
    session = Session(a, progress)
    result = session.segment(image)
    with staged_outputs() as staged:  # the segmentation and its evidence renamed into place together
        write_outputs(result, image, staged(str(seg_path)))
        write_evidence(a, session, result, image, staged)
    png_path = out / f"{name}-overview.png"
    write_overview(png_path, image, result, session, truth, meaningless=bool(why))
    progress.finish("finished", f"wrote {seg_path}")
    for r in result.report:
        print(f"'{r['prompt']}': {summary_line(r)} ({r['kept']} of {r['slices']} slices kept: {r['reason']}; "
              f"mode {r['mode']})")
    if truth is not None:
        from ..metrics import dice

        print(f"Dice against the phantom's true tumour: {dice(result.segments[0]['mask'], truth):.3f}"
              + (" (random models: expected to be near 0)" if why else ""))
    print(f"wrote {seg_path}\nwrote {a.saliency_output} (saliency maps)\nwrote {a.report_output} (report)"
          f"\nwrote {png_path}")
    return 0


def write_overview(path, image, result, session, truth=None, meaningless=False, columns=4):
    """A grid of axial slices through the segment (or the volume's middle) with the masks drawn on them."""
    import numpy as np
    import SimpleITK as sitk
    from PIL import Image, ImageDraw

    from ..imageops import intensity_range, normalize_to_uint8
    from ..overlay import overlay, save_png
    from ..pipeline.slices import SliceView

    volume = sitk.GetArrayViewFromImage(image)
    view = SliceView(image, session.options.axis if session.options.axis else "axial")
    vr = intensity_range(volume[::2, ::2, ::2]) or (0, 255)
    union = np.zeros(volume.shape, bool)
    for seg in result.segments:
        union |= seg["mask"] > 0
    marked = [k for k in range(view.count) if view.get(union, k).any()]
    pool = marked or list(range(view.count))
    picks = sorted(set(np.linspace(pool[0], pool[-1], min(len(pool), columns * 2)).round().astype(int).tolist()))
    tiles = []
    for k in picks:
        gray = normalize_to_uint8(view.get(volume, k), value_range=vr)
        masks = [view.get(seg["mask"], k) for seg in result.segments]
        if truth is not None:
            masks.append(view.get(truth, k) > 0)
        tile = Image.fromarray(overlay(gray, masks)).resize((256, 256), Image.NEAREST)
        ImageDraw.Draw(tile).text((4, 4), f"slice {k}", fill=(255, 255, 0))
        tiles.append(tile)
    rows = (len(tiles) + columns - 1) // columns
    header = 48
    canvas = Image.new("RGB", (columns * 256, rows * 256 + header), (0, 0, 0))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % columns) * 256, header + (i // columns) * 256))
    draw = ImageDraw.Draw(canvas)
    names = ", ".join(f"{s['name']} (red)" if i == 0 else s["name"] for i, s in enumerate(result.segments))
    draw.text((6, 4), f"MedCLIP-SAM: {names}" + ("; ground truth outlined in blue" if truth is not None else ""),
              fill=(255, 255, 255))
    if meaningless:
        draw.text((6, 24), "RANDOM-WEIGHT MODELS: these masks are MEANINGLESS (flow test only)", fill=(255, 80, 80))
    save_png(path, np.asarray(canvas))
