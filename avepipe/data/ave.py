"""The AVE dataset's annotation, split and label files (Tian et al., ECCV 2018).

``Annotations.txt`` holds one ``Category&VideoID&Quality&StartTime&EndTime`` row per event (a video id may occur on
several rows). Every released per-video array (features, labels) is in Annotations order, so a row index into
Annotations.txt is the common key: split files map to row indices, and ``labels_arrays`` is built in that order.

Real-data quirk: the official Annotations.txt contains one row with an empty event
(``Church bell&VWi2ENBuTbw&good&0&0``, line 28, row 26; it is in the SEL train split and the CML val split).
``read_annotations`` accepts empty events by default so the official file parses; such a row gets background on all
ten seconds and its category as video label.
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from avepipe.errors import DataError

NUM_CLASSES = 29
BACKGROUND = 28
SECONDS = 10

HEADER = ("category", "videoid", "quality", "starttime", "endtime")
SPLITS = ("train", "val", "test")
KINDS = ("sel", "cml")


@dataclass(frozen=True)
class Annotation:
    row: int  # index among the data rows of the file it was read from (Annotations order for Annotations.txt)
    category: str
    video_id: str
    quality: str
    start: int
    end: int

    def key(self) -> tuple[str, str, str, int, int]:
        """Everything but the row index: what identifies the row across Annotations.txt and the split files."""
        return (self.category, self.video_id, self.quality, self.start, self.end)


def read_categories(path: str | os.PathLike) -> list[str]:
    """The category names in label-index order (one a line; blank lines ignored)."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate category names")
    return names


def _is_header(fields: list[str]) -> bool:
    return tuple(field.strip().lower() for field in fields) == HEADER


def _parse(
    path: Path, categories: Sequence[str] | None, max_end: int, allow_empty: bool
) -> Iterator[tuple[int, Annotation]]:
    """Yield (1-based line number, Annotation) for every data row of an annotation-format file."""
    known = set(categories) if categories is not None else None
    row = 0
    seen_content = False
    # newline="" + splitlines() so CRLF and lone CR endings are handled the same as LF.
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        fields = [field.strip() for field in line.split("&")]
        if not seen_content:
            seen_content = True
            if _is_header(fields):  # only the first non-blank line may be the header
                continue

        def fail(why: str, lineno: int = lineno, raw: str = raw) -> ValueError:
            return ValueError(f"{path}: line {lineno}: {why}: {raw!r}")

        if len(fields) != 5:
            raise fail(f"expected 5 '&'-separated fields, got {len(fields)}")
        category, video_id, quality, start_text, end_text = fields
        if not category or not video_id:
            raise fail("empty category or video id")
        try:
            start, end = int(start_text), int(end_text)
        except ValueError:
            raise fail("start/end times are not integers") from None
        if start < 0 or end > max_end or start > end or (start == end and not allow_empty):
            bound = "<=" if allow_empty else "<"
            raise fail(f"need 0 <= start {bound} end <= {max_end}, got start={start} end={end}")
        if known is not None and category not in known:
            raise fail(f"unknown category {category!r}")
        yield lineno, Annotation(row, category, video_id, quality, start, end)
        row += 1


def read_annotations(
    path: str | os.PathLike,
    categories: Sequence[str] | None = None,
    *,
    max_end: int = SECONDS,
    allow_empty: bool = True,
) -> list[Annotation]:
    """Parse an annotation-format file (Annotations.txt or a ``*Set.txt`` split file).

    The header line is optional (detected), trailing whitespace, CRLF endings and blank lines are tolerated. A malformed
    row raises ValueError naming the file and line: wrong field count, non-integer times, times outside
    ``0 <= start <= end <= max_end``, an empty event (start == end) when ``allow_empty`` is False, or a category not in
    ``categories`` (when given). ``allow_empty`` defaults to True because the official file has one 0&0 row.
    """
    return [ann for _, ann in _parse(Path(path), categories, max_end, allow_empty)]


def class_index(annotation: Annotation, categories: Sequence[str]) -> int:
    try:
        return list(categories).index(annotation.category)
    except ValueError:
        raise ValueError(f"unknown category {annotation.category!r} (row {annotation.row})") from None


