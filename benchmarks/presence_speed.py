"""Where the presence gate's time goes, and the text encoding before / after, side by side in one run.

    python -m benchmarks.presence_speed [--slices 32] [--repeats 2] [--json OUT.json]

Full-size random-weight BiomedCLIP on the CPU, the middle slices of a 256x256 MR phantom.
(1) The gate's image side, each part timed on the same slices, the parts interleaved in every repeat:
    the pipeline's own gate (VolumeSegmenter.slice_embeddings: window, pad, PIL resize, encoder in
    batches of 16 with the preset's autocast) against its parts: windowing (gray8), the CLIP input
    preparation (pad + PIL bicubic resize + normalise), and the bare image encoder in bf16 and fp32.
(2) Text, before (the code this replaces, reproduced here) and after (pipeline/text.py), interleaved:
    ensemble  the prompt's 20 sentences, each padded to the full 256-token context, one batch
              (before) vs trailing padding trimmed (after);
    presence  a prompt with absent sentences scored on the slices: the ensemble plus each prompt and
              absent sentence encoded alone, at 256 tokens (before) vs one shared per-sentence cache,
              missing sentences in one trimmed batch (after).
    Max differences: ensemble embedding, per-sentence embeddings, the presence lead per slice.
Times are the minimum over the repeats; ratios are before / after within this run. Timings belong here,
never in tests.
"""

import argparse
import os
import platform
import time

from benchmarks import write_record

ABSENT = ("an MR slice of the head with a normal brain", "a normal brain MRI", "an MRI of a healthy brain")


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# -- the code before this change, kept here as the reference --------------------------------------------

def ensemble_before(clip, sentences):
    import torch

    return torch.nn.functional.normalize(clip.encode_text(list(sentences)).mean(dim=0), dim=0)


def presence_before(clip, feats, prompt):
    """Ensemble + every prompt and absent sentence encoded alone (256 tokens each), as presence.py did."""
    ensemble = ensemble_before(clip, prompt.sentences)
    single = {s: clip.encode_text([s])[0] for s in prompt.sentences + prompt.absent}
    cos = {s: (feats.float() @ e.float()).numpy() for s, e in single.items()}
    lead = (max_over(cos, prompt.sentences) - max_over(cos, prompt.absent))
    return ensemble, single, lead


def max_over(cos, sentences):
    import numpy as np

    return np.max(np.stack([cos[s] for s in sentences]), axis=0)


def presence_after(clip, feats, prompt):
    from MedCLIPSAMLib.pipeline.presence import presence_lead
    from MedCLIPSAMLib.pipeline.text import TextEmbeddings

    text = TextEmbeddings(clip)  # fresh: nothing cached
    ensemble = text(prompt)
    lead = presence_lead(feats, prompt, text)
    single = dict(zip(prompt.sentences + prompt.absent, text.sentences(prompt.sentences + prompt.absent)))
    return ensemble, single, lead


