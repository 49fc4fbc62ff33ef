"""The HDF5 feature store.

Layout of ``F.h5``, format_version 2 (documented in docs/cache.md)::

    /                 attrs: format="avepipe-cache", format_version, feature_spec (JSON)
    /videos/<id>/     attrs: source_path, source_size, source_mtime, duration, seconds, sampling, weights checksums, ...
        visual        float32 [T, 7, 7, 512]
        audio         float32 [T, 128]
    /failed/<id>      attrs: source_path, error, failed_at
    /index/           written at compaction, from the same entries:
        ids           str [N]   the video ids, sorted          attrs  str [N]  each entry's attributes (JSON)
        failed_ids    str [M]   the recorded failures, sorted   failed_attrs  str [M]  each record (JSON)

Every file the store writes (the compacted store, staged entries) is created with HDF5 library version bounds
:data:`LIBVER` (1.10 file format): new-style groups, whose links are found through a B-tree of names instead of one
heap read whole on every open. Listing, membership, the skip plan and ``cache ls`` read the two index datasets, not N
groups; a reader keeps the store open across reads and reopens it when a writer has replaced it. A format_version 1
file (no index, old-style groups) is still read (its groups are visited) and becomes format_version 2 at the next
compaction of any writer, or with :func:`upgrade` (``avepipe cache upgrade``).

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

import bisect
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
FORMAT_VERSION = 2
LIBVER = ("v110", "v110")  # the HDF5 1.10 file format: new-style groups, readable by HDF5 >= 1.10 (h5py >= 2.10)
STAGED_SUFFIX = ".h5"
INDEX_BLOCK = 128  # one lookup reads every 128th id of the index (once per file), then one block of 128 ids
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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot record {type(value).__name__} in the index")


def _attrs_json(attrs: dict[str, Any]) -> str:
    """One entry's attributes as the index stores them (JSON; floats round-trip exactly)."""
    return json.dumps(attrs, default=_json_default)


def new_file(path: str | os.PathLike) -> h5py.File:
    """A new HDF5 file for the store to write (a staged entry, a compacted store): the :data:`LIBVER` file format."""
    return h5py.File(path, "w", libver=LIBVER)


def _new_style(file: h5py.File) -> bool:
    """Whether ``file`` was written with the 1.8+ file format (superblock version >= 2: its groups are new-style)."""
    return file.id.get_create_plist().get_version()[0] >= 2


def _copy_entry(source: h5py.Group, videos: h5py.Group, video_id: str) -> None:
    """Copy one entry (its datasets and attributes) into ``videos/<video_id>``: one HDF5 object copy when the source
    group is new-style; a group of an older file is created anew (new-style) and its datasets copied into it."""
    if _new_style(source.file):
        source.file.copy(source, videos, name=video_id)
        return
    group = videos.create_group(video_id)
    for name in source:
        source.file.copy(source[name], group, name=name)
    for key, value in source.attrs.items():
        group.attrs[key] = value


