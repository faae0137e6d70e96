"""How a fetch moves files (serving/transfer.py): the ranged parts that cover a file, files in parallel from a real
local store (in byte ranges, and streamed as from a store without them), and a store's byte-range reader (our own
boundary) answering short or a file failing its check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from serving.manifest import ArtifactError
from serving.stores import LocalStore
from serving.transfer import PART_BYTES, move_files, parts_of

P = PART_BYTES
PARTS = [
    # (size, the ranged reads that cover it)
    (0, []),
    (1, [(0, 1)]),
    (P, [(0, P)]),
    (P + 1, [(0, P), (P, 1)]),
    (2 * P + 5, [(0, P), (P, P), (2 * P, 5)]),
]


@pytest.mark.parametrize("size, parts", PARTS)
def test_parts_cover_a_file_once_in_order(size, parts):
    assert parts_of(size) == parts
    assert sum(length for _, length in parts) == size


def model_dir(root: Path) -> dict[str, bytes]:
    files = {"unet/diffusion_pytorch_model.safetensors": os.urandom(2 * P + 777), "vae/config.json": b'{"a": 1}',
             "model_index.json": b"{}", "text_encoder/model.safetensors": os.urandom(3 * 1024 * 1024)}
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


class RangedLocal(LocalStore):
    """A local folder that records the byte ranges read; `short` answers one byte less for that offset."""

    concurrency = 4

    def __init__(self, root: Path, short: int | None = None):
        super().__init__(root)
        self.short, self.ranges = short, []

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranges.append((key, offset))
        data = super().read_range(key, offset, length)
        return data[:-1] if offset == self.short else data


class StreamedLocal(LocalStore):
    """A local folder read as a store without byte ranges (a git tree, the Hub's download) is."""

    read_range = None


def move(store, files, staging, check=lambda key, sha: None):
    staging.mkdir()
    moved_bytes = []
    return move_files(store, {key: len(data) for key, data in files.items()}, staging, moved_bytes.append, check), moved_bytes


@pytest.mark.parametrize("ranged", [False, True], ids=["streamed", "ranged"])
def test_every_file_lands_whole_with_its_sha256(tmp_path, ranged):
    files = model_dir(tmp_path / "src")
    store = RangedLocal(tmp_path / "src") if ranged else StreamedLocal(tmp_path / "src")
    moved, progress = move(store, files, tmp_path / "staging")
    assert moved.hashes == {key: hashlib.sha256(data).hexdigest() for key, data in files.items()}
    assert all((tmp_path / "staging" / key).read_bytes() == data for key, data in files.items())
    assert sum(progress) == sum(len(data) for data in files.values())
    big = "unet/diffusion_pytorch_model.safetensors"
    assert moved.ranged_parts == (3 if ranged else 0)  # only the file of 2 parts or more goes in parts
    if ranged:
        assert sorted(store.ranges) == [(big, 0), (big, P), (big, 2 * P)]


def test_a_part_answered_short_stops_the_fetch_naming_the_bytes(tmp_path):
    files = model_dir(tmp_path / "src")
    with pytest.raises(ArtifactError, match=rf"unet/diffusion_pytorch_model.safetensors: the store answered {P - 1} bytes "
                                            rf"for bytes {P}-{2 * P - 1} of a {2 * P + 777}-byte file"):
        move(RangedLocal(tmp_path / "src", short=P), files, tmp_path / "staging")


def test_a_file_failing_its_check_is_the_error_reported_while_the_others_stop(tmp_path):
    files = model_dir(tmp_path / "src")

    def check(key: str, sha: str) -> None:
        if key == "vae/config.json":
            raise ArtifactError(f"{key}: sha256 {sha[:12]}… does not match pinned")

    with pytest.raises(ArtifactError, match="vae/config.json: sha256 .* does not match pinned"):
        move(RangedLocal(tmp_path / "src"), files, tmp_path / "staging", check)


def test_a_key_escaping_staging_is_refused_before_any_byte_moves(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "staging").mkdir()
    with pytest.raises(ArtifactError, match="would be written outside the cache"):
        move_files(LocalStore(tmp_path / "src"), {"../escape.json": 2}, tmp_path / "staging", lambda n: None, lambda k, s: None)
