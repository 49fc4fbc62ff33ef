"""Files of per-second labels (``avepipe localize --format json|csv|jsonl --out``): one writer per format.

``get_writer(fmt)`` returns the writer of a format (as openai/whisper's ``get_writer``); ``write_results`` writes one
file for all videos, or one ``<id>.<fmt>`` per video into a directory. The ``table`` format is the terminal's
(:func:`avepipe.render.render_localize`).

Failed videos: JSON and JSONL name every input, so a consumer sees each one: a JSON record (and a JSONL line) with
``error`` set and no seconds. CSV holds per-second rows only, so a failed video has no row there (its error goes to
stderr and the exit code is 1). ``check_outputs`` refuses, before any work, an output that would replace an input.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from avepipe.errors import UsageError
from avepipe.files import write_atomic

if TYPE_CHECKING:
    from avepipe.localization import VideoLabels

Writer = Callable[[Sequence["VideoLabels"]], str]  # the records of some videos -> the text of one file

# probability: of the label itself; event_probability: P(an event in this second), >= 0.5 exactly for event labels
# (avepipe.localization.SecondLabel; docs/localize.md "Probabilities"). Replaces the earlier "class_probability".
CSV_FIELDS = ("video", "start", "end", "label", "probability", "event_probability",
              "top1", "top1_probability", "top2", "top2_probability", "top3", "top3_probability")


def format_probability(value: float) -> str:
    """A probability as shown to people (table, page): two decimals, truncated rather than rounded below 0.5, so an
    event probability of 0.4999 (a background second) shows 0.49, never the 0.50 of an event."""
    return f"{math.floor(value * 100) / 100:.2f}" if value < 0.5 else f"{value:.2f}"


def rows(result: VideoLabels) -> list[dict[str, Any]]:
    """Flat per-second rows (CSV / JSONL)."""
    out = []
    for s in result.seconds:
        row = {"video": result.video, "start": s.start, "end": s.end, "label": s.label,
               "probability": s.probability, "event_probability": s.event_probability}
        for k in range(3):
            top = s.top3[k] if k < len(s.top3) else {"label": "", "probability": ""}
            row[f"top{k + 1}"], row[f"top{k + 1}_probability"] = top["label"], top["probability"]
        out.append(row)
    return out


def write_json(results: Sequence[VideoLabels]) -> str:
    """A list of whole records (seconds, spans, query, error), one per video, failed ones included."""
    return json.dumps([r.to_dict() for r in results], indent=2) + "\n"


def write_jsonl(results: Sequence[VideoLabels]) -> str:
    """One JSON object per second (the CSV columns); a failed video is one object ``{"video", "id", "error"}``."""
    return "".join(json.dumps(row) + "\n" for r in results
                   for row in (rows(r) if r.error is None else [{"video": r.video, "id": r.id, "error": r.error}]))


def write_csv(results: Sequence[VideoLabels]) -> str:
    """One row per second, columns ``CSV_FIELDS`` (a failed video has no seconds, hence no row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerows(rows(r))
    return buffer.getvalue()


WRITERS: dict[str, Writer] = {"json": write_json, "csv": write_csv, "jsonl": write_jsonl}
FORMATS = ("table", *WRITERS)  # what --format accepts


def get_writer(fmt: str) -> Writer:
    """The writer of file format ``fmt``."""
    if fmt not in WRITERS:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    return WRITERS[fmt]


def wants_directory(out: str | os.PathLike) -> bool:
    """An existing directory, or a path written with a trailing ``/`` (which ``Path()`` would drop)."""
    return Path(out).is_dir() or os.fspath(out).endswith(("/", os.sep))


def write_results(results: Sequence[VideoLabels], fmt: str, out: str | os.PathLike) -> list[Path]:
    """One file (``out``) for all videos, or one ``<id>.<fmt>`` per video when ``out`` is a directory (see
    :func:`wants_directory`). Files are written atomically. Failed videos: see the module's docstring (in a directory,
    JSON / JSONL write their error record, CSV writes no file for them)."""
    write = get_writer(fmt)
    if not wants_directory(out):
        return [write_atomic(Path(out), write(results))]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_atomic(folder / f"{r.id}.{fmt}", write([r])) for r in results if r.error is None or fmt != "csv"]


def output_paths(out: str | os.PathLike, ids: Sequence[str], suffix: str) -> list[Path]:
    """The files an ``--out`` / ``--plot`` / ``--html`` target will hold for videos ``ids``: ``out`` itself, or
    ``<out>/<id>.<suffix>`` each when it is a directory (:func:`wants_directory`)."""
    if wants_directory(out):
        return [Path(out) / f"{vid}.{suffix}" for vid in ids]
    return [Path(out)]


def check_single_target(option: str, target: str | os.PathLike, videos: int) -> None:
    """A one-picture / one-page target (``--plot FILE.png``, ``--html FILE.html``) takes one video: with several,
    :class:`UsageError` naming the way out (``DIR/``), raised by the CLI before any work (so nothing is written)."""
    if videos > 1 and not wants_directory(target):
        suffix = Path(target).suffix or ".png"
        raise UsageError(f"{option} {target}: names one file, but there are {videos} videos; give a directory "
                         f"({option} {Path(target).with_suffix('')}/ writes <id>{suffix} for each video)")


def check_outputs(targets: dict[str, Sequence[Path]], inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse an output file that is one of the inputs (a video, the checkpoint, a list...): writing it would destroy
    the input. ``targets``: option name -> the files it would write."""
    protected = {}
    for item in inputs:
        if item is not None and Path(item).exists() and not Path(item).is_dir():
            protected[Path(item).resolve()] = item
    for option, paths in targets.items():
        for path in paths:
            if path.resolve() in protected:
                raise UsageError(f"{option} {path}: is an input ({protected[path.resolve()]}); it would be "
                                 "overwritten; write elsewhere")
