"""``avepipe decode``: the decode stage on its own, into a store of frames that ``extract --from-decoded`` reads.

This splits extraction across machines: decode on CPU nodes, run the backbones on GPU nodes. The store has the
crash-safety, locking and resumability of the feature cache (:mod:`avepipe.cache`: entries staged atomically, one
writer, failures recorded) with other arrays per video::

    /                 attrs: format="avepipe-decoded", format_version, feature_spec (JSON: {"sampling": ...})
    /videos/<id>/     attrs: the same source / duration / seconds / frame-count attributes as a feature cache entry
        frames        uint8 [T, 16, 224, 224, 3]  the selected RGB frames of every second (see avepipe.decode)
        examples      float32 [T, 96, 64]        VGGish log-mel examples
    /failed/<id>      attrs: source_path, error, failed_at

A video's frames are written into its staging file second by second as they are decoded (host memory stays flat for
long videos) and the file is renamed into place only when the video is complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from avepipe.cache import FeatureCache, ensure_space, hdf5_write_error, new_file
from avepipe.decode import (
    FRAME_SHAPE,
    SECOND_BYTES,
    DecodeSource,
    Failed,
    Finished,
    Message,
    Second,
    Started,
    VideoTask,
)
from avepipe.errors import UsageError
from avepipe.faults import fault_point
from avepipe.planning import BatchReport, plan, record_plan_failures, same_source
from avepipe.settings import SAMPLING_MODES, ExtractConfig
from avepipe.version import __version__

FORMAT = "avepipe-decoded"


class DecodedStore(FeatureCache):
    """Frames + log-mel examples per video (see the module docstring); read with :meth:`frames_of`."""

    FORMAT = FORMAT

    def sampling(self) -> str | None:
        spec = self.spec
        return spec.get("sampling") if spec else None

    def read(self, video_id: str) -> tuple[h5py.File, h5py.Group]:
        """The open file and group of one entry (frames are read lazily, a second at a time); close the file."""
        staged = self.staging / f"{video_id}.h5"
        if staged.exists():
            f = h5py.File(staged, "r")
            return f, f["/"]
        f = h5py.File(self.path, "r")
        if f"videos/{video_id}" not in f:
            f.close()
            raise KeyError(video_id)
        return f, f["videos"][video_id]


class _Entry:
    """One video's staging file, filled second by second."""

    def __init__(self, store: DecodedStore, vid: str, meta: dict[str, Any]):
        self.vid, self.meta = vid, meta
        self.tmp, self.final = store.stage_paths(vid)
        seconds = int(meta["seconds"])
        # The whole entry's room is checked first: HDF5 reports a full disk from inside a write (see ensure_space).
        ensure_space(store.staging, seconds * (SECOND_BYTES + 96 * 64 * 4))
        self.file = None
        with self.writing(store):
            self.file = new_file(self.tmp)
            # LZF, one chunk per second: 2.41 -> 1.48 MB per second of video (trailer_bbb.mp4), ~35 ms to write and
            # ~14 ms to read a second on one core, a fraction of decoding it; gzip-1 saves 15% more at 1.6x the write
            # cost (docs/benchmarks.md, "Decoded store compression"). Readers need nothing: h5py reads LZF itself.
            self.frames = self.file.create_dataset("frames", shape=(seconds, *FRAME_SHAPE), dtype=np.uint8,
                                                   chunks=(1, *FRAME_SHAPE), compression="lzf")
        self.filled = 0
        self.store = store

    @contextmanager
    def writing(self, store: DecodedStore) -> Iterator[None]:
        """HDF5 writes of this entry: a failure (a full disk) discards the entry and is one :class:`CacheError`."""
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self.discard()
            raise hdf5_write_error(store.staging, exc) from None

    def discard(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except (OSError, RuntimeError):
                pass  # a file whose writes failed: its staging name is removed below, never trusted
            self.file = None
        self.tmp.unlink(missing_ok=True)


def run_decode(paths: list[Path], out: str | os.PathLike, config: ExtractConfig,
               progress: Callable[[str, dict[str, Any]], None] | None = None) -> BatchReport:
    """Decode ``paths`` into the store ``out`` (resumable: finished videos are skipped)."""
    emit = progress or (lambda event, fields: None)
    if config.sampling not in SAMPLING_MODES:
        raise UsageError(f"--sampling {config.sampling}: choose one of {', '.join(SAMPLING_MODES)}")
    if not paths:
        raise UsageError("no input videos (give files, directories or --list)")
    report = BatchReport()
    started = time.perf_counter()
    store = DecodedStore(out, "a")
    entries: dict[str, _Entry] = {}
    try:
        store.ensure_spec({"sampling": config.sampling, "spec_version": 1})
        todo = plan(paths, store, config, report)
        record_plan_failures(store, paths, report)
        for vid, error in report.failed.items():
            emit("video", {"id": vid, "status": "failed", "error": error})
        emit("start", {"total": report.total, "todo": len(todo), "skipped": len(report.skipped),
                       "previously_failed": len(report.previously_failed), "device": "cpu (decode only)"})
        source = DecodeSource([VideoTask(vid, str(path)) for vid, path in todo.items()], config.decode_part())
        for message in source:
            if isinstance(message, Started):
                entries[message.vid] = _Entry(store, message.vid, message.meta)
                emit("seconds", {"id": message.vid, "done": 0, "total": int(message.meta["seconds"])})
            elif isinstance(message, Second):
                entry = entries.get(message.vid)
                if entry is not None:
                    with entry.writing(store):
                        entry.frames[message.second] = source.frames(message)
                    entry.filled += 1
                    fault_point("decoded-second")
                    emit("seconds", {"id": entry.vid, "done": entry.filled, "total": entry.frames.shape[0]})
                source.release(message)
            elif isinstance(message, Finished):
                entry = entries.pop(message.vid)
                seconds = entry.frames.shape[0]
                attrs = {**entry.meta, **message.meta, "sampling": config.sampling, "avepipe_version": __version__,
                         "decoded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                with entry.writing(store):
                    entry.file.create_dataset("examples", data=message.examples)
                    for key, value in attrs.items():
                        entry.file.attrs[key] = value
                    entry.file.close()
                    entry.file = None
                store.commit_staged(entry.vid, entry.tmp, entry.final)
                store.maybe_compact()
                report.done.append(entry.vid)
                report.seconds_of_video += seconds
                emit("video", {"id": entry.vid, "status": "done", "seconds": seconds})
            elif isinstance(message, Failed):
                entry = entries.pop(message.vid, None)
                if entry is not None:
                    entry.discard()
                report.failed[message.vid] = message.error
                store.put_failure(message.vid, str(todo[message.vid]), message.error, message.transient)
                emit("video", {"id": message.vid, "status": "failed", "error": message.error})
    finally:
        for entry in entries.values():
            entry.discard()
        store.close()
    report.elapsed_s = time.perf_counter() - started
    return report


class DecodedSource:
    """``extract --from-decoded``: the decode messages of ``tasks`` read back from a store instead of decoded."""

    def __init__(self, path: str | os.PathLike, tasks: list[VideoTask], sampling: str):
        self.store = DecodedStore(path, "r")
        self.tasks = tasks
        found = self.store.sampling()
        if found is not None and found != sampling:
            raise UsageError(f"{path}: decoded with --sampling {found}, but this run uses --sampling {sampling}")
        self.ids = set(self.store.ids())

    def __iter__(self) -> Iterator[Message]:
        for task in self.tasks:
            if task.vid not in self.ids:
                yield Failed(task.vid, f"{task.path}: not in the decoded store {self.store.path} "
                                       f"(run `avepipe decode` on it first)")
                continue
            yield from self._video(task)

    def _video(self, task: VideoTask) -> Iterator[Message]:
        """One video's messages; a store entry of another (or a changed) file, and a store that became unreadable
        (deleted, replaced by something else) mid-run, are one :class:`Failed` each, never an exception."""
        try:
            f, group = self.store.read(task.vid)
        except (OSError, KeyError) as exc:
            yield Failed(task.vid, _gone(task, self.store.path, exc), transient=True)
            return
        try:
            meta = {key: _plain(value) for key, value in group.attrs.items()}
            problem = stale_entry(meta, Path(task.path))
            if problem:
                yield Failed(task.vid, f"{task.path}: the decoded store {self.store.path} does not hold this file's "
                                       f"frames: {problem}; run `avepipe decode` on this file again (into a new "
                                       f"store)")
                return
            frames = group["frames"]
            yield Started(task.vid, meta)
            for second in range(task.skip_seconds, frames.shape[0]):
                yield Second(task.vid, second, frames[second])
            yield Finished(task.vid, group["examples"][()], {})
        except (OSError, KeyError) as exc:
            yield Failed(task.vid, _gone(task, self.store.path, exc), transient=True)
        finally:
            f.close()


def stale_entry(meta: dict[str, Any], path: Path) -> str | None:
    """Why a store entry (source path, size and mtime, as the feature cache records them) does not hold the frames
    of ``path`` now; None when it does. As in the feature cache, the same size and mtime is the same file, wherever it
    is now (decoded on one machine, extracted on another that mounts the videos elsewhere, or moved)."""
    if not os.path.isfile(path):
        return "the file is missing"
    if same_source(meta, path):
        return None
    recorded = str(meta.get("source_path", ""))
    if recorded and recorded != str(path.resolve()):
        return (f"the entry of this id was decoded from another file, {recorded} (size {meta.get('source_size')}, "
                f"mtime {meta.get('source_mtime')})")
    return (f"its entry was decoded from an earlier version of this file (size {meta.get('source_size')}, "
            f"mtime {meta.get('source_mtime')})")


def _gone(task: VideoTask, store: Path, exc: BaseException) -> str:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    if not store.exists():
        why = "the store was deleted during the run"
    return f"{task.path}: cannot read the decoded store {store} ({why}); the next run retries it"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value
