"""Sampler names in release files, mapped to diffusers schedulers.

The schema takes its sampler enum from `SAMPLERS`; the model deployment calls
`build_scheduler` with the pipeline's own scheduler config, so a sampler swap
keeps the model's trained noise schedule (betas, timestep spacing).
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["SAMPLERS", "SamplerName", "build_scheduler"]

SamplerName = Literal["ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
"""The sampler names a release file may use: exactly the keys of `SAMPLERS` (a test holds them equal)."""

SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def build_scheduler(sampler: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler for `sampler`, built from the model's scheduler config."""
    import diffusers

    class_name, overrides = SAMPLERS[sampler]
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config({**base_config, **overrides})
