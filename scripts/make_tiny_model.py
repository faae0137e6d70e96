"""Build the demo model: a tiny StableDiffusion pipeline with random weights.

Writes a standard diffusers directory (safetensors weights, JSON configs, a CLIP
tokenizer over a small hand-written vocabulary) plus its `MODEL.sha256`
manifest, and prints the digest to pin in `releases/demo.yaml`. The result
loads with `DiffusionPipeline.from_pretrained`, exactly as a production model.

    python scripts/make_tiny_model.py models/tiny-sd
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from serving.manifest import MANIFEST_NAME, manifest_of

WORDS = (
    "a an the of in on with and red green blue yellow white black cube sphere cat dog "
    "house tree sky photo painting small large bright dark"
).split()


def tiny_vocab() -> dict[str, int]:
    """Special tokens, single letters (so any word tokenizes), and whole demo words."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = specials + letters + [f"{c}</w>" for c in letters] + [f"{w}</w>" for w in WORDS]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def build(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]  # diffusers models are untyped
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(  # type: ignore[no-untyped-call]  # diffusers models are untyped
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    tokenizer = CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(  # type: ignore[no-untyped-call]  # diffusers models are untyped
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]  # diffusers models are untyped
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main(out: str) -> None:
    target = Path(out)
    build().save_pretrained(target, safe_serialization=True)  # type: ignore[attr-defined]  # diffusers models are untyped
    manifest = manifest_of(target)
    (target / MANIFEST_NAME).write_text(manifest.text())
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"{target}: {len(manifest.files)} files, {size / 1024:.0f} KiB, digest {manifest.digest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-sd")
