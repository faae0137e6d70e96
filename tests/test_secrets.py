"""Git credentials never reach a log line, an error, a file on disk or an argv; the state dir is private (0700).

The remote is real: `git http-backend` behind a tiny HTTP server that demands
Basic auth, so a clone or fetch only works if the credentials really reach git.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli.main import main
from controller.source.credentials import Credentials, git_env, private_dir, redact, split_credentials
from controller.source.git_source import ReleaseSource, SourceError
from controller.state.records import Event
from tests.conftest import ReleaseRepo, free_port

SECRET = "s3cr3t-T0ken_42"
USER = "deployer"


@pytest.mark.parametrize("text, expected", [
    ("https://user:pass@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("https://ghp_abcdefTOKEN@github.com/org/repo.git", "https://***@github.com/org/repo.git"),  # a bare token
    ("fatal: unable to access 'https://u:p%40ss@host:8443/r.git/': 403", "fatal: unable to access 'https://***@host:8443/r.git/': 403"),
    ("http://user:pa/ss@host/r.git", "http://***@host/r.git"),  # an unescaped slash in the password
    ("clone https://a:b@h1/x and https://c:d@h2/y", "clone https://***@h1/x and https://***@h2/y"),
    ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),  # an ssh login is no secret
    ("ssh://git:hunter2@github.com/org/repo.git", "ssh://***@github.com/org/repo.git"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("https://github.com/org/repo.git", "https://github.com/org/repo.git"),
    ("hf://org/model@main and s3://bucket/key@v1", "hf://org/model@main and s3://bucket/key@v1"),  # model URIs untouched
    ("mail admin@example.com", "mail admin@example.com"),
])
def test_redact_table(text, expected):
    assert redact(text) == expected


def test_redact_blanks_a_known_secret_wherever_it_appears():
    assert redact(f"auth failed for token {SECRET} (encoded s3cr3t-T0ken_42)", (SECRET,)) == "auth failed for token *** (encoded ***)"


@pytest.mark.parametrize("url, clean, credentials", [
    ("https://user:pa%40ss@host/r.git", "https://host/r.git", Credentials("user", "pa@ss")),
    ("https://TOKEN@host:8443/r.git", "https://host:8443/r.git", Credentials("TOKEN", "")),
    ("http://u:@host/r.git", "http://host/r.git", Credentials("u", "")),
    ("https://host/r.git", "https://host/r.git", None),
    ("ssh://git@host/r.git", "ssh://git@host/r.git", None),
    ("file:///srv/r.git", "file:///srv/r.git", None),
])
def test_split_credentials_table(url, clean, credentials):
    assert split_credentials(url) == (clean, credentials)


def test_credentials_never_print_themselves():
    assert SECRET not in repr(Credentials(USER, SECRET)) and SECRET not in str(Credentials(USER, SECRET))
    assert Credentials(USER, SECRET).secrets == (SECRET,)  # the user name is blanked only when it is the token
    assert Credentials("ghp_TOKEN", "").secrets == ("ghp_TOKEN",)


def test_git_env_carries_the_secret_only_in_the_environment():
    env = git_env(Credentials(USER, SECRET), environ={})
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["DIFFOPS_GIT_PASSWORD"] == SECRET
    assert [env[f"GIT_CONFIG_KEY_{i}"] for i in (0, 1)] == ["credential.helper"] * 2
    assert env["GIT_CONFIG_VALUE_0"] == ""  # the user's helpers are reset: none of them stores our secret
    assert SECRET not in env["GIT_CONFIG_VALUE_1"]
    assert git_env(None, environ={}) == {"GIT_TERMINAL_PROMPT": "0", "GIT_HTTP_LOW_SPEED_LIMIT": "1000",
                                         "GIT_HTTP_LOW_SPEED_TIME": "60"}
    assert git_env(Credentials(USER, SECRET), environ={"GIT_CONFIG_COUNT": "1"})["GIT_CONFIG_KEY_2"] == "credential.helper"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_dir_is_created_private_and_tightened_when_loose(tmp_path, caplog):
    fresh = tmp_path / "a" / "state"
    private_dir(fresh)
    assert mode(fresh) == 0o700

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with caplog.at_level(logging.INFO, logger="diffops.controller"):
        private_dir(loose)
        private_dir(loose)  # already private: no second line
    assert mode(loose) == 0o700
    assert [r.getMessage() for r in caplog.records] == [
        f"state: {loose} was mode 0755 (other users could read it); tightened to 0700; next: carry on"]


def test_any_command_taking_the_state_dir_tightens_it(tmp_path):
    loose = tmp_path / "state"
    loose.mkdir()
    os.chmod(loose, 0o755)
    result = CliRunner().invoke(main, ["status", "--state-dir", str(loose)])
    assert result.exit_code == 1 and "no controller state in" in result.output
    assert mode(loose) == 0o700


class GitHttp(BaseHTTPRequestHandler):
    """Smart HTTP through `git http-backend`, behind Basic auth for USER:SECRET."""

    root: Path

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.serve()

    def do_POST(self) -> None:
        self.serve()

    def serve(self) -> None:
        expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {**os.environ, "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1", "REMOTE_USER": USER,
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "REMOTE_ADDR": "127.0.0.1"}
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if self.command == "POST" else b""
        env["CONTENT_LENGTH"] = str(len(body))
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        headers = [line.split(":", 1) for line in head.decode().split("\r\n") if line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        self.send_response(status)
        for key, value in headers:
            if key.lower() != "status":
                self.send_header(key, value.strip())
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def http_remote(release_repo: ReleaseRepo, tmp_path: Path) -> Iterator[tuple[str, ReleaseRepo]]:
    """A bare copy of the release repo served at http://127.0.0.1:PORT/releases.git, credentials required."""
    release_repo.release()
    release_repo.commit("demo")
    root = tmp_path / "served"
    subprocess.run(["git", "clone", "-q", "--bare", str(release_repo.path), str(root / "releases.git")], check=True)
    subprocess.run(["git", "-C", str(root / "releases.git"), "config", "http.receivepack", "true"], check=True)
    release_repo.repo.create_remote("origin", str(root / "releases.git"))
    handler = type("Handler", (GitHttp,), {"root": root})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/releases.git", release_repo
    server.shutdown()
    server.server_close()


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_url_with_credentials_works_and_the_secret_is_stored_nowhere(http_remote, tmp_path, caplog):
    url, author = http_remote
    state = tmp_path / "state"
    secret_url = url.replace("http://", f"http://{USER}:{SECRET}@")
    with caplog.at_level(logging.DEBUG):
        source = ReleaseSource.open(secret_url, state_dir=state, branch="main")
        assert source.snapshot().releases["demo"].spec.generation.steps == 4
        assert source.url == url

        author.release(**{"steps: 4": "steps: 7"})
        author.commit("seven")
        author.repo.git.push("origin", "main")
        source.refresh()  # a later fetch authenticates too, with no secret in the mirror
        assert source.snapshot().releases["demo"].spec.generation.steps == 7

        from controller.state.git_notes import annotate
        head = source.resolve().hexsha
        annotate(source.repo, [Event("demo", "promoted", "v7 ready", "v7", head, 1.0)])  # pushed with the same credentials
    remote_notes = subprocess.run(["git", "-C", str(tmp_path / "served" / "releases.git"), "log", "--notes=diffops", "-1",
                                   "--format=%N", head], capture_output=True, text=True, check=True).stdout
    assert "demo v7: live: v7 ready" in remote_notes

    assert mode(state) == 0o700
    assert files_holding(state, SECRET) == [] and files_holding(state, USER + ":") == []
    config = (Path(source.repo.git_dir) / "config").read_text()
    assert f"url = {url}" in config and SECRET not in config
    assert SECRET not in caplog.text


