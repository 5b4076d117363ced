"""2D image files (PNG, JPEG, TIFF, BMP at any bit depth, or a one-slice file SimpleITK reads) as arrays."""

import os

import numpy as np

from ..errors import MedCLIPSAMError
from .volumes import read_volume


def read_image_2d(path):
    """A 2D image file as a numpy array (grayscale or RGB), any bit depth."""
    if not os.path.isfile(path):
        raise MedCLIPSAMError(f"image file '{path}' does not exist")
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("RGB") if img.mode in ("P", "RGBA", "LA", "CMYK") else img)
    except Exception:
        import SimpleITK as sitk

        volume = read_volume(path)
        array = sitk.GetArrayFromImage(volume)
        if array.shape[0] != 1:
            raise MedCLIPSAMError(f"'{path}' is a 3D volume with {array.shape[0]} slices; use 'medclipsam segment'")
        array = array[0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return array
