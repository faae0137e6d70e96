"""The node-local model cache on disk: entries, their checks, last use, eviction and clean-up.

`serving.artifacts.fetch` fills it; the controller bounds it (`evict`). Layout
under the cache root:

    sha256/<hex>/          one verified model directory per digest, files read-only
    sha256/<hex>/MODEL.sha256   its manifest (authenticated by the digest itself)
    sha256/<hex>.lock      the entry's lock: held by a fetch (download or re-verify) and by eviction
    sha256/<hex>.used      last-use stamp (its mtime), touched by every fetch of the digest
    .partial-<hex>/        a download in progress, or one that failed in transfer: files/ (renamed into place when
                           verified) and landed.json, what has landed (the next fetch of the digest resumes from it)
    .hub-<hex>-<tag>/      a Hugging Face snapshot in progress (`local_dir` mode: no hub cache elsewhere)
    .trash-<hex>-<tag>/    a damaged or evicted entry moved aside, removed right after

Opening a cache (`ModelCache(root)`) and every fetch sweep the scratch dirs:
trash always, staging and hub dirs only when no process holds their digest's
lock (so another process's fetch in progress is never touched), a partial dir
once it is older than `STALE_AFTER_S` (6 h) and unlocked. Partial dirs do not
count against the cache's cap. Lock files stay (removing a lock file others may
wait on would let two holders in).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from serving.cache_eviction import HEX64, CacheEntry, EvictionPlan, ScratchAction, classify_scratch, plan_eviction
from serving.manifest import MANIFEST_NAME, ArtifactError, Manifest, list_model_files, sha256_file

__all__ = ["EntryCheck", "ModelCache", "node_cache_dir"]

log = logging.getLogger("diffops.serving")
HASH_WORKERS = 4


@dataclass(frozen=True)
class EntryCheck:
    """What a cached entry looks like against its pinned digest; `problems` empty means intact."""

    exists: bool
    manifest: Manifest | None
    problems: tuple[str, ...]

    @property
    def intact(self) -> bool:
        return self.exists and self.manifest is not None and not self.problems


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _remove(path: Path) -> None:
    """Remove a directory tree, a file or a link; what cannot be removed now is left for the next sweep."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _hexof(digest: str) -> str:
    return digest.removeprefix("sha256:")


def node_cache_dir(given: str | None = None) -> Path:
    """This node's model cache: `given` (a cluster on the controller's machine shares its cache), else
    `DIFFOPS_CACHE_DIR`, else `diffops-models` under the Ray node's temp dir (where Ray keeps its own node-local files)."""
    if given:
        return Path(given)
    if os.environ.get("DIFFOPS_CACHE_DIR"):
        return Path(os.environ["DIFFOPS_CACHE_DIR"])
    try:
        from ray._private import worker  # the node this process runs on, inside a replica or a job

        node = worker._global_node
        temp = node.get_temp_dir_path() if node is not None else None
    except (ImportError, AttributeError):
        temp = None
    return Path(temp or os.path.join(os.environ.get("TMPDIR", "/tmp"), "ray")) / "diffops-models"


