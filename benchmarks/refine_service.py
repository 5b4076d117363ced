"""Click refinement speed through the service's own code path (service.core.Service.refine -> Session.refine
-> the session's SAM2 cache -> the changed slices packed as the HTTP reply carries them), on this CPU.

    python -m benchmarks.refine_service --json benchmarks/results/refine_service_cpu.json

The same cases as refine_speed.py (see there for why the propagation uses the "whole-slice" decoder):
  click_cached        a positive click, "This slice only", on a slice the session already encoded;
  propagate_20        a click plus propagation through 20 cached slices (max_distance 10 each way);
  click_not_encoded   a click on a slice the session never encoded (its encoding + the decoder).
Each repeat is undone through the service (Service.undo) so it starts from the same segment. HTTP itself
(a local JSON request of a few KB) is left out. Timings from a shared CPU: noisy (load average recorded).
"""

import argparse
import os
import platform
import statistics
import time

from benchmarks import write_record
from benchmarks.refine_speed import GOALS, _load, summary, whole_slice_decoder


def main(argv=None):
    import numpy as np
    import torch

    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.refine import SliceStack
    from MedCLIPSAMLib.pipeline.session import Session
    from MedCLIPSAMLib.pipeline.session_refine import SessionEncoder
    from MedCLIPSAMLib.runtime import half_precision_helps
    from MedCLIPSAMLib.service.core import Service

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--sam", default="random-sam2.1-hiera-tiny")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"device": "cpu", "threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "settings": vars(args),
           "bf16": bool(half_precision_helps("cpu")), "load_avg_start": _load(), "goals": GOALS,
           "note": "random weights: timings only; shared CPU: noisy; in-process Service (no HTTP)"}
    print(f"refine through the service: {args.sam}, load average {_load()}", flush=True)

    session = Session("tiny-random", args.sam, device="cpu", video=False)
    session.sam_model = whole_slice_decoder(session.sam_model)   # propagation runs its full 20 slices
    service = Service(session, 1 << 30)
    ph = make_volume("mr", shape=tuple(args.shape), seed=0)
    img = ph.image
    volume_id = session.add_volume(img)
    tumour = (ph.labels["tumor"] > 0).astype(np.uint8)
    k = int(np.argmax(tumour.reshape(tumour.shape[0], -1).sum(1)))
    lo, hi = max(0, k - 10), min(args.shape[0] - 1, k + 10)
    far = hi + 2 if hi + 2 < args.shape[0] else lo - 2
    rows, cols = np.nonzero(tumour[k])

    def ras(x, y, z):
        lps = np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)]))
        return (lps * [-1, -1, 1]).tolist()

    click = ras(cols[len(cols) // 2], rows[len(rows) // 2], k)
    # the segmentation's encodings: slices lo..hi encoded as a segmentation would have left them
    stack = SliceStack(img, "axial")
    encoder = SessionEncoder(session, volume_id, stack)
    enc = []
    for j in range(lo, hi + 1):
        t = time.perf_counter()
        with session._run_lock:
            encoder.predictor_for(j)
        enc.append(time.perf_counter() - t)
    start = tumour.copy()
    start[lo:hi + 1] = 0
    start[k] = tumour[k]
    from MedCLIPSAMLib.pipeline.session_refine import pack_bits

    body = {"segment_id": "tumour", "points": [{"position": click, "label": 1}], "frame": "RAS", "axis": "axial",
            "propagate": False, "mask": pack_bits(start)}

    def run(**change):
        b = dict(body, **change)
        t = time.perf_counter()
        reply = service.refine(volume_id, b)
        took = time.perf_counter() - t
        service.undo(volume_id, "tumour")
        return reply, took

    run()                                               # warm-up
    clicks = [run(mask=None)[1] for _ in range(args.repeats)]
    props, reply = [], None
    for _ in range(args.repeats):
        reply, t = run(mask=None, propagate=True, max_distance=10)
        props.append(t)
    fresh = []
    for j in (far, far + (1 if far > k else -1)):
        if 0 <= j < args.shape[0]:
            fresh.append(run(mask=None, points=[{"position": ras(cols[len(cols) // 2], rows[len(rows) // 2], j),
                                                 "label": 1}])[1])
    carried = [s["index"] for s in reply["slices"] if s["index"] != k]
    out["results"] = {"encode_per_slice": summary(enc), "click_cached": summary(clicks),
                      "propagate_20": dict(summary(props), slices_carried=len(carried), stops=reply["stops"]),
                      "click_not_encoded": summary(fresh),
                      "carry_per_slice_s": (statistics.median(props) - statistics.median(clicks)) / max(1, len(carried)),
                      "cache": session.cache.stats()}
    out["load_avg_end"] = _load()
    out["goals_met"] = {"click_cached_s": statistics.median(clicks) < GOALS["click_cached_s"],
                        "propagate_20_s": statistics.median(props) < GOALS["propagate_20_s"]}
    print(f"click on a cached slice {statistics.median(clicks):.3f} s, click + propagation through {len(carried)} "
          f"slices {statistics.median(props):.3f} s, click on a slice not encoded {statistics.median(fresh):.2f} s; "
          f"load average {out['load_avg_start']} -> {out['load_avg_end']}", flush=True)
    if args.json:
        write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
