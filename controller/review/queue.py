"""What the review page asks and answers, decided without I/O. Pure.

`controller.review.server` reads the state file and calls these: `parse_review` turns a `POST /api/review` body
into (release, reviewer, feedback) or a `RequestError` naming the field (the feedback part is the same contract as
a user's `POST /<release>/feedback`, `serving.feedback.parse_feedback`); `queue_groups` groups the kept samples a
reviewer has not rated by prompt, labelled A, B, … in an order shuffled per reviewer and prompt so the position
never tells the version; `version_counts` sums samples kept and reviews per version for the page's progress.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from serving.feedback import FIELDS, FLAGS, json_body, parse_feedback
from serving.requests import RequestError

__all__ = ["GROUPS_SHOWN", "MAX_REVIEWER_CHARS", "REVIEW_FIELDS", "blind_flag", "host_allowed", "label", "parse_review",
           "queue_groups", "require_release", "reviewer_problem", "version_counts"]

MAX_REVIEWER_CHARS = 64
MAX_RELEASE_CHARS = 128
GROUPS_SHOWN = 20  # prompt groups answered at most per queue request; `remaining` counts them all
REVIEW_FIELDS = ("release", "reviewer", *FIELDS)
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def reviewer_problem(value: object) -> str | None:
    """Why `value` is not a reviewer name (1-64 printable characters, not only spaces), or None when it is one."""
    if not isinstance(value, str):
        return f"expected a name: 1-{MAX_REVIEWER_CHARS} printable characters"
    if not value.strip() or len(value) > MAX_REVIEWER_CHARS or not value.isprintable():
        return f"expected a name of 1-{MAX_REVIEWER_CHARS} printable characters (got {len(value)} characters)"
    if any(0xD800 <= ord(char) <= 0xDFFF for char in value):
        return "contains an unpaired UTF-16 surrogate; send valid Unicode text"
    return None


def release_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_RELEASE_CHARS or not value.isprintable():
        return f"expected a release name (1-{MAX_RELEASE_CHARS} printable characters); GET /api/releases lists them"
    return None


def require_release(value: str | None) -> str:
    """The `release` query parameter, or RequestError naming it."""
    problem = "required: a release name; GET /api/releases lists them" if value is None else release_problem(value)
    if problem:
        raise RequestError([("release", problem)])
    assert value is not None
    return value


def parse_review(body: bytes | bytearray) -> tuple[str, str, dict[str, Any]]:
    """A review body -> (release, reviewer, feedback as `parse_feedback` answers it); raise RequestError (422)."""
    data = json_body(body)
    if not isinstance(data, dict):
        raise RequestError([("body", 'expected a JSON object like {"release": "demo", "reviewer": "ana", "request_id": "…", '
                                     '"rating": 4}')])
    problems = [(str(key) or "body", f"unknown field; send {', '.join(REVIEW_FIELDS)}") for key in data if key not in REVIEW_FIELDS]
    release, reviewer = data.get("release"), data.get("reviewer")
    if release is None:
        problems.append(("release", "required: the release the sample belongs to"))
    elif found := release_problem(release):
        problems.append(("release", found))
    if reviewer is None:
        problems.append(("reviewer", f"required: who reviews (1-{MAX_REVIEWER_CHARS} printable characters)"))
    elif found := reviewer_problem(reviewer):
        problems.append(("reviewer", found))
    feedback: dict[str, Any] = {}
    try:
        feedback = parse_feedback(json.dumps({k: v for k, v in data.items() if k in FIELDS}).encode())
    except RequestError as err:
        problems += err.problems
    if problems:
        raise RequestError(problems)
    return str(release), str(reviewer), feedback


def blind_flag(value: str | None) -> bool:
    """The `blind` query parameter: absent, 1/true/yes hide versions; 0/false/no show them."""
    if value is None or value.lower() in ("1", "true", "yes", ""):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise RequestError([("blind", "expected 1 (hide versions, the default) or 0 (show them)")])


def label(index: int) -> str:
    """A, B, …, Z, AA, AB, …: the name of the sample at `index` in its group."""
    text = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        text = chr(ord("A") + rest) + text
    return text


def _order(reviewer: str, prompt: str, request_id: str) -> str:
    return hashlib.sha256("\0".join((reviewer, prompt, request_id)).encode("utf-8", "backslashreplace")).hexdigest()


def queue_groups(release: str, kept: Iterable[Mapping[str, Any]], unrated: set[str], reviewer: str, blind: bool,
                 shown: int = GROUPS_SHOWN) -> dict[str, Any]:
    """The kept samples `reviewer` has not rated, grouped by prompt (oldest group first), at most `shown` groups.

    Labels are given over the whole group (rated samples included), so a sample keeps its letter while the reviewer
    works through the group; the order is a hash of reviewer, prompt and request id, the same on every reload.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in kept:
        groups.setdefault(str(row["prompt"]), []).append(row)
    answered: list[dict[str, Any]] = []
    for prompt, rows in groups.items():
        ordered = sorted(rows, key=lambda row: _order(reviewer, prompt, str(row["request_id"])))
        samples: list[dict[str, Any]] = []
        for index, row in enumerate(ordered):
            if row["request_id"] not in unrated:
                continue
            sample = {"id": row["request_id"], "label": label(index), "prompt": prompt, "seed": row["seed"],
                      "image": "/api/image?" + urllib.parse.urlencode({"release": release, "id": row["request_id"]})}
            if not blind:
                sample["version"] = row["version"]
            samples.append(sample)
        if samples:
            answered.append({"prompt": prompt, "size": len(ordered), "samples": samples})
    kept_count = sum(len(rows) for rows in groups.values())
    remaining = sum(len(group["samples"]) for group in answered)
    return {"release": release, "reviewer": reviewer, "blind": blind, "reviewed": kept_count - remaining, "remaining": remaining,
            "groups": answered[:max(0, shown)]}


def version_counts(kept: Mapping[str, int], reviews: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per version (by name): samples kept, reviews (feedback with source `review`), mean review rating, flags."""
    versions: dict[str, dict[str, Any]] = {
        version: {"version": version, "kept": count, "reviews": 0, "rated": 0, "mean_rating": None, "flags": dict.fromkeys(FLAGS, 0)}
        for version, count in kept.items()}
    sums: dict[str, int] = {}
    for row in reviews:
        if row.get("source") != "review":
            continue
        version = str(row["version"])
        entry = versions.setdefault(version, {"version": version, "kept": 0, "reviews": 0, "rated": 0, "mean_rating": None,
                                              "flags": dict.fromkeys(FLAGS, 0)})
        entry["reviews"] += 1
        if row.get("rating") is not None:
            entry["rated"] += 1
            sums[version] = sums.get(version, 0) + int(row["rating"])
        for flag in row.get("flags") or []:
            if flag in entry["flags"]:
                entry["flags"][flag] += 1
    for version, total in sums.items():
        versions[version]["mean_rating"] = round(total / versions[version]["rated"], 3)
    return [versions[name] for name in sorted(versions)]


def host_allowed(host_header: str | None, bound: str, port: int) -> bool:
    """Whether a request's Host names this server: on a loopback bind only 127.0.0.1, localhost or [::1] at our port
    (a page on another site that a DNS name re-pointed at 127.0.0.1 is refused); on any other bind every Host."""
    if bound not in ("127.0.0.1", "localhost", "::1"):
        return True
    if not host_header:
        return False
    return host_header.strip().lower() in {f"{name}:{port}" for name in LOOPBACK}
