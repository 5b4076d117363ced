"""Speed and memory against the papers' reference implementations, side by side in one run.

    python -m benchmarks.speed --json benchmarks/results/speed_cpu.json [--sams T [B+]] [--skip-memory]

Full-size random-weight BiomedCLIP (ViT-B/16 + PubMedBERT) and SAM 2.1 Hiera tiny (base+ with
--sams random-sam2.1-hiera-tiny random-sam2.1-hiera-base-plus), CPU unless --device says otherwise.

(a) per slice, each stage, reference vs ours:
    saliency  benchmarks.saliency_speed (gScoreCAM k=300 one masked image per forward fp32 vs batched
              bf16; M2IB whole encoder per step vs cached prefix; extrapolated linearly from --measure-k
              channels / --measure-steps steps, as that script documents);
    text      the prompt ensemble encoded for every slice (reference) vs once per prompt (cache);
    SAM2      image encoder + one box on a 256x256 slice, fp32 (reference) vs bf16 autocast (ours).
(b) per volume on a 256x256x64 MR phantom: our default (`--mode auto` = carry on a CPU, presence gate,
    3 key slices, preset v1, bf16) measured end to end with benchmarks.volume_modes.run_mode, against the
    paper-faithful per-slice pipeline (no gate, every non-blank slice: reference gScoreCAM + CRF + SAM2
    fp32). The paper-faithful figure is EXTRAPOLATED: measured per-slice stage times x slices (running it
    would take hours on 2 cores).
(c) the floor: one batched CLIP image-encoder pass + one SAM2 encoder pass per slice (bf16), x slices.
(d) peak memory: `medclipsam segment` in a child process on a 512x512x300 MR phantom read from NRRD;
    peak RSS of the child from resource.getrusage(RUSAGE_CHILDREN) (psutil is not installed). By default
    the CLI's own default pipeline (preset v1: gScoreCAM key slices, CRF, SAM2 carried through the gated
    slices); `--memory-args --preset v2` for v2. About 10 min on 2 idle cores.
Timings belong here, never in tests.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from . import saliency_speed, volume_modes, write_record

GOALS = {"volume_speedup_vs_paper": 10.0, "default_over_floor_max": 3.0, "saliency_speedup": 3.0,
         "peak_rss_gb_max": 4.0}


def _t(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def cpu_description():
    """What the CPU has, read from /proc/cpuinfo (not assumed): its model and its half-precision flags."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}


def rederive(path):
    """Recompute a recorded run's derived figures (ratios, goals) from its measured ones, in place, with the
    current definitions; measured values are not touched. Returns the record."""
    with open(path) as f:
        out = json.load(f)
    for res in out.get("per_sam", {}).values():
        for old in ("v1_default_over_floor_estimate",):
            res.pop(old, None)
        if "default" in res and "v1_default_estimate_s" in res:
            res["v1_default_over_floor_kept_slices_estimate"] = res["v1_default_estimate_s"] / res["floor_kept_slices_s"]
        stages = res.get("stages_s", {})
        if stages.get("text ensemble cached (ours)") == 0.0:  # set, not measured, before the script measured it
            stages["text ensemble cached (ours)"] = None
            res["text_cached_note"] = "not measured in this run (the script then wrote 0.0)"
    out["rederived"] = "python -m benchmarks.speed --rederive (ratios over the kept-slice floor)"
    return out


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def slice_stages(clip, sam, phantom, repeats=2):
    """Per-slice time of text, post-processing and SAM2 stages (reference vs ours) on the phantom's
    tumour slice; returns a dict of rows."""
    import numpy as np
    import torch

    from MedCLIPSAMLib.pipeline.image import ImageSegmenter
    from MedCLIPSAMLib.pipeline.preprocess import normalize_to_uint8
    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.text import make_prompt
    from MedCLIPSAMLib.postprocess import postprocess
    from MedCLIPSAMLib.pipeline.sam_refine import make_prompts

    vol = phantom.labels["tumor"]
    k = int(np.argmax(vol.reshape(vol.shape[0], -1).sum(1)))
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(phantom.image)
    gray8 = normalize_to_uint8(arr[k], value_range=(float(arr.min()), float(arr.max())))
    prompt = make_prompt("brain tumor", True)
    rows = {}

    # text: the ensemble encoded per slice (reference) vs cached (ours: encoded once per prompt per volume,
    # then each slice costs a cache lookup, measured here)
    from MedCLIPSAMLib.pipeline.text import TextEmbeddings

    clip.encode_text(list(prompt.sentences))
    _, t_text = _t(clip.encode_text, list(prompt.sentences))
    rows["text ensemble per slice (reference)"] = t_text
    texts = TextEmbeddings(clip)
    texts(prompt)  # the one encoding per prompt (part of the volume run's time)
    rows["text ensemble cached (ours)"] = min(_t(texts, prompt)[1] for _ in range(repeats))

    # post-processing on a saliency map (the CRF is the v1 stage, KMeans the v2 one): same in both
    settings = get_preset("v1", ["autocast=false"])
    seg = ImageSegmenter(clip, sam, settings)
    sal = np.zeros(gray8.shape, np.float32)
    sal[vol[k] > 0] = 1.0
    sal = np.clip(sal * 0.7 + 0.2 + np.random.default_rng(0).normal(0, 0.05, sal.shape), 0, 1).astype(np.float32)
    _, t_crf = _t(postprocess, sal, gray8, method="crf", top_n=1)
    coarse, t_km = _t(postprocess, sal, gray8, method="kmeans", top_n=2)
    rows["crf post-processing"] = t_crf
    rows["kmeans post-processing"] = t_km
    prompts = make_prompts(coarse, settings, sal)

    for name, amp in (("sam2 encoder + box fp32 (reference)", False), ("sam2 encoder + box bf16 (ours)", True)):
        seg.settings = settings.replace(autocast=amp)
        seg.refine(gray8, prompts)  # warm-up
        times = [_t(seg.refine, gray8, prompts)[1] for _ in range(repeats)]
        rows[name] = min(times)
    return rows, gray8


