"""Volume and segmentation I/O with exact geometry (SimpleITK for images, slicerio for .seg.nrrd).

Arrays are always in SimpleITK's numpy order (z, y, x); geometry is LPS as in ITK files.
"""

from .geometry import (
    direction_matrix,
    geometry_equal,
    image_from_array,
    index_to_lps_matrix,
    patient_axes,
    slicing_axis,
)
from .images import read_image_2d
from .segmentation import read_segmentation, write_segmentation
from .volumes import read_volume, write_labelmap, write_volume

__all__ = [
    "read_volume", "write_volume", "write_labelmap", "write_segmentation", "read_segmentation",
    "slicing_axis", "patient_axes", "geometry_equal", "image_from_array", "direction_matrix",
    "index_to_lps_matrix", "read_image_2d",
]
