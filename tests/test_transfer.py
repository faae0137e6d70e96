"""How a fetch moves files (serving/transfer.py): the ranged parts that cover a file, files in parallel from a real
local store (in byte ranges, and streamed as from a store without them), and a store's byte-range reader (our own
boundary) answering short or a file failing its check."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.manifest import ArtifactError
from serving.stores import LocalStore
from serving.transfer import PART_BYTES, PART_TRIES, Landed, TransferError, move_files, parts_of, resumable

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
    """A local folder that records the byte ranges read; `short` answers one byte less for that offset; reads at
    `drop` raise as a dropped connection does, `drops` times (every time when None)."""

    concurrency = 4

    def __init__(self, root: Path, short: int | None = None, drop: int | None = None, drops: int | None = None):
        super().__init__(root)
        self.short, self.drop, self.drops, self.ranges = short, drop, drops, []

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranges.append((key, offset))
        if offset == self.drop and (self.drops is None or self.drops > 0):
            self.drops = None if self.drops is None else self.drops - 1
            raise ConnectionResetError(104, "Connection reset by peer")
        data = super().read_range(key, offset, length)
        return data[:-1] if offset == self.short else data


class StreamedLocal(LocalStore):
    """A local folder read as a store without byte ranges (a git tree, the Hub's download) is."""

    read_range = None


def move(store, files, staging, check=lambda key, sha: None, journal=None, resume=None):
    staging.mkdir(exist_ok=True)
    moved_bytes = []
    listing = {key: len(data) for key, data in files.items()}
    return move_files(store, listing, staging, moved_bytes.append, check, journal, resume), moved_bytes


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


BIG = "unet/diffusion_pytorch_model.safetensors"
RESUMABLE = [
    # (case, journal, listing, sizes on disk, what may be resumed)
    ("whole parts of a ranged file", {BIG: {"size": 3 * P, "landed": 2 * P}}, {BIG: 3 * P}, {BIG: 3 * P}, {BIG: 2 * P}),
    ("a finished file", {"a.json": {"size": 9, "landed": 9}}, {"a.json": 9}, {"a.json": 9}, {"a.json": 9}),
    ("the store lists another size now", {BIG: {"size": 3 * P, "landed": P}}, {BIG: 3 * P + 1}, {BIG: 3 * P}, {}),
    ("the store no longer lists it", {BIG: {"size": 3 * P, "landed": P}}, {}, {BIG: 3 * P}, {}),
    ("the file on disk is shorter than journalled", {BIG: {"size": 3 * P, "landed": 2 * P}}, {BIG: 3 * P}, {BIG: P}, {}),
    ("the file is gone from disk", {BIG: {"size": 3 * P, "landed": P}}, {BIG: 3 * P}, {}, {}),
    ("not a part boundary", {BIG: {"size": 3 * P, "landed": P + 1}}, {BIG: 3 * P}, {BIG: 3 * P}, {}),
    ("nothing landed", {BIG: {"size": 3 * P, "landed": 0}}, {BIG: 3 * P}, {BIG: 3 * P}, {}),
    ("more than the file", {"a.json": {"size": 9, "landed": 10}}, {"a.json": 9}, {"a.json": 10}, {}),
    ("not numbers", {"a.json": {"size": "9", "landed": 9}}, {"a.json": 9}, {"a.json": 9}, {}),
]


@pytest.mark.parametrize("case", RESUMABLE, ids=[c[0] for c in RESUMABLE])
def test_what_an_attempt_may_take_from_an_earlier_one(case):
    _, journal, listing, on_disk, kept = case
    assert resumable(journal, listing, on_disk) == kept


def test_a_dropped_connection_costs_one_part_read_again(tmp_path, caplog):
    files = model_dir(tmp_path / "src")
    store = RangedLocal(tmp_path / "src", drop=P, drops=1)
    with caplog.at_level("WARNING", logger="diffops.serving"):
        moved, progress = move(store, files, tmp_path / "staging")
    assert moved.hashes[BIG] == hashlib.sha256(files[BIG]).hexdigest()
    assert sorted(store.ranges) == [(BIG, 0), (BIG, P), (BIG, P), (BIG, 2 * P)]  # the dropped part, and only it, twice
    assert sum(progress) == sum(len(data) for data in files.values())
    said = [r.getMessage() for r in caplog.records]
    assert any(f"{BIG} bytes {P}-{2 * P - 1}: ConnectionResetError" in line and "reading it again" in line for line in said)


def test_a_part_that_never_comes_fails_the_fetch_naming_it_and_the_journal_keeps_what_landed(tmp_path):
    files = model_dir(tmp_path / "src")
    journal = tmp_path / "landed.json"
    store = RangedLocal(tmp_path / "src", drop=2 * P)
    with pytest.raises(TransferError, match=rf"{BIG} bytes {2 * P}-{2 * P + 776}: read failed {PART_TRIES} time\(s\), "
                                            "last: ConnectionResetError"):
        move(store, files, tmp_path / "staging", journal=journal)
    assert store.ranges.count((BIG, 2 * P)) == PART_TRIES
    listing = {key: len(data) for key, data in files.items()}
    kept = Landed.read(journal, listing, tmp_path / "staging")
    assert kept[BIG] == 2 * P  # the parts before the missing one, in order

    again = RangedLocal(tmp_path / "src")
    moved, progress = move(again, files, tmp_path / "staging", journal=journal, resume=kept)
    assert again.ranges == [(BIG, 2 * P)]  # only the part that never came
    assert moved.resumed_bytes == sum(kept.values()) and moved.ranged_parts == 1
    assert moved.hashes == {key: hashlib.sha256(data).hexdigest() for key, data in files.items()}
    assert (tmp_path / "staging" / BIG).read_bytes() == files[BIG]
    assert sum(progress) == sum(len(data) for data in files.values())


def test_bytes_on_disk_that_changed_since_they_landed_fail_the_file_check(tmp_path):
    """What is resumed is hashed again: a byte changed on disk between attempts makes the file's sha256 differ."""
    files = model_dir(tmp_path / "src")
    staging = tmp_path / "staging"
    move(RangedLocal(tmp_path / "src"), files, staging)
    with open(staging / BIG, "r+b") as handle:
        handle.seek(P + 7)
        handle.write(bytes([files[BIG][P + 7] ^ 0x01]))
    seen = {}
    move(RangedLocal(tmp_path / "src"), files, staging, check=lambda key, sha: seen.setdefault(key, sha), resume={BIG: 2 * P})
    assert seen[BIG] != hashlib.sha256(files[BIG]).hexdigest()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 * P, 4 * P) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(journal=st.one_of(JSON, st.fixed_dictionaries({"files": st.dictionaries(st.sampled_from([BIG, "a.json", "x"]), JSON)})),
       raw=st.binary(max_size=64))
def test_a_damaged_journal_resumes_nothing_wrong(tmp_path, journal, raw):
    """Whatever a journal holds (any JSON, or bytes that are not JSON), reading it never raises and names only listed
    files, each with a prefix it may resume from."""
    staging = tmp_path / "staging"
    (staging / "unet").mkdir(parents=True, exist_ok=True)
    (staging / BIG).write_bytes(b"")
    os.truncate(staging / BIG, 3 * P)
    listing = {BIG: 3 * P, "a.json": 9}
    for body in (json.dumps(journal).encode(), raw):
        (tmp_path / "landed.json").write_bytes(body)
        kept = Landed.read(tmp_path / "landed.json", listing, staging)
        assert set(kept) <= {BIG} and all(0 < n <= listing[k] and (n % P == 0 or n == listing[k]) for k, n in kept.items())
