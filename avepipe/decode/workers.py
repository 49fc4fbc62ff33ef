"""Many videos decoded by worker processes in a bounded pipeline (:class:`DecodeSource`): each process runs
:func:`avepipe.decode.video.decode_video` on the tasks it takes and waits for a free slot of a shared-memory ring
(:class:`FrameRing`, sized to what /dev/shm holds) before it decodes the next second, so a :class:`Second`'s frames
travel between processes in a ring slot, never pickled, and decoding never runs more than a few seconds ahead. Also the
process plumbing shared with the multi-device runner: starting spawned children from any caller, and a watchdog that
ends a child whose parent is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from avepipe.decode.video import (
    FRAME_SHAPE,
    SECOND_BYTES,
    Failed,
    Finished,
    Message,
    Second,
    VideoTask,
    decode_video,
)
from avepipe.settings import DecodeConfig, default_workers

_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SHM_RESERVE = 16 << 20  # bytes of /dev/shm left to other users when the ring is sized
RING_SLOTS = 6  # seconds in flight per decode process (bounded host memory: 6 x 2.4 MB)


class FrameRing:
    """Shared-memory slots, one second of frames each, for every decode process (created by the consumer)."""

    def __init__(self, workers: int, slots: int = RING_SLOTS, name: str | None = None):
        self.workers, self.slots = workers, slots
        size = max(1, workers * slots * SECOND_BYTES)
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=size)
        self.owner = name is None
        self.array = np.ndarray((workers, slots, *FRAME_SHAPE), np.uint8, buffer=self.shm.buf)

    def view(self, worker: int, slot: int) -> np.ndarray:
        return self.array[worker, slot]

    def close(self) -> None:
        del self.array
        self.shm.close()
        if self.owner:
            self.shm.unlink()


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Bytes free in the shared-memory file system, or None where there is none to ask (not Linux)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def ring_slots(workers: int, free: int | None, wanted: int = RING_SLOTS) -> int:
    """Seconds in flight per decode process that fit in ``free`` bytes of shared memory (at most ``wanted``, 0 if not
    even one fits). A ring larger than /dev/shm is created without complaint and then kills its writers with SIGBUS
    (Docker's default /dev/shm is 64 MiB; 7 processes x 6 slots need 101 MB), so fewer slots are used instead: a little
    less overlap, the same frames. SHM_RESERVE bytes are left to others."""
    if free is None:
        return wanted
    return max(0, min(wanted, (free - SHM_RESERVE) // max(1, workers * SECOND_BYTES)))


def exit_with_parent(parent: int) -> None:
    """Watchdog thread body: end this process at once when its parent is gone (kill -9 runs no cleanup, and a child
    blocked on a queue nobody reads would otherwise live forever)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def start_processes(procs: list, environ: dict[str, str] | None = None) -> None:  # mp.Process objects
    """Start spawned processes whose targets live in avepipe modules, from any caller.

    ``spawn`` normally re-runs the caller's main script in every child; a plain script without an
    ``if __name__ == "__main__":`` guard, or code piped to ``python -``, then fails (or recurses) in each child. The
    children need nothing from the main script, so it is hidden from them while they start. ``environ``: variables set
    for the children only."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    saved = {key: os.environ.get(key) for key in environ or {}}
    try:
        if file is not None:
            del main.__file__
        if spec is not None:
            main.__spec__ = None
        os.environ.update(environ or {})
        for proc in procs:
            proc.start()
    finally:
        if file is not None:
            main.__file__ = file
        if spec is not None:
            main.__spec__ = spec
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _decode_worker(worker: int, ring_name: str, slots: int, workers: int, tasks: mp.Queue, results: mp.Queue,
                   free: mp.Queue, config: DecodeConfig, threads: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    ring = FrameRing(workers, slots, name=ring_name)

    def acquire() -> tuple[int, np.ndarray]:
        slot = free.get()
        return slot, ring.view(worker, slot)

    while True:
        task = tasks.get()
        if task is None:
            return
        for message in decode_video(task, config, acquire, threads):
            if isinstance(message, Second):
                message.worker = worker
            results.put(message)


@dataclass
class DecodeSource:
    """The messages of many videos, decoded by ``workers`` processes (or in this process when 0), in a bounded
    pipeline: a process waits for a free ring slot, so decoding never runs more than a few seconds ahead."""

    tasks: list[VideoTask]
    config: DecodeConfig
    workers: int = -1
    _ring: FrameRing | None = field(default=None, init=False)
    _free: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        wanted = self.config.workers if self.workers < 0 else self.workers
        wanted = default_workers() if wanted < 0 else wanted
        self.workers = min(wanted, len(self.tasks))
        cores = os.cpu_count() or 1
        self.threads = self.config.decoder_threads or max(1, cores // max(1, self.workers))

    def frames(self, message: Second) -> np.ndarray:
        """The frames of a :class:`Second` (a view into the ring: call :meth:`release` when copied)."""
        return message.frames if message.frames is not None else self._ring.view(message.worker, message.slot)

    def release(self, message: Second) -> None:
        if message.frames is None:
            self._free[message.worker].put(message.slot)

    def __iter__(self) -> Iterator[Message]:
        if self.workers == 0:
            for task in self.tasks:
                yield from decode_video(task, self.config, threads=self.threads)
            return
        yield from self._from_processes()

    def _from_processes(self) -> Iterator[Message]:
        slots = ring_slots(self.workers, shared_memory_free())
        if slots == 0:  # not even one second per process fits in /dev/shm: decode here, without the ring
            self.workers = 0
            yield from self
            return
        ctx = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
        tasks: mp.Queue = ctx.Queue()
        results: mp.Queue = ctx.Queue()
        self._ring = FrameRing(self.workers, slots)
        self._free = [ctx.Queue() for _ in range(self.workers)]
        for free in self._free:
            for slot in range(self._ring.slots):
                free.put(slot)
        for task in self.tasks:
            tasks.put(task)
        procs = [ctx.Process(target=_decode_worker, daemon=True,
                             args=(w, self._ring.shm.name, self._ring.slots, self.workers, tasks, results,
                                   self._free[w], self.config, self.threads))
                 for w in range(self.workers)]
        for _ in procs:
            tasks.put(None)
        # One BLAS thread per decode process (the log-mel and resampling products): N processes on N cores would
        # otherwise start N*N threads. Spawned children read these when numpy loads; this process is unaffected.
        remaining = {task.vid: task.path for task in self.tasks}
        try:
            start_processes(procs, {k: "1" for k in _BLAS_THREADS})
            while remaining:
                try:
                    message = results.get(timeout=5.0)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        for vid in sorted(remaining):
                            yield Failed(vid, f"{remaining[vid]}: decoder process died", transient=True)
                        return
                    continue
                if isinstance(message, (Finished, Failed)):
                    remaining.pop(message.vid, None)
                yield message
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                if proc.pid is not None:
                    proc.join(timeout=5)
            self._ring.close()
