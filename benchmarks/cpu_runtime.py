"""Issue 37: CPU inference runtimes (ONNX Runtime, OpenVINO) against PyTorch for the two image encoders.

    python -m benchmarks.cpu_runtime --json benchmarks/results/cpu_runtime_cpu.json
    python -m benchmarks.cpu_runtime --encoders sam --variants "torch bf16,ov default,ov unpinned" --repeats 10

    python -m benchmarks.cpu_runtime --segment --shape 24 256 256 --repeats 2 --json F

`--segment`: whole `segment --preset v2` runs (benchmarks.cpu_minute.run_segment: wall seconds per stage)
with `--set cpu_runtime=torch` and `=openvino`, interleaved, after one openvino run that converts (its time
is recorded as the first use), and the Dice between the two variants' masks (random weights: masks are
meaningless, their difference is not).
Needs openvino (requirements/lock.txt) and, for the ONNX Runtime variant, `pip install onnxruntime onnx`.

Encoders (full-size random weights: speed is real, outputs meaningless), each at the batch the pipeline uses:
    clip  BiomedCLIP's image tower (open_clip TimmModel: ViT-B/16 + projection), 16 MR phantom slices at 224
          (the presence gate's batch); PyTorch runs today's models.clip_image.image_embeddings
    sam   MedSAM2's image encoder (SAM 2.1 Hiera tiny + FPN neck), 1 slice at 512 (what set_image runs per
          slice in the carry; its two small conv_s0/conv_s1 heads and the no-memory embedding are left out)
Variants, interleaved (each repeat runs every variant once, in a rotated order), minimum over repeats:
    torch fp32, torch bf16 (autocast: today's default on a CPU with native bf16),
    ort fp32    ONNX Runtime CPUExecutionProvider from torch.onnx.export (TorchScript exporter), all graph
                optimisations; its x86 CPU provider has no bf16 path (its bf16 gemm fast-math is arm64 only)
    ov fp32     OpenVINO, ov.convert_model on the PyTorch module, INFERENCE_PRECISION_HINT=f32
    ov default  OpenVINO's own default precision hint (recorded: bf16 on a CPU with avx512_bf16/AMX); the
                model converted for ov fp32 is reused, so its conversion cost is the compile only
    ov unpinned ov default with ENABLE_CPU_PINNING=False (OpenVINO pins its threads to cores by default)
Both runtimes get 2 threads (this CPU's cores) and a latency hint. Per variant: one-time conversion cost
(export/convert + compile/session, seconds), and the outputs' max relative difference (max |a - b| over
max |b|, worst output) against PyTorch fp32 and against PyTorch bf16. Cases (`--beside`): none (nothing
started by us: the load average and busiest other processes are recorded) and torch2 (another PyTorch
process, 2 threads, a loop of 512x512 fp32 matmuls: benchmarks.contention's competitor).
"""

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks import write_record
from benchmarks.contention import busiest_others, start_competitor, stop_competitor
from benchmarks.cpu_minute import CLIP, _load, host_record

SAM = "random-medsam2"
THREADS = 2
VARIANTS = ("torch fp32", "torch bf16", "ort fp32", "ov fp32", "ov default", "ov unpinned")


