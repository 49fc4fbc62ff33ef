"""The HDF5 feature store.

Layout of ``F.h5`` (documented in docs/cache.md)::

    /                 attrs: format="avepipe-cache", format_version, feature_spec (JSON)
    /videos/<id>/     attrs: source_path, source_size, source_mtime, duration, seconds, sampling, weights checksums, ...
        visual        float32 [T, 7, 7, 512]
        audio         float32 [T, 128]
    /failed/<id>      attrs: source_path, error, failed_at

Crash safety: ``F.h5`` is never modified in place. A writer stages every finished video as its own small HDF5 file in
``F.h5.staging/`` (written to a temporary name, fsynced, then renamed: a staged entry is complete or absent), and
*compaction* folds the staged entries into a fresh copy of the store that atomically replaces ``F.h5``. A process
killed at any moment (SIGKILL included) therefore leaves ``F.h5`` as the previous complete version plus complete staged
entries; readers see both, and the next writer compacts them. One writer at a time: ``F.h5.lock`` (flock), which
names its holder (host, pid, start time) so that a refused writer can say who holds it and whether that is stale.

A cache written by ``extract --shard K/N`` records ``shard = "K/N"`` in its root attributes; :func:`merge` checks that
the shard caches it is given are the N shards of one run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np

from avepipe.errors import CacheError, CacheLockedError, SpecMismatchError
from avepipe.faults import fault_point
from avepipe.inputs import shard_of

FORMAT = "avepipe-cache"
FORMAT_VERSION = 1
STAGED_SUFFIX = ".h5"
FAILED_SUFFIX = ".failed.json"


@dataclass
class Entry:
    video_id: str
    visual: np.ndarray  # [T, 7, 7, 512]
    audio: np.ndarray  # [T, 128]
    attrs: dict[str, Any]


def _attr(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value.item() if isinstance(value, np.generic) else value


def _storable(value: Any) -> Any:
    """HDF5 attributes take plain str / numbers / bools; numpy scalars of str kind would become fixed-width unicode."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {key: _attr(value) for key, value in obj.attrs.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


MAX_ID_BYTES = 200  # staged file names are <id>.failed.json: within the 255-byte limit of common file systems


def id_problem(video_id: str) -> str | None:
    """Why ``video_id`` cannot key an entry (None when it can): checked per video, so one bad name fails one video."""
    if not video_id or "/" in video_id or video_id in (".", "..") or video_id.startswith("."):
        return f"{video_id!r} cannot be a video id (empty, hidden or with a slash)"
    if len(video_id.encode()) > MAX_ID_BYTES:
        return f"the file name is too long to be a video id ({len(video_id.encode())} bytes, at most {MAX_ID_BYTES})"
    return None


def _write_error(where: Path, exc: OSError, needed: int = 0) -> CacheError:
    """A one-line CacheError for a failed write (permission, read-only file system, disk full)."""
    import errno

    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write {where} ({exc.strerror.lower()})")
    if exc.errno == errno.ENOSPC:
        extra = f"; compaction needs about {needed / 1e6:.0f} MB free" if needed else ""
        return CacheError(f"no space left on the device of {where}: finished videos stay staged{extra}")
    return CacheError(f"cannot write {where}: {exc.strerror or exc}")


SPACE_MARGIN = 1 << 20  # bytes kept free beyond what a write is known to need (HDF5's own metadata, the file system)
_hdf5_write_failed = False


def hdf5_write_failed() -> bool:
    """Whether an HDF5 write of this process failed (a full disk). The HDF5 library may then crash when it closes its
    files at interpreter exit (a segfault after the right message, seen with h5py 3 on a full disk); the command line
    then ends the process without that cleanup (:func:`avepipe.cli.main`), its files already closed or discarded."""
    return _hdf5_write_failed


def ensure_space(where: Path, needed: int) -> None:
    """Raise the disk-full :class:`CacheError` before an HDF5 file of about ``needed`` bytes is written under
    ``where``: HDF5 reports a full disk from deep inside a write and leaves its file unusable, so it is better never
    to let it get there."""
    try:
        stat = os.statvfs(where)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if free < needed + SPACE_MARGIN:
        raise CacheError(f"no space left on the device of {where}: {free / 1e6:.0f} MB free, about "
                         f"{(needed + SPACE_MARGIN) / 1e6:.0f} MB needed; finished videos stay staged (free some space "
                         f"and run the same command again)")


