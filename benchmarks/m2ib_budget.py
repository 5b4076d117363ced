"""Issue 37 lever: fewer M2IB steps or noisy copies per prompt. What does it save, and does it move the maps
and masks by more than M2IB's own noise?

    python -m benchmarks.m2ib_budget --clip CLIP_DIR --json benchmarks/results/m2ib_budget_cpu.json
    (CLIP_DIR: a CLIP trained on phantoms, e.g. `python -m benchmarks.phantom_accuracy --keep CLIP_DIR`)

M2IB (saliency/m2ib.py) fits a gate per token and channel with Adam (lr 1) for `steps` steps, each on
`batch_size` noisy copies of the image. Its map is random: another noise seed gives another map, and both
are equally M2IB. That seed-to-seed spread is the yardstick here: a cheaper budget (steps x copies) counts
as "within noise" only where its agreement with the reference (10 steps x 10 copies, the papers' setting,
seed 0) is no worse than another seed of the reference itself.

(1) Quality, on held-out phantom slices with a tumour (phantom_accuracy's test set, seed 2), through the
    pipeline's own ImageSegmenter (preset v2, sam none): per slice and budget, the map's Pearson correlation
    with the reference map, the IoU of the coarse mask (KMeans + components, what SAM's box comes from) and
    of its box with the reference's, and the mask's Dice against the phantom's tumour. Every budget runs
    with seeds 0, 1, 2 (a single draw can flip one slice's mask either way); the reference's own seeds 1
    and 2 are the noise row. Per budget: the means over its seeds and the share of slices whose mask moved
    (IoU < 0.5 with the reference).
(2) Speed, on the full-size random-weight BiomedCLIP: the 3 key slices of a volume in one batched fit, as
    the pipeline runs them (bf16 autocast where the CPU has it), each budget interleaved, min over repeats.
Random weights show speed only; the trained phantom CLIP shows agreement. Timings belong here, not in tests.
"""

import argparse
import os
import time

import numpy as np

from benchmarks import write_record

REFERENCE = (10, 10)


