"""Dice and normalised surface Dice of predictions against references, per case and mean.

Files are .seg.nrrd segmentations or labelmaps (NRRD, NIfTI, MHA, PNG, ...), matched by case name (the
file name without its extension). The spacing comes from the reference's header, so NSD's tolerance is in
millimetres on anisotropic grids; one-voxel axes (2D images stored as one-slice volumes) are dropped, so
2D cases get 2D surfaces. Empty vs empty scores 1 and empty vs non-empty 0 (metrics.py).

Which voxels count as the target: `label` is a segment name (.seg.nrrd) or a label value (labelmaps; a
name works for labelmaps too when the data set's pseudo_labels.json / dataset.json names it, and means
every non-zero voxel otherwise); without it, every non-zero voxel (every segment) counts.
"""

import csv
import io
import logging
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..runtime import atomic_output

log = logging.getLogger("medclipsam")


def load_mask(path, label=None):
    """(bool mask (z, y, x), reference SimpleITK image with the file's grid)."""
    import SimpleITK as sitk

    from ..io import read_segmentation, read_volume

    path = str(path)
    if path.endswith(".seg.nrrd"):
        segments, reference = read_segmentation(path)
        if label is None:
            chosen = segments
        else:
            chosen = [s for s in segments if s["name"] == str(label)]
            if not chosen and str(label).isdigit() and 0 < int(label) <= len(segments):
                chosen = [segments[int(label) - 1]]
            if not chosen:
                names = ", ".join(f"'{s['name']}'" for s in segments) or "none"
                raise MedCLIPSAMError(f"'{path}' has no segment '{label}' (segments: {names})")
        mask = np.zeros(tuple(reversed(reference.GetSize())), bool)
        for s in chosen:
            mask |= s["mask"] > 0
        return mask, reference
    image = read_volume(path)
    array = sitk.GetArrayFromImage(image)
    if label is None:
        return array != 0, image
    value = _label_value(path, label)
    return (array == value) if value is not None else (array != 0), image


def _label_value(path, label):
    """The value of `label` in a labelmap: a number as given, a name through the data set's label table
    (pseudo_labels.json / nnU-Net dataset.json beside the labels folder); None: every non-zero voxel."""
    from .weak_data import names_beside

    try:
        return float(label)
    except ValueError:
        pass
    names = names_beside(path) or []
    if str(label) in names:
        return float(names.index(str(label)) + 1)
    log.info("'%s' is a labelmap without a name for label '%s': every non-zero voxel counts", path, label)
    return None


def _squeeze(mask, spacing):
    """Drop one-voxel axes (a 2D image stored as a one-slice volume) with their spacing entries: a
    one-slice volume's voxels would otherwise all lie on its top and bottom surface."""
    keep = [i for i, n in enumerate(mask.shape) if n > 1]
    if len(keep) < 2:
        keep = [mask.ndim - 2, mask.ndim - 1]
    return mask.reshape([mask.shape[i] for i in keep]), [spacing[i] for i in keep]


def match_cases(pred_paths, gt_paths):
    from .weak_data import by_case

    preds, gts = by_case(pred_paths, "predictions"), by_case(gt_paths, "references")
    if len(preds) == 1 and len(gts) == 1:  # two single files: compare them whatever their names
        return [(next(iter(gts)), next(iter(preds.values())), next(iter(gts.values())))], [], []
    common = sorted(set(preds) & set(gts))
    if not common:
        raise MedCLIPSAMError("no prediction matches a reference by case name (file name without extension)")
    return ([(c, preds[c], gts[c]) for c in common], sorted(set(gts) - set(preds)), sorted(set(preds) - set(gts)))


def evaluate_files(pred, gt, tolerance_mm=2.0, label=None, progress=None):
    """metrics.summarize over matched cases, plus "missing" (references without prediction) and "extra"."""
    from ..io import geometry_equal
    from ..metrics import summarize
    from ..progress import null_progress
    from .weak_data import list_inputs

    if not tolerance_mm > 0:
        raise MedCLIPSAMError(f"the NSD tolerance must be positive, got {tolerance_mm} mm")
    pairs, missing, extra = match_cases(list_inputs(pred, "predictions", False), list_inputs(gt, "references", False))
    if missing:
        log.warning("%d reference case(s) have no prediction and are left out: %s", len(missing),
                    ", ".join(missing[:5]))
    progress = progress or null_progress()
    progress.stage("evaluate", len(pairs), "Dice and NSD per case")
    cases = []
    for name, p_path, g_path in pairs:
        p, p_ref = load_mask(p_path, label)
        g, g_ref = load_mask(g_path, label)
        if p.shape != g.shape:
            raise MedCLIPSAMError(f"case '{name}': prediction '{p_path}' has shape {p.shape} but the reference "
                                  f"'{g_path}' has {g.shape} (z, y, x)")
        if not geometry_equal(p_ref, g_ref, tol=1e-3):
            log.warning("case '%s': the prediction's origin / spacing / direction differ from the reference's; "
                        "the reference's spacing is used", name)
        g2, spacing = _squeeze(g, list(reversed(g_ref.GetSpacing())))
        cases.append((name, p.reshape(g2.shape), g2, spacing))
        progress.advance(1, name)
    summary = summarize(cases, tolerance_mm)
    summary.update(missing=missing, extra=extra, tolerance_mm=tolerance_mm)
    return summary


def to_csv(summary):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "dice", "nsd"])
    for r in summary["cases"]:
        writer.writerow([r["name"], f"{r['dice']:.6f}", f"{r['nsd']:.6f}"])
    mean = summary["mean"]
    if summary["count"]:
        writer.writerow(["mean", f"{mean['dice']:.6f}", f"{mean['nsd']:.6f}"])
    return buf.getvalue()


def write_csv(path, summary):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(to_csv(summary))


def format_table(summary):
    width = max([4] + [len(r["name"]) for r in summary["cases"]])
    nsd = f"NSD@{summary['tolerance_mm']:g}mm"
    lines = [f"{'case':<{width}}  {'Dice':>7}  {nsd:>10}"]
    lines += [f"{r['name']:<{width}}  {r['dice']:7.4f}  {r['nsd']:10.4f}" for r in summary["cases"]]
    if summary["count"]:
        lines.append(f"{'mean':<{width}}  {summary['mean']['dice']:7.4f}  {summary['mean']['nsd']:10.4f}")
    return "\n".join(lines)