def hdf5_write_error(where: Path, exc: Exception, needed: int = 0) -> CacheError:
    """The one-line :class:`CacheError` for an HDF5 write that failed (h5py raises OSError or RuntimeError with the
    system's errno in its text)."""
    import errno

    global _hdf5_write_failed
    _hdf5_write_failed = True
    if isinstance(exc, OSError) and exc.errno is not None:
        return _write_error(where, exc, needed)
    text = str(exc)
    system = re.search(r"errno = (\d+), error message = '([^']*)'", text)  # HDF5's report of the failed write()
    if system:
        return _write_error(where, OSError(int(system.group(1)), system.group(2)), needed)
    if "No space left" in text:
        return _write_error(where, OSError(errno.ENOSPC, "No space left on device"), needed)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return CacheError(f"cannot write {where}: {first}")


def _check_id(video_id: str) -> None:
    problem = id_problem(video_id)
    if problem:
        raise CacheError(f"invalid video id: {problem}")


def _temp_name(staging: Path, kind: str) -> Path:
    """A temporary name that does not grow with the id (a long id must not overflow the file-name limit)."""
    return staging / f".{kind}.tmp{os.getpid()}.{time.monotonic_ns()}"


# -- the writer lock's record of its holder ---------------------------------------------------------------------------

def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22): with the pid, it tells
    the lock's holder from a later process that got the same pid."""
    text = _read_text(f"/proc/{pid}/stat")
    try:
        return int(text.rsplit(")", 1)[1].split()[19]) if text else None
    except (IndexError, ValueError):
        return None


