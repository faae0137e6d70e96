"""Build a diffusers pipeline from a verified cache directory.

Called by the model deployment after `serving.artifacts.fetch`; the demo model
and a production model take exactly this path. Loading is offline and
safetensors-only: no hub access, no remote code, no pickle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serving.samplers import build_scheduler

__all__ = ["DTYPES", "load_pipeline", "pick_device"]

log = logging.getLogger("diffops.serving")

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model_dir: Path, *, dtype: str = "float32", sampler: str = "ddim", device: str | None = None) -> Any:
    """Load the pipeline onto the device and swap in the release's sampler.

    The weights go straight to the device (`device_map`: on a GPU each tensor is read from the memory-mapped
    safetensors into GPU memory, with no whole copy of the model in host memory first); on CPU the same path keeps
    the tensors on the mapped files. CPU replicas always run float32 (half precision on CPU is slow or unsupported).
    """
    import diffusers
    import torch
    import transformers

    # diffusers and transformers leave these unannotated (the untyped-library boundary of serving)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    device = device or pick_device()
    weights_dtype = getattr(torch, DTYPES[dtype]) if device != "cpu" else torch.float32
    pipeline = diffusers.DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        str(model_dir), dtype=weights_dtype, use_safetensors=True, local_files_only=True, device_map=device
    )
    pipeline.scheduler = build_scheduler(sampler, dict(pipeline.scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    if device == "cpu" and dtype != "float32":
        log.info("pipeline %s: %s requested, running float32 on CPU", model_dir.name, dtype)
    return pipeline
