"""`--require-signed-commits`: real git repositories, real SSH and OpenPGP keys, commits signed through git.

The reconciler is the real one with real SQLite and model verification; only
Ray Serve is faked, at our own boundary (the FakeServe of test_reconciler).
Assertions are on what is applied and on what `diffops status` shows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from controller.apply.serve_config import RenderSettings
from controller.cli.status_view import status_json, status_text
from controller.reconciler import Reconciler
from controller.source import signatures
from controller.source.git_source import ReleaseSource
from controller.source.signatures import Commit, SignatureGate, Trust, classify, parse_commit
from controller.state.store import ControllerRecord, RefusedCommit, State, Store
from tests.conftest import ReleaseRepo
from tests.test_reconciler import FakeServe, tick_until

DIFFOPS = str(Path(sys.executable).with_name("diffops"))
GATE_S = 120  # the real gate runs on CPU: generous on a busy machine


def settle(rec: Reconciler, check) -> State:
    return tick_until(rec, check, timeout=GATE_S)


class Keys:
    """SSH keys made with ssh-keygen: alice is in the allowed signers file, mallory is not."""

    def __init__(self, root: Path):
        root.mkdir()
        for name in ("alice", "mallory"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name)], check=True)
        self.alice, self.mallory = root / "alice", root / "mallory"
        self.allowed = root / "allowed_signers"
        self.allowed.write_text(f"alice@example.com {(root / 'alice.pub').read_text()}")

    def allow(self, name: str) -> None:
        key = getattr(self, name)
        self.allowed.write_text(self.allowed.read_text() + f"{name}@example.com {key.with_suffix('.pub').read_text()}")


class Keyring:
    """A GnuPG home with one ed25519 key, made with `gpg --quick-gen-key`; its agent is stopped afterwards."""

    def __init__(self, home: Path, uid: str):
        home.mkdir(mode=0o700)
        self.home = home
        self.gpg("--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        listed = self.gpg("--with-colons", "--list-keys").stdout
        self.fingerprint = next(line.split(":")[9] for line in listed.splitlines() if line.startswith("fpr:"))

    def gpg(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["gpg", "--batch", "--homedir", str(self.home), *args], check=True, capture_output=True, text=True)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], capture_output=True)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def keyrings(tmp_path: Path):
    trusted, stranger = Keyring(tmp_path / "gpg", "Alice <alice@example.com>"), Keyring(tmp_path / "gpg-x", "Eve <eve@example.com>")
    yield trusted, stranger
    trusted.close()
    stranger.close()


@pytest.fixture
def refusals():
    """Every 'refused' log line of the controller."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "signature-refused":
                lines.append(record.getMessage())

    handler, logger = Collect(), logging.getLogger("diffops.controller")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def ssh_commit(repo: ReleaseRepo, key: Path, message: str) -> str:
    return _git_commit(repo, message, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}")


def gpg_commit(repo: ReleaseRepo, keyring: Keyring, message: str) -> str:
    return _git_commit(repo, message, "-c", "gpg.format=openpgp", "-c", f"user.signingkey={keyring.fingerprint}",
                       env={"GNUPGHOME": str(keyring.home)})


def _git_commit(repo: ReleaseRepo, message: str, *config: str, env: dict | None = None) -> str:
    subprocess.run(["git", "-C", str(repo.path), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo.path), *config, "commit", "-q", "-S", "--allow-empty", "-m", message],
                   check=True, env={**os.environ, **(env or {})})
    return repo.repo.head.commit.hexsha


def reconciler(repo: ReleaseRepo, state_dir: Path, serve: FakeServe, trust: Trust) -> Reconciler:
    settings = RenderSettings(repo=str(repo.path), cache_dir=str(state_dir / "models"))
    source = ReleaseSource.open(repo.path)
    gate = SignatureGate(Path(source.repo.git_dir), trust)
    return Reconciler(source, Store(state_dir / "state.db"), serve, settings, signatures=gate)


def healthy(state: State) -> bool:
    return bool(state.releases.get("demo")) and state.releases["demo"].phase == "Healthy"


