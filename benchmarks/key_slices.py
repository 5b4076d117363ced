"""Issue 22: the key slices' saliency, slice by slice against one batch, side by side in one run.

    python -m benchmarks.key_slices [--shape 112 256 256] [--repeats 3] [--json benchmarks/results/key_slices_cpu.json]

The v2 preset's saliency (M2IB, 10 steps x 10 noisy copies) on the 3 key slices of the MR phantom that
cpu_minute segments (112x256x256, seed 5, large lesion), with the full-size random-weight BiomedCLIP:
  loop   ImageSegmenter.saliency_map per slice (what volume._key_slices did before: M2IB at batch 1, 3 times);
  batch  ImageSegmenter.saliency_maps on the 3 slices at once (what it does now: one M2IB fit of 3 images).
Each precision (--precisions: the preset's own autocast, "auto" = bf16 on a CPU with native bf16, and fp32)
runs loop and batch interleaved, alternating which goes first, --repeats times; per variant the min and
median CPU seconds (time.process_time: all of this process's threads) and wall seconds. Also the max
|difference| of the maps: batch vs loop (same precision) and each precision vs fp32. The key slices are
the 3 slices with the largest lesion area (the gate's ranking is meaningless with random weights; the
cost does not depend on which slices). Threads as the CLI sets them (all usable cores). The machine is
shared: the load average is recorded before and after each measurement. Timings belong here, never in tests.
"""

import argparse
import os
import platform
import statistics
import time

from benchmarks import write_record

CLIP = "random-biomedclip"
NOTE = ("shared 2-core machine (other jobs ran alongside; see the load averages): compare the interleaved "
        "loop/batch variants, not absolute seconds")


def _load():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _timed(fn):
    """(result, CPU seconds, wall seconds, load before, load after) of fn()."""
    load = _load()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall, load, _load()


def key_slices(shape, count):
    """(VolumeSegmenter prepared on the MR phantom, its `count` slices with the largest lesion area)."""
    import numpy as np

    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.volume import VolumeSegmenter

    ph = make_volume("mr", shape=tuple(shape), seed=5, lesion={"size": "large"})
    lesion = min((m for m in ph.labels.values() if m.any()), key=lambda m: int(m.sum()))  # as cpu_minute
    seg = VolumeSegmenter(load_clip(CLIP), None, get_preset("v2", ["sam=none"]))
    seg._prepare(ph.image)
    area = np.array([int(seg.view.get(lesion, k).sum()) for k in range(seg.view.count)])
    return seg, sorted(np.argsort(-area)[:count].tolist())


def measure(segmenter, grays, text, repeats):
    """Interleaved loop / batch runs of one segmenter's saliency: {variant: [run dicts]}, {variant: maps}."""
    import numpy as np

    variants = {"loop": lambda: [segmenter.saliency_map(g, text) for g in grays],
                "batch": lambda: segmenter.saliency_maps(grays, text)}
    runs, maps = {name: [] for name in variants}, {}
    for r in range(repeats):
        for name in (("loop", "batch") if r % 2 == 0 else ("batch", "loop")):
            out, cpu, wall, before, after = _timed(variants[name])
            maps[name] = np.stack(out)
            runs[name].append({"cpu_s": cpu, "wall_s": wall, "load_before": before, "load_after": after})
            print(f"  {name:5s} repeat {r}: {cpu:6.1f} CPU s {wall:6.1f} s wall  load {before[0]:.1f}", flush=True)
    return runs, maps


def summary(runs):
    cpu, wall = [r["cpu_s"] for r in runs], [r["wall_s"] for r in runs]
    return {"cpu_min_s": min(cpu), "cpu_median_s": statistics.median(cpu),
            "wall_min_s": min(wall), "wall_median_s": statistics.median(wall)}


def main(argv=None):
    import numpy as np
    import torch

    from benchmarks.speed import cpu_description
    from MedCLIPSAMLib.runtime import configure_threads, half_precision_helps

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(112, 256, 256))
    parser.add_argument("--key-slices", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    threads = configure_threads()
    seg, keys = key_slices(args.shape, args.key_slices)
    grays = [seg.gray8(k) for k in keys]
    text = seg.segmenter.text(_prompt(seg))
    print(f"key slices {keys} of {args.shape}, {threads} threads, load {_load()}", flush=True)
    record = {"shape": list(args.shape), "key_slices": keys, "clip": CLIP, "threads": threads,
              "saliency": seg.settings.saliency, "saliency_settings": seg.settings.saliency_settings,
              "auto_autocast_is_bf16": half_precision_helps("cpu"), "torch": torch.__version__,
              "python": platform.python_version(), **cpu_description(), "load_start": _load(), "precisions": {},
              "note": NOTE}
    maps = {}
    for precision in args.precisions:
        autocast = {"auto": "auto", "fp32": False, "bf16": True}[precision]
        seg.segmenter.settings = seg.settings.replace(autocast=autocast)
        print(f"{precision} (autocast={autocast})", flush=True)
        runs, maps[precision] = measure(seg.segmenter, grays, text, args.repeats)
        record["precisions"][precision] = {
            "autocast": autocast, "runs": runs, **{name: summary(r) for name, r in runs.items()},
            "max_abs_diff_batch_vs_loop": float(np.abs(maps[precision]["batch"] - maps[precision]["loop"]).max())}
    if "fp32" in maps:
        for precision, m in maps.items():
            diff = np.abs(m["loop"] - maps["fp32"]["loop"]).max()
            record["precisions"][precision]["max_abs_diff_vs_fp32"] = float(diff)
    record["load_end"] = _load()
    print_table(record)
    if args.json:
        write_record(args.json, record)
        print(f"wrote {args.json}")
    return 0


def _prompt(seg):
    from MedCLIPSAMLib.pipeline.text import make_prompt

    return make_prompt("brain tumor", seg.settings.ensemble)


def print_table(record):
    n = len(record["key_slices"])
    print(f"\nM2IB saliency of {n} key slices, {record['clip']}, {record['threads']} threads "
          f"(shared machine; load {record['load_start'][0]:.1f} at start, {record['load_end'][0]:.1f} at end)")
    print(f"{'precision':10s}{'variant':8s}{'CPU s min':>10s}{'median':>8s}{'wall s min':>11s}{'median':>8s}"
          f"{'CPU/slice':>10s}")
    for precision, rec in record["precisions"].items():
        for name in ("loop", "batch"):
            s = rec[name]
            print(f"{precision:10s}{name:8s}{s['cpu_min_s']:10.1f}{s['cpu_median_s']:8.1f}{s['wall_min_s']:11.1f}"
                  f"{s['wall_median_s']:8.1f}{s['cpu_median_s'] / n:10.1f}")
        ratio = rec["loop"]["cpu_median_s"] / rec["batch"]["cpu_median_s"]
        wall = rec["loop"]["wall_median_s"] / rec["batch"]["wall_median_s"]
        diff = rec.get("max_abs_diff_vs_fp32")
        vs_fp32 = f"; max |map - fp32 map| {diff:.3g}" if diff is not None else ""
        print(f"{'':10s}loop/batch (medians): CPU {ratio:.2f}x, wall {wall:.2f}x; max |batch - loop| "
              f"{rec['max_abs_diff_batch_vs_loop']:.2g}{vs_fp32}")


if __name__ == "__main__":
    raise SystemExit(main())
