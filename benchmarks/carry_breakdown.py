"""Issue 37: where a carried slice's time goes (the carry: each next slice gets SAM2's image predictor with
the box of its neighbour's mask, pipeline/volume.py VolumeSegmenter._carry).

    python -m benchmarks.carry_breakdown [--slices 12] [--size 256] [--json benchmarks/results/carry_breakdown_cpu.json]

One carried slice, split into the calls the carry makes, each timed on its own over the same slices of an
MR phantom, with the full-size random-weight MedSAM2 (512 px) under the precision the pipeline uses on this
CPU (runtime.precision_plan), inference mode as in the carry:
  window + pad   gray8 of the slice, pad_to_square, to_rgb;
  transform      SAM2's own image transform (to tensor, resize to 512, normalise);
  encoder        the Hiera trunk + FPN neck (forward_image) and the two high-resolution convolutions, what
                 set_image computes after the transform;
  cache          the session cache's share of set_image: hashing the image, storing bf16 copies;
  decoder        prompt encoder + mask decoder + mask upsampling (predictor.predict with the box);
  post           threshold, largest component, probability map (predict_mask after the decoder), unpad.
The sum is compared with one whole carried slice (set_image + predict_mask as volume.py calls them).
Random weights: speed only. Timings belong here, never in tests.
"""

import argparse
import os
import time

import numpy as np

from benchmarks import write_record


def main(argv=None):
    from MedCLIPSAMLib.runtime import prepare_openmp

    prepare_openmp()  # as medclipsam does, before torch loads
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--sam", default="random-medsam2")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import SimpleITK as sitk
    import torch

    from MedCLIPSAMLib.models import load_sam2
    from MedCLIPSAMLib.models.sam import image_predictor
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.preprocess import intensity_range, normalize_to_uint8, pad_to_square, to_rgb, unpad
    from MedCLIPSAMLib.pipeline.sam_refine import predict_mask
    from MedCLIPSAMLib.pipeline.session import ByteLRU, CachedPredictor
    from MedCLIPSAMLib.postprocess import keep_top_components
    from MedCLIPSAMLib.runtime import autocast, cpu_has_native_bf16, precision_plan

    from benchmarks.cpu_minute import host_record

    plan, reason = precision_plan("cpu", "auto", cpu_has_native_bf16())
    use_bf16 = plan["sam"] == "bf16"
    sam = load_sam2(args.sam, "cpu")
    predictor = image_predictor(sam)
    cached = CachedPredictor(image_predictor(sam), ByteLRU(2 * 1024**3), torch.bfloat16 if use_bf16 else None)
    ph = make_volume("mr", shape=(args.slices + 8, args.size, args.size), seed=5, lesion={"side": "left"})
    volume = sitk.GetArrayFromImage(ph.image)
    window = intensity_range(volume)
    ks = list(range(4, 4 + args.slices))
    box = np.array([[args.size * 0.3, args.size * 0.3, args.size * 0.6, args.size * 0.6]], np.float32)
    parts = {name: [] for name in ("window + pad", "transform", "encoder", "cache", "decoder", "post", "whole slice")}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        parts[name].append(time.perf_counter() - t)
        return out

    with torch.inference_mode(), autocast("cpu", "auto"):
        for k in ks[:2]:  # warm-up: first calls allocate and pick kernels
            square, pad = pad_to_square(normalize_to_uint8(volume[k], value_range=window))
            predictor.set_image(to_rgb(square))
            predictor.predict(box=box, multimask_output=False, return_logits=True)
        for k in ks:
            rgb, pad = timed("window + pad", lambda: (lambda sq: (to_rgb(sq[0]), sq[1]))(
                pad_to_square(normalize_to_uint8(volume[k], value_range=window))))
            x = timed("transform", lambda: predictor._transforms(rgb)[None, ...])

            def encode():
                out = predictor.model.forward_image(x)
                _, vision_feats, _, _ = predictor.model._prepare_backbone_features(out)
                return vision_feats
            timed("encoder", encode)
            predictor.set_image(rgb)   # the real set_image (for the decoder below), not timed
            feats = predictor._features

            def cache_share():
                import hashlib
                hashlib.blake2b(np.ascontiguousarray(rgb).tobytes(), digest_size=16).hexdigest()
                stored = [t.to(torch.bfloat16) for t in [feats["image_embed"], *feats["high_res_feats"]]]
                return [t.to(torch.float32) for t in stored]
            timed("cache", cache_share if use_bf16 else lambda: None)
            logits = timed("decoder", lambda: predictor.predict(box=box, multimask_output=False,
                                                                return_logits=True)[0])

            def post():
                lg = np.asarray(logits, dtype=np.float32).max(axis=0)
                mask = keep_top_components(lg > 0.0, 1)
                prob = 1.0 / (1.0 + np.exp(-np.clip(lg, -50, 50)))
                return unpad(mask, pad), unpad(prob, pad)
            timed("post", post)

            def whole():
                cached.volume_id = f"v{k}-{time.perf_counter()}"  # a miss, as a newly carried slice is
                g = normalize_to_uint8(volume[k], value_range=window)
                sq, pd = pad_to_square(g)
                cached.set_image(to_rgb(sq))
                mask, prob = predict_mask(cached, {"boxes": box, "points": None, "labels": None}, 0.5, 1)
                return unpad(mask, pd), unpad(prob, pd)
            timed("whole slice", whole)

    out = host_record("carry_breakdown", beside="nothing started by this script", sam=args.sam,
                      slices=len(ks), slice_size=args.size, precision=plan["sam"], precision_reason=reason,
                      threads=torch.get_num_threads())
    whole = float(np.median(parts["whole slice"]))
    out["parts"] = {name: {"median_s": float(np.median(v)), "min_s": float(np.min(v)),
                           "share_of_whole": float(np.median(v)) / whole} for name, v in parts.items()}
    out["sum_of_parts_s"] = sum(out["parts"][n]["median_s"] for n in parts if n != "whole slice")
    out["load_end"] = os.getloadavg()
    print(f"\none carried slice ({args.size}x{args.size} MR phantom -> 512 px {args.sam}), "
          f"{out['threads']} threads, {plan['sam']}; median of {len(ks)} slices")
    for name, v in out["parts"].items():
        print(f"  {name:<14} {v['median_s'] * 1000:8.1f} ms   {100 * v['share_of_whole']:5.1f} %")
    print(f"  {'sum of parts':<14} {out['sum_of_parts_s'] * 1000:8.1f} ms")
    if args.json:
        write_record(args.json, out)


if __name__ == "__main__":
    main()
