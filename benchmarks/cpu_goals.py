"""Issue 37's goals in one run: today's main against this tree, idle and beside another PyTorch process.

    python -m benchmarks.cpu_goals [--shape 112 256 256] [--base 05e0c6b] [--beside none,torch2]
                                   [--json benchmarks/results/cpu_goals_cpu.json]

For each case of what runs beside (none; torch2: another process, PyTorch on 2 threads, a loop of 512x512
matmuls, as a training run would be; benchmarks/contention.py starts it) and, within it, for each side
(today: `git archive --base`; new: this tree), interleaved:
  1. the first prompt in a new CLI process: `medclipsam segment --preset v2` on an MR phantom (default
     112x256x256), per stage (cpu_minute.run_segment), with the new side's stages against their floors;
  2. the service (`medclipsam serve`, started as the Slicer module starts it, models loaded before the
     clock): upload + first prompt ("brain tumor"), then a second prompt on the same volume at once
     ("brain"); on the new side also a third one ("ventricles") after the service has used the pause to
     encode the rest of the volume ahead (the pause's length is recorded: a radiologist reads the first
     result meanwhile).
Every run finds the prompts' sentences in a text cache filled before the clock. Goals (issue 37): the first prompt (1) at most 30 s; a next prompt at most 0.15 of the first through the
service; beside torch2 every figure at most 2x its idle value. Full-size random-weight BiomedCLIP +
MedSAM2: speed is real, masks are meaningless. Each record has the CPU model, its flags and the load.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_record
from benchmarks.contention import busiest_others, start_competitor, stop_competitor
from benchmarks.cpu_minute import (CLIP, NEW_SAM, REPO, build_random_models, host_record, measure_floors,
                                   run_segment, today_tree)

sys.path.insert(0, str(Path(REPO) / "MedCLIPSAM"))
MODELS = f"{CLIP},{NEW_SAM}"
PROMPTS = ("brain tumor", "brain", "ventricles")
PAUSE_LIMIT = 900


def service_requests(tree, volume, ahead):
    """Start a service from `tree`, upload, then the prompts; seconds as a client sees them."""
    from MedCLIPSAMModuleLib.serviceclient import LocalService

    env = dict(os.environ, PYTHONPATH=tree, MEDCLIPSAM_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    service = LocalService(sys.executable, ["--models", MODELS, "--device", "cpu"], env=env)
    client = service.ensure()
    rows = []

    def ask(name, prompt, upload=False):
        start = time.perf_counter()
        volume_id = client.upload(volume)["volume_id"] if upload else rows[0]["volume_id"]
        status = client.wait(client.submit(volume_id, [prompt], preset="v2")["job_id"], every=0.05)
        if status["state"] != "done":
            raise SystemExit(f"{name} ended {status['state']}: {status.get('error')}")
        report = status["report"][0]
        rows.append({"request": name, "prompt": prompt, "seconds": round(time.perf_counter() - start, 2),
                     "volume_id": volume_id, "kept": report["kept"], "key_slices": report["key_slices"],
                     "load": os.getloadavg()[0]})

    try:
        ask("first prompt (with upload)", PROMPTS[0], upload=True)
        ask("second prompt at once", PROMPTS[1])
        if ahead:
            start = time.perf_counter()
            while client.info()["queue"].get("idle_work") and time.perf_counter() - start < PAUSE_LIMIT:
                time.sleep(0.2)
            pause = round(time.perf_counter() - start, 1)
            ask("third prompt after the pause", PROMPTS[2])
            rows[-1]["pause_s"] = pause
        info = client.info()
    finally:
        service.stop()
    return {"requests": rows, "cache": info["cache"], "memory": info["memory"]}


def warm_text_cache():
    """Embed the benchmark's prompts' sentences into MEDCLIPSAM_TEXT_CACHE, in a child as a run would."""
    import subprocess

    code = ("from MedCLIPSAMLib.models import load_clip; from MedCLIPSAMLib.pipeline.text import TextEmbeddings, "
            f"make_prompt; t = TextEmbeddings(load_clip('{CLIP}')); "
            f"[t.sentences(tuple(make_prompt(p).sentences) + tuple(make_prompt(p).absent)) for p in {PROMPTS!r}]")
    env = dict(os.environ, PYTHONPATH=REPO, MEDCLIPSAM_OFFLINE="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True)


def summary(results):
    """The goals' figures per case and side, and beside / idle ratios."""
    out = {}
    for case, sides in results.items():
        for side, r in sides.items():
            req = r["service"]["requests"]
            first = req[0]["seconds"]
            fig = {"cli_first_s": round(r["cli"]["total_wall_s"], 1), "service_first_s": first,
                   "service_second_s": req[1]["seconds"], "second_over_first": round(req[1]["seconds"] / first, 3)}
            if len(req) > 2:
                fig.update(service_after_pause_s=req[2]["seconds"], pause_s=req[2].get("pause_s"),
                           after_pause_over_first=round(req[2]["seconds"] / first, 3))
            out.setdefault(side, {})[case] = fig
    for side, cases in out.items():
        if "none" in cases:
            for case, fig in cases.items():
                if case != "none":
                    fig["over_idle"] = {k: round(v / cases["none"][k], 2) for k, v in fig.items()
                                        if k.endswith("_s") and k != "pause_s" and cases["none"].get(k)}
    return out


