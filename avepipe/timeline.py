"""The timeline picture of ``avepipe localize --plot``: one thumbnail per second, the label band and the event
probability under it, drawn with Pillow (a torchvision dependency). Rows wrap every 20 seconds."""

from __future__ import annotations

import colorsys
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from avepipe import media
from avepipe.localization import NO_MATCH, VideoLabels
from avepipe.outputs import wants_directory

CELL = 96  # pixels per second
PER_ROW = 20  # seconds per row
BAND, BAR, AXIS, TITLE, GAP = 16, 12, 12, 18, 6
BACKGROUND_COLOUR = (150, 150, 150)


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable, distinct-enough colour per label (grey for background / no match)."""
    if label in ("background", NO_MATCH):
        return BACKGROUND_COLOUR
    hue = int(hashlib.md5(label.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def render_timeline(result: VideoLabels, thumbs: np.ndarray) -> Image.Image:
    """The picture for one labelled video; ``thumbs`` is uint8 [T, h, CELL, 3] (see media.thumbnails)."""
    seconds = len(result.seconds)
    thumb_h = thumbs.shape[1]
    rows = max(1, -(-seconds // PER_ROW))
    row_h = thumb_h + BAND + BAR + AXIS + GAP
    image = Image.new("RGB", (min(seconds, PER_ROW) * CELL, TITLE + rows * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    title = f"{Path(result.video).name}: {seconds} s"
    if result.query:
        title += f"  (query {Path(result.query['file']).name} {result.query['start']}-{result.query['end']} s)"
    draw.text((4, 3), _fit(draw, title, image.width - 8, font), fill=(0, 0, 0), font=font)
    for s, second in enumerate(result.seconds):
        x, y = (s % PER_ROW) * CELL, TITLE + (s // PER_ROW) * row_h
        image.paste(Image.fromarray(thumbs[s]), (x, y))
        band_y = y + thumb_h
        draw.rectangle([x, band_y, x + CELL - 1, band_y + BAND - 1], fill=label_colour(second.label))
        # A new span (or row) shows its label; a continuing one leaves the band plain so spans read as one block.
        if s % PER_ROW == 0 or result.seconds[s - 1].label != second.label:
            draw.text((x + 3, band_y + 2), _fit(draw, second.label, CELL - 6, font), fill=(0, 0, 0), font=font)
        bar_y = band_y + BAND
        p = min(1.0, max(0.0, float(second.event_probability)))
        draw.rectangle([x, bar_y, x + CELL - 1, bar_y + BAR - 1], fill=(235, 235, 235))
        draw.rectangle([x, bar_y, x + int(round(p * (CELL - 1))), bar_y + BAR - 1], fill=(40, 110, 200))
        draw.text((x + 3, bar_y), f"{p:.2f}", fill=(0, 0, 0), font=font)
        draw.line([x, y, x, bar_y + BAR + AXIS - 2], fill=(255, 255, 255))
        draw.text((x + 2, bar_y + BAR), f"{second.start}s", fill=(90, 90, 90), font=font)
    return image


def save_timeline(result: VideoLabels, out: str | os.PathLike) -> Path:
    """Decode one thumbnail per second of ``result.video`` and write the PNG atomically."""
    info = media.probe(result.video)
    thumbs = media.thumbnails(info, len(result.seconds), CELL)
    image = render_timeline(result, thumbs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out)
    return out


def save_timelines(results: Sequence[VideoLabels], target: str | os.PathLike) -> list[Path]:
    """The timeline of every labelled video (``--plot``): ``target`` itself for one video, ``<target>/<id>.png`` for
    several or when ``target`` is a directory (:func:`avepipe.outputs.wants_directory`)."""
    ok = [r for r in results if r.error is None]
    many = len(ok) > 1 or wants_directory(target)
    return [save_timeline(r, Path(target) / f"{r.id}.png" if many else Path(target)) for r in ok]
