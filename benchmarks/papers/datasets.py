"""Readers for the data sets of the MedCLIP-SAM papers, each in the folder layout it is published in.

Every reader returns a Dataset: its cases (image path, mask path, split) and its targets (label value ->
text prompt). benchmarks/README.md ("papers.py") states each layout, where it is downloaded from and its
licence. Two layouts per 2D data set are understood:

  authors   the MedCLIP-SAMv2 repository's prepared folders (its README, "Datasets"): DATA_DIR holds
            {train,val,test}_images/ and {train,val,test}_masks/, a mask with its image's file name. This
            is the papers' own split, so it is used whenever DATA_DIR has test_images/.
  public    the data set as its publisher ships it (below). Where the publisher has a split it is used;
            otherwise a deterministic split by a hash of the case's (or patient's) name: 70 % train,
            10 % val, 20 % test (split_of).

The MSD reader reads a Medical Segmentation Decathlon task (dataset.json, imagesTr/, labelsTr/); its
labelled cases are split by the same hash (imagesTs/ has no labels).
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from MedCLIPSAMLib.errors import MedCLIPSAMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


@dataclass
class Case:
    id: str              # unique and file-system safe (cache file names)
    image: str           # path
    mask: str            # path (all of a case's mask files are joined: see read_mask)
    split: str           # train | val | test
    extra_masks: tuple = ()   # further mask files of the same image (BUSI's "_mask_1.png"), united with mask


@dataclass
class Dataset:
    key: str
    title: str
    dims: int                          # 2 (images) or 3 (volumes)
    layout: str                        # authors | public | msd
    split_source: str                  # where the split comes from, in words
    targets: list                      # [(label value, prompt)]
    cases: list = field(default_factory=list)
    mask_channel: int = None           # RGB masks: the channel holding the target (None: luminance)

    def split(self, name, limit=None):
        cases = [c for c in self.cases if c.split == name]
        return cases[:limit] if limit else cases


def split_of(name):
    """Deterministic split of a case (or patient) name: 20 % test, 10 % val, 70 % train, by its sha1."""
    bucket = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "val" if bucket < 3 else "train"


def safe_id(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _images(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _need(path, what):
    if not Path(path).exists():
        raise MedCLIPSAMError(f"{what} '{path}' does not exist")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# the authors' prepared folders (all four 2D data sets)


def authors_layout(root):
    """Cases from {train,val,test}_images / _masks (the MedCLIP-SAMv2 README's layout)."""
    cases = []
    for split in SPLITS:
        images, masks = Path(root, f"{split}_images"), Path(root, f"{split}_masks")
        if not images.is_dir():
            continue
        if not masks.is_dir():
            raise MedCLIPSAMError(f"'{images}' has no masks folder beside it: '{masks}' is missing")
        by_stem = {p.stem: p for p in _images(masks)}
        for image in _images(images):
            mask = masks / image.name if (masks / image.name).is_file() else by_stem.get(image.stem)
            if mask is None:
                raise MedCLIPSAMError(f"image '{image}' has no mask of the same name in '{masks}'")
            cases.append(Case(safe_id(f"{split}_{image.stem}"), str(image), str(mask), split))
    return cases


# --------------------------------------------------------------------------------------------------
# the public layouts


def busi_public(root):
    """BUSI (Kaggle aryashah2k/breast-ultrasound-images-dataset): Dataset_BUSI_with_GT/{benign,malignant,normal}/
    'benign (1).png' with 'benign (1)_mask.png' (and '_mask_1.png', ... for further lesions, united).
    'normal' images have no tumour and are left out, as a tumour task has nothing to find in them."""
    base = Path(root, "Dataset_BUSI_with_GT") if Path(root, "Dataset_BUSI_with_GT").is_dir() else Path(root)
    cases = []
    for group in ("benign", "malignant"):
        folder = _need(base / group, "BUSI folder")
        for image in _images(folder):
            if "_mask" in image.stem:
                continue
            mask = folder / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise MedCLIPSAMError(f"BUSI image '{image}' has no mask '{mask.name}'")
            extra = tuple(str(p) for p in sorted(folder.glob(f"{image.stem}_mask_*.png")))
            cid = safe_id(f"{group}_{image.stem}")
            cases.append(Case(cid, str(image), str(mask), split_of(image.stem), extra))
    return cases


def covidqu_public(root):
    """COVID-QU-Ex (Kaggle anasmohammedtahir/covidqu): 'Lung Segmentation Data/Lung Segmentation Data/
    {Train,Val,Test}/{COVID-19,Non-COVID,Normal}/{images,lung masks}/NAME.png'. The publisher's split."""
    base = Path(root)
    for part in ("Lung Segmentation Data", "Lung Segmentation Data"):
        if (base / part).is_dir() and not (base / "Test").is_dir():
            base = base / part
    cases = []
    for split, folder in (("train", "Train"), ("val", "Val"), ("test", "Test")):
        top = base / folder
        if not top.is_dir():
            continue
        for group in sorted(p for p in top.iterdir() if p.is_dir()):
            images, masks = group / "images", group / "lung masks"
            if not images.is_dir() or not masks.is_dir():
                raise MedCLIPSAMError(f"COVID-QU-Ex folder '{group}' needs 'images' and 'lung masks' inside")
            for image in _images(images):
                mask = _need(masks / image.name, "lung mask")
                cases.append(Case(safe_id(f"{split}_{group.name}_{image.stem}"), str(image), str(mask), split))
    if not cases:
        raise MedCLIPSAMError(f"no COVID-QU-Ex Train/Val/Test folders under '{root}'")
    return cases


def lungct_public(root):
    """Chest CT segmentation (Kaggle polomarco/chest-ct-segmentation): images/images/ID_N.jpg and
    masks/masks/ID_N.jpg (RGB: lungs in the red channel). Split by patient ID (the name before the last '_'),
    so one patient's slices stay in one split."""
    base = Path(root)
    images = base / "images" / "images" if (base / "images" / "images").is_dir() else _need(base / "images", "folder")
    masks = base / "masks" / "masks" if (base / "masks" / "masks").is_dir() else _need(base / "masks", "folder")
    cases = []
    for image in _images(images):
        mask = masks / image.name
        if not mask.is_file():
            continue  # the CSV pairs every image with a mask; an image without one is skipped, not guessed
        patient = image.stem.rsplit("_", 1)[0]
        cases.append(Case(safe_id(image.stem), str(image), str(mask), split_of(patient)))
    return cases


def brain_public(root):
    """Figshare brain tumour data set (Cheng et al.; Kaggle ashkhagan/figshare-brain-tumor-dataset): N.mat
    files (cjdata.image, cjdata.tumorMask; see _read_mat), anywhere under root. The case number decides
    its split."""
    mats = sorted(Path(root).rglob("*.mat"), key=lambda p: (len(p.stem), p.stem))
    mats = [p for p in mats if p.stem.isdigit()]
    if not mats:
        raise MedCLIPSAMError(f"no figshare brain tumour .mat files (1.mat, 2.mat, ...) under '{root}'")
    return [Case(f"mat_{p.stem}", str(p), str(p), split_of(p.stem)) for p in mats]


# --------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon


def msd_dataset(root):
    """A Decathlon task folder: dataset.json ("labels", "training": [{"image", "label"}]), imagesTr, labelsTr."""
    meta_path = _need(Path(root, "dataset.json"), "MSD dataset.json")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise MedCLIPSAMError(f"'{meta_path}' is not valid JSON ({exc})") from None
    labels = meta.get("labels") or {}
    # MSD writes {"0": "background", "1": "spleen"}; nnU-Net v2 writes {"background": 0, "spleen": 1}
    pairs = [(int(k), v) for k, v in labels.items() if str(k).isdigit()] or \
            [(int(v), k) for k, v in labels.items() if isinstance(v, int)]
    targets = sorted((value, str(name)) for value, name in pairs if value > 0)
    if not targets:
        raise MedCLIPSAMError(f"'{meta_path}' names no foreground labels")
    cases = []
    for item in meta.get("training") or []:
        image, label = Path(root, item["image"]), Path(root, item["label"])
        if not image.is_file() or not label.is_file():
            raise MedCLIPSAMError(f"'{meta_path}' lists '{item['image']}' / '{item['label']}', which are not there")
        name = image.name.split(".")[0]
        cases.append(Case(safe_id(name), str(image), str(label), split_of(name)))
    if not cases:
        raise MedCLIPSAMError(f"'{meta_path}' lists no training cases")
    title = f"MSD {meta.get('name', Path(root).name)}"
    return Dataset("msd", title, 3, "msd", "hash of the case name (imagesTs has no labels)", targets, cases)


# --------------------------------------------------------------------------------------------------

TWO_D = {
    # key: (title, prompt, public reader, the public layout's split)
    "busi": ("breast tumour ultrasound (BUSI)", "breast tumor", busi_public, "hash of the image name"),
    "brain": ("brain tumour MRI (figshare)", "brain tumor", brain_public, "hash of the case number"),
    "covidqu": ("lung X-ray (COVID-QU-Ex)", "lung", covidqu_public, "the publisher's Train/Val/Test"),
    "lungct": ("lung CT (Kaggle chest CT segmentation)", "lung", lungct_public, "hash of the patient ID"),
}
DATASETS = tuple(TWO_D) + ("msd",)


def load_dataset(key, root):
    """The Dataset `key` read from `root` in the authors' layout (if present) or its public layout."""
    if key not in DATASETS:
        raise MedCLIPSAMError(f"unknown data set '{key}'; choose one of {', '.join(DATASETS)}")
    if not Path(root).is_dir():
        raise MedCLIPSAMError(f"data folder '{root}' does not exist")
    if key == "msd":
        return msd_dataset(root)
    title, prompt, reader, public_split = TWO_D[key]
    if Path(root, "test_images").is_dir():
        cases, layout, split = authors_layout(root), "authors", "the authors' prepared split (MedCLIP-SAMv2)"
    else:
        cases, layout, split = reader(root), "public", public_split
    if not any(c.split == "test" for c in cases):
        raise MedCLIPSAMError(f"no test images found for '{key}' in '{root}'")
    channel = 0 if key == "lungct" and layout == "public" else None
    return Dataset(key, title, 2, layout, split, [(1, prompt)], cases, channel)


# --------------------------------------------------------------------------------------------------
# reading one case


def read_image(dataset, case):
    """2D: a numpy image (grayscale or RGB); 3D: a SimpleITK volume (first channel of a 4D one)."""
    if case.image.endswith(".mat"):
        return _read_mat(case.image)["image"]
    if dataset.dims == 2:
        from MedCLIPSAMLib.io import read_image_2d

        return read_image_2d(case.image)
    return _read_3d(case.image)


def read_mask(dataset, case):
    """uint8 label map: 2D masks binarised (> 127; RGB masks by `mask_channel` or luminance, extra masks
    united); 3D labels as stored, on the image's grid (z, y, x)."""
    if case.mask.endswith(".mat"):
        return (_read_mat(case.mask)["mask"] > 0).astype(np.uint8)
    if dataset.dims == 3:
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(_read_3d(case.mask)).astype(np.uint8)
    from MedCLIPSAMLib.io import read_image_2d

    out = None
    for path in (case.mask,) + tuple(case.extra_masks):
        m = np.asarray(read_image_2d(path))
        if m.ndim == 3:
            m = m[..., dataset.mask_channel] if dataset.mask_channel is not None else m[..., :3].mean(axis=2)
        m = m > (127 if m.max() > 1 else 0)
        out = m if out is None else out | m
    return out.astype(np.uint8)


def _read_3d(path):
    from MedCLIPSAMLib.io import read_volume

    return read_volume(path, frame=0)   # a multi-modal (4D) MSD task: its first channel


def _read_mat(path):
    """cjdata.image and cjdata.tumorMask of a figshare case: MATLAB v7.3 (HDF5, as published) through h5py,
    older MATLAB files (some re-uploads) through scipy."""
    from scipy.io import loadmat

    try:
        data = loadmat(path, simplify_cells=True)["cjdata"]
        return {"image": np.asarray(data["image"], np.float32), "mask": np.asarray(data["tumorMask"])}
    except NotImplementedError:   # scipy's answer to a v7.3 file
        pass
    try:
        import h5py
    except ImportError:
        raise MedCLIPSAMError("reading the figshare brain tumour .mat files (MATLAB v7.3) needs h5py ('pip install "
                              "h5py'), or use the MedCLIP-SAMv2 prepared folders (test_images/, test_masks/)") from None
    with h5py.File(path, "r") as f:
        data = f["cjdata"]
        # MATLAB stores column-major: h5py reads the transpose
        return {"image": np.asarray(data["image"]).T.astype(np.float32), "mask": np.asarray(data["tumorMask"]).T}
