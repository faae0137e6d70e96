"""Controller log lines: JSON fields for pipelines, and the Ray token never printed."""

from __future__ import annotations

import json
import logging

from controller import logs


def test_json_lines_carry_subject_and_event(capsys):
    logs.configure("json")
    logging.getLogger("diffops.controller").info("demo: v2 ready; next: switch", extra={"subject": "demo", "event": "promoted", "version": "v2"})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["subject"] == "demo" and line["event"] == "promoted" and line["version"] == "v2"
    assert line["message"] == "demo: v2 ready; next: switch" and line["level"] == "info" and line["time"].endswith("Z")


def test_the_auth_token_is_masked(capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token-value")
    logs.configure("text")
    logging.getLogger("diffops.controller").warning("calling with Authorization: Bearer %s", "s3cr3t-token-value")
    err = capsys.readouterr().err
    assert "s3cr3t-token-value" not in err and "Bearer ***" in err