def as_module(inner, fn):
    """A torch module holding `inner` (so its weights are parameters, not constants) whose forward is
    fn(inner, x), a tuple of tensors: what the exporters take."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return fn(self.inner, x)

    return Wrapped().eval()


def inputs(clip, sam, gate_slices, seed=5):
    """(clip batch [gate_slices,3,224,224], sam input [1,3,512,512]) from an MR phantom, as the pipeline
    prepares them (pipeline.image.clip_input; SAM2ImagePredictor's own transforms on the padded square)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.image import clip_input
    from MedCLIPSAMLib.pipeline.preprocess import normalize_to_uint8, pad_to_square, to_rgb

    ph = make_volume("mr", shape=(gate_slices, 256, 256), seed=seed, lesion={"size": "large"})
    vol = sitk.GetArrayFromImage(ph.image)
    lo, hi = float(np.percentile(vol, 1)), float(np.percentile(vol, 99))
    grays = [normalize_to_uint8(vol[z], value_range=(lo, hi)) for z in range(vol.shape[0])]
    batch = torch.stack([clip_input(clip, g) for g in grays])
    predictor = image_predictor(sam)
    square = to_rgb(pad_to_square(grays[len(grays) // 2])[0])
    return batch, predictor._transforms(square)[None].float()


def build(name, module, example, torch_call, workdir):
    """variant name -> (callable(x) -> list of numpy outputs, conversion seconds, precision actually used)."""
    import numpy as np
    import torch

    from MedCLIPSAMLib.runtime import autocast

    if name.startswith("torch"):
        amp = name.endswith("bf16")

        def run(x):
            with torch.inference_mode(), autocast("cpu", amp):
                return [o.float().numpy() for o in torch_call(x)]
        return run, 0.0, "bf16" if amp else "fp32"
    t0 = time.perf_counter()
    if name.startswith("ort"):
        import onnxruntime as ort

        path = os.path.join(workdir, f"{id(module)}.onnx")
        with torch.no_grad():
            torch.onnx.export(module, (example,), path, dynamo=False, opset_version=17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = sess.get_inputs()[0].name

        def run(x):
            return sess.run(None, {feed: x.numpy()})
        return run, time.perf_counter() - t0, "fp32"
    import openvino as ov

    key = id(module), "ov"
    if key not in _converted:   # one conversion per encoder; each precision compiles it
        with torch.no_grad():
            _converted[key] = ov.convert_model(module, example_input=example)
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
    if name == "ov fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    if name == "ov unpinned":   # threads not pinned to cores: may share better with another process
        config["ENABLE_CPU_PINNING"] = False
    compiled = ov.Core().compile_model(_converted[key], "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    request = compiled.create_infer_request()

    def run(x):
        res = request.infer([x.numpy()])
        return [np.asarray(res[o]) for o in compiled.outputs]
    return run, time.perf_counter() - t0, precision


_converted = {}


def rel_diff(outs, refs):
    """Worst over outputs of max |a - b| / max |b|."""
    import numpy as np

    return float(max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12) for a, b in zip(outs, refs)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beside", default="none,torch2", help="cases, in order: none, torch2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gate-slices", type=int, default=16)
    ap.add_argument("--encoders", default="clip,sam")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of: " + ", ".join(VARIANTS))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--segment", action="store_true", help="whole v2 segmentations instead (see above)")
    ap.add_argument("--shape", type=int, nargs=3, default=(24, 256, 256), metavar=("Z", "Y", "X"))
    args = ap.parse_args(argv)
    if args.segment:
        return segment_main(args)

    from MedCLIPSAMLib.runtime import prepare_openmp

    prepare_openmp()   # what `medclipsam` does first thing (OMP_WAIT_POLICY=PASSIVE), before torch loads
    import torch

    from MedCLIPSAMLib.models import load_clip, load_sam2
    from MedCLIPSAMLib.models.clip_image import image_embeddings
    from MedCLIPSAMLib.runtime import configure_threads

    configure_threads(THREADS)
    clip, sam = load_clip(CLIP, "cpu"), load_sam2(SAM, "cpu")
    clip_x, sam_x = inputs(clip, sam, args.gate_slices)
    def sam_features(encoder, x):   # the features SAM2's decoder reads (its positional encodings are constants)
        out = encoder(x)
        return (out["vision_features"], *out["backbone_fpn"])

    encoders = {   # name -> (module to convert, input, today's PyTorch call)
        "clip": (as_module(clip.model.visual, lambda m, x: (m(x),)), clip_x, lambda x: [image_embeddings(clip, x)]),
        "sam": (as_module(sam.image_encoder, sam_features), sam_x, lambda x: sam_features(sam.image_encoder, x)),
    }
    encoders = {k: encoders[k] for k in args.encoders.split(",")}
    import openvino
    try:   # onnxruntime and onnx are for this benchmark only (not in requirements/lock.txt)
        import onnxruntime
    except ImportError:
        onnxruntime = None

    record = host_record("cpu runtime", models=f"{CLIP},{SAM}", models_random=True, threads=THREADS,
                         omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), torch=torch.__version__,
                         onnxruntime=onnxruntime and onnxruntime.__version__, openvino=openvino.__version__,
                         work={"clip": list(clip_x.shape), "sam": list(sam_x.shape)}, variants={}, runs=[])
    cases, variants = args.beside.split(","), args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant '{v}'; choose from {', '.join(VARIANTS)}")
    if "torch bf16" not in variants:
        raise SystemExit("the variants must include 'torch bf16' (today's default, what the ratios are against)")
    if onnxruntime is None and "ort fp32" in variants:
        print("onnxruntime is not installed (pip install onnxruntime onnx): no 'ort fp32'")
        variants.remove("ort fp32")
    variants = [v for v in VARIANTS if v in variants or v == "torch fp32"]   # fp32: the outputs' reference
    record["variants_run"] = variants
    with tempfile.TemporaryDirectory(prefix="cpu-runtime-") as workdir:
        runners = {}
        for enc, (module, x, torch_call) in encoders.items():
            refs = {}
            for v in variants:
                run, convert_s, precision = build(v, module, x, torch_call, workdir)
                outs = run(x)   # also the warm-up
                if v.startswith("torch"):
                    refs[v] = outs
                runners[enc, v] = run
                record["variants"][f"{enc} {v}"] = {
                    "convert_s": convert_s, "precision": precision,
                    "rel_diff_vs_fp32": rel_diff(outs, refs["torch fp32"]),
                    "rel_diff_vs_bf16": rel_diff(outs, refs["torch bf16"]) if "torch bf16" in refs else 0.0}
                print(f"{enc} {v:<11} converted in {convert_s:5.1f} s, precision {precision}, rel. diff vs torch "
                      f"fp32 {record['variants'][f'{enc} {v}']['rel_diff_vs_fp32']:.2e}", flush=True)
        for case in cases:
            proc = start_competitor(case)
            try:
                for rep in range(args.repeats):
                    others, load = busiest_others(), _load()
                    for enc, (_, x, _) in encoders.items():
                        shift = (rep + cases.index(case)) % len(variants)
                        for v in variants[shift:] + variants[:shift]:
                            t0 = time.perf_counter()
                            runners[enc, v](x)
                            record["runs"].append({"encoder": enc, "variant": v, "beside": case, "repeat": rep,
                                                   "wall_s": time.perf_counter() - t0, "load_before": load,
                                                   "others_before": others})
                    print(f"[{case}] repeat {rep} done, load {load[0]:.2f}; beside: {'; '.join(others[:2])}",
                          flush=True)
            finally:
                cpu = stop_competitor(proc)
                if cpu is not None:
                    record.setdefault("competitor_cpu_s", []).append({"case": case, "cpu_s": cpu})
    record["load_end"] = _load()
    print(f"\n{record['cpu_model']} {' '.join(record['cpu_flags'])}, {os.cpu_count()} CPUs, {THREADS} threads, "
          f"torch {torch.__version__}, onnxruntime {record['onnxruntime']}, openvino {openvino.__version__}; "
          f"load {record['load_start'][0]:.2f} -> {record['load_end'][0]:.2f}; random weights; seconds per call, "
          f"minimum over {args.repeats} interleaved repeats")
    best = {}
    for r in record["runs"]:
        key = r["encoder"], r["variant"], r["beside"]
        best[key] = min(best.get(key, float("inf")), r["wall_s"])
    record["best_s"] = {" | ".join(k): v for k, v in best.items()}
    head = f"{'encoder variant':<18}{'precision':>10}{'convert s':>10}{'vs fp32':>10}{'vs bf16':>10}"
    head += "".join(f"{c + ' s':>10}{'bf16/it':>9}" for c in cases)
    print(head)
    for enc in encoders:
        for v in variants:
            info = record["variants"][f"{enc} {v}"]
            row = (f"{enc + ' ' + v:<18}{info['precision']:>10}{info['convert_s']:>10.1f}"
                   f"{info['rel_diff_vs_fp32']:>10.1e}{info['rel_diff_vs_bf16']:>10.1e}")
            for c in cases:
                row += f"{best[enc, v, c]:>10.3f}{best[enc, 'torch bf16', c] / best[enc, v, c]:>9.2f}"
            print(row)
    print("bf16/it: today's default (torch bf16) over this variant's time: above 1 is faster than today")
    if args.json:
        write_record(args.json, record)
    return 0


def segment_main(args):
    """`segment --preset v2` with cpu_runtime=torch and =openvino, interleaved (module docstring)."""
    import shutil

    import numpy as np
    import SimpleITK as sitk

    from benchmarks.cpu_minute import build_random_models, run_segment
    from MedCLIPSAMLib.phantoms import make_volume

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    models = f"{CLIP},{SAM}"
    record = host_record("cpu runtime (segment)", models=models, models_random=True, shape_zyx=list(args.shape),
                         runs=[])
    build_random_models(SAM)
    work = tempfile.mkdtemp(prefix="cpu-runtime-seg-")
    try:
        path = os.path.join(work, "mr.nrrd")
        sitk.WriteImage(make_volume("mr", shape=tuple(args.shape), seed=5, lesion={"size": "large"}).image, path)
        env = {"MEDCLIPSAM_TEXT_CACHE": os.path.join(work, "text")}
        order = [("first", "openvino")] + [(f"r{r}", v) for r in range(args.repeats)
                                           for v in (("torch", "openvino") if r % 2 == 0 else ("openvino", "torch"))]
        for rep, v in order:
            others = busiest_others()
            run = run_segment(repo, path, work, models, env, f"{rep}-{v}", extra_args=["--set", f"cpu_runtime={v}"])
            with open(os.path.join(work, f"{rep}-{v}.report.json")) as f:
                run["runtime"] = json.load(f)["runtime"]
            run.update(variant=v, repeat=rep, others_before=others)
            record["runs"].append(run)
            print(f"[{rep}] cpu_runtime={v:<8} {run['total_wall_s']:6.1f} s wall, load {run['load_before'][0]:.1f}; "
                  + ", ".join(f"{k} {st['wall_s']:.1f}" for k, st in run["stages"].items()), flush=True)
        masks = {v: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(work, f"r0-{v}.seg.nrrd"))) > 0
                 for v in ("torch", "openvino")}
        inter = np.logical_and(masks["torch"], masks["openvino"]).sum()
        total = masks["torch"].sum() + masks["openvino"].sum()
        record["mask_dice_torch_vs_openvino"] = float(2 * inter / total) if total else 1.0
        record["mask_voxels"] = {v: int(m.sum()) for v, m in masks.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["load_end"] = _load()
    print(f"\nv2, {'x'.join(map(str, args.shape))} MR phantom, {models} (random weights), {record['cpu_model']} "
          f"{' '.join(record['cpu_flags'])}; wall s, minimum over {args.repeats}; load "
          f"{record['load_start'][0]:.1f} -> {record['load_end'][0]:.1f}")
    stages = [s for s in record["runs"][0]["order"]]
    best = {v: min((r for r in record["runs"] if r["variant"] == v and r["repeat"] != "first"),
                   key=lambda r: r["total_wall_s"]) for v in ("torch", "openvino")}
    print(f"{'stage':<12}{'torch':>10}{'openvino':>10}")
    for st in stages + ["total"]:
        vals = [b["total_wall_s"] if st == "total" else b["stages"].get(st, {}).get("wall_s") for b in best.values()]
        print(f"{st:<12}" + "".join(f"{x:>10.1f}" if isinstance(x, float) else f"{'-':>10}" for x in vals))
    print(f"first openvino run (converts): {record['runs'][0]['total_wall_s']:.1f} s; masks' Dice torch vs openvino "
          f"{record['mask_dice_torch_vs_openvino']:.4f} ({record['mask_voxels']})")
    if args.json:
        write_record(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
