"""Image-caption data for CLIP fine-tuning and retrieval evaluation.

A data set is one of
- a CSV file with columns `image` and `caption`,
- a JSONL file with one {"image": ..., "caption": ...} object per line,
- a folder of images, each with a caption in a text file of the same name (`a.png` + `a.txt`), searched
  recursively.
Image paths are relative to the CSV/JSONL file's folder (absolute paths work too).

Images are read as RGB uint8: grayscale is repeated to three channels, 16-bit and float images are
min-max scaled to 0..255 (the full stored range, no window), an alpha channel is dropped. They are then
padded to a square with black (never stretched, as the segmentation pipeline does), resized to the
model's size with bicubic interpolation and normalised with the model's mean/std (OpenAI's for BiomedCLIP).

Augmentation (training only) is deliberately light: a random resized crop keeping 85-100 % of the area
with an aspect ratio of 0.9-1.1, and a +-10 % brightness/contrast jitter. No flips or rotations: captions
say "left" and "right" (and the patient's left is the image's right), so a mirrored image would contradict
its caption.
"""

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedCLIPSAMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Pair:
    image: str
    caption: str


def read_pairs(data):
    """List of Pair from a CSV, a JSONL or a folder (see the module docstring)."""
    path = Path(data)
    if not path.exists():
        raise MedCLIPSAMError(f"data set '{data}' does not exist")
    if path.is_dir():
        pairs = _pairs_from_folder(path)
    elif path.suffix.lower() == ".csv":
        pairs = _pairs_from_rows(path, _csv_rows(path))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        pairs = _pairs_from_rows(path, _jsonl_rows(path))
    else:
        raise MedCLIPSAMError(f"data set '{data}' is not a .csv, a .jsonl or a folder of images with .txt captions")
    if not pairs:
        raise MedCLIPSAMError(f"data set '{data}' has no image-caption pairs")
    missing = [p.image for p in pairs if not os.path.isfile(p.image)]
    if missing:
        raise MedCLIPSAMError(f"data set '{data}' names {len(missing)} image file(s) that do not exist, "
                              f"the first is '{missing[0]}'")
    return pairs


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        _check_columns(path, reader.fieldnames or [])
        return list(reader)


def _jsonl_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise MedCLIPSAMError(f"line {number} of '{path}' is not valid JSON ({exc.args[0]})") from None
            if not isinstance(row, dict):
                raise MedCLIPSAMError(f"line {number} of '{path}' is not a JSON object")
            _check_columns(path, row.keys(), f" on line {number}")
            rows.append(row)
    return rows


def _check_columns(path, names, where=""):
    lacking = [c for c in ("image", "caption") if c not in names]
    if lacking:
        raise MedCLIPSAMError(f"'{path}' needs the fields 'image' and 'caption'{where}; it has "
                              f"{', '.join(repr(n) for n in names) or 'none'}")


def _pairs_from_rows(path, rows):
    base = path.parent
    pairs = []
    for row in rows:
        image, caption = str(row["image"] or "").strip(), str(row["caption"] or "").strip()
        if not image or not caption:
            raise MedCLIPSAMError(f"'{path}' has a row with an empty image or caption")
        pairs.append(Pair(str(base / image), caption))
    return pairs


def _pairs_from_folder(folder):
    pairs = []
    for image in sorted(folder.rglob("*")):
        if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
            continue
        text = image.with_suffix(".txt")
        if text.is_file():
            caption = text.read_text(encoding="utf-8").strip()
            if caption:
                pairs.append(Pair(str(image), caption))
    return pairs


# images ---------------------------------------------------------------------------------------------

def load_rgb(path):
    """HxWx3 uint8 from any 8/16-bit or float image file (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return to_rgb_uint8(np.asarray(img))
            return np.array(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise MedCLIPSAMError(f"cannot read image '{path}' ({exc})") from None


def to_rgb_uint8(array):
    """Gray or RGB array of any dtype -> HxWx3 uint8; non-uint8 data is min-max scaled to 0..255."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.nan_to_num((a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a))
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a)


