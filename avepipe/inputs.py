"""Which files, which ids, which shard: the inputs of ``extract``, ``decode`` and ``localize``.

A video's id is its file name without extension; two different files with one id are a usage error (ids key the
cache). Hidden files (``.name``, e.g. macOS ``._x.mp4`` resource forks) found while walking a folder are skipped;
FIFOs, broken symbolic links and link loops with a video extension are kept, and fail as videos with one line each.
Shards are assigned by a hash of the id, stable across machines and Python runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from avepipe.errors import UsageError

MEDIA_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp",
                    ".ogv"}


def discover(paths: Iterable[str | os.PathLike], list_file: str | os.PathLike | None = None) -> list[Path]:
    """Media files named directly, found in directories (recursively, by extension) or listed one per line."""
    found: list[Path] = []
    items = [Path(p) for p in paths]
    if list_file:
        list_path = Path(list_file)
        try:
            lines = list_path.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"{list_path}: cannot read the list ({exc.strerror})") from None
        items += [_listed(line, list_path.parent) for line in lines
                  if line.strip() and not line.lstrip().startswith("#")]
    for item in items:
        if item.is_dir():
            # Every non-hidden entry with a video extension that is not a folder: a FIFO, a broken symbolic link or
            # a link loop is kept too, and fails as that video with one line saying what it is (never skipped
            # silently, never opened: a FIFO would block).
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in MEDIA_EXTENSIONS and not p.is_dir()
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            found.append(item)  # a missing or bad file is reported per video, not as a usage error
    return found


def _listed(line: str, base: Path) -> Path:
    """One ``--list`` line as the path it names: taken as written (leading and trailing spaces are part of the name;
    only a Windows line end is dropped). A name with spaces around it that does not exist while the name without them
    does is that file (a hand-edited list); relative paths are relative to the list's folder."""
    written = line.rstrip("\r")

    def resolve(text: str) -> Path:
        return Path(text) if Path(text).is_absolute() else base / text

    path = resolve(written)
    stripped = resolve(written.strip())
    if written != written.strip() and not os.path.lexists(path) and os.path.lexists(stripped):
        return stripped
    return path


def video_id(path: Path) -> str:
    return path.stem


def shard_of(vid: str, n: int) -> int:
    """Deterministic shard of a video id (stable across machines and Python runs)."""
    return int.from_bytes(hashlib.sha1(vid.encode()).digest()[:8], "big") % n


def select_shard(ids: dict[str, Path], shard: tuple[int, int] | None) -> dict[str, Path]:
    """The ids of shard ``(k, n)`` (all of them when ``shard`` is None)."""
    if shard is None:
        return ids
    k, n = shard
    return {vid: p for vid, p in ids.items() if shard_of(vid, n) == k}


def assign_ids(paths: list[Path]) -> dict[str, Path]:
    ids: dict[str, Path] = {}
    for path in paths:
        vid = video_id(path)
        if vid in ids and ids[vid].resolve() != path.resolve():
            raise UsageError(f"video id {vid!r} is used by two files: {ids[vid]} and {path} "
                             f"(ids are file names without extension)")
        ids.setdefault(vid, path)
    return ids
