"""InfoNCE vs HN-NCE vs DHN-NCE: held-out retrieval after fine-tuning the same tiny CLIP on phantoms,
and the training speed, side by side in one run.

    python -m benchmarks.clip_losses --json benchmarks/results/clip_losses_cpu.json [--epochs 5]

Each loss trains `tiny-random` (open_clip ViT-Tiny/16 + 2-layer BERT, random start, one seed) on the same
2D CT phantoms whose captions say where the lesion is ("tumor in the liver / left lung / right lung"),
with the same schedule (AdamW lr 1e-4, warm-up 3 steps, cosine, batch 8, tau 0.1), through the repo's
`training.clip_finetune.finetune`, and is scored on phantoms made from other seeds: image->text and
text->image top-1 / top-5 recall, the metric the DHN-NCE paper reports on ROCO. Speed: samples/s of the
training loop (forward + backward + step), fp32 and, for DHN-NCE, bf16 autocast. With 3 distinct caption
classes a recall of 1/3 is chance for image->text; text->image top-1 counts a hit when the retrieved
image carries the query's caption.
"""

import argparse
import os
import tempfile
import time

from benchmarks import write_record

LOSSES = ("infonce", "hn-nce", "dhn-nce")
ORGANS = ("liver", "left lung", "right lung")


def run(loss, train, val, output, epochs, amp=False, seed=0):
    from MedCLIPSAMLib.training.clip_finetune import FinetuneOptions, finetune

    start = time.perf_counter()
    records = finetune(FinetuneOptions(
        data=str(train), val_data=str(val), output=str(output), model="tiny-random", loss=loss, temperature=0.1,
        lr=1e-4, epochs=epochs, batch_size=8, warmup_steps=3, seed=seed, device="cpu", amp=amp))
    trained = records[1:]
    return {"loss": loss, "amp": amp, "start": records[0]["retrieval"], "end": records[-1]["retrieval"],
            "final_loss": records[-1]["loss"],
            "samples_per_s": sum(r["samples_per_s"] for r in trained) / len(trained),
            "wall_seconds": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=96, help="training images")
    parser.add_argument("--test", type=int, default=48, help="held-out images")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from MedCLIPSAMLib.runtime import setup_logging
    from MedCLIPSAMLib.training.data import write_phantom_dataset

    setup_logging(0)
    with tempfile.TemporaryDirectory() as tmp:
        train = write_phantom_dataset(os.path.join(tmp, "train"), args.train, size=64, seed=1, organs=ORGANS)
        val = write_phantom_dataset(os.path.join(tmp, "val"), args.test, size=64, seed=2, organs=ORGANS)
        rows = [run(loss, train, val, os.path.join(tmp, loss), args.epochs) for loss in LOSSES]
        rows.append(run("dhn-nce", train, val, os.path.join(tmp, "bf16"), args.epochs, amp=True))

    pct = lambda x: f"{100 * x:5.1f}"  # noqa: E731
    print(f"held-out retrieval, {args.test} phantoms, 3 caption classes; top-1 / top-5 recall in %")
    print(f"{'loss':<14}{'i2t@1':>7}{'t2i@1':>7}{'i2t@5':>7}{'t2i@5':>7}   {'final loss':>10}{'samples/s':>11}")
    first = rows[0]["start"]
    print(f"{'(random start)':<14}{pct(first['i2t_top1']):>7}{pct(first['t2i_top1']):>7}"
          f"{pct(first['i2t_top5']):>7}{pct(first['t2i_top5']):>7}")
    for row in rows:
        end, label = row["end"], row["loss"] + (" bf16" if row["amp"] else "")
        print(f"{label:<14}{pct(end['i2t_top1']):>7}{pct(end['t2i_top1']):>7}{pct(end['i2t_top5']):>7}"
              f"{pct(end['t2i_top5']):>7}   {row['final_loss']:>10.3f}{row['samples_per_s']:>11.1f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        write_record(args.json, {"epochs": args.epochs, "train": args.train, "test": args.test, "rows": rows,
                                 "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