def _write_strings(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, shape=(len(values),), dtype=h5py.string_dtype("utf-8"),
                         data=np.array(values, dtype=object) if values else None)


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
        self._h5: h5py.File | None = None  # the store, kept open across reads (see _main)
        self._h5_key: tuple[int, int] | None = None  # (device, inode) of the open file
        self._memo: dict[str, Any] = {}  # what was read of the open file's index (the file never changes in place)
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
        compaction both stay: the staged entries wait for the next writer. Readers: closes the store's file."""
        if self._lock_handle is None:
            self._close_main()
        else:
            clean = False
            try:
                self.compact()
                clean = True
            except OSError as exc:  # e.g. disk full: the staged entries stay, the next writer compacts them
                raise _write_error(self.path.parent, exc, self.staged_bytes()) from None
            finally:
                self._close_main()
                if clean:
                    self._remove_leftovers()
                fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
                self._lock_handle.close()
                self._lock_handle = None

    def release(self) -> None:
        """End a writer without compacting (one that holds the lock only, e.g. :func:`merge` for its output): its
        empty staging folder and lock file are removed, the lock released."""
        self._close_main()
        if self._lock_handle is not None:
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

    # -- the open store file --------------------------------------------------------------------------------------
    def _main(self) -> h5py.File | None:
        """The store file, opened on first use and kept open across reads; reopened when a writer has replaced it
        (compaction renames a new file over it: another inode). None when there is no store file (yet)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._close_main()
            return None
        if self._h5 is not None and self._h5_key == (stat.st_dev, stat.st_ino):
            return self._h5
        self._close_main()
        f = h5py.File(self.path, "r")
        opened = os.fstat(f.id.get_vfd_handle())  # the file actually opened (it may have been replaced since stat)
        self._h5, self._h5_key = f, (opened.st_dev, opened.st_ino)
        return f

    def _close_main(self) -> None:
        if self._h5 is not None:
            try:
                self._h5.close()
            except (OSError, RuntimeError):
                pass
        self._h5, self._h5_key, self._memo = None, None, {}

    def _memoized(self, key: str, compute: Any) -> Any:
        """A value read from the open store file, read once per file (a store file never changes in place)."""
        f = self._main()
        if f is None:
            return compute(None)
        if key not in self._memo:
            self._memo[key] = compute(f)
        return self._memo[key]

    @property
    def format_version(self) -> int | None:
        """The store file's ``format_version`` (None: no store file yet)."""
        raw = self._file_attr("format_version")
        return int(_attr(raw)) if raw is not None else None

    # -- spec ----------------------------------------------------------------------------------------------------
    def _validate_main(self) -> None:
        if not self.path.exists():
            return
        try:
            f = self._main()
        except OSError as exc:
            raise CacheError(f"{self.path}: cannot open as HDF5 ({exc})") from None
        if f is None:
            return
        found = _attr(f.attrs.get("format"))
        if found != self.FORMAT:
            what = f"a {found} file" if found else "no format attribute"
            self._close_main()
            raise CacheError(f"{self.path}: not an {self.FORMAT} file ({what})")
        version = _attr(f.attrs.get("format_version"))
        if isinstance(version, int) and version > FORMAT_VERSION:
            self._close_main()
            raise CacheError(f"{self.path}: format_version {version}, written by a newer avepipe (this one reads up "
                             f"to {FORMAT_VERSION}); upgrade avepipe")

    def _file_attr(self, name: str) -> Any:
        """The raw file-level attribute ``name``; None when it or the cache file does not exist."""
        f = self._main()
        return f.attrs.get(name) if f is not None else None

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

    # The store file's entries and failures: from its index (format_version 2: two datasets each), else (a
    # format_version 1 file) by visiting its groups. Attributes stay JSON text until asked for.
    def _main_ids(self) -> list[str]:
        def read(f: h5py.File | None) -> list[str]:
            if f is None:
                return []
            if "index" in f:
                return f["index/ids"].asstr()[()].tolist()
            return sorted(f["videos"].keys()) if "videos" in f else []
        return self._memoized("ids", read)

    def _main_attrs_json(self) -> dict[str, str]:
        """id -> the entry's attributes as JSON text, for every entry of the store file."""
        def read(f: h5py.File | None) -> dict[str, str]:
            if f is None:
                return {}
            if "index" in f:
                return dict(zip(self._main_ids(), f["index/attrs"].asstr()[()].tolist()))
            return {vid: _attrs_json(_attrs(group)) for vid, group in sorted(f.get("videos", {}).items())}
        return self._memoized("attrs", read)

    def _stored_failures(self) -> dict[str, dict[str, Any]]:
        def read(f: h5py.File | None) -> dict[str, str]:
            if f is None:
                return {}
            if "index" in f:
                return dict(zip(f["index/failed_ids"].asstr()[()].tolist(),
                                f["index/failed_attrs"].asstr()[()].tolist()))
            return {vid: _attrs_json(_attrs(group)) for vid, group in sorted(f.get("failed", {}).items())}
        return {vid: json.loads(text) for vid, text in self._memoized("failed", read).items()}

    def ids(self) -> list[str]:
        staged = self._staged_ids()
        main = self._main_ids()
        return sorted(set(main) | set(staged)) if staged else list(main)

    def __contains__(self, video_id: str) -> bool:
        if (self.staging / f"{video_id}{STAGED_SUFFIX}").exists():
            return True
        f = self._main()
        if f is None or not video_id or "/" in video_id:
            return False
        return f"videos/{video_id}" in f  # one lookup in the group's B-tree of names

    def __len__(self) -> int:
        return len(self.ids())

    def attrs(self, video_id: str) -> dict[str, Any]:
        with self._open_entry(video_id) as group:
            return self._entry_attrs(group, video_id)

    def get(self, video_id: str) -> Entry:
        with self._open_entry(video_id) as group:
            return Entry(video_id, group["visual"][()], group["audio"][()], self._entry_attrs(group, video_id))

    def entries(self, ids: Iterable[str] | None = None) -> Iterator[Entry]:
        if ids is None:
            ids = self.ids()
            self._main_attrs_json()  # every entry's attributes from the index at once
        for video_id in ids:
            yield self.get(video_id)

    def _entry_attrs(self, group: h5py.Group, video_id: str) -> dict[str, Any]:
        """An entry's attributes: a store-file entry's from the index (one JSON string: reading 27 HDF5 attributes
        costs ~6 ms through h5py), a staged entry's (or a format_version 1 file's) from its group."""
        if self._h5 is not None and group.file.id == self._h5.id and "index" in self._h5:
            text = self._index_attrs_json(video_id)
            if text is not None:
                return json.loads(text)
        return _attrs(group)

    def _index_attrs_json(self, video_id: str) -> str | None:
        """The index's JSON attributes of ``video_id`` (None: not in the index): from the whole index when it has been
        read, else from two reads of the sorted ``ids`` dataset (a sample of it, kept per file, then one block)."""
        memo = self._memo.get("attrs")
        if memo is not None:
            return memo.get(video_id)
        if "datasets" not in self._memo:
            self._memo["datasets"] = (self._h5["index/ids"], self._h5["index/attrs"])
        names, texts = self._memo["datasets"]
        ids = self._memo.get("ids")
        if ids is not None:
            pos = bisect.bisect_left(ids, video_id)
            found = pos < len(ids) and ids[pos] == video_id
        else:
            # Two reads whatever N: every INDEX_BLOCK-th id (kept per file), then the block that can hold the id.
            key = video_id.encode()  # UTF-8 bytes sort as the strings do
            if "sample" not in self._memo:
                self._memo["sample"] = names[::INDEX_BLOCK].tolist() if names.shape[0] else []
            block = bisect.bisect_right(self._memo["sample"], key) - 1
            if block < 0:
                return None
            start = block * INDEX_BLOCK
            chunk = names[start:start + INDEX_BLOCK].tolist()
            i = bisect.bisect_left(chunk, key)
            found, pos = i < len(chunk) and chunk[i] == key, start + i
        return texts[pos].decode() if found else None

    def all_attrs(self) -> dict[str, dict[str, Any]]:
        """Attributes of every complete entry (the store file's from its index)."""
        out: dict[str, dict[str, Any]] = {vid: json.loads(text) for vid, text in self._main_attrs_json().items()}
        for video_id in self._staged_ids():
            try:
                out[video_id] = self.attrs(video_id)
            except OSError:
                self._quarantine(self.staging / f"{video_id}{STAGED_SUFFIX}")
        return dict(sorted(out.items()))

    def failures(self) -> dict[str, dict[str, Any]]:
        out = self._stored_failures()
        out.update(self._staged_failures())
        done = set(self.ids())
        return {k: v for k, v in sorted(out.items()) if k not in done}

    def summary(self, entries: dict[str, dict[str, Any]] | None = None,
                failures: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """What ``cache ls`` says of a large store: counts, seconds of video, bytes on disk (store file + staged
        entries), the spec, and how many entries were made with the official weights files."""
        entries = self.all_attrs() if entries is None else entries
        failures = self.failures() if failures is None else failures
        size = (self.path.stat().st_size if self.path.exists() else 0) + self._scan_staged_bytes()
        out: dict[str, Any] = {
            "path": str(self.path), "format": self.FORMAT, "format_version": self.format_version,
            "entries": len(entries), "failures": len(failures),
            "seconds_of_video": sum(int(a.get("seconds", 0) or 0) for a in entries.values()),
            "size_bytes": size, "staged_entries": len(self._staged_ids()), "spec": self.spec}
        if self.FORMAT == FORMAT:
            out["weights"] = {name: {"official": sum(1 for a in entries.values() if a.get(f"{name}_official")),
                                     "unofficial": sum(1 for a in entries.values() if not a.get(f"{name}_official"))}
                              for name in ("vgg19", "vggish")}
        return out

    class _EntryContext:
        """One entry's group; closes its file at the end when that is a staged file (the store stays open)."""

        def __init__(self, file: h5py.File | None, group: h5py.Group):
            self.file, self.group = file, group

        def __enter__(self) -> h5py.Group:
            return self.group

        def __exit__(self, *exc: object) -> None:
            if self.file is not None:
                self.file.close()

    def _open_entry(self, video_id: str) -> "FeatureCache._EntryContext":
        staged = self.staging / f"{video_id}{STAGED_SUFFIX}"
        if staged.exists():
            f = h5py.File(staged, "r")
            return self._EntryContext(f, f["/"])
        f = self._main()
        if f is not None and video_id and "/" not in video_id and f"videos/{video_id}" in f:
            return self._EntryContext(None, f["videos"][video_id])
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
            with new_file(tmp) as f:
                f.create_dataset("visual", data=np.ascontiguousarray(visual, dtype=np.float32))
                f.create_dataset("audio", data=np.ascontiguousarray(audio, dtype=np.float32))
                for key, value in attrs.items():
                    f.attrs[key] = _storable(value)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise hdf5_write_error(self.staging, exc) from None
        self.commit_staged(video_id, tmp, final)

    def stage_paths(self, video_id: str) -> tuple[Path, Path]:
        """(temporary, final) staging paths of one entry, for writers that fill an entry in several steps: write the
        temporary file (a group with the entry's datasets at its root), then :meth:`commit_staged`."""
        self._require_writer()
        _check_id(video_id)
        return _temp_name(self.staging, "entry"), self.staging / f"{video_id}{STAGED_SUFFIX}"

    def commit_staged(self, video_id: str, tmp: Path, final: Path) -> None:
        """Rename a complete temporary entry into place (the one step that makes it visible), keep the staged byte
        count, and drop a failure recorded for the id earlier."""
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

    def _rewrite(self, spec: dict[str, Any] | None, shard: tuple[int, int] | None = None,
                 point: str = "compact") -> None:
        """Write the store anew (format_version 2) with the staged entries folded in: ``spec`` and ``shard`` replace
        the recorded ones when given, else those are kept. ``point``: the fault point just before the rename."""
        staged = self._staged_ids()
        failures = {**self._stored_failures(), **self._staged_failures()}
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}")
        needed = self.staged_bytes() + (self.path.stat().st_size if self.path.exists() else 0)
        ensure_space(self.path.parent, needed)
        old = self._main()
        root: dict[str, Any] = {"format": self.FORMAT, "format_version": FORMAT_VERSION}
        if spec is not None:
            root["feature_spec"] = json.dumps(spec, sort_keys=True)
        elif old is not None and "feature_spec" in old.attrs:
            root["feature_spec"] = old.attrs["feature_spec"]
        if shard is not None:
            root["shard"] = f"{shard[0]}/{shard[1]}"
        elif old is not None and "shard" in old.attrs:
            root["shard"] = old.attrs["shard"]
        ids = sorted(set(self._main_ids()) | set(staged))
        try:
            write_store(tmp, root, [(video_id, self) for video_id in ids], failures)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise hdf5_write_error(self.path.parent, exc, needed) from None
        fault_point(point)
        _replace_atomically(tmp, self.path)

    def _copy_into(self, video_id: str, videos: h5py.Group) -> str | None:
        """Copy entry ``video_id`` (staged, else the store file's) into ``videos``; its attributes as JSON text for
        the index. None when there is no such entry (a staged file that cannot be opened is quarantined: the store
        file's entry of that id, if any, is copied instead)."""
        staged = self.staging / f"{video_id}{STAGED_SUFFIX}"
        if staged.exists():
            try:
                src = h5py.File(staged, "r")
            except OSError:
                self._quarantine(staged)
            else:
                with src:
                    _copy_entry(src["/"], videos, video_id)
                    return _attrs_json(_attrs(src["/"]))
        text = self._main_attrs_json().get(video_id)
        if text is None:
            return None
        _copy_entry(self._main()["videos"][video_id], videos, video_id)
        return text

    def upgrade(self) -> int | None:
        """Rewrite the store in the current format (staged entries folded in); returns the format_version it had
        (None: no store file). A store already in the current format is left as it is."""
        self._require_writer()
        before = self.format_version
        if before is None or before >= FORMAT_VERSION:
            return before
        folded = self._committed_staged_files()
        self._rewrite(spec=None, point="upgrade")
        self._clear_staging(folded)
        return before

    def forget_failure(self, video_id: str) -> None:
        """Drop a staged failure record (a retried video that fails again records a new one)."""
        self._require_writer()
        failed = self.staging / f"{video_id}{FAILED_SUFFIX}"
        if failed.exists():
            failed.unlink()


