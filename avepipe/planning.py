"""What a batch run (``extract``, ``decode``) has to do: shards, skips of finished videos, recorded failures.

A video already in the store is skipped when its source file is unchanged (same size and mtime); a changed file at the
same path is done again (its new entry replaces the old one), and so is a file whose stored entry came from a file
that no longer exists (moved); the same id for another file that exists is a per-video failure. An input that cannot
be read (missing, not a file, no permission, empty) is that video's failure before anything else is said about it.
Recorded failures are retried only when asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avepipe.cache import FeatureCache, id_problem
from avepipe.inputs import assign_ids, select_shard
from avepipe.settings import ExtractConfig


@dataclass
class BatchReport:
    total: int = 0  # videos named by the inputs (after the shard)
    done: list[str] = field(default_factory=list)  # done by this run
    skipped: list[str] = field(default_factory=list)  # already in the store
    failed: dict[str, str] = field(default_factory=dict)  # id -> one-line error (this run)
    previously_failed: dict[str, str] = field(default_factory=dict)  # recorded failures not retried
    seconds_of_video: int = 0  # seconds done by this run
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.previously_failed else 0


def plan(paths: list[Path], cache: FeatureCache, config: ExtractConfig, report: BatchReport) -> dict[str, Path]:
    """Which of ``paths`` need work: applies the shard, skips finished videos and (unless retrying) recorded
    failures."""
    ids = select_shard(assign_ids(paths), config.shard)
    report.total = len(ids)
    done = cache.all_attrs()
    failures = cache.failures()
    todo: dict[str, Path] = {}
    for vid, path in ids.items():
        if vid in done:
            attrs = done[vid]
            if same_source(attrs, path):
                report.skipped.append(vid)
                continue
            problem = unreadable(path)
            if problem:  # a mistyped path is a missing file, not a collision with the stored one
                report.failed[vid] = problem
                continue
            other = Path(attrs.get("source_path", ""))
            if str(other.resolve()) != str(path.resolve()) and os.path.lexists(other):
                report.failed[vid] = (f"{path}: video id {vid!r} is already in the cache for another file "
                                      f"({attrs.get('source_path')}); rename one of them")
                continue
            # Same path, changed file: extract again (the new entry replaces the old one).
        problem = id_problem(vid)
        if problem:  # cannot be stored, not even as a failure: reported, and the batch goes on
            report.failed[vid] = f"{path}: {problem}; rename the file"
            continue
        if vid in failures and not config.retry_failed and not retries_on_its_own(failures[vid], path):
            report.previously_failed[vid] = failures[vid].get("error", "failed earlier")
            continue
        problem = unreadable(path)
        if problem:  # found now, not after the backbones are loaded and the decoders started
            report.failed[vid] = problem
            continue
        todo[vid] = path
    return todo


def unreadable(path: Path) -> str | None:
    """The one-line failure of an input that cannot be read at all (``<path>: missing file: ...``, as the decoder
    would say it), checked without opening it; None for a file worth decoding."""
    from avepipe import media
    from avepipe.errors import MediaError

    try:
        media.check_file(path)
    except MediaError as exc:
        return str(exc)
    return None


def unreadable_inputs(paths: list[Path], shard: tuple[int, int] | None) -> dict[str, str] | None:
    """id -> failure of every input when none of them can be read (a run that has nothing to decode: it creates,
    locks and loads nothing); None when some input can be read."""
    ids = select_shard(assign_ids(paths), shard)
    failures = {}
    for vid, path in ids.items():
        problem = unreadable(path)
        if problem is None:
            return None
        failures[vid] = problem
    return failures


def record_plan_failures(store: FeatureCache, paths: list[Path], report: BatchReport) -> None:
    """Store the failures :func:`plan` found (an id the store holds for another file); an id that cannot be stored
    at all stays in the report only."""
    sources = assign_ids(paths)
    for vid, error in report.failed.items():
        if id_problem(vid) is None:
            store.put_failure(vid, str(sources.get(vid, "")), error)


def retries_on_its_own(record: dict[str, Any], path: Path) -> bool:
    """A recorded failure is retried without --retry-failed when its cause was transient (a killed decoder) or when
    the file changed since (size or mtime)."""
    if record.get("transient"):
        return True
    if "source_size" not in record:
        return False
    return not same_source(record, path)


def source_fields(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source_path": str(path.resolve()), "source_size": stat.st_size, "source_mtime": stat.st_mtime}


def same_source(attrs: dict[str, Any], path: Path) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    return (int(attrs.get("source_size", -1)) == stat.st_size
            and abs(float(attrs.get("source_mtime", -1)) - stat.st_mtime) < 1e-3)
