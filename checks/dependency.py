"""Dependency checks: what the replica really runs, against `runtime.requires` and `runtime.image`.

`dependency` compares installed package versions (PEP 440 specifiers) and the
image the replica proves it runs; `judge_image` is that decision, pure. The
proof is the `DIFFOPS_IMAGE_DIGEST` variable in the replica's environment, set
by the deployment next to the image reference it pulls by digest (an image
cannot carry its own digest): `sha256:<64 hex>`, or a whole reference
`<name>@sha256:<64 hex>` of which only the digest counts. Equal to the digest in
`runtime.image` is proof; unset or empty is no proof, which fails the check
unless the release sets `runtime.image_policy: unverified`; any other value
fails it under either policy. `cuda` compares CUDA/cuDNN and reports GPU model
and driver (NVML); on a replica without a GPU it is skipped, and says so,
never silently passed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from checks.report import CheckResult
from serving import code_pin

__all__ = ["ImageVerdict", "judge_image", "run", "run_cuda"]

ALWAYS_REPORTED = ("torch", "diffusers", "transformers", "safetensors")
GPU_KEYS = ("cuda", "cudnn")
IMAGE_ENV = "DIFFOPS_IMAGE_DIGEST"
REPORTED_RE = re.compile(r"^(?:[a-z0-9]+(?:[._/:-][a-z0-9]+)*@)?(sha256:[0-9a-f]{64})$")


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _satisfies(version: str, specifier: str) -> bool:
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


@dataclass(frozen=True)
class ImageVerdict:
    ok: bool
    verified: bool  # the replica proved it runs the pinned image
    message: str  # the problem when not ok, else what was (or was not) proven


def judge_image(image: str, policy: str, reported: str | None) -> ImageVerdict:
    """The image part of the dependency check, from the pin, the release's policy and what the replica reports."""
    pinned = image.split("@", 1)[1]
    value = (reported or "").strip()
    if not value:
        if policy == "unverified":
            return ImageVerdict(True, False, f"image not verified ({IMAGE_ENV} not set; runtime.image_policy: unverified)")
        return ImageVerdict(False, False, f"this replica cannot prove it runs {image}: {IMAGE_ENV} is not set in its environment; "
                                          f"set it in the deployment to the digest the image is pulled by, "
                                          f"or set spec.runtime.image_policy: unverified to run without proof")
    match = REPORTED_RE.match(value)
    if match is None:
        return ImageVerdict(False, False, f"{IMAGE_ENV}={value[:100]!r} is not an image digest ('sha256:<64 hex>' or "
                                          f"'<name>@sha256:<64 hex>'); fix the deployment's environment")
    if match.group(1) != pinned:
        return ImageVerdict(False, False, f"this replica runs image {match.group(1)}; the release pins {pinned}")
    return ImageVerdict(True, True, f"image {pinned[:19]}… verified")


def run(requires: dict[str, str], image: str, image_policy: str = "verify", environ: Mapping[str, str] | None = None) -> CheckResult:
    environ = os.environ if environ is None else environ
    versions = {name: _installed(name) for name in (*ALWAYS_REPORTED, *requires) if name not in GPU_KEYS}
    problems = []
    for name, specifier in requires.items():
        if name in GPU_KEYS:
            continue
        have = versions.get(name)
        if have is None:
            problems.append(f"{name} is not installed (release requires {specifier})")
        elif not _satisfies(have, specifier):
            problems.append(f"{name} {have} is installed; release requires {name}{specifier}")
    reported = environ.get(IMAGE_ENV) or None
    verdict = judge_image(image, image_policy, reported)
    if not verdict.ok:
        problems.append(verdict.message)
    code_pinned = environ.get(code_pin.PIN_ENV) or None
    if code_pinned and code_pinned != code_pin.fingerprint():
        problems.append(f"serving code: this node runs {code_pin.fingerprint()}, the controller pinned {code_pinned}; "
                        "install the controller's diffops on every node")
    figures = {"packages": versions, "image_reported": reported and reported[:200], "image_pinned": image.split("@", 1)[1],
               "image_policy": image_policy, "image_verified": verdict.verified, "serving_code": code_pin.fingerprint(),
               "serving_code_pinned": code_pinned}
    thresholds = {name: spec for name, spec in requires.items() if name not in GPU_KEYS}
    if problems:
        return CheckResult("dependency", "failed", "; ".join(problems), figures, thresholds)
    return CheckResult("dependency", "passed", f"{len(thresholds)} requirement(s) met; {verdict.message}", figures, thresholds)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's machine type: where a CPU-only gate ran."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpu_facts() -> dict[str, object]:
    import torch

    facts: dict[str, object] = {"cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda, "cudnn": None,
                                "cpu": cpu_model()}
    if not facts["cuda_available"]:
        return facts
    cudnn: int | None = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    facts["cudnn"] = f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn and cudnn >= 10000 else cudnn and str(cudnn)
    facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as err:  # no NVML: report, never crash
        facts["driver"] = f"unknown ({type(err).__name__})"
    return facts


def run_cuda(requires: dict[str, str]) -> CheckResult:
    wanted = {k: v for k, v in requires.items() if k in GPU_KEYS}
    facts = _gpu_facts()
    if not facts["cuda_available"]:
        if wanted:
            pins = ", ".join(f"{k}{v}" for k, v in wanted.items())
            return CheckResult("cuda", "skipped", f"{pins} not checked: this replica has no CUDA device", facts, wanted)
        return CheckResult("cuda", "skipped", "no CUDA device on this replica", facts)
    problems = [
        f"{name} {facts.get(name)} does not satisfy {name}{spec}"
        for name, spec in wanted.items()
        if not facts.get(name) or not _satisfies(str(facts[name]), spec)
    ]
    if problems:
        return CheckResult("cuda", "failed", "; ".join(problems), facts, wanted)
    return CheckResult("cuda", "passed", f"{facts.get('gpu')} driver {facts.get('driver')}, CUDA {facts.get('cuda')}", facts, wanted)
