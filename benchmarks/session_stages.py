"""Where a second prompt's time goes: one Session (models loaded once), three v2 requests on one MR
phantom ("brain tumor", "brain", "brain tumor" again), each stage's wall seconds from the progress stream,
and the session cache's hits and misses after each request. Full-size random-weight models.

    python -m benchmarks.session_stages [--shape 40 256 256] [--sam random-medsam2] [--json benchmarks/results/session_stages_cpu.json]
"""

import argparse
import io
import json
import os
import time

from benchmarks import write_record

CLIP = "random-biomedclip"


class StageClock(io.StringIO):
    """A progress stream (`--progress json` lines) that adds the time between lines to the stage named."""

    def __init__(self):
        super().__init__()
        self.last, self.seconds = time.perf_counter(), {}

    def write(self, text):
        for line in text.splitlines():
            try:
                stage = json.loads(line)["stage"]
            except (ValueError, KeyError, TypeError):
                continue
            now = time.perf_counter()
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self.last, 2)
            self.last = now
        return len(text)


def main(argv=None):
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.session import Session, SegmentRequest
    from MedCLIPSAMLib.progress import ProgressReporter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--sam", default="random-medsam2",
                   help="random-medsam2 (the default SAM's stand-in) or random-sam2.1-hiera-tiny (the earlier record)")
    p.add_argument("--json", default="benchmarks/results/session_stages_cpu.json")
    args = p.parse_args(argv)

    models = (CLIP, args.sam)
    session = Session(*models, device=args.device)
    image = make_volume("mr", shape=tuple(args.shape), seed=7, lesion={"size": "large", "brightness": "bright"}).image
    volume_id = session.add_volume(image)
    rows = []
    for name, prompt in (("first prompt", "brain tumor"), ("second prompt", "brain"), ("first again", "brain tumor")):
        request = SegmentRequest(prompts=[prompt], preset="v2")
        clock = StageClock()
        load = os.getloadavg()[0]
        start = time.perf_counter()
        result = session.segment(volume_id, request.make_prompts(), request.settings(), request.options(),
                                 ProgressReporter("json", stream=clock))
        stats = session.cache.stats()
        rows.append({"request": name, "prompt": prompt, "seconds": round(time.perf_counter() - start, 2),
                     "stages": clock.seconds, "kept_slices": result.report[0]["kept"] if result.report else None,
                     "cache_hits": stats["hits"], "cache_misses": stats["misses"],
                     "sam2_encodings_held": stats["by_kind"].get("sam2", {}).get("entries", 0),
                     "load_average": round(load, 1)})
        print(rows[-1], flush=True)
    out = {"shape_zyx": list(args.shape), "models": list(models), "load_end": round(os.getloadavg()[0], 1), "preset": "v2", "device": args.device,
           "requests": rows, "second_over_first": round(rows[1]["seconds"] / rows[0]["seconds"], 3)}
    write_record(args.json, out)
    print(f"{'request':16s} {'seconds':>8s}  stages")
    for r in rows:
        print(f"{r['request']:16s} {r['seconds']:8.1f}  {r['stages']}")
    print(f"second / first: {out['second_over_first']:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
