"""End-to-end accuracy in a world we can make: DHN-NCE-train a small CLIP on phantom slices, then
segment held-out phantoms zero-shot and score each stage, mirroring the MedCLIP-SAM(v2) ablation table.

    python -m benchmarks.phantom_accuracy --json benchmarks/results/phantom_accuracy.json [--quick]

1. Training: `tiny-random` (the real open_clip architecture: timm ViT-Tiny/16 @224 + a 2-layer BERT text
   tower, mean-pooled, random start) is trained with the repo's training code (training.clip_finetune.finetune,
   loss dhn-nce, tau 0.07, beta 0.15, batch 16, AdamW lr 1e-3, 10 % warm-up + cosine, bf16 autocast; pairs
   with identical captions are not each other's negatives) for 10 epochs (1280 steps) on 2048 slices, all
   windowed the way the pipeline windows them:
     1152 2D MR slices through the brain (make_image, seed 1), captioned with what is in them and where:
          "an MR slice of the brain showing the ventricles with a large bright tumor in the left
          hemisphere", "... with no tumor";
     320  axial slices of 16 MR head volumes (every slice, one window per volume, as a 3D run sees them),
          captioned the same way, with "an MR slice of the head above or below the brain" off the brain;
     576  2D CT slices with the phantom module's own captions ("an axial CT slice of the abdomen showing
          the liver and spleen with no tumor"): the words for organs a head does not have. With 192 (12 %
          of the data) the model barely told CT from MR: on MR tumour slices it put the liver's caption
          above every head phrasing, and "liver" was empty on 10 of 16 heads over two seeds; with 576,
          14 of 16.
   Retrieval is measured each epoch on 48 calibration slices (seed 3: neither training nor test).
2. Held-out 2D slices (seed 2), tumour prompt = the caption form averaged over the attributes a user
   does not know (size, brightness, side: 8 sentences, TUMOR_SENTENCES), `sam="none"`, each stage scored
   with Dice and NSD (2 mm):
     saliency        the map thresholded at 0.5 (and, labelled oracle, at the best fixed threshold on
                     this test set);
     + post-proc.    the preset's post-processing (v2: KMeans k=2; v1: dense CRF) inside the body (as the
                     pipeline does, body_only), all components kept;
     + components    the same, keeping the largest component and filling holes (top_n=1: one tumour);
   both with the random start (no training: the "saliency" row of the papers' table) and after DHN-NCE.
   SAM2 cannot be trained here, so `sam="none"` is the last stage.
   Selectivity: the final masks of "brain tumor" and "ventricles" are scored against each structure, and
   a pointing game counts how often the saliency maximum falls inside the named structure. Presence AUC
   (tumour vs no-tumour slices, on the held-out 2D slices and on every slice of held-out volumes) of the
   slice-prompt cosine, of the bare words "brain tumor", and of the lead the 3D run decides presence by:
   the best cosine among the prompt's sentences minus the best among its absent sentences (what a slice
   without the target looks like). Saliency methods: GradCAM / gScoreCAM / M2IB on a few of the slices.
   A PNG (image, tumour outline, saliency, final mask) of held-out slices goes next to the JSON.
3. Held-out 3D volumes through VolumeSegmenter (sam none, per-slice, gate on; each prompt carries absent
   sentences, as `--absent-if` gives them: a target that no slice matches better than all of them comes
   back empty). The tumour prompt's absent sentences describe a normal head (NORMAL_HEAD_SENTENCES), the
   liver's any head slice, tumour or not (HEAD_SENTENCES: what "a brain MRI" means to this model).
   Scored: 3D Dice/NSD of the tumour prompt on lesion volumes and how often it is found there (against
   the trivial answer "the whole brain", which also scores a few % Dice, here and in 2D); absent
   targets ("liver" on every head, the tumour prompt on the lesion-free heads): how often the segment
   comes back empty, the voxels returned as a fraction of the brain, and each volume's best presence lead
   (the decision's margin).
Prints tables and writes JSON. Numbers are what they are: a tiny CLIP trained for minutes on 2 CPU cores
may not localise; the JSON and tables say so rather than hide it.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from dataclasses import dataclass

from benchmarks import write_record

SIZE = 128
BATCH = 16
TEMPERATURE = 0.07  # CLIP's starting temperature; the released 0.6 is for fine-tuning a pre-trained model
CALIBRATION_SLICES = 48
DEFAULT_PRESET = "v2"
# Training from a random start: with tau 0.6 (the released fine-tuning setting) the logits span only +-1.7
# and the loss stalled at 4.58 whatever the length; with tau 0.07 the loss sits near chance for ~400 steps,
# then falls (4.2 -> 1.2 between steps 384 and 768 in a trial run). Quick mode stops before that fall: it
# checks that everything runs, not that the CLIP localises.
# train: 2D MR slices; train_volumes: MR volumes whose every axial slice is added; train_ct: 2D CT slices.
DEFAULTS = dict(train=1152, train_volumes=16, train_ct=576, epochs=10, test=24, volumes=(4, 4),
                shape=(20, 128, 128), methods=6)
QUICK = dict(train=640, train_volumes=8, train_ct=64, epochs=5, test=12, volumes=(1, 1), shape=(16, 96, 96),
             methods=4)
# The prompts, phrased as the training captions phrase things (the papers' prompts are descriptive sentences
# too). The tumour prompt averages the caption form over the attributes a user does not know in advance
# (size, brightness, side): a sentence ensemble, like the pipeline's shipped ensembles. The small text tower
# has only ever seen the captions, so a bare "brain tumor" is out of its distribution: mean-pooled, it lands
# nearest "... with no tumor" (the report gives its presence AUC too).
TUMOR_SENTENCES = tuple(f"an MR slice of the brain with a {size} {look} tumor in the {side} hemisphere"
                        for size in ("large", "small") for look in ("bright", "dark") for side in ("left", "right"))
VENTRICLE_SENTENCES = ("an MR slice of the brain showing the ventricles",)
# the absent target of the 3D check, phrased like the CT captions (a head has no liver)
LIVER_SENTENCES = ("an axial CT slice of the abdomen showing the liver",
                   "an axial CT slice of the abdomen showing the liver and spleen")
# Absent sentences (the CLI's --absent-if: what a slice without the target looks like), in the captions'
# words. For the tumour, a normal head (a radiologist would write "a normal brain MRI"); for the liver, any
# head slice ("a brain MRI"): this small text tower only knows its captions' phrasings.
NORMAL_HEAD_SENTENCES = ("an MR slice of the brain with no tumor",
                         "an MR slice of the brain showing the ventricles with no tumor",
                         "an MR slice of the head above or below the brain")
HEAD_SENTENCES = NORMAL_HEAD_SENTENCES + tuple(
    f"{base} with a {size} {look} tumor in the {side} hemisphere"
    for base in ("an MR slice of the brain", "an MR slice of the brain showing the ventricles")
    for size in ("large", "small") for look in ("bright", "dark") for side in ("left", "right"))


def prompts():
    from MedCLIPSAMLib.pipeline.text import Prompt

    return (Prompt("brain tumor", TUMOR_SENTENCES, absent=NORMAL_HEAD_SENTENCES),
            Prompt("ventricles", VENTRICLE_SENTENCES))


def liver_prompt():
    from MedCLIPSAMLib.pipeline.text import Prompt

    return Prompt("liver", LIVER_SENTENCES, absent=HEAD_SENTENCES)


@dataclass
class Slice:
    """One 2D image as the pipeline sees it (uint8 through the pipeline's own intensity window), its
    ground truth and its caption."""

    gray: np.ndarray
    labels: dict           # name -> 2D mask
    lesion: object         # phantoms.Lesion, or None
    caption: str

    def holds(self, name):
        """Whether the structure called `name` shows in this slice."""
        return name in self.labels and bool(self.labels[name].any())

    @property
    def has_tumor(self):
        return self.lesion is not None and self.holds("tumor")


def mr_caption(labels, lesion):
    """What is in an MR slice and where (the side is the patient's side)."""
    present = {n for n, m in labels.items() if m.any()}
    if "brain" not in present:
        return "an MR slice of the head above or below the brain"
    text = "an MR slice of the brain"
    if "ventricles" in present:
        text += " showing the ventricles"
    if lesion is not None and "tumor" in present:
        return f"{text} with a {lesion.size} {lesion.brightness} tumor in the {lesion.side} hemisphere"
    return f"{text} with no tumor"


def to_gray8(image, value_range=None):
    """uint8 the way the pipeline makes it: its robust intensity window (or a volume's, when given)."""
    from MedCLIPSAMLib.pipeline.preprocess import intensity_range, normalize_to_uint8

    return normalize_to_uint8(image, value_range=value_range or intensity_range(image))


def make_slices(n, seed, lesion_fraction=0.6):
    """n 2D MR phantoms through the brain (seed-disjoint sets for other seeds): lesions alternate
    left/right, size and brightness random; the rest are lesion-free."""
    from MedCLIPSAMLib.phantoms import make_image

    out = []
    for i in range(n):
        s = seed * 100003 + i
        lesion = {"side": ("left", "right")[i % 2]} if i % 10 < int(round(lesion_fraction * 10)) else False
        ph = make_image("mr", (SIZE, SIZE), seed=s, lesion=lesion)
        out.append(Slice(to_gray8(ph.image), ph.labels, ph.lesion, mr_caption(ph.labels, ph.lesion)))
    return out


def volume_slices(n, seed, shape):
    """Every axial slice of n MR head volumes (half with a tumour), cut and windowed the way the volume
    pipeline does (SliceView, one window per volume): the slices above and below the brain that a 3D run
    also sees."""
    import SimpleITK as sitk

    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.preprocess import intensity_range
    from MedCLIPSAMLib.pipeline.slices import SliceView

    out = []
    for i in range(n):
        lesion = {"side": ("left", "right")[i % 2]} if i % 2 == 0 else False
        ph = make_volume("mr", shape=shape, seed=seed * 100003 + i, lesion=lesion)
        volume = sitk.GetArrayViewFromImage(ph.image)
        view, window = SliceView(ph.image), intensity_range(volume)
        for k in range(view.count):
            labels = {name: view.get(m, k) for name, m in ph.labels.items()}
            out.append(Slice(to_gray8(view.get(volume, k), window), labels, ph.lesion,
                             mr_caption(labels, ph.lesion)))
    return out


def ct_slices(n, seed):
    """n 2D CT phantoms with the phantom module's own captions ("an axial CT slice of the abdomen showing
    the liver, spleen and kidneys with ..."): the training set then names organs that a head does not
    have, which the absent-target check asks for."""
    from MedCLIPSAMLib.phantoms import make_image

    out = []
    for i in range(n):
        ph = make_image("ct", (SIZE, SIZE), seed=seed * 100003 + i, lesion=i % 2 == 0)
        out.append(Slice(to_gray8(ph.image), ph.labels, ph.lesion, ph.caption))
    return out


def write_dataset(slices, folder):
    import csv

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, sl in enumerate(slices):
        name = f"slice_{i:05d}.png"
        Image.fromarray(sl.gray).save(os.path.join(folder, name))
        rows.append({"image": name, "caption": sl.caption})
    path = os.path.join(folder, "pairs.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    return path, rows


def train(data_csv, val_csv, output, epochs, lr, warmup, amp, temperature, seed=0):
    from MedCLIPSAMLib.training.clip_finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(data=data_csv, output=output, model="tiny-random", loss="dhn-nce", epochs=epochs,
                           temperature=temperature,
                           batch_size=BATCH, lr=lr, warmup_steps=warmup, weight_decay=0.1, device="cpu",
                           val_data=val_csv, augment=True, seed=seed, amp=amp)
    return finetune(opts)


def stages_for(seg, ph, prompt, settings):
    """Masks of one slice at each stage plus the saliency map."""
    from MedCLIPSAMLib.postprocess import postprocess

    from MedCLIPSAMLib.postprocess.body import body_mask

    g = ph.gray
    sal = seg.saliency_map(g, seg.text(prompt))
    kw = dict(method=settings.postprocess, region=body_mask(g) if settings.body_only else None,  # as the pipeline
              **settings.postprocess_settings)
    return sal, {
        "saliency > 0.5": sal > 0.5,
        "+ post-processing": postprocess(sal, g, top_n=0, fill_holes=False, **kw),
        "+ connected components": postprocess(sal, g, top_n=1, fill_holes=True, **kw),
    }


def score(pred, gt):
    from MedCLIPSAMLib.metrics import dice, normalized_surface_dice

    return dice(pred, gt), normalized_surface_dice(pred, gt, spacing=1.0, tolerance_mm=2.0)


def eval_slices(clip, phantoms, settings, keep_maps=0):
    from MedCLIPSAMLib.pipeline.image import ImageSegmenter

    seg = ImageSegmenter(clip, None, settings)
    tumor_p, vent_p = prompts()
    rows = {k: [] for k in ("saliency > 0.5", "+ post-processing", "+ connected components")}
    thresholds = np.round(np.arange(0.1, 0.95, 0.1), 2)
    by_threshold = {float(t): [] for t in thresholds}
    select = {f"{p} vs {s}": [] for p in ("brain tumor", "ventricles") for s in ("tumor", "ventricles")}
    pointing = {"brain tumor": [], "ventricles": []}
    maps = []
    lesion_phantoms = lesion_slices(phantoms)
    for ph in lesion_phantoms:
        gt = {"tumor": ph.labels["tumor"] > 0, "ventricles": ph.labels["ventricles"] > 0}
        for prompt, target in ((tumor_p, "tumor"), (vent_p, "ventricles")):
            if prompt is vent_p and not gt["ventricles"].any():
                continue
            sal, masks = stages_for(seg, ph, prompt, settings)
            pointing[prompt.text].append(peak_inside(sal, gt[target]))
            for s in ("tumor", "ventricles"):
                select[f"{prompt.text} vs {s}"].append(score(masks["+ connected components"], gt[s])[0])
            if prompt is tumor_p:
                for stage, m in masks.items():
                    rows[stage].append(score(m, gt["tumor"]))
                for t in thresholds:
                    by_threshold[float(t)].append(score(sal > t, gt["tumor"])[0])
                if len(maps) < keep_maps:
                    maps.append((ph.gray, gt["tumor"], sal, masks["+ connected components"]))
    best_t = max(by_threshold, key=lambda t: np.mean(by_threshold[t]))
    table = {stage: {"dice": float(np.mean([r[0] for r in v])), "nsd": float(np.mean([r[1] for r in v])),
                     "n": len(v)} for stage, v in rows.items()}
    table[f"saliency > {best_t} (oracle threshold)"] = {"dice": float(np.mean(by_threshold[best_t])), "nsd": None,
                                                       "n": len(by_threshold[best_t])}
    return {"stages": table, "selectivity_dice": {k: float(np.mean(v)) if v else None for k, v in select.items()},
            "pointing_game": {k: float(np.mean(v)) if v else None for k, v in pointing.items()},
            "dice_by_threshold": {t: float(np.mean(v)) for t, v in by_threshold.items()},
            "lesion_slices": len(lesion_phantoms)}, maps


def whole_brain_baseline(phantoms):
    """Dice / NSD of the trivial answer "the whole brain" on the lesion slices: the floor a mask that has
    not localised anything still reaches (a mask covering the brain scores a few % against any tumour)."""
    rows = [score(ph.labels["brain"] > 0, ph.labels["tumor"] > 0) for ph in lesion_slices(phantoms)]
    return {"dice": float(np.mean([r[0] for r in rows])), "nsd": float(np.mean([r[1] for r in rows])), "n": len(rows)}


def slice_scores(clip, phantoms, prompt, target="tumor"):
    """Per phantom: the CLIP slice-prompt cosine (the gate's score), the presence lead (best prompt
    sentence minus best absent sentence, as the 3D run decides; None without absent sentences), and
    whether it holds the target (a label name)."""
    import torch

    from MedCLIPSAMLib.pipeline.image import clip_input
    from MedCLIPSAMLib.pipeline.presence import presence_lead
    from MedCLIPSAMLib.pipeline.text import TextEmbeddings

    text = TextEmbeddings(clip)
    x = torch.stack([clip_input(clip, ph.gray) for ph in phantoms])
    with torch.no_grad():
        f = clip.encode_image(x).float()
    s = (f @ text(prompt).float()).numpy()
    lead = presence_lead(f, prompt, text) if prompt.absent else None
    pos = np.array([ph.has_tumor if target == "tumor" else ph.holds(target) for ph in phantoms])
    return s, lead, pos


def auc(scores, positive):
    if positive.all() or not positive.any():
        return None
    a, b = scores[positive], scores[~positive]
    return float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())


def presence(clip, phantoms):
    """Presence AUC (tumour vs no-tumour slices): the prompt's cosine, the bare words "brain tumor", and
    the prompt's lead over its absent sentences; plus how often the lead is positive on each kind."""
    from MedCLIPSAMLib.pipeline.text import make_prompt

    cos, lead, pos = slice_scores(clip, phantoms, prompts()[0])
    bare, _, _ = slice_scores(clip, phantoms, make_prompt("brain tumor", False))
    return {"prompt": auc(cos, pos), "bare 'brain tumor'": auc(bare, pos), "lead over absent sentences": auc(lead, pos),
            "lead > 0 on tumour slices": float((lead[pos] > 0).mean()) if pos.any() else None,
            "lead > 0 on tumour-free slices": float((lead[~pos] > 0).mean()) if (~pos).any() else None}


def preset_settings(preset):
    """The preset (the papers' layers) without SAM or ensembles (the benchmark's prompts are sentences
    already), in fp32."""
    from MedCLIPSAMLib.pipeline.presets import get_preset

    st = get_preset(preset, ["autocast=false", "sam=none", "ensemble=false"])
    if st.saliency == "gscorecam":
        st.saliency_settings["topk"] = 192  # ViT-Tiny has 192 channels
    return st


def lesion_slices(phantoms):
    return [ph for ph in phantoms if ph.has_tumor]


def peak_inside(saliency, mask):
    """The pointing game for one map: whether its maximum lies inside the mask."""
    return bool(mask[np.unravel_index(int(np.argmax(saliency)), saliency.shape)])


def map_scores(clip, phantoms, settings):
    """Dice of the tumour prompt's map > 0.5 and the pointing game on each phantom, and seconds per map."""
    from MedCLIPSAMLib.pipeline.image import ImageSegmenter

    seg, t = ImageSegmenter(clip, None, settings), time.perf_counter()
    dices, hits = [], []
    for ph in phantoms:
        gt = ph.labels["tumor"] > 0
        sal = seg.saliency_map(ph.gray, seg.text(prompts()[0]))
        dices.append(score(sal > 0.5, gt)[0])
        hits.append(peak_inside(sal, gt))
    return {"dice": float(np.mean(dices)), "pointing": float(np.mean(hits)), "n": len(phantoms),
            "seconds_per_map": (time.perf_counter() - t) / max(1, len(phantoms))}


def compare_methods(clip, phantoms, n):
    """Each saliency method of the papers (presets fast / v1 / v2, on the papers' layers) on the first n
    held-out lesion slices: Dice of the map thresholded at 0.5 and the pointing game, for the tumour prompt."""
    lesion = lesion_slices(phantoms)[:n]
    settings = [preset_settings(p) for p in ("fast", "v1", "v2")]
    return {st.saliency: map_scores(clip, lesion, st) for st in settings}


def save_grid(maps, path, title=""):
    """PNG: one row per held-out slice: image, ground-truth tumour outline (red), saliency, final mask (green)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    def edge(m):
        return m & ~ndimage.binary_erosion(m)

    rows = []
    for g, gt, sal, mask in maps:
        rgb = np.repeat(g[..., None], 3, axis=2)
        with_gt = rgb.copy()
        with_gt[edge(gt)] = (255, 0, 0)
        heat = np.repeat((255 * sal).astype(np.uint8)[..., None], 3, axis=2)
        heat[edge(gt)] = (255, 0, 0)
        final = rgb.copy() // 2
        final[mask] = (0, 200, 0)
        final[edge(gt)] = (255, 0, 0)
        rows.append(np.concatenate([rgb, with_gt, heat, final], axis=1))
    grid = np.concatenate(rows, axis=0)
    img = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + 16), "white")
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), f"image | tumour outline | saliency | final mask   {title}", fill="black")
    canvas.save(path)


def eval_volumes(clip, settings, n_lesion, n_normal, shape):
    from MedCLIPSAMLib.metrics import dice, normalized_surface_dice
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

    seg = VolumeSegmenter(clip, None, settings.replace(sam="none", ensemble=False),
                          VolumeOptions(mode="per-slice"))
    present, absent = [], []
    for i in range(n_lesion + n_normal):
        lesion = {"side": ("left", "right")[i % 2], "size": "large"} if i < n_lesion else False
        ph = make_volume("mr", shape=shape, seed=9000 + i, lesion=lesion)
        spacing = tuple(reversed(ph.image.GetSpacing()))
        brain = int(ph.labels["brain"].sum())
        result = seg(ph.image, [prompts()[0], liver_prompt()])  # no slice of a head holds a liver
        masks = {s["name"]: s["mask"] > 0 for s in result.segments}
        kept = {r["prompt"]: f"{r['kept']}/{r['slices']}" for r in result.report}
        _, feats = seg.slice_embeddings()
        lead = {p.text: float(seg.presence_lead(feats, p).max()) for p in (prompts()[0], liver_prompt())}
        if lesion:
            gt = ph.labels["tumor"] > 0
            present.append({"case": i, "dice": dice(masks["brain tumor"], gt),
                            "whole_brain_dice": dice(ph.labels["brain"] > 0, gt),
                            "nsd": normalized_surface_dice(masks["brain tumor"], gt, spacing, 2.0),
                            "kept": kept["brain tumor"], "best_lead": lead["brain tumor"]})
        else:
            absent.append({"case": i, "prompt": "brain tumor (lesion-free)",
                           "fraction_of_brain": float(masks["brain tumor"].sum()) / brain,
                           "empty": not masks["brain tumor"].any(), "kept": kept["brain tumor"],
                           "best_lead": lead["brain tumor"]})
        absent.append({"case": i, "prompt": "liver (head MR)", "fraction_of_brain": float(masks["liver"].sum()) / brain,
                       "empty": not masks["liver"].any(), "kept": kept["liver"], "best_lead": lead["liver"]})
    summary = {"present": present, "absent": absent}
    if present:
        summary["tumor_mean"] = {"dice": float(np.mean([r["dice"] for r in present])),
                                 "nsd": float(np.mean([r["nsd"] for r in present])),
                                 "whole_brain_dice": float(np.mean([r["whole_brain_dice"] for r in present])),
                                 "found_fraction": float(np.mean([r["best_lead"] > 0 for r in present]))}
    for name in ("brain tumor (lesion-free)", "liver (head MR)"):
        rows = [r for r in absent if r["prompt"] == name]
        if rows:
            summary[name] = {"mean_fraction_of_brain": float(np.mean([r["fraction_of_brain"] for r in rows])),
                             "empty_fraction": float(np.mean([r["empty"] for r in rows])), "n": len(rows)}
    return summary


def main(argv=None):
    import torch

    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.runtime import seed_everything

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="fewer images, epochs and test cases (<= 6 min)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"{DEFAULT_PRESET} (default): see the module notes; "
                   "v2: M2IB + KMeans; v1: gScoreCAM + CRF; fast: GradCAM + KMeans")
    p.add_argument("--train", type=int, help=f"2D MR training slices (default {DEFAULTS['train']}, quick "
                   f"{QUICK['train']}; the volume and CT slices come on top)")
    p.add_argument("--train-ct", type=int, help=f"2D CT training slices (default {DEFAULTS['train_ct']}, quick "
                   f"{QUICK['train_ct']})")
    p.add_argument("--epochs", type=int, help=f"default {DEFAULTS['epochs']}, quick {QUICK['epochs']}")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, the released setting)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help=f"DHN-NCE tau (default {TEMPERATURE}: training from a random start)")
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order, augmentation): repeat "
                   "with others to see how stable the recipe is")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (default: bf16 autocast, faster on CPU)")
    p.add_argument("--test", type=int, help=f"held-out slices (default {DEFAULTS['test']}, quick {QUICK['test']})")
    p.add_argument("--volumes", type=int, nargs=2, metavar=("LESION", "NORMAL"),
                   help=f"default {' '.join(map(str, DEFAULTS['volumes']))}, quick {' '.join(map(str, QUICK['volumes']))}")
    p.add_argument("--volume-shape", type=int, nargs=3, help=f"default {' '.join(map(str, DEFAULTS['shape']))}, "
                   f"quick {' '.join(map(str, QUICK['shape']))}")
    p.add_argument("--grid", help="PNG of saliency maps on held-out slices (default: next to --json, *_saliency.png)")
    p.add_argument("--keep", help="keep the fine-tuned CLIP folder here")
    p.add_argument("--clip", metavar="CLIP_DIR", help="score this CLIP folder (e.g. one kept with --keep, or a "
                   "finetune-clip output) instead of training one; its metrics.jsonl gives the training rows")
    args = p.parse_args(argv)
    d = QUICK if args.quick else DEFAULTS
    n_train, epochs, n_test = args.train or d["train"], args.epochs or d["epochs"], args.test or d["test"]
    n_ct = args.train_ct or d["train_ct"]
    n_les, n_norm = args.volumes or d["volumes"]
    volume_shape = tuple(args.volume_shape or d["shape"])
    grid = args.grid or (os.path.splitext(args.json)[0] + "_saliency.png" if args.json else None)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    seed_everything(0)
    settings = preset_settings(args.preset)
    t0 = time.perf_counter()
    out = {"preset": args.preset, "settings": {k: str(v) for k, v in vars(settings).items()},
           "quick": args.quick, "train_slices": n_train, "epochs": epochs, "lr": args.lr, "amp": not args.no_amp,
           "temperature": args.temperature, "seed": args.seed, "test_slices": n_test,
           "prompts": {p.text: list(p.sentences) for p in prompts()}}

    with tempfile.TemporaryDirectory() as tmp:
        training = (make_slices(n_train, seed=1) + volume_slices(d["train_volumes"], seed=4, shape=volume_shape)
                    + ct_slices(n_ct, seed=5))
        data_csv, rows = write_dataset(training, os.path.join(tmp, "train"))
        out["training_pairs"] = {"mr_2d": n_train, "mr_volume_slices": len(training) - n_train - n_ct,
                                 "ct_2d": n_ct}
        # retrieval each epoch and the gate's floor
        calibration = make_slices(CALIBRATION_SLICES, seed=3)
        val_csv, _ = write_dataset(calibration, os.path.join(tmp, "calibration"))
        distinct = sorted({r["caption"] for r in rows})
        out["caption_examples"] = distinct[::max(1, len(distinct) // 10)]
        out["distinct_captions"] = len({r["caption"] for r in rows})
        steps = (len(training) // BATCH) * epochs
        t = time.perf_counter()
        if args.clip:
            from MedCLIPSAMLib.training.clip_finetune import read_metrics

            ckpt, out["trained_clip"] = args.clip, args.clip
            records = read_metrics(os.path.join(args.clip, "metrics.jsonl"))
            out["epochs"] = records[-1]["epoch"]
            options = os.path.join(args.clip, "train_options.json")
            if os.path.exists(options):  # the seed it was trained with, not this run's --seed
                with open(options) as f:
                    out["seed"] = json.load(f).get("seed")
            print(f"scoring the CLIP in {args.clip} ({out['epochs']} epochs in its log)", flush=True)
        else:
            print(f"training tiny-random CLIP with DHN-NCE: {len(training)} slices, {out['distinct_captions']} "
                  f"distinct captions, {epochs} epochs ({steps} steps of {BATCH})", flush=True)
            ckpt = args.keep or os.path.join(tmp, "clip")
            records = train(data_csv, val_csv, ckpt, epochs, args.lr, warmup=max(1, steps // 10),
                            amp=not args.no_amp, temperature=args.temperature, seed=args.seed)
        # with --clip, the training time of that run, from its log
        out["train_seconds"] = (sum(r.get("seconds") or 0 for r in records) if args.clip
                                else time.perf_counter() - t)
        out["training"] = [{"epoch": r["epoch"], "loss": r["loss"], "retrieval": r["retrieval"]} for r in records]
        test = make_slices(n_test, seed=2)
        results, maps = {}, []
        for label, name in (("random start", "tiny-random"), ("after DHN-NCE", ckpt)):
            clip = load_clip(name, "cpu", reuse=False)
            t = time.perf_counter()
            res, maps = eval_slices(clip, test, settings, keep_maps=6)
            res["presence_auc"] = presence(clip, test)
            res["seconds"] = time.perf_counter() - t
            results[label] = res
            print(f"  evaluated {label} in {res['seconds']:.0f} s", flush=True)
        out["slices"] = results
        out["whole_brain_baseline"] = whole_brain_baseline(test)
        if grid:
            save_grid(maps, grid, f"(after DHN-NCE, preset {args.preset}, held-out)")
            out["saliency_grid"] = grid
        t = time.perf_counter()
        out["saliency_methods"] = compare_methods(clip, test, d["methods"])
        print(f"  compared saliency methods in {time.perf_counter() - t:.0f} s", flush=True)
        # presence on every slice of held-out volumes (seed 8: neither training nor the 3D test)
        out["presence_volume_slices"] = presence(clip, volume_slices(n_les + n_norm, seed=8, shape=volume_shape))
        out["absent_sentences"] = {p.text: list(p.absent) for p in (prompts()[0], liver_prompt())}
        t = time.perf_counter()
        out["volumes"] = eval_volumes(clip, settings, n_les, n_norm, volume_shape)
        out["volume_seconds"] = time.perf_counter() - t
    out["total_seconds"] = time.perf_counter() - t0
    report(out)
    if args.json:
        write_record(args.json, out)
    return out


def _f(v):
    return "   -  " if v is None else f"{100 * v:6.1f}"


def _leads(rows):
    return ", ".join(f"{r['best_lead']:+.3f}" for r in rows)


def report(out):
    tr = out["training"]
    r0, r1 = tr[0]["retrieval"] or {}, tr[-1]["retrieval"] or {}
    print(f"\nDHN-NCE training: loss {tr[1]['loss']:.3f} (epoch 1) -> {tr[-1]['loss']:.3f} (epoch {tr[-1]['epoch']}); "
          f"i2t top-1 {r0.get('i2t_top1', float('nan')):.2f} -> {r1.get('i2t_top1', float('nan')):.2f} "
          f"(ties: {out['distinct_captions']} distinct captions); {out['train_seconds']:.0f} s")
    labels = list(out["slices"])
    print(f"\nheld-out 2D slices, tumour prompt ({len(out['prompts']['brain tumor'])} caption-style sentences), preset {out['preset']} (sam none), Dice / NSD(2 mm) in %")
    print(f"{'stage':40s}" + "".join(f"{lab:>30s}" for lab in labels))
    for stage in out["slices"][labels[-1]]["stages"]:
        cells = []
        for lab in labels:
            row = out["slices"][lab]["stages"].get(stage) or next(
                v for k, v in out["slices"][lab]["stages"].items() if k.endswith("(oracle threshold)")
                and stage.endswith("(oracle threshold)"))
            cells.append(f"{_f(row['dice'])} / {_f(row['nsd'])}")
        print(f"{stage:40s}" + "".join(f"{c:>30s}" for c in cells))
    if "whole_brain_baseline" in out:  # absent from JSON written before the baseline was added
        wb = out["whole_brain_baseline"]
        print(f"{'baseline: the whole brain as the mask':40s}{_f(wb['dice']) + ' / ' + _f(wb['nsd']):>30s}")
    print(f"\nselectivity (final mask Dice vs each structure, %) and pointing game (saliency maximum inside the "
          f"named structure, %)")
    for lab in labels:
        s, pg = out["slices"][lab]["selectivity_dice"], out["slices"][lab]["pointing_game"]
        print(f"  {lab}: " + ", ".join(f"{k} {_f(v).strip()}" for k, v in s.items())
              + f"; pointing: tumor {_f(pg['brain tumor']).strip()}, ventricles {_f(pg['ventricles']).strip()}"
              + "; presence AUC " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -"
                                               for k, v in out["slices"][lab]["presence_auc"].items() if ">" not in k))
    print("\nsaliency methods on the fine-tuned CLIP (first held-out lesion slices, tumour prompt): "
          "Dice of map > 0.5 / pointing game, %")
    for m, r in out["saliency_methods"].items():
        print(f"  {m:10s} {_f(r['dice'])} / {_f(r['pointing'])}   (n {r['n']}, {r['seconds_per_map']:.1f} s per map)")
    pv = out["presence_volume_slices"]
    print("\npresence on every slice of held-out volumes (fine-tuned CLIP), tumour vs tumour-free slices: AUC "
          + ", ".join(f"{k} {v:.2f}" for k, v in pv.items() if ">" not in k and v is not None)
          + f"; lead > 0 on {_f(pv['lead > 0 on tumour slices']).strip()} % of tumour slices, "
          f"{_f(pv['lead > 0 on tumour-free slices']).strip()} % of tumour-free ones")
    v = out["volumes"]
    print(f"\nheld-out 3D volumes {out['settings'].get('saliency')} (fine-tuned CLIP, sam none, per-slice, gate on, "
          f"absent sentences: {len(NORMAL_HEAD_SENTENCES)} of a normal head for the tumour, {len(HEAD_SENTENCES)} "
          "of any head slice for the liver):")
    if "tumor_mean" in v:
        print(f"  'brain tumor' on lesion volumes: found in {_f(v['tumor_mean']['found_fraction']).strip()} % of "
              f"{len(v['present'])}, Dice {_f(v['tumor_mean']['dice'])}  NSD {_f(v['tumor_mean']['nsd'])}"
              f"  (whole brain as the mask: Dice {_f(v['tumor_mean'].get('whole_brain_dice')).strip()})"
              f"  (kept slices {', '.join(r['kept'] for r in v['present'])}; best leads "
              f"{_leads(v['present'])})")
    for name in ("brain tumor (lesion-free)", "liver (head MR)"):
        if name in v:
            rows = [r for r in v["absent"] if r["prompt"] == name]
            print(f"  absent target '{name}': empty in {_f(v[name]['empty_fraction']).strip()} % of {v[name]['n']} runs, "
                  f"mask = {_f(v[name]['mean_fraction_of_brain']).strip()} % of the brain's volume on average "
                  f"(best leads {_leads(rows)})")
    print(f"\ntotal {out['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
