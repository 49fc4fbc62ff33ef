"""The timeline picture of ``avepipe localize --plot``: a title (video, length, model and checkpoint), a legend
(label -> colour), then one thumbnail per second, the label band (each span's name written across the span) and the
event probability bar with its value and a mark at 0.5, drawn with Pillow (a torchvision dependency). Rows wrap every
20 seconds; text is 14 px (16 px for the title), readable at 100 %.

``--plot FILE.png`` draws one video, ``--plot DIR/`` one ``<id>.png`` per video (:func:`save_timelines`); a file target
with several videos is refused (:func:`avepipe.outputs.check_single_target`), before any work in the CLI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from avepipe import media
from avepipe.localization import NO_MATCH, VideoLabels
from avepipe.outputs import check_single_target, wants_directory

CELL = 96  # pixels per second
PER_ROW = 20  # seconds per row
MIN_WIDTH = 720  # the title and the legend need room even for a 1-s video
FONT, TITLE_FONT = 14, 16  # pixels
PAD = 8
BAND, BAR, AXIS, GAP = 22, 18, 18, 10  # heights of a row's parts below the thumbnails
BACKGROUND_COLOUR = (150, 150, 150)
BAR_COLOUR, BAR_EMPTY = (40, 110, 200), (232, 232, 232)


# Okabe & Ito's colour-blind-safe qualitative palette (its black left out), then four darker colours far from those
# and from each other (one green only): 11 colours told apart at a glance, given in the order labels first appear in a
# video.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (225, 87, 89), (117, 60, 150), (40, 40, 120), (150, 30, 60))


def label_colour(label: str, labels: Sequence[str] = ()) -> tuple[int, int, int]:
    """The colour of ``label`` among a video's ``labels`` (its legend, :func:`legend_labels`): the palette's colours in
    the order the event labels first appear, grey for background / no match. A label outside ``labels`` takes a
    palette colour by its name's checksum (a fallback for callers without a legend)."""
    if label in ("background", NO_MATCH):
        return BACKGROUND_COLOUR
    events = [x for x in dict.fromkeys(labels) if x not in ("background", NO_MATCH)]
    if label in events:
        return PALETTE[events.index(label) % len(PALETTE)]
    return PALETTE[int(hashlib.md5(label.encode()).hexdigest()[:6], 16) % len(PALETTE)]


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``fill``."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels (the legend shows the whole name)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def legend_labels(result: VideoLabels) -> list[str]:
    """The labels of a video in the order they first appear, background (or no match) last."""
    seen = list(dict.fromkeys(s.label for s in result.seconds))
    return [x for x in seen if x not in ("background", NO_MATCH)] + [x for x in seen if x in ("background", NO_MATCH)]


def timeline_title(result: VideoLabels) -> str:
    """The picture's title: the video, its length, the model and the checkpoint as ``run-folder/file`` (two runs'
    pictures differ), and a CML query."""
    title = f"{Path(result.video).name} · {len(result.seconds)} s"
    if result.model:
        title += f" · {result.model}"
    if result.checkpoint:
        checkpoint = Path(result.checkpoint)
        title += f" ({checkpoint.parent.name + '/' if checkpoint.parent.name else ''}{checkpoint.name})"
    if result.query:
        title += f" · query {Path(result.query['file']).name} {result.query['start']}-{result.query['end']} s"
    return title


def _legend_rows(draw: ImageDraw.ImageDraw, labels: list[str], width: int,
                 font) -> list[list[tuple[str, str, int]]]:
    """Legend entries (label, its text, x) wrapped into rows of ``width`` pixels."""
    rows: list[list[tuple[str, str, int]]] = [[]]
    x = PAD
    for label in labels:
        text = _fit(draw, label, width - 2 * PAD - FONT - 6, font)
        w = FONT + 6 + int(draw.textlength(text, font=font)) + 18
        if rows[-1] and x + w > width - PAD:
            rows.append([])
            x = PAD
        rows[-1].append((label, text, x))
        x += w
    return rows


