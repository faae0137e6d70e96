"""Serving's part of the release schema: model, generation, limits, runtime, replicas.

`controller.parse.release` composes these into a `Release`. `rules` holds the
cross-field checks between them; it returns (field path, message) pairs so the
loader can point each at its line in the release file.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import AfterValidator, Field, field_validator

from serving.fields import Digest, ImageRef, SpecModel
from serving.samplers import SamplerName

__all__ = ["REGISTRY_SCHEME", "REGISTRY_URI", "ClipSpec", "FaultsSpec", "GenerationSpec", "IngressSpec", "LimitsSpec", "MODEL_SCHEMES",
           "ModelSpec", "QualitySpec", "ReplicasSpec", "ReviewSpec", "RuntimeSpec", "SafetySpec", "rules"]

MODEL_SCHEMES = ("file://", "s3://", "gs://", "az://", "abfs://", "hf://")
REGISTRY_SCHEME = "models:/"  # a registered model version, resolved by the controller (never by replicas)
REGISTRY_URI = re.compile(r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,255})"
                          r"(?:@(?P<alias>[A-Za-z_][A-Za-z0-9_-]{0,254})|/(?P<version>[1-9][0-9]{0,9}))")


def _known_scheme(uri: str) -> str:
    if not uri.startswith(MODEL_SCHEMES):
        raise ValueError(f"unsupported model URI {uri!r}; use one of {', '.join(MODEL_SCHEMES)}")
    if uri.startswith("hf://") and "@" not in uri:
        raise ValueError(f"{uri!r}: pin a revision, hf://org/name@<commit sha or tag>")
    return uri


ModelUri = Annotated[str, AfterValidator(_known_scheme)]


def _model_or_registry(uri: str) -> str:
    if not uri.startswith(REGISTRY_SCHEME):
        return _known_scheme(uri)
    if not REGISTRY_URI.fullmatch(uri):
        raise ValueError(f"{uri!r}: a registered model is models:/NAME@ALIAS (e.g. models:/tiny@production) or "
                         "models:/NAME/VERSION (e.g. models:/tiny/3)")
    return uri


RegistryOrModelUri = Annotated[str, AfterValidator(_model_or_registry)]


class ModelSpec(SpecModel):
    uri: RegistryOrModelUri
    """Where the model directory lives: file:// (in the repo), s3://, gs://, az://, hf://org/name@revision, or a registered version: models:/NAME@ALIAS, models:/NAME/VERSION (resolved by the controller; a registered digest other than `digest` is refused)."""  # noqa: E501 (one line of the JSON schema)
    digest: Digest
    """sha256 over the model's file manifest; print it with `diffops model digest PATH` (or `diffops model pin RELEASE` for a models:/ URI)."""  # noqa: E501
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights dtype on GPU replicas; CPU replicas always run float32."""


class GenerationSpec(SpecModel):
    sampler: SamplerName = "ddim"
    """Scheduler used for denoising (see README for the diffusers class of each)."""
    steps: int = Field(default=30, ge=1)
    """Denoising steps when a request does not set them."""
    guidance_scale: float = Field(default=7.5, ge=0, le=50, allow_inf_nan=False)
    """Classifier-free guidance (CFG) scale; 0 or 1 disables guidance."""
    width: int = Field(default=512, ge=8)
    """Default image width in pixels, a multiple of 8."""
    height: int = Field(default=512, ge=8)
    """Default image height in pixels, a multiple of 8."""
    negative_prompt: str = ""
    """Negative prompt applied when a request gives none."""
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    """Fixed seed for requests without one; null draws a random seed per request."""


class LimitsSpec(SpecModel):
    max_steps: int = Field(default=50, ge=1)
    """Largest `steps` a request may ask for."""
    max_pixels: int = Field(default=1_048_576, ge=64)
    """Largest width × height a request may ask for."""
    max_images: int = Field(default=4, ge=1)
    """Largest `num_images` per request."""
    max_prompt_chars: int = Field(default=2000, ge=1)
    """Longest prompt or negative prompt, in characters."""


class RuntimeSpec(SpecModel):
    image: ImageRef
    """Serving container image, pinned by digest."""
    image_policy: Literal["verify", "unverified"] = "verify"
    """verify: the dependency check fails unless the replica proves it runs `image` (DIFFOPS_IMAGE_DIGEST equal to its digest); unverified: no proof required."""  # noqa: E501 (one line of the JSON schema)
    requires: dict[str, str] = Field(default_factory=dict)
    """PEP 440 specifiers the replica must satisfy: package name (or `cuda`) -> specifier."""

    @field_validator("requires")
    @classmethod
    def _specifiers(cls, requires: dict[str, str]) -> dict[str, str]:
        for name, spec in requires.items():
            try:
                Requirement(name)
                SpecifierSet(spec)
            except (InvalidRequirement, InvalidSpecifier):
                raise ValueError(f"requires.{name}: {spec!r} is not a PEP 440 specifier like '>=2.4'") from None
        return requires


class ReplicasSpec(SpecModel):
    count: int = Field(default=1, ge=1, le=1000)
    """Replicas of the model deployment."""
    gpus: float = Field(default=0, ge=0, le=16)
    """GPUs per replica (fractions share a GPU); 0 runs on CPU."""
    cpus: float = Field(default=0.5, gt=0, le=256)
    """CPUs reserved per replica (fractions allowed)."""
    max_batch_size: int = Field(default=4, ge=1, le=256)
    """Requests of compatible shape batched into one pipeline call."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=1)
    """Longest a batch waits for more requests before it runs (longer: fuller batches, more latency)."""
    max_ongoing_requests: int = Field(default=4, ge=1)
    """Requests a replica works on at once; more wait in the queue."""
    max_queued_requests: int = Field(default=16, ge=1)
    """Requests waiting per deployment before new ones get 503 + Retry-After."""


