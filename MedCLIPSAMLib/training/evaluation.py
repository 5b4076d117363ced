"""Dice and normalised surface Dice of predictions against references, per case and mean.

Files are .seg.nrrd segmentations or labelmaps (NRRD, NIfTI, MHA, PNG, ...), matched by case name (the
file name without its extension). The spacing comes from the reference's header, so NSD's tolerance is in
millimetres on anisotropic grids; one-voxel axes (2D images stored as one-slice volumes) are dropped, so
2D cases get 2D surfaces. Empty vs empty scores 1 and empty vs non-empty 0 (metrics.py).

Which voxels count as the target: `label` is "PRED=REF" (the prediction's segment and the reference's,
named differently: "brain tumor=tumor") or one NAME both share; each side a segment name (.seg.nrrd) or a
label value (labelmaps; a name works for labelmaps too when the data set's pseudo_labels.json /
dataset.json names it; a name nothing defines is an error). Without it, a file must hold one label only:
scoring every non-zero voxel of a multi-label reference (a phantom's head, skull, brain and tumour) against
one predicted structure means nothing, so it is refused in one sentence.

Nothing is dropped silently: a prediction must lie on its reference's grid (origin, spacing, direction;
else an error: resample it first), and a reference case with no prediction is scored as an empty
prediction (0 where the reference has the target), counted in the means and marked "missing".
"""

import csv
import io
import logging
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError
from ..runtime import atomic_output

log = logging.getLogger("medclipsam")


def label_pair(label):
    """(prediction's label, reference's label) of --label: "PRED=REF", or one NAME for both; None: none."""
    if label is None:
        return None, None
    pred, sep, ref = str(label).partition("=")
    if not sep:
        return pred.strip(), pred.strip()
    if not pred.strip() or not ref.strip():
        raise MedCLIPSAMError(f"--label '{label}' needs a label on both sides of '=': PRED=REF, e.g. "
                              "--label 'brain tumor=tumor'")
    return pred.strip(), ref.strip()


def _one_label_only(path, role, names):
    if len(names) > 1:
        raise MedCLIPSAMError(f"{role} '{path}' holds {len(names)} labels ({', '.join(names)}); say which to score "
                              "with --label PRED=REF (the prediction's segment = the reference's, e.g. --label "
                              "'brain tumor=tumor'), or --label NAME when both name it alike")


def load_mask(path, label=None, role="reference"):
    """(bool mask (z, y, x), reference SimpleITK image with the file's grid). Without `label` the file must
    hold one label (else one sentence naming its labels)."""
    import SimpleITK as sitk

    from ..io import read_segmentation, read_volume

    path = str(path)
    if path.endswith(".seg.nrrd"):
        segments, reference = read_segmentation(path)
        if label is None:
            _one_label_only(path, role, [f"'{s['name']}'" for s in segments])
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
        values = np.unique(array[array != 0]) if array.any() else []
        _one_label_only(path, role, [f"{v:g}" for v in values])
        return array != 0, image
    return array == _label_value(path, label), image


def _label_value(path, label):
    """The value of `label` in a labelmap: a number as given, a name through the data set's label table
    (pseudo_labels.json / nnU-Net dataset.json beside the labels folder); an error for any other name."""
    from .weak_data import names_beside

    try:
        return float(label)
    except ValueError:
        pass
    names = names_beside(path) or []
    if str(label) in names:
        return float(names.index(str(label)) + 1)
    known = f"it names {', '.join(repr(n) for n in names)}" if names else "no label table names its values"
    raise MedCLIPSAMError(f"'{path}' is a labelmap and '{label}' is not one of its labels ({known}); "
                          "give --label as a label value or a name from the data set's label table")


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
    from .weak_data import by_case, list_inputs

    if not tolerance_mm > 0:
        raise MedCLIPSAMError(f"the NSD tolerance must be positive, got {tolerance_mm} mm")
    gt_paths = list_inputs(gt, "references", False, role="labels")
    pairs, missing, extra = match_cases(list_inputs(pred, "predictions", False, role="labels"), gt_paths)
    references = {name: g_path for name, _, g_path in pairs}
    if missing:
        references.update({n: p for n, p in by_case(gt_paths, "references").items() if n in missing})
    pred_label, ref_label = label_pair(label)
    progress = progress or null_progress()
    progress.stage("evaluate", len(references), "Dice and NSD per case")
    predictions = {name: p_path for name, p_path, _ in pairs}
    cases = []
    for name in sorted(references):
        g_path, p_path = references[name], predictions.get(name)
        if p_path is not None:
            p, p_ref = load_mask(p_path, pred_label, "prediction")
        g, g_ref = load_mask(g_path, ref_label, "reference")
        if p_path is None:  # no prediction: scored as an empty one, not left out of the mean
            p = np.zeros_like(g)
        else:
            if p.shape != g.shape:
                raise MedCLIPSAMError(f"case '{name}': prediction '{p_path}' has shape {p.shape} but the reference "
                                      f"'{g_path}' has {g.shape} (z, y, x)")
            if not geometry_equal(p_ref, g_ref, tol=1e-3):
                raise MedCLIPSAMError(f"case '{name}': prediction '{p_path}' is not on the grid of its reference "
                                      f"'{g_path}' (origin, spacing or direction differ); resample it onto the "
                                      "reference first")
        g2, spacing = _squeeze(g, list(reversed(g_ref.GetSpacing())))
        cases.append((name, p.reshape(g2.shape), g2, spacing))
        progress.advance(1, name)
    summary = summarize(cases, tolerance_mm)
    for row in summary["cases"]:
        row["prediction"] = "missing" if row["name"] in missing else "found"
    summary.update(missing=missing, extra=extra, tolerance_mm=tolerance_mm)
    return summary


def to_csv(summary):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "dice", "nsd", "prediction"])
    for r in summary["cases"]:
        writer.writerow([r["name"], f"{r['dice']:.6f}", f"{r['nsd']:.6f}", r.get("prediction", "found")])
    mean = summary["mean"]
    if summary["count"]:
        writer.writerow(["mean", f"{mean['dice']:.6f}", f"{mean['nsd']:.6f}", ""])
    return buf.getvalue()


def write_csv(path, summary):
    with atomic_output(path) as tmp:
        Path(tmp).write_text(to_csv(summary))


def format_table(summary):
    width = max([4] + [len(r["name"]) for r in summary["cases"]])
    nsd = f"NSD@{summary['tolerance_mm']:g}mm"
    lines = [f"{'case':<{width}}  {'Dice':>7}  {nsd:>10}"]
    lines += [f"{r['name']:<{width}}  {r['dice']:7.4f}  {r['nsd']:10.4f}"
              + ("  (no prediction: scored as empty)" if r.get("prediction") == "missing" else "")
              for r in summary["cases"]]
    if summary["count"]:
        lines.append(f"{'mean':<{width}}  {summary['mean']['dice']:7.4f}  {summary['mean']['nsd']:10.4f}")
    return "\n".join(lines)