def shown(state_dir: Path) -> dict:
    """`diffops status --json` as a user runs it."""
    result = subprocess.run([DIFFOPS, "status", "--json", "--state-dir", str(state_dir)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_head_signed_by_an_allowed_ssh_key_is_reconciled(model_repo: ReleaseRepo, keys: Keys, tmp_path, refusals):
    head = ssh_commit(model_repo, keys.alice, "release demo, signed")  # only HEAD is verified: the unsigned parent is fine
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    state = settle(rec, healthy)
    assert state.controller.last_attempted_commit == head and state.controller.refused is None
    assert {a["name"] for a in serve.config["applications"]} == {"demo", f"demo--{state.versions[0].version}"}
    assert shown(tmp_path / "state")["refused_commit"] is None
    assert refusals == []


def test_unsigned_head_is_refused_and_serving_is_unchanged(model_repo: ReleaseRepo, keys: Keys, tmp_path, refusals, monkeypatch):
    accepted = ssh_commit(model_repo, keys.alice, "release demo, signed")
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    before = settle(rec, healthy)
    config, applies = serve.config, serve.applies

    model_repo.release(**{"steps: 4": "steps: 6"})  # a version change: would start a new app
    refused = model_repo.commit("six steps, unsigned")
    calls: list[str] = []
    real_verify = signatures.verify
    monkeypatch.setattr(signatures, "verify", lambda git_dir, sha, trust: calls.append(sha) or real_verify(git_dir, sha, trust))
    for _ in range(5):
        assert rec.reconcile().ok
    state = Store(tmp_path / "state" / "state.db").load()

    assert serve.config == config and serve.applies == applies  # nothing from the refused commit reached Ray Serve
    assert state.versions == before.versions and state.releases == before.releases
    assert state.controller.last_attempted_commit == accepted  # still reconciling the last accepted commit
    assert (state.controller.refused.commit, state.controller.refused.reason) == (refused, "unsigned")
    assert calls == [refused]  # verified once, not every tick (the accepted commit's verdict was cached already)
    assert len(refusals) == 1 and refused[:12] in refusals[0] and "unsigned" in refusals[0]
    assert f"still reconciling {accepted[:12]}" in refusals[0]

    status = shown(tmp_path / "state")
    assert status["commit"] == accepted
    assert status["refused_commit"]["commit"] == refused and status["refused_commit"]["reason"] == "unsigned"
    assert '"six steps, unsigned" by Release Author <author@example.com>: not signed' in status["refused_commit"]["message"]
    assert str(keys.allowed) in status["refused_commit"]["message"]  # says what to do
    assert status["releases"][0]["phase"] == "Healthy" and status["releases"][0]["desired_commit"] == accepted
    text = subprocess.run([DIFFOPS, "status", "--state-dir", str(tmp_path / "state")], capture_output=True, text=True).stdout
    assert f"refused   {refused[:12]} (unsigned" in text and "nothing from it is applied" in text


def test_head_signed_by_an_unknown_key_is_refused(model_repo: ReleaseRepo, keys: Keys, tmp_path, refusals):
    accepted = ssh_commit(model_repo, keys.alice, "release demo, signed")
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    settle(rec, healthy)
    config = serve.config
    model_repo.release(**{"steps: 4": "steps: 6"})
    refused = ssh_commit(model_repo, keys.mallory, "six steps, signed by mallory")
    rec.reconcile()
    rec.reconcile()
    assert serve.config == config
    record = Store(tmp_path / "state" / "state.db").load().controller
    assert record.last_attempted_commit == accepted
    assert record.refused.commit == refused and record.refused.reason == "untrusted-key"
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(keys.mallory)], capture_output=True, text=True).stdout.split()[1]
    assert f"ED25519 key {fingerprint} is not in the allowed signers file" in record.refused.message
    assert len(refusals) == 1

    keys.allow("mallory")  # trusting the key re-verifies HEAD on the next tick
    state = settle(rec, lambda s: s.controller.last_attempted_commit == refused)
    assert state.controller.refused is None


def test_a_later_signed_commit_is_accepted_and_clears_the_refusal(model_repo: ReleaseRepo, keys: Keys, tmp_path, refusals):
    ssh_commit(model_repo, keys.alice, "release demo, signed")
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    old = settle(rec, healthy).versions[0].version
    model_repo.release(**{"steps: 4": "steps: 6"})
    model_repo.commit("six steps, unsigned")
    rec.reconcile()
    assert shown(tmp_path / "state")["refused_commit"] is not None

    signed = ssh_commit(model_repo, keys.alice, "six steps, signed")  # same tree, now signed: this one is released
    state = settle(rec, lambda s: healthy(s) and s.releases["demo"].desired_commit == signed
                       and any(v.role == "stable" and v.version != old for v in s.versions))
    assert state.controller.refused is None
    status = shown(tmp_path / "state")
    assert status["refused_commit"] is None and status["commit"] == signed
    assert any(a["name"].startswith("demo--") and a["args"]["commit"] == signed for a in serve.config["applications"])
    assert len(refusals) == 1


