"""The golden check's comparison and decoding, checked against the metrics' published definitions.

Expected figures come from outside `checks.imagecompare`: hand-computed values,
and pHash / SSIM / PSNR recomputed here with plain numpy/scipy from their
definitions (imagehash's pHash, scikit-image's SSIM defaults, 10·log10(255²/MSE)).
Decoding is driven with crafted decompression bombs and files at the caps.
"""

from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw
from scipy.fft import dct

from checks import golden, imagecompare

ROOT = Path(__file__).resolve().parents[1]
DEMO_THRESHOLDS = {"prompt": "a red cube", "seed": 42, "reference": "releases/golden/demo.png", "max_phash_distance": 8, "min_ssim": 0.9}


# --- images --------------------------------------------------------------------------------------------------------

def scene(n: int = 128) -> Image.Image:
    """A smooth gradient with two shapes: the kind of picture pHash and SSIM are made for."""
    y, x = np.mgrid[0:n, 0:n]
    base = np.stack([40 + x * 120 // n, 60 + y * 100 // n, 150 - (x + y) * 60 // (2 * n)], axis=2).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 24, 70, 74), fill=(200, 40, 40))
    draw.rectangle((80, 60, 115, 110), fill=(30, 160, 60))
    return image


def shifted(image: Image.Image, k: int) -> Image.Image:
    """Moved k pixels right and down, the edge repeated (no wrap-around)."""
    a = np.asarray(image)
    return Image.fromarray(np.pad(a, ((k, 0), (k, 0), (0, 0)), mode="edge")[: a.shape[0], : a.shape[1]])


def noised(image: Image.Image, sigma: float, seed: int = 7) -> Image.Image:
    a = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(a + np.random.default_rng(seed).normal(0, sigma, a.shape).round(), 0, 255).astype(np.uint8))


def different(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.ROTATE_90)


def solid(value: int, n: int = 32) -> Image.Image:
    return Image.new("RGB", (n, n), (value, value, value))


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


# --- the definitions, recomputed independently ---------------------------------------------------------------------

def reference_phash_bits(image: Image.Image) -> np.ndarray:
    """imagehash's documented pHash: 32x32 Lanczos grayscale, unnormalised DCT-II both ways, 8x8 low block > median."""
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(gray, type=2, axis=0), type=2, axis=1)[:8, :8]
    return (low > np.median(low)).flatten()