def write_store(tmp: Path, root: dict[str, Any], entries: Iterable[tuple[str, FeatureCache]],
                failures: dict[str, dict[str, Any]], point_each: str | None = None) -> None:
    """Write a complete format_version 2 store at ``tmp``: root attributes ``root``, each ``(id, reader)`` entry
    copied from its reader (group, arrays and attributes in one HDF5 copy), the failures of ids without an entry, and
    the index. The caller fsyncs and renames it into place."""
    with new_file(tmp) as out:
        for key, value in root.items():
            out.attrs[key] = value
        videos = out.create_group("videos")
        ids, texts = [], []
        for video_id, reader in entries:
            text = reader._copy_into(video_id, videos)
            if text is None:
                continue
            ids.append(video_id)
            texts.append(text)
            if point_each:
                fault_point(point_each)
        failed = out.create_group("failed")
        done = set(ids)
        failed_ids, failed_texts = [], []
        for video_id, record in sorted(failures.items()):
            if video_id in done:
                continue
            group = failed.create_group(video_id)
            for key, value in record.items():
                group.attrs[key] = _storable(value)
            failed_ids.append(video_id)
            failed_texts.append(_attrs_json(record))
        fault_point("write-index")
        index = out.create_group("index")
        _write_strings(index, "ids", ids)
        _write_strings(index, "attrs", texts)
        _write_strings(index, "failed_ids", failed_ids)
        _write_strings(index, "failed_attrs", failed_texts)