def test_nothing_is_reconciled_before_a_commit_is_accepted(model_repo: ReleaseRepo, keys: Keys, tmp_path, refusals):
    head = model_repo.repo.head.commit.hexsha  # the fixture's commit is unsigned
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    assert rec.reconcile().ok and rec.reconcile().ok
    assert serve.applies == 0
    status = shown(tmp_path / "state")
    assert status["commit"] is None and status["releases"] == []
    assert status["refused_commit"]["commit"] == head
    assert "no commit was accepted yet" in refusals[0] and len(refusals) == 1

    rec.close()  # a restart verifies HEAD again and keeps the refusal's first time
    again = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    again.reconcile()
    assert again.state.controller.refused.at == status["refused_commit"]["at"] and serve.applies == 0


def test_a_signature_that_does_not_match_the_commit_is_refused(model_repo: ReleaseRepo, keys: Keys, tmp_path):
    signed = ssh_commit(model_repo, keys.alice, "release demo, signed")
    raw = model_repo.repo.git.cat_file("commit", signed) + "\n"
    forged = subprocess.run(["git", "-C", str(model_repo.path), "hash-object", "-t", "commit", "-w", "--stdin"],
                            input=raw.replace("release demo, signed", "release demo, forged"), capture_output=True, text=True,
                            check=True).stdout.strip()
    model_repo.repo.git.update_ref("refs/heads/main", forged)
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    rec.reconcile()
    refused = rec.state.controller.refused
    assert serve.applies == 0 and refused.commit == forged and refused.reason == "bad-signature"


def test_restart_resumes_from_the_last_accepted_commit(model_repo: ReleaseRepo, keys: Keys, tmp_path):
    accepted = ssh_commit(model_repo, keys.alice, "release demo, signed")
    serve = FakeServe()
    first = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    settle(first, healthy)
    model_repo.release(**{"steps: 4": "steps: 6"})
    model_repo.commit("six steps, unsigned")
    first.close()
    config = serve.config
    second = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(keys.allowed, None))
    assert second.reconcile().ok
    assert serve.config == config and second.state.controller.last_attempted_commit == accepted
    assert second.state.releases["demo"].phase == "Healthy"


def test_gpg_signed_head_is_accepted_and_unsigned_or_unknown_key_refused(model_repo: ReleaseRepo, keyrings, tmp_path, refusals):
    trusted, stranger = keyrings
    accepted = gpg_commit(model_repo, trusted, "release demo, signed with OpenPGP")
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, Trust.from_flags(None, trusted.home))
    state = settle(rec, healthy)
    assert state.controller.last_attempted_commit == accepted and state.controller.refused is None
    config = serve.config

    model_repo.release(**{"steps: 4": "steps: 6"})
    unsigned = model_repo.commit("six steps, unsigned")
    rec.reconcile()
    assert serve.config == config and rec.state.controller.refused.reason == "unsigned"
    assert rec.state.controller.refused.commit == unsigned

    by_stranger = gpg_commit(model_repo, stranger, "six steps, signed by a key not in the keyring")
    rec.reconcile()
    refused = rec.state.controller.refused
    assert serve.config == config and (refused.commit, refused.reason) == (by_stranger, "untrusted-key")
    assert f"key {stranger.fingerprint[-16:]} is not in the keyring" in refused.message
    assert rec.state.controller.last_attempted_commit == accepted and len(refusals) == 2


def test_ssh_trust_refuses_an_openpgp_signature_and_the_reverse(model_repo: ReleaseRepo, keys: Keys, keyrings, tmp_path):
    trusted, _ = keyrings
    gpg_signed = gpg_commit(model_repo, trusted, "signed with OpenPGP")
    only_ssh = Trust.from_flags(keys.allowed, None)
    verdict = signatures.verify(Path(model_repo.repo.git_dir), gpg_signed, only_ssh)
    assert verdict.reason == "untrusted-key" and "trusts only SSH keys in" in verdict.detail
    assert signatures.verify(Path(model_repo.repo.git_dir), gpg_signed, Trust.from_flags(keys.allowed, trusted.home)).ok

    ssh_signed = ssh_commit(model_repo, keys.alice, "signed with SSH")
    verdict = signatures.verify(Path(model_repo.repo.git_dir), ssh_signed, Trust.from_flags(None, trusted.home))
    assert verdict.reason == "untrusted-key" and "signed with an SSH key" in verdict.detail


RAW = "tree {t}\nauthor Alice <a@example.com> 1700000000 +0000\ncommitter Alice <a@example.com> 1700000000 +0000\n{sig}\nBump steps\n\nbody gpgsig\n"
SSH_SIG = "gpgsig -----BEGIN SSH SIGNATURE-----\n U1NIU0lH\n -----END SSH SIGNATURE-----\n"


