"""Issue 22: the last ViT block for the pooled token only (models/clip_image.py) against the full block, side
by side in one run.

    python -m benchmarks.pooled_token [--repeats 3] [--json benchmarks/results/pooled_token_cpu.json]

On the MR phantom that cpu_minute segments (112x256x256, seed 5, large lesion), full-size random-weight
BiomedCLIP, the CPU's default precision (bf16 autocast where the CPU has native bf16), threads as the CLI
sets them:
  gate   the presence gate's CLIP image embeddings of 32 slices (2 batches of 16, as the gate batches them);
  m2ib   the v2 preset's M2IB (10 steps x 10 noisy copies) on the 3 key slices at once, as the pipeline runs it.
Each runs "full" (every block on every token: pools_first_token forced off) and "pooled" (the default),
interleaved, alternating which goes first, --repeats times; min and median wall and CPU seconds, and the
max |difference| of the outputs (embeddings; maps in [0, 1]) pooled vs full, in bf16 and in fp32.
Timings belong here, never in tests.
"""

import argparse
import platform
import statistics

from benchmarks import write_record
from benchmarks.key_slices import _load, _prompt, _timed, key_slices


def _variants(seg, grays, text):
    import numpy as np
    import torch

    from MedCLIPSAMLib.pipeline.image import clip_input

    batch = torch.stack([clip_input(seg.clip, seg.gray8(k)) for k in range(40, 72)])

    def gate():
        with torch.no_grad(), seg_autocast(seg):
            return torch.cat([seg.clip.encode_image(batch[s:s + 16]) for s in range(0, len(batch), 16)]).float()

    return {"gate": gate, "m2ib": lambda: torch.from_numpy(np.stack(seg.segmenter.saliency_maps(grays, text)))}


def seg_autocast(seg):
    from MedCLIPSAMLib.runtime import autocast

    return autocast(seg.clip.device, seg.settings.autocast)


def run(seg, grays, text, repeats):
    import MedCLIPSAMLib.models.clip_image as clip_image

    pooled_check = clip_image.pools_first_token
    switch = {"pooled": pooled_check, "full": lambda *args: False}
    stages = _variants(seg, grays, text)
    out = {}
    try:
        for stage, fn in stages.items():
            runs, outputs = {"full": [], "pooled": []}, {}
            for r in range(repeats):
                for name in (("full", "pooled") if r % 2 == 0 else ("pooled", "full")):
                    clip_image.pools_first_token = switch[name]
                    outputs[name], cpu, wall, before, after = _timed(fn)
                    runs[name].append({"cpu_s": cpu, "wall_s": wall, "load_before": before, "load_after": after})
                    print(f"  {stage} {name:6s} repeat {r}: {wall:6.2f} s wall {cpu:6.2f} CPU s  load {before[0]:.1f}",
                          flush=True)
            summary = {name: {"wall_min_s": min(x["wall_s"] for x in v),
                              "wall_median_s": statistics.median(x["wall_s"] for x in v),
                              "cpu_median_s": statistics.median(x["cpu_s"] for x in v)} for name, v in runs.items()}
            out[stage] = {"runs": runs, **summary,
                          "speedup_median_wall": summary["full"]["wall_median_s"] / summary["pooled"]["wall_median_s"],
                          "max_abs_diff": float((outputs["pooled"] - outputs["full"]).abs().max())}
    finally:
        clip_image.pools_first_token = pooled_check
    return out


def main(argv=None):
    import torch

    from benchmarks.speed import cpu_description
    from MedCLIPSAMLib.runtime import configure_threads, half_precision_helps

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(112, 256, 256))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    threads = configure_threads()
    seg, keys = key_slices(args.shape, 3)
    grays = [seg.gray8(k) for k in keys]
    text = seg.segmenter.text(_prompt(seg))
    record = {"shape": list(args.shape), "key_slices": keys, "threads": threads, "torch": torch.__version__,
              "python": platform.python_version(), "auto_autocast_is_bf16": half_precision_helps("cpu"),
              **cpu_description(), "load_start": _load()}
    print(f"{threads} threads, default precision (autocast={seg.settings.autocast}), load {_load()}", flush=True)
    record["default_precision"] = run(seg, grays, text, args.repeats)
    seg.segmenter.settings = seg.settings = seg.settings.replace(autocast=False)
    print("fp32 (one repeat: differences only)", flush=True)
    record["fp32"] = {stage: {"max_abs_diff": v["max_abs_diff"]} for stage, v in run(seg, grays, text, 1).items()}
    record["load_end"] = _load()
    print(f"\n{'stage':6s} {'full (median s)':>16s} {'pooled':>8s} {'speed-up':>9s} {'max diff':>9s} {'fp32 diff':>10s}")
    for stage, v in record["default_precision"].items():
        print(f"{stage:6s} {v['full']['wall_median_s']:16.2f} {v['pooled']['wall_median_s']:8.2f} "
              f"{v['speedup_median_wall']:8.2f}x {v['max_abs_diff']:9.1e} {record['fp32'][stage]['max_abs_diff']:10.1e}")
    if args.json:
        write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
