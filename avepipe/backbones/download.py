"""Bring the manifest's weight files into the weights folder: HTTP(S) download with resume, or import of a local copy.

Either way a file reaches its final name only through an atomic rename after its checksum was verified (or, for
``import --force``, after it was recorded as unofficial), so a file under the manifest's name is never a half copy.
Downloads stream into ``<file>.part``; a later run resumes it with an HTTP Range request (206) or starts over when the
server ignores the range (200). Standard library only (urllib).

The machinery is generic (any manifest of ``{file, url, checksum, size}`` entries): :mod:`avepipe.data.release` uses
:func:`download_entry` for the AVE dataset files, with ``max_size`` (a cap for files of unknown exact size), ``check``
(a content check, e.g. "is HDF5", run before the checksum) and ``trust_first_use`` (entries without a published
checksum: accepted, and the sha256 got is returned in :attr:`Outcome.sha256` for the caller to record).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from avepipe.backbones.weights import (
    actual_checksum,
    expected_checksum,
    file_digests,
    forget_unofficial,
    manifest,
    matches,
    record_unofficial,
    weights_dir,
)
from avepipe.errors import DownloadError, UsageError, WeightsError
from avepipe.version import __version__

MIRROR_ENV = "AVEPIPE_WEIGHTS_MIRROR"
CHUNK = 1 << 16
# The most bytes a download may bring when the manifest gives no size (a server sending an endless body must not fill
# the disk); entries with a size are capped at exactly that size.
UNSIZED_LIMIT = 1 << 30

Progress = Callable[[str, dict[str, Any]], None]  # (event, fields): start / advance / retry


@dataclass(frozen=True)
class Outcome:
    name: str
    path: str
    status: str  # downloaded | present | imported | failed
    message: str = ""
    official: bool = True  # False: unofficial weights, or a file accepted without a published checksum
    sha256: str = ""  # of the file in place, when this call computed it (downloaded or verified)
    unreachable: str = ""  # failed because this machine cannot reach this host (offline, no DNS, no route)


class _Unreachable(DownloadError):
    """The host cannot be reached from this machine at all (no name resolution, no route): retrying will not help,
    and every file from it fails the same way (the command line says so in one line)."""

    def __init__(self, message: str, host: str):
        super().__init__(message)
        self.host = host


class _Retryable(Exception):
    """A dropped connection or a transient server error: try again, resuming from the ``.part``."""


class _TooLong(Exception):
    """The server sent more bytes than the file can have."""


def mirror_base(mirror: Optional[str]) -> Optional[str]:
    """The mirror as a base URL: a URL as given, a local folder as its file:// URL (its files are then copied and
    verified like downloads). Anything else is a :class:`~avepipe.errors.UsageError`."""
    if not mirror:
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", mirror):
        return mirror
    folder = Path(mirror).expanduser()
    if folder.is_dir():
        return folder.resolve().as_uri()
    raise UsageError(f"--mirror {mirror}: neither a URL (http://, https://, file://) nor an existing folder")


def source_url(entry: dict[str, Any], mirror: Optional[str] = None, env: str = MIRROR_ENV) -> str:
    """The manifest URL, or ``<mirror>/<file>`` when a mirror is given (argument, else the variable ``env``,
    ``$AVEPIPE_WEIGHTS_MIRROR`` by default): a base URL or a local folder."""
    base = mirror_base(mirror if mirror is not None else os.environ.get(env))
    if base:
        return base.rstrip("/") + "/" + quote(entry["file"])
    return entry["url"]


def part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def _no_progress(event: str, fields: dict[str, Any]) -> None:
    pass


def download(names: list[str], directory: Optional[Path] = None, *, mirror: Optional[str] = None,
             progress: Optional[Progress] = None, force: bool = False, retries: int = 3, timeout: float = 30.0,
             backoff: float = 1.0) -> list[Outcome]:
    """Download the manifest entries ``names``; every one is attempted, failures are outcomes, not exceptions."""
    directory = Path(directory) if directory is not None else weights_dir()
    entries = manifest()
    mirror_base(mirror if mirror is not None else os.environ.get(MIRROR_ENV))  # a bad mirror fails before any work
    return [download_entry(name, entries[name], directory, mirror=mirror, progress=progress, force=force,
                           retries=retries, timeout=timeout, backoff=backoff) for name in names]


def has_checksum(entry: dict[str, Any]) -> bool:
    return any(key in entry for key in ("sha256", "md5", "sha256_prefix"))


def download_entry(name: str, entry: dict[str, Any], directory: Path, *, url: Optional[str] = None,
                   mirror: Optional[str] = None, progress: Optional[Progress] = None, force: bool = False,
                   retries: int = 3, timeout: float = 30.0, backoff: float = 1.0,
                   check: Optional[Callable[[Path], Optional[str]]] = None, trust_first_use: bool = False) -> Outcome:
    """Download one entry (``file``, ``url``, a checksum: ``sha256`` / ``md5`` / ``sha256_prefix``, optional ``size``
    (exact) or ``max_size`` (a cap)).

    ``check(part)`` returns a problem (e.g. "not an HDF5 file") or None; a problem deletes the download. An entry
    without a checksum is refused unless ``trust_first_use``: then whatever arrives (and passes ``check``) is accepted,
    ``official=False``, and its sha256 is in the outcome."""
    report = progress or _no_progress
    directory = Path(directory)
    verified = has_checksum(entry)
    if not verified and not trust_first_use:
        raise WeightsError(f"{entry['file']}: the manifest gives no checksum to verify it against")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / entry["file"]
    if final.exists():
        md5, sha = file_digests(final)
        if not verified:
            return Outcome(name, str(final), "present", "already present, NOT verified (no published checksum)",
                           official=False, sha256=sha)
        if matches(entry, md5, sha):
            return Outcome(name, str(final), "present", "already present and verified", sha256=sha)
        if not force:
            return Outcome(name, str(final), "failed",
                           f"{final} exists but is not the official file ({actual_checksum(entry, md5, sha)}); "
                           "move it away, or use --force to replace it")
    url = url or source_url(entry, mirror)
    part = part_path(final)
    try:
        _fetch(name, url, part, entry.get("size"), report, retries, timeout, backoff, entry.get("max_size"))
    except DownloadError as exc:
        return Outcome(name, str(final), "failed", str(exc), unreachable=getattr(exc, "host", ""))
    problem = check(part) if check is not None else None
    if problem:
        part.unlink()
        return Outcome(name, str(final), "failed", f"{entry['file']}: {problem} (from {url}); the download was deleted")
    md5, sha = file_digests(part)
    if not verified:
        os.replace(part, final)
        return Outcome(name, str(final), "downloaded", f"sha256 {sha}, NOT verified: no published checksum",
                       official=False, sha256=sha)
    if not matches(entry, md5, sha):
        part.unlink()  # resuming from wrong bytes could never succeed
        return Outcome(name, str(final), "failed",
                       f"{entry['file']}: checksum mismatch: expected {expected_checksum(entry)}, got "
                       f"{actual_checksum(entry, md5, sha)} (from {url}); the download was deleted")
    os.replace(part, final)
    forget_unofficial(directory, name)
    return Outcome(name, str(final), "downloaded", f"verified {expected_checksum(entry)}", sha256=sha)


def _fetch(name: str, url: str, part: Path, size: Optional[int], report: Progress, retries: int, timeout: float,
           backoff: float, max_size: Optional[int] = None) -> None:
    """Fill ``part`` with the whole file, resuming after dropped connections up to ``retries`` times."""
    failures = 0
    cap = size if size is not None else max_size
    while True:
        have = part.stat().st_size if part.exists() else 0
        if cap is not None and have > cap:
            part.unlink()
            have = 0
        if size is not None and have == size:
            return  # complete from an earlier run that stopped before verifying; verification decides
        try:
            _fetch_once(name, url, part, have, size, report, timeout, max_size)
            return
        except _Retryable as exc:
            failures += 1
            kept = part.stat().st_size if part.exists() else 0
            if failures > retries:
                where = f"{kept} bytes kept in {part}, run again to resume" if kept else "nothing kept"
                raise DownloadError(f"{part.name.removesuffix('.part')}: download failed after {failures} attempts: "
                                    f"{exc} ({where})") from None
            report("retry", {"name": name, "attempt": failures, "retries": retries, "message": str(exc)})
            time.sleep(backoff * failures)


def _fetch_once(name: str, url: str, part: Path, have: int, size: Optional[int], report: Progress,
                timeout: float, max_size: Optional[int] = None) -> None:
    headers = {"User-Agent": f"avepipe/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            # Nothing past ``have``: the .part already holds the whole file, unless the server says otherwise.
            total = _range_total(exc.headers.get("Content-Range"))
            if total is None or total == have:
                return
            part.unlink()
            raise _Retryable(f"the server has {total} bytes but {part.name} holds {have}: starting over") from None
        if exc.code in (408, 429) or exc.code >= 500:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{part.name.removesuffix('.part')}: HTTP {exc.code} {exc.reason} for {url}") from None
    except URLError as exc:
        import errno
        from urllib.parse import urlsplit

        offline = isinstance(exc.reason, socket.gaierror) or (
            isinstance(exc.reason, OSError) and exc.reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH))
        if offline:  # no name resolution or no route: this machine cannot reach the host; retrying will not help
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
            raise _Unreachable(f"{part.name.removesuffix('.part')}: cannot reach {url}: {reason}",
                               urlsplit(url).hostname or url) from None
        if isinstance(exc.reason, (FileNotFoundError, PermissionError)):  # retrying will not help
            raise DownloadError(f"{part.name.removesuffix('.part')}: cannot reach {url}: {exc.reason}") from None
        raise _Retryable(f"cannot connect to {url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    with response:
        status = response.status or 200  # file:// answers without a status: the whole file
        start = 0
        mode = "wb"  # 200: the server ignored the range (or none was asked for): start over
        if have and status == 206:
            first = _range_start(response.headers.get("Content-Range"))
            if first != have:
                part.unlink()
                raise _Retryable(f"the server sent a range starting at {first}, not {have}: starting over")
            start, mode = have, "ab"
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        total = start + length if length is not None else size
        limit = size if size is not None else max_size if max_size is not None else UNSIZED_LIMIT
        capped = size is not None or max_size is not None
        if total is not None and total > limit:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{part.name.removesuffix('.part')}: {url} announces {total} bytes, more than the "
                                f"{limit} {'the manifest gives' if capped else 'allowed'}; not downloaded")
        report("start", {"name": name, "url": url, "total": total, "resumed": start})
        written = 0
        with open(part, mode) as out:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    if start + written + len(block) > limit:  # never more on disk than the file can have
                        raise _TooLong()
                    out.write(block)
                    written += len(block)
                    report("advance", {"name": name, "bytes": len(block)})
            except _TooLong:
                out.close()
                part.unlink(missing_ok=True)
                raise DownloadError(f"{part.name.removesuffix('.part')}: {url} sent more than the {limit} bytes "
                                    f"{'the manifest gives' if capped else 'allowed'}; aborted and deleted"
                                    ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(f"connection dropped after {start + written} bytes ({type(exc).__name__})") from None
            finally:
                if not out.closed:
                    out.flush()
                    os.fsync(out.fileno())
    # http.client does not always raise when a connection closes early: compare with the announced length.
    if length is not None and written < length:
        raise _Retryable(f"connection dropped after {start + written} of {start + length} bytes")


def _range_start(header: Optional[str]) -> Optional[int]:
    match = re.match(r"bytes (\d+)-", header or "")
    return int(match.group(1)) if match else None


def _range_total(header: Optional[str]) -> Optional[int]:
    match = re.match(r"bytes [\d*-]+/(\d+)", header or "")
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------------------
# import


def import_file(source: str | os.PathLike, name: Optional[str] = None, directory: Optional[Path] = None,
                force: bool = False) -> Outcome:
    """Copy a local weights file into the weights folder under its manifest name.

    The entry is found by checksum, or given as ``name``. A file that does not match its entry is refused unless
    ``force``; then it is installed anyway and recorded in ``unofficial.json``. Raises :class:`WeightsError` for bad
    input (missing file, unknown name, a forced file whose entry cannot be told).
    """
    source = Path(source)
    if not source.is_file():
        raise WeightsError(f"{source}: no such file")
    entries = manifest()
    if name is not None and name not in entries:
        raise WeightsError(f"unknown weights {name}: choose from {', '.join(entries)}")
    directory = Path(directory) if directory is not None else weights_dir()
    directory.mkdir(parents=True, exist_ok=True)
    # Copy first, hashing on the way (one read of the file), then decide what the copy is.
    handle, tmp_name = tempfile.mkstemp(prefix=".import-", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        md5, sha = _copy_hashing(source, handle)
        if name is None:
            name = next((key for key, entry in entries.items() if matches(entry, md5, sha)), None)
        if name is None and force:
            name = next((key for key, entry in entries.items() if entry["file"] == source.name), None)
            if name is None:
                raise WeightsError(f"{source}: matches no manifest entry (sha256 {sha}); "
                                   "say which it is with --as NAME")
        if name is None:
            return Outcome("?", str(source), "failed",
                           f"{source} matches no manifest entry (sha256 {sha}); to use it anyway: --as NAME --force "
                           "(recorded as unofficial)")
        entry = entries[name]
        final = directory / entry["file"]
        official = matches(entry, md5, sha)
        if not official and not force:
            return Outcome(name, str(final), "failed",
                           f"{source} is not the official {name} file: expected {expected_checksum(entry)}, got "
                           f"{actual_checksum(entry, md5, sha)}; use --force to import it anyway "
                           "(recorded as unofficial)")
        if not official:
            record_unofficial(directory, name, entry["file"], sha, source)  # before the rename: never unrecorded
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if official:
        forget_unofficial(directory, name)
        return Outcome(name, str(final), "imported", f"verified {expected_checksum(entry)}")
    return Outcome(name, str(final), "imported",
                   f"UNOFFICIAL (sha256 {sha}), recorded in {directory / 'unofficial.json'}", official=False)


def _copy_hashing(source: Path, handle: int) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return md5.hexdigest(), sha.hexdigest()