@pytest.mark.parametrize("sig, expected", [("", None), (SSH_SIG, "ssh"), (SSH_SIG.replace("SSH", "PGP"), "openpgp"),
                                           (SSH_SIG.replace("SSH SIGNATURE", "SIGNED MESSAGE"), "x509"),
                                           (SSH_SIG.replace("SSH SIGNATURE", "NOTHING KNOWN"), "unknown")])
def test_parse_commit_reads_the_signature_header_only(sig, expected):
    commit = parse_commit("a" * 40, RAW.format(t="b" * 40, sig=sig))
    assert (commit.signature, commit.author, commit.subject) == (expected, "Alice <a@example.com>", "Bump steps")


SSH_ONLY = Trust(Path("/etc/diffops/allowed_signers"))
PGP_ONLY = Trust(openpgp=True, gnupghome=Path("/keys"))


@pytest.mark.parametrize("fmt, trust, rc, output, reason", [
    ("ssh", SSH_ONLY, 0, 'Good "git" signature for alice@example.com with ED25519 key SHA256:abc', None),
    ("ssh", SSH_ONLY, 1, 'Good "git" signature with ED25519 key SHA256:abc\nNo principal matched.', "untrusted-key"),
    ("ssh", SSH_ONLY, 1, "Could not verify signature.\nSignature verification failed: incorrect signature", "bad-signature"),
    ("openpgp", PGP_ONLY, 0, "[GNUPG:] GOODSIG 97679764E43940B1 Alice <a@example.com>\n[GNUPG:] VALIDSIG 7656A5 x", None),
    ("openpgp", PGP_ONLY, 1, "[GNUPG:] ERRSIG 242E28 22 8 00 1 9 5D6A\n[GNUPG:] NO_PUBKEY 242E283F308AAEF8", "untrusted-key"),
    ("openpgp", PGP_ONLY, 1, "[GNUPG:] BADSIG 97679764E43940B1 Alice <a@example.com>", "bad-signature"),
    ("openpgp", PGP_ONLY, 1, "[GNUPG:] EXPKEYSIG 97679764E43940B1 Alice", "untrusted-key"),
    ("openpgp", PGP_ONLY, 1, "[GNUPG:] GOODSIG 97679764E43940B1 Alice\n[GNUPG:] TRUST_UNDEFINED 0 pgp", "untrusted-key"),
    ("x509", PGP_ONLY, 1, "", "untrusted-key"),
    ("unknown", PGP_ONLY, 1, "", "untrusted-key"),
    (None, PGP_ONLY, 1, "", "unsigned"),
])
def test_classify_git_verify_commit(fmt, trust, rc, output, reason):
    verdict = classify(Commit("c" * 40, fmt, "Alice <a@example.com>", "Bump steps"), trust, rc, output)
    assert (verdict.ok, verdict.reason) == (reason is None, reason)
    if reason:
        assert verdict.message.startswith('"Bump steps" by Alice <a@example.com>: ') and "to release it, push a commit signed by a trusted key" in verdict.message


def test_classify_raises_when_git_could_not_check_at_all():
    with pytest.raises(signatures.SignatureError, match="check that ssh-keygen is installed"):
        classify(Commit("c" * 40, "ssh", "", "x"), SSH_ONLY, 1, "error: cannot run ssh-keygen: No such file or directory")


def test_store_keeps_the_refusal_apart_and_reads_an_older_state_file(tmp_path):
    path = tmp_path / "state.db"
    store = Store(path)
    refused = RefusedCommit("d" * 40, "unsigned", "not signed; to release it, sign it", 1700000000.0)
    store.save(State(ControllerRecord("c" * 40, 1.0, refused=refused)))
    assert Store(path, readonly=True).load().controller.refused == refused
    assert [r[0] for r in sqlite3.connect(path).execute("SELECT name FROM pragma_table_info('controller')")] == [
        "id", "last_attempted_commit", "attempted_at", "last_applied_commit", "applied_at"]  # an older diffops still reads it
    store.save(State(ControllerRecord("c" * 40, 2.0)))
    assert Store(path, readonly=True).load().controller.refused is None

    old = tmp_path / "old.db"  # written before refused_commit existed
    db = sqlite3.connect(old)
    db.executescript("CREATE TABLE controller (id INTEGER PRIMARY KEY, "
                     "last_attempted_commit TEXT, attempted_at REAL, last_applied_commit TEXT, applied_at REAL);"
                     "CREATE TABLE releases (name TEXT); CREATE TABLE versions (release TEXT, created_at REAL);"
                     "CREATE TABLE apps (name TEXT, weights TEXT);")
    db.close()
    assert Store(old, readonly=True).load().controller == ControllerRecord()


