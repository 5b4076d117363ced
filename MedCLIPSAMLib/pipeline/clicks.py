"""Clicks in patient space -> a slice of the slicing axis and pixels of its radiological view and of SAM2's square.

Points arrive in patient millimetres: RAS as Slicer gives them (markups, ROI corners), LPS as ITK files
store them; the caller says which (`frame`). They go through the volume's own geometry (the inverse of
io.geometry.index_to_lps_matrix) to a continuous voxel index, land on the nearest slice of the slicing
axis, and are then laid out by pipeline.slices.SliceView's own layout (which numpy axis runs down the rows
and across the columns, and which is flipped), so a point lands on the pixel that holds its voxel in
`SliceView.get(volume, k)`, on any grid: oblique, anisotropic, permuted, LPS- or RAS-stored.

Pixel convention (SAM2's API and the pipeline's own prompts, postprocess.prompts): a point is (x, y) =
(column, row) with pixel centres on integers; a box is [x0, y0, x1, y1] with x1 = last column + 1, as
`bounding_box` makes it. Points snap to the pixel they fall in (the mask is defined per pixel, and the
component along the slicing axis is dropped anyway). `SlicePrompt.sam_prompts(pad)` moves them into the
padded square with sam_refine.shift_prompts, exactly as the pipeline moves its own prompts.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import MedCLIPSAMError
from ..io.geometry import index_to_lps_matrix
from .sam_refine import shift_prompts
from .slices import SliceView

FRAMES = ("RAS", "LPS")
# the Slicer view that shows each slicing axis in its default layout (for the error message)
SLICER_VIEWS = {"axial": "Red", "coronal": "Green", "sagittal": "Yellow"}


def to_lps(points, frame):
    """(N, 3) float array of points in LPS millimetres; `frame` says what they are given in (RAS or LPS)."""
    if frame not in FRAMES:
        raise MedCLIPSAMError(f"unknown coordinate frame '{frame}'; choose RAS (Slicer) or LPS (ITK files)")
    p = np.asarray(points, dtype=float)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 3 or not np.isfinite(p).all():
        raise MedCLIPSAMError(f"points must be finite (x, y, z) triples, got an array of shape {np.shape(points)}")
    if frame == "RAS":  # RAS -> LPS: the first two axes point the other way
        p = p * np.array([-1.0, -1.0, 1.0])
    return p


def continuous_index(image, points, frame):
    """(N, 3) continuous voxel index (x, y, z order; voxel centres on integers) of patient points."""
    lps = to_lps(points, frame)
    m = index_to_lps_matrix(image)
    return np.linalg.solve(m[:3, :3], (lps - m[:3, 3]).T).T


@dataclass(frozen=True)
class SlicePixels:
    """Where points land: the slice along the view's slicing axis, and (row, col) in its displayed image."""

    slice_index: np.ndarray   # (N,) int: nearest slice of each point
    rows: np.ndarray          # (N,) int: row in SliceView.get(volume, k)
    cols: np.ndarray          # (N,) int: column
    offset: np.ndarray        # (N,) float: signed distance from the slice centre, in slices


