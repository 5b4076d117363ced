"""One propagation step of click refinement (Refiner._predict on a cached slice: box + mask prompt, one mask)
under a few settings, interleaved so the shared CPU's load hits them alike; plus how far bf16 autocast
moves the mask from fp32's (plain random weights, fp32 encodings).

    python -m benchmarks.refine_decoder --json benchmarks/results/refine_decoder_cpu.json

Variants: bf16 autocast (the default on a CPU with native bf16), fp32, bf16 with the prompt encoder's
dense positional encoding computed once (it depends on the model only), bf16 on 2 threads.
The timing variants use refine_speed.whole_slice_decoder (same arithmetic, every mask non-empty).
"""

import argparse
import statistics
import time

from benchmarks import write_record
from benchmarks.refine_speed import _load, whole_slice_decoder


def main(argv=None):
    import numpy as np
    import torch

    from MedCLIPSAMLib.models import load_sam2
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.refine import CachedEncoder, Refiner, SliceStack

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--sam", default="random-sam2.1-hiera-tiny")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    out = {"torch": torch.__version__, "load_avg_start": _load(), "settings": vars(args)}
    ph = make_volume("mr", shape=(4, 256, 256), seed=0)
    stack = SliceStack(ph.image, "axial")
    plain = load_sam2(args.sam, "cpu")
    prev = np.zeros((256, 256), bool)
    prev[100:150, 90:160] = True
    box = np.array([[90, 100, 160, 150]], np.float32)

    model = whole_slice_decoder(plain)
    enc = CachedEncoder(model, stack, autocast="auto")
    ref = Refiner(stack, enc)
    enc.predictor_for(2)
    pe = model.sam_prompt_encoder
    dense_pe = pe.get_dense_pe
    fixed = dense_pe()
    variants = {"bf16 autocast, 1 thread (default)": (1, "auto", False), "fp32, 1 thread": (1, False, False),
                "bf16, dense PE computed once, 1 thread": (1, "auto", True), "bf16 autocast, 2 threads": (2, "auto", False)}
    times = {k: [] for k in variants}
    before = torch.get_num_threads()
    for _ in range(args.repeats + 1):
        for name, (threads, amp, once) in variants.items():
            torch.set_num_threads(threads)
            enc.autocast = amp
            pe.get_dense_pe = (lambda: fixed) if once else dense_pe
            t = time.perf_counter()
            ref._predict(2, box=box, prior=prev)
            times[name].append(time.perf_counter() - t)
    pe.get_dense_pe = dense_pe
    torch.set_num_threads(1)
    out["step_s"] = {k: {"median_s": statistics.median(v[1:]), "min_s": min(v[1:]), "runs_s": v[1:]}
                     for k, v in times.items()}

    enc = CachedEncoder(plain, stack, autocast=False)
    ref = Refiner(stack, enc)
    enc.predictor_for(2)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(8):
        m = np.zeros((256, 256), bool)
        y, x = (int(v) for v in rng.integers(40, 180, 2))
        m[y:y + 50, x:x + 60] = True
        b = np.array([[x, y, x + 60, y + 50]], np.float32)
        enc.autocast = False
        a = ref._predict(2, box=b, prior=m)
        enc.autocast = True
        c = ref._predict(2, box=b, prior=m)
        diffs.append(float((a != c).mean()))
    torch.set_num_threads(before)
    out["bf16_vs_fp32_pixels_differing"] = {"per_prompt": diffs, "max": max(diffs), "mean": float(np.mean(diffs))}
    out["load_avg_end"] = _load()
    for k, v in out["step_s"].items():
        print(f"{k}: {v['median_s']:.3f} s (min {v['min_s']:.3f})")
    print(f"bf16 vs fp32: {100 * max(diffs):.2f}% of pixels at most; load {out['load_avg_start']} -> {out['load_avg_end']}")
    if args.json:
        write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