def reference_ssim(a: Image.Image, b: Image.Image) -> float:
    """scikit-image's SSIM defaults, window by window: 7x7 windows wholly inside, sample (co)variance, mean of R, G, B."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for channel in range(3):
        x = sliding_window_view(np.asarray(a, dtype=np.float64)[:, :, channel], (7, 7)).reshape(-1, 49)
        y = sliding_window_view(np.asarray(b, dtype=np.float64)[:, :, channel], (7, 7)).reshape(-1, 49)
        mx, my = x.mean(axis=1), y.mean(axis=1)
        vx, vy = x.var(axis=1, ddof=1), y.var(axis=1, ddof=1)
        cov = ((x - mx[:, None]) * (y - my[:, None])).sum(axis=1) / 48
        index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        per_channel.append(index.mean())
    return float(np.mean(per_channel))


def reference_psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


# --- the comparison ------------------------------------------------------------------------------------------------

def test_identical_images():
    image = scene()
    assert imagecompare.phash_distance(image, image.copy()) == 0
    assert imagecompare.ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-12)
    assert imagecompare.psnr(image, image.copy()) == math.inf
    problems, figures, _ = golden.compare(image, image.copy(), {**DEMO_THRESHOLDS, "min_psnr_db": 60})
    assert problems == []
    assert figures["psnr_db"] is None  # +inf has no JSON; the summary prints "inf"


def test_hand_computed_constant_images():
    # Every 7x7 window: means 100 and 110, no variance: SSIM = (2·100·110 + C1) / (100² + 110² + C1), C1 = (0.01·255)².
    c1 = (0.01 * 255) ** 2
    assert imagecompare.ssim(solid(100), solid(110)) == pytest.approx((22000 + c1) / (22100 + c1), abs=1e-9)  # 0.99548
    # MSE 10² = 100: PSNR = 10·log10(65025 / 100) = 28.131 dB.
    assert imagecompare.psnr(solid(100), solid(110)) == pytest.approx(28.1308, abs=1e-4)
    assert imagecompare.phash_distance(solid(100), solid(110)) == 0  # pHash ignores brightness


@pytest.mark.parametrize("image", [scene(), noised(scene(), 10), different(scene()), solid(90)], ids=["scene", "noised", "rotated", "solid"])
def test_phash_is_imagehash_standard_64_bits(image):
    hashed = imagecompare.phash(image)
    assert hashed.hash.size == 64
    assert (hashed.hash.flatten() == reference_phash_bits(image)).all()
    assert len(str(hashed)) == 16  # the usual 16 hex digits


CASES = [
    # (case, altered image, pHash distance bounds, passes max_phash_distance 8?, passes min_ssim 0.9?)
    ("shifted 2 px", shifted(scene(), 2), (1, 8), True, False),
    ("noised sigma 10", noised(scene(), 10), (0, 8), True, False),
    ("noised sigma 2", noised(scene(), 2), (0, 4), True, True),
    ("different (rotated)", different(scene()), (20, 64), False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_altered_images_against_the_definitions(case):
    _, other, (low, high), phash_ok, ssim_ok = case
    image = scene()
    expected_distance = int(np.count_nonzero(reference_phash_bits(image) != reference_phash_bits(other)))
    distance, ssim, psnr = imagecompare.phash_distance(image, other), imagecompare.ssim(image, other), imagecompare.psnr(image, other)
    assert distance == expected_distance and low <= distance <= high
    assert ssim == pytest.approx(reference_ssim(image, other), abs=1e-9)
    assert psnr == pytest.approx(reference_psnr(image, other), abs=1e-9)
    problems, figures, thresholds = golden.compare(other, image, DEMO_THRESHOLDS)
    assert (distance <= 8) is phash_ok and (ssim >= 0.9) is ssim_ok
    assert any(p.startswith("phash distance") for p in problems) is (not phash_ok)
    assert any(p.startswith("SSIM") for p in problems) is (not ssim_ok)
    assert figures["phash_distance"] == distance and thresholds["max_phash_distance"] == 8


def test_gaussian_noise_psnr_is_what_sigma_predicts():
    # Noise of standard deviation 10 (no clipping: the scene stays within 30..200): MSE ≈ 100 + 1/12 (rounding).
    assert imagecompare.psnr(scene(), noised(scene(), 10)) == pytest.approx(10 * math.log10(255**2 / (100 + 1 / 12)), abs=0.3)


def test_psnr_threshold_is_enforced_in_db():
    problems, figures, _ = golden.compare(noised(scene(), 2), scene(), {**DEMO_THRESHOLDS, "min_psnr_db": 45})
    assert problems == [f"PSNR {reference_psnr(scene(), noised(scene(), 2)):.1f} dB < 45 dB"]
    assert 40 < figures["psnr_db"] < 45  # σ 2: 10·log10(65025 / 4.08) ≈ 42.0 dB


# --- decoding untrusted PNGs ---------------------------------------------------------------------------------------

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, rows: int | None = None, extra: bytes = b"") -> bytes:
    """An RGB 8-bit PNG declaring width x height, with `rows` rows of zeros (all of them if None), compressed hard."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b"")


class RecordingRunner:
    """The pipeline boundary: returns a fixed PNG and counts calls."""

    def __init__(self, produced: bytes):
        self.produced, self.calls = produced, 0

    def run(self, requests):
        self.calls += 1
        return [{"images": [self.produced]} for _ in requests]


GENERATION = {"sampler": "ddim", "steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64, "negative_prompt": "", "seed": None}


def test_declared_dimensions_bomb_fails_before_rendering():
    bomb = crafted_png(100_000, 100_000, rows=4)  # 30 GB of pixels declared, a few hundred bytes on disk
    assert len(bomb) < 2000
    runner = RecordingRunner(png_bytes(scene(64)))
    result, artifacts = golden.run(runner, DEMO_THRESHOLDS, GENERATION, bomb)
    assert result.outcome == "failed" and artifacts == {}
    assert "reference releases/golden/demo.png declares 100000x100000" in result.message
    assert "the cap is 4,194,304 (2048x2048)" in result.message and "diffops golden" in result.message
    assert runner.calls == 0


def test_real_zlib_bomb_is_refused_without_allocating(tmp_path):
    # 8000x8000 RGB: PIL itself would decode it (64 M pixels is under its own bomb limit) into 192 MB, and SSIM
    # over two of them would need ~9 GB; the file is ~190 KB.
    bomb = crafted_png(8000, 8000)
    assert len(bomb) < 400_000
    with Image.open(io.BytesIO(bomb)) as image:  # a valid PNG: PIL reads its header without complaint
        assert image.size == (8000, 8000)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    script = ("import sys; from pathlib import Path; from checks import golden\n"
              "try:\n    golden.decode_png(Path(sys.argv[1]).read_bytes())\nexcept golden.ImageRefused as err:\n    print(err)\n"
              "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    message, maxrss_kb = done.stdout.strip().splitlines()
    assert message == "declares 8000x8000 = 64,000,000 pixels; the cap is 4,194,304 (2048x2048)"
    assert int(maxrss_kb) < 192_000  # peak RSS (VmHWM, KiB) less than the decoded image alone would take


def test_reference_at_the_caps_passes(tmp_path):
    # 2048x2048 of RGB noise: the pixel cap exactly, and (incompressible) about 12 MB on disk.
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (2048, 2048, 3), dtype=np.uint8))
    reference = png_bytes(noise, compress_level=1)
    assert 8_000_000 < len(reference) <= golden.MAX_PNG_BYTES
    started = time.monotonic()
    result, _ = golden.run(RecordingRunner(reference), DEMO_THRESHOLDS, {**GENERATION, "width": 2048, "height": 2048}, reference)
    assert result.outcome == "passed", result.message
    assert result.figures["phash_distance"] == 0 and result.figures["ssim"] == 1.0 and result.figures["psnr_db"] is None
    assert time.monotonic() - started < 60


