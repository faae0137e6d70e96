"""The model cache bounded and self-healing: damaged entries never load and heal, LRU eviction, scratch clean-up."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving.artifacts import ModelCache, fetch
from serving.cache_eviction import STALE_AFTER_S, CacheEntry, Scratch, ScratchAction, classify_scratch, plan_eviction
from serving.manifest import MANIFEST_NAME, ArtifactError, manifest_of
from tests.conftest import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
UNET = "unet/diffusion_pytorch_model.safetensors"
MB = 1_000_000
H = "a" * 64

# --- the pure decisions ------------------------------------------------------------------------------


def e(name: str, mb: int, used: float) -> CacheEntry:
    return CacheEntry(f"sha256:{name}", mb * MB, used)


EVICTIONS = [
    # (case, entries, keep, cap MB, expected victims in order, over cap after)
    ("under the cap: nothing", [e("a", 10, 1), e("b", 10, 2)], set(), 20, [], False),
    ("oldest first until it fits", [e("a", 10, 3), e("b", 10, 1), e("c", 10, 2)], set(), 15, ["b", "c"], False),
    ("exactly at the cap is enough", [e("a", 10, 1), e("b", 10, 2)], set(), 10, ["a"], False),
    ("a kept entry is skipped even if oldest", [e("a", 10, 1), e("b", 10, 2), e("c", 10, 3)], {"sha256:a"}, 20, ["b"], False),
    ("one large old entry frees enough", [e("big", 50, 1), e("s1", 5, 2), e("s2", 5, 3)], set(), 20, ["big"], False),
    ("kept alone exceed the cap: evict the rest, keep them",
     [e("a", 30, 1), e("b", 30, 2), e("c", 5, 3)], {"sha256:a", "sha256:b"}, 40, ["c"], True),
    ("everything kept: nothing evicted", [e("a", 30, 1)], {"sha256:a"}, 10, [], True),
    ("cap zero evicts every unkept entry", [e("a", 1, 2), e("b", 1, 1)], set(), 0, ["b", "a"], False),
    ("equal last use: by digest, deterministic", [e("b", 10, 1), e("a", 10, 1)], set(), 10, ["a"], False),
    ("keep naming a digest not cached changes nothing", [e("a", 10, 1), e("b", 10, 2)], {"sha256:zz"}, 10, ["a"], False),
    ("empty cache", [], set(), 0, [], False),
]


@pytest.mark.parametrize("case", EVICTIONS, ids=[c[0] for c in EVICTIONS])
def test_plan_eviction(case):
    _, entries, keep, cap_mb, victims, over = case
    plan = plan_eviction(entries, keep, cap_mb * MB)
    assert [v.digest.removeprefix("sha256:") for v in plan.victims] == victims
    assert plan.over_cap is over
    assert plan.after_bytes == sum(x.bytes for x in entries) - sum(v.bytes for v in plan.victims)
    assert not {v.digest for v in plan.victims} & keep


SCRATCH = [
    ("staging of a digest", f".staging-{H}-1a2b3c4d", 0, ScratchAction.REMOVE_IF_UNLOCKED, f"sha256:{H}"),
    ("hub download of a digest", f".hub-{H}-1a2b3c4d", 10**6, ScratchAction.REMOVE_IF_UNLOCKED, f"sha256:{H}"),
    ("trash, however young", f".trash-{H}-1a2b3c4d", 0, ScratchAction.REMOVE, None),
    ("older short-hex staging, old", ".staging-0123456789abcdef-1a2b3c4d", STALE_AFTER_S + 1, ScratchAction.REMOVE, None),
    ("older short-hex staging, young", ".staging-0123456789abcdef-1a2b3c4d", 60, ScratchAction.KEEP, None),
    ("the entries folder", "sha256", 10**9, ScratchAction.KEEP, None),
    ("someone else's dot file", ".nfs000123", 10**9, ScratchAction.KEEP, None),
    ("no tag", f".staging-{H}", 10**9, ScratchAction.KEEP, None),
    ("upper-case hex is not ours", f".staging-{H.upper()}-1a2b3c4d", 10**9, ScratchAction.KEEP, None),
    ("partial download, young: the next fetch resumes it", f".partial-{H}", STALE_AFTER_S - 1, ScratchAction.KEEP, None),
    ("partial download nobody resumed", f".partial-{H}", STALE_AFTER_S + 1, ScratchAction.REMOVE_IF_UNLOCKED, f"sha256:{H}"),
    ("partial of a short hex is not ours", ".partial-0123456789abcdef", 10**9, ScratchAction.KEEP, None),
]


@pytest.mark.parametrize("case", SCRATCH, ids=[c[0] for c in SCRATCH])
def test_classify_scratch(case):
    _, name, age, action, digest = case
    assert classify_scratch(name, age) == Scratch(action, digest)


# --- damaged entries: never loaded, healed by the next fetch ---------------------------------------------


def make_variant(target: Path) -> tuple[Path, str]:
    """A second real, loadable model (its scheduler config differs), with its own manifest and digest."""
    shutil.copytree(DEMO_MODEL, target)
    config = target / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 1}, indent=2))
    manifest = manifest_of(target)
    (target / MANIFEST_NAME).write_text(manifest.text())
    return target, manifest.digest


def writable(path: Path) -> Path:
    path.chmod(0o644)
    return path


def flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(writable(path).read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def two_models(tmp_path):
    models = tmp_path / "models"
    demo = models / "demo"
    shutil.copytree(DEMO_MODEL, demo)
    variant, variant_digest = make_variant(models / "variant")
    cache = ModelCache(tmp_path / "cache")
    allowed = (models,)
    digests = {demo: manifest_of(demo).digest, variant: variant_digest}
    for model, digest in digests.items():
        assert not fetch(f"file://{model}", digest, cache, allowed_roots=allowed).cached
    return cache, allowed, digests


def test_flipped_byte_and_missing_file_never_load_and_heal_on_the_next_fetch(two_models, caplog):
    """A replica (reverify) is refused a damaged copy, naming the file; the copy is removed; its next start heals."""
    cache, allowed, digests = two_models
    (demo, demo_digest), (variant, variant_digest) = digests.items()
    flip_byte(cache.path(demo_digest) / UNET)
    (cache.path(variant_digest) / "vae" / "config.json").unlink()

    with caplog.at_level(logging.WARNING, logger="diffops.serving"):
        with pytest.raises(ArtifactError, match=f"is damaged \\({UNET}: sha256 [0-9a-f]{{12}}… does not match pinned"):
            fetch(f"file://{demo}", demo_digest, cache, allowed_roots=allowed, reverify=True)
        with pytest.raises(ArtifactError, match="is damaged \\(vae/config.json: missing, the pinned manifest lists it\\)"):
            fetch(f"file://{variant}", variant_digest, cache, allowed_roots=allowed, reverify=True)
    assert not cache.path(demo_digest).exists() and not cache.path(variant_digest).exists()  # nothing damaged is left
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(UNET in w and demo_digest[:19] in w and "refused" in w for w in warnings)
    assert any("vae/config.json: missing" in w and variant_digest[:19] in w for w in warnings)

    for model, digest in digests.items():
        healed = fetch(f"file://{model}", digest, cache, allowed_roots=allowed, reverify=True)
        assert not healed.cached and healed.bytes_transferred > 400_000 and manifest_of(healed.path).digest == digest
        again = fetch("file:///nowhere", digest, cache, allowed_roots=(Path("/"),), reverify=True)
        assert again.cached and again.bytes_transferred == 0  # healed for good: no store needed
    assert [p.name for p in cache.root.iterdir() if p.name.startswith(".")] == []  # nothing moved aside is left


def test_the_controller_fetch_heals_a_damaged_copy_at_once(two_models, caplog):
    """Presence check (missing file) and `heal` (changed byte): the same fetch downloads a fresh copy."""
    cache, allowed, digests = two_models
    (demo, demo_digest), (variant, variant_digest) = digests.items()
    flip_byte(cache.path(demo_digest) / UNET)
    (cache.path(variant_digest) / "vae" / "config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="diffops.serving"):
        fixed_demo = fetch(f"file://{demo}", demo_digest, cache, allowed_roots=allowed, reverify=True, heal=True)
        fixed_variant = fetch(f"file://{variant}", variant_digest, cache, allowed_roots=allowed)
    assert len(fixed_demo.healed) == 1
    assert re.fullmatch(f"{UNET}: sha256 [0-9a-f]{{12}}… does not match pinned [0-9a-f]{{12}}…", fixed_demo.healed[0])
    assert fixed_variant.healed == ("vae/config.json: missing, the pinned manifest lists it",)
    for result, digest in ((fixed_demo, demo_digest), (fixed_variant, variant_digest)):
        assert not result.cached and result.bytes_transferred > 400_000 and manifest_of(result.path).digest == digest
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(UNET in w and "downloading it again" in w for w in warnings)


def test_healing_with_the_store_gone_names_the_damaged_file_then_heals(two_models, tmp_path):
    cache, allowed, digests = two_models
    (demo, demo_digest), (variant, variant_digest) = digests.items()
    flip_byte(cache.path(demo_digest) / UNET)
    (cache.path(variant_digest) / "vae" / "config.json").unlink()
    away = tmp_path / "away"
    shutil.move(tmp_path / "models", away)  # the store is unreachable for a while

    with pytest.raises(ArtifactError, match=f"was damaged \\({UNET}: sha256 .* does not match pinned .*no such model directory"):
        fetch(f"file://{demo}", demo_digest, cache, allowed_roots=allowed, reverify=True, heal=True)
    with pytest.raises(ArtifactError, match="was damaged \\(vae/config.json: missing.*no such model directory"):
        fetch(f"file://{variant}", variant_digest, cache, allowed_roots=allowed)
    assert not cache.path(demo_digest).exists() and not cache.path(variant_digest).exists()  # nothing damaged is left to load

    shutil.move(away, tmp_path / "models")
    for model, digest in digests.items():
        result = fetch(f"file://{model}", digest, cache, allowed_roots=allowed, reverify=True)
        assert not result.cached and result.healed == () and manifest_of(result.path).digest == digest


DAMAGE = [
    ("extra file", lambda p: (p / "unet" / "extra.safetensors").write_bytes(b"x"),
     "unet/extra.safetensors: extra file, not in the pinned manifest"),
    ("a pickle dropped in", lambda p: (p / "unet" / "model.bin").write_bytes(b"x"), "unet/model.bin: .bin files are refused"),
    ("manifest deleted", lambda p: writable(p / MANIFEST_NAME).unlink(), f"{MANIFEST_NAME}: missing"),
    ("manifest edited", lambda p: writable(p / MANIFEST_NAME).write_text("0" * 64 + "  x.json\n"),
     f"{MANIFEST_NAME}: does not hash to the pinned digest"),
    ("truncated weights", lambda p: writable(p / UNET).write_bytes((p / UNET).read_bytes()[:-10]), f"{UNET}: sha256"),
    ("entry replaced by a file", lambda p: (shutil.rmtree(p), p.write_text("x")), "not a directory"),
    ("entry replaced by a link", lambda p: (shutil.move(p, p.parent / "elsewhere"), p.symlink_to(p.parent / "elsewhere")),
     "not a directory"),
]


@pytest.mark.parametrize("case", DAMAGE, ids=[c[0] for c in DAMAGE])
@pytest.mark.parametrize("heal", [True, False], ids=["heal", "refuse"])
def test_damage_is_refused_or_healed(case, heal, tmp_path):
    _, damage, named = case
    model = shutil.copytree(DEMO_MODEL, tmp_path / "models" / "demo")
    digest = manifest_of(model).digest
    cache = ModelCache(tmp_path / "cache")
    fetch(f"file://{model}", digest, cache, allowed_roots=(model.parent,))
    damage(cache.path(digest))
    if heal:
        result = fetch(f"file://{model}", digest, cache, allowed_roots=(model.parent,), reverify=True, heal=True)
        assert not result.cached and any(named in problem for problem in result.healed)
    else:
        with pytest.raises(ArtifactError, match=re.escape(named)):
            fetch(f"file://{model}", digest, cache, allowed_roots=(model.parent,), reverify=True)
        assert not cache.path(digest).exists()
        result = fetch(f"file://{model}", digest, cache, allowed_roots=(model.parent,), reverify=True)
        assert not result.cached and result.healed == ()
    assert manifest_of(result.path).digest == digest


def test_concurrent_fetchers_of_a_damaged_entry_both_get_the_healed_copy(two_models):
    cache, allowed, digests = two_models
    demo, digest = next(iter(digests.items()))
    (cache.path(digest) / "vae" / "config.json").unlink()
    results, errors = [], []

    def one() -> None:
        try:
            results.append(fetch(f"file://{demo}", digest, ModelCache(cache.root), allowed_roots=allowed))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.cached for r in results) == [False, True, True, True]  # one download heals it, the rest hit
    assert manifest_of(cache.path(digest)).digest == digest


# --- eviction with real entries ------------------------------------------------------------------------


def weights_model(target: Path, size: int, tag: str) -> tuple[Path, str]:
    """A model directory of `size` bytes of weights (random, so nothing compresses) and a small config."""
    (target / "unet").mkdir(parents=True)
    with open(target / UNET, "wb") as handle:
        remaining = size
        while remaining:
            chunk = min(remaining, 8 << 20)
            handle.write(os.urandom(chunk))
            remaining -= chunk
    (target / "model_index.json").write_text(json.dumps({"tag": tag}))
    return target, manifest_of(target).digest


def entry_bytes(cache: ModelCache, digest: str) -> int:
    return sum(p.stat().st_size for p in cache.path(digest).rglob("*") if p.is_file())


@pytest.fixture
def five_models(tmp_path):
    """Five cached models of 25 MB; used (in order) m1, m2, m3, m4, then m0 again."""
    cache = ModelCache(tmp_path / "cache")
    models = [weights_model(tmp_path / "models" / f"m{i}", 25 * MB, f"m{i}") for i in range(5)]
    for model, digest in models[1:] + models[:1]:
        fetch(f"file://{model}", digest, cache, allowed_roots=(tmp_path / "models",))
    fetch(f"file://{models[0][0]}", models[0][1], cache, allowed_roots=(tmp_path / "models",))
    return cache, models


def test_eviction_keeps_the_cache_under_its_cap_least_recently_used_first_never_a_kept_model(five_models, tmp_path):
    cache, models = five_models
    digests = [digest for _, digest in models]
    sizes = {digest: entry_bytes(cache, digest) for digest in digests}
    assert cache.size() == sum(sizes.values()) > 125 * MB
    cap = 60 * MB
    evicted = cache.evict(cap, keep={digests[1]})  # m1 is the least recently used, but live
    assert evicted == [(digests[2], sizes[digests[2]]), (digests[3], sizes[digests[3]]), (digests[4], sizes[digests[4]])]
    assert cache.size() <= cap and cache.size() == sizes[digests[0]] + sizes[digests[1]]
    assert cache.path(digests[1]).is_dir() and cache.path(digests[0]).is_dir()
    assert not any(cache.path(d).exists() for d in digests[2:])
    again = fetch(f"file://{models[2][0]}", digests[2], cache, allowed_roots=(tmp_path / "models",))
    assert not again.cached and again.bytes_transferred >= 25 * MB  # an evicted model downloads again


def test_kept_models_over_the_cap_stay_and_the_log_says_so(five_models, caplog):
    cache, models = five_models
    digests = {digest for _, digest in models}
    before = cache.size()
    with caplog.at_level(logging.WARNING, logger="diffops.serving"):
        assert cache.evict(10 * MB, keep=digests) == []
        assert cache.evict(10 * MB, keep=digests) == []
    assert cache.size() == before
    over = [r.getMessage() for r in caplog.records if "stays above" in r.getMessage()]
    assert len(over) == 1 and "5 models in use" in over[0] and "--cache-max-bytes" in over[0]  # once, not every tick


def test_an_entry_being_fetched_is_never_evicted(five_models):
    cache, models = five_models
    digests = [digest for _, digest in models]
    with cache.lock(digests[1]):  # m1, least recently used, is being re-verified by a replica
        evicted = cache.evict(80 * MB, keep=set())
    assert [d for d, _ in evicted] == [digests[2], digests[3]]  # the next two in LRU order instead
    assert cache.path(digests[1]).is_dir()


# --- scratch clean-up ----------------------------------------------------------------------------------

def test_stale_hub_download_and_trash_are_removed_on_open(tmp_path):
    root = tmp_path / "cache"
    partial = root / f".hub-{H}-0badf00d" / ".cache" / "huggingface" / "download" / "unet"
    partial.mkdir(parents=True)
    (partial / "diffusion_pytorch_model.safetensors.incomplete").write_bytes(b"\0" * 4096)
    trash = root / f".trash-{H}-0badf00d" / "unet"
    trash.mkdir(parents=True)
    (trash / "x.safetensors").write_bytes(b"x")
    (trash / "x.safetensors").chmod(0o444)
    stale = root / f".partial-{H}" / "files" / "unet"  # a failed download nobody resumed for over STALE_AFTER_S
    stale.mkdir(parents=True)
    (stale / "x.safetensors").write_bytes(b"x")
    long_ago = time.time() - STALE_AFTER_S - 60
    os.utime(root / f".partial-{H}", (long_ago, long_ago))
    unrelated = root / ".keep-me"
    unrelated.write_text("not ours")
    ModelCache(root)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".keep-me"]


def test_a_failed_hub_fetch_leaves_nothing_behind(tmp_path):
    """hf:// downloads go to a scratch dir under the cache, removed when the fetch fails (offline here)."""
    cache = tmp_path / "cache"
    before = set(Path("/tmp").glob("diffops-hf-*"))
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from serving.artifacts import ModelCache, fetch;"
         f"fetch('hf://org/model@main', 'sha256:{H}', ModelCache(Path(sys.argv[1])))", str(cache)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
        capture_output=True, text=True, timeout=120,
    )
    assert child.returncode != 0 and "Traceback" in child.stderr
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    assert set(Path("/tmp").glob("diffops-hf-*")) == before