def labels_arrays(annotations: Sequence[Annotation], categories: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-second and video-level targets, rows in the given (annotation) order.

    labels [N, 10, 29]: one-hot, the event class on seconds start..end-1 and BACKGROUND elsewhere;
    event [N, 10]: 1 inside the event; video_label [N, 29]: one-hot category.
    """
    if len(categories) != BACKGROUND:
        raise ValueError(f"expected {BACKGROUND} categories, got {len(categories)}")
    index = {name: i for i, name in enumerate(categories)}
    n = len(annotations)
    labels = np.zeros((n, SECONDS, NUM_CLASSES), np.float32)
    event = np.zeros((n, SECONDS), np.float32)
    video_label = np.zeros((n, NUM_CLASSES), np.float32)
    for i, ann in enumerate(annotations):
        if ann.category not in index:
            raise ValueError(f"unknown category {ann.category!r} (row {ann.row})")
        if not 0 <= ann.start <= ann.end <= SECONDS:
            raise ValueError(f"row {ann.row}: event {ann.start}..{ann.end} is outside 0..{SECONDS}")
        cls = index[ann.category]
        event[i, ann.start : ann.end] = 1.0
        labels[i, :, BACKGROUND] = 1.0 - event[i]
        labels[i, ann.start : ann.end, cls] = 1.0
        video_label[i, cls] = 1.0
    return {"labels": labels, "event": event, "video_label": video_label}


def write_labels_h5(
    annotations: Sequence[Annotation], categories: Sequence[str], out_path: str | os.PathLike
) -> Path:
    """Write ``labels``/``event``/``video_label`` (float32) to ``out_path``; a crash leaves the old file or none."""
    arrays = labels_arrays(annotations, categories)
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for name, value in arrays.items():
                f.create_dataset(name, data=value)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_label_file(annotations_path: str | os.PathLike, categories_path: str | os.PathLike,
                     out_path: str | os.PathLike) -> tuple[int, int]:
    """``avepipe dataset labels``: the released label arrays of an annotation file; returns (rows, categories).
    Unreadable or malformed inputs raise :class:`~avepipe.errors.DataError` naming the file (and line)."""
    try:
        names = read_categories(categories_path)
        rows = read_annotations(annotations_path, names)
        write_labels_h5(rows, names, out_path)
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from None
    return len(rows), len(names)


def read_split_file(split_txt: str | os.PathLike, annotations: Sequence[Annotation]) -> np.ndarray:
    """Map each row of a split file (trainSet.txt, ...) to its row index in ``annotations``.

    Rows are matched on the full (category, video id, quality, start, end) tuple, since a video id can carry several
    events. Identical rows (none in the official files) are matched in order: the k-th copy in the split file takes
    the k-th copy in ``annotations``. A split row with no (remaining) match raises ValueError naming the line.
    """
    available: dict[tuple, deque[int]] = defaultdict(deque)
    for ann in annotations:
        available[ann.key()].append(ann.row)
    path = Path(split_txt)
    rows = []
    # Split rows are validated like annotation rows except for the range check: matching decides validity.
    for lineno, ann in _parse(path, None, max_end=np.iinfo(np.int64).max, allow_empty=True):
        queue = available.get(ann.key())
        if not queue:
            raise ValueError(f"{path}: line {lineno}: row not found in the annotations (or used up): {ann.key()}")
        rows.append(queue.popleft())
    return np.asarray(rows, dtype=np.int64)


def read_order_h5(path: str | os.PathLike) -> np.ndarray:
    """Row indices into Annotations.txt from an ``*_order*.h5`` file (dataset ``order``)."""
    with h5py.File(path, "r") as f:
        if "order" not in f:
            raise ValueError(f"{path}: no dataset 'order' (keys: {sorted(f.keys())})")
        order = f["order"][()]
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"{path}: 'order' must be a 1-D integer array, got {order.dtype} {order.shape}")
    order = order.astype(np.int64)
    if order.size and order.min() < 0:
        raise ValueError(f"{path}: negative row index")
    if np.unique(order).size != order.size:
        raise ValueError(f"{path}: repeated row indices")
    return order


def load_split(kind: str, split: str, ave_dir: str | os.PathLike) -> np.ndarray:
    """Annotations row indices of one split: ``kind`` "sel" (event localization) or "cml" (cross-modality).

    Reads ``{split}_order.h5`` (sel) or ``{split}_order_match.h5`` (cml). For sel without the order file, falls back to
    ``{split}Set.txt`` matched against ``Annotations.txt`` (the two agree exactly on the official release).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(ave_dir)
    annotations_path = root / "Annotations.txt"
    order_path = root / (f"{split}_order.h5" if kind == "sel" else f"{split}_order_match.h5")
    if order_path.is_file():
        order = read_order_h5(order_path)
        if annotations_path.is_file():  # guard against pairing order files with a different annotation file
            count = len(read_annotations(annotations_path))
            if order.size and order.max() >= count:
                raise ValueError(f"{order_path}: row index {order.max()} beyond {count} rows of {annotations_path}")
        return order
    if kind == "cml":
        raise FileNotFoundError(f"CML split file not found: {order_path}")
    split_txt = root / f"{split}Set.txt"
    if not split_txt.is_file():
        raise FileNotFoundError(f"neither {order_path} nor {split_txt} exists")
    return read_split_file(split_txt, read_annotations(annotations_path))


def load_noisy(ave_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The background-only extra videos: audio features [M, 10, 128] and video labels [M, 29], both float32."""
    root = Path(ave_dir)
    with h5py.File(root / "audio_feature_noisy.h5", "r") as f:
        audio = np.asarray(f["avadataset"][()], dtype=np.float32)  # stored as float64
    with h5py.File(root / "labels_noisy.h5", "r") as f:
        labels = np.asarray(f["avadataset"][()], dtype=np.float32)
    if audio.ndim != 3 or audio.shape[1:] != (SECONDS, 128):
        raise ValueError(f"audio_feature_noisy.h5: expected [M, {SECONDS}, 128], got {audio.shape}")
    if labels.shape != (audio.shape[0], NUM_CLASSES):
        raise ValueError(f"labels_noisy.h5: expected [{audio.shape[0]}, {NUM_CLASSES}], got {labels.shape}")
    return audio, labels


def is_ave_release(annotations: str | os.PathLike) -> bool:
    """Whether ``annotations`` is the AVE release's Annotations.txt (with or without its header line), recognised by
    its checksum in the release manifest: only then do the papers' AVE numbers compare with a run on it."""
    import hashlib
    import json
    from importlib import resources

    try:
        data = Path(annotations).read_bytes()
    except OSError:
        return False
    entry = json.loads(resources.files("avepipe.data").joinpath("ave_manifest.json").read_text())["Annotations.txt"]
    first, _, rest = data.partition(b"\n")
    candidates = [data] + ([rest] if first.startswith(b"Category&") else [])
    return any(hashlib.sha256(text).hexdigest() == entry["sha256"] for text in candidates)
