"""Per-volume time of the 3D modes, side by side in one run, with full-size random-weight models.

    python -m benchmarks.volume_modes [--shape 64 256 256] [--preset v1] [--json OUT.json]

Each mode runs the real VolumeSegmenter end to end on the same phantom (random BiomedCLIP architecture +
SAM 2.1 Hiera tiny, CPU unless --device says otherwise), in fp32 and bf16 autocast. Gating is on in every
mode (the paper-faithful reference is `per-slice --no-gate`, which --reference adds). Prints a table and
writes JSON. Timings belong here, never in tests.
"""

import argparse
import os
import platform
import time

from benchmarks import write_record


def run_mode(clip, sam, settings, image, mode, gate, key_slices):
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter
    from MedCLIPSAMLib.progress import ProgressReporter

    options = VolumeOptions(mode=mode, gate=gate, key_slices=key_slices)
    segmenter = VolumeSegmenter(clip, sam, settings, options, ProgressReporter("none"))
    start = time.perf_counter()
    result = segmenter(image, ["brain tumor"])
    elapsed = time.perf_counter() - start
    report = result.report[0]
    return {"seconds": elapsed, "kept_slices": report["kept"], "slices": report["slices"],
            "key_slices": len(report.get("key_slices", [])), "voxels": report.get("voxels", 0)}


def main(argv=None):
    import torch

    from MedCLIPSAMLib.models import load_clip, load_sam2
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.presets import get_preset

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--preset", default="v1")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--modes", nargs="+", default=["per-slice", "carry", "propagate"])
    p.add_argument("--reference", action="store_true", help="also run per-slice without gating (the papers)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--key-slices", type=int, default=3)
    p.add_argument("--clip", default="random-biomedclip")
    p.add_argument("--sam", default="random-sam2.1-hiera-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)

    phantom = make_volume("mr", shape=tuple(args.shape), seed=11, lesion={"size": "large"})
    clip = load_clip(args.clip, args.device)
    sam = load_sam2(args.sam, args.device, video=True)
    rows = []
    runs = [(m, True) for m in args.modes] + ([("per-slice", False)] if args.reference else [])
    for precision in args.precisions:
        settings = get_preset(args.preset, args.overrides + [f"autocast={'true' if precision == 'bf16' else 'false'}"])
        for mode, gate in runs:
            row = run_mode(clip, sam, settings, phantom.image, mode, gate, args.key_slices)
            row.update(mode=mode + ("" if gate else " (no gate)"), precision=precision)
            rows.append(row)
            print(f"{row['mode']:22} {precision:5} {row['seconds']:8.1f} s  kept {row['kept_slices']}/{row['slices']}"
                  f"  key {row['key_slices']}", flush=True)
    base = next((r["seconds"] for r in rows if r["mode"] == "per-slice" and r["precision"] == "fp32"), None)
    print(f"\n{'mode':22} {'prec':5} {'s/volume':>9} {'s/slice':>8} {'vs per-slice fp32':>18}")
    for r in rows:
        r["seconds_per_slice"] = r["seconds"] / r["slices"]
        r["speedup_vs_per_slice_fp32"] = base / r["seconds"] if base else None
        ratio = f"{r['speedup_vs_per_slice_fp32']:.2f}x" if base else "-"
        print(f"{r['mode']:22} {r['precision']:5} {r['seconds']:9.1f} {r['seconds_per_slice']:8.2f} {ratio:>18}")
    out = {"shape": list(args.shape), "preset": args.preset, "overrides": args.overrides, "clip": args.clip,
           "sam": args.sam, "device": args.device, "threads": torch.get_num_threads(), "cpu": platform.processor(),
           "cores": os.cpu_count(), "rows": rows}
    if args.json:
        write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
