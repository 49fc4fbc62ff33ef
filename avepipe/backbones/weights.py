"""Where backbone weights are, their checksums, and whether they are the official files (weights/manifest.json).

Also the state of the weights folder for ``avepipe weights list|verify``: which files are present, official, or
deliberately unofficial (imported with ``--force`` and recorded in ``<weights dir>/unofficial.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from avepipe import locations
from avepipe.errors import WeightsError
from avepipe.files import read_records, write_atomic

RANDOM = "random"  # --vggish-weights random: deterministic random weights, for trying the pipeline only


def manifest() -> dict[str, dict[str, Any]]:
    return json.loads(resources.files("avepipe.backbones").joinpath("manifest.json").read_text())


def weights_dir() -> Path:
    """``$AVEPIPE_WEIGHTS_DIR``, else ``<user cache>/weights`` (see :mod:`avepipe.locations`)."""
    return locations.weights_dir()


def default_path(key: str) -> Path:
    return weights_dir() / manifest()[key]["file"]


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """(md5, sha256) of a file, read once."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


@dataclass(frozen=True)
class WeightsInfo:
    key: str
    path: str  # file path, or "random"
    sha256: str
    official: bool


def matches(entry: dict[str, Any], md5: str, sha: str) -> bool:
    """Whether digests match a manifest entry: its sha256, else its md5, else its sha256 prefix."""
    if "sha256" in entry:
        return sha == entry["sha256"]
    if "md5" in entry:
        return md5 == entry["md5"]
    return sha.startswith(entry["sha256_prefix"])


def expected_checksum(entry: dict[str, Any]) -> str:
    """The checksum an entry is verified against, for messages: ``sha256 <hex>`` or ``sha256 prefix <hex>``."""
    if "sha256" in entry:
        return f"sha256 {entry['sha256']}"
    if "md5" in entry:
        return f"md5 {entry['md5']}"
    return f"sha256 prefix {entry['sha256_prefix']}"


def actual_checksum(entry: dict[str, Any], md5: str, sha: str) -> str:
    """The same kind of checksum as :func:`expected_checksum`, of a file's digests."""
    return f"md5 {md5}" if "sha256" not in entry and "md5" in entry else f"sha256 {sha}"


def identify(key: str, path: str | os.PathLike) -> WeightsInfo:
    """Checksum ``path`` and compare it with the manifest entry ``key``."""
    md5, sha = file_digests(path)
    return WeightsInfo(key, str(path), sha, matches(manifest()[key], md5, sha))


def identify_tensors(key: str, label: str, state_dict: dict) -> WeightsInfo:
    """Checksum of an in-memory state dict (e.g. random weights): never official."""
    sha = hashlib.sha256()
    for name in sorted(state_dict):
        sha.update(name.encode())
        sha.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return WeightsInfo(key, label, sha.hexdigest(), False)


# ---------------------------------------------------------------------------------------------------------------------
# The weights folder: which manifest files are there, official or not, and the record of deliberate unofficial imports

UNOFFICIAL_FILE = "unofficial.json"


def select_names(names: list[str] | None) -> list[str]:
    """Manifest names in the order given, duplicates dropped; all of them when ``names`` is empty."""
    known = list(manifest())
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise WeightsError(f"unknown weights {', '.join(unknown)}: choose from {', '.join(known)}")
    return list(dict.fromkeys(names)) if names else known


def unofficial_records(directory: Path) -> dict[str, dict[str, str]]:
    """``name -> {file, sha256, source, date}`` for files imported with ``--force`` (``<dir>/unofficial.json``)."""
    return read_records(Path(directory) / UNOFFICIAL_FILE, WeightsError, "name -> record")


def _write_records(directory: Path, records: dict[str, dict[str, str]]) -> None:
    path = Path(directory) / UNOFFICIAL_FILE
    if not records:
        path.unlink(missing_ok=True)
        return
    write_atomic(path, json.dumps(records, indent=2, sort_keys=True) + "\n")


def record_unofficial(directory: Path, name: str, file: str, sha256: str, source: str | os.PathLike) -> dict[str, str]:
    records = unofficial_records(directory)
    records[name] = {"file": file, "sha256": sha256, "source": str(Path(source).resolve()),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_records(directory, records)
    return records[name]


def forget_unofficial(directory: Path, name: str) -> None:
    records = unofficial_records(directory)
    if records.pop(name, None) is not None:
        _write_records(directory, records)


@dataclass(frozen=True)
class WeightsStatus:
    name: str
    entry: dict[str, Any]
    path: Path
    state: str  # official | unofficial (recorded --force import, same bytes) | mismatch | missing
    size: int | None = None  # bytes of the file, when present
    sha256: str | None = None
    actual: str | None = None  # the file's checksum in the manifest entry's kind, for messages
    partial: int | None = None  # bytes in an unfinished ``<file>.part``
    record: dict[str, str] | None = None  # the unofficial record, when there is one


def weights_status(name: str, directory: Path | None = None) -> WeightsStatus:
    """Checksum the manifest file ``name`` in ``directory`` (default :func:`weights_dir`) and classify it."""
    directory = Path(directory) if directory is not None else weights_dir()
    entry = manifest()[name]
    path = directory / entry["file"]
    part = path.with_name(path.name + ".part")
    partial = part.stat().st_size if part.is_file() else None
    record = unofficial_records(directory).get(name)
    if not path.is_file():
        return WeightsStatus(name, entry, path, "missing", partial=partial, record=record)
    md5, sha = file_digests(path)
    if matches(entry, md5, sha):
        state = "official"
    elif record is not None and record.get("sha256") == sha:
        state = "unofficial"
    else:  # neither the official file nor what was deliberately imported: corrupted or replaced behind our back
        state = "mismatch"
    return WeightsStatus(name, entry, path, state, path.stat().st_size, sha, actual_checksum(entry, md5, sha),
                         partial, record)
