"""Progress lines on stderr while the benchmarks run: elapsed time, family, what is happening."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

Say = Callable[[str], None]


class Progress:
    def __init__(self, stream: TextIO = sys.stderr):
        self.stream, self.started = stream, time.monotonic()

    def for_family(self, family: str) -> Say:
        def say(message: str) -> None:
            print(f"[{time.monotonic() - self.started:6.1f}s] {family}: {message}", file=self.stream, flush=True)
        return say


def quiet(_message: str) -> None:
    """A `Say` that prints nothing (tests)."""
