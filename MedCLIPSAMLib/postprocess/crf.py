"""Dense CRF (pydensecrf) turning a saliency map in [0, 1] into a binary mask (MedCLIP-SAM v1).

Unary energies from the saliency s (as MedCLIP-SAM defines them):
    U_fg = -log(s + eps)     / (tau * sigmoid(s))
    U_bg = -log(1 - s + eps) / (tau * sigmoid(1 - s))
tau = 1.05 and eps = 1e-8 (the released code's defaults; the paper gives no value for eps, which only
keeps log finite at s = 0 or 1). Pairwise terms: Gaussian sxy 3, compat 3; bilateral sxy 60, srgb 5,
compat 5; one mean-field iteration. The bilateral term runs on the grayscale slice itself, repeated into
three channels because pydensecrf wants an RGB image; the released code used a colour-mapped overlay,
which lets the saliency leak into the image term.
"""

import numpy as np

from ..errors import MedCLIPSAMError

EPSILON = 1e-8
TAU = 1.05


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def crf_unary(saliency, tau=TAU, eps=EPSILON):
    """2 x N float32 unary energies for pydensecrf: row 0 background, row 1 foreground (N = H*W, C order)."""
    s = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float64)), 0.0, 1.0).ravel()
    unary = np.empty((2, s.size), dtype=np.float32)
    unary[0] = -np.log(1.0 - s + eps) / (tau * _sigmoid(1.0 - s))
    unary[1] = -np.log(s + eps) / (tau * _sigmoid(s))
    return unary


def _gray_to_uint8(image_gray):
    g = np.asarray(image_gray)
    if g.ndim == 3 and g.shape[2] == 3:  # an RGB rendering of a grey slice: take one channel
        g = g[:, :, 0]
    if g.dtype != np.uint8:
        from ..imageops import normalize_to_uint8

        g = normalize_to_uint8(g, modality="other")
    return g


def crf_refine(
    saliency,
    image_gray,
    tau=TAU,
    iterations=1,
    gaussian_sxy=3,
    gaussian_compat=3,
    bilateral_sxy=60,
    bilateral_srgb=5,
    bilateral_compat=5,
    eps=EPSILON,
):
    """Binary mask (HxW bool) from a saliency map and the grayscale image of the same HxW.

    image_gray: uint8 HxW (other dtypes are stretched to uint8 by robust percentiles).
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise MedCLIPSAMError(
            "CRF post-processing needs the package pydensecrf2; install it with: pip install pydensecrf2"
        ) from exc
    s = np.asarray(saliency)
    gray = _gray_to_uint8(image_gray)
    if s.ndim != 2 or gray.shape != s.shape:
        raise MedCLIPSAMError(
            f"CRF needs a 2D saliency map and an image of the same size, got {s.shape} and {gray.shape}"
        )
    h, w = s.shape
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(crf_unary(s, tau, eps)))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    rgb = np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    q = np.asarray(crf.inference(int(iterations)))
    return (q[1] > q[0]).reshape(h, w)
