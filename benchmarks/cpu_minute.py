"""Issue 22: the v2 preset on a CPU, today's default against the new one, per stage, side by side.

    python -m benchmarks.cpu_minute [--shape 112 256 256] [--repeats 2] [--json benchmarks/results/cpu_minute_cpu.json]
    python -m benchmarks.cpu_minute --levers-only --json OUT.json      # (2) only
    python -m benchmarks.cpu_minute --ct-memory --json benchmarks/results/cpu_minute_ct_cpu.json

(1) End to end: `medclipsam segment PHANTOM --preset v2 --progress json` in a child process, on an MR phantom
    (default 112x256x256), with full-size random-weight models:
      today  the code at the branch point (git archive of `--base`, default: merge-base with main), plus
             only the commit that makes text embedding a progress stage of its own (instrumentation, so the
             text figure can be split from the gate): BiomedCLIP + SAM 2.1 tiny (1024 px), torch's default
             threads, no disk text cache;
      new    this tree: BiomedCLIP + MedSAM2 (SAM 2.1 tiny at 512 px), all usable cores, the disk text
             cache (in a fresh folder: the first new run is cold, the second finds the sentences on disk).
    Runs are interleaved (today, new, today, new), each under `nice`. Per stage (from the JSON progress
    lines): wall seconds and the child's CPU seconds (utime + stime of all its threads, /proc/PID/stat,
    read as each line arrives); peak RSS from wait4(); load average before and after each run. start-up is
    the time from spawning to the first progress line (imports, reading the volume). The carry stage's
    slice count depends on the (random) SAM's masks, so it is also given per slice.
(2) Hiera encoder levers, in this process, on phantom slices through sam2's image predictor (what the
    pipeline calls), both SAMs: fp32, bf16 autocast, bf16 + channels-last, and (--compile) torch.compile
    of the image encoder; interleaved, the minimum over repeats; against fp32: max relative difference of
    the encoder features and the IoU of the decoded masks (a box on the lesion).
(3) --ct-memory: the new default on a 512x512x300 CT phantom in a child, its peak RSS and stages.
(4) Floors (issue 37; --no-floors skips, --floors-from F reuses a record): benchmarks.stage_floors in a child
    before the timed runs (FLOPs per unit of work, this CPU's matmul throughput), then for each new run a
    table of its stages' FLOPs, floor seconds and share of the floor (floor / wall), from the run's own
    counts (record: runs.new[i].floors, and the stage_floors record under "floors").
Random weights: speed is real, masks are meaningless. Timings belong here, never in tests.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import write_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = "random-biomedclip"
TODAY_SAM, NEW_SAM = "random-sam2.1-hiera-tiny", "random-medsam2"
TEXT_STAGE_SUBJECT = "volume: text embedding is a progress stage of its own"
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _load():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def cpu_description():
    from benchmarks.speed import cpu_description as describe

    return describe()


def host_record(benchmark, **extra):
    """The head of a benchmark's JSON record: what ran, where, and how loaded the machine was at the start."""
    return {"benchmark": benchmark, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            **cpu_description(), "load_start": _load(), **extra}


def build_random_models(*sam_names):
    """Build the random models once in a child, outside the timed runs (the later runs find them cached)."""
    loads = "; ".join([f"load_clip('{CLIP}')"] + [f"load_sam2('{n}')" for n in sam_names])
    subprocess.run([sys.executable, "-c", f"from MedCLIPSAMLib.models import load_clip, load_sam2; {loads}"],
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), check=True, capture_output=True)


def _git(*args):
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout.strip()


