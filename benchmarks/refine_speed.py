"""Click refinement speed (pipeline/refine.py) with full-size random-weight SAM 2.1 tiny, on this CPU.

    python -m benchmarks.refine_speed --json benchmarks/results/refine_cpu.json

On a 256x256 MR phantom (--shape), with the phantom's tumour as the segment being corrected:
  click_cached        a positive click on a slice whose encoding is cached -> the updated slice
                      ("This slice only"): one mask-decoder pass with the current mask as mask prompt;
  propagate_20        a click plus re-propagation through the 20 cached slices around it (10 each way);
  click_not_encoded   a click on a slice not yet encoded: its SAM2 image encoding + the decoder pass.
Each is repeated (--repeats) and undone in between, so every repeat starts from the same segment; median
and minimum are reported. Encodings come from refine.CachedEncoder (the session will provide its own).

Random weights make masks meaningless and would stop propagation after a slice or two (an empty or an
unchanged mask ends it). So the propagation figures use the same model with its mask decoder's output
weights set so that every mask is the whole slice (as Testing/Python/test_refine.py does): the decoder
does exactly the same arithmetic, so its time is the same, and the carry runs its full 20 slices. The
click on a cached slice is measured with both the plain random weights and that variant.
Timings are from a CPU shared with other jobs (load average recorded): they are noisy. Not a test.
"""

import argparse
import copy
import os
import platform
import statistics
import time

from benchmarks import write_record

GOALS = {"click_cached_s": 0.3, "propagate_20_s": 2.0}


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def whole_slice_decoder(model):
    """A copy whose mask decoder answers "the whole square" for any prompt (same shapes, same cost):
    zeroed conv_s0 and output-upscaling dc2 weights with dc2 bias 1 make the upscaled embedding a constant,
    zeroed hypernetwork output weights with bias 1 make every logit positive."""
    import torch

    m = copy.deepcopy(model)
    dec = m.sam_mask_decoder
    with torch.no_grad():
        dec.conv_s0.weight.zero_()
        dec.conv_s0.bias.zero_()
        dec.output_upscaling[3].weight.zero_()
        dec.output_upscaling[3].bias.fill_(1.0)
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(1.0)
    return m


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def summary(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def main(argv=None):
    import numpy as np
    import torch

    from MedCLIPSAMLib.models import load_sam2
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.refine import CachedEncoder, RefinableSegment, Refiner, SliceStack
    from MedCLIPSAMLib.runtime import half_precision_helps

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--sam", default="random-sam2.1-hiera-tiny")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--autocast", default="auto", help="auto (bf16 where the CPU has it), true or false")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = {"true": True, "false": False}.get(str(args.autocast).lower(), "auto")

    out = {"device": "cpu", "threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "settings": vars(args),
           "bf16": bool(half_precision_helps("cpu")) if amp == "auto" else amp, "load_avg_start": _load(),
           "goals": GOALS, "note": "random weights: timings only; shared CPU: noisy"}
    print(f"refine speed: {args.sam}, {torch.get_num_threads()} threads, load average {_load()}", flush=True)

    ph = make_volume("mr", shape=tuple(args.shape), seed=0)
    tumour = (ph.labels["tumor"] > 0).astype(np.uint8)
    per_slice = tumour.reshape(tumour.shape[0], -1).sum(1)
    k = int(np.argmax(per_slice))                  # the tumour's largest axial slice
    lo, hi = max(0, k - 10), min(args.shape[0] - 1, k + 10)
    far = hi + 2 if hi + 2 < args.shape[0] else lo - 2  # a slice never encoded before its click
    rows, cols = np.nonzero(tumour[k])
    click = (int(cols[len(cols) // 2]), int(rows[len(rows) // 2]), k)  # (x, y, z) index inside the tumour
    img = ph.image

    def lps(index):
        return np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))

    stack = SliceStack(img, "axial")
    plain = load_sam2(args.sam, "cpu")
    whole = whole_slice_decoder(plain)
    results = {}
    for label, model in (("plain random weights", plain), ("whole-slice decoder", whole)):
        encoder = CachedEncoder(model, stack, autocast=amp)
        refiner = Refiner(stack, encoder)
        # warm-up (first calls allocate), then encode the 21 slices the propagation will visit
        encoder.predictor_for(k)
        enc_times = [timed(lambda j=j: encoder.predictor_for(j))[1] for j in range(lo, hi + 1) if j != k]
        segment = RefinableSegment(tumour.copy())
        if label == "whole-slice decoder":
            segment.mask[lo:hi + 1] = 0        # every carried slice then changes: the carry runs all 20
            segment.mask[k] = tumour[k]
        refiner.refine_points(segment, positive=[lps(click)], frame="LPS", propagate=False)  # warm-up
        segment.undo()
        clicks = []
        for _ in range(args.repeats):
            _, t = timed(lambda: refiner.refine_points(segment, positive=[lps(click)], frame="LPS", propagate=False))
            segment.undo()
            clicks.append(t)
        row = {"encode_per_slice": summary(enc_times), "click_cached": summary(clicks),
               "cache_mb": encoder.bytes / 2**20, "slices_cached": len(encoder._cache)}
        print(f"[{label}] encode {statistics.median(enc_times):.2f} s/slice, click on a cached slice "
              f"{statistics.median(clicks):.3f} s (min {min(clicks):.3f})", flush=True)
        if label == "whole-slice decoder":
            props, carried = [], None
            for _ in range(args.repeats):
                res, t = timed(lambda: refiner.refine_points(segment, positive=[lps(click)], frame="LPS",
                                                             max_distance=10))
                carried = sorted(j for j in res.changed if j != k)
                segment.undo()
                props.append(t)
            row["propagate_20"] = summary(props)
            row["propagate_20"]["slices_carried"] = len(carried)
            row["propagate_20"]["stops"] = res.stops
            row["carry_per_slice_s"] = (statistics.median(props) - statistics.median(clicks)) / max(1, len(carried))
            print(f"[{label}] click + propagation through {len(carried)} cached slices "
                  f"{statistics.median(props):.3f} s "
                  f"(min {min(props):.3f}); stops {res.stops}", flush=True)
        else:
            fresh = []
            for j in (far, far + (1 if far > k else -1), far + (2 if far > k else -2)):
                if not 0 <= j < args.shape[0] or encoder.encoded(j):
                    continue
                pt = (click[0], click[1], j)
                _, t = timed(lambda: refiner.refine_points(segment, positive=[lps(pt)], frame="LPS", propagate=False))
                segment.undo()
                fresh.append(t)
            row["click_not_encoded"] = summary(fresh)
            print(f"[{label}] click on a slice not yet encoded {statistics.median(fresh):.2f} s", flush=True)
        results[label] = row
    out["results"] = results
    out["clicked_slice"], out["cached_range"] = k, [lo, hi]
    out["load_avg_end"] = _load()
    click_s = results["plain random weights"]["click_cached"]["median_s"]
    prop_s = results["whole-slice decoder"]["propagate_20"]["median_s"]
    out["goals_met"] = {"click_cached_s": click_s < GOALS["click_cached_s"],
                        "propagate_20_s": prop_s < GOALS["propagate_20_s"]}
    print(f"goals: click on a cached slice {click_s:.3f} s (< {GOALS['click_cached_s']}), "
          f"propagation through 20 cached slices {prop_s:.3f} s (< {GOALS['propagate_20_s']}); "
          f"load average {out['load_avg_start']} -> {out['load_avg_end']}", flush=True)
    if args.json:
        write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
