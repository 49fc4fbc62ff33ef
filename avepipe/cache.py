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
entries; readers see both, and the next writer compacts them. One writer at a time: ``F.h5.lock`` (flock).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np

from avepipe.errors import CacheError, CacheLockedError, SpecMismatchError

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


def _check_id(video_id: str) -> None:
    problem = id_problem(video_id)
    if problem:
        raise CacheError(f"invalid video id: {problem}")


def _temp_name(staging: Path, kind: str) -> Path:
    """A temporary name that does not grow with the id (a long id must not overflow the file-name limit)."""
    return staging / f".{kind}.tmp{os.getpid()}.{time.monotonic_ns()}"


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

    # -- locking -------------------------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+")
        except OSError as exc:
            raise _write_error(self.path.parent, exc) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CacheLockedError(
                f"{self.path}: another avepipe process (pid {holder}) is writing this cache; "
                "wait for it or use another --cache"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
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
        """Compact staged entries (writers) and release the lock."""
        if self._lock_handle is not None:
            try:
                self.compact()
            except OSError as exc:  # e.g. disk full: the staged entries stay, the next writer compacts them
                raise _write_error(self.path.parent, exc, self.staged_bytes()) from None
            finally:
                fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
                self._lock_handle.close()
                self._lock_handle = None

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

    @property
    def spec(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        with h5py.File(self.path, "r") as f:
            raw = f.attrs.get("feature_spec")
        return json.loads(_attr(raw)) if raw is not None else None

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
        with h5py.File(tmp, "w") as f:
            f.create_dataset("visual", data=np.ascontiguousarray(visual, dtype=np.float32))
            f.create_dataset("audio", data=np.ascontiguousarray(audio, dtype=np.float32))
            for key, value in attrs.items():
                f.attrs[key] = _storable(value)
        _replace_atomically(tmp, final)
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
        _replace_atomically(tmp, final)
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

    def staged_bytes(self) -> int:
        if not self.staging.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.staging.glob("*") if not p.name.startswith("."))

    def maybe_compact(self, min_bytes: int = 256 << 20) -> bool:
        """Compact when the staged entries outweigh the main file (amortised: every byte is rewritten O(1) times)."""
        staged = self.staged_bytes()
        main = self.path.stat().st_size if self.path.exists() else 0
        if staged >= max(min_bytes, main):
            self.compact()
            return True
        return False

    def compact(self) -> None:
        """Fold the staged entries into a fresh copy of the store, then atomically replace the store with it."""
        self._require_writer()
        staged = self._staged_ids()
        staged_failures = self._staged_failures()
        if not staged and not staged_failures and self.path.exists():
            self._clear_staging()
            return
        self._rewrite(spec=None)
        self._clear_staging()

    def _clear_staging(self) -> None:
        if not self.staging.is_dir():
            return
        for p in self.staging.iterdir():
            if not p.name.endswith(".corrupt"):  # quarantined files stay for the user to inspect
                p.unlink()

    def _rewrite(self, spec: dict[str, Any] | None) -> None:
        staged = set(self._staged_ids())
        failures = {**self._stored_failures(), **self._staged_failures()}
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}")
        old = h5py.File(self.path, "r") if self.path.exists() else None
        try:
            with h5py.File(tmp, "w") as out:
                out.attrs["format"] = self.FORMAT
                out.attrs["format_version"] = FORMAT_VERSION
                if spec is not None:
                    out.attrs["feature_spec"] = json.dumps(spec, sort_keys=True)
                elif old is not None and "feature_spec" in old.attrs:
                    out.attrs["feature_spec"] = old.attrs["feature_spec"]
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
        _replace_atomically(tmp, self.path)

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


def merge(inputs: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> int:
    """Join caches built with the same spec into ``out``; returns the number of videos. Refuses mixed specs."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CacheError(f"{out}: already exists (pass --overwrite to replace it)")
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise CacheError(f"{out}: the output cannot also be an input")
    readers = [FeatureCache(p, "r") for p in inputs]
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
    writer = FeatureCache(out, "a")
    try:
        if out.exists():
            out.unlink()  # overwrite: start from nothing
        writer._clear_staging()  # and nothing staged by an earlier writer of that output
        if spec is not None:
            writer.ensure_spec(spec)
        for video_id, reader in sorted(owner.items()):
            entry = reader.get(video_id)
            writer.put(video_id, entry.visual, entry.audio, entry.attrs)
        for reader in readers:
            for video_id, record in reader.failures().items():
                if video_id not in owner:
                    writer.put_failure(video_id, record.get("source_path", ""), record.get("error", ""))
    finally:
        writer.close()
    return len(owner)