def upgrade(path: str | os.PathLike, kinds: Iterable[type[FeatureCache]] = ()) -> tuple[int, int, int]:
    """``avepipe cache upgrade``: rewrite a feature cache, or a store of one of ``kinds`` (subclasses with their own
    ``FORMAT``, e.g. avepipe.decoded's: passed in, as this module sits below them), in the current format_version (a
    writer: refuses a store that another process is writing). Returns (format_version before, after, videos)."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such cache")
    found = file_format(path)
    kind = next((k for k in kinds if k.FORMAT == found), FeatureCache)
    store = kind(path, "a")
    try:
        before = store.upgrade()
        count = len(store.ids())
    finally:
        store.close()
    return before or FORMAT_VERSION, FORMAT_VERSION, count


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
    # leaves no ``out`` that looks like a complete cache (a rerun removes the hidden file and starts afresh). Each entry
    # is one HDF5 copy of its group (arrays and attributes) from its input into the output.
    building = out.with_name(f".{out.name}.merging")
    writer = FeatureCache(building, "a")  # its lock: one merge into ``out`` at a time; removes a killed merge's file
    tmp = building.with_name(f".{building.name}.compact-{os.getpid()}")
    try:
        building.unlink(missing_ok=True)  # what a killed merge of an earlier version left: start from nothing
        writer._clear_staging()
        failures: dict[str, dict[str, Any]] = {}
        for reader in readers:
            failures.update({vid: record for vid, record in reader.failures().items() if vid not in owner})
        root: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        if spec is not None:
            root["feature_spec"] = json.dumps(spec, sort_keys=True)
        needed = sum(r.path.stat().st_size for r in readers if r.path.exists()) + sum(
            r._scan_staged_bytes() for r in readers)
        ensure_space(out.parent, needed)
        try:
            write_store(tmp, root, sorted(owner.items()), failures, point_each="merge-put")
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise hdf5_write_error(out.parent, exc, needed) from None
        for reader in readers:
            reader.close()
        fault_point("merge-rename")
        target = FeatureCache(out, "a") if out.exists() else None  # --overwrite: hold its lock, drop its staging
        try:
            if target is not None:
                target._clear_staging()
            _replace_atomically(tmp, out)
        finally:
            if target is not None:
                target.close()
    finally:
        tmp.unlink(missing_ok=True)  # a merge that failed (a kill leaves it for the next merge to remove)
        writer.release()
    return len(owner)
