"""A dataset of your own videos from a simple CSV: ``avepipe dataset init --csv FILE --videos DIR [--out DIR]``.

Input: a CSV with one event per row, ``video,label,start,end[,split]`` (a header line with these names is optional;
with it the columns may come in any order). ``video`` is a file name (relative to the videos folder) or a video id (a
file name without extension, as ``avepipe extract`` names cache entries); ``label`` the event's category; ``start`` and
``end`` whole seconds; ``split`` train, val or test. Blank lines and lines starting with ``#`` are skipped. Several rows
may describe one video (several events), as in AVE.

Output, in the AVE formats the data loaders read (:mod:`avepipe.data.ave`): ``Annotations.txt`` (header +
``Category&VideoID&good&Start&End`` rows, in CSV order), ``trainSet.txt`` / ``valSet.txt`` / ``testSet.txt`` (the same
rows, split), ``categories.txt`` (labels in order of first appearance) and ``videos.txt`` (the CSV's video files, one
absolute path per line, for ``avepipe extract --list``). Files are written atomically.

Rules (the violations of every row are found in one run and raised as one :class:`~avepipe.errors.DataError`
naming each CSV line):

* The models see 10-s sequences (AVE's clips; ``train`` and ``evaluate`` read a video's first 10 s, padding shorter
  videos and masking the padding): events are annotated within ``0 <= start < end <= 10``, and ``end`` may not pass
  the video's whole seconds (probed with :func:`avepipe.media.probe`). Longer recordings: cut 10-s clips first.
* Labels: at most 28 distinct (the models' 28 categories + background), none empty, none ``background``, none holding
  ``&`` (the annotation separator); video ids may not hold ``&`` either, and video file names no line break.
* Unknown videos, duplicate rows, one video in two splits, and a split with no video are refused.
* Without a split column the split is deterministic: a video goes to train, val or test by a hash of its id (SHA-1:
  below 0.8 train, below 0.9 val, else test, about 80/10/10; all rows of a video together). A split left empty is
  given the video of the largest split whose hash lies nearest to it, so 3 or more videos always fill all three.

Warnings (the files are written; ``InitSummary.warnings``): a label of val or test that no train row has (the model
never learns it), and a train label that val or test lacks (it is never checked).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from avepipe.data.ave import BACKGROUND, SECONDS, SPLITS
from avepipe.errors import DataError, MediaError, UsageError
from avepipe.files import write_atomic
from avepipe.inputs import MEDIA_EXTENSIONS, assign_ids, discover, video_id
from avepipe.media import MediaInfo, probe

COLUMNS = ("video", "label", "start", "end", "split")
HEADER = "Category&VideoID&Quality&StartTime&EndTime"
QUALITY = "good"
SPLIT_BOUNDS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
OUTPUTS = ("Annotations.txt", "trainSet.txt", "valSet.txt", "testSet.txt", "categories.txt", "videos.txt")


@dataclass(frozen=True)
class Row:
    line: int
    video_id: str
    path: Path
    label: str
    start: int
    end: int
    split: Optional[str]


@dataclass
class InitSummary:
    out: Path
    rows: int
    videos: int
    categories: list[str]
    split_rows: dict[str, int]
    split_videos: dict[str, int]
    hashed_split: bool
    longer_than_clip: list[str] = field(default_factory=list)  # ids of videos longer than 10 s (first 10 s used)
    warnings: list[str] = field(default_factory=list)  # labels a split lacks (see the module's docstring)
    written: list[Path] = field(default_factory=list)


def hash_fraction(vid: str) -> float:
    """A video id's place in [0, 1), stable across machines and Python runs."""
    return int.from_bytes(hashlib.sha1(vid.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def hashed_splits(video_ids: list[str]) -> dict[str, str]:
    """train / val / test per video by :func:`hash_fraction`, every split non-empty (needs 3 or more videos)."""
    if len(video_ids) < len(SPLITS):
        raise ValueError(f"{len(video_ids)} videos cannot fill train, val and test (3 or more, or a split column)")
    fraction = {vid: hash_fraction(vid) for vid in video_ids}
    split = {vid: next(s for s, (_, high) in SPLIT_BOUNDS.items() if f < high) for vid, f in fraction.items()}
    for empty in ("val", "test", "train"):
        members = {s: sorted(v for v in split if split[v] == s) for s in SPLITS}
        if members[empty]:
            continue
        donor = max(SPLITS, key=lambda s: len(members[s]))  # >= 2 videos: 3+ videos in at most 2 splits
        low, high = SPLIT_BOUNDS[empty]
        nearest = min(members[donor], key=lambda v: (max(low - fraction[v], fraction[v] - high, 0.0), v))
        split[nearest] = empty
    return split


def init_dataset(csv_path: str | os.PathLike, videos: str | os.PathLike, out: str | os.PathLike, *,
                 overwrite: bool = False, probe_media: Callable[[Path], MediaInfo] = probe) -> InitSummary:
    """Validate the CSV against the videos and write the AVE-format label files into ``out``."""
    csv_path, videos, out = Path(csv_path), Path(videos), Path(out)
    if not csv_path.is_file():
        raise UsageError(f"--csv {csv_path}: no such file")
    if not videos.is_dir():
        raise UsageError(f"--videos {videos}: not a folder")
    _check_out(out, overwrite)
    by_id = assign_ids(discover([videos]))
    rows = _read_rows(csv_path, videos, by_id)
    if not rows:
        raise DataError(f"{csv_path}: no rows (expected video,label,start,end[,split])")
    labels = list(dict.fromkeys(row.label for row in rows))
    if len(labels) > BACKGROUND:
        raise DataError(f"{csv_path}: {len(labels)} labels, but the models have {BACKGROUND} categories (+ background)")
    longer = _check_durations(csv_path, rows, probe_media)
    hashed = rows[0].split is None
    if hashed:
        try:
            split_of = hashed_splits(list(dict.fromkeys(r.video_id for r in rows)))
        except ValueError as exc:
            raise DataError(f"{csv_path}: {exc}") from None
    else:
        split_of = {r.video_id: r.split for r in rows}
    split_rows = {s: [r for r in rows if split_of[r.video_id] == s] for s in SPLITS}
    empty = [s for s in SPLITS if not split_rows[s]]
    if empty:
        raise DataError(f"{csv_path}: no {' and no '.join(empty)} rows: training needs train rows, val rows (the "
                        "checkpoint is chosen on val) and test rows")
    warnings = _label_warnings(csv_path, split_rows, hashed)
    lines = {r: f"{r.label}&{r.video_id}&{QUALITY}&{r.start}&{r.end}\n" for r in rows}
    texts = {"Annotations.txt": HEADER + "\n" + "".join(lines[r] for r in rows),
             **{f"{s}Set.txt": "".join(lines[r] for r in split_rows[s]) for s in SPLITS},
             "categories.txt": "".join(f"{label}\n" for label in labels),
             # The CSV's videos, one absolute path per line: `avepipe extract --list videos.txt` extracts just these.
             "videos.txt": "".join(f"{path.resolve()}\n" for path in dict.fromkeys(r.path for r in rows))}
    out.mkdir(parents=True, exist_ok=True)
    written = [write_atomic(out / name, text) for name, text in texts.items()]
    return InitSummary(out, len(rows), len(split_of), labels, {s: len(split_rows[s]) for s in SPLITS},
                       {s: len({r.video_id for r in split_rows[s]}) for s in SPLITS}, hashed, longer, written=written,
                       warnings=warnings)


def _label_warnings(csv_path: Path, split_rows: dict[str, list[Row]], hashed: bool) -> list[str]:
    """Labels that train never sees (in val or test only) and train labels val or test never checks."""
    labels = {s: list(dict.fromkeys(r.label for r in split_rows[s])) for s in SPLITS}
    how = " (split by a hash of the video id: add a split column to choose)" if hashed else ""
    out = []
    unseen = [label for s in ("val", "test") for label in labels[s] if label not in labels["train"]]
    if unseen:
        out.append(f"{csv_path}: {', '.join(dict.fromkeys(unseen))}: in val/test but in no train row: the model "
                   f"never learns them{how}")
    for s in ("val", "test"):
        missing = [label for label in labels["train"] if label not in labels[s]]
        if missing:
            out.append(f"{csv_path}: {s} has no {', '.join(missing)} row: {s} never checks "
                       f"{'it' if len(missing) == 1 else 'them'}{how}")
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a folder")
    orders = sorted(p.name for p in out.glob("*_order*.h5")) if out.is_dir() else []
    if orders:
        raise UsageError(f"--out {out}: holds {', '.join(orders)}, which would take precedence over the split files "
                         "written here (an AVE release?): choose another folder")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise UsageError(f"--out {out}: already holds {', '.join(present)}; use --overwrite to replace them")


def _columns(header: list[str], csv_path: Path) -> Optional[dict[str, int]]:
    names = [cell.strip().lower() for cell in header]
    if not names or names[0] not in COLUMNS or "video" not in names:
        return None  # not a header: the first data row
    unknown = [name for name in names if name not in COLUMNS]
    missing = [name for name in COLUMNS[:4] if name not in names]
    if unknown or missing or len(set(names)) != len(names):
        raise DataError(f"{csv_path}: line 1: header {','.join(header)!r}: expected the columns "
                        "video,label,start,end[,split] (each once)")
    return {name: names.index(name) for name in names}


def _read_rows(csv_path: Path, videos: Path, by_id: dict[str, Path]) -> list[Row]:
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            records = _records(csv.reader(handle))
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc})") from None
    columns = _columns(records[0][1], csv_path) if records else None
    if columns is not None:
        records = records[1:]
    rows: list[Row] = []
    problems: list[str] = []  # every bad row, reported together
    seen: dict[tuple, int] = {}
    split_seen: dict[str, tuple[Optional[str], int]] = {}
    for line, cells in records:
        try:
            row = _read_row(csv_path, line, cells, columns, videos, by_id, rows, seen, split_seen)
        except DataError as exc:
            problems.append(str(exc).removeprefix(f"{csv_path}: "))
            continue
        rows.append(row)
    if problems:
        raise DataError(bad_rows(csv_path, problems))
    return rows


