"""Why and how sure: the per-prompt report and saliency volumes of a volume run (no Qt, no MRML).

Report (`medclipsam segment --report-output R.json`), one entry per prompt, holding the numbers the
volume driver used (pipeline/volume.py returns them; nothing here recomputes them):
  slices, scored (non-blank slice indices along `axis`), similarity (slice-prompt cosine per scored slice),
  lead (per scored slice: best prompt sentence minus best absent sentence; null without absent sentences),
  kept_slices, key_slices, saliency_slices, mask_slices, found, why, absent_winner, voxels, volume_ml,
  mean_uncertainty (mask-probability entropy, in bits, averaged inside the mask), mode, models
  ({clip, sam, random}), saliency_file and a one-line summary. Slice indices count along the slicing axis
  (`axis`: axial / coronal / sagittal in patient space), from 0.

Saliency (`--saliency-output S.nrrd`): one float volume per prompt on the input's exact grid, holding each
slice's saliency map in [0, 1] where the slice got one and 0 elsewhere. With one prompt the file is S.nrrd
itself; with several, S_<prompt>.nrrd per prompt (e.g. S_brain-tumor.nrrd). The report names each file.
"""

import json
import os
import re

from .runtime import atomic_output

REPORT_VERSION = 1


def saliency_paths(path, names):
    """One file per prompt: `path` itself for a single prompt, else <stem>_<slug><ext> per prompt."""
    if len(names) == 1:
        return [os.fspath(path)]
    path = os.fspath(path)
    folder, base = os.path.split(path)
    cut = base.find(".") if "." in base else len(base)  # keep multi-part extensions (.nii.gz)
    stem, ext = base[:cut], base[cut:]
    paths, seen = [], set()
    for i, name in enumerate(names):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "prompt"
        if slug in seen:  # 'Liver' and 'liver' are two prompts
            slug = f"{slug}-{i + 1}"
        seen.add(slug)
        paths.append(os.path.join(folder, f"{stem}_{slug}{ext}"))
    return paths


def _ranges(indices):
    """[3, 4, 5, 9] -> '3-5, 9'."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def format_ml(volume):
    """12.44 -> '12.4'; below 1 ml two significant figures (0.0012 -> '0.0012'), so a small mask never reads 0.0."""
    return f"{volume:.1f}" if volume >= 1 or volume == 0 else f"{volume:.2g}"


def summary_line(report):
    """'found on slices 40-72, 33 of 112; 12.4 ml', 'found on slice 0 of 1; 0.0012 ml' or 'not found: <why>'
    for one prompt's report."""
    if report["found"]:
        slices = report["mask_slices"]
        where = (f"slice {slices[0]} of {report['slices']}" if len(slices) == 1
                 else f"slices {_ranges(slices)}, {len(slices)} of {report['slices']}")
        return f"found on {where}; {format_ml(report['volume_ml'])} ml"
    if report.get("absent_winner"):
        return f"not found: no slice matches '{report['prompt']}' better than '{report['absent_winner']}'"
    return f"not found: {report['why']}"


def report_document(reports, models, saliency_files=None, source=None, output=None, runtime=None):
    """The JSON document: the driver's per-prompt reports with the models, files and summary added; runtime:
    what the segmentation computed with (runtime.runtime_summary: threads, wait policy, precision, reason)."""
    prompts = []
    for i, r in enumerate(reports):
        entry = dict(r)
        entry["models"] = dict(models)
        entry["saliency_file"] = saliency_files[i] if saliency_files else None
        entry["summary"] = summary_line(r)
        prompts.append(entry)
    return {"version": REPORT_VERSION, "input": source, "output": output, "runtime": runtime, "prompts": prompts}


def write_report(path, document):
    """Write the report as JSON, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return path


def read_report(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_saliency(paths, saliency, reference):
    """Each prompt's saliency volume (z, y, x float32) on `reference`'s exact grid, atomically."""
    from .io import write_volume
    from .io.geometry import image_from_array

    for path, volume in zip(paths, saliency):
        write_volume(path, image_from_array(volume, reference))
    return paths
