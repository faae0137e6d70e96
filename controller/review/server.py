"""The review page's HTTP server: reviewers rate the samples the controller kept, blind to the version.

A `ThreadingHTTPServer` on a daemon thread (`ReviewServer.start()`), bound to 127.0.0.1 unless told otherwise,
started by `diffops review` and by the controller daemon. Each request opens the state file (`<state dir>/state.db`)
with a connection of its own, read-only unless it stores a review: the controller writes the same file from its own
thread (WAL). The decisions are `controller.review.queue`'s; the stored samples and reviews are
`controller.state.samples`'; every error is a problem document (`serving.problems`).

Routes: `GET /` the page; `GET /api/releases`; `GET /api/queue?release=&reviewer=&blind=1`;
`GET /api/image?release=&id=`; `GET /api/counts?release=`; `POST /api/review`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from controller.review.queue import blind_flag, host_allowed, parse_review, queue_groups, require_release, reviewer_problem, version_counts
from controller.state.feedback import feedback_rows
from controller.state.samples import review_queue, sample_counts, sample_rows, store_review
from serving.feedback import MAX_FEEDBACK_BYTES, REQUEST_ID
from serving.problems import PROBLEM_MEDIA_TYPE, ProblemKind, problem
from serving.requests import RequestError, declared_length

__all__ = ["PAGE", "STATE_FILE", "ReviewServer", "reviewer_client"]

log = logging.getLogger("diffops.controller")

STATE_FILE = "state.db"
SAMPLES_DIR = "samples"
PAGE = Path(__file__).with_name("page.html")
# The page is one file: nothing but this server is ever fetched, and no other site's script can run in it.
CSP = ("default-src 'none'; img-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def reviewer_client(reviewer: str) -> str:
    """The feedback table's client of a reviewer: one key per name, whoever's browser it comes from, never equal to
    a key `serving.feedback.client_key` gives an API client (those hash `client:` or `address:` sources)."""
    return hashlib.sha256(("reviewer:" + reviewer).encode("utf-8", "backslashreplace")).hexdigest()[:16]


class _Problem(Exception):
    def __init__(self, kind: ProblemKind, detail: str, errors: list[tuple[str, str]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.errors, self.headers = kind, detail, errors or [], headers or {}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # a connection that sends nothing (or less body than it declared) for this long is dropped

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def do_PUT(self) -> None:  # noqa: N802
        self._answer(self._other)

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT

    def _answer(self, route: Callable[[], tuple[int, str, bytes]]) -> None:
        request_id = uuid.uuid4().hex
        try:
            if not host_allowed(self.headers.get("Host"), self.server.bound, self.server.server_address[1]):
                raise _Problem("bad-request", f"Host {self.headers.get('Host')!r} is not this server; open "
                               f"http://127.0.0.1:{self.server.server_address[1]}/", [("Host", "not this server")])
            status, content_type, body = route()
            self._send(status, content_type, body, request_id)
        except RequestError as err:
            self._send(err.status, PROBLEM_MEDIA_TYPE, json.dumps(err.document(request_id)).encode(), request_id)
        except _Problem as err:
            document = problem(err.kind, err.detail, request_id, err.errors)
            self._send(document["status"], PROBLEM_MEDIA_TYPE, json.dumps(document).encode(), request_id, err.headers)
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as err:
            log.warning("review: the state file %s could not be read (%s); next: the page shows the error, retry", self.server.state, err)
            document = problem("internal-error", f"the state file could not be read: {err}; retry, or check the controller's log",
                               request_id)
            self._send(500, PROBLEM_MEDIA_TYPE, json.dumps(document).encode(), request_id)

    def _send(self, status: int, content_type: str, body: bytes, request_id: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Request-Id", request_id)
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _query(self) -> tuple[str, dict[str, str]]:
        path, _, query = self.path.partition("?")
        return path, {key: value for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True)}

    def _other(self) -> tuple[int, str, bytes]:
        path, _ = self._query()
        allow = "POST" if path == "/api/review" else "GET"
        raise _Problem("method-not-allowed", f"{self.command} is not served here; use {allow} {path}", headers={"Allow": allow})

    def _get(self) -> tuple[int, str, bytes]:
        path, query = self._query()
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", PAGE.read_bytes()
        if path == "/api/releases":
            return self._json({"releases": self.server.releases()})
        if path == "/api/queue":
            release = require_release(query.get("release"))
            reviewer = query.get("reviewer")
            found = "required: your name, as the page's Reviewer field sends it" if reviewer is None else reviewer_problem(reviewer)
            if found:
                raise RequestError([("reviewer", found)])
            assert reviewer is not None
            return self._json(self.server.queue(release, reviewer, blind_flag(query.get("blind"))))
        if path == "/api/counts":
            return self._json(self.server.counts(require_release(query.get("release"))))
        if path == "/api/image":
            release, request_id = require_release(query.get("release")), query.get("id") or ""
            if not REQUEST_ID.fullmatch(request_id):
                raise RequestError([("id", "expected a sample's id from GET /api/queue (1-128 of A-Z a-z 0-9 . _ : -)")])
            return 200, "image/png", self.server.image(release, request_id)
        if path == "/api/review":
            raise _Problem("method-not-allowed", "use POST /api/review with a JSON body", headers={"Allow": "POST"})
        raise _Problem("not-found", f"nothing at {path[:200]}; open / for the review page")

    def _post(self) -> tuple[int, str, bytes]:
        path, _ = self._query()
        if path != "/api/review":
            raise _Problem("method-not-allowed", f"POST is not served at {path[:200]}; use POST /api/review", headers={"Allow": "GET"})
        media = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if media != "application/json":
            self.close_connection = True
            raise _Problem("bad-request", "send the review as Content-Type: application/json",
                           [("Content-Type", f"expected application/json, got {media or 'none'}")])
        try:
            length = declared_length(self.headers.get("Content-Length"), MAX_FEEDBACK_BYTES)
        except RequestError:
            self.close_connection = True  # the body is left unread
            raise
        if length is None:
            self.close_connection = True
            raise _Problem("bad-request", "send a Content-Length with the body", [("Content-Length", "required")])
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise _Problem("client-disconnected", "the body ended early; send the whole review again")
        release, reviewer, feedback = parse_review(body)
        stored = self.server.review(release, reviewer, feedback)
        return 202, "application/json", json.dumps(stored).encode()

    def _json(self, data: Any) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(data).encode()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("review: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state_dir: Path, host: str, port: int, on_review: Callable[[str, dict[str, Any]], None]):
        self.on_review = on_review
        self.state = Path(state_dir) / STATE_FILE
        self.samples = (Path(state_dir) / SAMPLES_DIR).resolve()
        self.bound = host
        super().__init__((host, port), _Handler)

    def _connect(self, write: bool = False) -> sqlite3.Connection:
        if not self.state.exists():
            raise _Problem("not-found", f"no state file at {self.state}; start the controller (`diffops controller run`) first")
        if write:
            return sqlite3.connect(self.state, timeout=10, isolation_level=None)
        return sqlite3.connect(self.state.resolve().as_uri() + "?mode=ro", uri=True, timeout=10)

    def releases(self) -> list[str]:
        if not self.state.exists():
            return []
        db = self._connect()
        try:
            rows = db.execute("SELECT DISTINCT release FROM samples WHERE image IS NOT NULL ORDER BY release").fetchall()
        except sqlite3.OperationalError:  # a state file from before samples were kept
            return []
        finally:
            db.close()
        return [str(row[0]) for row in rows]

    def _kept(self, db: sqlite3.Connection, release: str) -> list[dict[str, Any]]:
        kept = [row for row in sample_rows(db, release) if row["image"] is not None]
        if not kept:
            raise _Problem("not-found", f"no samples kept for review in release {release!r}; GET /api/releases lists the releases "
                           "that have some (the scorer keeps up to quality.review.max_samples per version)")
        return kept

    def queue(self, release: str, reviewer: str, blind: bool) -> dict[str, Any]:
        db = self._connect()
        try:
            kept = self._kept(db, release)
            unrated = {row["request_id"] for row in review_queue(db, release, reviewer_client(reviewer), limit=len(kept))}
        finally:
            db.close()
        return queue_groups(release, kept, unrated, reviewer, blind)

    def counts(self, release: str) -> dict[str, Any]:
        db = self._connect()
        try:
            self._kept(db, release)
            kept, reviews = sample_counts(db, release), feedback_rows(db, release)
        finally:
            db.close()
        return {"release": release, "versions": version_counts(kept, reviews)}

    def image(self, release: str, request_id: str) -> bytes:
        db = self._connect()
        try:
            row = db.execute("SELECT image FROM samples WHERE release = ? AND request_id = ? AND image IS NOT NULL",
                             (release, request_id)).fetchone()
        except sqlite3.OperationalError:
            row = None
        finally:
            db.close()
        missing = _Problem("not-found", f"no image kept for sample {request_id!r} of {release!r}; GET /api/queue lists them")
        if row is None:
            raise missing
        path = (self.samples / str(row[0])).resolve()
        if not path.is_relative_to(self.samples) or not path.is_file():
            log.warning("review: sample %s of %s names %r, not a file under %s; next: answered 404", request_id, release, row[0],
                        self.samples)
            raise missing
        return path.read_bytes()

    def review(self, release: str, reviewer: str, feedback: dict[str, Any]) -> dict[str, Any]:
        db = self._connect(write=True)
        try:
            stored = store_review(db, release, feedback["request_id"], reviewer_client(reviewer), feedback)
        finally:
            db.close()
        if stored is None:
            raise _Problem("not-found", f"no sample {feedback['request_id']!r} kept for review in {release!r}; "
                           "GET /api/queue lists the ones to review", [("request_id", "no such sample kept")])
        self.on_review(release, stored)
        return {**stored, "reviewer": reviewer}


class ReviewServer:
    """The review page on `host:port` (port 0: any free one), served from a daemon thread until `stop()`; `on_review`
    hears each stored review (the controller counts it in `diffops_feedback_total`)."""

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 on_review: Callable[[str, dict[str, Any]], None] = lambda release, entry: None):
        self.state_dir = Path(state_dir)
        self._server = _Server(self.state_dir, host, port, on_review)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def start(self) -> ReviewServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="review-server", daemon=True)
        self._thread.start()
        log.info("review: serving the review page at %s; next: open it in a browser (state %s)", self.url, self._server.state)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
