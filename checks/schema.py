"""The gate's part of the release schema: which checks a version must pass.

The artifact and dependency checks always run; `golden` and `performance` run
when configured. `controller.parse.release` composes this into a `Release`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import PurePosixPath

from pydantic import Field, field_validator

from serving.fields import Duration, SpecModel

__all__ = ["ChecksSpec", "GoldenCheck", "PerformanceCheck", "QualityCheck"]


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
        return _repo_path(reference, (".png",))


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


def _repo_path(path: str, suffixes: tuple[str, ...]) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"{path!r}: give a path inside the repo, relative to its root")
    if pure.suffix.lower() not in suffixes:
        raise ValueError(f"{path!r}: expected a {' or '.join(suffixes)} file")
    return path


class QualityCheck(SpecModel):
    prompts: str
    """The prompt set: a text file in the repo (e.g. releases/prompts/demo.txt), one prompt per line, `#` comments;
    at most 64 prompts (64 KiB)."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=8)
    """Seeds each prompt is drawn with (prompts x seeds images)."""
    min_clip_score: float | None = Field(default=None, ge=0, le=100)
    """Smallest mean CLIP score (0-100, quality.clip's model) over the prompt set; needs quality.clip."""
    max_nsfw_rate: float | None = Field(default=None, ge=0, le=1)
    """Largest share of the prompt set's images the safety checker flags; needs quality.safety."""
    max_distance: float | None = Field(default=None, ge=0)
    """Largest Frechet distance between this version's and the stable version's CLIP image features on the same
    prompts and seeds: a regression distance, not the published FID; needs quality.clip (skipped for a first version)."""

    @field_validator("prompts")
    @classmethod
    def _inside_repo(cls, prompts: str) -> str:
        return _repo_path(prompts, (".txt",))


class ChecksSpec(SpecModel):
    golden: GoldenCheck | None = None
    """Golden-image comparison; unset skips it."""
    performance: PerformanceCheck | None = None
    """Latency / memory / throughput check; unset skips it."""
    quality: QualityCheck | None = None
    """CLIP score, NSFW rate and distance to the stable version on a prompt set; unset skips it."""
    timeout: Duration = timedelta(minutes=10)
    """Wall-clock limit of each check."""
