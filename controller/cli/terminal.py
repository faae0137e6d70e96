"""The terminal side of `diffops` output: colour (`--no-color`, NO_COLOR), tables that fit the width, progress.

Each applies only where the stream is a terminal: piped output stays the plain text scripts and tests read,
and a piped stderr gets no spinner. The decisions (`color_wanted`) are pure; the rest is a thin shell on rich.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

import click
from rich.console import Console, RenderableType
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["color_wanted", "is_terminal", "print_rich", "progress", "render_text"]


def color_wanted(no_color_flag: bool, environ: Mapping[str, str]) -> bool:
    """Colour unless `--no-color` was given or NO_COLOR is set to anything non-empty (no-color.org)."""
    return not no_color_flag and not environ.get("NO_COLOR")


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


def _color_off() -> bool:
    ctx = click.get_current_context(silent=True)
    return (ctx is not None and ctx.color is False) or not color_wanted(False, os.environ)


def print_rich(renderable: RenderableType) -> None:
    """Print to stdout (a terminal) at its width, coloured unless colour is off."""
    Console(highlight=False, no_color=_color_off(), soft_wrap=False).print(renderable)


def render_text(renderable: RenderableType, width: int, *, color: bool = False) -> str:
    """What `print_rich` shows on a terminal `width` columns wide, as a string (with ANSI styles if `color`)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None,
                      no_color=not color, highlight=False)
    console.print(renderable)
    return buffer.getvalue()


@contextmanager
def progress(message: str, console: Console | None = None) -> Iterator[None]:
    """A spinner with `message` and the time elapsed on stderr while the block runs; nothing when stderr is
    not a terminal (logs and CI keep their one line per step). The spinner is erased when the block ends."""
    if console is None:
        if not is_terminal(sys.stderr):
            yield
            return
        console = Console(stderr=True, no_color=_color_off())
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bar.add_task(message, total=None)
        yield
