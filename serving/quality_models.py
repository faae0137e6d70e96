"""Quality models: a CLIP scorer, an NSFW safety checker, a blur and a feature distance.

Loaded by the scorer deployment and the replica's safety filter, and by the
gate's quality check, from a verified cache directory (after
`serving.artifacts.fetch`), exactly as diffusion models are. Loading is offline
and safetensors-only: `local_files_only`, no hub access, no remote code, no pickle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from serving.manifest import ArtifactError, list_model_files

__all__ = ["BLUR_PIXELS", "ClipScorer", "QualityModelError", "SafetyChecker", "blur", "frechet_distance", "load_clip", "load_safety"]

BLUR_PIXELS = 8  # the long side an image is shrunk to before it is blown back up
BATCH = 16
SAFETY_LOGGER = "diffusers.pipelines.stable_diffusion.safety_checker"


class QualityModelError(Exception):
    """A quality model directory cannot be loaded."""


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    # diffusers and transformers leave these unannotated (the untyped-library boundary of serving)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]


class _NoBlackingNotice(logging.Filter):
    """Drop the checker's "a black image will be returned" warning: we take its flags only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Potential NSFW content was detected")


def _check_dir(model_dir: Path, needs: tuple[str, ...]) -> None:
    """Refuse a directory that is missing, holds pickle or code, or lacks safetensors weights."""
    if not model_dir.is_dir():
        raise QualityModelError(f"{model_dir}: not a directory; fetch the pinned quality model into the cache first")
    try:
        keys = list_model_files(model_dir)
    except ArtifactError as error:
        raise QualityModelError(f"{model_dir}: refused: {error}") from error
    missing = [name for name in needs if name not in keys]
    if missing:
        raise QualityModelError(f"{model_dir}: missing {', '.join(missing)}; rebuild or re-fetch the model (it is incomplete)")
    if not any(key.endswith(".safetensors") for key in keys):
        raise QualityModelError(f"{model_dir}: no .safetensors weights; convert the weights to safetensors")


def _features(output: Any) -> Any:
    """Projected embeddings from `get_*_features`: a tensor, or (transformers 5) an output's pooler_output."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipScorer:
    """A CLIP model and its processor, scoring images against prompts."""

    model: Any
    processor: Any
    device: str

    def _image_embeds(self, images: list[Image.Image]) -> Any:
        import torch

        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        embeds = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    def _text_embeds(self, prompts: list[str]) -> Any:
        import torch

        tokenizer = self.processor.tokenizer
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
        embeds = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                        attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """CLIP score per pair, as torchmetrics defines it: 100 * max(cosine(image, text), 0)."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                image = self._image_embeds(images[start:start + BATCH])
                text = self._text_embeds(prompts[start:start + BATCH])
                cosine = (image * text).sum(dim=-1)
                scores.extend((100.0 * cosine.clamp(min=0.0)).cpu().tolist())
        return scores

    def image_features(self, images: list[Image.Image]) -> npt.NDArray[np.float64]:
        """L2-normalized image embeddings, one row per image (n x d, float64)."""
        import torch

        rows: list[npt.NDArray[np.float64]] = []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                rows.append(self._image_embeds(images[start:start + BATCH]).cpu().double().numpy())
        features = np.concatenate(rows) if rows else np.zeros((0, 0))
        normalized: npt.NDArray[np.float64] = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
        return normalized


@dataclass
class SafetyChecker:
    """diffusers' StableDiffusionSafetyChecker and the image processor its clip_input comes from."""

    model: Any
    processor: Any
    device: str

    def check(self, images: list[Image.Image]) -> list[bool]:
        """True for each image the checker flags as NSFW (its own thresholds decide)."""
        import torch

        if not images:
            return []
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        # the checker blacks out flagged entries of `images` in place; hand it a placeholder, keep only its flags
        placeholder = np.zeros((len(images), 1, 1, 3))
        with torch.inference_mode():
            _, flags = self.model(clip_input=pixels.to(self.device, self.model.dtype), images=placeholder)
        return [bool(flag) for flag in flags]


def load_clip(model_dir: Path, device: str = "cpu") -> ClipScorer:
    """Load a CLIPModel + CLIPProcessor from a verified directory."""
    import transformers

    _check_dir(model_dir, ("config.json",))
    _quiet_libraries()
    try:
        model = transformers.CLIPModel.from_pretrained(str(model_dir), use_safetensors=True, local_files_only=True)
        processor = transformers.CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise QualityModelError(f"{model_dir}: not a loadable CLIP model ({error}); rebuild or re-fetch it") from error
    return ClipScorer(model.eval().to(device), processor, device)  # type: ignore[no-untyped-call]


def load_safety(model_dir: Path, device: str = "cpu") -> SafetyChecker:
    """Load a StableDiffusionSafetyChecker + its CLIPImageProcessor from a verified directory."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    _check_dir(model_dir, ("config.json", "preprocessor_config.json"))
    _quiet_libraries()
    safety_log = logging.getLogger(SAFETY_LOGGER)
    if not any(isinstance(existing, _NoBlackingNotice) for existing in safety_log.filters):
        safety_log.addFilter(_NoBlackingNotice())
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(str(model_dir), use_safetensors=True, local_files_only=True)
        processor = transformers.CLIPImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise QualityModelError(f"{model_dir}: not a loadable safety checker ({error}); rebuild or re-fetch it") from error
    return SafetyChecker(model.eval().to(device), processor, device)  # type: ignore[no-untyped-call]


def blur(image: Image.Image) -> Image.Image:
    """Shrink to ~8 px and blow back up (then soften the blocks): same size and mode, content unrecognizable."""
    work = image.convert("RGBA" if "A" in image.getbands() else "RGB") if image.mode in ("1", "P", "PA") else image
    scale = BLUR_PIXELS / max(image.size)
    small = work.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX)
    large = small.resize(image.size, Image.Resampling.BILINEAR)
    large = large.filter(ImageFilter.GaussianBlur(radius=max(image.size) / (4 * BLUR_PIXELS)))
    return large if large.mode == image.mode else large.convert(image.mode)


def frechet_distance(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """Fréchet distance between two sets of feature vectors (rows), from their means and covariances.

    A regression distance between two versions' outputs on the same prompts, on
    the pinned CLIP's image features. It is not the published FID, which uses
    Inception-v3 features and thousands of images; values are not comparable to it.
    """
    from scipy import linalg  # type: ignore[import-untyped]  # scipy ships no type information

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"frechet_distance needs two 2-D arrays (rows = images), got shapes {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 rows in each set to estimate a covariance, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs features of the same width, got {a.shape[1]} and {b.shape[1]}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: nudge both diagonals, as the reference FID code does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    distance = float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root)))
    return max(distance, 0.0)
