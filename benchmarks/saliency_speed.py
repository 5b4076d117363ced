"""Per-slice time of the saliency methods against straightforward references, in one run.

    python -m benchmarks.saliency_speed [--json OUT.json] [--device cpu] [--measure-k 16] [--measure-steps 3]

Full-size random-weight BiomedCLIP (ViT-B/16 @224), one phantom slice, text "brain tumor":
  gScoreCAM  reference: one masked image per forward, fp32 (run_gscorecam with batch_size=1) against
             ours: the masked images batched (--batch-size), fp32 and bf16 autocast for the scoring.
  M2IB       reference: the whole encoder each step (recompute_prefix=True) against ours: blocks 0..9
             once, blocks 10-11 + head per step; fp32 and bf16.
  GradCAM    fp32 and bf16.
Each variant runs once after a warm-up. A CPU cannot afford 300 one-at-a-time ViT-B forwards per run,
so gScoreCAM is measured with --measure-k channels and M2IB with --measure-steps steps, and the per-slice
time at the paper's settings (k=300, 10 steps) is extrapolated linearly: time = fixed part + per-item
part x count (the fixed part, the ranking pass / the prefix, is measured on its own). With
--measure-k 300 --measure-steps 10 nothing is extrapolated. Max |map difference| compares each variant
with the fp32 reference at the measured settings. Timings belong here, never in tests.
"""

import argparse
import os
import platform
import time

from benchmarks import write_record


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _phantom_slice(clip):
    """A 224x224 brain-like slice: a bright disc (the 'tumour') in a grey ellipse on black."""
    import numpy as np

    yy, xx = np.mgrid[:224, :224]
    gray = np.zeros((224, 224), np.float32)
    gray[((yy - 112) / 95.0) ** 2 + ((xx - 112) / 80.0) ** 2 < 1] = 90
    gray[(yy - 80) ** 2 + (xx - 140) ** 2 < 22 ** 2] = 220
    gray += np.random.default_rng(0).normal(0, 6, gray.shape)
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return clip.preprocess_array(np.stack([gray] * 3, -1))


def _extrapolate(total, fixed, measured, target):
    """Linear cost model: fixed + (total - fixed) / measured * target."""
    return fixed + max(total - fixed, 0.0) / measured * target


