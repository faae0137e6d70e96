"""The contact sheet: every prompt (rows) x every cell (columns), each column labelled with its config. PIL.

Drawn by `diffops experiment run` once the cells are done; logged as the parent run's `contact-sheet.png` and
written to `-o DIR`. Text uses the DejaVu font when the system has it, else PIL's default. `sheet_size` is the pure
layout the drawing follows (tests and readers know the size in advance).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import cache

from PIL import Image, ImageDraw, ImageFont

from controller.experiments.grid import Cell

__all__ = ["column_lines", "contact_sheet", "sheet_size"]

PAD = 6
LEFT = 170  # the prompt column
MIN_COLUMN = 130
LINE = 14
HEADER_LINES = 4
FONT_SIZE = 11
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@cache
def _font() -> Font:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", FONT_SIZE)
    except OSError:
        return ImageFont.load_default()


def column_lines(cell: Cell, several_models: bool, baseline: bool) -> list[str]:
    """A column's label, at most HEADER_LINES lines."""
    c = cell.config
    model = c.model.uri.rstrip("/").rsplit("/", 1)[-1]
    first = f"{model} {c.sampler}" if several_models else c.sampler
    return [first, f"{c.steps} steps cfg {c.guidance_scale:g}", f"seed {cell.seed}", "baseline" if baseline else cell.version]


def sheet_size(columns: int, rows: int, image: tuple[int, int]) -> tuple[int, int]:
    """Width and height of a sheet of `rows` prompts x `columns` cells of `image`-sized tiles."""
    column = max(image[0], MIN_COLUMN)
    return LEFT + columns * (column + PAD) + PAD, PAD + HEADER_LINES * LINE + PAD + rows * (image[1] + PAD)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=_font()) <= width:
        return text
    while text and draw.textlength(text + "…", font=_font()) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, lines: int) -> list[str]:
    words, out, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=_font()) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    out.append(line)
    if len(out) > lines:
        out = out[:lines - 1] + [_fit(draw, " ".join(out[lines - 1:]), width)]
    return [_fit(draw, item, width) for item in out]


def contact_sheet(cells: Sequence[Cell], prompts: Sequence[str], images: Sequence[Sequence[bytes]], *, several_models: bool,
                  baseline_config: int) -> bytes:
    """The sheet as PNG bytes; `images[c][p]` is cell c's image of prompt p."""
    tiles = [[Image.open(io.BytesIO(data)).convert("RGB") for data in column] for column in images]
    size = tiles[0][0].size if tiles and tiles[0] else (64, 64)
    sheet = Image.new("RGB", sheet_size(len(cells), len(prompts), size), "white")
    draw = ImageDraw.Draw(sheet)
    column = max(size[0], MIN_COLUMN)
    top = PAD + HEADER_LINES * LINE + PAD
    for c, (cell, column_tiles) in enumerate(zip(cells, tiles, strict=True)):
        x = LEFT + PAD + c * (column + PAD)
        for n, text in enumerate(column_lines(cell, several_models, cell.config.index == baseline_config)):
            draw.text((x, PAD + n * LINE), _fit(draw, text, column), fill="black", font=_font())
        for p, tile in enumerate(column_tiles):
            sheet.paste(tile.resize(size), (x, top + p * (size[1] + PAD)))
    rows = max(1, size[1] // LINE)
    for p, prompt in enumerate(prompts):
        for n, text in enumerate(_wrap(draw, f"{p}: {prompt}", LEFT - 2 * PAD, rows)):
            draw.text((PAD, top + p * (size[1] + PAD) + n * LINE), text, fill="black", font=_font())
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
