"""Issue 37: the v2 stages' speed idle and beside another process, per precision / threads / OpenMP wait policy.

    python -m benchmarks.contention --beside none,torch2 --variants "2t,2t passive,1t" --gate-slices 4 \
        --m2ib-steps 2 --sam-slices 2 --json benchmarks/results/contention_stages_cpu.json
    python -m benchmarks.contention --end-to-end --shape 8 256 256 --beside none,torch2,busy \
        --variants "bf16 2t spin,default" --json benchmarks/results/contention_e2e_cpu.json

Cases (`--beside`): for each, the competitor starts, every variant runs once in turn (so they see the same
load), the competitor stops:
    none    nothing started by us (the machine may still be shared: the load average and the busiest other
            processes are recorded with each run)
    torch2  another PyTorch process, 2 threads, a loop of 512x512 fp32 matmuls (a training run beside)
    busy    a plain Python busy loop (one core)
Stage mode (default): one child per STAGE_VARIANTS entry (threads, OpenMP wait policy); inside it, full-size
random BiomedCLIP + MedSAM2, each stage in bf16 and fp32, alternating, `--stage-repeats` times (minimum
reported): gate (CLIP image tower over --gate-slices slices), M2IB (1 key slice, --m2ib-steps steps x 10
copies), SAM2 image encoder and decoder (one box) on --sam-slices slices. A variant without a policy runs
with libgomp's default (spinning GOMP_SPINCOUNT=300000 rounds), the behaviour before issue 37.
End-to-end mode: `medclipsam segment PHANTOM --preset v2 --progress json` per VARIANTS entry in a child
(benchmarks.cpu_minute's run_segment: wall and CPU seconds per stage, peak RSS, load before and after, and
the report's runtime section), on an MR phantom (default 16x256x256).
--repeats N runs the whole sequence N times, interleaved. Random weights: speed is real, masks are
meaningless. Timings belong here, never in tests.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import write_record
from benchmarks.cpu_minute import CLIP, NEW_SAM, _load, build_random_models, host_record, run_segment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (environment, extra segment arguments). GOMP_SPINCOUNT=300000 is libgomp's own default (what torch
# ran with before `medclipsam` set OMP_WAIT_POLICY=PASSIVE; OMP_DISPLAY_ENV=VERBOSE shows the same value), and
# a variable set by the user is kept, so it gives the old behaviour in today's code.
OLD_SPIN = {"GOMP_SPINCOUNT": "300000"}
VARIANTS = {
    "bf16 2t spin": (OLD_SPIN, ["--set", "autocast=true", "--threads", "2"]),   # the default before issue 37
    "fp32 2t spin": (OLD_SPIN, ["--set", "autocast=false", "--threads", "2"]),
    "bf16 2t passive": ({}, ["--set", "autocast=true", "--threads", "2"]),
    "fp32 2t passive": ({}, ["--set", "autocast=false", "--threads", "2"]),
    "bf16 1t passive": ({}, ["--set", "autocast=true", "--threads", "1"]),
    "default": ({}, []),   # the tree's own default (its report's runtime section says what and why)
}

COMPETITORS = {
    "none": None,
    "torch2": ("import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
               "while True:\n    b = a @ a\n"),
    "busy": "while True:\n    pass\n",
}


def busiest_others(n=5):
    """The n processes (not ours) with the most CPU now: (pcpu, command) from ps, to say what ran beside."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,pid,ppid,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    mine = {os.getpid()}
    rows = []
    for line in out:
        parts = line.split(None, 3)
        if len(parts) == 4 and int(parts[1]) not in mine and int(parts[2]) not in mine:
            rows.append(f"{parts[0]}% {parts[3][:100]}")
        if len(rows) == n:
            break
    return rows


def start_competitor(kind):
    code = COMPETITORS[kind]
    if code is None:
        return None
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(3)   # let it start (torch import) and reach its loop
    return proc


def stop_competitor(proc):
    if proc is None:
        return None
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    proc.kill()
    proc.wait()
    return cpu


def table(results, variants, cases):
    """Total wall seconds per variant (rows) and case (columns), minimum over repeats, and beside / none."""
    print(f"{'variant':<18}" + "".join(f"{c:>10}" for c in cases) + "".join(f"{c + '/none':>12}" for c in cases[1:]))
    for v in variants:
        best = {c: min((r["total_wall_s"] for r in results if r["variant"] == v and r["beside"] == c), default=None)
                for c in cases}
        cells = "".join(f"{best[c]:>10.1f}" if best[c] else f"{'-':>10}" for c in cases)
        ratios = "".join(f"{best[c] / best[cases[0]]:>12.2f}" if best[c] and best[cases[0]] else f"{'-':>12}"
                         for c in cases[1:])
        print(f"{v:<18}{cells}{ratios}")


