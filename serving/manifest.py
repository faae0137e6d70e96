"""Model digests: the per-file manifest a release pins, and the file policy.

Sits under artifact fetch (`serving.artifacts`) and `diffops model digest`.
A model directory's digest is the sha256 of its manifest: one line
`<sha256 hex>  <relative posix path>` per file, sorted by path, the format
`sha256sum -c` reads. A model directory may carry that manifest as
`MODEL.sha256`; the pinned digest authenticates it, so a mismatch can name the
exact file that differs. The manifest file itself is not listed in itself.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["ArtifactError", "CHUNK", "MANIFEST_NAME", "Manifest", "REFUSED_SUFFIXES", "check_key", "list_model_files", "manifest_of",
           "sha256_file", "verify"]

MANIFEST_NAME = "MODEL.sha256"
REFUSED_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".py", ".pyc"})
CHUNK = 1 << 20


class ArtifactError(Exception):
    """A model artifact is refused: unsafe, incomplete, or not what was pinned."""


@dataclass(frozen=True)
class Manifest:
    """Per-file sha256 of a model directory; `digest` is what a release pins."""

    files: dict[str, str]  # relative posix path -> sha256 hex

    def text(self) -> str:
        return "".join(f"{sha}  {path}\n" for path, sha in sorted(self.files.items()))

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.text().encode()).hexdigest()

    @classmethod
    def parse(cls, text: str) -> Manifest:
        files: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            sha, sep, path = line.partition("  ")
            if not sep or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise ArtifactError(f"{MANIFEST_NAME}:{number}: expected '<sha256 hex>  <path>'")
            files[check_key(path)] = sha
        return cls(files)

    def differences(self, actual: Manifest) -> list[str]:
        """Human-readable per-file differences, expected (self) against actual."""
        out = []
        for path in sorted(self.files.keys() | actual.files.keys()):
            want, got = self.files.get(path), actual.files.get(path)
            if want is None:
                out.append(f"{path}: extra file, not in the pinned manifest")
            elif got is None:
                out.append(f"{path}: missing, the pinned manifest lists it")
            elif want != got:
                out.append(f"{path}: sha256 {got[:12]}… does not match pinned {want[:12]}…")
        return out


def check_key(key: str) -> str:
    """Return a model-relative file key, or refuse one that is unsafe to load."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or key.startswith("\\") or ":" in path.parts[0]:
        raise ArtifactError(f"{key!r}: absolute file keys are refused")
    if any(part in ("..", ".", "") for part in key.split("/")):
        raise ArtifactError(f"{key!r}: file keys with '..' or empty parts are refused")
    if path.suffix.lower() in REFUSED_SUFFIXES:
        raise ArtifactError(
            f"{key}: {path.suffix} files are refused (pickle or code could run on load); "
            "convert weights to safetensors and remove code files"
        )
    return key


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_model_files(root: Path) -> list[str]:
    """Every regular file under root as a checked key; refuse links that escape."""
    root = root.resolve()
    keys = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            entry = here / name
            if entry.is_symlink():
                target = entry.resolve()
                if not target.is_relative_to(root):
                    raise ArtifactError(f"{entry.relative_to(root).as_posix()}: symlink escapes the model directory")
        for name in filenames:
            key = (here / name).relative_to(root).as_posix()
            if key != MANIFEST_NAME:
                keys.append(check_key(key))
    return sorted(keys)


def manifest_of(root: Path) -> Manifest:
    """Hash a model directory on disk (after the file policy accepts it)."""
    return Manifest({key: sha256_file(root / key) for key in list_model_files(root)})


def verify(root: Path, pinned: str) -> Manifest:
    """Check a directory against a pinned digest; name the files that differ."""
    actual = manifest_of(root)
    if actual.digest == pinned:
        return actual
    shipped = root / MANIFEST_NAME
    if shipped.is_file():
        expected = Manifest.parse(shipped.read_text())
        if expected.digest == pinned:
            details = "; ".join(expected.differences(actual))
            raise ArtifactError(f"digest mismatch: {details}")
    raise ArtifactError(
        f"digest mismatch: files hash to {actual.digest}, release pins {pinned} "
        f"(no authentic {MANIFEST_NAME} to name the file; write one with 'diffops model digest --write')"
    )
