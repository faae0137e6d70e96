"""Quality models: the tiny CLIP scorer and safety checkers load from their committed directories, score
deterministically, and the blur and the feature distance behave; the build script reproduces the pinned digests."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import make_tiny_quality_models
from serving.manifest import verify
from serving.quality_models import ClipScorer, QualityModelError, SafetyChecker, blur, frechet_distance, load_clip, load_safety

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DIGESTS = {
    "tiny-clip": "sha256:1688fa6468ecc7a53b3c9562864e713aa3af24f93557a66fe84e0ccd12825f91",
    "tiny-safety-none": "sha256:1336f5d5ca312cbe78cea9b4a94af058710f72e43d671b25ca289c4bb62e79ce",
    "tiny-safety-all": "sha256:e87425900f3acf5abfd59976df78870cd7248089c59468d92448ad9937455afe",
}
PROMPTS = ["a red cube", "zzz qqq", "a green tree", "the cat"]  # prompts of different lengths, all scoring above 0
UNRELATED = "a photo of a dog in the sky"  # its cosine with every test image is negative under the tiny CLIP


def solid(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def checkerboard(size: int = 256, square: int = 16) -> Image.Image:
    cells = (np.indices((size, size)) // square).sum(axis=0) % 2
    return Image.fromarray((cells * 255).astype(np.uint8), "L").convert("RGB")


IMAGES = [solid((0, 0, 0)), solid((255, 255, 255)), noise(1), checkerboard(), noise(2, size=96)]


@pytest.fixture(scope="module")
def clip() -> ClipScorer:
    return load_clip(MODELS / "tiny-clip")


@pytest.fixture(scope="module")
def checkers() -> dict[str, SafetyChecker]:
    return {name: load_safety(MODELS / f"tiny-safety-{name}") for name in ("none", "all")}


# --- CLIP score ---------------------------------------------------------------------------------------------------


def test_scores_are_the_same_after_a_second_load(clip: ClipScorer) -> None:
    again = load_clip(MODELS / "tiny-clip")
    images, prompts = IMAGES[:4], PROMPTS
    assert again.score(images, prompts) == clip.score(images, prompts)
    np.testing.assert_array_equal(again.image_features(images), clip.image_features(images))


def test_scores_lie_between_0_and_100(clip: ClipScorer) -> None:
    pairs = [(image, prompt) for image in IMAGES for prompt in PROMPTS]
    pairs += [(image, UNRELATED) for image in IMAGES]
    scores = clip.score([image for image, _ in pairs], [prompt for _, prompt in pairs])  # 25 pairs: two batches of 16
    assert len(scores) == len(pairs)
    assert all(0.0 <= score <= 100.0 for score in scores)


def test_different_prompts_give_different_scores_for_one_image(clip: ClipScorer) -> None:
    scores = clip.score([IMAGES[2]] * len(PROMPTS), PROMPTS)
    assert len(set(scores)) == len(PROMPTS)
    assert min(scores) > 0.0


def test_a_negative_similarity_scores_0(clip: ClipScorer) -> None:
    assert clip.score(IMAGES, [UNRELATED] * len(IMAGES)) == [0.0] * len(IMAGES)


def test_a_score_alone_equals_its_score_in_a_batch(clip: ClipScorer) -> None:
    batch = clip.score(IMAGES[:4], PROMPTS)  # the batch pads the shorter prompts
    alone = [clip.score([image], [prompt])[0] for image, prompt in zip(IMAGES[:4], PROMPTS, strict=True)]
    assert alone == pytest.approx(batch, abs=1e-4)


def test_a_long_prompt_is_truncated_not_refused(clip: ClipScorer) -> None:
    long = " ".join(["a red cube on a blue sphere"] * 40)  # far over 77 tokens
    assert 0.0 <= clip.score([IMAGES[0]], [long])[0] <= 100.0


def test_images_and_prompts_must_pair_up(clip: ClipScorer) -> None:
    with pytest.raises(ValueError, match="one prompt per image, got 2 images and 1 prompts"):
        clip.score(IMAGES[:2], PROMPTS[:1])


def test_image_features_are_unit_rows(clip: ClipScorer) -> None:
    features = clip.image_features(IMAGES)
    assert features.dtype == np.float64
    assert features.shape == (len(IMAGES), 16)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-9)


# --- safety checker -----------------------------------------------------------------------------------------------


def test_the_all_checker_flags_every_image(checkers: dict[str, SafetyChecker]) -> None:
    assert checkers["all"].check(IMAGES) == [True] * len(IMAGES)


def test_the_none_checker_flags_no_image(checkers: dict[str, SafetyChecker]) -> None:
    assert checkers["none"].check(IMAGES) == [False] * len(IMAGES)


def test_checking_leaves_the_images_untouched(checkers: dict[str, SafetyChecker]) -> None:
    image = noise(3)
    before = np.asarray(image).copy()
    assert checkers["all"].check([image]) == [True]
    np.testing.assert_array_equal(np.asarray(image), before)


def test_no_images_no_flags(checkers: dict[str, SafetyChecker]) -> None:
    assert checkers["all"].check([]) == []


# --- blur ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_blur_keeps_size_and_mode(mode: str) -> None:
    image = noise(4, size=80).resize((120, 80)).convert(mode)
    out = blur(image)
    assert (out.size, out.mode) == ((120, 80), mode)


def test_blur_changes_the_pixels_a_lot() -> None:
    image = noise(5, size=256)
    difference = np.abs(np.asarray(blur(image), dtype=float) - np.asarray(image, dtype=float)).mean()
    assert difference > 40  # uniform noise averages out to mid-grey: about 64 away on average


def test_blur_wipes_out_structure() -> None:
    image = checkerboard(size=512, square=16)
    before, after = np.asarray(image, dtype=float), np.asarray(blur(image), dtype=float)
    assert after.std() < 0.1 * before.std()


# --- Fréchet distance ---------------------------------------------------------------------------------------------


def features(seed: int, rows: int = 40, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, width))


def test_frechet_distance_of_a_set_to_itself_is_zero() -> None:
    a = features(0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-6)  # order of the rows does not matter


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift() -> None:
    a = features(0)
    shift = np.full(a.shape[1], 0.5)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_is_symmetric_and_positive_for_different_sets() -> None:
    a, b = features(0), features(1) * 1.5
    assert frechet_distance(a, b) > 0.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_on_fewer_rows_than_features(clip: ClipScorer) -> None:
    a = clip.image_features(IMAGES)  # 5 rows of 16: singular covariances
    b = clip.image_features([noise(seed) for seed in range(10, 15)])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(a, b) > frechet_distance(a, a)


@pytest.mark.parametrize(("a", "b", "message"), [
    (np.zeros((1, 4)), np.zeros((5, 4)), "at least 2 rows in each set"),
    (np.zeros((5, 4)), np.zeros((1, 4)), "at least 2 rows in each set"),
    (np.zeros((5, 4)), np.zeros((5, 3)), "same width, got 4 and 3"),
    (np.zeros(5), np.zeros((5, 3)), "2-D arrays"),
])
def test_frechet_distance_refuses_what_it_cannot_compare(a: np.ndarray, b: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        frechet_distance(a, b)


# --- the committed directories and the build script ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_committed_models_verify_against_their_pinned_digests(name: str) -> None:
    verify(MODELS / name, DIGESTS[name])


def test_the_build_script_reproduces_the_pinned_digests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process (`main` is what `python scripts/make_tiny_quality_models.py DIR` runs): a second interpreter
    # would spend most of a minute importing torch and transformers again
    assert make_tiny_quality_models.main(str(tmp_path)) == DIGESTS
    printed = capsys.readouterr().out
    for name, digest in DIGESTS.items():
        assert f"{tmp_path / name}: " in printed and digest in printed
        verify(tmp_path / name, digest)


class _Marker:
    """Unpickling this creates the marker file: what a hostile .bin checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(("name", "load"), [("tiny-clip", load_clip), ("tiny-safety-all", load_safety)])
