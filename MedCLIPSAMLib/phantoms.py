"""Synthetic CT-like and MR-like phantoms with exact ground truth and captions, made in code.

Anatomy is defined in normalised patient coordinates u = (x, y, z) along LPS: +x is the patient's left,
+y posterior, +z superior. It is centred on the grid's physical centre and scaled to its field of view
(in-plane by the smaller of the L-R / A-P half-widths, so shapes are not stretched; S-I by its own
half-length). Every voxel centre is mapped to u through the image's origin, spacing and direction, so a
structure sits where its caption says in patient space whatever the grid (oblique, permuted, RAS-flipped).
Ground truth is exact on the voxel grid: a voxel belongs to a structure when its centre lies inside it.
Labels may overlap: an organ's mask includes the tumour inside it, "body" and "brain" include their
contents. `label_map()` gives an exclusive labelmap (later, smaller structures win).

    make_volume(kind="ct"|"mr", shape=(z, y, x), spacing=(x, y, z), origin, direction, seed, lesion) -> Phantom
    make_image(kind="ct"|"mr"|"xray", size=(h, w), seed, lesion) -> Phantom2D
    slice_caption(phantom, index, axis="axial") -> str      (also Phantom.slice_caption)

`lesion` is True (random), False (none) or a dict fixing any of: organ, side ("left"/"right"),
vertical ("upper"/"lower", relative to the organ's centre), size ("small"/"large"), brightness
("bright"/"dark", against the organ). The lesion's label is always "tumor"; captions vary the word.

Labels: CT body, left lung, right lung, heart, liver, spleen, left kidney, right kidney, aorta, spine;
MR head, skull, brain, ventricles; X-ray (projected) left lung, right lung, heart; plus tumor.
"""

from dataclasses import dataclass

import numpy as np

from .errors import MedCLIPSAMError

KINDS_3D = ("ct", "mr")
KINDS_2D = ("ct", "mr", "xray")
DEFAULT_SPACING = {"ct": (0.8, 0.8, 2.5), "mr": (1.0, 1.0, 1.5)}
AIR_HU, MR_BACKGROUND = -1000.0, 0.0
NOISE_SIGMA = {"ct": 18.0, "mr": 14.0, "xray": 0.015}

# Slicer-like display colours for the ground-truth segments
COLORS = {
    "body": (0.89, 0.68, 0.55), "left lung": (0.77, 0.70, 0.93), "right lung": (0.60, 0.52, 0.85),
    "heart": (0.81, 0.24, 0.20), "liver": (0.87, 0.51, 0.36), "spleen": (0.62, 0.29, 0.55),
    "left kidney": (0.73, 0.31, 0.26), "right kidney": (0.85, 0.42, 0.35), "aorta": (0.85, 0.20, 0.25),
    "spine": (0.95, 0.92, 0.80), "head": (0.92, 0.78, 0.65), "skull": (0.96, 0.95, 0.85),
    "brain": (0.98, 0.80, 0.75), "ventricles": (0.35, 0.70, 0.90), "tumor": (0.90, 0.85, 0.20),
}

# Named direction matrices (row-major 3x3, columns = index axes in LPS) for tests and the CLI.
_C, _S = np.cos(np.deg2rad(25.0)), np.sin(np.deg2rad(25.0))
_OBLIQUE = np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),                       # what a RAS-stored (e.g. NIfTI-like) grid looks like
    "oblique": _OBLIQUE,
    "oblique-flipped": _OBLIQUE @ np.diag([1.0, 1.0, -1.0]),  # left-handed: slices stored inferior to superior reversed
    "sagittal": np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]),  # index x along A-P, y along S-I, z along L-R
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),    # index y along S-I, z along A-P
}


def direction_preset(name):
    """Row-major 9-tuple for a named direction ('lps', 'ras', 'oblique', 'oblique-flipped', 'sagittal', 'coronal')."""
    if name not in DIRECTIONS:
        raise MedCLIPSAMError(f"unknown direction '{name}'; choose one of {', '.join(DIRECTIONS)}")
    return tuple(float(v) for v in DIRECTIONS[name].ravel())


@dataclass
class Shape:
    """An ellipsoid in normalised patient coordinates (radius None along z: a cylinder along S-I)."""

    name: str
    center: tuple
    radii: tuple
    value: float
    parent: str = None
    labeled: bool = True


