"""The demo model loads through the production path (fetch -> verify -> from_pretrained) and generates."""

from __future__ import annotations

import json
from typing import get_args

import numpy as np
import pytest
import torch

from controller.source.git_source import ReleaseSource
from serving.artifacts import ModelCache, fetch
from serving.pipeline import load_pipeline
from serving.samplers import SAMPLERS, SamplerName
from tests.conftest import DEMO_MODEL, ReleaseRepo

# The README's sampler table ("Samplers and the diffusers scheduler each maps to"), with the settings diffusers'
# scheduler overview gives for each A1111-style name: "DPM++ 2M" is DPMSolverMultistepScheduler (second-order
# dpmsolver++), "DPM++ 2M Karras" the same with use_karras_sigmas=True, and Stable Diffusion runs PNDM without
# its Runge-Kutta warm-up (skip_prk_steps=True).
README_SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
}
MODEL_SCHEDULE = json.loads((DEMO_MODEL / "scheduler" / "scheduler_config.json").read_text())
TRAINED = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type", "steps_offset")


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    import shutil

    from tests.conftest import DEMO_MODEL, DEMO_RELEASE

    repo = ReleaseRepo(tmp_path_factory.mktemp("repo"))
    shutil.copytree(DEMO_MODEL, repo.path / "models" / "tiny-sd")
    repo.write("releases/demo.yaml", DEMO_RELEASE)
    commit = repo.commit()
    release = ReleaseSource.open(repo.path).snapshot().releases["demo"]
    model = release.spec.model
    return fetch(model.uri, model.digest, ModelCache(tmp_path_factory.mktemp("cache")), repo=repo.path, commit=commit).path


def generate(pipeline, seed: int, steps: int = 3) -> np.ndarray:
    out = pipeline("a red cube", num_inference_steps=steps, width=64, height=64, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.images[0]


def test_demo_model_generates_deterministic_images(demo_model_dir):
    pipeline = load_pipeline(demo_model_dir, dtype="float16", sampler="ddim")
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert pipeline.device.type == "cpu" and pipeline.unet.dtype == torch.float32  # CPU always runs float32
    assert pipeline.hf_device_map == "cpu"  # loaded onto its device by the device map (a GPU: straight into its memory)
    first, again, other = generate(pipeline, 1), generate(pipeline, 1), generate(pipeline, 2)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_the_device_map_load_draws_what_a_plain_load_draws(demo_model_dir):
    """Placing the weights by the device map changes where they live, not what they draw: the same pixels as
    diffusers' plain load followed by `.to("cpu")`, at the same seed."""
    import diffusers

    plain = diffusers.DiffusionPipeline.from_pretrained(str(demo_model_dir), dtype=torch.float32, use_safetensors=True,
                                                        local_files_only=True).to("cpu")
    plain.set_progress_bar_config(disable=True)
    mapped = load_pipeline(demo_model_dir, sampler="ddim", device="cpu")
    plain.scheduler = mapped.scheduler
    assert np.array_equal(generate(mapped, 5), generate(plain, 5))


def test_the_schema_offers_exactly_the_readme_samplers():
    assert set(SAMPLERS) == set(README_SAMPLERS)
    assert set(get_args(SamplerName)) == set(README_SAMPLERS)  # the release schema's enum, as the type checker sees it


@pytest.mark.parametrize("sampler", sorted(README_SAMPLERS))
def test_every_sampler_runs(demo_model_dir, sampler):
    pipeline = load_pipeline(demo_model_dir, sampler=sampler)
    class_name, flags = README_SAMPLERS[sampler]
    assert type(pipeline.scheduler).__name__ == class_name
    config = pipeline.scheduler.config
    assert {key: config[key] for key in flags} == flags
    assert {key: config[key] for key in TRAINED} == {key: MODEL_SCHEDULE[key] for key in TRAINED}  # the model's schedule kept
    image = generate(pipeline, 0, steps=2)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    i = np.arange(n, dtype=np.float64)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_karras_sampler_steps_along_the_karras_sigmas(demo_model_dir, steps):
    # The model's trained noise levels, from its scheduler_config.json: scaled_linear betas, sigma = sqrt((1 - abar) / abar).
    assert MODEL_SCHEDULE["beta_schedule"] == "scaled_linear"
    betas = np.linspace(MODEL_SCHEDULE["beta_start"] ** 0.5, MODEL_SCHEDULE["beta_end"] ** 0.5,
                        MODEL_SCHEDULE["num_train_timesteps"], dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    trained = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    expected = karras(float(trained.min()), float(trained.max()), steps)

    scheduler = load_pipeline(demo_model_dir, sampler="dpmpp_2m_karras").scheduler
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().numpy()
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0.0  # the last step lands on a clean image
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-4)

    plain = load_pipeline(demo_model_dir, sampler="dpmpp_2m").scheduler  # without Karras the levels differ
    plain.set_timesteps(steps)
    assert not np.allclose(plain.sigmas.double().numpy()[:-1], expected, rtol=1e-2)