def floor_times(clip, sam, gray8, n=16):
    """Per-slice time of one batched CLIP image-encoder pass and one SAM2 encoder pass (bf16)."""
    import torch

    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.pipeline.preprocess import pad_to_square, to_rgb
    from MedCLIPSAMLib.runtime import autocast

    rgb = to_rgb(pad_to_square(gray8)[0])
    batch = torch.stack([clip.preprocess_array(rgb)] * n)
    out = {}
    for amp in (False, True):
        with torch.no_grad(), autocast(clip.device, amp):
            clip.encode_image(batch[:2])
            _, t = _t(clip.encode_image, batch)
        out[f"clip_per_slice_{'bf16' if amp else 'fp32'}"] = t / n
    predictor = image_predictor(sam)
    for amp in (False, True):
        with torch.inference_mode(), autocast(clip.device, amp):
            predictor.set_image(rgb)
            out[f"sam_encoder_{'bf16' if amp else 'fp32'}"] = min(_t(predictor.set_image, rgb)[1] for _ in range(2))
    return out


def peak_memory(shape, args, tmp):
    """Write an MR phantom of `shape` to NRRD here, then run `medclipsam segment` on it in a child and
    return its peak RSS (the phantom's own generation memory stays in this process)."""
    import SimpleITK as sitk

    from MedCLIPSAMLib.phantoms import make_volume

    path = os.path.join(tmp, "big.nrrd")
    start = time.perf_counter()
    ph = make_volume("mr", shape=tuple(shape), seed=5, lesion={"size": "large"})
    sitk.WriteImage(ph.image, path)
    made = time.perf_counter() - start
    del ph
    cmd = [sys.executable, "-m", "MedCLIPSAMLib", "segment", path, "--prompt", "brain tumor", "--output",
           os.path.join(tmp, "big.seg.nrrd"), "--models", f"{args.clip},{args.sams[0]}", "--device", args.device,
           "--progress", "none"] + args.memory_args
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc, seconds = _t(subprocess.run, cmd, capture_output=True, text=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"memory run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"shape_zyx": list(shape), "voxels": int(shape[0] * shape[1] * shape[2]),
            "volume_mb_float32": shape[0] * shape[1] * shape[2] * 4 / 2**20, "command": " ".join(cmd[1:]),
            "peak_rss_gb": peak_kb / 2**20, "peak_rss_earlier_children_gb": before / 2**20,
            "seconds": seconds, "phantom_make_seconds": made, "log_tail": proc.stderr[-600:]}


