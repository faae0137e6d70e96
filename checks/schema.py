"""The gate's part of the release schema: which checks a version must pass.

The artifact and dependency checks always run; `golden` and `performance` run
when configured. `controller.parse.release` composes this into a `Release`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import PurePosixPath

from pydantic import Field, field_validator

from serving.fields import Duration, SpecModel

__all__ = ["ChecksSpec", "GoldenCheck", "PerformanceCheck"]


class GoldenCheck(SpecModel):
    prompt: str = Field(min_length=1, max_length=2000)
    """Prompt rendered with the release's generation config."""
    seed: int = Field(ge=0, le=2**32 - 1)
    """Seed that makes the golden image reproducible."""
    reference: str
    """Reference PNG, a path relative to the repo root (e.g. releases/golden/demo.png)."""
    max_phash_distance: int = Field(default=8, ge=0, le=64)
    """Largest perceptual-hash Hamming distance to the reference."""
    min_ssim: float = Field(default=0.9, ge=-1, le=1)
    """Smallest structural similarity (SSIM) to the reference."""
    min_psnr_db: float | None = Field(default=None, ge=0)
    """Smallest PSNR in dB to the reference; unset skips it."""

    @field_validator("reference")
    @classmethod
    def _inside_repo(cls, reference: str) -> str:
        path = PurePosixPath(reference)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{reference!r}: give a path inside the repo, relative to its root")
        if path.suffix.lower() != ".png":
            raise ValueError(f"{reference!r}: the reference must be a .png file")
        return reference


class PerformanceCheck(SpecModel):
    requests: int = Field(default=8, ge=1, le=10_000)
    """Requests sent to the new version."""
    concurrency: int = Field(default=2, ge=1, le=256)
    """Requests in flight at once."""
    max_p95_latency_s: float = Field(gt=0, allow_inf_nan=False)
    """Largest acceptable p95 latency, seconds."""
    max_peak_memory_gb: float | None = Field(default=None, gt=0)
    """Largest peak GPU memory (or RSS on CPU), GB."""
    min_images_per_s: float | None = Field(default=None, gt=0)
    """Smallest acceptable throughput; unset skips it."""


class ChecksSpec(SpecModel):
    golden: GoldenCheck | None = None
    """Golden-image comparison; unset skips it."""
    performance: PerformanceCheck | None = None
    """Latency / memory / throughput check; unset skips it."""
    timeout: Duration = timedelta(minutes=10)
    """Wall-clock limit of each check."""