def test_wrong_or_missing_credentials_fail_with_the_secret_redacted(http_remote, tmp_path, caplog):
    url, _ = http_remote
    wrong = url.replace("http://", f"http://{USER}:wrong-{SECRET}@")
    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError) as failed:
        ReleaseSource.open(wrong, state_dir=tmp_path / "state")
    message = str(failed.value)
    assert message.startswith(f"{url}: clone failed: ") and "credentials" in message
    assert SECRET not in message and SECRET not in caplog.text
    assert not (tmp_path / "state" / "repos").exists() or list((tmp_path / "state" / "repos").iterdir()) == []
    with pytest.raises(SourceError, match="clone failed"):  # no credentials at all: git must not prompt, it fails
        ReleaseSource.open(url, state_dir=tmp_path / "state")


def test_credentials_from_the_environment(http_remote, tmp_path, monkeypatch):
    url, _ = http_remote
    monkeypatch.setenv("DIFFOPS_GIT_USERNAME", USER)
    monkeypatch.setenv("DIFFOPS_GIT_PASSWORD", SECRET)
    source = ReleaseSource.open(url, state_dir=tmp_path / "state", branch="main")
    assert source.snapshot().releases["demo"].spec.generation.steps == 4
    assert files_holding(tmp_path / "state", SECRET) == []


def test_unreachable_url_with_credentials_cli_error_is_redacted(tmp_path, capsys):
    state = tmp_path / "state"
    url = f"http://{USER}:{SECRET}@127.0.0.1:{free_port()}/releases.git"
    with pytest.raises(SystemExit) as exited:
        main(["lint", "--repo", url, "--state-dir", str(state)], standalone_mode=False)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: http://127.0.0.1:" in err and "clone failed" in err and SECRET not in err
    assert mode(state) == 0o700 and files_holding(state, SECRET) == []


def test_an_old_mirror_holding_the_secret_is_moved_and_scrubbed(http_remote, tmp_path):
    url, _ = http_remote
    secret_url = url.replace("http://", f"http://{USER}:{SECRET}@")
    state = tmp_path / "state"
    legacy = state / "repos" / (__import__("hashlib").sha256(secret_url.encode()).hexdigest()[:16] + ".git")
    subprocess.run(["git", "clone", "-q", "--mirror", secret_url, str(legacy)], check=True,
                   env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})  # what an older diffops did
    os.chmod(state, 0o755)
    assert files_holding(state, SECRET)
    source = ReleaseSource.open(secret_url, state_dir=state, branch="main")
    assert not legacy.exists() and source.snapshot().releases["demo"].spec.generation.steps == 4
    assert files_holding(state, SECRET) == [] and mode(state) == 0o700