def test_one_pixel_row_over_the_cap_is_refused():
    over = png_bytes(Image.new("RGB", (2048, 2049), "white"))
    with pytest.raises(golden.ImageRefused, match=r"declares 2048x2049 = 4,196,352 pixels; the cap is 4,194,304"):
        golden.decode_png(over)
    assert golden.decode_png(png_bytes(Image.new("RGB", (2048, 2048), "white"))).size == (2048, 2048)


def test_byte_cap_counts_the_whole_file():
    base = crafted_png(64, 64)
    padding = golden.MAX_PNG_BYTES - len(base) - 12  # a private ancillary chunk brings the file to the cap exactly
    at_cap = crafted_png(64, 64, extra=chunk(b"prVt", b"\x00" * padding))
    assert len(at_cap) == golden.MAX_PNG_BYTES
    assert golden.decode_png(at_cap).size == (64, 64)
    over = crafted_png(64, 64, extra=chunk(b"prVt", b"\x00" * (padding + 1)))
    with pytest.raises(golden.ImageRefused, match=r"is 16,777,217 bytes; the cap is 16,777,216 bytes \(16 MiB\)"):
        golden.decode_png(over)
    assert golden.reference_size_problem(len(over)) is not None and golden.reference_size_problem(len(at_cap)) is None


REFUSED = [
    # (case, bytes, message fragment)
    ("JPEG", lambda: (lambda b: (scene().save(b, format="JPEG"), b.getvalue())[1])(io.BytesIO()), "is not a PNG file"),
    ("empty", lambda: b"", "is not a PNG file"),
    ("signature only", lambda: b"\x89PNG\r\n\x1a\n", "IHDR header chunk is missing"),
    ("zero width", lambda: crafted_png(0, 64), "declares 0x64 pixels, an empty image"),
    ("truncated pixels", lambda: crafted_png(64, 64)[:-40], "is not a readable PNG"),
    ("header checksum wrong", lambda: (lambda b: b[:29] + bytes([b[29] ^ 0xFF]) + b[30:])(crafted_png(64, 64)), "is not a readable PNG"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_unreadable_references_fail_the_check_with_the_cause(case):
    _, make, fragment = case
    runner = RecordingRunner(png_bytes(scene(64)))
    result, _ = golden.run(runner, DEMO_THRESHOLDS, GENERATION, make())
    assert result.outcome == "failed" and fragment in result.message
    assert result.message.startswith("reference releases/golden/demo.png ")
    assert runner.calls == 0


def test_an_oversized_produced_image_fails_the_check_too():
    runner = RecordingRunner(png_bytes(Image.new("RGB", (4096, 2048), "white")))
    result, _ = golden.run(runner, DEMO_THRESHOLDS, GENERATION, png_bytes(scene(64)))
    assert result.outcome == "failed"
    assert result.message.startswith("the produced image declares 4096x2048 = 8,388,608 pixels")


def test_the_committed_demo_reference_decodes():
    image = golden.decode_png((ROOT / "releases" / "golden" / "demo.png").read_bytes())
    assert image.size == (64, 64) and image.mode == "RGB"


def test_decoding_leaves_memory_bounded_at_the_cap():
    """Decode + compare at 2048x2048 stays under 1 GB of peak RSS (SSIM is the largest part, ~0.6 GB)."""
    script = ("import numpy as np; from PIL import Image; from checks import golden, imagecompare\n"
              "a = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2048, 2048, 3), dtype=np.uint8))\n"
              "b = Image.fromarray(np.random.default_rng(2).integers(0, 256, (2048, 2048, 3), dtype=np.uint8))\n"
              "golden.compare(a, b, {'max_phash_distance': 8, 'min_ssim': 0.9})\n"
              "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert int(done.stdout.strip()) < 1_000_000  # KiB