@dataclass
class Lesion:
    """Where the phantom's tumour is, in words and in LPS millimetres."""

    organ: str
    side: str         # patient side: "left" / "right"
    vertical: str     # "upper" / "lower" part of its organ
    size: str         # "small" / "large"
    brightness: str   # "bright" / "dark" against its organ
    word: str         # "tumor", "nodule", "mass", "cyst" ...
    location: str     # phrase for captions, e.g. "upper pole of the left kidney"
    center: tuple = ()          # normalised patient coordinates
    center_lps: tuple = ()      # millimetres (3D phantoms)
    radius_mm: float = 0.0


# --------------------------------------------------------------------------------------------------
# anatomy


def _jitter(rng, shapes, move=0.02, grow=0.06, shade=0.0):
    """Small anatomical variation between seeds: positions, sizes and intensities."""
    out = []
    for s in shapes:
        center = tuple(c + rng.normal(0, move) for c in s.center)
        radii = tuple(r if r is None else r * rng.uniform(1 - grow, 1 + grow) for r in s.radii)
        value = s.value + (rng.normal(0, shade * abs(s.value)) if shade else 0.0)
        out.append(Shape(s.name, center, radii, value, s.parent, s.labeled))
    return out


def _ct_shapes(rng):
    hu = lambda v, sd=8: v + rng.normal(0, sd)  # noqa: E731  (per-seed tissue values)
    return _jitter(rng, [
        Shape("body", (0, 0.02, 0), (0.92, 0.68, None), hu(-95)),                    # subcutaneous fat
        Shape("soft tissue", (0, 0.02, 0), (0.84, 0.60, None), hu(45), "body", False),
        Shape("left lung", (0.42, 0.06, 0.62), (0.30, 0.42, 0.50), hu(-860, 15), "body"),
        Shape("right lung", (-0.42, 0.06, 0.62), (0.30, 0.42, 0.50), hu(-860, 15), "body"),
        Shape("heart", (0.08, -0.18, 0.42), (0.24, 0.22, 0.22), hu(40), "body"),
        Shape("liver", (-0.38, -0.08, -0.20), (0.38, 0.38, 0.32), hu(62), "body"),
        Shape("spleen", (0.50, 0.28, -0.12), (0.16, 0.20, 0.22), hu(48), "body"),
        Shape("left kidney", (0.30, 0.38, -0.45), (0.12, 0.10, 0.20), hu(165, 12), "body"),
        Shape("right kidney", (-0.30, 0.38, -0.48), (0.12, 0.10, 0.20), hu(165, 12), "body"),
        Shape("aorta", (0.06, 0.20, 0), (0.06, 0.06, None), hu(175, 12), "body"),
        Shape("spine", (0.0, 0.45, 0), (0.10, 0.09, None), hu(560, 30), "body"),
    ])


def _mr_shapes(rng):
    return _jitter(rng, [
        Shape("head", (0, 0, 0), (0.80, 0.95, 0.90), 330.0),                        # scalp and face
        Shape("skull", (0, 0, 0), (0.77, 0.91, 0.86), 60.0, "head"),
        Shape("csf", (0, 0, 0), (0.70, 0.84, 0.79), 120.0, "head", False),
        Shape("brain", (0, 0, 0), (0.67, 0.81, 0.75), 420.0, "head"),               # grey matter
        Shape("white matter", (0, 0.02, 0.05), (0.50, 0.62, 0.55), 560.0, "brain", False),
        Shape("ventricles", (0.10, -0.05, 0.12), (0.07, 0.30, 0.12), 110.0, "brain"),
        Shape("ventricles", (-0.10, -0.05, 0.12), (0.07, 0.30, 0.12), 110.0, "brain"),
    ], move=0.01, grow=0.04, shade=0.05)


# organ -> (relative chance, words, dark value range, bright value range); values in HU
CT_LESION_ORGANS = {
    "liver": (0.40, ("tumor", "lesion", "mass"), (5, 30), (115, 145)),
    "left kidney": (0.12, ("tumor", "mass", "cyst"), (-5, 20), (250, 300)),
    "right kidney": (0.12, ("tumor", "mass", "cyst"), (-5, 20), (250, 300)),
    "left lung": (0.13, ("nodule", "tumor", "mass"), None, (0, 60)),
    "right lung": (0.13, ("nodule", "tumor", "mass"), None, (0, 60)),
    "spleen": (0.10, ("lesion", "tumor"), (0, 20), (105, 130)),
}
LESION_RADIUS = {"ct": {"small": (0.035, 0.06), "large": (0.09, 0.14)},
                 "mr": {"small": (0.05, 0.08), "large": (0.13, 0.19)}}