def render_timeline(result: VideoLabels, thumbs: np.ndarray) -> Image.Image:
    """The picture for one labelled video; ``thumbs`` is uint8 [T, h, CELL, 3] (see media.thumbnails)."""
    seconds = len(result.seconds)
    thumb_h = thumbs.shape[1]
    rows = max(1, -(-seconds // PER_ROW))
    row_h = thumb_h + BAND + BAR + AXIS + GAP
    width = max(min(seconds, PER_ROW) * CELL, MIN_WIDTH)
    font, title_font = _font(FONT), _font(TITLE_FONT)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = legend_labels(result)
    legend = _legend_rows(measure, labels, width, font)
    line = FONT + 8
    top = PAD + TITLE_FONT + 8 + len(legend) * line + line + 4  # title, legend rows, the bar's caption
    image = Image.new("RGB", (width, top + rows * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    title = _fit(draw, timeline_title(result), width - 2 * PAD, title_font)
    draw.text((PAD, PAD), title, fill=(0, 0, 0), font=title_font)
    y = PAD + TITLE_FONT + 8
    for entries in legend:
        for label, text, x in entries:
            draw.rectangle([x, y + 1, x + FONT, y + 1 + FONT], fill=label_colour(label, labels),
                           outline=(60, 60, 60))
            draw.text((x + FONT + 6, y), text, fill=(0, 0, 0), font=font)
        y += line
    caption = "bar: p(event), the event probability; at or above the mark (0.5) the model says an event happens"
    draw.text((PAD, y), _fit(draw, caption, width - 2 * PAD, font), fill=(90, 90, 90), font=font)
    for s, second in enumerate(result.seconds):
        x, y = (s % PER_ROW) * CELL, top + (s // PER_ROW) * row_h
        image.paste(Image.fromarray(thumbs[s]), (x, y))
        band_y = y + thumb_h
        draw.rectangle([x, band_y, x + CELL - 1, band_y + BAND - 1], fill=label_colour(second.label, labels))
        bar_y = band_y + BAND
        p = min(1.0, max(0.0, float(second.event_probability)))
        filled = int(round(p * (CELL - 1)))
        draw.rectangle([x, bar_y, x + CELL - 1, bar_y + BAR - 1], fill=BAR_EMPTY)
        draw.rectangle([x, bar_y, x + filled, bar_y + BAR - 1], fill=BAR_COLOUR)
        half = x + (CELL - 1) // 2
        draw.line([half, bar_y, half, bar_y + BAR - 1], fill=(0, 0, 0))
        value = f"{p:.2f}"
        if filled >= draw.textlength(value, font=font) + 8:  # inside the filled part, else after it
            draw.text((x + 4, bar_y + 1), value, fill=(255, 255, 255), font=font)
        else:
            draw.text((x + filled + 4, bar_y + 1), value, fill=(0, 0, 0), font=font)
        draw.line([x, y, x, bar_y + BAR - 1], fill=(255, 255, 255))
        draw.text((x + 3, bar_y + BAR + 1), f"{second.start} s", fill=(90, 90, 90), font=font)
    # A span's name is written once per row, across the span's cells (after every band is drawn, so no later cell
    # covers it), and spans read as one block.
    for s, second in enumerate(result.seconds):
        if s % PER_ROW and result.seconds[s - 1].label == second.label:
            continue
        run = 1
        while s + run < seconds and (s + run) % PER_ROW and result.seconds[s + run].label == second.label:
            run += 1
        x, band_y = (s % PER_ROW) * CELL, top + (s // PER_ROW) * row_h + thumb_h
        draw.text((x + 4, band_y + 3), _fit(draw, second.label, run * CELL - 8, font),
                  fill=text_colour(label_colour(second.label, labels)), font=font)
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
    """The timeline of every labelled video (``--plot``): ``<target>/<id>.png`` each when ``target`` is a directory
    (:func:`avepipe.outputs.wants_directory`), else ``target`` itself, which takes one video only (several raise
    :class:`~avepipe.errors.UsageError`: a file name does not silently become a folder)."""
    check_single_target("--plot", target, len(results))
    ok = [r for r in results if r.error is None]
    if wants_directory(target):
        return [save_timeline(r, Path(target) / f"{r.id}.png") for r in ok]
    return [save_timeline(r, target) for r in ok]