def bad_rows(csv_path: Path, problems: list[str]) -> str:
    """One line for every bad row: ``FILE: line 2: ...`` or ``FILE: 3 bad rows: line 2: ...; line 5: ...``."""
    if len(problems) == 1:
        return f"{csv_path}: {problems[0]}"
    return f"{csv_path}: {len(problems)} bad rows: {'; '.join(problems)}"


def _read_row(csv_path: Path, line: int, cells: list[str], columns: Optional[dict[str, int]], videos: Path,
              by_id: dict[str, Path], rows: list[Row], seen: dict[tuple, int],
              split_seen: dict[str, tuple[Optional[str], int]]) -> Row:
    """One CSV record as a :class:`Row`; its problem as a :class:`DataError` naming the line."""
    def fail(why: str, line: int = line) -> DataError:
        return DataError(f"{csv_path}: line {line}: {why}")

    if columns is None:
        if len(cells) not in (4, 5):
            raise fail(f"expected 4 or 5 fields (video,label,start,end[,split]), got {len(cells)}")
        values = dict(zip(COLUMNS, (cell.strip() for cell in cells)))
    else:
        if len(cells) != len(columns):
            raise fail(f"expected {len(columns)} fields like the header, got {len(cells)}")
        values = {name: cells[i].strip() for name, i in columns.items()}
    path, vid = _find_video(values["video"], videos, by_id, fail)
    label = values["label"]
    if not label:
        raise fail("empty label")
    if "&" in label or "\n" in label or "\r" in label:
        raise fail(f"label {label!r} holds '&' or a line break (Annotations.txt separates fields with '&')")
    if label.lower() == "background":
        raise fail("'background' is not a label: it is the class of every second outside an event")
    try:
        start, end = int(values["start"]), int(values["end"])
    except ValueError:
        raise fail(f"start {values['start']!r} / end {values['end']!r}: expected whole seconds") from None
    if not 0 <= start < end:
        raise fail(f"need 0 <= start < end, got start={start} end={end}")
    if end > SECONDS:
        raise fail(f"end {end} is past {SECONDS} s: the models see 10-s clips (train reads a video's first "
                   f"{SECONDS} s); cut longer videos into 10-s clips and annotate each")
    split = values.get("split")
    if split is not None and split not in SPLITS:
        raise fail(f"split {split!r}: expected train, val or test")
    if rows and (rows[0].split is None) != (split is None):
        raise fail("rows with and without a split column: give every row a split, or none")
    key = (vid, label, start, end)
    if key in seen:
        raise fail(f"duplicate of line {seen[key]}")
    earlier = split_seen.get(vid, (split, line))
    if earlier[0] != split:
        raise fail(f"video {vid} is in split {split}, but in {earlier[0]} on line {earlier[1]} (a video's rows "
                   "must share one split)")
    seen[key] = line
    split_seen.setdefault(vid, (split, line))
    return Row(line, vid, path, label, start, end, split)