def _side(x):
    return "left" if x > 0 else "right"  # LPS: +x points to the patient's left


def _brain_lobe(y, z):
    if y < -0.2:
        return "frontal"
    if y > 0.3:
        return "occipital"
    return "parietal" if z > 0.1 else "temporal"


def _ct_location(organ, vertical):
    if organ.endswith("kidney"):
        return f"{vertical} pole of the {organ}"
    if organ.endswith("lung"):
        return f"{vertical} lobe of the {organ}"
    return f"{vertical} part of the {organ}"


def _choose(rng, options, wanted, what):
    if wanted is None:
        return options[int(rng.integers(len(options)))]
    if wanted not in options:
        raise MedCLIPSAMError(f"lesion {what} must be one of {', '.join(options)}, got '{wanted}'")
    return wanted


def _plan_lesion(kind, rng, shapes, spec):
    """Pick the lesion's organ, place and look (no voxels yet). Returns (Lesion, value, radius_norm)."""
    spec = dict(spec or {})
    unknown = set(spec) - {"organ", "side", "vertical", "size", "brightness"}
    if unknown:
        raise MedCLIPSAMError(f"unknown lesion option(s): {', '.join(sorted(unknown))}")
    size = _choose(rng, ("small", "large"), spec.get("size"), "size")
    r = rng.uniform(*LESION_RADIUS["ct" if kind == "xray" else kind][size])
    organs = {s.name: s for s in shapes}
    if kind == "mr":
        _choose(rng, ("brain",), spec.get("organ", "brain"), "organ (for MR)")
        side = _choose(rng, ("left", "right"), spec.get("side"), "side")
        brightness = _choose(rng, ("bright", "dark"), spec.get("brightness"), "brightness")
        vertical = spec.get("vertical")
        brain = organs["brain"]
        for _ in range(1000):  # a point well inside the brain, off the midline
            x = (1 if side == "left" else -1) * rng.uniform(0.15, 0.42)
            y, z = rng.uniform(-0.5, 0.5), rng.uniform(-0.25, 0.4)
            if vertical is not None and (z > brain.center[2]) != (vertical == "upper"):
                z = 2 * brain.center[2] - z
            if sum(((c - m) / rr) ** 2 for c, m, rr in zip((x, y, z), brain.center, brain.radii)) < 0.5:
                break
        lobe = _brain_lobe(y - brain.center[1], z - brain.center[2])
        value = rng.uniform(850, 1000) if brightness == "bright" else rng.uniform(190, 260)
        word = ("tumor", "lesion", "mass")[int(rng.integers(3))]
        lesion = Lesion("brain", side, "upper" if z > brain.center[2] else "lower", size, brightness, word,
                        f"{side} {lobe} lobe", center=(x, y, z))
        return lesion, value, r

    candidates = [o for o in CT_LESION_ORGANS if kind != "xray" or o.endswith("lung")]
    if spec.get("side"):
        _choose(rng, ("left", "right"), spec["side"], "side")
        candidates = [o for o in candidates if _side(organs[o].center[0]) == spec["side"]]
    if spec.get("organ"):
        _choose(rng, tuple(candidates), spec["organ"], "organ (for this kind and side)")
        candidates = [spec["organ"]]
    weights = np.array([CT_LESION_ORGANS[o][0] for o in candidates])
    organ = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
    _, words, dark, bright = CT_LESION_ORGANS[organ]
    looks = ("bright", "dark") if dark else ("bright",)
    brightness = _choose(rng, looks, spec.get("brightness"), f"brightness in the {organ}")
    value = rng.uniform(*(bright if brightness == "bright" else dark))
    host = organs[organ]
    v = rng.normal(size=3)
    v /= np.linalg.norm(v)
    if spec.get("vertical"):
        _choose(rng, ("upper", "lower"), spec["vertical"], "vertical position")
        v[2] = abs(v[2]) if spec["vertical"] == "upper" else -abs(v[2])
    v[2] = np.sign(v[2] or 1.0) * max(abs(v[2]), 0.3)  # clearly above or below the organ's middle
    frac = rng.uniform(0.25, 0.5)
    radii = [rr if rr is not None else 1.0 for rr in host.radii]
    center = tuple(c + frac * rr * d for c, rr, d in zip(host.center, radii, v))
    vertical = "upper" if center[2] > host.center[2] else "lower"
    words = [w for w in words if brightness == "dark" or w != "cyst"]  # cysts are never bright
    word = words[int(rng.integers(len(words)))]
    lesion = Lesion(organ, _side(center[0]), vertical, size, brightness, word,
                    _ct_location(organ, vertical), center=center)
    return lesion, value, r


