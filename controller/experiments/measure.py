"""An experiment cell's figures from what was drawn. Pure.

Fourth step of `diffops experiment run`, after `controller.experiments.draw`: latency per image (nearest-rank
p50/p95, as the performance check and the canary analysis), images/s over the cell's wall time, cost per image
(`controller.tracking.runs.usd_per_image` at that throughput), the mean CLIP score when a CLIP model scored the
images, and the mean pHash distance and SSIM to the baseline config's image of the same prompt at the same seed
(`checks.imagecompare`, the golden check's definitions). Metric names are release check figures (DESIGN.md,
"Tracking and registry"), plus `baseline.*`.
"""

from __future__ import annotations

from collections.abc import Sequence

from checks import imagecompare
from checks.golden import decode_png
from controller.experiments.draw import Drawn
from controller.parse.release import Spec
from controller.tracking.runs import usd_per_image
from serving.stats import percentile

__all__ = ["METRICS", "baseline_figures", "cell_metrics", "pixel_difference", "performance_figures"]

METRICS = ("performance.p50_latency_s", "performance.p95_latency_s", "performance.images_per_s", "cost.usd_per_image",
           "quality.mean_clip_score", "baseline.phash_distance", "baseline.ssim")


def performance_figures(drawn: Drawn) -> dict[str, float]:
    latencies = list(drawn.latencies)
    return {
        "performance.p50_latency_s": round(percentile(latencies, 50) or 0.0, 4),
        "performance.p95_latency_s": round(percentile(latencies, 95) or 0.0, 4),
        "performance.images_per_s": round(len(latencies) / drawn.wall_s, 3) if drawn.wall_s > 0 else 0.0,
    }


def baseline_figures(images: Sequence[bytes], baseline: Sequence[bytes]) -> dict[str, float]:
    """Mean pHash distance (0 same .. 64) and mean SSIM (1 same) to the baseline's image of each prompt."""
    pairs = [(decode_png(a), decode_png(b)) for a, b in zip(images, baseline, strict=True)]
    distances = [imagecompare.phash_distance(a, b) for a, b in pairs]
    ssims = [imagecompare.ssim(a, b) if a.size == b.size else 0.0 for a, b in pairs]
    return {"baseline.phash_distance": round(sum(distances) / len(distances), 3), "baseline.ssim": round(sum(ssims) / len(ssims), 4)}


def pixel_difference(a: bytes, b: bytes) -> tuple[int, float]:
    """Largest and mean absolute difference of two PNGs' 8-bit RGB values; (255, 255.0) for different sizes."""
    import numpy as np

    x, y = decode_png(a), decode_png(b)
    if x.size != y.size:
        return 255, 255.0
    diff = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
    return int(diff.max()), round(float(diff.mean()), 4)


def cell_metrics(spec: Spec, drawn: Drawn, baseline: Drawn, clip_scores: Sequence[float] | None) -> dict[str, float]:
    """Every metric of one cell (cost and CLIP score only when they can be measured)."""
    metrics = performance_figures(drawn)
    cost = usd_per_image(spec, metrics["performance.images_per_s"])
    if cost is not None:
        metrics["cost.usd_per_image"] = cost
    if clip_scores:
        metrics["quality.mean_clip_score"] = round(sum(clip_scores) / len(clip_scores), 3)
    metrics.update(baseline_figures(drawn.images, baseline.images))
    return metrics