def print_summary(figures):
    keys = ("cli_first_s", "service_first_s", "service_second_s", "second_over_first", "service_after_pause_s",
            "pause_s", "after_pause_over_first")
    for side, cases in figures.items():
        print(f"\n{side}")
        print(f"{'figure':<26}" + "".join(f"{c:>14}" for c in cases))
        for k in keys:
            if any(k in f for f in cases.values()):
                print(f"{k:<26}" + "".join(f"{str(f.get(k, '-')):>14}" for f in cases.values()))
        for c, f in cases.items():
            if "over_idle" in f:
                print(f"beside {c} / idle: " + ", ".join(f"{k} {v}x" for k, v in f["over_idle"].items()))


def main(argv=None):
    from MedCLIPSAMLib.io import write_volume
    from MedCLIPSAMLib.phantoms import make_volume

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(112, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--base", default="05e0c6b", help="today's main (default: main at the start of this work)")
    ap.add_argument("--beside", default="none,torch2")
    ap.add_argument("--sides", default="today,new")
    ap.add_argument("--no-floors", action="store_true")
    ap.add_argument("--floors-from", metavar="STAGE_FLOORS.json")
    ap.add_argument("--json", default="benchmarks/results/cpu_goals_cpu.json")
    args = ap.parse_args(argv)
    cases, sides = args.beside.split(","), args.sides.split(",")
    work = tempfile.mkdtemp(prefix="medclipsam-bench-goals-")
    record = host_record("cpu_goals", shape=list(args.shape), models=MODELS, cases=cases, sides=sides,
                         busiest_others_start=busiest_others())
    try:
        trees = {"new": REPO}
        if "today" in sides:
            trees["today"] = os.path.join(work, "today")
            os.makedirs(trees["today"])
            record["today"] = today_tree(args.base, trees["today"])
        build_random_models(NEW_SAM)
        volume = os.path.join(work, "mr.nrrd")
        write_volume(volume, make_volume("mr", shape=tuple(args.shape), seed=7,
                                         lesion={"size": "large", "brightness": "bright"}).image)
        # every run finds the prompts' sentences in the text cache (a fresh one, filled before the clock): the
        # text tower's cost is not what differs here, and the floors then count no sentence
        os.environ["MEDCLIPSAM_TEXT_CACHE"] = os.path.join(work, "text")
        warm_text_cache()
        if not args.no_floors and "new" in sides:
            record["floors"] = measure_floors(args.floors_from, work)
        results = {}
        for case in cases:
            competitor = start_competitor(case)
            try:
                for side in sides:
                    label = f"{case}-{side}"
                    print(f"[{time.strftime('%H:%M:%S')}] {label}: CLI first prompt", flush=True)
                    cli = run_segment(trees[side], volume, work, MODELS, {}, label)
                    cli["text_cache"] = "warm"
                    if side == "new" and record.get("floors"):
                        from benchmarks.stage_floors import run_floors

                        cli["floors"] = run_floors(cli, record["floors"])
                    print(f"[{time.strftime('%H:%M:%S')}] {label}: {cli['total_wall_s']:.1f} s; service", flush=True)
                    service = service_requests(trees[side], volume, ahead=side == "new")
                    print(json.dumps(service["requests"]), flush=True)
                    results.setdefault(case, {})[side] = {"cli": cli, "service": service}
            finally:
                stop_competitor(competitor)
            record["results"] = results
            write_record(args.json, record)   # what is done so far survives a stop
        record["figures"] = summary(results)
        record["busiest_others_end"] = busiest_others()
        record["load_end"] = os.getloadavg()
        write_record(args.json, record)
        print_summary(record["figures"])
        if record.get("floors"):
            from benchmarks.stage_floors import print_floors

            for case in cases:
                if "new" in results.get(case, {}):
                    print_floors(f"new, beside {case}: first prompt's stages against their floors",
                                 results[case]["new"]["cli"]["floors"])
        print(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