# --------------------------------------------------------------------------------------------------
# rendering


def _inside(u, shape):
    total = None
    for axis, (c, r) in enumerate(zip(shape.center, shape.radii)):
        if r is None:
            continue
        term = np.square((u[axis] - np.float32(c)) * np.float32(1.0 / r))
        total = term if total is None else total + term
    return total <= 1.0


class _Scene:
    """Paint shapes in order into an owner map; labels are a shape and its descendants."""

    def __init__(self, shapes, u, background):
        self.shapes = list(shapes)
        self.u = u
        self.background = background
        self.owner = np.zeros(np.broadcast_shapes(*(a.shape for a in u)), np.uint8)
        for index, shape in enumerate(self.shapes, 1):
            self._paint(shape, index)

    def members(self, name):
        """Owner ids (1-based) of every shape called `name` and of all their descendants."""
        parents = {s.name: s.parent for s in self.shapes}
        ids = []
        for idx, s in enumerate(self.shapes, 1):
            node = s.name
            while node is not None and node != name:
                node = parents.get(node)
            if node == name:
                ids.append(idx)
        return ids

    def region(self, name):
        lut = np.zeros(256, bool)  # a lookup table is much faster than np.isin on big owner maps
        lut[self.members(name)] = True
        return lut[self.owner]

    def _paint(self, shape, index):
        inside = _inside(self.u, shape)
        if shape.parent:
            inside &= self.region(shape.parent)  # clipped to its parent: a tumour stays inside its organ
        self.owner[inside] = index
        return inside

    def add(self, shape):
        """Paint one more shape (a lesion) on top; returns its mask."""
        self.shapes.append(shape)
        return self._paint(shape, len(self.shapes))

    def values(self):
        lut = np.array([self.background] + [s.value for s in self.shapes], dtype=np.float32)
        return lut[self.owner]

    def labels(self):
        names = dict.fromkeys(s.name for s in self.shapes if s.labeled)
        return {name: self.region(name).astype(np.uint8) for name in names}


def _finish(clean, kind, rng, noise, sigma_vox, u=None):
    """Partial-volume blur, MR bias field, Gaussian noise; returns float32."""
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(clean, sigma=sigma_vox, mode="nearest") if sigma_vox else clean
    if kind == "mr" and u is not None:
        g = rng.normal(size=3)
        g *= 0.12 / np.linalg.norm(g)
        field = np.float32(g[0]) * u[0] + np.float32(g[1]) * u[1] + np.float32(g[2]) * u[2]
        img = img * np.exp(field + np.float32(rng.uniform(-0.06, 0.06)) * (u[0] * u[0] - u[2] * u[2]))
    if noise:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(NOISE_SIGMA[kind] * noise)
    if kind == "mr":
        img = np.abs(img)  # magnitude images are positive (Rician-like floor)
    return img.astype(np.float32, copy=False)


