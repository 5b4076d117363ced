"""Slicing a volume along a patient axis, with each slice shown the way a radiologist expects.

Axial slices have anterior at the top and the patient's right on the image's left; coronal and sagittal
slices have superior at the top (sagittal: anterior on the left). The mapping follows the direction
matrix, so permuted, flipped (RAS-stored) and oblique grids give the same picture of the same anatomy.
Slices are views or small copies of the array: the volume is never copied whole.
"""

import numpy as np

from ..io.geometry import VIEW_ROWS, direction_matrix, patient_axes

# per view: (patient axis shown down the rows, its sign), (patient axis shown across the columns, sign);
# LPS patient axes: 0 = towards Left, 1 = towards Posterior, 2 = towards Superior
VIEW_LAYOUT = {
    "axial": ((1, +1), (0, +1)),
    "coronal": ((2, -1), (0, +1)),
    "sagittal": ((2, -1), (1, +1)),
}


class SliceView:
    def __init__(self, image, view="axial"):
        from ..io.geometry import slicing_axis

        self.view = view
        self.axis = slicing_axis(image, view)          # numpy axis (z, y, x order) stepped through
        perm = patient_axes(image)                      # perm[patient axis] = index axis (x=0, y=1, z=2)
        direction = direction_matrix(image)
        (row_p, row_sign), (col_p, col_sign) = VIEW_LAYOUT[view]
        self.row_axis, self.col_axis = 2 - perm[row_p], 2 - perm[col_p]
        # flip when the array runs against the direction the view wants
        self.flip_rows = np.sign(direction[row_p, perm[row_p]]) != row_sign
        self.flip_cols = np.sign(direction[col_p, perm[col_p]]) != col_sign
        remaining = [a for a in range(3) if a != self.axis]
        self.transpose = remaining != [self.row_axis, self.col_axis]
        self.shape = tuple(reversed(image.GetSize()))
        self.count = self.shape[self.axis]
        spacing = tuple(reversed(image.GetSpacing()))   # numpy-order spacing
        self.pixel_spacing = (spacing[self.row_axis], spacing[self.col_axis])
        assert VIEW_ROWS[view] not in (row_p, col_p)

    def get(self, volume, k):
        """Slice k of a (z, y, x) array in display orientation."""
        s = np.take(volume, k, axis=self.axis)
        if self.transpose:
            s = s.T
        if self.flip_rows:
            s = s[::-1]
        if self.flip_cols:
            s = s[:, ::-1]
        return s

    def put(self, volume, k, plane):
        """Write a display-oriented 2D array back into slice k of a (z, y, x) array (in place)."""
        plane = np.asarray(plane)
        if self.flip_cols:
            plane = plane[:, ::-1]
        if self.flip_rows:
            plane = plane[::-1]
        if self.transpose:
            plane = plane.T
        index = [slice(None)] * 3
        index[self.axis] = k
        volume[tuple(index)] = plane