def map_points(image, points, view="axial", frame="RAS", slice_view=None):
    """SlicePixels of `points` (N x 3, patient mm in `frame`) in the `view` slices of `image`.

    A point outside the volume (beyond the outer voxels' half-width) raises one sentence."""
    sv = slice_view or SliceView(image, view)
    idx = continuous_index(image, points, frame)
    size = np.array(image.GetSize())
    # floor(x + 0.5): one rule for ties, the same on every axis (np.round would round half to even)
    nearest = np.floor(idx + 0.5).astype(int)
    outside = np.any((nearest < 0) | (nearest >= size), axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        given = ", ".join(f"{v:.1f}" for v in np.atleast_2d(np.asarray(points, float))[i])
        raise MedCLIPSAMError(
            f"the point ({given}) {frame} lies outside the volume (voxel index "
            f"{tuple(round(float(v), 1) for v in idx[i])}, size {tuple(int(n) for n in size)}); "
            "place it on the volume's own voxels")
    zyx = nearest[:, ::-1]                      # numpy order: index axis c is numpy axis 2 - c
    shape = np.array(sv.shape)
    rows = zyx[:, sv.row_axis]
    cols = zyx[:, sv.col_axis]
    if sv.flip_rows:
        rows = shape[sv.row_axis] - 1 - rows
    if sv.flip_cols:
        cols = shape[sv.col_axis] - 1 - cols
    along = idx[:, ::-1][:, sv.axis]
    k = zyx[:, sv.axis]
    return SlicePixels(k, rows, cols, along - k)


@dataclass(frozen=True)
class SlicePrompt:
    """A refine request on one slice, in the slice's displayed pixels (see the module docstring)."""

    view: str
    slice_index: int
    positive: np.ndarray      # (P, 2) float32 (x, y), may be empty
    negative: np.ndarray      # (Q, 2) float32 (x, y), may be empty
    box: np.ndarray = None    # (4,) float32 [x0, y0, x1, y1] or None

    @property
    def has_points(self):
        return len(self.positive) + len(self.negative) > 0

    def sam_prompts(self, pad):
        """{"points", "labels", "boxes"} in the padded square of `pad` (a preprocess.PadInfo), as SAM2's
        predict takes them (points None when there are none, boxes 1 x 4 or None)."""
        points = labels = None
        if self.has_points:
            points = np.concatenate([self.positive, self.negative]).astype(np.float32)
            labels = np.array([1] * len(self.positive) + [0] * len(self.negative), np.int32)
        boxes = None if self.box is None else self.box[None].astype(np.float32)
        out = shift_prompts({"boxes": boxes, "points": points, "labels": labels}, pad.left, pad.top)
        return out


def _checked(points, frame):
    to_lps(points, frame)  # validates shape, finiteness and frame
    return np.atleast_2d(np.asarray(points, dtype=float))


def _plane_tilt(image, sv, normal_lps):
    """How far (in slices) a view plane with this normal drifts off one slice across the volume's extent."""
    m = index_to_lps_matrix(image)[:3, :3]
    size = np.array(image.GetSize(), float)
    k_axis = 2 - sv.axis                        # index axis the slices step along
    step = m[:, k_axis]                         # one slice, in mm
    n = normal_lps / np.linalg.norm(normal_lps)
    denom = abs(float(n @ step))
    if denom < 1e-12:
        return np.inf
    in_plane = [a for a in range(3) if a != k_axis]
    # the plane's height (in slices) changes by n.v / n.step along an in-plane vector v: worst corner
    reach = sum(abs(float(n @ m[:, a])) * (size[a] - 1) / 2 for a in in_plane)
    return reach / denom


def slice_prompt(image, view="axial", positive=(), negative=(), box=None, frame="RAS", plane_normal=None,
                 slice_view=None):
    """SlicePrompt of points and/or a box (two opposite corners) given in patient mm (`frame`).

    All of them must fall on one slice of the `view` slicing axis. `plane_normal` (optional, same frame):
    the normal of the slice view they were placed in; a view not aligned with the volume's slices is refused
    even for a single point (Slicer: the slice node's SliceToRAS third column)."""
    sv = slice_view or SliceView(image, view)
    # kept in the caller's frame, so an error names the point as it was given
    groups = [np.zeros((0, 3)) if len(g) == 0 else _checked(g, frame) for g in (positive, negative)]
    corners = np.zeros((0, 3)) if box is None else _checked(box, frame)
    if box is not None and len(corners) != 2:
        raise MedCLIPSAMError(f"a box is given by two opposite corners, got {len(corners)} points")
    everything = np.concatenate(groups + [corners])
    if len(everything) == 0:
        raise MedCLIPSAMError("a refine request needs at least one point or a box; nothing was changed")
    where = f"a view showing the volume's {view} slices (in Slicer the {SLICER_VIEWS[view]} view, " \
            "with 'Rotate to volume plane' for an oblique volume)"
    if plane_normal is not None:
        normal = to_lps(plane_normal, frame)[0]
        if _plane_tilt(image, sv, normal) >= 0.5:
            raise MedCLIPSAMError(f"the view the points were placed in is not aligned with the volume's {view} "
                                  f"slices; place them in {where}")
    px = map_points(image, everything, frame=frame, slice_view=sv)
    slices = sorted(set(px.slice_index.tolist()))
    if len(slices) > 1:
        raise MedCLIPSAMError(
            f"the points fall on different {view} slices ({', '.join(map(str, slices))}), "
            f"as from a view not aligned with the volume; place them in {where}")
    xy = np.stack([px.cols, px.rows], axis=1).astype(np.float32)
    n_pos, n_neg = len(groups[0]), len(groups[1])
    bx = None
    if box is not None:
        c = xy[n_pos + n_neg:]
        lo, hi = c.min(axis=0), c.max(axis=0)
        bx = np.array([lo[0], lo[1], hi[0] + 1, hi[1] + 1], np.float32)  # both corner pixels inside
    return SlicePrompt(view, int(px.slice_index[0]), xy[:n_pos], xy[n_pos:n_pos + n_neg], bx)
