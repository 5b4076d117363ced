"""The segmentation service against the process-per-run CLI, side by side in one run, with full-size
random-weight models (BiomedCLIP architecture + MedSAM2, the default SAM; `--models` for others).

    python -m benchmarks.service [--shape 28 256 256] [--preset v2] [--models CLIP,SAM] [--cli-requests N] [--skip-requests] [--json OUT.json]

Four requests on one MR phantom, each through `medclipsam serve` (one service, started once) and through a
new `medclipsam segment` process: a first prompt, a second prompt on the same volume, the first prompt
again, and the first prompt with another preset. Then the service's memory (measured RSS) over several
volumes with a small cache budget. Timings are wall-clock seconds as a client sees them (upload and
download included for the service; process start, model loading and file writing for the CLI).
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedCLIPSAM"))

MODELS = "random-biomedclip,random-medsam2"  # the records before this default used random-sam2.1-hiera-tiny


def cli_run(volume, prompt, preset, out, device, models):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "MedCLIPSAMLib", "segment", volume, "--prompt", prompt, "--preset", preset,
                    "--output", out, "--models", models, "--device", device, "--progress", "none"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def service_run(client, volume_id, prompt, preset, out):
    start = time.perf_counter()
    status = client.wait(client.submit(volume_id, [prompt], preset=preset)["job_id"], every=0.05)
    if status["state"] != "done":
        raise RuntimeError(f"service job ended {status['state']}: {status.get('error')}")
    client.result(status["job_id"], out)
    return time.perf_counter() - start, status


def memory_over_volumes(python, device, count, shape, cache_mb, folder, models):
    """RSS of a service with a small cache budget after each of `count` different volumes."""
    from MedCLIPSAMLib.io import write_volume
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMModuleLib.serviceclient import LocalService

    service = LocalService(python, ["--models", models, "--device", device, "--cache-mb", str(cache_mb),
                                    "--max-volumes", "4"])
    client = service.ensure()
    rows = []
    try:
        for i in range(count):
            path = os.path.join(folder, f"memory-{i}.nrrd")
            write_volume(path, make_volume("mr", shape=shape, seed=100 + i).image)
            volume_id = client.upload(path)["volume_id"]
            seconds, _ = service_run(client, volume_id, "brain tumor", "fast", os.path.join(folder, "m.seg.nrrd"))
            info = client.info()
            rows.append({"volume": i, "seconds": round(seconds, 2), "rss_mb": round(info["memory"]["rss_bytes"] / 2**20),
                         "cache_used_mb": round(info["cache"]["used_bytes"] / 2**20, 1),
                         "cache_budget_mb": round(info["cache"]["budget_bytes"] / 2**20), "volumes_held": info["volumes"]})
            print(rows[-1], flush=True)
    finally:
        service.stop()
    return rows


def main(argv=None):
    from MedCLIPSAMLib.io import write_volume
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMModuleLib.serviceclient import LocalService

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(28, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--preset", default="v2")
    p.add_argument("--other-preset", default="fast")
    p.add_argument("--prompts", nargs=2, default=("brain tumor", "brain"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=MODELS)
    p.add_argument("--memory-volumes", type=int, default=8)
    p.add_argument("--memory-shape", type=int, nargs=3, default=(6, 128, 128))
    p.add_argument("--memory-cache-mb", type=float, default=128)
    p.add_argument("--cli-requests", type=int, default=4,
                   help="how many of the four requests also run through a new CLI process (each costs a whole run)")
    p.add_argument("--skip-requests", action="store_true", help="only the memory run over several volumes")
    p.add_argument("--json", default="benchmarks/results/service_cpu.json")
    args = p.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="medclipsam-bench-service-")
    volume = os.path.join(folder, "mr.nrrd")
    write_volume(volume, make_volume("mr", shape=tuple(args.shape), seed=7,
                                     lesion={"size": "large", "brightness": "bright"}).image)
    first, second = args.prompts
    steps = [("first prompt", first, args.preset), ("second prompt, same volume", second, args.preset),
             ("same prompt again", first, args.preset), (f"first prompt, preset {args.other_preset}", first,
                                                          args.other_preset)]
    if args.skip_requests:
        memory = memory_over_volumes(sys.executable, args.device, args.memory_volumes, tuple(args.memory_shape),
                                     args.memory_cache_mb, folder, args.models)
        out = {"models": args.models, "device": args.device, "memory_shape_zyx": list(args.memory_shape),
               "memory_cache_mb": args.memory_cache_mb, "memory_over_volumes": memory}
        write_record(args.json, out)
        rss = [r["rss_mb"] for r in memory]
        print(f"RSS over {len(rss)} volumes: first {rss[0]} MB, max {max(rss)} MB, last {rss[-1]} MB; wrote {args.json}")
        return
    start = time.perf_counter()
    service = LocalService(sys.executable, ["--models", args.models, "--device", args.device])
    client = service.ensure()
    service_start = time.perf_counter() - start
    print(f"service started in {service_start:.1f} s", flush=True)
    rows = []
    try:
        t = time.perf_counter()
        volume_id = client.upload(volume)["volume_id"]
        upload = time.perf_counter() - t
        for k, (name, prompt, preset) in enumerate(steps):
            served, status = service_run(client, volume_id, prompt, preset, os.path.join(folder, "s.seg.nrrd"))
            print(f"{name}: service {served:.2f} s", flush=True)
            cli = (cli_run(volume, prompt, preset, os.path.join(folder, "c.seg.nrrd"), args.device, args.models)
                   if k < args.cli_requests else None)
            report = status["report"][0]
            rows.append({"request": name, "prompt": prompt, "preset": preset, "service_s": round(served, 2),
                         "cli_s": None if cli is None else round(cli, 2), "kept_slices": report["kept"],
                         "slices": report["slices"]})
            print(rows[-1], flush=True)
        info = client.info()
    finally:
        service.stop()
    memory = memory_over_volumes(sys.executable, args.device, args.memory_volumes, tuple(args.memory_shape),
                                 args.memory_cache_mb, folder, args.models)
    first_s = rows[0]["service_s"]
    out = {"shape_zyx": list(args.shape), "models": args.models, "device": args.device, "preset": args.preset,
           "cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
           "service_start_s": round(service_start, 2), "upload_s": round(upload, 3), "requests": rows,
           "second_over_first": round(rows[1]["service_s"] / first_s, 3),
           "service_info_after": {k: info[k] for k in ("cache", "memory", "sam2_cache_dtype")},
           "memory_over_volumes": memory}
    write_record(args.json, out)
    print(f"{'request':40s} {'service s':>10s} {'CLI s':>8s}")
    for r in rows:
        cli = "-" if r["cli_s"] is None else f"{r['cli_s']:.2f}"
        print(f"{r['request']:40s} {r['service_s']:10.2f} {cli:>8s}")
    print(f"second / first prompt through the service: {out['second_over_first']:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
