"""Signed-commit verification (`diffops controller run --require-signed-commits`).

Sits between "resolve the branch head" and "read blobs at that commit" in a
reconcile: only a HEAD signed by a trusted key is reconciled (Flux `verify`
semantics: HEAD only, not its ancestors). Verification is git's own
`git verify-commit`, against SSH keys in an allowed signers file
(`gpg.ssh.allowedSignersFile`) and/or OpenPGP keys in a GnuPG keyring.

`classify` turns git's answer into a `Verdict` (pure); `verify` is the thin
I/O around git; `SignatureGate` caches one verdict per commit and decides
what a tick reconciles: HEAD, the last accepted commit, or nothing.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from controller.state.store import RefusedCommit

__all__ = ["Admission", "Commit", "Format", "Reason", "SignatureError", "SignatureGate", "Trust", "TrustError", "Verdict", "check_trust",
           "classify", "parse_commit", "verify"]

log = logging.getLogger("diffops.controller")

Format = Literal["ssh", "openpgp", "x509", "unknown"]
Reason = Literal["unsigned", "untrusted-key", "bad-signature"]
GIT_TIMEOUT_S = 30.0
CACHE_SIZE = 256
SIGNATURE_HEADERS = ("gpgsig ", "gpgsig-sha256 ")
ARMOR: dict[str, Format] = {"-----BEGIN SSH SIGNATURE-----": "ssh", "-----BEGIN PGP SIGNATURE-----": "openpgp",
                           "-----BEGIN PGP MESSAGE-----": "openpgp", "-----BEGIN SIGNED MESSAGE-----": "x509"}  # as git tells them apart
FORMAT_NAMES = {"ssh": "an SSH key", "openpgp": "an OpenPGP key", "x509": "an X.509 certificate",
                "unknown": "a signature of a kind git does not know"}


class SignatureError(Exception):
    """Verification could not run (git or gpg missing, a timeout, an unknown commit): temporary, retried."""


class TrustError(Exception):
    """The trust configuration is unusable (no such file, no keys): fix the flags and start again."""


@dataclass(frozen=True)
class Trust:
    """Which keys sign releasable commits: SSH keys in an allowed signers file and/or OpenPGP keys in a keyring."""

    allowed_signers: Path | None = None  # git's gpg.ssh.allowedSignersFile format
    openpgp: bool = False
    gnupghome: Path | None = None  # None with openpgp: $GNUPGHOME, else ~/.gnupg (gpg's own default)

    @classmethod
    def from_flags(cls, allowed_signers: Path | None, gnupghome: Path | None) -> Trust:
        """`--allowed-signers` trusts SSH keys, `--gnupghome` OpenPGP keys; neither: the keyring in $GNUPGHOME."""
        return cls(allowed_signers.resolve() if allowed_signers else None, openpgp=gnupghome is not None or allowed_signers is None,
                   gnupghome=gnupghome.resolve() if gnupghome else None)

    @property
    def formats(self) -> tuple[Format, ...]:
        ssh: tuple[Format, ...] = ("ssh",) if self.allowed_signers else ()
        openpgp: tuple[Format, ...] = ("openpgp",) if self.openpgp else ()
        return ssh + openpgp

    def keyring(self) -> str:
        return str(self.gnupghome or os.environ.get("GNUPGHOME") or Path.home() / ".gnupg")

    def describe(self) -> str:
        parts = [f"SSH keys in {self.allowed_signers}"] if self.allowed_signers else []
        return " and ".join(parts + ([f"OpenPGP keys in the keyring {self.keyring()}"] if self.openpgp else []))

    def remedy(self) -> str:
        where = " or ".join(([f"list it in {self.allowed_signers}"] if self.allowed_signers else [])
                            + ([f"import it into the keyring {self.keyring()}"] if self.openpgp else []))
        return (f"push a commit signed by a trusted key (`git commit -S`; `git commit --amend --no-edit -S` signs this one); "
                f"to trust another key, {where}")


@dataclass(frozen=True)
class Commit:
    """What a raw commit object says about itself: its signature's format, author and subject."""

    sha: str
    signature: Format | None
    author: str
    subject: str

    @property
    def title(self) -> str:
        return f'"{self.subject}" by {self.author}' if self.author else f'"{self.subject}"'


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one commit: accepted (with its signer) or refused (with the reason and what to do)."""

    commit: Commit
    ok: bool
    reason: Reason | None  # None when accepted
    detail: str  # the signer when accepted; what git / gpg / ssh-keygen said when refused
    remedy: str = ""

    @property
    def summary(self) -> str:
        """What happened."""
        if self.ok:
            return f"{self.commit.title}: good signature by {self.detail}"
        what = {"unsigned": "not signed", "untrusted-key": "signed by a key that is not trusted",
                "bad-signature": "signature does not verify (the commit changed after signing, or the signature is corrupt)"}
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.commit.title}: {what[self.reason or 'unsigned']}{detail}"

    @property
    def message(self) -> str:
        """What happened and what to do, for `diffops status`."""
        return self.summary if self.ok else f"{self.summary}; to release it, {self.remedy}"


def parse_commit(sha: str, raw: str) -> Commit:
    """Signature format, author and subject of a raw commit object (`git cat-file commit`)."""
    headers, _, body = raw.partition("\n\n")
    signature: Format | None = None
    author = ""
    for line in headers.splitlines():
        if line.startswith(SIGNATURE_HEADERS) and signature is None:
            armor = line.split(" ", 1)[1].strip()
            signature = ARMOR.get(armor, "unknown")
        elif line.startswith("author "):
            author = re.sub(r"\s+\d+\s+[+-]\d{4}$", "", line[len("author "):])
    subject = next((line.strip() for line in body.splitlines() if line.strip()), "")
    return Commit(sha, signature, author, subject[:120])


def classify(commit: Commit, trust: Trust, returncode: int, output: str) -> Verdict:
    """git verify-commit's exit code and output (`--raw`: gpg status lines, ssh-keygen's words) as a verdict."""
    remedy = trust.remedy()
    if commit.signature is None:
        return Verdict(commit, False, "unsigned", "", remedy)
    if commit.signature not in trust.formats:
        detail = f"signed with {FORMAT_NAMES[commit.signature]}; this controller trusts only {trust.describe()}"
        return Verdict(commit, False, "untrusted-key", detail, remedy)
    if commit.signature == "ssh":
        return _classify_ssh(commit, returncode, output, remedy)
    return _classify_openpgp(commit, returncode, output, remedy)


def _classify_ssh(commit: Commit, returncode: int, output: str, remedy: str) -> Verdict:
    good = re.search(r'Good "git" signature (?:for (\S+) )?with (\S+) key (\S+)', output)
    if returncode == 0 and good and good.group(1):
        return Verdict(commit, True, None, f"{good.group(1)} ({good.group(2)} key {good.group(3)})")
    if good or "No principal matched" in output:
        key = f"{good.group(2)} key {good.group(3)}" if good else "its key"
        return Verdict(commit, False, "untrusted-key", f"{key} is not in the allowed signers file", remedy)
    if re.search(r"incorrect signature|Signature verification failed|Could not verify signature", output):
        return Verdict(commit, False, "bad-signature", _last_line(output), remedy)
    raise SignatureError(f"commit {commit.sha[:12]}: git verify-commit could not check its SSH signature: "
                         f"{_last_line(output) or f'exit {returncode}'}; check that ssh-keygen is installed")


def _classify_openpgp(commit: Commit, returncode: int, output: str, remedy: str) -> Verdict:
    status = dict(re.findall(r"^\[GNUPG:\] (\w+) ?(.*)$", output, re.MULTILINE))
    uid = status.get("GOODSIG", "").partition(" ")[2]
    fingerprint = status.get("VALIDSIG", "").split(" ")[0]
    if returncode == 0 and "GOODSIG" in status:
        return Verdict(commit, True, None, f"{uid} (OpenPGP key {fingerprint})")
    if "BADSIG" in status:
        return Verdict(commit, False, "bad-signature", f"gpg: bad signature from {status['BADSIG']}", remedy)
    for word, what in (("NO_PUBKEY", "key {} is not in the keyring"), ("EXPKEYSIG", "key {} has expired"),
                       ("REVKEYSIG", "key {} is revoked"), ("EXPSIG", "the signature by {} has expired"),
                       ("GOODSIG", "key {} is below gpg.minTrustLevel")):
        if word in status:
            return Verdict(commit, False, "untrusted-key", what.format(status[word].split(" ")[0]), remedy)
    if "ERRSIG" in status:
        return Verdict(commit, False, "bad-signature", f"gpg could not check it: ERRSIG {status['ERRSIG']}", remedy)
    raise SignatureError(f"commit {commit.sha[:12]}: git verify-commit could not check its OpenPGP signature: "
                         f"{_last_line(output) or f'exit {returncode}'}; check that gpg is installed and the keyring readable")


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("[GNUPG:]")]
    return lines[-1] if lines else ""


def _git(git_dir: Path, trust: Trust, *args: str) -> subprocess.CompletedProcess[str]:
    config = ["-c", "gpg.format=ssh", "-c", f"gpg.ssh.allowedSignersFile={trust.allowed_signers}"] if trust.allowed_signers else []
    env = {**os.environ, "LC_ALL": "C", "LANGUAGE": ""}
    if trust.gnupghome is not None:
        env["GNUPGHOME"] = str(trust.gnupghome)
    try:
        return subprocess.run(["git", "--git-dir", str(git_dir), *config, *args], capture_output=True, text=True,
                              env=env, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SignatureError(f"git {args[0]} failed to run ({err}); check that git is installed") from None


def verify(git_dir: Path, sha: str, trust: Trust) -> Verdict:
    """Verify one commit's signature through git; SignatureError when it cannot be checked at all."""
    raw = _git(git_dir, trust, "cat-file", "commit", sha)
    if raw.returncode != 0:
        raise SignatureError(f"commit {sha[:12]} not found in {git_dir}: {raw.stderr.strip()}")
    commit = parse_commit(sha, raw.stdout)
    if commit.signature not in trust.formats:  # decided without git: a format we do not trust never reaches a verifier
        return classify(commit, trust, 1, "")
    checked = _git(git_dir, trust, "verify-commit", "--raw", sha)
    return classify(commit, trust, checked.returncode, checked.stdout + checked.stderr)


