"""Data for weak supervision: image / label files matched by case name, read as stacks of slices in
display orientation, nnU-Net-style intensity normalisation, and random training patches.

Every volume is turned into a "stack" (S, R, C): slice k along the chosen patient axis (axial by default),
shown the way SliceView shows it. 2D networks see slices of it, 3D networks the whole stack, so both learn
one canonical orientation whatever the storage order (permuted, flipped, oblique), and predictions are put
back through the same SliceView onto the input's exact grid. A 2D image (a one-slice volume) is sliced
across its one-voxel axis. Nothing is resampled: a network works at the data's own resolution.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError

log = logging.getLogger("medclipsam")

# longest first, so "x.seg.nrrd" is not taken for "x.seg" + ".nrrd"
EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
              ".bmp", ".dcm")
SEGMENTATION_SUFFIX = ".seg.nrrd"    # Slicer's segmentation: always a label, never an image input
CHANNEL_SUFFIX = "_0000"  # nnU-Net's image file names: <case>_0000.nii.gz for channel 0


def case_name(path):
    """File name without its image extension (and without nnU-Net's channel suffix)."""
    name = Path(path).name
    for ext in EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def is_segmentation_file(path):
    return str(path).lower().endswith(SEGMENTATION_SUFFIX)


def for_role(paths, role):
    """A folder's files for a role. "images": never a .seg.nrrd (a label: `phantoms make` writes NAME.seg.nrrd
    beside the image NAME.nrrd); "labels": NAME.seg.nrrd rather than the image NAME.* beside it; None: all."""
    if role == "images":
        return [p for p in paths if not is_segmentation_file(p)]
    if role == "labels":
        segmented = {case_name(p) for p in paths if is_segmentation_file(p)}
        return [p for p in paths if is_segmentation_file(p) or case_name(p) not in segmented]
    return list(paths)


def list_inputs(specs, what="inputs", folders_are_cases=True, role=None):
    """Paths from one or more specs, each a folder (its image files, and its sub-folders as DICOM series
    when `folders_are_cases`), a text file with one path per line, or an image file. `role` ("images" or
    "labels") picks a folder's files as for_role does; a .seg.nrrd named as an image is refused."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    paths = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = []
            for q in sorted(p.iterdir()):
                if q.name.startswith("."):
                    continue
                if (q.is_file() and q.name.lower().endswith(EXTENSIONS)) or (q.is_dir() and folders_are_cases):
                    found.append(str(q))
            paths += for_role(found, role)
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            base = p.parent
            for line in p.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    q = Path(line.strip())
                    paths.append(str(q if q.is_absolute() else base / q))
        elif p.is_file():
            if role == "images" and is_segmentation_file(p):
                raise MedCLIPSAMError(f"{what} '{spec}' is a segmentation (.seg.nrrd), not an image; give the image "
                                      "it segments")
            paths.append(str(p))
        else:
            raise MedCLIPSAMError(f"{what} '{spec}' does not exist (give a folder, a list file or image files)")
    if not paths:
        raise MedCLIPSAMError(f"no {what} found in {', '.join(str(s) for s in specs)}")
    return paths


def by_case(paths, what):
    named = {}
    for path in paths:
        name = case_name(path)
        if name in named:
            raise MedCLIPSAMError(f"two {what} have the case name '{name}': '{named[name]}' and '{path}'")
        named[name] = path
    return named


def match_pairs(images, labels):
    """[(case, image path, label path)] for the cases present in both lists, in case order."""
    imgs, labs = by_case(images, "images"), by_case(labels, "labels")
    common = sorted(set(imgs) & set(labs))
    if not common:
        raise MedCLIPSAMError(
            f"no image matches a label by case name (images: {', '.join(sorted(imgs)[:3])}...; labels: "
            f"{', '.join(sorted(labs)[:3])}...); name them <case>.nrrd / <case>_0000.nii.gz and <case>.nrrd")
    missing = sorted(set(imgs) - set(labs))
    if missing:
        log.warning("%d image(s) have no label and are left out: %s", len(missing), ", ".join(missing[:5]))
    return [(c, imgs[c], labs[c]) for c in common]


# --------------------------------------------------------------------------------------------------
# stacks


def stack_view(image, axis="axial"):
    """The SliceView a case is stacked with: `axis`, or across the one-voxel axis of a 2D image."""
    from ..io import slicing_axis
    from ..pipeline.slices import SliceView

    size = list(reversed(image.GetSize()))
    if 1 in size and size.count(1) < 3:
        flat = size.index(1)
        axis = next(v for v in ("axial", "coronal", "sagittal") if slicing_axis(image, v) == flat)
    return SliceView(image, axis)


def to_stack(volume, view):
    """(z, y, x) array -> (S, R, C) stack of display-oriented slices (a copy)."""
    return np.stack([np.ascontiguousarray(view.get(volume, k)) for k in range(view.count)])


def from_stack(stack, view):
    """(S, R, C) stack -> (z, y, x) array on the view's volume grid."""
    out = np.zeros(view.shape, stack.dtype)
    for k in range(view.count):
        view.put(out, k, stack[k])
    return out


def stack_spacing(image, view):
    """Voxel size (slice, row, column) in mm of a view's stack."""
    return (float(image.GetSpacing()[2 - view.axis]), *(float(s) for s in view.pixel_spacing))


# --------------------------------------------------------------------------------------------------
# labels


def read_label(path, reference, image_path=""):
    """Label file -> (uint8 array (z, y, x) on `reference`'s grid, segment names or None).

    .seg.nrrd: segment i gets value i + 1 (overlaps: the later segment wins); other files: integer labelmaps.
    The label must lie on the image's grid (same size, origin, spacing and direction).
    """
    import SimpleITK as sitk

    from ..io import geometry_equal, read_segmentation, read_volume

    names = None
    if str(path).endswith(".seg.nrrd"):
        segments, grid = read_segmentation(path)
        labels = np.zeros(tuple(reversed(grid.GetSize())), np.uint8)
        for value, seg in enumerate(segments, start=1):
            labels[seg["mask"] > 0] = value
        names = [s["name"] for s in segments]
    else:
        grid = read_volume(path)
        array = sitk.GetArrayFromImage(grid)   # a copy: a view would dangle once `grid` is gone
        if not np.issubdtype(array.dtype, np.integer):
            if not np.all(np.equal(np.mod(array, 1), 0)):
                raise MedCLIPSAMError(f"label '{path}' holds non-integer values; a labelmap is needed")
        if array.min() < 0 or array.max() > 255:
            raise MedCLIPSAMError(f"label '{path}' has values outside 0..255")
        labels = np.asarray(array, dtype=np.uint8)
    # labels saved by other tools may carry float32-rounded geometry (NIfTI): a loose tolerance
    if not geometry_equal(grid, reference, tol=1e-3):
        raise MedCLIPSAMError(f"label '{path}' is not on the grid of image '{image_path}' (size, origin, spacing "
                              "or direction differ)")
    return labels, names


def names_beside(label_path):
    """Label names from the data set a label file belongs to: pseudo-label's pseudo_labels.json or nnU-Net's
    dataset.json in the folder above the labels folder ({"labels": {"background": 0, "name": 1, ...}})."""
    import json

    for name in ("pseudo_labels.json", "dataset.json"):
        path = Path(label_path).resolve().parent.parent / name
        try:
            labels = json.loads(path.read_text()).get("labels") if path.is_file() else None
        except (ValueError, AttributeError):
            continue
        if isinstance(labels, dict):
            by_value = {int(v): k for k, v in labels.items() if str(v).isdigit() and int(v) > 0}
            if by_value:
                return [by_value.get(k, f"label {k}") for k in range(1, max(by_value) + 1)]
    return None


def labels_provenance(label_paths):
    """Where training labels came from: pseudo-label's runs (pseudo_labels.json above the labels folder) with
    their models and whether any used random weights; {"labels": "given"} for labels no pseudo-label run
    wrote. A model trained on them carries this into every output (predict)."""
    import json

    runs = {}
    for label in label_paths:
        summary = Path(label).resolve().parent.parent / "pseudo_labels.json"
        if summary not in runs and summary.is_file():
            try:
                runs[summary] = json.loads(summary.read_text())
            except ValueError:
                continue
    if not runs:
        return {"labels": "given", "random_weights": False}
    return provenance_of([s.get("provenance") or {"random_weights": bool(s.get("random_models"))}
                          for s in runs.values()])


def provenance_of(parts):
    """One provenance from pseudo-label provenances (several runs, or an nnU-Net data set's)."""
    models = []
    for part in parts:
        for m in part.get("models", []):
            if m not in models:
                models.append(m)
    return {"labels": "pseudo-labels", "models": models,
            "random_weights": any(bool(p.get("random_weights")) for p in parts)}


@dataclass
class Case:
    name: str
    image: np.ndarray       # (S, R, C) float32, normalised once the normalisation is fitted
    label: np.ndarray       # (S, R, C) uint8
    spacing: tuple          # (slice, row, column) mm
    raw_min: float          # lowest raw intensity (to recognise CT)
    integer: bool           # raw voxels were integers


def load_case(name, image_path, label_path, axis="axial"):
    import SimpleITK as sitk

    from ..io import read_volume

    image = read_volume(image_path)
    labels, names = read_label(label_path, image, image_path)
    names = names or names_beside(label_path)
    view = stack_view(image, axis)
    raw = sitk.GetArrayViewFromImage(image)
    case = Case(name, to_stack(raw, view).astype(np.float32), to_stack(labels, view),
                stack_spacing(image, view),
                float(raw.min()), bool(np.issubdtype(raw.dtype, np.integer)))
    return case, names


# --------------------------------------------------------------------------------------------------
# intensity normalisation (nnU-Net's two schemes)


def fit_normalization(cases, scheme="auto", seed=0):
    """Parameters of "ct" (clip to the 0.5..99.5 percentiles of foreground voxels across the training set,
    then their mean / std: HU mean the same everywhere) or "zscore" (each image by its own mean / std).
    "auto" picks ct when every image is integer-valued and reaches -500 (air in HU)."""
    if scheme == "auto":
        scheme = "ct" if all(c.integer and c.raw_min <= -500 for c in cases) else "zscore"
    if scheme == "zscore":
        return {"scheme": "zscore"}
    if scheme != "ct":
        raise MedCLIPSAMError(f"unknown normalisation '{scheme}'; choose auto, ct or zscore")
    rng = np.random.default_rng(seed)
    samples = []
    for c in cases:
        values = c.image[c.label > 0]
        if values.size == 0:  # no foreground in this pseudo-label: the image still says what HU look like
            values = c.image.ravel()
        samples.append(rng.choice(values, size=min(values.size, 100_000), replace=False))
    values = np.concatenate(samples)
    lo, hi = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, lo, hi)
    return {"scheme": "ct", "lower": float(lo), "upper": float(hi), "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-6))}


def normalize(stack, params):
    stack = np.asarray(stack, np.float32)
    if params["scheme"] == "ct":
        out = np.clip(stack, params["lower"], params["upper"])
        return ((out - params["mean"]) / params["std"]).astype(np.float32)
    return ((stack - stack.mean()) / max(float(stack.std()), 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# training patches


def _pad_to(array, shape, value):
    pads = [(0, max(0, s - n)) for n, s in zip(array.shape, shape)]
    if not any(p[1] for p in pads):
        return array
    # centred padding keeps the anatomy in the middle of a small image
    pads = [(p // 2, p - p // 2) for _, p in pads]
    return np.pad(array, pads, constant_values=value)


class PatchDataset:
    """Random patches (2D: of slices, 3D: of whole stacks) with foreground oversampling and light
    augmentation. Sample i of epoch e is drawn from its own generator seeded with (seed, e, i), so a run
    is reproducible whatever the number of data-loading workers or ranks.

    As in nnU-Net, a fraction of the samples is forced to hold foreground (for 2D: a slice with labels);
    a weak label that misses a case simply gives that case no forced samples. No mirroring by default:
    prompts such as "left kidney" are lateral.
    """

    def __init__(self, cases, dims, patch, samples=None, fg_fraction=0.33, augment=True, mirror=False, seed=0):
        self.cases, self.dims, self.patch = cases, dims, tuple(int(p) for p in patch)
        self.items = ([(c, k) for c, case in enumerate(cases) for k in range(case.image.shape[0])]
                      if dims == 2 else [(c, None) for c in range(len(cases))])
        self.fg_slices = [np.flatnonzero(case.label.reshape(case.label.shape[0], -1).any(axis=1)) for case in cases]
        self.samples = int(samples or len(self.items))
        self.fg_fraction, self.augment, self.mirror, self.seed = fg_fraction, augment, mirror, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.samples

    def __getitem__(self, index):
        import torch

        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        c, k = self.items[int(index) % len(self.items)]
        case = self.cases[c]
        force_fg = rng.random() < self.fg_fraction and len(self.fg_slices[c]) > 0
        if self.dims == 2:
            if force_fg:
                k = int(rng.choice(self.fg_slices[c]))
            image, label = case.image[k], case.label[k]
        else:
            image, label = case.image, case.label
        image, label = self._crop(image, label, force_fg, rng)
        if self.augment:
            image = self._intensity(image, rng)
        if self.mirror:
            for axis in range(image.ndim):
                if rng.random() < 0.5:
                    image, label = np.flip(image, axis), np.flip(label, axis)
        return (torch.from_numpy(np.ascontiguousarray(image, np.float32)[None]),
                torch.from_numpy(np.ascontiguousarray(label, np.int64)[None]))

    def _crop(self, image, label, force_fg, rng):
        image = _pad_to(image, self.patch, 0.0)  # 0 = the normalised mean
        label = _pad_to(label, self.patch, 0)
        if force_fg:
            fg = np.argwhere(label > 0)
            centre = fg[rng.integers(len(fg))] if len(fg) else None
        else:
            centre = None
        start = []
        for axis, (n, p) in enumerate(zip(image.shape, self.patch)):
            if centre is None:
                start.append(int(rng.integers(0, n - p + 1)))
            else:
                start.append(int(np.clip(centre[axis] - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, n - p)))
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        return image[box], label[box]

    @staticmethod
    def _intensity(image, rng):
        # contrast, brightness and noise: zero-shot masks come from varied scans; the network should not
        # key on the exact grey levels
        image = image * np.float32(rng.uniform(0.75, 1.25)) + np.float32(rng.normal(0, 0.1))
        if rng.random() < 0.15:
            image = image + rng.normal(0, rng.uniform(0, 0.1), image.shape).astype(np.float32)
        return image
