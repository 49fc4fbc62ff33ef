"""decode -> batch -> backbones -> cache: ``avepipe extract``.

Decode processes (:mod:`avepipe.decode`) stream each video's selected frames, one second at a time, through a
shared-memory ring; this process packs seconds of many videos into fixed-size batches in (pinned) host buffers, runs
VGG-19 on the device without waiting on it (two buffers: one fills while the other is on the device), runs VGGish on
each video's log-mel examples, and hands finished videos to a writer thread that stages them in the cache (atomic per
video; fsyncs never block the thread that feeds the device).

Resumable: videos already in the cache are skipped; failures are recorded and retried only with ``retry_failed``;
a long video stages its finished seconds every ``checkpoint_seconds`` (:mod:`avepipe.partial`), so a killed run
resumes it from its last staged second instead of from zero.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avepipe.backbones.extractor import (
    POOL5_SHAPE,
    Backbones,
    HostResult,
    check_weight_files,
    resolve_precision,
)
from avepipe.cache import FeatureCache, writer_of
from avepipe.decode import DecodeSource, Failed, Finished, Message, Second, Started, VideoTask
from avepipe.decoded import DecodedSource
from avepipe.devices import resolve_device, warn_cpu_fallback
from avepipe.errors import AvepipeError, UsageError
from avepipe.partial import PartialStore
from avepipe.planning import BatchReport, plan, record_plan_failures, source_fields, unreadable_inputs
from avepipe.sampling import FRAMES_PER_SECOND
from avepipe.settings import SAMPLING_MODES, ExtractConfig

Progress = Callable[[str, dict[str, Any]], None]  # (event, fields): "start", "video", "seconds", "warning"


@dataclass
class ExtractReport(BatchReport):
    resumed_seconds: int = 0  # seconds of partly extracted long videos taken from an earlier run


# -- the writer thread -------------------------------------------------------------------------------------------

class CacheWriter:
    """Stages entries, failures and partial seconds from a background thread, in submission order.

    Writing (HDF5 + fsync + rename) then overlaps decoding and the device. The first error is raised again by
    :meth:`close` (or by the next submission)."""

    def __init__(self, cache: FeatureCache, partial: PartialStore):
        self.cache, self.partial = cache, partial
        self._jobs: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is not None:
                continue
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def put(self, vid: str, visual: np.ndarray, audio: np.ndarray, attrs: dict[str, Any]) -> None:
        def job() -> None:
            self.cache.put(vid, visual, audio, attrs)
            self.partial.clear(vid)
            self.cache.maybe_compact()
        self.submit(job)

    def put_failure(self, vid: str, source: str, error: str, transient: bool = False) -> None:
        self.submit(lambda: self.cache.put_failure(vid, source, error, transient))

    def save_partial(self, vid: str, start: int, visual: np.ndarray, source: dict, spec: dict) -> None:
        self.submit(lambda: self.partial.save(vid, start, visual, source, spec))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


# -- batching ------------------------------------------------------------------------------------------------------

class Batcher:
    """Packs seconds of frames from many videos into fixed-size batches for VGG-19 and routes the features back.

    Two host buffers alternate: while one batch is on the device the next one fills; a buffer is refilled only after
    the batch that used it has come back (at most one batch in flight besides the one filling)."""

    def __init__(self, backbones: Backbones, batch_seconds: int, deliver: Callable[[str, int, np.ndarray], None]):
        self.backbones = backbones
        self.deliver = deliver  # (video id, second, features [7, 7, 512])
        self.buffers = [backbones.host_buffer(batch_seconds) for _ in range(2)]
        self.current = 0
        self.owners: list[tuple[str, int]] = []  # (video id, second) of each row of the filling buffer
        self.in_flight: deque[tuple[HostResult, list[tuple[str, int]]]] = deque()

    def add(self, vid: str, second: int, frames: np.ndarray) -> None:
        buffer = self.buffers[self.current]
        buffer[len(self.owners)].numpy()[...] = frames
        self.owners.append((vid, second))
        if len(self.owners) == buffer.shape[0]:
            self.submit()

    def submit(self) -> None:
        if not self.owners:
            return
        rows = len(self.owners)
        result = self.backbones.visual_async(self.buffers[self.current][:rows])
        self.in_flight.append((result, self.owners))
        self.owners = []
        self.current ^= 1
        while len(self.in_flight) > 1:
            self._collect()

    def _collect(self) -> None:
        result, owners = self.in_flight.popleft()
        features = result.get()
        for row, (vid, second) in enumerate(owners):
            self.deliver(vid, second, features[row])
        self.collected()

    def collected(self) -> None:
        """Called after each batch has come back (the device has got that far): a hook for the owner."""

    def flush(self) -> None:
        self.submit()
        while self.in_flight:
            self._collect()


@dataclass
class VideoState:
    """One video between its first message and its cache entry."""

    path: Path
    meta: dict[str, Any]
    visual: np.ndarray  # [T, 7, 7, 512], filled in order
    filled: int = 0  # seconds with features (a prefix: seconds arrive in order)
    staged: int = 0  # seconds saved as partial progress
    finished: Finished | None = None  # the decoder's last message (log-mel examples + end attributes)

    @property
    def complete(self) -> bool:
        return self.finished is not None and self.filled >= len(self.visual)


class Run:
    """The consumer side of one extraction: messages in, cache entries out."""

    def __init__(self, todo: dict[str, Path], backbones: Backbones, config: ExtractConfig, writer: CacheWriter,
                 report: ExtractReport, emit: Progress, resumed: dict[str, np.ndarray]):
        self.todo, self.backbones, self.config = todo, backbones, config
        self.writer, self.report, self.emit = writer, report, emit
        self.resumed = resumed
        self.spec = backbones.spec(config.sampling)
        self.entry_attrs = backbones.entry_attrs(config.sampling)
        batch_frames = config.batch_size or (128 if backbones.device.type == "cuda" else 32)
        self.batcher = Batcher(backbones, max(1, batch_frames // FRAMES_PER_SECOND), self.deliver)
        self.batcher.collected = self.finish_ready
        self.videos: dict[str, VideoState] = {}
        # Videos whose VGGish embeddings are on their way back (queued on the device behind the visual batches): the
        # feed goes on, and they are written once the device has got there.
        self.finishing: deque[tuple[str, VideoState, HostResult]] = deque()

    def consume(self, messages: Iterable[Message], source: DecodeSource | None) -> None:
        for message in messages:
            if isinstance(message, Second):
                if message.vid in self.videos:
                    frames = source.frames(message) if source is not None else message.frames
                    self.batcher.add(message.vid, message.second, frames)
                if source is not None:
                    source.release(message)
            elif isinstance(message, Started):
                self.start(message)
            elif isinstance(message, Finished):
                state = self.videos.get(message.vid)
                if state is not None:
                    state.finished = message
                    self.maybe_finish(message.vid)
            elif isinstance(message, Failed):
                self.fail(message.vid, message.error, message.transient)
        self.batcher.flush()
        for vid in [v for v, s in self.videos.items() if s.complete]:
            self.maybe_finish(vid)
        self.finish_ready(wait=True)
        for vid in list(self.videos):  # decoded, but some second never came: a decoder bug, not the user's file
            self.fail(vid, f"{self.todo[vid]}: internal error: {self.videos[vid].filled} of "
                           f"{len(self.videos[vid].visual)} seconds were decoded")

    def start(self, message: Started) -> None:
        seconds = int(message.meta["seconds"])
        visual = np.zeros((seconds, *POOL5_SHAPE), np.float32)
        state = VideoState(self.todo[message.vid], message.meta, visual)
        earlier = self.resumed.get(message.vid)
        if earlier is not None:
            k = min(len(earlier), seconds)
            visual[:k] = earlier[:k]
            state.filled = state.staged = k
        self.videos[message.vid] = state
        self.emit("seconds", {"id": message.vid, "done": state.filled, "total": seconds})

    def deliver(self, vid: str, second: int, features: np.ndarray) -> None:
        state = self.videos.get(vid)
        if state is None:
            return  # the video failed after this batch was sent
        assert second == state.filled, (vid, second, state.filled)
        state.visual[second] = features
        state.filled += 1
        total = len(state.visual)
        every = self.config.checkpoint_seconds
        if every > 0 and total > every and state.filled - state.staged >= every and state.filled < total:
            start, state.staged = state.staged, state.filled
            self.writer.save_partial(vid, start, state.visual[start:state.filled].copy(), state.meta, self.spec)
        self.emit("seconds", {"id": vid, "done": state.filled, "total": total})
        self.maybe_finish(vid)

    def maybe_finish(self, vid: str) -> None:
        state = self.videos.get(vid)
        if state is None or not state.complete:
            return
        del self.videos[vid]
        self.finishing.append((vid, state, self.backbones.audio_async(state.finished.examples)))
        self.finish_ready()

    def finish_ready(self, wait: bool = False) -> None:
        """Write the videos whose embeddings have arrived, in the order they finished (all of them with ``wait``)."""
        while self.finishing and (wait or self.finishing[0][2].ready()):
            vid, state, result = self.finishing.popleft()
            self.write(vid, state, result.get())

    def write(self, vid: str, state: VideoState, audio: np.ndarray) -> None:
        finished = state.finished
        attrs = {**state.meta, **finished.meta, **self.entry_attrs,
                 "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.writer.put(vid, state.visual, audio, attrs)
        if attrs.get("decode_glitches"):
            self.emit("warning", {"message": f"{state.path}: {attrs['decode_glitches']} isolated decode error(s) "
                                             f"skipped by ffmpeg; the video is kept (recorded as decode_glitches)"})
        seconds = len(state.visual)
        self.report.done.append(vid)
        self.report.seconds_of_video += seconds
        self.emit("video", {"id": vid, "status": "done", "seconds": seconds})

    def fail(self, vid: str, error: str, transient: bool = False) -> None:
        self.videos.pop(vid, None)
        self.report.failed[vid] = error
        self.writer.put_failure(vid, str(self.todo[vid]), error, transient)
        self.emit("video", {"id": vid, "status": "failed", "error": error})


# -- the run ---------------------------------------------------------------------------------------------------------

def check_config(config: ExtractConfig) -> torch.device:
    """The run's device; bad options (sampling, device, precision) raise :class:`UsageError` before anything is
    opened or loaded."""
    if config.sampling not in SAMPLING_MODES:
        raise UsageError(f"--sampling {config.sampling}: choose one of {', '.join(SAMPLING_MODES)}")
    try:
        device = resolve_device(config.device, warn=False)  # the CPU warning comes when a backbone loads
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    resolve_precision(config.precision, device)
    return device


def run_extract(paths: list[Path], cache_path: str | os.PathLike, config: ExtractConfig,
                progress: Progress | None = None,
                load_backbones: Callable[[], Backbones] | None = None) -> ExtractReport:
    """Extract the videos of ``paths`` that are not in the cache yet (see the module's docstring).

    The backbones are loaded only when some video has to be extracted: by ``load_backbones()`` (a caller that runs
    several extractions, such as :class:`avepipe.localization.Localizer`, passes one that keeps them loaded), else
    ``Backbones(config, device)``. A run with nothing to do (every video in the cache, or failed earlier) therefore
    needs no weights files, and reads the cache without taking its writer lock or writing anything; it does not
    compare its weights with the cache's feature spec either (there is nothing to add to the cache).

    Refused starts: bad options and missing weights files (all named in one :class:`~avepipe.errors.WeightsError`)
    are found before the cache is opened for writing, so nothing is created or locked; a start refused later
    (unreadable weights, another feature spec, a locked cache) removes what it created for a new cache (``F.h5``,
    ``F.h5.lock``, ``F.h5.staging/``) and leaves the contents of an existing cache as they were."""
    emit = progress or (lambda event, fields: None)
    if not paths:
        raise UsageError("no input videos (give files, directories or --list)")
    device = check_config(config)
    started = time.perf_counter()
    failures = unreadable_inputs(paths, config.shard)
    if failures:  # no input can be read: each one's failure, and nothing created, locked or loaded
        report = ExtractReport(total=len(failures), failed=failures)
        for vid, error in failures.items():
            emit("video", {"id": vid, "status": "failed", "error": error})
        emit("start", {"total": report.total, "todo": 0, "skipped": 0, "previously_failed": 0,
                       "unreadable": len(failures), "device": str(device), "resumed_seconds": 0})
        report.elapsed_s = time.perf_counter() - started
        return report
    report, work = _look_ahead(paths, cache_path, config)
    if report is not None:
        emit("start", {"total": report.total, "todo": 0, "skipped": len(report.skipped),
                       "previously_failed": len(report.previously_failed), "device": str(device),
                       "resumed_seconds": 0})
        report.elapsed_s = time.perf_counter() - started
        return report
    if work:  # missing weights are named before a new cache (its folder, lock, staging) is created or one is locked
        check_weight_files(config)
    report = ExtractReport()
    cache = FeatureCache(cache_path, "a")  # takes the writer lock first: a second writer fails fast
    partial = PartialStore(cache_path)
    try:
        try:
            todo = plan(paths, cache, config, report)
            backbones = None
            if todo:  # only now: a run with nothing to extract loads (and needs) no weights
                warn_cpu_fallback(device)
                backbones = load_backbones() if load_backbones is not None else Backbones(config, device)
                cache.ensure_spec(backbones.spec(config.sampling))
            cache.ensure_shard(config.shard)  # `cache merge` checks that it gets every shard of one run
        except AvepipeError:
            cache.discard_if_unused()  # a refused start leaves no cache, lock or staging folder behind
            raise
        report.warnings = backbones.warnings() if backbones is not None else []
        for text in report.warnings:
            emit("warning", {"message": text})
        for name in cache.quarantined:
            emit("warning", {"message": f"{name}: unreadable staged file set aside (not used)"})
        record_plan_failures(cache, paths, report)
        for vid, error in report.failed.items():  # found by the plan (a missing file...): said now, once
            emit("video", {"id": vid, "status": "failed", "error": error})
        resumed = _resumable(todo, partial, backbones.spec(config.sampling)) if backbones is not None else {}
        report.resumed_seconds = sum(len(v) for v in resumed.values())
        for text in partial.discarded:  # a damaged partial chunk (a kill mid-write): one warning, then resumed
            report.warnings.append(text)
            emit("warning", {"message": text})
        emit("start", {"total": report.total, "todo": len(todo), "skipped": len(report.skipped),
                       "previously_failed": len(report.previously_failed), "device": str(device),
                       "resumed_seconds": report.resumed_seconds})
        if todo:
            writer = CacheWriter(cache, partial)
            try:
                run = Run(todo, backbones, config, writer, report, emit, resumed)
                tasks = [VideoTask(vid, str(path), len(resumed.get(vid, ()))) for vid, path in todo.items()]
                messages, source = _messages(tasks, config)
                run.consume(messages, source)
            finally:
                writer.close()
    finally:
        cache.close()
    report.elapsed_s = time.perf_counter() - started
    return report


def _look_ahead(paths: list[Path], cache_path: str | os.PathLike,
                config: ExtractConfig) -> tuple[ExtractReport | None, bool]:
    """The run planned on the cache opened for reading (no lock, no writes): ``(report, False)`` when there is nothing
    to do (every video in the cache or failed earlier, nothing new to record); ``(None, True)`` when videos have to be
    extracted (a new cache: all of them); ``(None, False)`` when only a writer can finish the plan (a new failure to
    record, a staged file to set aside, another shard)."""
    path = Path(cache_path)
    if not path.exists() and not path.with_name(path.name + ".staging").is_dir():
        return None, True
    report = ExtractReport()
    with FeatureCache(path, "r") as reader:
        todo = plan(paths, reader, config, report)
        if todo:
            return None, True
        if report.failed or reader.quarantined or reader.shard != config.shard:
            return None, False
        if reader.leftovers() and writer_of(path) is None:  # a killed writer's temporaries: a writer removes them
            return None, False
    return report, False


def _resumable(todo: dict[str, Path], partial: PartialStore, spec: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for vid, path in todo.items():
        try:
            earlier = partial.load(vid, source_fields(path), spec)
        except OSError:
            earlier = None
        if earlier is not None:
            out[vid] = earlier
    return out


def _messages(tasks: list[VideoTask], config: ExtractConfig) -> tuple[Iterator[Message], DecodeSource | None]:
    if config.from_decoded:
        source = DecodedSource(config.from_decoded, tasks, config.sampling)
        return iter(source), None
    source = DecodeSource(tasks, config.decode_part())
    return iter(source), source