def _add_lesion(scene, kind, rng, spec, scale_mm, voxel_mm, tries=30):
    """Place a lesion that really has voxels (retrying new places); returns the Lesion.

    The lesion is a sphere in millimetres, widened to at least 1.5 voxels along each patient axis
    (`voxel_mm`) so that a small lesion never falls between voxel centres.
    """
    for _ in range(tries):
        lesion, value, r = _plan_lesion(kind, rng, scene.shapes, spec)
        radius_mm = r * scale_mm[0]
        radii = tuple(max(radius_mm, 1.5 * v) / s for v, s in zip(voxel_mm, scale_mm))
        lesion.radius_mm = float(radius_mm)
        mask = scene.add(Shape("tumor", lesion.center, radii, float(value), lesion.organ))
        if mask.any():
            if kind != "mr":  # "upper"/"lower" from the voxels, which is what a reader of the image sees
                up = scene.u[2][mask].mean() > scene.u[2][scene.region(lesion.organ)].mean()
                lesion.vertical = "upper" if up else "lower"
                lesion.location = _ct_location(lesion.organ, lesion.vertical)
            return lesion
        scene.shapes.pop()
    raise MedCLIPSAMError("could not place a lesion inside this field of view; use a larger grid or lesion=False")


# --------------------------------------------------------------------------------------------------
# captions


def _a(word):
    """Indefinite article by sound: "an MR scan", "an X-ray", "a CT scan"."""
    return "an" if word[0] in "aeiou" or word.split()[0] in ("MR", "MRI", "X-ray") else "a"


BRIGHT_WORDS = {"ct": {"bright": ("bright", "hyperdense"), "dark": ("dark", "hypodense")},
                "mr": {"bright": ("bright", "hyperintense"), "dark": ("dark", "hypointense")},
                "xray": {"bright": ("bright", "dense"), "dark": ("dark", "lucent")}}
SCAN = {"ct": "CT scan of the chest and upper abdomen", "mr": "MR scan of the head",
        "xray": "chest X-ray"}


def _volume_captions(kind, lesion):
    scan = SCAN[kind]
    if lesion is None:
        normal = {"ct": "showing the lungs, heart, liver, spleen and kidneys with no tumor",
                  "mr": "showing a normal brain with no tumor", "xray": "showing clear lungs with no nodule"}[kind]
        return [f"{_a(scan)} {scan} {normal}", f"a normal {scan.split(' of ')[0]} without any lesion"]
    plain, technical = BRIGHT_WORDS[kind][lesion.brightness]
    where = f"in the {lesion.location}"
    caps = [f"{_a(scan)} {scan} with {_a(lesion.size)} {lesion.size} {plain} {lesion.word} {where}",
            f"{_a(lesion.size)} {lesion.size} {technical} {lesion.word} {where}",
            f"{lesion.word} in the {lesion.organ}, {lesion.side} side"
            if kind != "mr" else f"{lesion.word} in the {lesion.side} hemisphere of the brain"]
    if kind == "ct":
        caps.append(f"{_a(plain)} {plain} {lesion.word} in the {lesion.vertical} {lesion.side} "
                    f"{'abdomen' if 'lung' not in lesion.organ else 'chest'} on CT")
    return caps


def _describe_slice(kind, view, labels, lesion, lesion_r_norm):
    """A caption for one 2D slice from the labels visible in it (dict name -> 2D mask)."""
    present = {name for name, m in labels.items() if m.any()}
    mod = {"ct": "CT", "mr": "MR", "xray": "X-ray"}[kind]
    head = f"{_a(view)} {view} {mod} slice" if kind != "xray" else "a frontal chest X-ray"
    if kind == "mr":
        region = "of the brain" if "brain" in present else "of the head" if present else "outside the head"
    elif kind == "xray":
        region = ""
    else:
        chest = bool(present & {"left lung", "right lung", "heart"})
        belly = bool(present & {"liver", "spleen", "left kidney", "right kidney"})
        region = ("of the lower chest and upper abdomen" if chest and belly else "of the chest" if chest
                  else "of the abdomen" if belly else "of the body" if present else "outside the body")
    head = f"{head} {region}".strip()
    if lesion is not None and "tumor" in present:
        size = "small" if lesion_r_norm < 0.1 else "large"
        plain = BRIGHT_WORDS[kind][lesion.brightness][0]
        where = f"{lesion.side} hemisphere" if kind == "mr" else lesion.organ
        if kind == "ct" and "lung" not in lesion.organ and lesion.organ not in ("left kidney", "right kidney"):
            where = f"{lesion.organ} on the {lesion.side} side"
        return f"{head} with {_a(size)} {size} {plain} {lesion.word} in the {where}"
    if kind == "mr":
        if "brain" in present:
            extra = " showing the lateral ventricles" if "ventricles" in present else ""
            return f"{head}{extra} with no tumor"
        return f"{head} above or below the brain" if present else head
    if kind == "xray":
        return f"{head} with no nodule"
    organs = [n for n in ("lungs", "heart", "liver", "spleen", "kidneys") if
              (n == "lungs" and present & {"left lung", "right lung"}) or
              (n == "kidneys" and present & {"left kidney", "right kidney"}) or n in present]
    if not organs:
        return head
    listed = organs[0] if len(organs) == 1 else ", ".join(organs[:-1]) + " and " + organs[-1]
    return f"{head} showing the {listed} with no tumor"