def to_model_input(rgb, size=224, mean=(0.48145466, 0.4578275, 0.40821073),
                   std=(0.26862954, 0.26130258, 0.27577711)):
    """HxWx3 uint8 -> float32 [3, size, size]: pad to square (black), bicubic resize, normalise."""
    import torch
    from PIL import Image

    h, w = rgb.shape[:2]
    side = max(h, w)
    if h != w:  # centre the image on a black square; stretching would distort anatomy
        square = np.zeros((side, side, 3), np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = rgb
        rgb = square
    if side != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def augment(rgb, rng):
    """Light training augmentation on HxWx3 uint8 (no flips: left/right must stay where captions say)."""
    h, w = rgb.shape[:2]
    area = h * w * rng.uniform(0.85, 1.0)
    aspect = rng.uniform(0.9, 1.1)
    ch = min(h, max(1, int(round((area / aspect) ** 0.5))))
    cw = min(w, max(1, int(round((area * aspect) ** 0.5))))
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    out = rgb[top:top + ch, left:left + cw].astype(np.float32)
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1) * 255.0
    out = (out - out.mean()) * contrast + out.mean() + brightness
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ImageCaptionDataset:
    """Map-style data set of (image tensor [3, S, S], caption) for a torch DataLoader."""

    def __init__(self, pairs, image_size=224, mean=None, std=None, train=False, seed=0):
        self.pairs = list(pairs)
        self.image_size = int(image_size)
        self.mean = tuple(mean) if mean is not None else (0.48145466, 0.4578275, 0.40821073)
        self.std = tuple(std) if std is not None else (0.26862954, 0.26130258, 0.27577711)
        self.train = train
        self.seed = seed
        self.epoch = 0

    @classmethod
    def for_model(cls, data, bundle, train=False, seed=0):
        """Read `data` and take size, mean and std from a ClipBundle."""
        pairs = data if isinstance(data, list) else read_pairs(data)
        return cls(pairs, bundle.image_size, bundle.mean, bundle.std, train=train, seed=seed)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        rgb = load_rgb(pair.image)
        if self.train:
            # seeded per (seed, epoch, index): independent of worker count and reproducible after resume
            rgb = augment(rgb, random.Random(hash((self.seed, self.epoch, index))))
        return to_model_input(rgb, self.image_size, self.mean, self.std), pair.caption

    @property
    def captions(self):
        return [p.caption for p in self.pairs]


def collate(batch):
    import torch

    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


# phantom data sets (tests, benchmarks) -----------------------------------------------------------------

CT_ORGANS = ("liver", "spleen", "left kidney", "right kidney", "left lung", "right lung")


def phantom_caption(phantom, style="short"):
    """'short': what and where only ("tumor in the left kidney"); 'phantom': the phantom's own caption."""
    if style == "phantom" or phantom.lesion is None:
        return phantom.caption
    if phantom.kind == "mr":
        return f"tumor in the {phantom.lesion.side} hemisphere"
    return f"tumor in the {phantom.lesion.organ}"


def write_phantom_dataset(folder, n, kind="ct", size=96, seed=0, caption="short", bits=8, size_of_lesion="large",
                          organs=None, csv_name="pairs.csv"):
    """Write `n` 2D phantom images as PNG plus a CSV (image, caption) into `folder`; returns the CSV path.

    CT lesions cycle through `organs` (default all of CT_ORGANS; X-ray: the lungs; MR: left/right
    hemisphere) so the caption classes are balanced; each image has its own seed (seed * 100003 + i), so another `seed` gives a disjoint held-out
    set. bits=8 stores display-ready images (CT soft-tissue window, MR/X-ray full range), bits=16 stores
    the raw range as 16-bit PNG.
    """
    from PIL import Image

    from ..phantoms import make_image
    from ..pipeline.preprocess import normalize_to_uint8

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind not in ("ct", "xray", "mr"):
        raise MedCLIPSAMError(f"phantom kind must be ct, xray or mr, not '{kind}'")
    organs = tuple(organs or {"ct": CT_ORGANS, "xray": ("left lung", "right lung"), "mr": (None,)}[kind])
    rows = []
    for i in range(n):
        spec = {"size": size_of_lesion}
        if kind == "mr":
            spec["side"] = ("left", "right")[i % 2]
        else:
            spec["organ"] = organs[i % len(organs)]
        ph = make_image(kind, (size, size), seed=seed * 100003 + i, lesion=spec)
        img = ph.image
        if bits == 16:
            lo, hi = (-1024.0, 3071.0) if kind == "ct" else (float(img.min()), float(img.max()))
            pixels = np.rint(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 65535).astype(np.uint16)
        elif kind == "ct":
            pixels = normalize_to_uint8(img, window="soft_tissue")
        else:
            pixels = normalize_to_uint8(img, value_range=(float(img.min()), float(img.max())))
        name = f"{kind}_{seed}_{i:05d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append({"image": name, "caption": phantom_caption(ph, caption)})
    path = folder / csv_name
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return path
