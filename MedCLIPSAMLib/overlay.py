"""PNG pictures a person looks at: a mask over its image, a saliency heat map, a volume overview."""

import numpy as np

from .runtime import atomic_output

MASK_COLORS = [(255, 64, 64), (64, 160, 255), (80, 220, 80), (255, 200, 40), (200, 90, 255), (40, 220, 220)]


def heatmap(saliency):
    """[0,1] map -> HxWx3 uint8 with matplotlib's 'jet' colours."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(saliency, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(gray8, masks=(), saliency=None, alpha=0.35):
    """The grayscale image with optional saliency (blended) and each mask filled lightly and outlined."""
    from scipy import ndimage

    rgb = np.repeat(np.asarray(gray8, np.uint8)[..., None], 3, axis=2).astype(np.float32)
    if saliency is not None:
        rgb = (1 - alpha) * rgb + alpha * heatmap(saliency)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, bool)
        color = np.array(MASK_COLORS[i % len(MASK_COLORS)], np.float32)
        rgb[mask] = 0.6 * rgb[mask] + 0.4 * color
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb[edge] = color
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_png(path, array):
    from PIL import Image

    with atomic_output(path, suffix=".png") as tmp:
        Image.fromarray(np.asarray(array)).save(tmp, format="PNG")
