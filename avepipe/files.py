"""Writing small files whole or not at all (the lowest stage: any module may use it).

:func:`write_atomic` writes to a hidden temporary file beside the target and renames it over the target, so a reader
sees the old file or the new one, never a half-written one, and a crash leaves at most a ``.<name>.<pid>.tmp`` file.
"""

from __future__ import annotations

import os
from pathlib import Path


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
