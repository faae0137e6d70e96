"""Image similarity for the golden check: perceptual hash distance, SSIM, PSNR. Pure numpy/scipy.

pHash: 32×32 grayscale, 2-D DCT, the 8×8 lowest frequencies against their
median -> 64 bits; distance is the Hamming distance. SSIM: Wang et al. (2004)
on luminance with an 11×11 Gaussian window (σ 1.5). PSNR in dB over RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.ndimage import gaussian_filter


def load(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def phash(image: Image.Image) -> np.ndarray:
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(gray, norm="ortho")[:8, :8].flatten()
    return low[1:] > np.median(low[1:])  # the DC term says only how bright the image is


def phash_distance(a: Image.Image, b: Image.Image) -> int:
    return int(np.count_nonzero(phash(a) != phash(b)))


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def ssim(a: Image.Image, b: Image.Image) -> float:
    x, y = _luma(a), _luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda img: gaussian_filter(img, sigma=1.5, truncate=3.5)  # noqa: E731 - an 11x11 window
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def side_by_side(reference: Image.Image, produced: Image.Image) -> Image.Image:
    """Reference | produced | amplified absolute difference, for a person to look at."""
    produced = produced.resize(reference.size)
    diff = np.abs(np.asarray(reference, dtype=np.int16) - np.asarray(produced, dtype=np.int16))
    diff_image = Image.fromarray(np.clip(diff * 4, 0, 255).astype(np.uint8))
    canvas = Image.new("RGB", (reference.width * 3 + 8, reference.height), "white")
    for i, panel in enumerate((reference, produced, diff_image)):
        canvas.paste(panel, (i * (reference.width + 4), 0))
    return canvas
