"""Secrets out of logs and off disk: URL redaction, git credentials through the environment, a private state dir.

Used where a `--repo URL` enters (the source's clone, fetch and push) and
wherever a message can carry that URL. Credentials in a URL
(`https://user:token@host/repo.git`) are taken out of it: the mirror, its
git config and every argv see the bare URL; git gets the secret from an
inline credential helper configured through `GIT_CONFIG_*` environment
variables that reads it from the git process's own environment. The secret
therefore lives only in this process's memory and its git children's
environment, never in a file, a command line or a log line.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

__all__ = ["Credentials", "env_credentials", "git_env", "private_dir", "redact", "split_credentials"]

log = logging.getLogger("diffops.controller")

USERNAME_ENV, PASSWORD_ENV = "DIFFOPS_GIT_USERNAME", "DIFFOPS_GIT_PASSWORD"
# git runs `!`-helpers through sh; printf is a builtin there, so the secret never reaches an argv.
HELPER = ('!f() { test "$1" = get || return 0; '
          f'printf "username=%s\\npassword=%s\\n" "${USERNAME_ENV}" "${PASSWORD_ENV}"; }}; f')
STALL_LIMITS = {"GIT_HTTP_LOW_SPEED_LIMIT": "1000", "GIT_HTTP_LOW_SPEED_TIME": "60"}  # a stalled HTTP transfer: give up
CREDENTIAL_SCHEMES = {"http", "https", "ftp", "ftps"}  # where a URL's user info is a credential (ssh's is a login)
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]+)@", re.IGNORECASE)
_RAW_SLASH = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s/'\"@:]*:[^\s@'\"]*@", re.IGNORECASE)  # user:pa/ss@


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @property
    def secrets(self) -> tuple[str, ...]:
        """What to blank in messages: the password, or the user name when it is a bare token."""
        return (self.password,) if self.password else (self.username,) if self.username else ()

    def __repr__(self) -> str:  # never print the secret by accident
        return f"Credentials(username={'***' if self.username else ''!r}, password='***')"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with every URL's user info replaced by `***` (ssh logins kept) and each known secret blanked."""
    def userinfo(match: re.Match[str]) -> str:
        scheme, info = match["scheme"], match["userinfo"]
        if scheme.lower().rstrip(":/") in ("ssh", "git+ssh", "ssh+git") and ":" not in info:
            return match[0]
        return f"{scheme}***@"

    text = _RAW_SLASH.sub(lambda m: f"{m['scheme']}***@", text)
    text = _USERINFO.sub(userinfo, text)
    for secret in secrets:
        for form in {secret, unquote(secret), quote(secret, safe="")}:
            if len(form) >= 4:  # a very short "secret" would blank ordinary words
                text = text.replace(form, "***")
    return text


def split_credentials(url: str) -> tuple[str, Credentials | None]:
    """The URL without user info, and the credentials it carried (a bare token counts: `https://TOKEN@host`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None
    if parts.scheme.lower() not in CREDENTIAL_SCHEMES or "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=hostport)), Credentials(unquote(user), unquote(password))


def env_credentials(environ: dict[str, str] | os._Environ[str] = os.environ) -> Credentials | None:
    """Credentials from `DIFFOPS_GIT_PASSWORD` (a token) and `DIFFOPS_GIT_USERNAME` (default `git`), if set."""
    password = environ.get(PASSWORD_ENV)
    return Credentials(environ.get(USERNAME_ENV) or "git", password) if password else None


def git_env(credentials: Credentials | None, environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """Environment for git commands against the remote: never prompt, never hang on a stalled HTTP transfer (under
    1 kB/s for 60 s); with credentials, answer git's credential
    request from the environment only (helpers configured elsewhere are reset, so none of them stores the secret)."""
    env = {"GIT_TERMINAL_PROMPT": "0", **STALL_LIMITS}
    if credentials is None:
        return env
    count = int(environ.get("GIT_CONFIG_COUNT", "0") or 0)
    env.update({"GIT_CONFIG_COUNT": str(count + 2),
                f"GIT_CONFIG_KEY_{count}": "credential.helper", f"GIT_CONFIG_VALUE_{count}": "",
                f"GIT_CONFIG_KEY_{count + 1}": "credential.helper", f"GIT_CONFIG_VALUE_{count + 1}": HELPER,
                USERNAME_ENV: credentials.username, PASSWORD_ENV: credentials.password})
    return env


def private_dir(path: Path, create: bool = True) -> None:
    """Make `path` a directory only its owner can enter (0700): the state file, mirrors and models live there.

    An existing directory with group or other bits is tightened, with a log line; one we may not chmod (another
    owner) is left as it is, with a warning saying what to do.
    """
    path = Path(path)
    if not path.exists():
        if create:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & 0o700 | 0o700)
    except PermissionError:
        log.warning("state: %s is mode %04o (other users can read it) and not ours to change; next: carry on; "
                    "run `chmod 700 %s` as its owner", path, mode, path)
        return
    log.info("state: %s was mode %04o (other users could read it); tightened to 0700; next: carry on", path, mode)
