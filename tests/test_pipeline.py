"""The demo model loads through the production path (fetch -> verify -> from_pretrained) and generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controller.source import ReleaseSource
from serving.artifacts import ModelCache, fetch
from serving.pipeline import load_pipeline
from serving.samplers import SAMPLERS
from tests.conftest import ReleaseRepo


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    from tests.conftest import DEMO_MODEL, DEMO_RELEASE
    import shutil

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
    first, again, other = generate(pipeline, 1), generate(pipeline, 1), generate(pipeline, 2)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs(demo_model_dir, sampler):
    pipeline = load_pipeline(demo_model_dir, sampler=sampler)
    assert type(pipeline.scheduler).__name__ == SAMPLERS[sampler][0]
    image = generate(pipeline, 0, steps=2)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