def check_trust(trust: Trust) -> str:
    """At start-up: every trust source exists and holds keys. Returns what is trusted, for the log; TrustError if not."""
    parts = []
    if trust.allowed_signers is not None:
        try:
            lines = trust.allowed_signers.read_text().splitlines()
        except OSError as err:
            raise TrustError(f"--allowed-signers {trust.allowed_signers}: cannot read it ({err.strerror}); "
                             "pass a file of `<principal> <key type> <public key>` lines") from None
        keys = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise TrustError(f"--allowed-signers {trust.allowed_signers}: no keys in it, so every commit would be refused; "
                             "add `<principal> ssh-ed25519 AAAA…` lines")
        parts.append(f"{len(keys)} SSH key(s) in {trust.allowed_signers}")
    if trust.openpgp:
        env = {**os.environ, "LC_ALL": "C", "GNUPGHOME": trust.keyring()}
        try:
            listed = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], capture_output=True, text=True,
                                    env=env, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise TrustError(f"gpg cannot list the keyring {trust.keyring()} ({err}); install gnupg or pass --allowed-signers") from None
        count = sum(1 for line in listed.stdout.splitlines() if line.startswith("pub:"))
        if count == 0:
            raise TrustError(f"no OpenPGP keys in the keyring {trust.keyring()}, so every commit would be refused; "
                             "import the signers' public keys (gpg --import), pass --gnupghome DIR, or use --allowed-signers FILE")
        parts.append(f"{count} OpenPGP key(s) in {trust.keyring()}")
    return " and ".join(parts)