def parse_budgets(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def label(budget, seed=0):
    return f"{budget[0]} steps x {budget[1]} copies" + (f", seed {seed}" if seed else "")


def settings_for(budget, seed, autocast="auto"):
    from MedCLIPSAMLib.pipeline.presets import get_preset

    st = get_preset("v2", ["sam=none", "ensemble=false", f"autocast={autocast}"])
    st.saliency_settings = dict(st.saliency_settings, steps=budget[0], batch_size=budget[1], seed=seed)
    return st


def coarse_mask(settings, sal, gray):
    """The coarse mask the pipeline derives from a map (v2: KMeans, top-N components, holes filled)."""
    from MedCLIPSAMLib.postprocess import postprocess
    from MedCLIPSAMLib.postprocess.body import body_mask

    region = body_mask(gray) if settings.body_only else None
    return postprocess(sal, gray, method=settings.postprocess, region=region, top_n=settings.top_n,
                       fill_holes=settings.fill_holes, **settings.postprocess_settings)


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def box_mask(mask):
    from MedCLIPSAMLib.postprocess import bounding_box

    out = np.zeros(mask.shape, bool)
    box = bounding_box(mask)
    if box is not None:
        x0, y0, x1, y1 = box
        out[y0:y1, x0:x1] = True  # bounding_box gives x1, y1 one past the last pixel
    return out


def quality(clip_dir, budgets, n_slices, noise_seeds):
    from MedCLIPSAMLib.metrics import dice
    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.pipeline.image import ImageSegmenter

    from benchmarks.phantom_accuracy import lesion_slices, make_slices, prompts

    clip = load_clip(clip_dir)
    phantoms = lesion_slices(make_slices(3 * n_slices, seed=2))[:n_slices]
    grays = [ph.gray for ph in phantoms]
    truth = [ph.labels["tumor"] > 0 for ph in phantoms]
    tumor = prompts()[0]
    runs = [(REFERENCE, 0)] + [(REFERENCE, s) for s in noise_seeds]
    runs += [(b, s) for b in budgets if b != REFERENCE for s in [0, *noise_seeds]]
    results = {}
    for budget, seed in runs:
        st = settings_for(budget, seed)
        seg = ImageSegmenter(clip, None, st)
        maps = seg.saliency_maps(grays, seg.text(tumor))
        masks = [coarse_mask(st, m, g) for m, g in zip(maps, grays)]
        results[(budget, seed)] = (maps, masks)
    ref_maps, ref_masks = results[(REFERENCE, 0)]
    rows = []
    for (budget, seed), (maps, masks) in results.items():
        per = {"map_correlation": [float(np.corrcoef(m.ravel(), r.ravel())[0, 1]) for m, r in zip(maps, ref_maps)],
               "mask_iou": [iou(m, r) for m, r in zip(masks, ref_masks)],
               "box_iou": [iou(box_mask(m), box_mask(r)) for m, r in zip(masks, ref_masks)],
               "dice_vs_truth": [dice(m, t) for m, t in zip(masks, truth)]}
        rows.append({"budget": label(budget, seed), "steps": budget[0], "copies": budget[1], "seed": seed,
                     "noise_row": budget == REFERENCE and seed != 0, "reference": budget == REFERENCE and seed == 0,
                     **{f"{k}_mean": float(np.mean(v)) for k, v in per.items()},
                     **{f"{k}_min": float(np.min(v)) for k, v in per.items()}, "per_slice": per})
    return {"clip": clip_dir, "slices": len(phantoms), "rows": rows, "by_budget": by_budget(rows)}


def by_budget(rows):
    """Per budget, over its seeds (the reference's own seed 0 left out): mean map correlation, mask IoU and
    box IoU with the reference, the share of slices whose mask IoU is under 0.5 (a mask that moved), and the
    Dice against the truth. The reference budget's row is M2IB's own noise."""
    out = {}
    for r in rows:
        if r["reference"]:
            continue
        key = f"{r['steps']} steps x {r['copies']} copies"
        out.setdefault(key, []).append(r)
    return {key: {"seeds": [r["seed"] for r in rs], "noise": rs[0]["noise_row"],
                  "map_correlation": float(np.mean([r["map_correlation_mean"] for r in rs])),
                  "mask_iou": float(np.mean([r["mask_iou_mean"] for r in rs])),
                  "box_iou": float(np.mean([r["box_iou_mean"] for r in rs])),
                  "moved_masks": float(np.mean([np.mean(np.array(r["per_slice"]["mask_iou"]) < 0.5) for r in rs])),
                  "dice_vs_truth": float(np.mean([r["dice_vs_truth_mean"] for r in rs]))}
            for key, rs in out.items()}


def speed(budgets, repeats, key_slices, size):
    import torch

    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.image import ImageSegmenter
    from MedCLIPSAMLib.pipeline.preprocess import intensity_range, normalize_to_uint8
    from MedCLIPSAMLib.pipeline.text import make_prompt

    import SimpleITK as sitk

    clip = load_clip("random-biomedclip")
    ph = make_volume("mr", shape=(24, size, size), seed=7, lesion={"side": "left"})
    volume = sitk.GetArrayFromImage(ph.image)
    window = intensity_range(volume)
    grays = [normalize_to_uint8(volume[k], value_range=window) for k in np.linspace(8, 16, key_slices).astype(int)]
    budgets = [REFERENCE] + [b for b in budgets if b != REFERENCE]
    seconds = {b: [] for b in budgets}
    for _ in range(repeats):
        for b in budgets:
            seg = ImageSegmenter(clip, None, settings_for(b, 0))
            text = seg.text(make_prompt("brain tumor"))
            t = time.perf_counter()
            seg.saliency_maps(grays, text)
            seconds[b].append(time.perf_counter() - t)
    best_ref = min(seconds[REFERENCE])
    return {"model": "random-biomedclip", "key_slices": key_slices, "slice_size": size,
            "threads": torch.get_num_threads(), "autocast": "auto (preset v2)",
            "rows": [{"budget": label(b), "steps": b[0], "copies": b[1], "seconds": s, "best_s": min(s),
                      "speedup_vs_reference": best_ref / min(s)} for b, s in seconds.items()]}


def main(argv=None):
    from MedCLIPSAMLib.runtime import prepare_openmp

    prepare_openmp()  # as medclipsam does, before torch loads
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", help="a CLIP folder trained on phantoms (quality part; without it only speed)")
    p.add_argument("--budgets", default="10x10,10x5,10x3,10x2,7x10,5x10",
                   help="STEPSxCOPIES, comma-separated (default %(default)s); 10x10 is the reference")
    p.add_argument("--slices", type=int, default=48, help="held-out tumour slices for the quality part")
    p.add_argument("--noise-seeds", default="1,2", help="other seeds, for every budget; the reference's are its noise")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--key-slices", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    budgets = parse_budgets(args.budgets)
    from benchmarks.cpu_minute import host_record

    out = host_record("m2ib_budget", beside="nothing started by this script")
    if args.clip:
        out["quality"] = quality(args.clip, budgets, args.slices, [int(s) for s in args.noise_seeds.split(",") if s])
        print(f"\nquality on {out['quality']['slices']} held-out phantom tumour slices ({args.clip}), "
              "against 10 steps x 10 copies, seed 0 (mean / min over slices)")
        print(f"{'budget':<32} {'map corr':>15} {'mask IoU':>15} {'box IoU':>15} {'Dice vs truth':>14}")
        for r in out["quality"]["rows"]:
            cells = [f"{r[k + '_mean']:.3f} / {r[k + '_min']:.3f}" for k in ("map_correlation", "mask_iou", "box_iou")]
            print(f"{r['budget']:<32} " + " ".join(f"{c:>15}" for c in cells) + f" {r['dice_vs_truth_mean']:>14.3f}")
        print(f"\nper budget over its seeds (10 steps x 10 copies: other seeds of the reference = M2IB's own noise)")
        print(f"{'budget':<32} {'map corr':>9} {'mask IoU':>9} {'box IoU':>9} {'moved':>7} {'Dice':>7}")
        for key, b in out["quality"]["by_budget"].items():
            print(f"{key + (' (noise)' if b['noise'] else ''):<32} {b['map_correlation']:9.3f} {b['mask_iou']:9.3f} "
                  f"{b['box_iou']:9.3f} {100 * b['moved_masks']:6.1f}% {b['dice_vs_truth']:7.3f}")
    if not args.skip_speed:
        out["speed"] = speed(budgets, args.repeats, args.key_slices, args.size)
        print(f"\nspeed: M2IB on {args.key_slices} key slices ({args.size} px), full-size random BiomedCLIP, "
              f"{out['speed']['threads']} threads, min of {args.repeats}")
        for r in out["speed"]["rows"]:
            print(f"{r['budget']:<32} {r['best_s']:8.2f} s  {r['speedup_vs_reference']:.2f}x")
    out["load_end"] = os.getloadavg()
    if args.json:
        write_record(args.json, out)


if __name__ == "__main__":
    main()