def test_status_shows_the_refusal_in_text_and_json():
    refused = RefusedCommit("d" * 40, "untrusted-key", '"x" by A <a@b>: signed by a key that is not trusted', 100.0)
    state = State(ControllerRecord("c" * 40, 100.0, refused=refused))
    data = status_json(state)
    assert list(data)[:3] == ["commit", "applied_commit", "refused_commit"]
    assert data["refused_commit"] == {"commit": "d" * 40, "reason": "untrusted-key", "message": refused.message, "at": 100.0}
    assert "refused   dddddddddddd (untrusted-key, 5s ago): nothing from it is applied; \"x\" by A" in status_text(state, now=105.0)


@pytest.mark.parametrize("args, message", [
    (["--allowed-signers", "x"], "take effect only with --require-signed-commits"),
    (["--require-signed-commits", "--revert-on-abort", "tracked"], "use --revert-on-abort branch"),
    (["--require-signed-commits", "--allowed-signers", "{empty}"], "no keys in it"),
    (["--require-signed-commits", "--allowed-signers", "{missing}"], "cannot read it"),
    (["--require-signed-commits", "--gnupghome", "{keyring}"], "no OpenPGP keys in the keyring"),
])
def test_controller_refuses_unusable_trust_flags_before_starting(args, message, tmp_path):
    (tmp_path / "empty").write_text("# no keys yet\n")
    (tmp_path / "keyring").mkdir(mode=0o700)
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "keyring": tmp_path / "keyring"}
    args = [a.format(**paths) for a in args]
    result = subprocess.run([DIFFOPS, "controller", "run", "--state-dir", str(tmp_path / "state"), *args],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "state").exists()  # refused before taking the state dir or starting Ray


def test_controller_run_once_wires_the_flags_through(release_repo: ReleaseRepo, keys: Keys, tmp_path, monkeypatch):
    """`diffops controller run --once --require-signed-commits --allowed-signers`: Ray Serve faked at our client."""
    from click.testing import CliRunner

    from controller import logs
    from controller.apply import ray_cluster, serve_client
    from controller.cli import operate as cli_operate

    serve = FakeServe()
    serve.alive = lambda: True  # type: ignore[attr-defined]
    monkeypatch.setattr(serve_client, "ServeClient", lambda *args, **kwargs: serve)
    monkeypatch.setattr(ray_cluster, "ensure_token", lambda: "token")
    monkeypatch.setattr(logs, "configure", lambda *args: None)
    release_repo.write("README.md", "no releases yet\n")
    unsigned = release_repo.commit("start, unsigned")
    state = tmp_path / "state"
    args = ["run", "--once", "--repo", str(release_repo.path), "--state-dir", str(state), "--ray-address", "http://127.0.0.1:1",
            "--require-signed-commits", "--allowed-signers", str(keys.allowed)]

    result = CliRunner().invoke(cli_operate.controller, args)
    assert result.exit_code == 1 and "signed by one of 1 SSH key(s) in" in result.output
    assert serve.applies == 0 and shown(state)["refused_commit"]["commit"] == unsigned

    signed = ssh_commit(release_repo, keys.alice, "start, signed")
    result = CliRunner().invoke(cli_operate.controller, args)
    assert result.exit_code == 0, result.output
    assert shown(state)["refused_commit"] is None and shown(state)["commit"] == signed


def test_a_url_repository_is_verified_in_its_mirror(release_repo: ReleaseRepo, keys: Keys, tmp_path):
    release_repo.write("README.md", "no releases yet\n")
    unsigned = release_repo.commit("start, unsigned")
    state_dir = tmp_path / "state"
    source = ReleaseSource.open(f"file://{release_repo.path}", state_dir=state_dir)
    assert source.url and Path(source.repo.git_dir).is_relative_to(state_dir)
    serve = FakeServe()
    rec = Reconciler(source, Store(state_dir / "state.db"), serve, RenderSettings(repo=str(source.path), cache_dir=str(state_dir / "models")),
                     signatures=SignatureGate(Path(source.repo.git_dir), Trust.from_flags(keys.allowed, None)))
    rec.reconcile()
    assert rec.state.controller.refused.commit == unsigned and serve.applies == 0

    signed = ssh_commit(release_repo, keys.alice, "start, signed")  # pushed upstream: the next tick fetches it into the mirror
    assert rec.reconcile().ok
    assert rec.state.controller.refused is None and rec.state.controller.last_attempted_commit == signed