class ModelCache:
    """`<root>/sha256/<hex>/` holds one verified model directory per digest."""

    def __init__(self, root: Path, *, sweep: bool = True):
        self.root = Path(root)
        self._over_cap_logged: int | None = None
        if sweep:
            self.sweep()

    # --- layout ------------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / _hexof(digest)

    def lock(self, digest: str, timeout: float = -1) -> FileLock:
        self.root.joinpath("sha256").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path(digest)) + ".lock", timeout=timeout)

    def scratch(self, kind: str, digest: str) -> Path:
        """A fresh scratch dir name for `digest` (`hub`, `trash`); the caller holds the digest's lock."""
        return self.root / f".{kind}-{_hexof(digest)}-{uuid.uuid4().hex[:8]}"

    def partial(self, digest: str) -> Path:
        """Where a download of `digest` lands, and stays after a failed transfer for the next fetch to resume."""
        return self.root / f".partial-{_hexof(digest)}"

    def touch(self, digest: str) -> None:
        """Record a use of the entry (eviction is least-recently-used by this stamp, not by atime)."""
        stamp = Path(str(self.path(digest)) + ".used")
        stamp.touch()
        os.utime(stamp)

    # --- checking an entry ---------------------------------------------------------------------------

    def check(self, digest: str, *, rehash: bool) -> EntryCheck:
        """Presence check (authentic manifest, exactly its files) and, with `rehash`, every file's sha256."""
        path = self.path(digest)
        if not path.is_dir() or path.is_symlink():
            there = path.exists() or path.is_symlink()
            return EntryCheck(there, None, ("not a directory",) if there else ())
        try:
            manifest = Manifest.parse((path / MANIFEST_NAME).read_text())
        except FileNotFoundError:
            return EntryCheck(True, None, (f"{MANIFEST_NAME}: missing",))
        except (ArtifactError, UnicodeDecodeError, OSError) as err:
            return EntryCheck(True, None, (f"{MANIFEST_NAME}: unreadable ({err})",))
        if manifest.digest != digest:
            return EntryCheck(True, None, (f"{MANIFEST_NAME}: does not hash to the pinned digest",))
        try:
            present = list_model_files(path)
        except ArtifactError as err:
            return EntryCheck(True, manifest, (str(err),))
        if rehash:
            expected = [key for key in present if key in manifest.files]
            with ThreadPoolExecutor(HASH_WORKERS) as pool:  # hashlib releases the GIL: files hash in parallel
                hashes = dict(zip(expected, pool.map(lambda key: sha256_file(path / key), expected), strict=True))
            actual = Manifest({key: hashes.get(key, "-") for key in present})
        else:
            actual = Manifest({key: manifest.files.get(key, "-") for key in present})
        return EntryCheck(True, manifest, tuple(manifest.differences(actual)))

    def lookup(self, digest: str) -> Manifest | None:
        """The cached manifest if the entry passes the presence check, else None."""
        found = self.check(digest, rehash=False)
        return found.manifest if found.intact else None

    def discard(self, digest: str) -> None:
        """Move the entry aside and remove it; the caller holds the entry's lock."""
        path = self.path(digest)
        if not (path.exists() or path.is_symlink()):
            return
        trash = self.scratch("trash", digest)
        os.replace(path, trash)
        _remove(trash)
        Path(str(path) + ".used").unlink(missing_ok=True)

    # --- bounding it -----------------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every cached entry with its size and last use (the `.used` stamp, else the entry's own mtime)."""
        found = []
        base = self.root / "sha256"
        for path in base.iterdir() if base.is_dir() else ():
            if not HEX64.fullmatch(path.name) or not path.is_dir():
                continue
            try:
                size = sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
                stamp = Path(str(path) + ".used")
                last_used = stamp.stat().st_mtime if stamp.exists() else path.stat().st_mtime
            except FileNotFoundError:  # removed while we looked
                continue
            found.append(CacheEntry("sha256:" + path.name, size, last_used))
        return found

    def size(self) -> int:
        return sum(entry.bytes for entry in self.entries())

    def evict(self, max_bytes: int, keep: Iterable[str]) -> list[tuple[str, int]]:
        """Remove least-recently-used entries not in `keep` until the cache fits `max_bytes`.

        An entry whose lock is held (a fetch or re-verify in progress) is skipped
        this time. Returns (digest, bytes) per evicted entry.
        """
        started = time.monotonic()
        busy: set[str] = set()
        keep = set(keep)
        remaining = {entry.digest: entry for entry in self.entries()}
        evicted: list[tuple[str, int]] = []
        while True:
            plan = plan_eviction(remaining.values(), keep | busy, max_bytes)
            if not plan.victims:
                break
            victim = plan.victims[0]
            try:
                with self.lock(victim.digest, timeout=0):
                    self.discard(victim.digest)
            except Timeout:
                busy.add(victim.digest)
                continue
            del remaining[victim.digest]
            evicted.append((victim.digest, victim.bytes))
            log.info("model cache: evicted %s (%s, last used %.0fs ago); cache now %s of %s cap; next: %s",
                     victim.digest[:19], _gb(victim.bytes), time.time() - victim.last_used, _gb(plan.total_bytes - victim.bytes),
                     _gb(max_bytes), "evicting the next least recently used" if len(plan.victims) > 1 else "nothing more to evict",
                     )
        kept = sum(1 for digest in remaining if digest in keep)
        self._report_over_cap(plan, max_bytes, kept, len(busy), time.monotonic() - started)
        return evicted

    def _report_over_cap(self, plan: EvictionPlan, max_bytes: int, kept: int, busy: int, seconds: float) -> None:
        if not plan.over_cap:
            self._over_cap_logged = None
            return
        if self._over_cap_logged == plan.after_bytes:  # once per state, not once per tick
            return
        self._over_cap_logged = plan.after_bytes
        log.warning(
            "model cache: %s stays above its %s cap (%s held by %d models in use, %d busy fetching); keeping them; "
            "next: evicting when they are released (raise --cache-max-bytes if this persists) (%.2fs)",
            _gb(plan.after_bytes), _gb(max_bytes), _gb(plan.kept_bytes), kept, busy, seconds,
        )

    # --- clean-up ------------------------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Remove trash, and staging / hub dirs whose fetch is no longer running; return what was removed."""
        removed: list[str] = []
        try:
            names = [entry for entry in os.scandir(self.root) if entry.name.startswith(".")]
        except FileNotFoundError:
            return removed
        now = time.time()
        for entry in names:
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            decision = classify_scratch(entry.name, age)
            if decision.action is ScratchAction.REMOVE:
                _remove(Path(entry.path))
            elif decision.action is ScratchAction.REMOVE_IF_UNLOCKED and decision.digest:
                try:
                    with self.lock(decision.digest, timeout=0):
                        _remove(Path(entry.path))
                except Timeout:
                    continue  # a fetch of that digest is running (here or in another process)
            else:
                continue
            removed.append(entry.name)
        if removed:
            log.info("model cache: removed %d leftover scratch dirs (%s); next: nothing, they belonged to no running fetch",
                     len(removed), ", ".join(sorted(name[:24] + "…" for name in removed)))
        return removed