# --------------------------------------------------------------------------------------------------
# phantoms


class _PhantomCommon:
    """What 3D and 2D phantoms share: the lesion's side, an exclusive labelmap, a JSON description."""

    @property
    def lesion_side(self):
        return self.lesion.side if self.lesion else None

    def label_map(self):
        """(uint8 array, names): exclusive labels 1..N in `labels` order, later ones drawn on top."""
        return _label_map(self.labels)

    def to_dict(self):
        """JSON-ready description (captions, lesion, label names and voxel counts)."""
        return {"kind": self.kind, "seed": self.seed, "caption": self.caption, "captions": self.captions,
                "lesion": _lesion_dict(self.lesion),
                "labels": {n: int(m.sum()) for n, m in self.labels.items()}}


@dataclass
class Phantom(_PhantomCommon):
    """A 3D phantom: `image` (SimpleITK, CT in HU as int16, MR float32), `labels` (name -> uint8 z/y/x)."""

    kind: str
    image: object
    labels: dict
    caption: str
    captions: list
    lesion: Lesion = None
    scale_mm: tuple = ()   # millimetres per normalised unit along L-R, A-P, S-I
    seed: int = 0

    def segments(self):
        """The ground truth as `MedCLIPSAMLib.io.write_segmentation` segments (overlaps kept)."""
        return [{"name": n, "mask": m, "color": COLORS.get(n, (0.5, 0.5, 0.5))} for n, m in self.labels.items()]

    def slice_caption(self, index, axis="axial"):
        return slice_caption(self, index, axis)


@dataclass
class Phantom2D(_PhantomCommon):
    """A 2D phantom image (float32 h x w; CT in HU, MR positive, X-ray 0..1) with `labels` (name -> uint8).

    Axial CT/MR slices follow the radiological display: row 0 is anterior, the image's right is the
    patient's left. X-rays are frontal (row 0 superior, image right = patient left).
    """

    kind: str
    image: np.ndarray
    labels: dict
    caption: str
    captions: list
    lesion: Lesion = None
    spacing: tuple = (1.0, 1.0)   # millimetres per pixel (row, column)
    seed: int = 0


def _label_map(labels):
    names = list(labels)
    first = next(iter(labels.values()))
    out = np.zeros(first.shape, np.uint8)
    for value, name in enumerate(names, 1):
        out[labels[name] > 0] = value
    return out, names


def _lesion_dict(lesion):
    if lesion is None:
        return None
    d = dict(lesion.__dict__)
    d["center"] = [float(v) for v in d["center"]]
    d["center_lps"] = [float(v) for v in d["center_lps"]]
    return d


def _as_direction(direction):
    if direction is None:
        return np.eye(3)
    if isinstance(direction, str):
        direction = direction_preset(direction)
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise MedCLIPSAMError("direction must be an orthonormal 3x3 matrix (row-major, 9 numbers)")
    return d


