"""Labelled image grids: X/Y contact sheets with axis labels drawn as text (A1111's X/Y/Z plot layout)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
EMPTY = (200, 200, 200)  # a cell without an image (a failed job, a missing file)
PAD = 6  # pixels around each label


def font_for(cell_w: int, cell_h: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at a size that suits the cells (12 px for tiny images, ~26 px at 512)."""
    size = max(12, round(min(cell_w, cell_h) * 0.05))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _pieces(word: str, font, width: int, measure) -> list[str]:
    """A word too wide for a line → pieces split after . = _ / , - (then by characters if still too wide)."""
    if measure(word, font=font) <= width:
        return [word]
    pieces = []
    for part in re.split(r"(?<=[.=_/,:-])", word):
        if part and measure(part, font=font) > width:
            pieces += list(part)
        elif part:
            pieces.append(part)
    return pieces


def wrap(text: str, font, width: int) -> list[str]:
    """Break `text` into lines no wider than `width` pixels: at spaces, inside a word only when it must."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            for i, piece in enumerate(_pieces(word, font, width, measure)):
                candidate = line + (" " if line and i == 0 else "") + piece
                if line and measure(candidate, font=font) > width:
                    lines.append(line)
                    candidate = piece
                line = candidate
        lines.append(line)
    return lines


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - min(top, 0) + 2


def _block_height(lines: list[str], font) -> int:
    return len(lines) * _line_height(font) if any(lines) else 0


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font, box: tuple[int, int, int, int]) -> None:
    """Draw `lines` centred horizontally and vertically in box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    step = _line_height(font)
    y = y0 + (y1 - y0 - step * len(lines)) // 2
    for line in lines:
        width = draw.textlength(line, font=font)
        draw.text((x0 + (x1 - x0 - width) / 2, y), line, fill=TEXT, font=font)
        y += step


@dataclass(frozen=True, slots=True)
class _Layout:
    cell_w: int
    cell_h: int
    left: int  # width of the y-label column
    top_title: int  # height of the title band
    top: int  # title band + x-label band
    font: Any
    title: list[str]
    x: list[list[str]]
    y: list[list[str]]


def _layout(images: Sequence[Sequence[Image.Image | None]], x_labels: Sequence[str], y_labels: Sequence[str],
            title: str | None) -> _Layout:
    present = [im for row in images for im in row if im is not None]
    cell_w = max((im.width for im in present), default=64)
    cell_h = max((im.height for im in present), default=64)
    font = font_for(cell_w, cell_h)
    x_lines = [wrap(label, font, cell_w - 2 * PAD) for label in x_labels]
    y_lines = [wrap(label, font, max(cell_w, 160) - 2 * PAD) for label in y_labels]  # may be wider than a cell
    widths = [font.getlength(line) for lines in y_lines for line in lines if line]
    cell_h = max([cell_h] + [_block_height(lines, font) + 2 * PAD for lines in y_lines])  # rows fit their label
    left = int(max(widths)) + 2 * PAD if widths else 0
    x_band = max((_block_height(lines, font) for lines in x_lines), default=0)
    x_band = x_band + 2 * PAD if x_band else 0
    title_lines = wrap(title, font, left + len(x_labels) * cell_w - 2 * PAD) if title else []
    top_title = _block_height(title_lines, font) + 2 * PAD if title_lines else 0
    return _Layout(cell_w, cell_h, left, top_title, top_title + x_band, font, title_lines, x_lines, y_lines)


def labelled_grid(images: Sequence[Sequence[Image.Image | None]], x_labels: Sequence[str], y_labels: Sequence[str],
                  title: str | None = None) -> Image.Image:
    """One sheet: images[row][col] in cells as large as the largest image, x labels above the columns,
    y labels left of the rows, an optional title on top; None leaves a grey cell. Empty labels take no room."""
    rows, cols = len(y_labels), len(x_labels)
    if len(images) != rows or any(len(row) != cols for row in images):
        raise ValueError(f"labelled_grid: expected {rows} rows of {cols} images")
    lay = _layout(images, x_labels, y_labels, title)
    w, h = lay.cell_w, lay.cell_h
    sheet = Image.new("RGB", (lay.left + cols * w, lay.top + rows * h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if lay.title:
        _draw_lines(draw, lay.title, lay.font, (0, 0, sheet.width, lay.top_title))
    for c, lines in enumerate(lay.x):
        _draw_lines(draw, lines, lay.font, (lay.left + c * w, lay.top_title, lay.left + (c + 1) * w, lay.top))
    for r, lines in enumerate(lay.y):
        _draw_lines(draw, lines, lay.font, (0, lay.top + r * h, lay.left, lay.top + (r + 1) * h))
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            _paste(sheet, draw, image, (lay.left + c * w, lay.top + r * h, w, h))
    return sheet


def _paste(sheet: Image.Image, draw: ImageDraw.ImageDraw, image: Image.Image | None,
           cell: tuple[int, int, int, int]) -> None:
    x, y, w, h = cell
    if image is None:
        draw.rectangle((x + 1, y + 1, x + w - 2, y + h - 2), fill=EMPTY)
        return
    sheet.paste(image.convert("RGB"), (x + (w - image.width) // 2, y + (h - image.height) // 2))


def stack(sheets: Sequence[Image.Image], gap: int = 2 * PAD) -> Image.Image:
    """Sheets one below the other (the Z axis of an X/Y/Z plot), left-aligned on a white background."""
    if len(sheets) == 1:
        return sheets[0]
    width = max(s.width for s in sheets)
    height = sum(s.height for s in sheets) + gap * (len(sheets) - 1)
    out = Image.new("RGB", (width, height), BACKGROUND)
    y = 0
    for sheet in sheets:
        out.paste(sheet, (0, y))
        y += sheet.height + gap
    return out
