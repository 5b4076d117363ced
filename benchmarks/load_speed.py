"""Loading a model from its checkpoint with and without the random init that the checkpoint overwrites
(models/no_init.py), interleaved so the shared CPU's load hits both alike, with a bit-for-bit check.

    python -m benchmarks.load_speed --json benchmarks/results/load_speed_cpu.json

"with init" is the loaders' path before no_init (build_without_init switched off: init, then load);
"without init" is today's. Each round loads the CLIP and the SAM2 model both ways (the order alternates);
a first round, not counted, pays for the imports. The two ways' models must have equal state_dicts and
non-persistent buffers (torch.equal, every key).
"""

import argparse
import statistics
import time

from benchmarks import write_record
from benchmarks.refine_speed import _load


def main(argv=None):
    import torch

    from MedCLIPSAMLib.models import builders, clip, load_clip, load_sam2, sam

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--clip", default="random-biomedclip")
    p.add_argument("--sam", default="random-medsam2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_start": _load(),
           "settings": vars(args)}
    fast = builders.build_without_init

    def load(what, init):
        off = lambda *a, **k: None  # noqa: E731 - the loaders then build normally, with init
        builders.build_without_init = sam.build_without_init = off if init else fast
        clip._loaded.clear()  # load_clip would hand back the model of the previous round
        t = time.perf_counter()
        model = load_clip(args.clip).model if what == "clip" else load_sam2(args.sam)
        return time.perf_counter() - t, model

    times = {f"{what} {way}": [] for what in ("clip", "sam2") for way in ("with init", "without init")}
    equal = {}
    try:
        for round_ in range(args.repeats + 1):
            for what in ("clip", "sam2"):
                models = {}
                for init in ((True, False) if round_ % 2 else (False, True)):
                    seconds, models[init] = load(what, init)
                    if round_:
                        times[f"{what} {'with init' if init else 'without init'}"].append(seconds)
                a, b = models[True], models[False]
                sa, sb = a.state_dict(), b.state_dict()
                ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
                equal[what] = (sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
                               and ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
                               and not any(t.is_meta for t in b.parameters()))
                del models, a, b, sa, sb, ba, bb
    finally:
        builders.build_without_init = sam.build_without_init = fast
        clip._loaded.clear()
    out["load_s"] = {k: {"median_s": statistics.median(v), "min_s": min(v), "runs_s": v} for k, v in times.items()}
    out["bit_for_bit_equal"] = equal
    out["load_avg_end"] = _load()
    for what in ("clip", "sam2"):
        with_init, without = (out["load_s"][f"{what} {w}"]["median_s"] for w in ("with init", "without init"))
        print(f"{what}: with init {with_init:.2f} s, without {without:.2f} s ({with_init / without:.2f}x), "
              f"equal: {equal[what]}")
    print(f"load {out['load_avg_start']} -> {out['load_avg_end']}")
    if args.json:
        write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
