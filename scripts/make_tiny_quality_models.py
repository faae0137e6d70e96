"""Build the tiny quality models: a random CLIP scorer and two random safety checkers.

Tests and the demo pin these like any model (URI + digest). Their scores are
deterministic, not meaningful. Writes, under the target directory (default
`models/`), each with its `MODEL.sha256` manifest, and prints each digest:

- `tiny-clip/`: a `CLIPModel` (text + vision towers) and its `CLIPProcessor`
  (a CLIP tokenizer over the demo model's vocabulary, an image processor sized
  to the vision tower).
- `tiny-safety-none/`, `tiny-safety-all/`: a `StableDiffusionSafetyChecker` and
  the image processor its `clip_input` comes from. The checker flags an image
  when a cosine similarity (in [-1, 1]) exceeds its concept threshold, so
  thresholds of +10 flag no image and -10 flag every image: the real checker
  code decides.

    python scripts/make_tiny_quality_models.py [models]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from scripts.make_tiny_model import tiny_vocab
from serving.manifest import MANIFEST_NAME, manifest_of

IMAGE_SIZE = 32
MAX_TOKENS = 77
THRESHOLDS = {"tiny-safety-none": 10.0, "tiny-safety-all": -10.0}


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=tiny_vocab(), merges=[], model_max_length=MAX_TOKENS)


def image_processor() -> CLIPImageProcessor:
    """CLIP's own resize, centre crop and normalization, at the vision tower's size."""
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def clip_config(vocab_size: int, tok: CLIPTokenizer) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS, projection_dim=16,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=16,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)


def build_clip(target: Path, seed: int = 0) -> None:
    tok = tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(len(tok.get_vocab()), tok)).eval()  # type: ignore[no-untyped-call]  # transformers is untyped
    model.save_pretrained(target, safe_serialization=True)
    processor = CLIPProcessor(image_processor=image_processor(), tokenizer=tok)  # type: ignore[no-untyped-call]  # transformers is untyped
    processor.save_pretrained(target)


def build_safety(target: Path, threshold: float, seed: int = 0) -> None:
    tok = tokenizer()
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(clip_config(len(tok.get_vocab()), tok)).eval()  # type: ignore[no-untyped-call]  # untyped
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(target, safe_serialization=True)
    image_processor().save_pretrained(target)


def seal(target: Path) -> str:
    manifest = manifest_of(target)
    (target / MANIFEST_NAME).write_text(manifest.text())
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"{target}: {len(manifest.files)} files, {size / 1024:.0f} KiB, digest {manifest.digest}")
    return manifest.digest


def main(out: str) -> dict[str, str]:
    root = Path(out)
    build_clip(root / "tiny-clip")
    digests = {"tiny-clip": seal(root / "tiny-clip")}
    for name, threshold in THRESHOLDS.items():
        build_safety(root / name, threshold)
        digests[name] = seal(root / name)
    return digests


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models")
