"""Labelled images for MedCLIPSeg: 2D images and 3D volumes (sliced) with binary masks, and model inputs.

Inputs (`--images`, `--labels`): each a list of files and/or folders; a folder stands for the image and
volume files directly inside it, sorted by name. Images and labels are paired in that order, so the two
lists must have the same length. A pair is either
- two 2D images of the same size (PNG, JPEG, TIFF, BMP, 8/16 bit, or a one-slice file SimpleITK reads), or
- a 3D volume and a label volume on the same grid (NRRD, NIfTI, MHA/MHD; a label may also be a Slicer
  .seg.nrrd, whose segments are merged). Volumes are cut into axial slices (patient axis, shown the way
  `segment` shows them: pipeline.slices.SliceView), with one intensity window for the whole volume, and
  every slice becomes a sample, the empty ones too (they teach the model where the target is not).
Labels are binary: any non-zero pixel is foreground.

Every sample is kept as a uint8 grey slice plus a boolean mask at its own size; model inputs are made on
the fly exactly as the zero-shot pipeline makes them (pad to a square with the image minimum, grey to RGB,
bicubic resize to the CLIP size, CLIP mean/std), so training and prediction see the same pictures.
"""

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")


@dataclass
class Sample:
    gray: np.ndarray     # HxW uint8
    mask: np.ndarray     # HxW bool
    source: str          # file (and slice) it came from


def _has_ext(path, extensions):
    name = str(path).lower()
    return any(name.endswith(e) for e in extensions)


def is_2d_image_file(path):
    return _has_ext(path, IMAGE_EXTENSIONS)


def expand_inputs(entries, what):
    """Files from a list of files and folders (a folder: its image/volume files, sorted by name; an image
    folder's .seg.nrrd files are labels and left out, a label folder's images beside them too)."""
    from .weak_data import for_role

    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    files = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                           and _has_ext(q, IMAGE_EXTENSIONS + VOLUME_EXTENSIONS))
            if not found:
                raise MedCLIPSAMError(f"the {what} folder '{p}' holds no image or volume files")
            files += for_role([str(q) for q in found], {"image": "images", "label": "labels"}.get(what))
        elif p.is_file():
            files.append(str(p))
        else:
            raise MedCLIPSAMError(f"{what} '{entry}' does not exist")
    if not files:
        raise MedCLIPSAMError(f"no {what} given")
    return files


def gray8_of(image):
    """A 2D image array (grey or RGB, any depth) -> HxW uint8, as the zero-shot 2D pipeline does it."""
    from ..pipeline.image import to_gray
    from ..imageops import normalize_to_uint8

    gray = to_gray(image)
    if not np.isfinite(gray).all():
        raise MedCLIPSAMError("the image contains NaN or infinite values")
    return gray if gray.dtype == np.uint8 else normalize_to_uint8(gray)


def read_mask_2d(path):
    from ..io.images import read_image_2d

    m = np.asarray(read_image_2d(path))
    return (m.any(axis=2) if m.ndim == 3 else m) != 0


def read_label_volume(path, reference):
    """Boolean (z, y, x) mask of a label volume or .seg.nrrd (segments merged) on `reference`'s grid."""
    import SimpleITK as sitk

    from ..io import geometry_equal, read_segmentation, read_volume

    if str(path).lower().endswith(".seg.nrrd"):
        segments, grid = read_segmentation(path)
        if not segments:
            raise MedCLIPSAMError(f"segmentation '{path}' holds no segment")
        mask = np.any([s["mask"] > 0 for s in segments], axis=0)
    else:
        grid = read_volume(path)
        mask = sitk.GetArrayViewFromImage(grid) != 0
    if not geometry_equal(grid, reference, tol=1e-4):
        raise MedCLIPSAMError(f"label '{path}' is not on the grid of its image (size, origin, spacing and "
                              "direction must match)")
    return np.asarray(mask, bool)


def volume_gray_slices(image, axis="axial", window=None):
    """(SliceView, value range, function k -> uint8 slice k in display orientation) for a 3D image."""
    import SimpleITK as sitk

    from ..imageops import intensity_range, normalize_to_uint8
    from ..pipeline.slices import SliceView

    volume = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(volume).all():
        raise MedCLIPSAMError("the volume contains NaN or infinite voxels")
    view = SliceView(image, single_slice_axis(image, axis))
    value_range = intensity_range(volume, window=window) or (0.0, 255.0)  # None: a uint8 volume, kept as is

    def gray(k):
        return normalize_to_uint8(view.get(volume, k), value_range=value_range)

    return view, value_range, gray


def single_slice_axis(image, axis):
    """A one-slice volume (a 2D image read as 3D) is sliced across its one-voxel axis, whatever `axis` says."""
    from ..io import slicing_axis

    size = list(reversed(image.GetSize()))
    if 1 not in size or size[slicing_axis(image, axis)] == 1:
        return axis
    flat = size.index(1)
    return next((v for v in ("axial", "coronal", "sagittal") if slicing_axis(image, v) == flat), axis)


