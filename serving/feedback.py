"""User feedback on generated images: the body's contract and the release's memory of what it answered. Pure.

`POST /<release>/feedback` carries `{request_id, rating?: 1..5, flags?: [nsfw|artifact|prompt_mismatch|other],
comment?}`. The router parses it with `parse_feedback` before anything else (a `serving.requests.RequestError`:
422 naming the field) and asks the release's tally (`serving.tally.Tally`) to attach it. The tally keeps a
`FeedbackBook`: every answered generation by request id (version, prompt sha256, seed, parameters; never the
prompt) for `retention_s` (default 24 h, at most `remembered` of them, oldest dropped first), and the feedback
attached to them, one entry per (request id, client): a repeat replaces the earlier answer under a new sequence
number. The controller reads the entries past its durable cursor (`since`) through `GET /<release>/feedback`
and stores them in its SQLite state (`controller.quality`); nothing is deleted by reading, so a controller that
dies mid-read reads the same entries again. The client is `client_key`: a hash of `X-Diffops-Client` when sent,
else of the first `X-Forwarded-For` hop, else of the peer address.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import OrderedDict
from typing import Any

from serving.requests import RequestError

__all__ = ["CLIENT_HEADER", "FEEDBACK_KEPT", "FLAGS", "MAX_COMMENT_CHARS", "MAX_FEEDBACK_BYTES", "REMEMBERED", "REQUEST_ID",
           "RETENTION_S", "FeedbackBook", "client_key", "generation", "json_body", "parse_feedback"]

FLAGS = ("nsfw", "artifact", "prompt_mismatch", "other")
FIELDS = ("request_id", "rating", "flags", "comment")
MAX_COMMENT_CHARS = 2000
MAX_FEEDBACK_BYTES = 64 * 1024  # a feedback body is read at most this long (413 past it)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # the ids Serve assigns (uuid4) and sane client-chosen ones
CLIENT_HEADER = "X-Diffops-Client"
RETENTION_S = 24 * 3600.0  # an answered generation takes feedback this long
REMEMBERED = 100_000  # answered generations remembered at most (about 40 MB in the tally); past it the oldest go
FEEDBACK_KEPT = 100_000  # feedback entries the tally holds for the controller to read at most

Entry = dict[str, Any]


def json_body(body: bytes | bytearray) -> Any:
    """A JSON request body, strictly (no NaN/Infinity); a RequestError (422 on `body`) otherwise."""
    def constant(token: str) -> float:
        raise ValueError(f"{token} is not a number JSON allows")

    try:
        return json.loads(body, parse_constant=constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError([("body", f"not valid JSON: {err}")]) from None
    except RecursionError:
        raise RequestError([("body", "JSON nested too deeply")]) from None


def _text_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text"
    return None


def parse_feedback(body: bytes | bytearray) -> Entry:
    """Body bytes -> {request_id, rating, flags, comment} (absent fields None, flags a sorted list); raise RequestError."""
    data = json_body(body)
    if not isinstance(data, dict):
        raise RequestError([("body", 'expected a JSON object like {"request_id": "…", "rating": 4}')])
    problems = [(str(key) or "body", f"unknown field; send {', '.join(FIELDS)}") for key in data if key not in FIELDS]
    request_id, rating, flags, comment = (data.get(name) for name in FIELDS)
    if request_id is None:
        problems.append(("request_id", "required: the X-Request-Id of the generate answer"))
    elif not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        problems.append(("request_id", "expected the X-Request-Id of a generate answer (1-128 of A-Z a-z 0-9 . _ : -)"))
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
        problems.append(("rating", "expected a whole number from 1 to 5"))
    if flags is not None:
        if not isinstance(flags, list):
            problems.append(("flags", f"expected a list of {', '.join(FLAGS)}"))
        else:
            for index, flag in enumerate(flags):
                if flag not in FLAGS or not isinstance(flag, str):
                    problems.append((f"flags.{index}", f"expected one of {', '.join(FLAGS)}"))
                elif flags.index(flag) != index:
                    problems.append((f"flags.{index}", f"{flag} is listed twice"))
    if comment is not None:
        if not isinstance(comment, str):
            problems.append(("comment", "expected a string"))
        elif len(comment) > MAX_COMMENT_CHARS:
            problems.append(("comment", f"{len(comment)} characters; the limit is {MAX_COMMENT_CHARS}"))
        elif (trouble := _text_problem(comment)) is not None:
            problems.append(("comment", trouble))
    if problems:
        raise RequestError(problems)
    if rating is None and not flags and not (comment or "").strip():
        raise RequestError([("body", "send at least one of rating, flags, comment")])
    return {"request_id": request_id, "rating": rating, "flags": sorted(flags or []), "comment": comment or None}


def client_key(explicit: str | None, forwarded_for: str | None, peer: str | None) -> str:
    """Who sent a feedback, as a hash (no address is stored): `X-Diffops-Client`, else the first X-Forwarded-For hop,
    else the peer address; a repeat from the same client replaces its earlier feedback on the same request."""
    if explicit:
        source = "client:" + explicit[:256]
    elif forwarded_for and forwarded_for.split(",")[0].strip():
        source = "address:" + forwarded_for.split(",")[0].strip()[:256]
    else:
        source = "address:" + (peer or "unknown")
    return hashlib.sha256(source.encode("utf-8", "backslashreplace")).hexdigest()[:16]


def generation(at: float, version: str, params: dict[str, Any], answered: dict[str, Any]) -> Entry:
    """What a remembered answer keeps: when, which version, the prompt's sha256 (not the prompt), the seed it drew with
    and the generation parameters (`params`: the parsed request; `answered`: the version's resolved parameters)."""
    prompt = str(params.get("prompt") or "")
    config = {k: v for k, v in {**params, **answered}.items() if k not in ("prompt", "negative_prompt", "seed")}
    return {"at": at, "version": version, "prompt_sha256": hashlib.sha256(prompt.encode("utf-8", "backslashreplace")).hexdigest(),
            "seed": answered.get("seed", params.get("seed")), "params": config}


class FeedbackBook:
    """Answered generations by request id and the feedback attached to them, both bounded by count and by age."""

    def __init__(self, retention_s: float = RETENTION_S, remembered: int = REMEMBERED, kept: int = FEEDBACK_KEPT,
                 epoch: str | None = None):
        self.retention_s, self.remembered, self.kept = retention_s, remembered, kept
        self.epoch = epoch or uuid.uuid4().hex[:12]  # a new book (the tally restarted) numbers its entries afresh
        self.answers: OrderedDict[str, Entry] = OrderedDict()  # request id -> generation, oldest first
        self.entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # (request id, client) -> feedback, by seq
        self.seq = 0

    def remember(self, request_id: str, answer: Entry) -> None:
        self.answers.pop(request_id, None)
        self.answers[request_id] = answer
        self._prune(float(answer["at"]))

    def attach(self, request_id: str, client: str, feedback: Entry, now: float) -> Entry | None:
        """The feedback as an entry on the answer it rates (replacing this client's earlier one); None when the
        release never answered `request_id` or answered it longer than `retention_s` ago."""
        self._prune(now)
        answer = self.answers.get(request_id)
        if answer is None:
            return None
        self.seq += 1
        entry = {**feedback, "request_id": request_id, "client": client, "at": now, "seq": self.seq,
                 "version": answer["version"], "generated_at": answer["at"], "prompt_sha256": answer["prompt_sha256"],
                 "seed": answer["seed"], "params": answer["params"]}
        self.entries.pop((request_id, client), None)
        self.entries[(request_id, client)] = entry
        self._prune(now)
        return entry

    def since(self, epoch: str | None, after: int, limit: int = 1000) -> Entry:
        """Entries past `after` in this book (all of them when `epoch` is another book's), oldest first, at most `limit`;
        `first`: the oldest seq still held (a cursor below first - 1 means entries were dropped unread)."""
        after = after if epoch == self.epoch else 0
        newer: list[Entry] = []
        for entry in reversed(self.entries.values()):
            if entry["seq"] <= after:
                break
            newer.append(entry)
        first = next(iter(self.entries.values()))["seq"] if self.entries else self.seq + 1
        return {"epoch": self.epoch, "first": first, "last": self.seq, "entries": newer[::-1][:max(0, limit)]}

    def _prune(self, now: float) -> None:
        horizon = now - self.retention_s
        while self.answers and (len(self.answers) > self.remembered or next(iter(self.answers.values()))["at"] < horizon):
            self.answers.popitem(last=False)
        while self.entries and (len(self.entries) > self.kept or next(iter(self.entries.values()))["at"] < horizon):
            self.entries.popitem(last=False)