def _memory(args):
    print("\n== memory ==", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        return peak_memory(args.memory_shape, args, tmp)


def main(argv=None):
    import numpy as np
    import torch

    from MedCLIPSAMLib.models import load_clip, load_sam2
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.presets import get_preset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip", default="random-biomedclip")
    p.add_argument("--sams", nargs="+", default=["random-sam2.1-hiera-tiny"])
    p.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--preset", default="v1", help="preset of the default-mode volume run (the CLI default)")
    p.add_argument("--measure-k", type=int, default=16)
    p.add_argument("--measure-steps", type=int, default=3)
    p.add_argument("--memory-shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--memory-args", nargs=argparse.REMAINDER,
                   default=[],
                   help="extra `medclipsam segment` arguments of the memory run (last option; default: none, "
                        "i.e. the CLI's default pipeline, preset v1 with SAM2)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--only-memory", action="store_true", help="only part (d)")
    p.add_argument("--saliency-from", help="reuse part (a)'s saliency figures from an earlier JSON of this script")
    p.add_argument("--skip-volume", action="store_true")
    p.add_argument("--rederive", metavar="RECORD.json",
                   help="measure nothing: recompute RECORD's ratios and goals with the current definitions, "
                        "print the report and write the record back")
    args = p.parse_args(argv)
    if args.rederive:
        out = rederive(args.rederive)
        report(out, out["per_sam"][next(iter(out["per_sam"]))]["slices"])
        write_record(args.rederive, out)
        return out

    def save():  # after every part, so a run cut short still leaves its figures
        if args.json:
            write_record(args.json, out)

    t0 = time.perf_counter()
    out = {"device": args.device, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           **cpu_description(), "cores": os.cpu_count(), "torch": torch.__version__, "settings": vars(args),
           "load_avg_start": _load()}
    print(f"speed benchmark: {args.clip} + {', '.join(args.sams)} on {args.device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {_load()}", flush=True)

    if args.only_memory:
        out["memory"] = _memory(args)
        m = out["memory"]
        print(f"peak RSS {m['peak_rss_gb']:.2f} GB for {m['shape_zyx']} in {m['seconds']:.0f} s: {m['command']}")
        save()
        return out
    # (a) saliency stages: the existing script, in this process
    if args.saliency_from:
        with open(args.saliency_from) as f:
            out["saliency"] = json.load(f)["saliency"]
        out["saliency"]["reused_from"] = args.saliency_from
    else:
        with tempfile.TemporaryDirectory() as tmp:
            sal_json = os.path.join(tmp, "saliency.json")
            saliency_speed.main(["--model", args.clip, "--device", args.device, "--measure-k", str(args.measure_k),
                                 "--measure-steps", str(args.measure_steps), "--json", sal_json])
            with open(sal_json) as f:
                out["saliency"] = json.load(f)
    save()
    sal = out["saliency"]["results"]
    method = get_preset(args.preset).saliency
    ref_key = {"gscorecam": "gscorecam reference (1 image/forward, fp32)",
               "m2ib": "m2ib reference (whole encoder/step, fp32)"}[method]
    post = "crf post-processing" if get_preset(args.preset).postprocess == "crf" else "kmeans post-processing"
    ref_gs = sal[ref_key]["per_slice_s"]
    our_gs = sal[next(n for n in sal if n.startswith(method + " ours") and "bf16" in n)]["per_slice_s"]
    gs_ours = sal[next(n for n in sal if n.startswith("gscorecam ours") and "bf16" in n)]["per_slice_s"]
    m2_ours = sal["m2ib ours (cached prefix, bf16)"]["per_slice_s"]
    out["paper_faithful_definition"] = (f"preset {args.preset}: {ref_key} + text ensemble per slice + {post} + "
                                        "SAM2 encoder + box fp32, every non-blank slice, no gate")

    clip = load_clip(args.clip, args.device)
    phantom = make_volume("mr", shape=tuple(args.shape), seed=11, lesion={"size": "large"})
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(phantom.image)
    n_slices = int(sum(arr[k].max() > arr[k].min() for k in range(arr.shape[0])))
    out["per_sam"] = {}
    for sam_name in args.sams:
        print(f"\n== {sam_name} ==", flush=True)
        sam = load_sam2(sam_name, args.device, video=True)
        stages, gray8 = slice_stages(clip, sam, phantom)
        floor = floor_times(clip, sam, gray8)
        res = {"stages_s": stages, "floor_parts_s": floor, "load_avg": _load()}

        # (b) per volume
        paper_slice = ref_gs + stages["text ensemble per slice (reference)"] + stages[post] \
            + stages["sam2 encoder + box fp32 (reference)"]
        ours_stages_slice = our_gs + stages[post] + stages["sam2 encoder + box bf16 (ours)"]
        res["paper_per_slice_s"] = paper_slice
        res["paper_volume_s_extrapolated"] = paper_slice * n_slices
        res["per_slice_ours_stages_no_gate_s_extrapolated"] = ours_stages_slice * n_slices
        res["floor_volume_s"] = (floor["clip_per_slice_bf16"] + floor["sam_encoder_bf16"]) * n_slices
        res["slices"] = n_slices
        out["per_sam"][sam_name] = res
        save()
        if not args.skip_volume:
            settings = get_preset(args.preset, ["autocast=true"])
            row = volume_modes.run_mode(clip, sam, settings, phantom.image, "auto", True, 3)
            row["mode"] = "auto (carry on CPU), gate, 3 key slices, bf16"
            res["default"] = row
            d = row["seconds"]
            res["default_speedup_vs_paper"] = res["paper_volume_s_extrapolated"] / d
            res["default_over_floor"] = d / res["floor_volume_s"]
            # the gate skips slices, so the default can beat the all-slice floor; this is the stricter ratio
            res["floor_kept_slices_s"] = res["floor_volume_s"] * row["kept_slices"] / n_slices
            res["default_over_floor_kept_slices"] = d / res["floor_kept_slices_s"]
            res["load_avg_after_volume"] = _load()
            if args.preset == "v2":  # v1's default mode: the same run with gScoreCAM on the key slices
                k = row["key_slices"] or 3
                est = d - k * m2_ours + k * gs_ours
                res["v1_default_estimate_s"] = est
                res["v1_default_over_floor_kept_slices_estimate"] = est / res["floor_kept_slices_s"]
                res["v1_paper_volume_s_extrapolated"] = (sal["gscorecam reference (1 image/forward, fp32)"]["per_slice_s"]
                    + stages["text ensemble per slice (reference)"] + stages["crf post-processing"]
                    + stages["sam2 encoder + box fp32 (reference)"]) * n_slices
        out["per_sam"][sam_name] = res
        save()
        del sam

    if not args.skip_memory:
        out["memory"] = _memory(args)
    out["total_seconds"] = time.perf_counter() - t0
    out["load_avg_end"] = _load()

    report(out, n_slices)
    save()
    return out


def report(out, n_slices):
    sal = out["saliency"]["results"]
    print(f"\n(a) per slice, each stage (s; saliency at k=300 / 10 steps extrapolated from the measured settings)")
    print(f"{'stage':48s} {'reference':>10s} {'ours':>10s} {'speedup':>8s} {'max|dmap| fp32':>15s}")
    pairs = [("gscorecam (1 img/fwd fp32 vs batched bf16)", "gscorecam reference (1 image/forward, fp32)",
              next(n for n in sal if n.startswith("gscorecam ours") and "bf16" in n),
              next(n for n in sal if n.startswith("gscorecam ours") and "fp32" in n)),
             ("m2ib (whole encoder vs cached prefix bf16)", "m2ib reference (whole encoder/step, fp32)",
              "m2ib ours (cached prefix, bf16)", "m2ib ours (cached prefix, fp32)")]
    goals = {}
    for label, ref, ours, ours32 in pairs:
        r, o = sal[ref]["per_slice_s"], sal[ours]["per_slice_s"]
        diff = sal[ours32]["max_abs_map_diff_vs_reference"]
        fp32_speed = r / sal[ours32]["per_slice_s"]
        print(f"{label:48s} {r:10.2f} {o:10.2f} {r / o:7.1f}x {diff:15.1e}   (fp32 only: {fp32_speed:.1f}x, "
              f"bf16 max|dmap| {sal[ours]['max_abs_map_diff_vs_reference']:.2f})")
        goals[f"saliency {label.split()[0]} >= 3x"] = r / o >= GOALS["saliency_speedup"]
        goals[f"saliency {label.split()[0]} fp32 maps equal (max|d| < 1e-3)"] = diff < 1e-3
    for sam_name, res in out["per_sam"].items():
        st = res["stages_s"]
        cached = st.get("text ensemble cached (ours)")
        print(f"{'text ensemble (per slice vs cached)':48s} {st['text ensemble per slice (reference)']:10.2f} "
              + (f"{cached:10.6f}" if cached is not None else f"{'not measured':>10s}"))
        print(f"{'crf / kmeans post-processing (same code)':48s} {st['crf post-processing']:10.2f} "
              f"{st['kmeans post-processing']:10.2f}")
        r, o = st["sam2 encoder + box fp32 (reference)"], st["sam2 encoder + box bf16 (ours)"]
        print(f"{'SAM2 encoder + box, ' + sam_name.replace('random-', ''):48s} {r:10.2f} {o:10.2f} {r / o:7.1f}x")

    print(f"\n(b)+(c) per volume, 256x256x{n_slices} MR phantom (s)")
    print(f"{'':34s} {'paper per-slice':>16s} {'ours, per-slice':>16s} {'default':>9s} {'floor':>8s} "
          f"{'paper/default':>14s} {'default/floor':>14s}")
    for sam_name, res in out["per_sam"].items():
        d = res.get("default", {}).get("seconds", float("nan"))
        print(f"{sam_name.replace('random-', ''):34s} {res['paper_volume_s_extrapolated']:15.0f}* "
              f"{res['per_slice_ours_stages_no_gate_s_extrapolated']:15.0f}* {d:9.1f} {res.get('floor_kept_slices_s', float('nan')):8.1f} "
              f"{res.get('default_speedup_vs_paper', float('nan')):13.1f}x "
              f"{res.get('default_over_floor_kept_slices', float('nan')):13.2f}x")
        if "default" in res:
            print(f"{'':34s} default kept {res['default']['kept_slices']}/{res['default']['slices']} slices, "
                  f"{res['default']['key_slices']} key slices; floor = {n_slices} x (CLIP "
                  f"{res['floor_parts_s']['clip_per_slice_bf16']:.2f} s + SAM2 enc {res['floor_parts_s']['sam_encoder_bf16']:.2f} s)")
            print(f"{'':34s} floor and default/floor over the kept slices (all {n_slices} slices: floor "
                  f"{res['floor_volume_s']:.1f} s)")
            goals[f"default >= 10x paper ({sam_name})"] = res["default_speedup_vs_paper"] >= GOALS["volume_speedup_vs_paper"]
            # one denominator for every ratio: the floor over the slices the gate kept (the stricter one)
            goals[f"default within 3x of floor ({sam_name})"] = (res["default_over_floor_kept_slices"]
                                                                 <= GOALS["default_over_floor_max"])
        if "v1_default_estimate_s" in res:
            goals[f"v1 default (estimated) within 3x of floor ({sam_name})"] = (
                res["v1_default_over_floor_kept_slices_estimate"] <= GOALS["default_over_floor_max"])
        if "v1_default_estimate_s" in res:
            print(f"{'':34s} v1 (gScoreCAM k=300 + CRF) ESTIMATED: default {res['v1_default_estimate_s']:.0f} s "
                  f"(measured v2 run - 3 x M2IB + 3 x gScoreCAM ours), paper-faithful {res['v1_paper_volume_s_extrapolated']:.0f} s*, "
                  f"ratio {res['v1_paper_volume_s_extrapolated'] / res['v1_default_estimate_s']:.1f}x, "
                  f"{res['v1_default_over_floor_kept_slices_estimate']:.2f}x the floor over the kept slices")
    print(f"  default measured end to end with preset {out['settings']['preset']}; "
          f"* extrapolated: measured per-slice stage times x slices ({out['paper_faithful_definition']}; "
          "'ours, per-slice': our bf16 stages on every slice, no gate)")
    if "memory" in out:
        m = out["memory"]
        print(f"\n(d) peak memory, {m['shape_zyx'][2]}x{m['shape_zyx'][1]}x{m['shape_zyx'][0]} MR volume "
              f"({m['volume_mb_float32']:.0f} MB float32): peak RSS {m['peak_rss_gb']:.2f} GB in {m['seconds']:.0f} s"
              f"\n    {m['command']}")
        goals["peak RSS < 4 GB"] = m["peak_rss_gb"] < GOALS["peak_rss_gb_max"]
    print(f"\nload average: start {out['load_avg_start']}, end {out['load_avg_end']} (2 cores shared with other jobs)")
    print("goals:")
    for name, ok in goals.items():
        print(f"  {'MET    ' if ok else 'NOT MET'} {name}")
    out["goals"] = goals


if __name__ == "__main__":
    main()