@dataclass(frozen=True)
class Admission:
    """What one tick reconciles under --require-signed-commits, and the refusal to record (None: HEAD accepted)."""

    commit: str | None  # HEAD, the last accepted commit, or None: reconcile nothing
    refused: RefusedCommit | None


_Stamp = tuple[tuple[str, int | None, int | None], ...]  # (path, mtime in ns, size) of each trust file


class SignatureGate:
    """Verifies each new HEAD once (one verdict per commit and trust files), and logs each refusal once."""

    def __init__(self, git_dir: Path, trust: Trust):
        self.git_dir, self.trust = Path(git_dir), trust
        self.verdicts: dict[tuple[str, _Stamp], Verdict] = {}

    def _stamp(self) -> _Stamp:
        """The trust files' identity: editing the allowed signers file or the keyring re-verifies HEAD."""
        paths = [self.trust.allowed_signers] if self.trust.allowed_signers else []
        if self.trust.openpgp:
            paths += [Path(self.trust.keyring()) / name for name in ("pubring.kbx", "pubring.gpg", "trustdb.gpg")]
        stamp: list[tuple[str, int | None, int | None]] = []
        for path in paths:
            try:
                info = path.stat()
                stamp.append((str(path), info.st_mtime_ns, info.st_size))
            except OSError:
                stamp.append((str(path), None, None))
        return tuple(stamp)

    def verdict(self, sha: str) -> tuple[Verdict, float | None]:
        """The cached verdict for a commit, or a fresh one with the seconds it took (None when cached)."""
        key = (sha, self._stamp())
        if key in self.verdicts:
            return self.verdicts[key], None
        started = time.monotonic()
        verdict = verify(self.git_dir, sha, self.trust)
        self.verdicts[key] = verdict
        while len(self.verdicts) > CACHE_SIZE:
            self.verdicts.pop(next(iter(self.verdicts)))
        return verdict, time.monotonic() - started

    def admit(self, head: str, last: str | None, refused: RefusedCommit | None, now: float) -> Admission:
        """HEAD if it verifies; else `last` (the commit last reconciled) if that verifies, else nothing."""
        verdict, took = self.verdict(head)
        subject = f"commit {head[:12]}"
        if verdict.ok:
            if took is not None:
                log.info("%s: accepted: %s; next: reconcile it (verified in %.0f ms)", subject, verdict.summary, took * 1000,
                         extra={"subject": subject, "event": "signature-accepted"})
            return Admission(head, None)
        fallback = None
        if last and last != head:
            try:
                fallback = last if self.verdict(last)[0].ok else None
            except SignatureError:  # the last commit is gone (force-push, prune): nothing to fall back to
                fallback = None
        if took is not None:
            nxt = (f"nothing from it is applied; still reconciling {fallback[:12]} (the last accepted commit)" if fallback else
                   "nothing is applied and serving is unchanged (no commit was accepted yet)")
            log.warning("%s: refused (%s): %s; next: %s until a signed head arrives; to release it, %s (verified in %.0f ms)",
                        subject, verdict.reason, verdict.summary, nxt, verdict.remedy, took * 1000,
                        extra={"subject": subject, "event": "signature-refused"})
        if refused is None or refused.commit != head or refused.message != verdict.message:
            refused = RefusedCommit(head, verdict.reason or "unsigned", verdict.message, now)
        return Admission(fallback, refused)
