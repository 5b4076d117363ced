"""Issue 37 lever: a coarse-to-fine presence gate. Would scoring every second slice, then only the slices
around the kept range, keep exactly the slices the full gate keeps?

    python -m benchmarks.gate_coarse [--clip CLIP_DIR] [--json benchmarks/results/gate_coarse_cpu.json]

The gate (pipeline/volume.py VolumeSegmenter.gate) embeds every non-blank slice with CLIP, rescales the
slice-prompt cosines to [0, 1] within the volume and keeps the slices at or above 0.5 plus one neighbour on
each side (and, for prompts with absent sentences, only near a slice whose lead over them is positive).
Coarse-to-fine, simulated with the gate's own code on subsets of the same embeddings (so the embeddings,
and the only difference is which slices were scored):
  1. the gate on every second candidate slice;
  2. the gate again on those plus every skipped slice within `reach` slices of the coarse kept range.
Slices scored = the saving (the gate's cost is one CLIP image pass a slice). The lever is worth taking
only if the kept slices are identical to the full gate's on every volume and prompt.

Volumes: held-out MR head phantoms (lesion and lesion-free, phantom_accuracy's 3D check) with the prompts
of that benchmark, scored with a CLIP trained on phantoms (--clip, from `python -m benchmarks.phantom_accuracy
--keep DIR`), and a 112x256x256 MR phantom with the full-size random-weight BiomedCLIP (prompts of the
README's example). Random weights say nothing of accuracy; they do show whether the decision is stable.
"""

import argparse
import os

import numpy as np

from benchmarks import write_record


def kept_with(seg, indices, feats, text, prompt, subset):
    """The gate's kept slices when only `subset` (positions into indices) was scored."""
    seg._slice_embeddings = (indices[subset], feats[subset])
    return set(seg.gate(text, prompt)[0].tolist())


def coarse_to_fine(seg, image, prompt, reach):
    seg._prepare(image)
    text = seg.segmenter.text(prompt)
    indices, feats = seg.slice_embeddings()
    everything = np.arange(len(indices))
    full = kept_with(seg, indices, feats, text, prompt, everything)
    coarse_positions = everything[::2]
    coarse = kept_with(seg, indices, feats, text, prompt, coarse_positions)
    if coarse:
        lo, hi = min(coarse) - reach, max(coarse) + reach
        extra = [i for i in everything[1::2] if lo <= indices[i] <= hi]
    else:
        extra = []
    fine_positions = np.array(sorted(set(coarse_positions.tolist()) | set(extra)), dtype=int)
    fine = kept_with(seg, indices, feats, text, prompt, fine_positions)
    seg._slice_embeddings = (indices, feats)
    return {"prompt": prompt.text, "candidates": int(len(indices)), "scored": int(len(fine_positions)),
            "saved_fraction": 1 - len(fine_positions) / max(1, len(indices)),
            "full_kept": sorted(full), "coarse_to_fine_kept": sorted(fine), "identical": full == fine,
            "only_full": sorted(full - fine), "only_coarse": sorted(fine - full)}


def phantom_cases(clip_dir, n_lesion, n_normal, shape, reach):
    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

    from benchmarks.phantom_accuracy import liver_prompt, preset_settings, prompts

    clip = load_clip(clip_dir)
    settings = preset_settings("v2").replace(sam="none", ensemble=False)
    rows = []
    for i in range(n_lesion + n_normal):
        lesion = {"side": ("left", "right")[i % 2], "size": "large"} if i < n_lesion else False
        ph = make_volume("mr", shape=shape, seed=9000 + i, lesion=lesion)
        seg = VolumeSegmenter(clip, None, settings, VolumeOptions(mode="per-slice"))
        for prompt in (*prompts(), liver_prompt()):
            rows.append({"volume": f"phantom MR {shape[0]}x{shape[1]}x{shape[2]} seed {9000 + i}"
                         f"{' (tumour)' if lesion else ''}", "clip": clip_dir,
                         **coarse_to_fine(seg, ph.image, prompt, reach)})
    return rows


def random_case(shape, reach, prompts_text):
    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.text import make_prompt
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

    clip = load_clip("random-biomedclip")
    ph = make_volume("mr", shape=shape, seed=0, lesion={"side": "left"})
    seg = VolumeSegmenter(clip, None, get_preset("v2", ["sam=none"]), VolumeOptions(mode="per-slice"))
    return [{"volume": f"phantom MR {shape[0]}x{shape[1]}x{shape[2]} seed 0 (tumour)", "clip": "random-biomedclip",
             **coarse_to_fine(seg, ph.image, make_prompt(text), reach)} for text in prompts_text]


def main(argv=None):
    from MedCLIPSAMLib.runtime import prepare_openmp

    prepare_openmp()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", help="a CLIP folder trained on phantoms (the phantom volumes)")
    p.add_argument("--volumes", type=int, nargs=2, default=(4, 4), metavar=("LESION", "NORMAL"))
    p.add_argument("--volume-shape", type=int, nargs=3, default=(20, 128, 128))
    p.add_argument("--random-shape", type=int, nargs=3, default=(112, 256, 256),
                   help="the random-weight BiomedCLIP volume (0 0 0: skip)")
    p.add_argument("--reach", type=int, default=2, help="skipped slices scored within this many of the coarse range")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from benchmarks.cpu_minute import host_record

    out = host_record("gate_coarse", reach=args.reach)
    rows = []
    if args.clip:
        rows += phantom_cases(args.clip, *args.volumes, tuple(args.volume_shape), args.reach)
    if all(args.random_shape):
        rows += random_case(tuple(args.random_shape), args.reach, ("brain tumor", "brain", "ventricles"))
    out["rows"] = rows
    out["all_identical"] = all(r["identical"] for r in rows)
    out["mean_saved_fraction"] = float(np.mean([r["saved_fraction"] for r in rows])) if rows else None
    print(f"\n{'volume':<44} {'prompt':<12} {'kept':>4} {'scored':>10} {'identical':>9}  differences")
    for r in rows:
        diff = "" if r["identical"] else f"full only {r['only_full']}, coarse only {r['only_coarse']}"
        print(f"{r['volume']:<44} {r['prompt'][:12]:<12} {len(r['full_kept']):>4} {r['scored']:>4} of {r['candidates']:<3} "
              f"{str(r['identical']):>9}  {diff}")
    print(f"identical everywhere: {out['all_identical']}; slices not scored: {100 * (out['mean_saved_fraction'] or 0):.0f} %")
    out["load_end"] = os.getloadavg()
    if args.json:
        write_record(args.json, out)


if __name__ == "__main__":
    main()
