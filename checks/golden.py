"""Golden-image check: the release's golden prompt and seed must still draw the reference.

Renders with the version's own generation config and compares with the
reference PNG committed in the repo by pHash distance, SSIM and PSNR, each
against the release's threshold. On failure the produced image and a
side-by-side comparison travel back as artifacts for the controller to save.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from checks import imagecompare
from checks.report import CheckResult
from serving.generator import PipelineRunner, png, resolve


def render(runner: PipelineRunner, golden: dict[str, Any], generation: dict[str, Any]) -> bytes:
    request = resolve({"prompt": golden["prompt"], "seed": golden["seed"]}, generation)
    return runner.run([request])[0]["images"][0]


def run(runner: PipelineRunner, golden: dict[str, Any] | None, generation: dict[str, Any], reference: bytes | None) -> tuple[CheckResult, dict[str, str]]:
    if golden is None:
        return CheckResult("golden", "skipped", "no checks.golden configured"), {}
    started = time.monotonic()
    if reference is None:
        message = f"reference {golden['reference']} is not in the repo at this commit; create it with `diffops golden RELEASE --write` and commit it"
        return CheckResult("golden", "failed", message), {}
    produced_png = render(runner, golden, generation)
    produced, expected = imagecompare.load(produced_png), imagecompare.load(reference)
    if produced.size != expected.size:
        message = f"produced {produced.size[0]}x{produced.size[1]}, reference is {expected.size[0]}x{expected.size[1]}; regenerate the reference"
        return CheckResult("golden", "failed", message, {"size": list(produced.size)}), {"golden-produced.png": base64.b64encode(produced_png).decode()}
    distance = imagecompare.phash_distance(produced, expected)
    ssim = imagecompare.ssim(produced, expected)
    psnr = imagecompare.psnr(produced, expected)
    figures = {"phash_distance": distance, "ssim": round(ssim, 4), "psnr_db": None if psnr == float("inf") else round(psnr, 2)}
    thresholds = {"max_phash_distance": golden["max_phash_distance"], "min_ssim": golden["min_ssim"], "min_psnr_db": golden.get("min_psnr_db")}
    problems = []
    if distance > golden["max_phash_distance"]:
        problems.append(f"phash distance {distance} > {golden['max_phash_distance']}")
    if ssim < golden["min_ssim"]:
        problems.append(f"SSIM {ssim:.3f} < {golden['min_ssim']}")
    if golden.get("min_psnr_db") is not None and psnr < golden["min_psnr_db"]:
        problems.append(f"PSNR {psnr:.1f} dB < {golden['min_psnr_db']} dB")
    seconds = time.monotonic() - started
    summary = f"phash distance {distance}, SSIM {ssim:.3f}, PSNR {figures['psnr_db'] if figures['psnr_db'] is not None else 'inf'} dB"
    if not problems:
        return CheckResult("golden", "passed", summary, figures, thresholds, seconds), {}
    comparison = png(imagecompare.side_by_side(expected, produced))
    artifacts = {"golden-produced.png": base64.b64encode(produced_png).decode(), "golden-compare.png": base64.b64encode(comparison).decode()}
    return CheckResult("golden", "failed", "; ".join(problems) + f" ({summary})", figures, thresholds, seconds), artifacts
