"""Running the stages on a data set: per-case scores, cached per case so an interrupted run resumes.

Cache: CACHE/<stage kind>-<fingerprint>/<case id>.json, where the fingerprint hashes everything a case's
result depends on (data set, the case's files, settings, models, volume mode; for weak supervision also
the training cases and options). Rows with the same fingerprint (ablation:+sam and zero-shot-v2) share
their files. Zero-shot results of training cases also keep their mask (the weak stage's pseudo-label).
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from MedCLIPSAMLib.metrics import evaluate
from MedCLIPSAMLib.runtime import atomic_output

from .datasets import read_image, read_mask


def fingerprint(*parts):
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _write_json(path, data):
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, default=float)


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", file=sys.stderr, leave=False, dynamic_ncols=True)


def score(dataset, case, pred, gt, spacing):
    """Per-target Dice and NSD (2 mm; 2 px on 2D images, whose papers score in pixels) in percent."""
    rows = []
    for value, prompt in dataset.targets:
        m = evaluate(pred == value, gt == value, spacing, tolerance_mm=2.0)
        rows.append({"case": case.id, "target": prompt, "dice": 100.0 * m["dice"], "nsd": 100.0 * m["nsd"]})
    return rows


class Runner:
    def __init__(self, dataset, models, cache_dir, device, options):
        """models: {"clip": bundle, "finetuned": bundle or None, "sam": model or None}; options: the CLI's."""
        self.dataset = dataset
        self.models = models
        self.cache = Path(cache_dir)
        self.device = device
        self.options = options
        self.from_cache = {}

    # -- zero-shot ---------------------------------------------------------------------------------
    def _clip(self, stage):
        return self.models["finetuned"] if stage.finetuned and self.models["finetuned"] else self.models["clip"]

    def zero_shot_folder(self, stage):
        clip = self._clip(stage)
        key = fingerprint("zero-shot", self.dataset.key, self.dataset.layout, asdict(stage.settings),
                          clip.name, str(clip.folder), self.models["sam_name"] if stage.settings.sam == "sam" else None,
                          self.options.mode if self.dataset.dims == 3 else None)
        return self.cache / f"zero-shot-{key}"

    def zero_shot(self, stage, cases, keep_masks=False, desc=None):
        """Scores of `cases` (list of rows per case); with keep_masks the predicted label maps are kept too
        (pseudo-labels: their cache hits are not the stage's test cases, so not counted in from_cache)."""
        folder = self.zero_shot_folder(stage)
        folder.mkdir(parents=True, exist_ok=True)
        segmenter = None
        rows, hits = [], 0
        for case in _progress(cases, desc or stage.name):
            record_path = folder / f"{case.id}.json"
            mask_path = folder / f"{case.id}.mask{'.png' if self.dataset.dims == 2 else '.nii.gz'}"
            if record_path.is_file() and (not keep_masks or mask_path.is_file()):
                rows += json.loads(record_path.read_text())["scores"]
                hits += 1
                continue
            segmenter = segmenter or self._segmenter(stage)
            start = time.perf_counter()
            image = read_image(self.dataset, case)
            pred = segmenter(image)
            seconds = time.perf_counter() - start
            gt = read_mask(self.dataset, case)
            spacing = None if self.dataset.dims == 2 else tuple(reversed(image.GetSpacing()))
            scores = [dict(r, seconds=seconds) for r in score(self.dataset, case, pred, gt, spacing)]
            self._write_mask(mask_path, pred, image)
            _write_json(record_path, {"case": case.id, "split": case.split, "scores": scores})
            rows += scores
        if not keep_masks:
            self.from_cache[stage.name] = self.from_cache.get(stage.name, 0) + hits
        return rows

    def _segmenter(self, stage):
        clip, settings = self._clip(stage), stage.settings
        sam = self.models["sam"] if settings.sam == "sam" else None
        if self.dataset.dims == 2:
            from MedCLIPSAMLib.pipeline.image import ImageSegmenter
            from MedCLIPSAMLib.pipeline.text import make_prompt

            seg = ImageSegmenter(clip, sam, settings)
            prompt = make_prompt(self.dataset.targets[0][1], settings.ensemble)
            return lambda image: seg(image, prompt).mask.astype(np.uint8)
        from MedCLIPSAMLib.pipeline.volume import VolumeOptions, VolumeSegmenter

        seg = VolumeSegmenter(clip, sam, settings, VolumeOptions(mode=self.options.mode))
        prompts = [p for _, p in self.dataset.targets]

        def run(image):
            result = seg(image, prompts)
            labels = np.zeros(result.segments[0]["mask"].shape, np.uint8)
            for (value, _), segment in zip(self.dataset.targets, result.segments):
                labels[segment["mask"] > 0] = value
            return labels

        return run

    def _write_mask(self, path, labels, image):
        if self.dataset.dims == 2:
            from MedCLIPSAMLib.overlay import save_png

            save_png(path, labels.astype(np.uint8))   # written atomically
            return
        from MedCLIPSAMLib.io import write_labelmap

        write_labelmap(str(path), labels, image)

    # -- weak supervision --------------------------------------------------------------------------
    def weak(self, stage, train_cases, test_cases):
        """Zero-shot pseudo-labels on the training cases -> the project's weak-supervision training ->
        predictions on the test cases, scored against their ground truth."""
        from MedCLIPSAMLib.training.predict import load_model, predict_volume
        from MedCLIPSAMLib.training.weak import WeakOptions, train_weak

        if not train_cases:
            from MedCLIPSAMLib.errors import MedCLIPSAMError

            raise MedCLIPSAMError("weak supervision needs training images, and this data set's split has none")
        self.zero_shot(stage, train_cases, keep_masks=True, desc=f"{stage.name}: pseudo-labels")
        pseudo = self.zero_shot_folder(stage)
        o = self.options
        weak_options = {"epochs": o.weak_epochs, "snapshots": min(o.weak_snapshots, o.weak_epochs),
                        "base_filters": o.weak_filters, "threshold": self._weak_threshold(stage), "seed": 0}
        key = fingerprint("weak", pseudo.name, [c.id for c in train_cases], weak_options)
        folder = self.cache / f"weak-{key}"
        model_dir = folder / "model"
        if not (folder / "trained.json").is_file():
            images, labels = self._weak_inputs(folder, pseudo, train_cases)
            opts = WeakOptions(images=[str(images)], labels=[str(labels)], output=str(model_dir), dims=2,
                               device=str(self.device), max_patch=o.weak_max_patch, **weak_options)
            print(f"{stage.name}: training on {len(train_cases)} pseudo-labelled case(s) ...", file=sys.stderr)
            train_weak(opts)
            _write_json(folder / "trained.json", {"options": weak_options, "cases": [c.id for c in train_cases]})
        model = load_model(str(model_dir), str(self.device))
        rows, hits = [], 0
        for case in _progress(test_cases, stage.name):
            record_path = folder / f"{case.id}.json"
            if record_path.is_file():
                rows += json.loads(record_path.read_text())["scores"]
                hits += 1
                continue
            start = time.perf_counter()
            image = self._weak_image(case)
            pred = predict_volume(model, image).labels
            seconds = time.perf_counter() - start
            gt = read_mask(self.dataset, case)
            pred = pred.reshape(gt.shape)   # a 2D image is a one-slice volume
            spacing = None if self.dataset.dims == 2 else tuple(reversed(image.GetSpacing()))
            scores = [dict(r, seconds=seconds) for r in score(self.dataset, case, pred, gt, spacing)]
            _write_json(record_path, {"case": case.id, "split": case.split, "scores": scores})
            rows += scores
        self.from_cache[stage.name] = self.from_cache.get(stage.name, 0) + hits
        return rows

    def _weak_threshold(self, stage):
        from .stages import WEAK_THRESHOLD

        return WEAK_THRESHOLD["v2" if stage.settings.saliency == "m2ib" else "v1"]

    def _weak_image(self, case):
        """The case's image as a SimpleITK image (the weak model's input)."""
        import SimpleITK as sitk

        from MedCLIPSAMLib.io import read_volume

        if case.image.endswith(".mat"):
            return sitk.JoinSeries([sitk.GetImageFromArray(read_image(self.dataset, case))])
        return read_volume(case.image, frame=0)

    def _weak_inputs(self, folder, pseudo, cases):
        """List files of the training images and their pseudo-labels, linked under the same case names (the
        trainer pairs them by name; a .mat image is written out as NRRD)."""
        import SimpleITK as sitk

        data = folder / "data"
        (data / "images").mkdir(parents=True, exist_ok=True)
        (data / "labels").mkdir(exist_ok=True)
        images, labels = [], []
        for case in cases:
            suffix = ".png" if self.dataset.dims == 2 else ".nii.gz"
            image = data / "images" / f"{case.id}{'.nrrd' if case.image.endswith('.mat') else _ext(case.image)}"
            label = data / "labels" / f"{case.id}{suffix}"
            if not image.exists():
                if case.image.endswith(".mat"):
                    sitk.WriteImage(self._weak_image(case), str(image))
                else:
                    os.symlink(os.path.abspath(case.image), image)
            if not label.exists():
                os.symlink(os.path.abspath(pseudo / f"{case.id}.mask{suffix}"), label)
            images.append(str(image))
            labels.append(str(label))
        (data / "images.txt").write_text("\n".join(images) + "\n")
        (data / "labels.txt").write_text("\n".join(labels) + "\n")
        return data / "images.txt", data / "labels.txt"


def _ext(path):
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(path).suffix.lower()
