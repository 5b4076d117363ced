"""Issue 37: how far each v2 stage is from what this CPU can do: its networks' FLOPs over the measured
matmul throughput in the precision the stage runs in.

    python -m benchmarks.stage_floors [--json benchmarks/results/stage_floors_cpu.json] [--repeats 5]

(1) FLOPs per unit of work, counted with torch.utils.flop_counter.FlopCounterMode on the full-size
    random-weight models (random-biomedclip, random-medsam2), through the functions the pipeline calls:
      text sentence     encode_sentences on the v2 prompt's sentences (the ensemble of "brain tumor"),
                        divided by their number (one batch, trimmed to the longest sentence, as the pipeline);
      gate slice        clip.encode_image of one 224 px image (image_embeddings: last block for CLS only);
      M2IB prefix       run_m2ib with steps=0 on one key slice: blocks 0..9 once;
      M2IB step         run_m2ib(steps=1) minus run_m2ib(steps=0): blocks 10-11 on the preset's noisy copies,
                        forward and the backward to alpha (torch.autograd.grad), per key slice;
      SAM2 encoder      predictor.set_image of a slice (resized to the model's 512 px);
      SAM2 decoder box  predict_mask with one box after set_image (prompt encoder + mask decoder);
    FlopCounterMode counts matrix products, convolutions and attention; elementwise work (norms, softmax,
    GELU, Adam) is not counted, so the floor is that of the matmuls: a lower bound. torch's table lacks the
    CPU attention kernel (aten._scaled_dot_product_flash_attention_for_cpu and its backward), registered
    here with torch's own formulas for the other attention kernels.
    Loading has no FLOPs: its floor is the checkpoint's bytes over the read speed of the same file measured
    now (from the page cache when the file is cached, as it is after the first load).
(2) This CPU's matmul throughput, GFLOP/s, best of --repeats: torch.matmul on the networks' shapes in fp32,
    on bf16 tensors, and on fp32 tensors under torch.autocast('cpu', bfloat16) as the pipeline runs it, on
    the threads the pipeline uses (runtime.configure_threads) with OMP_WAIT_POLICY=PASSIVE set before torch
    loads (runtime.prepare_openmp, as `medclipsam` does). The floor of a precision is the best figure this
    CPU reached in it (so the floor is a lower bound of the stage's time).
(3) floor seconds of a stage = sum over its parts of FLOPs x units / throughput in the part's precision
    (runtime.precision_plan); share = floor / measured wall seconds. cpu_minute.py applies this to each
    run's counts (slices scored, key slices, M2IB steps, slices carried).
Random weights: FLOPs and speed are real; outputs are meaningless.
"""

import argparse
import os
import sys
import time

from benchmarks import write_record

