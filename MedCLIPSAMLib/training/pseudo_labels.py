"""Pseudo-labels: the zero-shot pipeline over a data set, a confidence per case, and an nnU-Net v2 export.

Output folder:
  labels/<case>.nrrd        labelmap on the input's exact grid (value k = the k-th prompt; 0 background)
  cases/<case>.json         one record per case: prompts, voxels, confidence, slices kept (or the error)
  pseudo_labels.csv / .json all records, the label names and the confidence definition
  labels.txt                the label files whose confidence reaches --min-confidence (for train-weak)
  nnUNet_raw/DatasetNNN_Name/  with --nnunet-dataset: dataset.json, imagesTr/<case>_0000.nii.gz,
                            labelsTr/<case>.nii.gz (cases at or above --min-confidence)

Confidence of a case: for each prompt, 1 - the mean binary entropy (in bits) of the pipeline's foreground
probability over the voxels of its mask (the SAM2 mask probability; the saliency map when SAM is off);
0 when the mask is empty (the pipeline found nothing: the label "absent" is the least trustworthy). The
case's confidence is the mean over its prompts. 1 means every masked voxel had probability 0 or 1.

Resuming and sharding: a case is done when cases/<case>.json exists without an error; under torchrun each
rank (RANK / WORLD_SIZE) takes every WORLD_SIZE-th case. Whichever process finds every case done writes
the summaries and the nnU-Net export (each file atomically, so two ranks finishing together are harmless).
"""

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..runtime import atomic_output

CONFIDENCE_DEFINITION = ("1 - mean binary entropy (bits) of the zero-shot foreground probability over the mask's "
                         "voxels (SAM2 mask probability, or the saliency map without SAM); 0 for an empty mask; "
                         "mean over prompts")
CSV_FIELDS = ("case", "image", "label", "confidence", "voxels", "error")


