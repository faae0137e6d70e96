"""Golden-image check: the release's golden prompt and seed must still draw the reference.

Renders with the version's own generation config and compares with the
reference PNG committed in the repo by pHash distance, SSIM and PSNR
(`checks.imagecompare`), each against the release's threshold. The produced
image and a side-by-side comparison travel back as artifacts, pass or fail: the
tracking run logs them, and the controller saves them on failure.

Both PNGs are untrusted bytes: `decode_png` reads them only within
`MAX_PNG_BYTES` and `MAX_PNG_PIXELS` (dimensions read from the PNG header
before anything is decompressed), so a decompression bomb or an oversized file
fails the check with its cause instead of exhausting memory. Whoever moves the
reference to the gate can refuse it early with `reference_size_problem`.
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from typing import Any

from PIL import Image

from checks import imagecompare
from checks.report import CheckResult
from serving.generator import PipelineRunner, png, resolve

__all__ = ["ImageRefused", "MAX_PNG_BYTES", "compare", "decode_png", "reference_size_problem", "render", "run"]

MAX_PNG_BYTES = 16 * 1024 * 1024
"""Largest PNG file accepted (16 MiB): any 2048×2048 8-bit RGB PNG fits, even of pure noise (~12 MiB)."""
MAX_PNG_PIXELS = 2048 * 2048
"""Largest width × height accepted (4,194,304): comparing two such images peaks near 0.6 GB (SSIM)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class ImageRefused(ValueError):
    """A PNG the golden check will not decode; the message names the cause and what to do."""


def reference_size_problem(size: int) -> str | None:
    """Why a reference of `size` bytes is refused before it is read or moved, or None."""
    if size > MAX_PNG_BYTES:
        return f"is {size:,} bytes; the cap is {MAX_PNG_BYTES:,} bytes (16 MiB)"
    return None


def _declared_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR, the first chunk), without decompressing anything."""
    if not data.startswith(PNG_SIGNATURE):
        raise ImageRefused("is not a PNG file (no PNG signature)")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageRefused("is not a valid PNG: the IHDR header chunk is missing")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def decode_png(data: bytes) -> Image.Image:
    """Decode untrusted PNG bytes to RGB within the caps; raises `ImageRefused` saying why not."""
    problem = reference_size_problem(len(data))
    if problem:
        raise ImageRefused(problem)
    width, height = _declared_size(data)
    if width == 0 or height == 0:
        raise ImageRefused(f"declares {width}x{height} pixels, an empty image")
    if width * height > MAX_PNG_PIXELS:
        raise ImageRefused(f"declares {width}x{height} = {width * height:,} pixels; the cap is {MAX_PNG_PIXELS:,} (2048x2048)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            return image.convert("RGB")
    except DECODE_ERRORS as err:
        raise ImageRefused(f"is not a readable PNG ({type(err).__name__}: {err})") from None


def render(runner: PipelineRunner, golden: dict[str, Any], generation: dict[str, Any]) -> bytes:
    request = resolve({"prompt": golden["prompt"], "seed": golden["seed"]}, generation)
    image: bytes = runner.run([request])[0]["images"][0]
    return image


def compare(produced: Image.Image, expected: Image.Image, golden: dict[str, Any]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Problems (empty when every threshold holds), figures and thresholds for two same-size images."""
    distance = imagecompare.phash_distance(produced, expected)
    ssim = imagecompare.ssim(produced, expected)
    psnr = imagecompare.psnr(produced, expected)
    figures = {"phash_distance": distance, "ssim": round(ssim, 4), "psnr_db": None if psnr == float("inf") else round(psnr, 2),
               "phash_produced": str(imagecompare.phash(produced)), "phash_reference": str(imagecompare.phash(expected))}
    thresholds = {"max_phash_distance": golden["max_phash_distance"], "min_ssim": golden["min_ssim"],
                  "min_psnr_db": golden.get("min_psnr_db")}
    problems = []
    if distance > golden["max_phash_distance"]:
        problems.append(f"phash distance {distance} > {golden['max_phash_distance']}")
    if ssim < golden["min_ssim"]:
        problems.append(f"SSIM {ssim:.3f} < {golden['min_ssim']}")
    if golden.get("min_psnr_db") is not None and psnr < golden["min_psnr_db"]:
        problems.append(f"PSNR {psnr:.1f} dB < {golden['min_psnr_db']} dB")
    return problems, figures, thresholds


def run(runner: PipelineRunner, golden: dict[str, Any] | None, generation: dict[str, Any],
        reference: bytes | None) -> tuple[CheckResult, dict[str, str]]:
    if golden is None:
        return CheckResult("golden", "skipped", "no checks.golden configured"), {}
    started = time.monotonic()
    if reference is None:
        message = (f"reference {golden['reference']} is not in the repo at this commit; "
                   "create it with `diffops golden RELEASE --write` and commit it")
        return CheckResult("golden", "failed", message), {}
    try:
        expected = decode_png(reference)
    except ImageRefused as err:
        message = f"reference {golden['reference']} {err}; regenerate it with `diffops golden RELEASE --write` and commit it"
        return CheckResult("golden", "failed", message, {"reference_bytes": len(reference)}), {}
    produced_png = render(runner, golden, generation)
    produced_b64 = {"golden-produced.png": base64.b64encode(produced_png).decode()}
    try:
        produced = decode_png(produced_png)
    except ImageRefused as err:
        message = f"the produced image {err}; lower generation.width/height or render the reference smaller"
        return CheckResult("golden", "failed", message, {"produced_bytes": len(produced_png)}), {}
    if produced.size != expected.size:
        message = (f"produced {produced.size[0]}x{produced.size[1]}, reference is {expected.size[0]}x{expected.size[1]}; "
                   "regenerate the reference")
        return CheckResult("golden", "failed", message, {"size": list(produced.size)}), produced_b64
    problems, figures, thresholds = compare(produced, expected, golden)
    seconds = time.monotonic() - started
    psnr_shown = figures["psnr_db"] if figures["psnr_db"] is not None else "inf"
    summary = f"phash distance {figures['phash_distance']}, SSIM {figures['ssim']:.3f}, PSNR {psnr_shown} dB"
    comparison = png(imagecompare.side_by_side(expected, produced))
    artifacts = {**produced_b64, "golden-compare.png": base64.b64encode(comparison).decode()}  # tracked either way
    if not problems:
        return CheckResult("golden", "passed", summary, figures, thresholds, seconds), artifacts
    return CheckResult("golden", "failed", "; ".join(problems) + f" ({summary})", figures, thresholds, seconds), artifacts
