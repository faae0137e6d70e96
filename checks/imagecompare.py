"""Image similarity for the golden check, in the standard definitions: pHash, SSIM, PSNR.

Pure functions of two decoded, same-size images; `checks.golden` decodes the
PNGs (under its size caps) and compares the figures with the release's thresholds.

- pHash: `imagehash.phash`: grayscale, 32×32 Lanczos, 2-D DCT-II, the 8×8
  lowest frequencies (DC term included) against their median, 64 bits. The
  distance is the Hamming distance of two hashes, 0 (same) to 64.
- SSIM: `skimage.metrics.structural_similarity` on the two 8-bit RGB arrays with
  `channel_axis=2` (SSIM of R, G and B separately, then their mean) and
  `data_range=255`; library defaults otherwise: 7×7 uniform window, sample
  covariance, K1 0.01, K2 0.03, mean over the windows wholly inside the image.
- PSNR: `skimage.metrics.peak_signal_noise_ratio` over every R, G, B value with
  `data_range=255`: 10·log10(255² / MSE) dB; identical images give +inf.
"""

from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["phash", "phash_distance", "psnr", "side_by_side", "ssim"]

DATA_RANGE = 255  # 8-bit channels


def _rgb(image: Image.Image) -> np.ndarray:
    """The image as an H×W×3 uint8 array (alpha dropped, palettes and grayscale expanded)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def phash(image: Image.Image) -> imagehash.ImageHash:
    return imagehash.phash(image)


def phash_distance(a: Image.Image, b: Image.Image) -> int:
    return int(phash(a) - phash(b))


def ssim(a: Image.Image, b: Image.Image) -> float:
    # scikit-image leaves its metrics unannotated
    return float(structural_similarity(_rgb(a), _rgb(b), channel_axis=2, data_range=DATA_RANGE))  # type: ignore[no-untyped-call]


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = _rgb(a), _rgb(b)
    if np.array_equal(x, y):
        return float("inf")  # MSE 0: skimage would divide by zero (and warn) to reach the same answer
    return float(peak_signal_noise_ratio(x, y, data_range=DATA_RANGE))  # type: ignore[no-untyped-call]  # unannotated in skimage


def side_by_side(reference: Image.Image, produced: Image.Image) -> Image.Image:
    """Reference | produced | amplified absolute difference, for a person to look at."""
    reference, produced = reference.convert("RGB"), produced.convert("RGB").resize(reference.size)
    diff = np.abs(_rgb(reference).astype(np.int16) - _rgb(produced).astype(np.int16))
    diff_image = Image.fromarray(np.clip(diff * 4, 0, 255).astype(np.uint8))
    canvas = Image.new("RGB", (reference.width * 3 + 8, reference.height), "white")
    for i, panel in enumerate((reference, produced, diff_image)):
        canvas.paste(panel, (i * (reference.width + 4), 0))
    return canvas
