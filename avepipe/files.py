"""Small files written whole or not at all, and JSON record files read with one-line errors (the lowest stage: any
module may use it).

:func:`write_atomic` writes to a hidden temporary file beside the target and renames it over the target, so a reader
sees the old file or the new one, never a half-written one, and a crash leaves at most a ``.<name>.<pid>.tmp`` file.
:func:`read_records` reads a JSON object of ``name -> {record}`` (a missing file is no records).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_records(path: str | os.PathLike, error: type[Exception], shape: str,
                 required: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The JSON object ``name -> record`` in ``path`` ({} when there is no such file); each record must hold the
    ``required`` keys. An unreadable or malformed file raises ``error`` naming it, its problem (``shape`` says what
    was expected) and the way out."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable ({exc}); fix or delete it") from None
    if not isinstance(records, dict) or not all(
            isinstance(r, dict) and all(key in r for key in required) for r in records.values()):
        raise error(f"{path}: expected an object of {shape}; fix or delete it")
    return records