def main(argv=None):
    import numpy as np
    import torch

    from MedCLIPSAMLib.models import load_clip
    from MedCLIPSAMLib.phantoms import make_volume
    from MedCLIPSAMLib.pipeline.image import clip_input
    from MedCLIPSAMLib.pipeline.presets import get_preset
    from MedCLIPSAMLib.pipeline.text import TextEmbeddings, make_prompt
    from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter
    from MedCLIPSAMLib.runtime import autocast

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clip", default="random-biomedclip")
    p.add_argument("--json")
    args = p.parse_args(argv)

    out = {"clip": args.clip, "slices": args.slices, "repeats": args.repeats, "threads": torch.get_num_threads(),
           "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "load_avg_start": _load()}
    clip = load_clip(args.clip, "cpu")
    volume = make_volume("mr", shape=(args.slices, 256, 256), seed=11, lesion={"size": "large"}).image
    segmenter = VolumeSegmenter(clip, None, get_preset("v2", ["sam=none"]), VolumeOptions())
    segmenter._prepare(volume)
    ks = range(args.slices)
    batch = torch.stack([clip_input(clip, segmenter.gray8(k)) for k in ks])
    with torch.no_grad(), autocast("cpu", True):
        clip.encode_image(batch[:2])  # warm-up: the first forward pays for kernel selection

    def encode(amp):
        with torch.no_grad(), autocast("cpu", amp):
            return torch.cat([clip.encode_image(batch[s:s + 16]) for s in range(0, len(batch), 16)])

    def gate():
        segmenter._slice_embeddings = None
        return segmenter.slice_embeddings()[1]

    gate_parts = {"pipeline gate (slice_embeddings)": gate,
                  "windowing (gray8)": lambda: [segmenter.gray8(k) for k in ks],
                  "CLIP input prep (pad, PIL bicubic, normalise)": lambda: [clip_input(clip, segmenter.gray8(k)) for k in ks],
                  "image encoder bf16, batch 16": lambda: encode(True),
                  "image encoder fp32, batch 16": lambda: encode(False)}
    prompt = make_prompt("brain tumor", absent=ABSENT)
    feats = encode(True).float()
    text_pairs = {"ensemble": (lambda: ensemble_before(clip, prompt.sentences),
                               lambda: TextEmbeddings(clip)(prompt)),
                  "ensemble + presence test": (lambda: presence_before(clip, feats, prompt),
                                               lambda: presence_after(clip, feats, prompt))}
    times = {name: [] for name in gate_parts}
    for name in text_pairs:
        times[f"{name} before"], times[f"{name} after"] = [], []
    results = {}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats} (load {_load()})", flush=True)
        for name, fn in gate_parts.items():
            times[name].append(_timed(fn)[1])
        for name, (before, after) in text_pairs.items():
            order = (("before", before), ("after", after)) if r % 2 == 0 else (("after", after), ("before", before))
            for label, fn in order:  # alternate the order: drift in the machine's load falls on both
                results[f"{name} {label}"], seconds = _timed(fn)
                times[f"{name} {label}"].append(seconds)

    best = {name: min(ts) for name, ts in times.items()}
    ens_b, ens_a = results["ensemble before"], results["ensemble after"]
    pres_b, pres_a = results["ensemble + presence test before"], results["ensemble + presence test after"]
    diffs = {"ensemble embedding": float((ens_b - ens_a).abs().max()),
             "per-sentence embeddings": max(float((pres_b[1][s] - pres_a[1][s]).abs().max()) for s in pres_b[1]),
             "presence lead per slice": float(np.abs(pres_b[2] - pres_a[2]).max()),
             "ensemble embedding, presence path": float((pres_b[0] - pres_a[0]).abs().max())}
    tokens = clip.tokenize(list(prompt.sentences))
    out.update(times_s=times, best_s=best, max_abs_diff=diffs, load_avg_end=_load(),
               text_tokens={"context": int(tokens.shape[1]), "longest_sentence": int((tokens != 0).sum(1).max()),
                            "sentences": len(prompt.sentences), "absent_sentences": len(prompt.absent)})

    n = args.slices
    enc = best["image encoder bf16, batch 16"]
    print(f"\n(1) gate, image side: {n} slices of 256x256, {args.clip}, {torch.get_num_threads()} threads "
          f"(min of {args.repeats}; load average {out['load_avg_start']} -> {out['load_avg_end']})")
    print(f"{'part':48s} {'s/slice':>8s} {'x encoder bf16':>15s}")
    for name in gate_parts:
        print(f"{name:48s} {best[name] / n:8.3f} {best[name] / enc:15.2f}")
    print(f"\n(2) text, before vs after ({len(prompt.sentences)} sentences + {len(prompt.absent)} absent; "
          f"context {out['text_tokens']['context']} tokens, longest sentence {out['text_tokens']['longest_sentence']})")
    print(f"{'':28s} {'before s':>9s} {'after s':>9s} {'speed-up':>9s}")
    out["speedup"] = {}
    for name in text_pairs:
        b, a = best[f"{name} before"], best[f"{name} after"]
        out["speedup"][name] = b / a
        print(f"{name:28s} {b:9.2f} {a:9.2f} {b / a:8.1f}x")
    print("max |difference| before vs after: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if args.json:
        write_record(args.json, out)
    return out


if __name__ == "__main__":
    main()