def load_pair(image_path, label_path):
    """Samples (one per 2D image, one per axial slice of a volume) of one image/label pair."""
    from ..io.images import read_image_2d
    from ..io import read_volume

    if is_2d_image_file(image_path):
        gray = gray8_of(read_image_2d(image_path))
        mask = read_mask_2d(label_path) if is_2d_image_file(label_path) else _one_slice_label(label_path)
        if mask.shape != gray.shape:
            raise MedCLIPSAMError(f"label '{label_path}' is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                                  f"'{image_path}' is {gray.shape[1]}x{gray.shape[0]}")
        return [Sample(gray, mask, str(image_path))]
    image = read_volume(image_path)
    mask = read_label_volume(label_path, image)
    view, _, gray = volume_gray_slices(image)
    return [Sample(gray(k), view.get(mask, k).copy(), f"{image_path}#{k}") for k in range(view.count)]


def _one_slice_label(path):
    import SimpleITK as sitk

    from ..io import read_volume

    array = sitk.GetArrayFromImage(read_volume(path))
    if array.shape[0] != 1:
        raise MedCLIPSAMError(f"label '{path}' is a 3D volume but its image is a 2D picture")
    return array[0] != 0


def load_samples(images, labels):
    """All samples of the paired image and label lists (see the module docstring)."""
    image_files = expand_inputs(images, "image")
    label_files = expand_inputs(labels, "label")
    if len(image_files) != len(label_files):
        raise MedCLIPSAMError(f"{len(image_files)} image file(s) but {len(label_files)} label file(s); "
                              "images and labels are paired in (sorted) order, so give as many of each")
    samples = []
    for image_path, label_path in zip(image_files, label_files):
        samples += load_pair(image_path, label_path)
    return samples


def choose_fraction(samples, fraction, seed=0):
    """A seeded random subset of round(fraction * n) samples (at least one): the labels a run may use."""
    if not 0 < fraction <= 1:
        raise MedCLIPSAMError(f"--fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(samples))))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in sorted(order[:n])]


def read_prompts(prompts):
    """Prompts from strings and/or .txt files (one prompt a line); empty prompts are an error."""
    out = []
    for p in [prompts] if isinstance(prompts, str) else list(prompts or []):
        if str(p).lower().endswith(".txt") and os.path.isfile(p):
            out += [line.strip() for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip()]
        elif str(p).strip():
            out.append(str(p).strip())
        else:
            raise MedCLIPSAMError("a prompt is empty; give the text that names the target, e.g. 'liver tumor'")
    if not out:
        raise MedCLIPSAMError("no prompt given; pass --prompts 'what the labels show'")
    return out


# --------------------------------------------------------------------------------------------------
# model inputs

def square_input(gray, size, mean, std):
    """HxW uint8 -> (normalised [3, size, size] float tensor, PadInfo) via pad_to_square (min value) + bicubic."""
    import torch
    from PIL import Image

    from ..pipeline.preprocess import pad_to_square, to_rgb

    square, pad = pad_to_square(gray)
    rgb = Image.fromarray(to_rgb(square))
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, pad


def square_mask(mask, size):
    """HxW bool -> [size, size] float tensor, padded with background the way the image is padded."""
    import torch

    from ..pipeline.preprocess import pad_to_square, resize

    square, _ = pad_to_square(np.asarray(mask, np.uint8), value=0)
    return torch.from_numpy(resize(square, (size, size), order=0).astype(np.float32))


def _augment(gray, mask, rng):
    """Light, label-safe augmentation: a random crop keeping 80-100 % of the area, brightness/contrast
    +-10 %. No flips: prompts may say left or right."""
    h, w = gray.shape
    scale = rng.uniform(0.8, 1.0) ** 0.5
    ch, cw = max(8, int(round(h * scale))), max(8, int(round(w * scale)))
    ch, cw = min(ch, h), min(cw, w)
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    g = gray[top:top + ch, left:left + cw].astype(np.float32)
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1) * 255.0
    g = (g - g.mean()) * contrast + g.mean() + brightness
    return np.clip(np.rint(g), 0, 255).astype(np.uint8), mask[top:top + ch, left:left + cw]


class SegmentationDataset:
    """Map-style data set of (image [3,S,S], mask [S,S], prompt, index) for a torch DataLoader."""

    def __init__(self, samples, prompts, size=224, mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711), augment=False, seed=0):
        self.samples = list(samples)
        self.prompts = list(prompts)
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        s = self.samples[index]
        # seeded per (seed, epoch, index): the same run gives the same batches with any worker count
        rng = random.Random(hash((self.seed, self.epoch, index)))
        gray, mask = _augment(s.gray, s.mask, rng) if self.augment else (s.gray, s.mask)
        x, _ = square_input(gray, self.size, self.mean, self.std)
        prompt = self.prompts[rng.randrange(len(self.prompts))]  # prompt diversity, as in the paper
        return x, square_mask(mask, self.size), prompt, index


def collate(batch):
    import torch

    images, masks, prompts, indices = zip(*batch)
    return torch.stack(images), torch.stack(masks), list(prompts), torch.tensor(indices)