def _this_process() -> dict[str, Any]:
    """What ``F.h5.lock`` records of its holder: ``host``, ``pid`` and ``started_at`` for people; the boot id, pid
    namespace and process start time (Linux) to tell whether the holder still runs when it is on this host."""
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        record["pid_ns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    boot_id, start = _read_text("/proc/sys/kernel/random/boot_id"), _process_start(os.getpid())
    if boot_id:
        record["boot_id"] = boot_id
    if start is not None:
        record["process_start"] = start
    return record


@dataclass
class LockHolder:
    """The process named in a lock file (any field may be missing: an empty file, or an older avepipe's bare pid)."""

    host: str | None = None
    pid: int | None = None
    started_at: str | None = None
    pid_ns: str | None = None
    boot_id: str | None = None
    process_start: int | None = None

    @classmethod
    def parse(cls, text: str) -> "LockHolder":
        text = text.strip()
        if text.isdigit():  # written by earlier avepipe versions: the pid alone
            return cls(pid=int(text))
        try:
            record = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(record, dict):
            return cls()
        fields = {name: record.get(name) for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in fields.items() if isinstance(v, int if k in ("pid", "process_start") else str)})

    def describe(self) -> str:
        if self.pid is None:
            return "a process that left no record in the lock file"
        host = f" on host {self.host}" if self.host else ""
        since = f" since {self.started_at}" if self.started_at else ""
        return f"pid {self.pid}{host}{since}"

    def running(self) -> bool | None:
        """Whether the holder still runs: checked only for a process of this host (and of this pid namespace: another
        container's pids mean nothing here); None when it cannot be told."""
        if self.pid is None or self.host != socket.gethostname():
            return None
        here = _this_process()
        if self.boot_id and here.get("boot_id") and self.boot_id != here["boot_id"]:
            return False  # this host has restarted since
        if self.pid_ns and here.get("pid_ns") and self.pid_ns != here["pid_ns"]:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists (another user's process)
        if self.process_start is not None:
            start = _process_start(self.pid)
            if start is not None and start != self.process_start:
                return False  # the pid now belongs to a later process
        return True


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(os.path.realpath(path))
    return path.with_name(path.name + ".lock")


def locked_message(path: Path, holder: LockHolder, hint: str) -> str:
    """One line: who holds the writer lock of ``path``, then ``hint`` (what to do while it runs), or what to do when
    that holder is gone."""
    lock = lock_path(path)
    running = holder.running()
    if running is False:
        return (f"{path}: locked by {holder.describe()} (this host), which is not running: a stale lock (on NFS a "
                f"lock can outlive its process); if no other process writes this cache, remove {lock} and run again")
    text = f"{path}: another avepipe process ({holder.describe()}) is writing this cache; {hint}"
    if running is None and holder.host:
        text += (f" (if {holder.host} is down, its lock can outlive it on NFS: remove {lock} once you are sure no "
                 f"process on any node writes this cache)")
    return text


def writer_of(path: str | os.PathLike) -> LockHolder | None:
    """The process holding the writer lock of ``path`` now (None: no writer). Takes a shared lock for an instant, so
    it works on a read-only lock file too."""
    try:
        handle = open(lock_path(path))
    except OSError:
        return None  # no lock file (never written, or removed): no writer
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockHolder.parse(handle.read())
        except OSError:
            return None  # a file system without locks: nothing to tell
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


def file_format(path: str | os.PathLike) -> str | None:
    """The root ``format`` attribute of the store at ``path`` (``avepipe-cache``, ``avepipe-decoded``); None when
    there is no such readable HDF5 file or it has none."""
    try:
        with h5py.File(os.path.realpath(path), "r") as f:
            return _attr(f.attrs.get("format"))
    except OSError:
        return None


class FeatureCache:
    """Read (``mode="r"``) or write (``mode="a"``) access to one cache file and its staged entries."""

    FORMAT = FORMAT  # the root ``format`` attribute; a subclass storing other arrays (avepipe.decoded) names its own

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        # A symlinked cache: lock, stage and replace the real file (a rename onto the link would replace the link).
        self.path = Path(os.path.realpath(path))
        self.mode = mode
        self.staging = self.path.with_name(self.path.name + ".staging")
        self._lock_handle = None
        self.quarantined: list[str] = []  # staged files set aside as unreadable (see _quarantine)
        self._created = not self.path.exists() and not self.staging.exists()
        self._staged_total: int | None = None  # bytes of committed staged files (writers: counted once, then kept)
        if mode == "a":
            self._acquire_lock()
            try:
                self.staging.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self.close()
                raise _write_error(self.staging, exc) from None
            for leftover in self.staging.glob(".*.tmp*"):
                leftover.unlink()  # a killed writer's half-written entry: never trusted
            for leftover in self.path.parent.glob(f".{self.path.name}.compact-*"):
                leftover.unlink()
        elif not self.path.exists() and not self.staging.is_dir():
            raise CacheError(f"{self.path}: no such cache")
        self._validate_main()

    def leftovers(self) -> list[Path]:
        """What a killed writer left beside the store (a compaction's temporary, the size of the whole store, or a
        staged entry's): never read, removed when a writer opens the store. Only meaningful when no writer holds the
        lock (a live writer's temporaries look the same): see :func:`writer_of`."""
        found = sorted(self.path.parent.glob(f".{self.path.name}.compact-*"))
        if self.staging.is_dir():
            found += sorted(self.staging.glob(".*.tmp*"))
        return found

    # -- locking -------------------------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        path = lock_path(self.path)
        for _ in range(10):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a+")
            except OSError as exc:
                raise _write_error(self.path.parent, exc) from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = LockHolder.parse(handle.read())
                handle.close()
                hint = "wait for it or use another --cache"
                raise CacheLockedError(locked_message(self.path, holder, hint)) from None
            # The lock file may have been removed (a stale lock cleared by hand, a writer discarding an unused cache)
            # between open and flock: the lock then sits on a file nobody else will open. Lock the current one.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(handle.fileno())
            if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
                break
            handle.close()
        else:
            raise CacheLockedError(f"{path}: keeps being removed or replaced while avepipe locks it")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_this_process()) + "\n")
        handle.flush()
        self._lock_handle = handle

    def discard_if_unused(self) -> None:
        """Writers that stop before writing anything (a usage error at start): remove what opening created, so a
        failed start leaves no ``F.h5``, ``F.h5.lock`` or ``F.h5.staging/`` behind."""
        if self._lock_handle is None or not self._created:
            return
        if self.path.exists() or any(self.staging.iterdir()):
            return
        self.staging.rmdir()
        self.path.with_name(self.path.name + ".lock").unlink(missing_ok=True)
        fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
        self._lock_handle.close()
        self._lock_handle = None

    def close(self) -> None:
        """Compact staged entries (writers) and release the lock. At a clean end nothing stays beside ``F.h5``: the
        staging folder, once empty, and the lock file (only meaningful while held; removed while still held, and a
        writer that opened it meanwhile locks a fresh one, see :meth:`_acquire_lock`) are removed. After a failed
        compaction both stay: the staged entries wait for the next writer."""
        if self._lock_handle is not None:
            clean = False
            try:
                self.compact()
                clean = True
            except OSError as exc:  # e.g. disk full: the staged entries stay, the next writer compacts them
                raise _write_error(self.path.parent, exc, self.staged_bytes()) from None
            finally:
                if clean:
                    self._remove_leftovers()
                fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
                self._lock_handle.close()
                self._lock_handle = None

    def _remove_leftovers(self) -> None:
        """The empty staging folder and the lock file of a writer that ends cleanly (never a file another process
        might need: a staging folder holding anything, a quarantined file say, stays)."""
        try:
            self.staging.rmdir()
        except OSError:
            pass  # not empty (a quarantined .corrupt file) or already gone
        lock_path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- spec ----------------------------------------------------------------------------------------------------
    def _validate_main(self) -> None:
        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as f:
                found = _attr(f.attrs.get("format"))
                if found != self.FORMAT:
                    what = f"a {found} file" if found else "no format attribute"
                    raise CacheError(f"{self.path}: not an {self.FORMAT} file ({what})")
        except OSError as exc:
            raise CacheError(f"{self.path}: cannot open as HDF5 ({exc})") from None

    def _file_attr(self, name: str) -> Any:
        """The raw file-level attribute ``name``; None when it or the cache file does not exist."""
        if not self.path.exists():
            return None
        with h5py.File(self.path, "r") as f:
            return f.attrs.get(name)

    @property
    def spec(self) -> dict[str, Any] | None:
        raw = self._file_attr("feature_spec")
        return json.loads(_attr(raw)) if raw is not None else None

    @property
    def shard(self) -> tuple[int, int] | None:
        """(K, N) of a cache written by ``extract --shard K/N``; None for any other cache."""
        raw = self._file_attr("shard")
        if raw is None:
            return None
        try:
            k, n = (int(x) for x in str(_attr(raw)).split("/"))
        except ValueError:
            raise CacheError(f"{self.path}: unreadable shard attribute {_attr(raw)!r} (expected K/N)") from None
        return k, n

    def ensure_shard(self, shard: tuple[int, int] | None) -> None:
        """Record that this cache holds shard ``(K, N)`` (``extract --shard K/N``), or refuse a run of another shard
        (or of no shard) on a cache that records one. An older cache without the record gets it when all its videos
        belong to that shard."""
        self._require_writer()
        recorded = self.shard
        if recorded == shard:
            return
        if recorded is not None:
            this_run = f"--shard {shard[0]}/{shard[1]}" if shard else "a run without --shard"
            raise CacheError(f"{self.path}: holds shard {recorded[0]}/{recorded[1]} (written with --shard "
                             f"{recorded[0]}/{recorded[1]}), not {this_run}; use another --cache")
        k, n = shard
        for video_id in sorted(set(self.ids()) | set(self.failures())):
            other = shard_of(video_id, n)
            if other != k:
                raise CacheError(f"{self.path}: holds videos of other shards than {k}/{n} (e.g. {video_id!r}, shard "
                                 f"{other}/{n}); use another --cache for --shard {k}/{n}")
        self._rewrite(spec=None, shard=shard)

    def ensure_spec(self, spec: dict[str, Any]) -> None:
        """Record ``spec`` in a new cache, or refuse when the existing cache was built with another one."""
        self._require_writer()
        existing = self.spec
        if existing is None:
            self._rewrite(spec=spec)
            return
        if existing != spec:
            raise SpecMismatchError(f"{self.path}: {describe_spec_difference(existing, spec)}; use another --cache")

    # -- reading -------------------------------------------------------------------------------------------------
    def _staged_ids(self) -> list[str]:
        if not self.staging.is_dir():
            return []
        return sorted(p.name[: -len(STAGED_SUFFIX)] for p in self.staging.glob(f"*{STAGED_SUFFIX}")
                      if not p.name.startswith(".") and not p.name.endswith(FAILED_SUFFIX))

    def _staged_failures(self) -> dict[str, dict[str, Any]]:
        if not self.staging.is_dir():
            return {}
        out = {}
        for p in sorted(self.staging.glob(f"*{FAILED_SUFFIX}")):
            if not p.name.startswith("."):
                try:
                    out[p.name[: -len(FAILED_SUFFIX)]] = json.loads(p.read_text())
                except (OSError, ValueError):
                    self._quarantine(p)
        return out

    def _quarantine(self, path: Path) -> None:
        """Set aside a staged file that cannot be read (``NAME.corrupt``): named in ``quarantined``, never trusted,
        never fatal to the rest of the cache."""
        target = path.with_name(path.name + ".corrupt")
        if self._lock_handle is not None:
            os.replace(path, target)
        self.quarantined.append(str(target if self._lock_handle is not None else path))

    def _main_ids(self) -> list[str]:
        if not self.path.exists():
            return []
        with h5py.File(self.path, "r") as f:
            return sorted(f["videos"].keys()) if "videos" in f else []

    def ids(self) -> list[str]:
        return sorted(set(self._main_ids()) | set(self._staged_ids()))

    def __contains__(self, video_id: str) -> bool:
        return (self.staging / f"{video_id}{STAGED_SUFFIX}").exists() or video_id in self._main_ids()

    def __len__(self) -> int:
        return len(self.ids())

    def attrs(self, video_id: str) -> dict[str, Any]:
        with self._open_entry(video_id) as group:
            return _attrs(group)

    def get(self, video_id: str) -> Entry:
        with self._open_entry(video_id) as group:
            return Entry(video_id, group["visual"][()], group["audio"][()], _attrs(group))

    def entries(self, ids: Iterable[str] | None = None) -> Iterator[Entry]:
        for video_id in ids if ids is not None else self.ids():
            yield self.get(video_id)

    def all_attrs(self) -> dict[str, dict[str, Any]]:
        """Attributes of every complete entry, reading the main file once."""
        out: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with h5py.File(self.path, "r") as f:
                for video_id, group in f.get("videos", {}).items():
                    out[video_id] = _attrs(group)
        for video_id in self._staged_ids():
            try:
                out[video_id] = self.attrs(video_id)
            except OSError:
                self._quarantine(self.staging / f"{video_id}{STAGED_SUFFIX}")
        return dict(sorted(out.items()))

    def failures(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with h5py.File(self.path, "r") as f:
                for video_id, group in f.get("failed", {}).items():
                    out[video_id] = _attrs(group)
        out.update(self._staged_failures())
        done = set(self.ids())
        return {k: v for k, v in sorted(out.items()) if k not in done}

    class _EntryContext:
        def __init__(self, file: h5py.File, group: h5py.Group):
            self.file, self.group = file, group

        def __enter__(self) -> h5py.Group:
            return self.group

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    def _open_entry(self, video_id: str) -> "FeatureCache._EntryContext":
        staged = self.staging / f"{video_id}{STAGED_SUFFIX}"
        if staged.exists():
            f = h5py.File(staged, "r")
            return self._EntryContext(f, f["/"])
        if self.path.exists():
            f = h5py.File(self.path, "r")
            if f"videos/{video_id}" in f:
                return self._EntryContext(f, f["videos"][video_id])
            f.close()
        raise KeyError(f"{self.path}: no video {video_id!r}")

    # -- writing -------------------------------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if self._lock_handle is None:
            raise CacheError(f"{self.path}: opened read-only")

    def put(self, video_id: str, visual: np.ndarray, audio: np.ndarray, attrs: dict[str, Any]) -> None:
        """Stage one complete video (atomic: after a crash it is either fully there or absent)."""
        self._require_writer()
        _check_id(video_id)
        final = self.staging / f"{video_id}{STAGED_SUFFIX}"
        tmp = _temp_name(self.staging, "entry")
        ensure_space(self.staging, visual.size * 4 + audio.size * 4)
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("visual", data=np.ascontiguousarray(visual, dtype=np.float32))
                f.create_dataset("audio", data=np.ascontiguousarray(audio, dtype=np.float32))
                for key, value in attrs.items():
                    f.attrs[key] = _storable(value)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise hdf5_write_error(self.staging, exc) from None
        fault_point("stage-entry")
        _replace_atomically(tmp, final)
        self._count_staged(final)
        failed = self.staging / f"{video_id}{FAILED_SUFFIX}"
        if failed.exists():
            failed.unlink()

    def stage_paths(self, video_id: str) -> tuple[Path, Path]:
        """(temporary, final) staging paths of one entry, for writers that fill an entry in several steps: write the
        temporary file (a group with the entry's datasets at its root), then :meth:`commit_staged`."""
        self._require_writer()
        _check_id(video_id)
        return _temp_name(self.staging, "entry"), self.staging / f"{video_id}{STAGED_SUFFIX}"

    def commit_staged(self, video_id: str, tmp: Path, final: Path) -> None:
        fault_point("stage-entry")
        _replace_atomically(tmp, final)
        self._count_staged(final)
        failed = self.staging / f"{video_id}{FAILED_SUFFIX}"
        if failed.exists():
            failed.unlink()

    def put_failure(self, video_id: str, source_path: str, error: str, transient: bool = False) -> None:
        """Record a failure. ``transient``: the cause was not the file (a killed decoder): the next run retries it.
        The source's size and mtime are kept so that a changed file is retried too."""
        self._require_writer()
        _check_id(video_id)
        failed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"source_path": source_path, "error": error, "failed_at": failed_at, "transient": bool(transient)}
        try:
            stat = os.stat(source_path)
            record.update(source_size=stat.st_size, source_mtime=stat.st_mtime)
        except OSError:
            pass
        tmp = _temp_name(self.staging, "failed")
        tmp.write_text(json.dumps(record))
        _replace_atomically(tmp, self.staging / f"{video_id}{FAILED_SUFFIX}")
        self._staged_total = None  # may replace an earlier record: recounted when next asked

    def staged_bytes(self) -> int:
        """Bytes of the committed staged files. A writer scans the folder once and then keeps count as it commits
        (a scan per put grows with the staging folder: 0.5 s at 100 k staged files)."""
        if self._lock_handle is not None and self._staged_total is not None:
            return self._staged_total
        total = self._scan_staged_bytes()
        if self._lock_handle is not None:
            self._staged_total = total
        return total

    def _scan_staged_bytes(self) -> int:
        if not self.staging.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.staging.glob("*") if not p.name.startswith("."))

    def _count_staged(self, path: Path) -> None:
        if self._staged_total is not None:
            try:
                self._staged_total += path.stat().st_size
            except OSError:
                self._staged_total = None  # recounted on the next staged_bytes()

    def maybe_compact(self, min_bytes: int | None = None) -> bool:
        """Compact when the staged entries outweigh the main file (amortised: every byte is rewritten O(1) times) and
        at least ``min_bytes`` (default 256 MiB, or ``$AVEPIPE_COMPACT_BYTES``: the tests lower it)."""
        if min_bytes is None:
            min_bytes = int(os.environ.get("AVEPIPE_COMPACT_BYTES", 256 << 20))
        staged = self.staged_bytes()
        main = self.path.stat().st_size if self.path.exists() else 0
        if staged >= max(min_bytes, main):
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Fold the staged entries into a fresh copy of the store, then atomically replace the store with it."""
        self._require_writer()
        folded = self._committed_staged_files()
        if not folded and self.path.exists():
            return
        self._rewrite(spec=None)
        fault_point("compact-cleared")
        self._clear_staging(folded)

    def _committed_staged_files(self) -> list[Path]:
        """The staged entries and failure records a compaction folds in: never a temporary (``.NAME.tmp*``: an entry
        still being written, e.g. a video ``avepipe decode`` is filling second by second), never a quarantined file."""
        if not self.staging.is_dir():
            return []
        return [p for p in self.staging.iterdir() if not p.name.startswith(".") and not p.name.endswith(".corrupt")]

    def _clear_staging(self, only: list[Path] | None = None) -> None:
        """Remove the folded staged files (``only``; every committed one when None). Temporaries of entries in
        flight stay, and so do quarantined files (for the user to inspect)."""
        for p in self._committed_staged_files() if only is None else only:
            p.unlink(missing_ok=True)
        self._staged_total = None

    def _rewrite(self, spec: dict[str, Any] | None, shard: tuple[int, int] | None = None) -> None:
        """Write the store anew with the staged entries folded in: ``spec`` and ``shard`` replace the recorded ones
        when given, else those are kept."""
        staged = set(self._staged_ids())
        failures = {**self._stored_failures(), **self._staged_failures()}
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}")
        needed = self.staged_bytes() + (self.path.stat().st_size if self.path.exists() else 0)
        ensure_space(self.path.parent, needed)
        try:
            self._write_compacted(tmp, staged, failures, spec, shard)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise hdf5_write_error(self.path.parent, exc, needed) from None
        fault_point("compact")
        _replace_atomically(tmp, self.path)

    def _write_compacted(self, tmp: Path, staged: set[str], failures: dict[str, dict[str, Any]],
                         spec: dict[str, Any] | None, shard: tuple[int, int] | None) -> None:
        old = h5py.File(self.path, "r") if self.path.exists() else None
        try:
            with h5py.File(tmp, "w") as out:
                out.attrs["format"] = self.FORMAT
                out.attrs["format_version"] = FORMAT_VERSION
                if spec is not None:
                    out.attrs["feature_spec"] = json.dumps(spec, sort_keys=True)
                elif old is not None and "feature_spec" in old.attrs:
                    out.attrs["feature_spec"] = old.attrs["feature_spec"]
                if shard is not None:
                    out.attrs["shard"] = f"{shard[0]}/{shard[1]}"
                elif old is not None and "shard" in old.attrs:
                    out.attrs["shard"] = old.attrs["shard"]
                videos = out.create_group("videos")
                old_ids = set(old["videos"].keys()) if old is not None and "videos" in old else set()
                for video_id in sorted(old_ids | staged):
                    if video_id in staged:
                        try:
                            with h5py.File(self.staging / f"{video_id}{STAGED_SUFFIX}", "r") as src:
                                src.copy(src["/"], videos, name=video_id)
                        except OSError:
                            if video_id in videos:
                                del videos[video_id]
                            self._quarantine(self.staging / f"{video_id}{STAGED_SUFFIX}")
                    else:
                        old.copy(old["videos"][video_id], videos, name=video_id)
                failed = out.create_group("failed")
                done = old_ids | staged
                for video_id, record in sorted(failures.items()):
                    if video_id not in done:
                        group = failed.create_group(video_id)
                        for key, value in record.items():
                            group.attrs[key] = _storable(value)
        finally:
            if old is not None:
                old.close()

    def _stored_failures(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        with h5py.File(self.path, "r") as f:
            return {k: _attrs(g) for k, g in f.get("failed", {}).items()}

    def forget_failure(self, video_id: str) -> None:
        """Drop a staged failure record (a retried video that fails again records a new one)."""
        self._require_writer()
        failed = self.staging / f"{video_id}{FAILED_SUFFIX}"
        if failed.exists():
            failed.unlink()


def describe_spec_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    parts = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys]
    return "feature spec differs (" + "; ".join(parts) + ")"


def check_shards(readers: list[FeatureCache], allow_unsharded: bool = False) -> None:
    """Shard caches (``extract --shard K/N``) are merged as the complete set of one run: one N, each K from 0 to N-1
    exactly once. Caches without a shard record merge as they are; mixed with shard caches only when
    ``allow_unsharded``."""
    seen: dict[Path, FeatureCache] = {}
    for reader in readers:
        if reader.path in seen:
            raise CacheError(f"{reader.path}: given twice")
        seen[reader.path] = reader
    sharded = [(reader, reader.shard) for reader in readers]
    sharded = [(reader, shard) for reader, shard in sharded if shard is not None]
    if not sharded:
        return
    first, (_, n) = sharded[0]
    unsharded = [reader for reader in readers if all(reader is not r for r, _ in sharded)]
    if unsharded and not allow_unsharded:
        raise CacheError(f"{unsharded[0].path}: not a shard cache, but {first.path} is (shard {sharded[0][1][0]}/{n}): "
                         "merging them mixes runs; pass --allow-unsharded if you mean it")
    by_k: dict[int, FeatureCache] = {}
    for reader, (k, other_n) in sharded:
        if other_n != n:
            raise CacheError(f"{reader.path}: shard {k}/{other_n} of another run than {first.path} (shard "
                             f"{sharded[0][1][0]}/{n}): give the {n} shards of one run")
        if k in by_k:
            raise CacheError(f"{reader.path}: shard {k}/{n} again ({by_k[k].path} is shard {k}/{n} too): two runs of "
                             "one shard; give each shard once")
        by_k[k] = reader
    missing = [k for k in range(n) if k not in by_k]
    if missing:
        names = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        plural = "s" if len(missing) > 1 else ""
        raise CacheError(f"shard{plural} {names} of {n} missing: {len(by_k)} of the {n} shard caches of that run given "
                         f"(e.g. {first.path}); each `extract --shard K/{n}` writes one")


def merge(inputs: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False,
          allow_unsharded: bool = False) -> int:
    """Join caches built with the same spec into ``out``; returns the number of videos. Refuses mixed specs, caches
    still being written, and shard caches that are not the complete set of one run (:func:`check_shards`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CacheError(f"{out}: already exists (pass --overwrite to replace it)")
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise CacheError(f"{out}: the output cannot also be an input")
    readers = [FeatureCache(p, "r") for p in inputs]
    for reader in readers:
        holder = writer_of(reader.path)
        if holder is not None:
            raise CacheLockedError(locked_message(reader.path, holder, "merge once it has finished"))
    check_shards(readers, allow_unsharded)
    spec = None
    for reader in readers:
        if reader.spec is None:
            continue
        if spec is None:
            spec, spec_from = reader.spec, reader.path
        elif reader.spec != spec:
            raise SpecMismatchError(f"{reader.path} vs {spec_from}: {describe_spec_difference(spec, reader.spec)}")
    owner: dict[str, FeatureCache] = {}
    for reader in readers:
        for video_id in reader.ids():
            if video_id in owner:
                first, second = owner[video_id].get(video_id), reader.get(video_id)
                same = np.array_equal(first.visual, second.visual) and np.array_equal(first.audio, second.audio)
                if not same:
                    raise CacheError(
                        f"video id {video_id!r} is in both {owner[video_id].path} and {reader.path} "
                        "with different features"
                    )
                continue
            owner[video_id] = reader
    # Written under a hidden name beside ``out`` and renamed onto it when complete: a merge killed at any moment
    # leaves no ``out`` that looks like a complete cache (a rerun starts the hidden one afresh).
    building = out.with_name(f".{out.name}.merging")
    writer = FeatureCache(building, "a")  # its lock: one merge into ``out`` at a time
    try:
        building.unlink(missing_ok=True)  # what a killed merge left: start from nothing
        writer._clear_staging()
        if spec is not None:
            writer.ensure_spec(spec)
        for video_id, reader in sorted(owner.items()):
            entry = reader.get(video_id)
            writer.put(video_id, entry.visual, entry.audio, entry.attrs)
            fault_point("merge-put")
        for reader in readers:
            for video_id, record in reader.failures().items():
                if video_id not in owner:
                    writer.put_failure(video_id, record.get("source_path", ""), record.get("error", ""))
    finally:
        writer.close()  # compacts into ``building``
    fault_point("merge-rename")
    target = FeatureCache(out, "a") if out.exists() else None  # --overwrite: hold its lock, drop its staging
    try:
        if target is not None:
            target._clear_staging()
        _replace_atomically(building, out)
    finally:
        if target is not None:
            target.close()
    lock_path(building).unlink(missing_ok=True)
    if writer.staging.is_dir() and not any(writer.staging.iterdir()):
        writer.staging.rmdir()
    return len(owner)
