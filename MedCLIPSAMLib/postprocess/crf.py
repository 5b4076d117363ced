"""Dense CRF turning a saliency map in [0, 1] into a binary mask (MedCLIP-SAM v1).

Unary energies from the saliency s (as MedCLIP-SAM defines them):
    U_fg = -log(s + eps)     / (tau * sigmoid(s))
    U_bg = -log(1 - s + eps) / (tau * sigmoid(1 - s))
tau = 1.05 and eps = 1e-8 (the released code's defaults; the paper gives no value for eps, which only
keeps log finite at s = 0 or 1). Pairwise terms: Gaussian sxy 3, compat 3; bilateral sxy 60, srgb 5,
compat 5; one mean-field iteration. The bilateral term runs on the grayscale slice itself, repeated into
three channels because pydensecrf wants an RGB image; the released code used a colour-mapped overlay,
which lets the saliency leak into the image term.

Two backends compute the same mean-field update. "pydensecrf" (the optional extra `medclipsam[crf]`,
pydensecrf2: published as source only, so it needs a C++ compiler) filters with a permutohedral lattice.
"numpy" (the default when pydensecrf is absent; numpy and scipy only, installs everywhere) filters
exactly: the Gaussian term with scipy's separable filter, the bilateral term on a bilateral grid, which
is exact along the intensity axis because the image is 8-bit and one grey channel. Both follow
densecrf's DenseKernel: symmetric normalisation (k_ij / sqrt(n_i n_j), n = K 1), self term included,
Potts compatibility, Q = softmax(-U + sum_m w_m K_m Q). Agreement on the same maps is measured in
Testing/Python/test_slicer_install.py.
"""

import math

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


def available_backends():
    """The CRF backends usable here: always "numpy"; "pydensecrf" when pydensecrf2 is installed."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return ["numpy"]
    return ["pydensecrf", "numpy"]


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
    backend="auto",
):
    """Binary mask (HxW bool) from a saliency map and the grayscale image of the same HxW.

    image_gray: uint8 HxW (other dtypes are stretched to uint8 by robust percentiles).
    backend: "auto" (pydensecrf when installed, else numpy), "pydensecrf" or "numpy".
    """
    s = np.asarray(saliency)
    gray = _gray_to_uint8(image_gray)
    if s.ndim != 2 or gray.shape != s.shape:
        raise MedCLIPSAMError(
            f"CRF needs a 2D saliency map and an image of the same size, got {s.shape} and {gray.shape}"
        )
    if backend == "auto":
        backend = available_backends()[0]
    if backend not in ("numpy", "pydensecrf"):
        raise MedCLIPSAMError(f"unknown CRF backend '{backend}': use auto, numpy or pydensecrf")
    unary = crf_unary(s, tau, eps)
    h, w = s.shape
    if backend == "numpy":
        q = _mean_field_numpy(unary.reshape(2, h, w), gray, int(iterations), gaussian_sxy, gaussian_compat,
                              bilateral_sxy, bilateral_srgb, bilateral_compat)
        return q[1] > q[0]
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise MedCLIPSAMError(
            "the pydensecrf CRF backend needs pydensecrf2 (pip install 'medclipsam[crf]', which needs a C++ "
            "compiler); the default numpy backend needs nothing extra"
        ) from exc
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    rgb = np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    q = np.asarray(crf.inference(int(iterations)))
    return (q[1] > q[0]).reshape(h, w)


def _softmax(energy):
    e = np.exp(energy - energy.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


class _BilateralGrid:
    """k(i, j) = exp(-|p_i - p_j|^2 / (2 sxy^2) - (g_i - g_j)^2 / (2 sg^2)) applied to an image, for an
    8-bit grey image: one grid cell per grey level (exact in intensity), `step`-pixel cells in space
    (sxy is tens of pixels, so the spatial binning moves a pixel by under a tenth of sxy)."""

    def __init__(self, gray, sxy, sg):
        from scipy import ndimage

        self._ndimage = ndimage
        self.gray = gray.astype(np.intp)
        h, w = gray.shape
        self.step = max(1, int(sxy // 8))
        ys, xs = np.mgrid[0:h, 0:w]
        self.cell = (self.gray, ys // self.step, xs // self.step)
        self.shape = (256, -(-h // self.step), -(-w // self.step))
        centre = (self.step - 1) / 2.0
        self.coords = np.stack([self.gray.astype(np.float64), (ys - centre) / self.step, (xs - centre) / self.step])
        self.sigma = (sg, sxy / self.step, sxy / self.step)

    def __call__(self, values):
        grid = np.zeros(self.shape)
        np.add.at(grid, self.cell, values)
        grid = self._ndimage.gaussian_filter(grid, self.sigma, mode="constant", truncate=4.0)
        return self._ndimage.map_coordinates(grid, self.coords, order=1, mode="nearest")


def _mean_field_numpy(unary, gray, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                      bilateral_compat):
    """Q (2 x H x W) after `iterations` mean-field steps, computed as densecrf does (see the top)."""
    from scipy import ndimage

    def spatial(values):
        return ndimage.gaussian_filter(values, gaussian_sxy, mode="constant", truncate=4.0)

    # the grey value is repeated into three colour channels: their distance is sqrt(3) times one channel's
    bilateral = _BilateralGrid(gray, bilateral_sxy, bilateral_srgb / math.sqrt(3.0))
    ones = np.ones(gray.shape)
    kernels = []
    for weight, apply in ((gaussian_compat, spatial), (bilateral_compat, bilateral)):
        norm = 1.0 / np.sqrt(apply(ones) + 1e-20)
        kernels.append((weight, apply, norm))
    q = _softmax(-unary)
    for _ in range(iterations):
        energy = -unary.astype(np.float64)
        for weight, apply, norm in kernels:
            for label in range(q.shape[0]):
                energy[label] += weight * norm * apply(norm * q[label])
        q = _softmax(energy)
    return q