class IngressSpec(SpecModel):
    replicas: int = Field(default=1, ge=1, le=64)
    """Router replicas at `/<release>` (Serve's proxies spread requests over them); canary figures count all of them."""


class ReviewSpec(SpecModel):
    sample_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of answered generations kept for human review (image, prompt, seed, config, version) in the
    controller's state dir and shown on the review page; 0 keeps none."""
    max_samples: int = Field(default=200, ge=1, le=10_000)
    """Samples kept for review per version at most; past it a version's samples are scored but not kept."""


class ClipSpec(SpecModel):
    uri: ModelUri
    """The CLIP model (transformers CLIPModel + CLIPProcessor, safetensors) scoring image against prompt."""
    digest: Digest
    """sha256 over its file manifest, verified through the same cache as diffusion models."""
    sample_rate: float = Field(default=0.1, ge=0, le=1)
    """Fraction of answered generations scored, off the request path (the release's scorer deployment)."""


class SafetySpec(SpecModel):
    uri: ModelUri
    """The safety checker (diffusers StableDiffusionSafetyChecker + its CLIP image processor config, safetensors)."""
    digest: Digest
    """sha256 over its file manifest, verified through the same cache as diffusion models."""
    action: Literal["flag", "blur", "block"] = "flag"
    """What an image the checker calls NSFW gets: flag (served, counted, header X-Diffops-Nsfw), blur (served
    blurred, counted, header) or block (never served: 451 with a JSON reason)."""


class QualitySpec(SpecModel):
    review: ReviewSpec = Field(default_factory=ReviewSpec)
    """Human review sampling."""
    clip: ClipSpec | None = None
    """CLIP score of sampled outputs (the release's scorer); needed by checks.quality.min_clip_score / max_distance."""
    safety: SafetySpec | None = None
    """NSFW safety checker on every output, inside the version's replicas (a change makes a new version)."""


class FaultsSpec(SpecModel):
    error_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of requests this version answers with HTTP 500 (drills only); from request error_after_requests + 1 on
    when that is set."""
    error_after_requests: int = Field(default=0, ge=0, le=1_000_000)
    """Each replica answers this many requests normally before error_rate applies: a version that degrades after its
    checks and promotion (drills only)."""
    added_latency_s: float = Field(default=0, ge=0, le=60)
    """Seconds added to every generation (drills only)."""
    startup_error: bool = False
    """Replicas of this version raise while starting, so Ray Serve never gets one running (drills only)."""


def rules(generation: GenerationSpec, limits: LimitsSpec, replicas: ReplicasSpec) -> list[tuple[str, str]]:
    """Cross-field rules of serving's part; (field path under spec, message) per violation."""
    problems = []
    if generation.steps > limits.max_steps:
        problems.append(("generation.steps", f"{generation.steps} exceeds limits.max_steps ({limits.max_steps})"))
    for side in ("width", "height"):
        value = getattr(generation, side)
        if value % 8:
            problems.append((f"generation.{side}", f"{value} is not a multiple of 8 (try {value - value % 8 or 8})"))
    pixels = generation.width * generation.height
    if pixels > limits.max_pixels:
        size = f"{generation.width}x{generation.height} = {pixels} pixels"
        problems.append(("generation.width", f"{size} exceeds limits.max_pixels ({limits.max_pixels})"))
    if replicas.max_batch_size > replicas.max_ongoing_requests:
        problems.append(
            (
                "replicas.max_batch_size",
                f"{replicas.max_batch_size} exceeds replicas.max_ongoing_requests ({replicas.max_ongoing_requests}); "
                "a batch could never fill",
            )
        )
    return problems
