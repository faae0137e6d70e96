"""A synthetic diffusers model of a chosen size, for the model-load benchmark.

The demo model's text encoder, tokenizer, VAE and scheduler with a UNet widened
until its float32 safetensors weigh about `size_bytes` (the width is found on
torch's meta device, so nothing is allocated while searching; the weights are
random). It loads with `serving.pipeline.load_pipeline` like any real model,
and ships a `MODEL.sha256` as `diffops model digest --write` writes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.gitrepo import DEMO_MODEL
from serving.manifest import MANIFEST_NAME, manifest_of


def unet_config(channels: int) -> dict[str, Any]:
    return {
        "block_out_channels": (channels, 2 * channels), "layers_per_block": 2, "sample_size": 32,
        "in_channels": 4, "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 16,  # the demo text encoder's width
        "attention_head_dim": 8, "norm_num_groups": 8,
    }


def unet_bytes(channels: int) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(channels))  # type: ignore[no-untyped-call]  # diffusers models are untyped
    return sum(p.numel() for p in unet.parameters()) * 4  # type: ignore[attr-defined]  # diffusers models are untyped


def channels_for(size_bytes: int) -> int:
    """The smallest width (a multiple of 8) whose UNet weighs at least `size_bytes`."""
    low, high = 1, 1024  # in units of 8 channels
    while low < high:
        middle = (low + high) // 2
        if unet_bytes(middle * 8) >= size_bytes:
            high = middle
        else:
            low = middle + 1
    return low * 8


def build(target: Path, size_bytes: int) -> str:
    """Write the model into `target`; return its digest."""
    import torch
    from diffusers import UNet2DConditionModel

    shutil.copytree(DEMO_MODEL, target, ignore=shutil.ignore_patterns("unet", MANIFEST_NAME))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(channels_for(size_bytes)))  # type: ignore[no-untyped-call]  # diffusers models are untyped
    unet.save_pretrained(target / "unet", safe_serialization=True)  # type: ignore[attr-defined]  # diffusers models are untyped
    del unet
    manifest = manifest_of(target)
    (target / MANIFEST_NAME).write_text(manifest.text())
    return manifest.digest
