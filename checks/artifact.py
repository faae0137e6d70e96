"""Artifact check: the files are the pinned ones and form the pipeline their class expects.

Re-verifies the digest, reads `model_index.json`, and for each component checks
its folder, that its config parses, that model weights are safetensors in a
supported dtype; reports sizes per component.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from checks.report import CheckResult, failed
from serving.manifest import ArtifactError, verify

__all__ = ["run"]

CONFIG_NAMES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
NO_WEIGHTS = ("scheduler", "tokenizer", "feature_extractor", "image_processor")
SUPPORTED_FLOAT = {"F32", "F16", "BF16"}


def safetensors_dtypes(path: Path) -> set[str]:
    """Tensor dtypes from a safetensors header, without loading any tensor."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 << 20:
            raise ValueError(f"{path.name}: header of {length} bytes is not plausible")
        header = json.loads(handle.read(length))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def run(model_dir: Path, digest: str) -> CheckResult:
    started = time.monotonic()
    try:
        manifest = verify(model_dir, digest)
    except ArtifactError as err:
        return failed("artifact", str(err))
    try:
        index: dict[str, Any] = json.loads((model_dir / "model_index.json").read_text())
    except (FileNotFoundError, ValueError) as err:
        return failed("artifact", f"model_index.json unreadable ({err}); not a diffusers pipeline directory")
    problems, sizes, dtypes = [], {}, {}
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    for name, (library, class_name) in components.items():
        folder = model_dir / name
        if not folder.is_dir():
            problems.append(f"{name}: {library}.{class_name} listed in model_index.json but the folder is missing")
            continue
        sizes[name] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        configs = [folder / c for c in CONFIG_NAMES if (folder / c).is_file()]
        if not configs and not (folder / "tokenizer.json").is_file():
            problems.append(f"{name}: no config file")
        for config in configs:
            try:
                json.loads(config.read_text())
            except ValueError as err:
                problems.append(f"{name}/{config.name}: does not parse ({err})")
        if any(word in name for word in NO_WEIGHTS):
            continue
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            problems.append(f"{name}: no .safetensors weights")
        found = set().union(*(safetensors_dtypes(w) for w in weights)) if weights else set()
        dtypes[name] = sorted(found)
        odd = {d for d in found if d.startswith(("F", "BF")) and d not in SUPPORTED_FLOAT}
        if odd:
            problems.append(f"{name}: weights in unsupported dtype {sorted(odd)}")
    figures = {
        "pipeline_class": index.get("_class_name"),
        "files": len(manifest.files),
        "total_bytes": sum(sizes.values()),
        "component_bytes": sizes,
        "weight_dtypes": dtypes,
    }
    seconds = time.monotonic() - started
    if problems:
        return CheckResult("artifact", "failed", "; ".join(problems), figures, seconds=seconds)
    message = f"digest verified; {figures['pipeline_class']} with {len(components)} components, {figures['total_bytes']} bytes"
    return CheckResult("artifact", "passed", message, figures, seconds=seconds)
