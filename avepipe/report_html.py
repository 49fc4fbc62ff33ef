"""The page of ``avepipe localize --html``: one self-contained HTML file per video, the video playable beside its
per-second labels.

Contract:

* **Self-contained, no network.** CSS and JavaScript are inline; the page loads nothing from anywhere (no fonts,
  scripts or images from the web).
* **The video.** Embedded in the page (a base64 ``data:`` URL) when its file is at most :data:`EMBED_LIMIT` bytes, so
  the page works on its own (mail it, move it). A bigger video is not copied into the page (base64 adds a third: a
  1 GB film would make a 1.3 GB page); the page refers to it by its path relative to the page, so keep the two where
  they are (or move them together). A video the browser cannot decode (its container or codec: AVI, MPEG-2...) shows
  a note; the labels are there all the same.
* **What it shows.** The title (video, length, model and checkpoint), a legend (label -> colour), a strip with one
  coloured cell per second under the player, the spans, and a table of every second: time, label, ``p(label)``,
  ``p(event)`` (a bar with a mark at 0.5) and the top 3 classes (the definitions of docs/localize.md).
* **Interaction.** Clicking (or Enter on) a second of the strip or of the table, or a span, seeks the video to its
  start (``video.currentTime``); while the video plays, the current second is highlighted in the strip and the table
  (and scrolled into view).
* **Escaping.** Everything that comes from the user (file names, class names, labels, the checkpoint's path) is
  HTML-escaped; the video's path is percent-encoded as a URL.
* **Self-test hook** (for the browser test, inert otherwise): opened as ``page.html#selftest=N``, the page clicks second
  N once loaded and writes ``{"second", "currentTime", "highlighted", "paused", "duration"}`` as JSON into
  ``<pre id="selftest">``, where ``chromium --headless --dump-dom`` reads it.

``--html FILE.html`` takes one video, ``--html DIR/`` writes ``DIR/<id>.html`` for each (the rules of ``--plot``);
failed videos get no page (their error is on stderr and in the JSON output).
"""

from __future__ import annotations

import base64
import html
import mimetypes
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from avepipe.files import write_atomic
from avepipe.localization import VideoLabels
from avepipe.outputs import check_single_target, format_probability, wants_directory
from avepipe.timeline import label_colour, legend_labels, text_colour
from avepipe.version import __version__

EMBED_LIMIT = 20 * 1024 * 1024  # bytes: videos up to this size are embedded in the page, bigger ones linked
_MIME = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg",
         ".ogg": "video/ogg", ".mkv": "video/webm"}  # what browsers accept; .mov/.mkv often hold H.264/VP9 they play


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def video_source(video: str | os.PathLike, page: str | os.PathLike,
                 embed_limit: int = EMBED_LIMIT) -> tuple[str, bool]:
    """The ``src`` of the page's player and whether it is embedded: a ``data:`` URL for a file of at most
    ``embed_limit`` bytes, else the video's path relative to the page's folder (a file URL when there is none)."""
    path = Path(video).resolve()
    if path.stat().st_size <= embed_limit:
        mime = _MIME.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "video/mp4"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}", True
    try:
        relative = os.path.relpath(path, Path(page).resolve().parent)
    except ValueError:  # another drive (Windows): no relative path
        return path.as_uri(), False
    return quote(Path(relative).as_posix()), False


_CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --accent: #1a73e8; --current: #fff3b0; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fafafa; }
header { padding: 14px 20px 8px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0 0 4px; overflow-wrap: anywhere; }
.meta { color: var(--muted); margin: 0; overflow-wrap: anywhere; }
main { display: grid; grid-template-columns: minmax(320px, 1fr) minmax(420px, 1.2fr); gap: 20px; padding: 16px 20px; }
@media (max-width: 900px) { main { grid-template-columns: 1fr; } }
.player { position: sticky; top: 12px; align-self: start; }
video { width: 100%; max-height: 60vh; background: #000; border-radius: 6px; display: block; }
.note { color: #a50e0e; background: #fce8e6; padding: 8px 10px; border-radius: 6px; margin: 8px 0 0; }
.strip { display: flex; margin: 10px 0 4px; border: 1px solid var(--line); border-radius: 4px; overflow: hidden;
         min-height: 30px; }
.strip .cell { flex: 1 1 0; min-width: 3px; cursor: pointer; border-right: 1px solid rgba(255,255,255,.6);
               outline-offset: -3px; }
.strip .cell:last-child { border-right: 0; }
.strip .cell.current { outline: 3px solid var(--fg); }
.ticks { display: flex; justify-content: space-between; color: var(--muted); font-size: 12px; }
h2 { font-size: 15px; margin: 16px 0 6px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; padding: 0; margin: 0; list-style: none; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px;
          margin-right: 6px; border: 1px solid rgba(0,0,0,.25); }
.spans { list-style: none; padding: 0; margin: 0; display: flex; flex-wrap: wrap; gap: 6px; }
.spans li { padding: 3px 8px; border-radius: 12px; cursor: pointer; border: 1px solid rgba(0,0,0,.15); }
.spans li.current { outline: 2px solid var(--fg); }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { position: sticky; top: 0; background: #f1f3f4; font-weight: 600; z-index: 1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #f1f6fe; }
tbody tr.current { background: var(--current); }
.bar { display: inline-block; position: relative; width: 70px; height: 10px; background: #e8eaed; border-radius: 2px;
       margin-right: 6px; vertical-align: middle; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; background: var(--accent); border-radius: 2px; }
.bar i { position: absolute; left: 50%; top: -2px; bottom: -2px; border-left: 1px solid #000; }
.top3 { margin: 0; padding: 0; list-style: none; color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 13px; padding: 0 20px 20px; }
[data-seek]:focus-visible { outline: 2px solid var(--accent); }
#selftest { display: none; }
"""

_JS = """
(function () {
  "use strict";
  var video = document.getElementById("video");
  var marked = {};
  Array.prototype.forEach.call(document.querySelectorAll("[data-second]"), function (el) {
    (marked[el.getAttribute("data-second")] = marked[el.getAttribute("data-second")] || []).push(el);
  });
  var spans = Array.prototype.slice.call(document.querySelectorAll(".spans [data-seek]"));
  var current = null;
  function highlight(second, scroll) {
    var key = String(second);
    if (key === current) return;
    if (current !== null && marked[current]) marked[current].forEach(function (el) { el.classList.remove("current"); });
    current = key;
    (marked[key] || []).forEach(function (el) {
      el.classList.add("current");
      if (scroll && el.tagName === "TR") el.scrollIntoView({block: "nearest"});
    });
    spans.forEach(function (el) {
      var on = +el.getAttribute("data-seek") <= second && second < +el.getAttribute("data-end");
      el.classList.toggle("current", on);
    });
  }
  function seek(seconds) {
    video.currentTime = seconds;
    highlight(Math.floor(seconds), false);
  }
  function fromEvent(event) {
    var el = event.target.closest ? event.target.closest("[data-seek]") : null;
    return el ? parseFloat(el.getAttribute("data-seek")) : null;
  }
  document.addEventListener("click", function (event) {
    var t = fromEvent(event);
    if (t !== null) seek(t);
  });
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Enter" && event.key !== " ") return;
    var t = fromEvent(event);
    if (t !== null) { event.preventDefault(); seek(t); }
  });
  function follow() { highlight(Math.floor(video.currentTime + 1e-3), !video.paused); }
  video.addEventListener("timeupdate", follow);
  video.addEventListener("seeked", follow);
  video.addEventListener("play", function tick() {
    follow();
    if (!video.paused && !video.ended) window.requestAnimationFrame(tick);
  });
  video.addEventListener("error", function () { document.getElementById("cannot-play").hidden = false; });
  var test = /#selftest=(\\d+)/.exec(window.location.hash);
  if (test) {
    window.addEventListener("load", function () {
      var target = document.querySelector('tbody [data-second="' + test[1] + '"]');
      if (target) target.click();
      document.getElementById("selftest").textContent = JSON.stringify({
        second: +test[1], clicked: !!target, currentTime: video.currentTime, paused: video.paused,
        duration: isFinite(video.duration) ? video.duration : null,
        highlighted: Array.prototype.map.call(document.querySelectorAll(".current[data-second]"),
                                             function (el) { return el.getAttribute("data-second"); })
      });
    });
  }
})();
"""


def render_report(result: VideoLabels, video_src: str, embedded: bool) -> str:
    """The page of one labelled video, whose player plays ``video_src`` (see :func:`video_source`)."""
    name = Path(result.video).name
    seconds = result.seconds
    labels = legend_labels(result)
    meta = [f"{len(seconds)} s"]
    if result.model:
        meta.append(f"model {result.model}")
    if result.checkpoint:
        meta.append(f"checkpoint {result.checkpoint}")
    if result.query:
        q = result.query
        meta.append(f"{q['direction']} query {q['file']} {q['start']}-{q['end']} s")
    source = ("the video is embedded in this page" if embedded else
              f"the video is not embedded (over {EMBED_LIMIT // (1024 * 1024)} MB): this page plays {result.video} "
              f"through its path relative to the page; keep the two together")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(name)}: avepipe labels</title>", f"<style>{_CSS}</style></head><body>",
           f"<header><h1>{_e(name)}</h1><p class=\"meta\">{_e(' · '.join(meta))}</p></header>",
           '<main><section class="player">',
           # An embedded video is in the page already: load it (its first frame shows); a linked one on demand.
           f'<video id="video" controls preload="{"auto" if embedded else "metadata"}" src="{_e(video_src)}"></video>',
           f'<p id="cannot-play" class="note" hidden>This browser cannot play {_e(name)} (its container or codec); '
           "the labels still apply. Convert it to MP4 (H.264 + AAC) or WebM to watch it here.</p>",
           '<div class="strip" aria-label="labels, one cell per second">']
    for s in seconds:
        fill = _hex(label_colour(s.label, labels))
        tip = f"{s.start}-{s.end} s: {s.label} ({format_probability(s.probability)})"
        out.append(f'<div class="cell" tabindex="0" role="button" data-second="{s.start}" data-seek="{s.start}" '
                   f'style="background:{fill}" title="{_e(tip)}"></div>')
    out.append(f'</div><div class="ticks"><span>0 s</span><span>{len(seconds)} s</span></div>')
    out.append('<h2>Legend</h2><ul class="legend">')
    for label in labels:
        swatch = _hex(label_colour(label, labels))
        out.append(f'<li><span class="swatch" style="background:{swatch}"></span>{_e(label)}</li>')
    out.append('</ul><h2>Spans</h2><ul class="spans">')
    for span in result.spans:
        fill = label_colour(span["label"], labels)
        out.append(f'<li tabindex="0" role="button" data-seek="{span["start"]}" data-end="{span["end"]}" '
                   f'style="background:{_hex(fill)};color:{_hex(text_colour(fill))}">'
                   f'{_e(span["label"])} {span["start"]}–{span["end"]} s</li>')
    out.append("</ul></section>")
    event_word = "p(match)" if result.query else "p(event)"
    out.append('<section class="seconds"><table><thead><tr><th>time</th><th>label</th><th>p(label)</th>'
               f"<th>{event_word}</th><th>top 3</th></tr></thead><tbody>")
    for s in seconds:
        p_event = min(1.0, max(0.0, s.event_probability))
        top = "".join(f"<li>{_e(t['label'])} {t['probability']:.2f}</li>" for t in s.top3)
        out.append(
            f'<tr tabindex="0" data-second="{s.start}" data-seek="{s.start}">'
            f'<td class="num">{s.start}–{s.end} s</td>'
            f'<td><span class="swatch" style="background:{_hex(label_colour(s.label, labels))}"></span>'
            f'{_e(s.label)}</td>'
            f'<td class="num">{format_probability(s.probability)}</td>'
            f'<td class="num"><span class="bar"><span style="width:{p_event * 100:.1f}%"></span><i></i></span>'
            f"{format_probability(s.event_probability)}</td>"
            f'<td><ul class="top3">{top}</ul></td></tr>')
    out.append("</tbody></table></section></main>")
    definition = ("p(match): the match probability of the second; the match is the best window of the query's length"
                  if result.query else
                  "p(event): the probability that an event happens in the second, from the model's own "
                  "event/background decision (at least 0.50 exactly when the label is an event)")
    out.append(f"<footer><p>p(label): the probability of the second's label. {_e(definition)}. Click a second or a "
               f"span to play from there. {_e(source[0].upper() + source[1:])}. Made by avepipe {_e(__version__)}."
               "</p></footer>")
    out.append(f'<pre id="selftest"></pre><script>{_JS}</script></body></html>')
    return "\n".join(out) + "\n"


def save_report(result: VideoLabels, out: str | os.PathLike, embed_limit: int = EMBED_LIMIT) -> Path:
    """Write the page of one labelled video to ``out`` atomically."""
    out = Path(out)
    src, embedded = video_source(result.video, out, embed_limit)
    return write_atomic(out, render_report(result, src, embedded))


def save_reports(results: Sequence[VideoLabels], target: str | os.PathLike,
                 embed_limit: int = EMBED_LIMIT) -> list[Path]:
    """The page of every labelled video (``--html``): ``<target>/<id>.html`` each when ``target`` is a directory, else
    ``target`` itself, which takes one video only (several raise :class:`~avepipe.errors.UsageError`)."""
    check_single_target("--html", target, len(results))
    ok = [r for r in results if r.error is None]
    if wants_directory(target):
        return [save_report(r, Path(target) / f"{r.id}.html", embed_limit) for r in ok]
    return [save_report(r, target, embed_limit) for r in ok]