def test_a_pickle_weight_is_refused_unread(tmp_path: Path, name: str, load: object) -> None:
    model = shutil.copytree(MODELS / name, tmp_path / name)
    marker = tmp_path / "unpickled"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(QualityModelError, match=r"pytorch_model\.bin: \.bin files are refused.*convert weights to safetensors") as error:
        load(model)  # type: ignore[operator]
    assert str(model) in str(error.value)
    assert not marker.exists()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    model = shutil.copytree(MODELS / "tiny-safety-none", tmp_path / "checker")
    (model / "preprocessor_config.json").unlink()
    with pytest.raises(QualityModelError, match=rf"{model}: missing preprocessor_config.json; rebuild or re-fetch"):
        load_safety(model)


def test_weights_missing_entirely_are_named(tmp_path: Path) -> None:
    model = shutil.copytree(MODELS / "tiny-clip", tmp_path / "clip")
    (model / "model.safetensors").unlink()
    with pytest.raises(QualityModelError, match="no .safetensors weights"):
        load_clip(model)


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(QualityModelError, match=rf"{tmp_path / 'absent'}: not a directory; fetch"):
        load_clip(tmp_path / "absent")


def test_production_sized_images_are_scored_and_checked(clip: ClipScorer, checkers: dict[str, SafetyChecker]) -> None:
    """1024 px outputs (what production models draw) go through the processors' resize, not only the demo's 64 px."""
    big = [noise(seed, size=1024) for seed in range(2)]
    scores = clip.score(big, ["a red cube", "a cat"])
    assert len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    assert clip.image_features(big).shape[0] == 2
    assert checkers["all"].check(big) == [True, True] and checkers["none"].check(big) == [False, False]