def today_tree(base, dest):
    """The code at `base` plus only the text-stage instrumentation commit, unpacked into `dest`."""
    archive = subprocess.run(["git", "-C", REPO, "archive", base], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    commit = _git("log", "--format=%H", "-F", f"--grep={TEXT_STAGE_SUBJECT}", "-n", "1")
    already = commit and subprocess.run(["git", "-C", REPO, "merge-base", "--is-ancestor", commit, base]).returncode == 0
    if commit and not already:   # a base after that commit has it already
        patch = _git("show", "--format=", commit, "--", "MedCLIPSAMLib/pipeline/volume.py") + "\n"
        subprocess.run(["git", "apply", "-p1"], input=patch.encode(), cwd=dest, check=True)
    return {"base": _git("rev-parse", base), "instrumentation": commit}


def _proc_stat(pid):
    """(CPU seconds: utime + stime of all threads, niceness) of a live process, or (None, None)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[16])
    except (OSError, IndexError, ValueError):
        return None, None


def run_segment(tree, volume, out_dir, models, env_extra, label, extra_args=(), prompt="brain tumor"):
    """One `segment --preset v2 --progress json` child; per-stage wall/CPU seconds and peak RSS."""
    env = dict(os.environ, PYTHONPATH=tree, MEDCLIPSAM_OFFLINE="1", HF_HUB_OFFLINE="1", **env_extra)
    env.pop("OMP_NUM_THREADS", None)
    out = os.path.join(out_dir, f"{label}.seg.nrrd")
    report = os.path.join(out_dir, f"{label}.report.json")
    # no `nice` here: the children inherit the benchmark's own niceness (`nice python -m ...`); nice on nice
    # reached 19, where the other users' processes starved the runs
    cmd = [sys.executable, "-m", "MedCLIPSAMLib", "segment", volume, "--prompt", prompt,
           "--preset", "v2", "--models", models, "--device", "cpu", "--output", out, "--report-output", report,
           "--progress", "json", *extra_args]
    load_before = _load()
    stderr = open(os.path.join(out_dir, f"{label}.stderr"), "w+")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    events, nice = [], set()   # (stage, done, total, wall, cpu); the niceness seen at each line
    for line in proc.stdout:
        wall, (cpu, ni) = time.perf_counter() - start, _proc_stat(proc.pid)
        nice.add(ni)
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        events.append((rec.get("stage"), rec.get("done"), rec.get("total"), wall, cpu))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    total_wall = time.perf_counter() - start
    stderr.seek(0)
    log_tail = stderr.read()[-1500:]
    stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{log_tail}")
    total_cpu = usage.ru_utime + usage.ru_stime
    stages, order = per_stage(events, total_wall, total_cpu)
    accounted = sum(v["wall_s"] for v in stages.values())
    stages["other"] = {"wall_s": max(0.0, total_wall - accounted), "cpu_s": None}
    order.append("other")
    with open(report) as f:
        full = json.load(f)
    summary = [{**{k: p.get(k) for k in ("prompt", "kept", "key_slices", "voxels", "found", "mode",
                                          "saliency_slices")},
                "scored": len(p.get("scored") or []),
                "sentences": len(set(p.get("sentences") or []) | set(p.get("absent") or []))}
               for p in full["prompts"]]
    return {"label": label, "command": " ".join(cmd[1:]), "env": env_extra, "stages": stages, "order": order,
            "stage_done": stage_done(events), "runtime": full.get("runtime"),
            "total_wall_s": total_wall, "total_cpu_s": total_cpu, "peak_rss_gb": usage.ru_maxrss / 2**20,
            "load_before": load_before, "load_after": _load(), "nice": sorted(n for n in nice if n is not None), "report": summary, "log_tail": log_tail[-400:]}


def stage_done(events):
    """{stage: steps done}, from the progress lines' `done` (a stage that stops early, as the carry does
    where a mask vanishes, does fewer steps than its `total`); repeated stages add up."""
    done, last = {}, {}
    for name, d, _total, _wall, _cpu in events:
        if name in (None, "finished") or d is None:
            continue
        if d < last.get(name, 0):   # the stage began again (next prompt)
            last[name] = 0
        done[name] = done.get(name, 0) + d - last.get(name, 0)
        last[name] = d
    return done


def measure_floors(path, work):
    """The stage_floors record: read from `path`, or measured in a child (threads and OpenMP wait policy set
    there before torch loads, as in a `medclipsam` process), before the timed runs."""
    if path is None:
        path = os.path.join(work, "floors.json")
        env = dict(os.environ, PYTHONPATH=REPO, MEDCLIPSAM_OFFLINE="1", HF_HUB_OFFLINE="1")
        env.pop("OMP_NUM_THREADS", None)   # as the timed runs: the threads runtime.configure_threads sets
        subprocess.run([sys.executable, "-m", "benchmarks.stage_floors", "--json", path], cwd=REPO, env=env,
                       check=True)
    with open(path) as f:
        return json.load(f)


def per_stage(events, total_wall, total_cpu):
    """{stage: wall_s, cpu_s, steps} from the progress events (stage, done, total, wall, cpu). A stage runs
    from its first line to the first line of the next stage; repeated stages (one per prompt) add up. The
    'load' stage is split at its first step: CLIP, then SAM."""
    end = ("finished", 0, 0, total_wall, total_cpu)
    first = events[0] if events else end
    stages, order = {"start-up": {"wall_s": first[3], "cpu_s": first[4]}}, ["start-up"]
    marks = []   # (name, wall, cpu, steps) where a stage (or the SAM half of loading) begins
    for i, (name, done, total, wall, cpu) in enumerate(events):
        if name == "finished":
            marks.append((None, wall, cpu, 0))
            break
        if name == "load" and done == 1:
            marks.append(("load SAM", wall, cpu, 1))
        elif i == 0 or events[i - 1][0] != name or (done == 0 and events[i - 1][1] != 0):
            marks.append(("load CLIP" if name == "load" else name, wall, cpu, int(total or 0)))
    if not marks or marks[-1][0] is not None:
        marks.append((None, total_wall, total_cpu, 0))
    for (name, wall, cpu, steps), (_, wall2, cpu2, _) in zip(marks, marks[1:]):
        st = stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "steps": 0})
        if name not in order:
            order.append(name)
        st["wall_s"] += wall2 - wall
        st["cpu_s"] += (cpu2 or 0) - (cpu or 0)
        st["steps"] += steps
    return stages, order


# -- (2) encoder levers ---------------------------------------------------------------------------------

def encoder_levers(sam_names, repeats, n_slices, compile_too):
    import numpy as np
    import torch

    from MedCLIPSAMLib.models import load_sam2
    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.preprocess import normalize_to_uint8, pad_to_square, to_rgb
    from MedCLIPSAMLib.pipeline.sam_refine import predict_mask
    from MedCLIPSAMLib.postprocess import bounding_box
    from MedCLIPSAMLib.runtime import configure_threads

    threads = configure_threads()
    ph = make_volume("mr", shape=(24, 256, 256), seed=5, lesion={"size": "large"})
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(ph.image)
    lesion = min((m for m in ph.labels.values() if m.any()), key=lambda m: int(m.sum()))  # the smallest: the lesion
    lab = lesion
    zs = [z for z in range(vol.shape[0]) if lab is not None and lab[z].any()] or list(range(vol.shape[0]))
    zs = zs[len(zs) // 2 - n_slices // 2:][:n_slices]
    lo, hi = float(np.percentile(vol, 1)), float(np.percentile(vol, 99))
    images, boxes = [], []
    for z in zs:
        square, pad = pad_to_square(normalize_to_uint8(vol[z], value_range=(lo, hi)))
        images.append(to_rgb(square))
        b = bounding_box(lab[z] > 0) if lab is not None and lab[z].any() else (96, 96, 160, 160)
        boxes.append(np.array([b[0] + pad.left, b[1] + pad.top, b[2] + pad.left, b[3] + pad.top], np.float32)[None])
    out = {"threads": threads, "slices": len(images), "sams": {}}
    for name in sam_names:
        model = load_sam2(name, "cpu")
        predictor = image_predictor(model)
        configs = {"fp32": (False, False), "bf16": (True, False), "bf16+channels_last": (True, True)}

        def run(amp, cl, encoder=None):
            original = model.image_encoder
            if encoder is not None:
                model.image_encoder = encoder
            if cl:
                model.image_encoder.to(memory_format=torch.channels_last)
            feats, masks, times = [], [], []
            try:
                for img, box in zip(images, boxes):
                    t0 = time.perf_counter()
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                        predictor.set_image(img)
                        times.append(time.perf_counter() - t0)
                        mask, _ = predict_mask(predictor, {"boxes": box, "points": None, "labels": None})
                    feats.append(predictor._features["image_embed"].float().clone())
                    masks.append(mask)
            finally:
                model.image_encoder = original
                if cl:
                    model.image_encoder.to(memory_format=torch.contiguous_format)
            return feats, masks, times

        best, results = {}, {}
        compiled, compile_s = None, None
        if compile_too:
            t0 = time.perf_counter()
            compiled = torch.compile(model.image_encoder)
            run(True, False, compiled)   # the first call compiles
            compile_s = time.perf_counter() - t0
            configs["bf16+compile"] = (True, False)
        for _ in range(repeats):
            for key, (amp, cl) in configs.items():
                f, m, t = run(amp, cl, compiled if key == "bf16+compile" else None)
                results[key] = (f, m)
                best[key] = min(best.get(key, float("inf")), sum(t) / len(t))
        ref_f, ref_m = results["fp32"]
        rows = {}
        for key, (f, m) in results.items():
            rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(f, ref_f))
            ious = []
            for a, b in zip(m, ref_m):
                union = np.logical_or(a, b).sum()
                ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
            rows[key] = {"encode_s": best[key], "speedup_vs_fp32": best["fp32"] / best[key],
                         "feature_max_rel_diff": rel, "mask_iou_min": min(ious), "mask_iou_mean": float(np.mean(ious))}
        out["sams"][name] = {"image_size": model.image_size, "levers": rows, "compile_s": compile_s}
        print(f"\n{name} (image size {model.image_size}), {len(images)} slices, {threads} threads, "
              f"min over {repeats} repeats")
        print(f"{'setting':<22}{'encode s':>10}{'x fp32':>8}{'feat rel diff':>15}{'mask IoU min':>14}")
        for key, r in rows.items():
            print(f"{key:<22}{r['encode_s']:>10.3f}{r['speedup_vs_fp32']:>8.2f}{r['feature_max_rel_diff']:>15.4f}"
                  f"{r['mask_iou_min']:>14.4f}")
        if compile_s is not None:
            print(f"torch.compile: first call (compile) {compile_s:.1f} s")
        del model, predictor
    return out


# -- tables ------------------------------------------------------------------------------------------------

def _fmt(v, width=8, digits=1):
    return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def table(columns):
    """columns: [(title, run)]: one row per stage, wall and CPU seconds per column."""
    order = []
    for _, run in columns:
        for s in run["order"]:
            if s not in order:
                order.append(s)
    head = f"{'stage':<14}" + "".join(f"{title[:18]:>20}" for title, _ in columns)
    print(head)
    print(f"{'':<14}" + "".join(f"{'wall':>10}{'cpu':>10}" for _ in columns))
    for s in order:
        cells = ""
        for _, run in columns:
            st = run["stages"].get(s, {})
            cells += _fmt(st.get("wall_s"), 10) + _fmt(st.get("cpu_s"), 10)
        print(f"{s:<14}{cells}")
    print(f"{'total':<14}" + "".join(_fmt(r["total_wall_s"], 10) + _fmt(r["total_cpu_s"], 10) for _, r in columns))
    print(f"{'peak RSS GB':<14}" + "".join(f"{r['peak_rss_gb']:>20.2f}" for _, r in columns))
    print(f"{'load 1-min':<14}" + "".join(
        f"{'%.1f->%.1f' % (r['load_before'][0], r['load_after'][0]):>20}" for _, r in columns))


def print_runs(runs, floors=None):
    """The side-by-side table of the runs so far, carry per slice, and the ratios of the best totals; with a
    stage_floors record, each new run's floor table (stage FLOPs, floor seconds, share of the floor)."""
    columns = [(f"today #{i}", r) for i, r in enumerate(runs.get("today", []))]
    columns += [(f"new #{i} ({r.get('text_cache')} text)", r) for i, r in enumerate(runs.get("new", []))]
    table(columns)
    for _, r in columns:
        st = r["stages"].get("propagate")
        if st and st.get("steps"):
            st["wall_per_slice_s"] = st["wall_s"] / st["steps"]
            st["cpu_per_slice_s"] = st["cpu_s"] / st["steps"]
            print(f"carry {r['label']}: {st['steps']} slices, {st['wall_per_slice_s']:.2f} s wall, "
                  f"{st['cpu_per_slice_s']:.2f} s CPU per slice")
    if floors:
        from benchmarks.stage_floors import print_floors, run_floors

        gf = ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in floors["gflops"].items())
        for i, r in enumerate(runs.get("new", [])):
            r["floors"] = run_floors(r, floors)
            print_floors(f"new #{i} ({r.get('text_cache')} text) against its floor: FLOPs / best matmul "
                         f"throughput here ({gf}); loading: bytes / read speed", r["floors"])
    if not runs.get("today") or not runs.get("new"):
        return None
    best_today = min(runs["today"], key=lambda r: r["total_cpu_s"])
    best_new = min(runs["new"], key=lambda r: r["total_cpu_s"])
    ratios = {"wall_today_over_new": best_today["total_wall_s"] / best_new["total_wall_s"],
              "cpu_today_over_new": best_today["total_cpu_s"] / best_new["total_cpu_s"],
              "picked": "the run with the least CPU time on each side"}
    print(f"today / new (least-CPU run of each): wall {ratios['wall_today_over_new']:.2f}x, "
          f"CPU {ratios['cpu_today_over_new']:.2f}x")
    return ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(112, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--base", help="today's code (a commit); default: merge-base of HEAD and main")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--levers-only", action="store_true")
    ap.add_argument("--no-levers", action="store_true")
    ap.add_argument("--lever-slices", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the image encoder")
    ap.add_argument("--lever-sams", default=f"{NEW_SAM},{TODAY_SAM}", help="the SAMs whose encoder levers are timed")
    ap.add_argument("--ct-memory", action="store_true", help="only the 512x512x300 CT peak memory of the new default")
    ap.add_argument("--sides", default="today,new", help="which sides to run (e.g. 'new' alone)")
    ap.add_argument("--no-floors", action="store_true",
                    help="skip the floors (FLOPs and matmul throughput: python -m benchmarks.stage_floors)")
    ap.add_argument("--floors-from", metavar="STAGE_FLOORS.json", help="use a recorded stage_floors record")
    ap.add_argument("--table-from", metavar="RECORD.json", help="print the tables of a (partial) record; measure nothing")
    ap.add_argument("--ct-shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    args = ap.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            old = json.load(f)
        print_runs(old.get("runs", {}), old.get("floors"))
        return 0

    import SimpleITK as sitk

    from MedCLIPSAMLib.phantoms import make_volume

    record = host_record("cpu_minute", models_random=True)

    def save():
        if args.json:
            write_record(args.json, record)

    build_random_models(TODAY_SAM, NEW_SAM)
    work = tempfile.mkdtemp(prefix="cpu-minute-")
    try:
        if args.ct_memory:
            path = os.path.join(work, "ct.nrrd")
            ph = make_volume("ct", shape=tuple(args.ct_shape), seed=5)
            sitk.WriteImage(ph.image, path)
            del ph
            text_dir = os.path.join(work, "text")
            run = run_segment(REPO, path, work, f"{CLIP},{NEW_SAM}", {"MEDCLIPSAM_TEXT_CACHE": text_dir}, "ct-new",
                              prompt="liver")
            record["ct_memory"] = {"shape_zyx": list(args.ct_shape), **run}
            print(f"\nnew default on a {'x'.join(map(str, args.ct_shape))} CT phantom (prompt: liver)")
            table([("new (MedSAM2 512)", run)])
            save()
            return 0
        if not args.levers_only:
            path = os.path.join(work, "mr.nrrd")
            ph = make_volume("mr", shape=tuple(args.shape), seed=5, lesion={"size": "large"})
            sitk.WriteImage(ph.image, path)
            del ph
            tree = os.path.join(work, "today")
            os.makedirs(tree)
            if "today" in args.sides.split(","):
                base = args.base or _git("merge-base", "HEAD", "main")
                record["today_code"] = today_tree(base, tree)
            record["new_code"] = _git("rev-parse", "HEAD")
            # the new side runs from a snapshot of HEAD too: edits to the working tree during the run do not leak in
            new_tree = os.path.join(work, "new")
            os.makedirs(new_tree)
            archive = subprocess.run(["git", "-C", REPO, "archive", "HEAD"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", new_tree], input=archive, check=True)
            text_dir = os.path.join(work, "text")
            if not args.no_floors:
                record["floors"] = measure_floors(args.floors_from, work)
                save()
            runs = {"today": [], "new": []}
            for r in range(args.repeats):
                for who in [w for w in ("today", "new") if w in args.sides.split(",")]:
                    if who == "today":
                        run = run_segment(tree, path, work, f"{CLIP},{TODAY_SAM}", {"MEDCLIPSAM_TEXT_CACHE": "off"},
                                          f"today{r}")
                    else:
                        run = run_segment(new_tree, path, work, f"{CLIP},{NEW_SAM}",
                                          {"MEDCLIPSAM_TEXT_CACHE": text_dir}, f"new{r}")
                    run["text_cache"] = "off" if who == "today" else ("cold" if r == 0 else "warm")
                    runs[who].append(run)
                    print(f"{who} run {r}: {run['total_wall_s']:.1f} s wall, {run['total_cpu_s']:.1f} s CPU, "
                          f"peak {run['peak_rss_gb']:.2f} GB, load {run['load_before'][0]:.1f}", flush=True)
                    record["runs"] = runs
                    save()
            print(f"\nv2 preset on a {'x'.join(map(str, args.shape))} MR phantom, interleaved runs "
                  f"(random weights; {os.cpu_count()} CPUs, shared)")
            record["ratios"] = print_runs(runs, record.get("floors"))
            save()
        if not args.no_levers:
            record["encoder_levers"] = encoder_levers(args.lever_sams.split(","), args.repeats, args.lever_slices,
                                                      args.compile)
        record["load_end"] = _load()
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