def make_volume(kind="ct", shape=(64, 128, 128), spacing=None, origin=(0.0, 0.0, 0.0), direction=None,
                seed=0, lesion=True, noise=1.0):
    """A 3D phantom on any grid.

    kind: "ct" (chest/upper abdomen in HU, int16) or "mr" (head, float32 with a bias field).
    shape: array shape (z, y, x); spacing: (x, y, z) mm (default per kind); origin: LPS mm;
    direction: row-major 9 numbers, a 3x3 matrix or a name from DIRECTIONS; lesion: True, False or a
    dict (see module doc); noise: noise multiplier (0 = clean image). Deterministic for a seed.
    """
    import SimpleITK as sitk

    from .io.geometry import patient_axes

    if kind not in KINDS_3D:
        raise MedCLIPSAMError(f"phantom kind must be one of {', '.join(KINDS_3D)}, got '{kind}'")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise MedCLIPSAMError(f"shape must be three positive sizes (z, y, x), got {shape}")
    spacing = np.asarray(spacing if spacing is not None else DEFAULT_SPACING[kind], dtype=float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise MedCLIPSAMError("spacing must be three positive numbers (x, y, z)")
    direction = _as_direction(direction)
    origin = np.asarray(origin, dtype=float)
    rng = np.random.default_rng(seed)

    size = np.array(shape[::-1])                   # (x, y, z)
    step = direction * spacing                     # columns: mm per index step, in LPS
    center = origin + step @ ((size - 1) / 2.0)
    axes = patient_axes(direction)                 # index axis along L-R, A-P, S-I
    half = [0.5 * size[a] * spacing[a] for a in axes]
    inplane = min(half[0], half[1])
    scale_mm = np.array([inplane, inplane, half[2]])
    # u = (origin - center + step @ index) / scale, built from three 1-D ramps (cheap broadcasting)
    ramps = [np.arange(n, dtype=np.float32) for n in size]
    u = []
    for row in range(3):
        k = (step[row] / scale_mm[row]).astype(np.float32)
        value = np.float32((origin[row] - center[row]) / scale_mm[row])
        value = value + k[0] * ramps[0][None, None, :] + k[1] * ramps[1][None, :, None] + k[2] * ramps[2][:, None, None]
        u.append(np.ascontiguousarray(np.broadcast_to(value, shape), dtype=np.float32))

    shapes = _ct_shapes(rng) if kind == "ct" else _mr_shapes(rng)
    scene = _Scene(shapes, u, AIR_HU if kind == "ct" else MR_BACKGROUND)
    found = None
    if lesion:
        voxel_mm = [spacing[a] for a in axes]  # voxel size along L-R, A-P, S-I
        found = _add_lesion(scene, kind, rng, lesion if isinstance(lesion, dict) else None, scale_mm, voxel_mm)
        found.center_lps = tuple(float(v) for v in center + np.asarray(found.center) * scale_mm)
    clean = scene.values()
    img = _finish(clean, kind, rng, noise, 0.5, u)
    if kind == "ct":
        img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    image = sitk.GetImageFromArray(img)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    captions = _volume_captions(kind, found)
    return Phantom(kind, image, scene.labels(), captions[0], captions, found, tuple(scale_mm), seed)


def make_image(kind="ct", size=(128, 128), seed=0, lesion=True, spacing=1.0, noise=1.0):
    """A 2D phantom of `size` = (rows, columns), any aspect ratio (the anatomy keeps its shape).

    kind: "ct" (axial slice in HU), "mr" (axial head slice) or "xray" (frontal chest radiograph, 0..1).
    The slice is cut through the lesion when there is one. spacing: mm per pixel, one number or (row, col).
    """
    if kind not in KINDS_2D:
        raise MedCLIPSAMError(f"2D phantom kind must be one of {', '.join(KINDS_2D)}, got '{kind}'")
    h, w = (int(n) for n in size)
    if h < 8 or w < 8:
        raise MedCLIPSAMError(f"2D phantom size must be at least 8 x 8, got {h} x {w}")
    sr, sc = (float(spacing), float(spacing)) if np.isscalar(spacing) else (float(s) for s in spacing)
    rng = np.random.default_rng(seed)
    scale = min(h * sr, w * sc) / 2.0                            # mm per normalised unit, in-plane
    rows = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * (sr / scale))
    cols = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * (sc / scale))
    shapes = _mr_shapes(rng) if kind == "mr" else _ct_shapes(rng)
    spec = lesion if isinstance(lesion, dict) else None
    if kind == "xray":
        return _make_xray(rng, shapes, rows, cols, (sr, sc), scale, lesion, spec, noise, seed)

    background = AIR_HU if kind == "ct" else MR_BACKGROUND
    found = None
    for _ in range(30 if lesion else 1):
        if lesion:  # plan first so that the slice goes through the lesion's centre
            found, value, r = _plan_lesion(kind, rng, shapes, spec)
            z0 = found.center[2]
        else:
            z0 = rng.uniform(-0.1, 0.4) if kind == "mr" else (-0.35, -0.12, 0.5)[int(rng.integers(3))]
        u = [np.broadcast_to(cols[None, :], (h, w)), np.broadcast_to(rows[:, None], (h, w)),
             np.full((h, w), z0, np.float32)]
        scene = _Scene(shapes, u, background)
        if not lesion:
            break
        found.radius_mm = float(r * scale)
        radii = (max(r * scale, 1.5 * sc) / scale, max(r * scale, 1.5 * sr) / scale, r)
        if scene.add(Shape("tumor", found.center, radii, float(value), found.organ)).any():
            break
    else:
        raise MedCLIPSAMError("could not place a lesion in this 2D phantom; use a larger size or lesion=False")
    img = _finish(scene.values(), kind, rng, noise, 0.5, u)
    labels = scene.labels()
    captions = [_describe_slice(kind, "axial", labels, found, _lesion_radius(labels, (sr, sc), scale))]
    if found is not None:
        captions += _volume_captions(kind, found)[1:]
    return Phantom2D(kind, img, labels, captions[0], captions, found, (sr, sc), seed)