def stage_table(results, variants, cases):
    stages = []
    for r in results:
        for s in r["order"]:
            if s not in stages:
                stages.append(s)
    for c in cases:
        print(f"\nbeside {c}: wall s per stage (minimum-total run of each variant)")
        print(f"{'stage':<12}" + "".join(f"{v[:15]:>16}" for v in variants))
        picked = {}
        for v in variants:
            runs = [r for r in results if r["variant"] == v and r["beside"] == c]
            picked[v] = min(runs, key=lambda r: r["total_wall_s"]) if runs else None
        for s in stages + ["total"]:
            cells = ""
            for v in variants:
                r = picked[v]
                val = None if r is None else r["total_wall_s"] if s == "total" else r["stages"].get(s, {}).get("wall_s")
                cells += f"{val:>16.1f}" if isinstance(val, float) else f"{'-':>16}"
            print(f"{s:<12}{cells}")


# -- stage mode: one child per (threads, wait policy); inside it each stage in bf16 and fp32, interleaved ---------

STAGES = ("gate", "m2ib", "sam_encoder", "decoder")


def stage_worker(threads, gate_slices, m2ib_steps, sam_slices, repeats, seed=5):
    """In this process (its environment already set): load the models, then per repeat and precision time
    the gate (CLIP image tower over gate_slices slices, one batch), M2IB on one key slice (m2ib_steps Adam
    steps of 10 noisy copies; the preset runs 10 steps on 3 slices), SAM2's image encoder and its decoder
    (one box) on sam_slices slices. Returns {precision: {stage: [seconds per repeat]}} and what it ran."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from MedCLIPSAMLib.models import load_clip, load_sam2
    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.image import clip_input
    from MedCLIPSAMLib.pipeline.preprocess import normalize_to_uint8, pad_to_square, to_rgb
    from MedCLIPSAMLib.pipeline.sam_refine import predict_mask
    from MedCLIPSAMLib.runtime import autocast, configure_threads
    from MedCLIPSAMLib.saliency.m2ib import run_m2ib

    import SimpleITK as sitk

    n = configure_threads(threads)
    clip, sam = load_clip(CLIP, "cpu"), load_sam2(NEW_SAM, "cpu")
    predictor = image_predictor(sam)
    ph = make_volume("mr", shape=(max(gate_slices, sam_slices), 256, 256), seed=seed, lesion={"size": "large"})
    vol = sitk.GetArrayFromImage(ph.image)
    lo, hi = float(np.percentile(vol, 1)), float(np.percentile(vol, 99))
    grays = [normalize_to_uint8(vol[z], value_range=(lo, hi)) for z in range(vol.shape[0])]
    batch = torch.stack([clip_input(clip, g) for g in grays[:gate_slices]])
    key = batch[len(batch) // 2][None]
    with torch.no_grad():   # also the warm-up call
        dim = clip.encode_image(key).shape[-1]
    text = F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(0)), dim=0)
    squares = [to_rgb(pad_to_square(g)[0]) for g in grays[:sam_slices]]
    box = np.array([[96, 96, 160, 160]], np.float32)
    for amp in (True, False):   # warm-up: the first call in a precision creates its kernels (oneDNN)
        with torch.no_grad(), autocast("cpu", amp):
            clip.encode_image(batch[:1])
        run_m2ib(clip, key, text, steps=1, autocast=amp)
        with torch.inference_mode(), autocast("cpu", amp):
            predictor.set_image(squares[0])
            predict_mask(predictor, {"boxes": box, "points": None, "labels": None})
    times = {p: {s: [] for s in STAGES} for p in ("bf16", "fp32")}
    for rep in range(repeats):
        for prec in (("bf16", "fp32") if rep % 2 == 0 else ("fp32", "bf16")):
            amp = prec == "bf16"
            t0 = time.perf_counter()
            with torch.no_grad(), autocast("cpu", amp):
                clip.encode_image(batch)
            times[prec]["gate"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_m2ib(clip, key, text, steps=m2ib_steps, autocast=amp)
            times[prec]["m2ib"].append(time.perf_counter() - t0)
            enc = dec = 0.0
            for img in squares:
                with torch.inference_mode(), autocast("cpu", amp):
                    t0 = time.perf_counter()
                    predictor.set_image(img)
                    t1 = time.perf_counter()
                    predict_mask(predictor, {"boxes": box, "points": None, "labels": None})
                    t2 = time.perf_counter()
                enc, dec = enc + t1 - t0, dec + t2 - t1
            times[prec]["sam_encoder"].append(enc)
            times[prec]["decoder"].append(dec)
    return {"threads": n, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "times": times,
            "work": {"gate_slices": gate_slices, "m2ib_slices": 1, "m2ib_steps": m2ib_steps, "m2ib_copies": 10,
                     "sam_slices": sam_slices}}


# name -> (environment, threads) of a stage-mode child
STAGE_VARIANTS = {
    "2t": ({}, 2),
    "2t passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "1t": ({}, 1),
    "1t passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
}


def run_stage_child(variant, spec):
    env_extra, threads = STAGE_VARIANTS[variant]
    env = dict(os.environ, PYTHONPATH=REPO, MEDCLIPSAM_OFFLINE="1", HF_HUB_OFFLINE="1")
    for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)   # the variant alone decides (no variable: libgomp's default)
    env.update(env_extra)
    load_before, start = _load(), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.contention", "--worker",
                          json.dumps(dict(spec, threads=threads))], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"stage child {variant} failed:\n{out.stderr[-1500:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(variant=variant, wall_s=time.perf_counter() - start, load_before=load_before, load_after=_load())
    return res


def stage_tables(runs, variants, cases):
    """Per stage: minimum seconds per (variant, precision) and case, and each contended case over 'none'."""
    for stage in STAGES:
        print(f"\n{stage}: seconds (minimum over repeats)   " + "  ".join(cases))
        print(f"{'variant':<22}" + "".join(f"{c:>9}" for c in cases) + "".join(f"{c + '/none':>13}" for c in cases[1:]))
        for v in variants:
            for prec in ("bf16", "fp32"):
                best = {}
                for c in cases:
                    vals = [t for r in runs if r["variant"] == v and r["beside"] == c
                            for t in r["times"][prec][stage]]
                    best[c] = min(vals) if vals else None
                cells = "".join(f"{best[c]:>9.2f}" if best[c] else f"{'-':>9}" for c in cases)
                ratios = "".join(f"{best[c] / best[cases[0]]:>13.2f}" if best[c] and best.get(cases[0]) else
                                 f"{'-':>13}" for c in cases[1:])
                print(f"{v + ' ' + prec:<22}{cells}{ratios}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(16, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--beside", default="none,torch2,busy", help="cases, in order: none, torch2, busy")
    ap.add_argument("--variants", help="which variants, comma-separated (default: all of the mode's)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="write the figures here (after every run)")
    ap.add_argument("--end-to-end", action="store_true",
                    help="whole `segment` runs per variant (VARIANTS) instead of the stage children (STAGE_VARIANTS)")
    ap.add_argument("--gate-slices", type=int, default=8)
    ap.add_argument("--m2ib-steps", type=int, default=3)
    ap.add_argument("--sam-slices", type=int, default=3)
    ap.add_argument("--stage-repeats", type=int, default=2, help="repeats inside each stage child")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(stage_worker(spec["threads"], spec["gate_slices"], spec["m2ib_steps"], spec["sam_slices"],
                                      spec["repeats"])))
        return 0
    if not args.end_to_end:
        return stage_main(args)
    cases, variants = _cases_and_variants(args, VARIANTS)

    import SimpleITK as sitk

    from MedCLIPSAMLib.phantoms import make_volume

    record = _record("contention", VARIANTS, variants, shape_zyx=list(args.shape))

    def save():
        if args.json:
            write_record(args.json, record)

    build_random_models(NEW_SAM)
    work = tempfile.mkdtemp(prefix="contention-")
    try:
        path = os.path.join(work, "mr.nrrd")
        ph = make_volume("mr", shape=tuple(args.shape), seed=5, lesion={"size": "large"})
        sitk.WriteImage(ph.image, path)
        del ph
        text_dir = os.path.join(work, "text")   # the disk text cache: warm after the first run, as for a user
        for rep, case, v in _each_run(args.repeats, cases, variants, record):
            env, extra = VARIANTS[v]
            for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
                os.environ.pop(k, None)
            others = busiest_others()
            run = run_segment(REPO, path, work, f"{CLIP},{NEW_SAM}",
                              {"MEDCLIPSAM_TEXT_CACHE": text_dir, **env}, f"r{rep}-{case}-{v}".replace(" ", "_"),
                              extra_args=extra)
            run.update(variant=v, beside=case, repeat=rep, others_before=others)
            run["runtime"] = _runtime_of(os.path.join(work, f"r{rep}-{case}-{v}".replace(" ", "_")
                                                      + ".report.json"))
            record["runs"].append(run)
            print(f"[{case:>6}] {v:<16} {run['total_wall_s']:6.1f} s wall {run['total_cpu_s']:6.1f} s CPU "
                  f"load {run['load_before'][0]:.1f}->{run['load_after'][0]:.1f}  beside: "
                  f"{'; '.join(others[:3])}", flush=True)
            save()
        record["load_end"] = _load()
        print(f"\nv2 preset, {'x'.join(map(str, args.shape))} MR phantom, {CLIP} + {NEW_SAM} (random weights), "
              f"{record['cpu_model']} {' '.join(record['cpu_flags'])}, {os.cpu_count()} CPUs; total wall s, "
              f"minimum over {args.repeats} repeat(s)")
        table(record["runs"], variants, cases)
        stage_table(record["runs"], variants, cases)
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def stage_main(args):
    cases, variants = _cases_and_variants(args, STAGE_VARIANTS)
    spec = {"gate_slices": args.gate_slices, "m2ib_steps": args.m2ib_steps, "sam_slices": args.sam_slices,
            "repeats": args.stage_repeats}
    record = _record("contention (stages)", STAGE_VARIANTS, variants, work=spec)
    for rep, case, v in _each_run(args.repeats, cases, variants, record):
        others = busiest_others()
        res = run_stage_child(v, spec)
        res.update(beside=case, repeat=rep, others_before=others)
        record["runs"].append(res)
        t = res["times"]
        print(f"[{case:>6}] {v:<11} " + "  ".join(
            f"{p}: " + " ".join(f"{s}={min(t[p][s]):.2f}" for s in STAGES) for p in ("bf16", "fp32"))
            + f"  load {res['load_before'][0]:.1f}  beside: {'; '.join(others[:3])}", flush=True)
        if args.json:
            write_record(args.json, record)
    record["load_end"] = _load()
    print(f"\nstages, {CLIP} + {NEW_SAM} (random weights), {record['cpu_model']} "
          f"{' '.join(record['cpu_flags'])}, {os.cpu_count()} CPUs; work per child: {spec}")
    stage_tables(record["runs"], variants, cases)
    if args.json:
        write_record(args.json, record)
    return 0


def _cases_and_variants(args, known_variants):
    """The --beside cases and --variants asked for (all of known_variants by default), each checked by name."""
    cases = args.beside.split(",")
    variants = args.variants.split(",") if args.variants else list(known_variants)
    for name in cases:
        if name not in COMPETITORS:
            raise SystemExit(f"unknown --beside case '{name}'; choose from {', '.join(COMPETITORS)}")
    for name in variants:
        if name not in known_variants:
            raise SystemExit(f"unknown variant '{name}'; choose from {', '.join(known_variants)}")
    return cases, variants


def _each_run(repeats, cases, variants, record):
    """(repeat, case, variant) in the order they run: each case's competitor runs around its variants (its CPU
    time goes into record), the order rotated per case and repeat so no variant always runs first after a start."""
    for rep in range(repeats):
        for case in cases:
            proc = start_competitor(case)
            try:
                shift = (rep + cases.index(case)) % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    yield rep, case, v
            finally:
                cpu = stop_competitor(proc)
                if cpu is not None:
                    record.setdefault("competitor_cpu_s", []).append({"case": case, "repeat": rep, "cpu_s": cpu})


def _record(benchmark, known_variants, variants, **extra):
    """The JSON record both modes start from: host, models, code, competitors and the variants that run."""
    code = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return host_record(benchmark, models=f"{CLIP},{NEW_SAM}", models_random=True, code=code, **extra,
                       competitors=COMPETITORS, variants={v: known_variants[v] for v in variants}, runs=[])


def _runtime_of(report_path):
    """The report's runtime section (what the child chose and why), if it writes one."""
    import json

    try:
        with open(report_path) as f:
            return json.load(f).get("runtime")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
