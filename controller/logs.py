"""Controller log lines: one per decision, as text or JSON (`--log-format json`).

Text: `2026-11-24T21:40:00Z INFO demo: <what happened>; next: <what happens next> (<duration>)`.
JSON: the same as fields (`subject`, `event`, `version` when a record carries
them) for log pipelines. Secrets never reach a log line: the Ray auth token is
masked wherever it would appear.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from controller.apply.serve_client import ray_token

__all__ = ["JsonFormatter", "configure"]


class _Redact(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.token = ray_token()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.token and self.token in record.getMessage():
            record.msg, record.args = record.getMessage().replace(self.token, "***"), ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("subject", "event", "version"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    handler.addFilter(_Redact())
    root = logging.getLogger("diffops")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
