"""Dependency checks: what the replica really runs, against `runtime.requires` and `runtime.image`.

`dependency` compares installed package versions (PEP 440 specifiers) and the
image digest the runtime reports (`DIFFOPS_IMAGE_DIGEST`, set in the serving
image). `cuda` compares CUDA/cuDNN and reports GPU model and driver (NVML); on
a replica without a GPU it is skipped, and says so, never silently passed.
"""

from __future__ import annotations

import os
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from checks.report import CheckResult

ALWAYS_REPORTED = ("torch", "diffusers", "transformers", "safetensors")
GPU_KEYS = ("cuda", "cudnn")


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def satisfies(version: str, specifier: str) -> bool:
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def run(requires: dict[str, str], image: str) -> CheckResult:
    versions = {name: installed(name) for name in (*ALWAYS_REPORTED, *requires) if name not in GPU_KEYS}
    problems = []
    for name, specifier in requires.items():
        if name in GPU_KEYS:
            continue
        have = versions.get(name)
        if have is None:
            problems.append(f"{name} is not installed (release requires {specifier})")
        elif not satisfies(have, specifier):
            problems.append(f"{name} {have} is installed; release requires {name}{specifier}")
    reported = os.environ.get("DIFFOPS_IMAGE_DIGEST") or None
    pinned = image.split("@", 1)[1]
    if reported and reported != pinned:
        problems.append(f"runtime image is {reported}; release pins {pinned}")
    figures = {"packages": versions, "image_reported": reported, "image_pinned": pinned}
    thresholds = {name: spec for name, spec in requires.items() if name not in GPU_KEYS}
    if problems:
        return CheckResult("dependency", "failed", "; ".join(problems), figures, thresholds)
    image_note = "image digest matches" if reported else "image digest not reported by the runtime (not running in the release image)"
    return CheckResult("dependency", "passed", f"{len(thresholds)} requirement(s) met; {image_note}", figures, thresholds)


def gpu_facts() -> dict[str, object]:
    import torch

    facts: dict[str, object] = {"cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda, "cudnn": None}
    if not facts["cuda_available"]:
        return facts
    cudnn = torch.backends.cudnn.version()
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
    facts = gpu_facts()
    if not facts["cuda_available"]:
        if wanted:
            pins = ", ".join(f"{k}{v}" for k, v in wanted.items())
            return CheckResult("cuda", "skipped", f"{pins} not checked: this replica has no CUDA device", facts, wanted)
        return CheckResult("cuda", "skipped", "no CUDA device on this replica", facts)
    problems = [
        f"{name} {facts.get(name)} does not satisfy {name}{spec}"
        for name, spec in wanted.items()
        if not facts.get(name) or not satisfies(str(facts[name]), spec)
    ]
    if problems:
        return CheckResult("cuda", "failed", "; ".join(problems), facts, wanted)
    return CheckResult("cuda", "passed", f"{facts.get('gpu')} driver {facts.get('driver')}, CUDA {facts.get('cuda')}", facts, wanted)