def _make_xray(rng, shapes, rows, cols, spacing, scale, lesion, spec, noise, seed, depth=32):
    """A frontal chest radiograph: CT attenuation integrated along A-P through the phantom."""
    h, w = rows.size, cols.size
    z = np.float32(0.4) - rows                                   # row 0 superior; chest centred at z = 0.4
    y = np.linspace(-1, 1, depth, dtype=np.float32)
    u = [np.broadcast_to(cols[None, None, :], (h, depth, w)), np.broadcast_to(y[None, :, None], (h, depth, w)),
         np.broadcast_to(z[:, None, None], (h, depth, w))]
    scene = _Scene(shapes, u, AIR_HU)
    found = None
    if lesion:
        voxel_mm = (spacing[1], scale * 2 / depth, spacing[0])  # along L-R (columns), A-P, S-I (rows)
        found = _add_lesion(scene, "xray", rng, spec, (scale, scale, scale), voxel_mm)
    mu = np.clip((scene.values() + 1000.0) / 1000.0, 0, None)     # attenuation relative to water
    path = mu.sum(axis=1) * np.float32(2.0 / depth)              # line integral in normalised units
    img = 1.0 - np.exp(-1.1 * path)                               # dense = bright, as radiographs are shown
    img = _finish(img.astype(np.float32), "xray", rng, noise, 0.7)
    img = np.clip(img, 0.0, 1.0)
    labels = {n: m.any(axis=1).astype(np.uint8) for n, m in scene.labels().items()
              if n in ("left lung", "right lung", "heart", "tumor")}
    captions = [_describe_slice("xray", "frontal", labels, found, _lesion_radius(labels, spacing, scale))]
    captions += _volume_captions("xray", found)
    return Phantom2D("xray", img, labels, captions[0], captions, found, tuple(spacing), seed)


def _lesion_radius(labels, spacing_mm, scale_mm):
    """Equivalent radius of the lesion's visible cross-section, in normalised units."""
    if "tumor" not in labels:
        return 0.0
    area = float(labels["tumor"].sum()) * spacing_mm[0] * spacing_mm[1]
    return float(np.sqrt(area / np.pi)) / scale_mm


def slice_caption(phantom, index, axis="axial"):
    """Caption of one axial / coronal / sagittal slice of a 3D phantom, from the labels visible in it.

    `index` counts along the numpy axis that `MedCLIPSAMLib.io.slicing_axis(phantom.image, axis)` returns.
    """
    from .io.geometry import patient_axes, slicing_axis

    array_axis = slicing_axis(phantom.image, axis)
    n = phantom.image.GetSize()[2 - array_axis]
    if not 0 <= index < n:
        raise MedCLIPSAMError(f"slice {index} is out of range: the {axis} axis has {n} slices")
    cut = {name: np.take(m, index, axis=array_axis) for name, m in phantom.labels.items()}
    spacing = list(phantom.image.GetSpacing())
    del spacing[2 - array_axis]
    axes = patient_axes(phantom.image)
    in_plane = [phantom.scale_mm[p] for p in range(3) if axes[p] != 2 - array_axis]
    scale = float(np.sqrt(in_plane[0] * in_plane[1]))
    return _describe_slice(phantom.kind, axis, cut, phantom.lesion, _lesion_radius(cut, spacing, scale))