def _records(reader) -> list[tuple[int, list[str]]]:  # noqa: ANN001 - a csv reader
    """(line number of the record's first line, cells) of the non-blank, non-comment records."""
    out = []
    line = 1
    for cells in reader:
        first = line
        line = reader.line_num + 1
        if not any(cell.strip() for cell in cells) or cells[0].lstrip().startswith("#"):
            continue
        out.append((first, cells))
    return out


def _find_video(name: str, videos: Path, by_id: dict[str, Path], fail: Callable[[str], DataError]
                ) -> tuple[Path, str]:
    if not name:
        raise fail("empty video")
    candidate = videos / name
    if Path(name).suffix.lower() in MEDIA_EXTENSIONS or candidate.is_file():
        if not candidate.is_file():
            raise fail(f"video {name!r}: no such file in {videos}")
        vid = video_id(candidate)
        if by_id.get(vid) is not None and by_id[vid].resolve() != candidate.resolve():
            raise fail(f"video {name!r}: its id {vid!r} is also the id of {by_id[vid]} (ids are file names without "
                       "extension)")
    elif name in by_id:
        candidate, vid = by_id[name], name
    else:
        raise fail(f"video {name!r}: no such file or video id in {videos}")
    if "&" in vid:
        raise fail(f"video id {vid!r} holds '&' (Annotations.txt separates fields with '&'); rename the file")
    if any(brk in str(candidate) for brk in "\n\r"):
        # Annotations.txt and the split files hold one row per line, videos.txt one path per line: a line break in a
        # name would split its row in two, and `train` would refuse the files later.
        raise fail(f"video {str(candidate)!r} holds a line break (the label files hold one row per line); rename "
                   "the file")
    return candidate, vid


def _check_durations(csv_path: Path, rows: list[Row], probe_media: Callable[[Path], MediaInfo]) -> list[str]:
    """Probe each video once; an event past its whole seconds is an error. Returns the ids longer than 10 s."""
    seconds: dict[str, int] = {}
    problems: list[str] = []
    unreadable: set[str] = set()
    for row in rows:
        if row.video_id in unreadable:
            continue
        if row.video_id not in seconds:
            try:
                seconds[row.video_id] = probe_media(row.path).seconds
            except MediaError as exc:
                unreadable.add(row.video_id)
                problems.append(f"line {row.line}: {exc}")
                continue
        if row.end > seconds[row.video_id]:
            problems.append(f"line {row.line}: end {row.end} is past the end of {row.path} "
                            f"({seconds[row.video_id]} whole seconds)")
    if problems:
        raise DataError(bad_rows(csv_path, problems))
    return [vid for vid, t in seconds.items() if t > SECONDS]