def case_confidence(mask, uncertainty):
    """1 - mean binary entropy (bits) inside the mask; 0 for an empty mask (see the module docstring)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return 0.0
    return float(np.clip(1.0 - float(np.mean(uncertainty[mask])), 0.0, 1.0))


def _write_text(path, text):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)


class PseudoLabeller:
    """Runs one shard of a data set through a zero-shot segmentation session (cli.segment.Session)."""

    def __init__(self, inputs, output_dir, prompts):
        from .weak_data import by_case

        self.inputs = by_case(inputs, "inputs")   # case name -> path, every rank's cases
        self.prompts = list(prompts)
        self.out = Path(output_dir)
        for sub in ("labels", "cases"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def record_path(self, case):
        return self.out / "cases" / f"{case}.json"

    def label_path(self, case):
        return self.out / "labels" / f"{case}.nrrd"

    def record(self, case):
        path = self.record_path(case)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:   # a record torn by a crash elsewhere: redo the case
            return None

    def todo(self, rank=0, world=1):
        """This rank's cases that have no successful record yet (failed ones are tried again)."""
        mine = sorted(self.inputs)[rank::world]
        return [c for c in mine if not ((r := self.record(c)) and "error" not in r and self.label_path(c).is_file())]

    def label_case(self, case, segment, models=None):
        """Segment one case with `segment(image) -> VolumeResult` (uncertainty on); write label + record.
        models: {"clip", "sam", "preset", "random_weights"} that made the label, kept in its record."""
        import SimpleITK as sitk

        from ..io import read_volume, write_labelmap

        path = self.inputs[case]
        try:
            image = read_volume(path)
            result = segment(image)
        except MedCLIPSAMError as exc:
            _write_text(self.record_path(case), json.dumps({"case": case, "image": path, "error": str(exc)}))
            raise
        labels = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
        per_prompt = []
        for value, (seg, report) in enumerate(zip(result.segments, result.report), start=1):
            mask = seg["mask"] > 0
            labels[mask] = value
            unc = result.uncertainty if result.uncertainty is not None else np.zeros(mask.shape, np.float32)
            per_prompt.append({"name": seg["name"], "value": value, "voxels": int(mask.sum()),
                               "confidence": round(case_confidence(mask, unc), 6),
                               "slices_kept": report.get("kept"), "slices": report.get("slices")})
        write_labelmap(self.label_path(case), labels, image)
        record = {"case": case, "image": path, "label": str(self.label_path(case)),
                  "confidence": round(float(np.mean([p["confidence"] for p in per_prompt])), 6),
                  "voxels": int(np.count_nonzero(labels)), "prompts": per_prompt,
                  "integer_image": bool(np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.integer)),
                  "image_min": float(sitk.GetArrayViewFromImage(image).min()), "models": models}
        _write_text(self.record_path(case), json.dumps(record, indent=1))   # last: marks the case done
        return record

    # -- once every case is done ------------------------------------------------------------------
    def complete(self):
        return all(self.record(c) is not None for c in self.inputs)

    def write_summary(self, min_confidence=0.0, extra=None):
        records = [self.record(c) for c in sorted(self.inputs)]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        _write_text(self.out / "pseudo_labels.csv", buf.getvalue())
        kept = self.selected(min_confidence)
        summary = {"prompts": self.prompts, "labels": self.label_values(), "confidence": CONFIDENCE_DEFINITION,
                   "min_confidence": min_confidence, "selected": [r["case"] for r in kept], "cases": records,
                   **(extra or {})}
        summary["provenance"] = self.provenance()
        summary["random_models"] = summary["provenance"]["random_weights"]
        _write_text(self.out / "pseudo_labels.json", json.dumps(summary, indent=1))
        _write_text(self.out / "labels.txt", "".join(f"labels/{r['case']}.nrrd\n" for r in kept))
        return summary

    def provenance(self):
        """Where the labels came from, from the case records (a resumed run keeps what earlier runs used):
        {"labels": "pseudo-labels", "models": [distinct model sets], "random_weights": any of them random}."""
        records = [r for r in (self.record(c) for c in sorted(self.inputs)) if r and r.get("models")]
        models = []
        for r in records:
            if r["models"] not in models:
                models.append(r["models"])
        return {"labels": "pseudo-labels", "models": models,
                "random_weights": any(m.get("random_weights") for m in models)}

    def label_values(self):
        return {"background": 0, **{name: i for i, name in enumerate(self.prompts, start=1)}}

    def selected(self, min_confidence):
        records = [self.record(c) for c in sorted(self.inputs)]
        return [r for r in records if r and "error" not in r and r["confidence"] >= min_confidence]

    def export_nnunet(self, dataset, min_confidence=0.0, channel_name="auto"):
        """nnU-Net v2 raw data set of the selected cases; returns its folder."""
        from ..io import read_volume, write_labelmap, write_volume

        import SimpleITK as sitk

        kept = self.selected(min_confidence)
        if not kept:
            raise MedCLIPSAMError(f"no case reaches confidence {min_confidence}; nothing to export to nnU-Net")
        folder = self.out / "nnUNet_raw" / nnunet_dataset_name(dataset, self.prompts)
        images, labels = folder / "imagesTr", folder / "labelsTr"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        wanted = {r["case"] for r in kept}
        for stale in list(images.glob("*.nii.gz")) + list(labels.glob("*.nii.gz")):
            if stale.name.replace("_0000.nii.gz", "").replace(".nii.gz", "") not in wanted:
                stale.unlink()   # a case that fell below the confidence bar since the last export
        for r in kept:
            image_out, label_out = images / f"{r['case']}_0000.nii.gz", labels / f"{r['case']}.nii.gz"
            if image_out.is_file() and label_out.is_file():
                continue
            image = read_volume(r["image"])
            # the label is rewritten on the image it goes with, so both NIfTI headers are identical
            label = sitk.GetArrayFromImage(read_volume(self.label_path(r["case"])))
            write_volume(image_out, image)
            write_labelmap(label_out, label, image)
        if channel_name == "auto":  # nnU-Net normalises a channel called "CT" with global HU statistics
            ct = all(r.get("integer_image") and r.get("image_min", 0) <= -500 for r in kept)
            channel_name = "CT" if ct else "zscore"
        description = {
            "channel_names": {"0": channel_name},
            "labels": self.label_values(),
            "numTraining": len(kept),
            "file_ending": ".nii.gz",
            "name": folder.name,
            "description": f"pseudo-labels from the MedCLIP-SAM zero-shot pipeline for: {', '.join(self.prompts)}",
            "overwrite_image_reader_writer": "SimpleITKIO",
            "medclipsam_provenance": self.provenance(),    # carried into a model trained on this data set
        }
        _write_text(folder / "dataset.json", json.dumps(description, indent=2) + "\n")
        return folder


def nnunet_dataset_name(spec, prompts):
    """'Dataset501_Name' as given; '501' -> Dataset501_<Prompt>; 'Name' -> Dataset500_Name."""
    spec = str(spec).strip()
    if re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", spec):
        return spec
    camel = "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", prompts[0]) if w) or "PseudoLabels"
    if re.fullmatch(r"\d{1,3}", spec):
        return f"Dataset{int(spec):03d}_{camel}"
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", spec):
        return f"Dataset500_{spec}"
    raise MedCLIPSAMError(f"nnU-Net data set '{spec}' must be an id (e.g. 501), a name (letters, digits, _ or -) "
                          "or DatasetNNN_Name")


def shard():
    """(rank, world size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), max(1, int(os.environ.get("WORLD_SIZE", 1)))


def describe(record):
    if "error" in record:
        return f"{record['case']}: failed: {record['error']}"
    return f"{record['case']}: {record['voxels']} voxels, confidence {record['confidence']:.3f}"