def main(argv=None):
    import numpy as np
    import torch

    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.runtime import select_device
    from MedCLIPSAMLib.saliency import gscorecam as gs
    from MedCLIPSAMLib.saliency.common import as_batch, get_module, logit_scale, text_matrix
    from MedCLIPSAMLib.saliency.gradcam import gradcam
    from MedCLIPSAMLib.saliency.m2ib import run_m2ib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-biomedclip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--topk", type=int, default=300, help="gScoreCAM channels the times are given for")
    p.add_argument("--measure-k", type=int, default=16, help="gScoreCAM channels actually run")
    p.add_argument("--batch-size", type=int, help="masked images per forward (ours; default as the library: "
                   "64 on a GPU, 16 on a CPU)")
    p.add_argument("--steps", type=int, default=10, help="M2IB steps the times are given for")
    p.add_argument("--measure-steps", type=int, default=3, help="M2IB steps actually run")
    p.add_argument("--copies", type=int, default=10, help="M2IB noisy copies per step")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    device = select_device(args.device)
    if args.batch_size is None:
        args.batch_size = gs.default_batch_size(device)
    torch.manual_seed(0)
    clip, load_s = _timed(load_clip, args.model, device)
    image = _phantom_slice(clip)
    text = clip.encode_text(["brain tumor"])[0]
    k, steps = args.measure_k, args.measure_steps
    m2ib_common = dict(steps=steps, batch_size=args.copies)

    # warm-up: first calls pay for lazy initialisation and kernel selection
    gs.run_gscorecam(clip, image, text, topk=2, batch_size=2)
    gs.run_gscorecam(clip, image, text, topk=2, batch_size=2, autocast=True)
    run_m2ib(clip, image, text, steps=1, batch_size=2)
    run_m2ib(clip, image, text, steps=1, batch_size=2, autocast=True)
    gradcam(clip, image, text)

    rows, maps = {}, {}

    # gScoreCAM: the ranking pass (one forward + backward, fp32) is the fixed part of every variant
    x = as_batch(image, device)
    texts = text_matrix(text, 1, device)
    layer = get_module(clip.model, gs.DEFAULT_LAYER)
    _, rank_s = _timed(gs._activations_and_ranking, clip, x, texts, logit_scale(clip), layer)
    variants = {"gscorecam reference (1 image/forward, fp32)": dict(batch_size=1),
                f"gscorecam ours (batch {args.batch_size}, fp32)": dict(batch_size=args.batch_size),
                f"gscorecam ours (batch {args.batch_size}, bf16)": dict(batch_size=args.batch_size, autocast=True)}
    for name, settings in variants.items():
        result, seconds = _timed(gs.run_gscorecam, clip, image, text, topk=k, **settings)
        maps[name] = result.maps[0]
        rows[name] = {"measured_s": seconds, "measured_at": f"k={k}",
                      "per_slice_s": _extrapolate(seconds, rank_s, k, args.topk), "at": f"k={args.topk}"}

    # M2IB: the fixed part is a 0-step run (prefix pass, map); the rest scales with the steps
    _, m2ib_fixed = _timed(run_m2ib, clip, image, text, steps=0)
    variants = {"m2ib reference (whole encoder/step, fp32)": dict(recompute_prefix=True),
                "m2ib ours (cached prefix, fp32)": dict(),
                "m2ib ours (cached prefix, bf16)": dict(autocast=True)}
    for name, settings in variants.items():
        result, seconds = _timed(run_m2ib, clip, image, text, **m2ib_common, **settings)
        maps[name] = result.maps[0]
        rows[name] = {"measured_s": seconds, "measured_at": f"{steps} steps x {args.copies} copies",
                      "per_slice_s": _extrapolate(seconds, m2ib_fixed, steps, args.steps), "at": f"{args.steps} steps"}

    for name, amp in (("gradcam (fp32)", False), ("gradcam (bf16)", True)):
        result, seconds = _timed(gradcam, clip, image, text, autocast=amp)
        maps[name] = result[0]
        rows[name] = {"measured_s": seconds, "measured_at": "1 pass", "per_slice_s": seconds, "at": "1 pass"}

    # ratios and map differences against each method's fp32 reference
    references = {"gscorecam": "gscorecam reference (1 image/forward, fp32)",
                  "m2ib": "m2ib reference (whole encoder/step, fp32)", "gradcam": "gradcam (fp32)"}
    for name, row in rows.items():
        ref = references[name.split()[0]]
        row["speedup_vs_reference"] = rows[ref]["per_slice_s"] / row["per_slice_s"]
        row["max_abs_map_diff_vs_reference"] = float(np.abs(maps[name] - maps[ref]).max())

    print(f"saliency per slice, {args.model} on {device} ({torch.get_num_threads()} threads), "
          f"load {load_s:.1f} s")
    header = (f"{'variant':46s} {'measured':>9s} {'at':>20s} {'per slice':>10s} {'at':>9s} {'speedup':>8s} "
              f"{'max|dmap|':>10s}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:46s} {row['measured_s']:8.2f}s {row['measured_at']:>20s} {row['per_slice_s']:9.2f}s "
              f"{row['at']:>9s} {row['speedup_vs_reference']:7.2f}x {row['max_abs_map_diff_vs_reference']:10.2e}")
    print(f"(gScoreCAM ranking pass {rank_s:.2f} s; M2IB fixed part {m2ib_fixed:.2f} s; per-slice times beyond the "
          f"measured settings are linear extrapolations)")

    if args.json:
        payload = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "settings": vars(args), "gscorecam_ranking_s": rank_s,
                   "m2ib_fixed_s": m2ib_fixed, "results": rows}
        write_record(args.json, payload)
    return rows


if __name__ == "__main__":
    main()