CLIP, SAM = "random-biomedclip", "random-medsam2"
PROMPT = "brain tumor"
# (M, K, N): the gate's MLP on a batch of 16 slices (16 x 197 tokens), M2IB's qkv on 10 copies, a Hiera
# stage-1 MLP at 512 px (128 x 128 tokens of 96 channels), a square
SHAPES = ((3152, 768, 3072), (1970, 768, 2304), (16384, 96, 384), (1024, 1024, 1024))
MODES = ("fp32", "bf16", "autocast-bf16")   # precision of the mode: bf16 for both bf16 modes
PRECISION_OF_MODE = {"fp32": "fp32", "bf16": "bf16", "autocast-bf16": "bf16"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2", "fma")


# -- CPU ---------------------------------------------------------------------------------------------------

def cpu_flags(path="/proc/cpuinfo"):
    """(model name, the flags of FLAGS that the CPU lists, its nominal MHz or None) from /proc/cpuinfo."""
    model, flags, mhz = None, set(), None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except (OSError, ValueError):
        pass
    return model, [f for f in FLAGS if f in flags], mhz


def bf16_path(flags):
    """Which bf16 matmul path the CPU has, by its flags."""
    if "amx_bf16" in flags:
        return "AMX (amx_bf16 tiles)"
    if "avx512_bf16" in flags:
        return "AVX512-BF16 (vdpbf16ps)"
    return "none: bf16 is emulated (converted to fp32)"


# FP32 FLOP per cycle and core of the microarchitectures whose vector units we are sure of, by
# (cpu family, model) from /proc/cpuinfo. Zen 4 (family 25, model 17: EPYC 9004 "Genoa"): two 256-bit FMA
# pipes, AVX-512 executed as two 256-bit halves: 2 x 8 lanes x 2 = 32. Others: not derived.
FP32_FLOP_PER_CYCLE = {(25, 17): ("AMD Zen 4 (Genoa)", 32)}


def cpu_family_model(path="/proc/cpuinfo"):
    family = model = None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "cpu family" and family is None:
                    family = int(value)
                elif key.strip() == "model" and model is None:
                    model = int(value)
    except (OSError, ValueError):
        pass
    return family, model


def theoretical_peak(cores, mhz):
    """({"fp32": GFLOP/s} or None, how it was derived or why not): cores x nominal clock x FLOP per cycle,
    only for a microarchitecture in FP32_FLOP_PER_CYCLE. bf16 is not derived (the dot-product
    instruction's throughput per port is not something we could confirm)."""
    family, model = cpu_family_model()
    known = FP32_FLOP_PER_CYCLE.get((family, model))
    if known is None or not mhz:
        return None, (f"not derived: cpu family {family} model {model} is not one whose FMA units we know, or "
                      "no clock; measured figures only")
    name, per_cycle = known
    return {"fp32": cores * mhz / 1e3 * per_cycle}, (
        f"fp32 only: {name} (cpu family {family}, model {model}), {per_cycle} FLOP/cycle/core x {cores} cores x "
        f"{mhz:.0f} MHz (cpuinfo's nominal clock; a VM's boost clock is unknown, so this is not an upper "
        "bound); bf16 not derived")


# -- FLOP counting ---------------------------------------------------------------------------------------

def _cpu_attention_formulas():
    """FlopCounterMode's custom_mapping for the CPU attention kernels, with torch's formulas."""
    import torch
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    ops = torch.ops.aten
    return {ops._scaled_dot_product_flash_attention_for_cpu: forward,
            ops._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(fn):
    """(FLOPs of the matrix products, convolutions and attention that fn() runs, fn's result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        result = fn()
    return counter.get_total_flops(), result


def sample_slice(size=256):
    """A uint8 slice with some structure (a bright disc on a darker body), as the pipeline would get."""
    import numpy as np

    yy, xx = np.mgrid[:size, :size]
    gray = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2, 90, 0)
    gray = np.where((yy - size * 0.4) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.1) ** 2, 200, gray)
    return gray.astype(np.uint8)


def m2ib_settings(preset="v2"):
    from MedCLIPSAMLib.pipeline.presets import get_preset

    settings = get_preset(preset)
    return dict(settings.saliency_settings), settings


def gate_flops(clip, x):
    """FLOPs of the gate's CLIP image embedding of the images x [B,3,224,224] (clip.encode_image, as
    volume.py's _embed_slices calls it)."""
    import torch

    with torch.no_grad():
        return count_flops(lambda: clip.encode_image(x))[0]


def m2ib_flops(clip, x, text_embedding, saliency):
    """(prefix, one step) FLOPs of M2IB on the key slices x with the preset's saliency settings: run_m2ib
    itself with steps=0 (blocks 0..block once) and steps=1; their difference is one step (forward on the
    noisy copies and torch.autograd.grad to alpha)."""
    from MedCLIPSAMLib.saliency.m2ib import run_m2ib

    fit = {k: v for k, v in saliency.items() if k != "steps"}
    prefix = count_flops(lambda: run_m2ib(clip, x, text_embedding, steps=0, **fit))[0]
    one = count_flops(lambda: run_m2ib(clip, x, text_embedding, steps=1, **fit))[0]
    return prefix, one - prefix


def sam_flops(sam_model, gray):
    """(encoder, decoder for one box) FLOPs of SAM2 on a uint8 slice, as the key slices and the carry call
    it: predictor.set_image of the padded square, then predict_mask with one box."""
    import numpy as np
    import torch

    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.pipeline.preprocess import pad_to_square, to_rgb
    from MedCLIPSAMLib.pipeline.sam_refine import predict_mask

    predictor = image_predictor(sam_model)
    square, _ = pad_to_square(gray)
    h, w = gray.shape
    box = np.array([[w * 0.3, h * 0.25, w * 0.6, h * 0.55]], np.float32)
    with torch.inference_mode():
        encoder = count_flops(lambda: predictor.set_image(to_rgb(square)))[0]
        decoder = count_flops(lambda: predict_mask(predictor, {"boxes": box, "points": None, "labels": None}))[0]
    return encoder, decoder


def flops_per_unit(clip, sam_model, prompt=PROMPT, preset="v2"):
    """{part: {"flops", "unit"}}: the FLOPs of one unit of each stage's work (module notes, (1))."""
    import torch

    from MedCLIPSAMLib.pipeline.image import clip_input
    from MedCLIPSAMLib.pipeline.text import encode_sentences, make_prompt

    saliency, settings = m2ib_settings(preset)
    copies = int(saliency.get("batch_size", 10))
    sentences = make_prompt(prompt, settings.ensemble).sentences
    gray = sample_slice()
    x = clip_input(clip, gray)[None]
    text_flops, text = count_flops(lambda: encode_sentences(clip, sentences))
    prefix, step = m2ib_flops(clip, x, torch.nn.functional.normalize(text.mean(0), dim=0), saliency)
    encoder, decoder = sam_flops(sam_model, gray)
    return {
        "text sentence": {"flops": text_flops / len(sentences),
                          "unit": f"sentence (of {len(sentences)}, '{prompt}' ensemble)"},
        "gate slice": {"flops": gate_flops(clip, x), "unit": "slice at 224 px"},
        "M2IB prefix": {"flops": prefix, "unit": "key slice (blocks 0..9 once)"},
        "M2IB step": {"flops": step, "unit": f"key slice x step ({copies} copies, forward + backward)"},
        "SAM2 encoder": {"flops": encoder, "unit": f"slice at {sam_model.image_size} px"},
        "SAM2 decoder box": {"flops": decoder, "unit": "box (prompt encoder + mask decoder)"},
    }


# -- what a stage is made of ------------------------------------------------------------------------------

def stage_parts(counts, plan, steps, boxes_per_key=1):
    """{stage: [(part, units, precision)]} for one run. counts: sentences encoded (0 when the disk text
    cache had them), scored (slices the gate embedded), key (key slices that got M2IB + SAM2), carried
    (slices the carry ran on). plan: runtime.precision_plan's {gate, saliency, sam} (the report's
    runtime.precision). The text tower runs in fp32 (encode_sentences has no autocast)."""
    key, carried = counts.get("key", 0), counts.get("carried", 0)
    return {
        "text": [("text sentence", counts.get("sentences", 0), "fp32")],
        "gate": [("gate slice", counts.get("scored", 0), plan["gate"])],
        "key-slices": [("M2IB prefix", key, plan["saliency"]), ("M2IB step", key * steps, plan["saliency"]),
                       ("SAM2 encoder", key, plan["sam"]), ("SAM2 decoder box", key * boxes_per_key, plan["sam"])],
        "propagate": [("SAM2 encoder", carried, plan["sam"]), ("SAM2 decoder box", carried, plan["sam"])],
    }


def floors(parts, per_unit, gflops, walls, load=None):
    """{stage: {"gflop", "floor_s", "wall_s", "share", "parts"}}: floor = sum of FLOPs x units / throughput
    (GFLOP/s by precision); share = floor / wall (None where the run has no wall time for the stage: it did
    not run). load: {stage: {"bytes", "read_gb_s"}} for the loading stages (floor = bytes / read speed)."""
    out = {}
    for stage, spec in (load or {}).items():
        out[stage] = {"gflop": 0.0, "bytes": spec["bytes"], "floor_s": spec["bytes"] / (spec["read_gb_s"] * 1e9),
                      "parts": [{"part": "read the checkpoint", "bytes": spec["bytes"],
                                 "read_gb_s": spec["read_gb_s"]}]}
    for stage, items in parts.items():
        total, floor_s, detail = 0.0, 0.0, []
        for part, units, precision in items:
            flops = per_unit[part]["flops"] * units
            total += flops
            floor_s += flops / (gflops[precision] * 1e9)
            detail.append({"part": part, "units": units, "precision": precision, "gflop": flops / 1e9})
        out[stage] = {"gflop": total / 1e9, "floor_s": floor_s, "parts": detail}
    for stage, row in out.items():
        wall = walls.get(stage)
        row["wall_s"] = wall
        row["share"] = row["floor_s"] / wall if wall else None
    return out


def run_counts(run):
    """The work a cpu_minute run did, from its report summary and progress lines: sentences encoded (0 when
    the disk text cache had them: the 'warm' runs), slices scored by the gate, key slices (those that got
    M2IB + SAM2: the report's saliency_slices), slices carried (the propagate stage's last `done`)."""
    counts = {"sentences": 0, "scored": 0, "key": 0, "carried": run.get("stage_done", {}).get("propagate", 0)}
    for p in run.get("report", []):
        if run.get("text_cache") != "warm":
            counts["sentences"] += p.get("sentences") or 0
        counts["scored"] = max(counts["scored"], p.get("scored") or 0)   # embedded once, shared by the prompts
        counts["key"] += len(p.get("saliency_slices") or [])
    return counts


def run_floors(run, record):
    """floors() of one cpu_minute run with a stage_floors record: the run's counts, the precision its report
    says each stage used (else this CPU's plan), the run's wall seconds per stage."""
    plan = (run.get("runtime") or {}).get("precision") or record["precision_plan"]
    parts = stage_parts(run_counts(run), plan, record["m2ib"]["steps"])
    walls = {stage: st.get("wall_s") for stage, st in run.get("stages", {}).items()}
    return floors(parts, record["per_unit"], record["gflops"], walls, record.get("load"))


# -- throughput --------------------------------------------------------------------------------------------

def _time_matmul(a, b, autocast, repeats, min_s=0.05):
    """Best GFLOP/s of a @ b over `repeats` timings, each of enough calls to last about min_s."""
    import contextlib

    import torch

    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    with torch.inference_mode(), ctx():
        torch.matmul(a, b)   # warm-up (oneDNN picks and caches its kernel)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        calls = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.matmul(a, b)
            best = min(best, (time.perf_counter() - t0) / calls)
    return flops / best / 1e9


def matmul_throughput(repeats=5, shapes=SHAPES):
    """[{shape, mode, gflops}] interleaved (each shape in every mode before the next repeat set), and the
    best GFLOP/s per precision {fp32, bf16}."""
    import torch

    torch.manual_seed(0)
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        ah, bh = a.bfloat16(), b.bfloat16()
        for mode in MODES:
            x, y = (ah, bh) if mode == "bf16" else (a, b)
            rows.append({"shape": [m, k, n], "mode": mode,
                         "gflops": _time_matmul(x, y, mode == "autocast-bf16", repeats)})
    best = {}
    for r in rows:
        p = PRECISION_OF_MODE[r["mode"]]
        best[p] = max(best.get(p, 0.0), r["gflops"])
    return rows, best


# -- loading ---------------------------------------------------------------------------------------------

def read_speed(path, repeats=2, chunk=16 << 20):
    """(bytes, best GB/s) of reading the file into one buffer."""
    size = os.path.getsize(path)
    buf = bytearray(chunk)
    view = memoryview(buf)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
        best = min(best, time.perf_counter() - t0)
    return size, size / best / 1e9


def checkpoint_paths():
    from MedCLIPSAMLib.models.clip import resolve_clip_folder, weights_file
    from MedCLIPSAMLib.models.sam import resolve_sam2

    return {"load CLIP": str(weights_file(resolve_clip_folder(CLIP)[0])), "load SAM": str(resolve_sam2(SAM)[1])}


# -- the record and its table ------------------------------------------------------------------------------

def measure(repeats=5):
    """The whole record: CPU, threads, FLOPs per unit, throughput, loading."""
    from MedCLIPSAMLib.runtime import openmp_setup, prepare_openmp

    prepare_openmp()   # before torch loads, as `medclipsam` does
    import torch

    from benchmarks.contention import busiest_others
    from benchmarks.cpu_minute import host_record
    from MedCLIPSAMLib.models import load_clip, load_sam2
    from MedCLIPSAMLib.runtime import configure_threads, cpu_has_native_bf16, precision_plan

    model, flags, mhz = cpu_flags()
    threads = configure_threads()
    record = host_record("stage_floors", models_random=True, clip=CLIP, sam=SAM,
                         cpu_flags_all=flags, cpu_mhz_nominal=mhz, bf16_path=bf16_path(flags),
                         threads=torch.get_num_threads(), threads_set=threads, openmp=dict(openmp_setup),
                         precision_plan=precision_plan("cpu", "auto", cpu_has_native_bf16())[0])
    record["beside_start"] = busiest_others()   # what else ran (ps, %CPU): the throughput is the shared CPU's
    record["theoretical_peak_gflops"], record["theoretical_peak_note"] = theoretical_peak(threads, mhz)
    t0 = time.perf_counter()
    rows, best = matmul_throughput(repeats)
    record["matmul"] = rows
    record["gflops"] = best
    record["matmul_s"] = time.perf_counter() - t0
    record["load"] = {}
    for stage, path in checkpoint_paths().items():
        size, speed = read_speed(path)
        record["load"][stage] = {"path": os.path.basename(path), "bytes": size, "read_gb_s": speed}
    clip, sam_model = load_clip(CLIP), load_sam2(SAM)
    saliency, _ = m2ib_settings()
    t0 = time.perf_counter()
    record["per_unit"] = flops_per_unit(clip, sam_model)
    record["count_s"] = time.perf_counter() - t0
    record["m2ib"] = {"steps": int(saliency.get("steps", 10)), "copies": int(saliency.get("batch_size", 10))}
    record["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    record["beside_end"] = busiest_others()
    return record


def print_record(record):
    print(f"{record.get('cpu_model')}: flags {' '.join(record.get('cpu_flags_all', []))}; bf16 path: "
          f"{record.get('bf16_path')}; {record.get('threads')} threads, OMP_WAIT_POLICY "
          f"{record.get('openmp', {}).get('omp_wait_policy')}; load {record.get('load_start')} -> "
          f"{record.get('load_end')}")
    for line in record.get("beside_start", [])[:3]:
        print(f"  beside it at the start: {line}")
    print(f"\nmatmul GFLOP/s (best of the repeats)\n{'M x K x N':<20}" + "".join(f"{m:>15}" for m in MODES))
    by_shape = {}
    for r in record["matmul"]:
        by_shape.setdefault(tuple(r["shape"]), {})[r["mode"]] = r["gflops"]
    for shape, cells in by_shape.items():
        print(f"{'x'.join(map(str, shape)):<20}" + "".join(f"{cells.get(m, float('nan')):>15.1f}" for m in MODES))
    print("floor throughput: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in record["gflops"].items()))
    peak = record.get("theoretical_peak_gflops")
    print(f"theoretical peak: {', '.join(f'{p} {g:.0f} GFLOP/s' for p, g in peak.items()) + '; ' if peak else ''}"
          f"{record.get('theoretical_peak_note')}")
    print(f"\n{'FLOPs per unit':<18}{'GFLOP':>10}  unit")
    for part, row in record["per_unit"].items():
        print(f"{part:<18}{row['flops'] / 1e9:>10.3f}  {row['unit']}")
    for stage, spec in record["load"].items():
        print(f"{stage:<18}{spec['bytes'] / 1e6:>9.0f}M  bytes of {spec['path']}, read at {spec['read_gb_s']:.2f} GB/s "
              f"-> floor {spec['bytes'] / spec['read_gb_s'] / 1e9:.2f} s")


def print_floors(title, rows):
    """One run's floor table: stage, GFLOP, precision(s), floor s, wall s, share of the floor."""
    print(f"\n{title}\n{'stage':<14}{'GFLOP':>10}{'precision':>12}{'floor s':>10}{'wall s':>10}"
          f"{'floor/wall':>12}  work")
    for stage, r in rows.items():
        precisions = "/".join(dict.fromkeys(p["precision"] for p in r["parts"] if "precision" in p)) or "read"
        work = ", ".join(f"{p['units']} x {p['part']}" for p in r["parts"] if "units" in p) or \
            f"{r.get('bytes', 0) / 1e6:.0f} MB"
        wall = f"{r['wall_s']:>10.2f}" if r.get("wall_s") else f"{'-':>10}"
        share = f"{r['share']:>12.3f}" if r.get("share") is not None else f"{'-':>12}"
        print(f"{stage:<14}{r['gflop']:>10.1f}{precisions:>12}{r['floor_s']:>10.3f}{wall}{share}  {work}")
    floor = sum(r["floor_s"] for r in rows.values())
    wall = sum(r["wall_s"] or 0.0 for r in rows.values())
    gflop = sum(r["gflop"] for r in rows.values())
    print(f"{'these stages':<14}{gflop:>10.1f}{'':>12}{floor:>10.3f}{wall:>10.2f}"
          f"{floor / wall if wall else float('nan'):>12.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--repeats", type=int, default=5, help="timings per matmul (the best is kept)")
    args = ap.parse_args(argv)
    record = measure(args.repeats)
    print_record(record)
    if args.json:
        write_record(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
