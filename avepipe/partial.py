"""Finished seconds of long videos still being extracted, kept beside the cache so a killed run resumes mid-video.

Layout: ``F.h5.partial/<id>/<start:07d>.npz`` holds the visual features of seconds ``start ..`` of video ``<id>`` and
a JSON ``meta`` naming the source file (path, size, mtime) and the feature spec they were computed with. Each file is
written to a temporary name, fsynced and renamed: a chunk is complete or absent. :meth:`PartialStore.load` trusts
only chunks of the same source and spec that continue each other from second 0; anything else is deleted. When the
video's entry is committed to the cache, its chunks are removed. The cache file itself never holds partial videos.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from avepipe.faults import fault_point

_CHUNK = re.compile(r"\d{7}\.npz")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fingerprint(source: dict[str, Any], spec: dict[str, Any]) -> str:
    keys = ("source_path", "source_size", "source_mtime")
    return json.dumps({"source": {k: source.get(k) for k in keys}, "spec": spec}, sort_keys=True)


class PartialStore:
    def __init__(self, cache_path: str | os.PathLike):
        cache_path = Path(cache_path)
        self.root = cache_path.with_name(cache_path.name + ".partial")
        self.discarded: list[str] = []  # one line per damaged chunk that :meth:`load` removed

    def _dir(self, vid: str) -> Path:
        return self.root / vid

    def load(self, vid: str, source: dict[str, Any], spec: dict[str, Any]) -> np.ndarray | None:
        """Visual features ``[k, 7, 7, 512]`` of the first k seconds of ``vid`` finished earlier, or None.

        Only files named ``<start:07d>.npz`` are chunks: anything else in the folder (the temporary of a write that was
        killed, ``.<start>.tmp<pid>.npz``) is removed. A chunk that cannot be read (damaged) is removed with the
        chunks after it, and named in :attr:`discarded`; the video resumes from the last good chunk."""
        folder = self._dir(vid)
        if not folder.is_dir():
            return None
        fingerprint = _fingerprint(source, spec)
        chunks = []
        for item in sorted(folder.iterdir()):
            if _CHUNK.fullmatch(item.name) and item.is_file():
                chunks.append(item)
            else:
                _remove(item)
        parts: list[np.ndarray] = []
        for n, chunk in enumerate(chunks):
            try:
                with np.load(chunk, allow_pickle=False) as data:
                    meta = str(data["meta"])
                    visual = data["visual"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                self.discarded.append(f"{chunk}: damaged partial chunk discarded ({type(exc).__name__}); video "
                                      f"{vid!r} resumes from second {sum(len(p) for p in parts)}")
                for later in chunks[n:]:
                    _remove(later)
                break
            if meta != fingerprint or int(chunk.stem) != sum(len(p) for p in parts):
                for later in chunks[n:]:  # another source or spec, or a gap: not a continuation
                    _remove(later)
                break
            parts.append(visual)
        if not parts:
            self.clear(vid)
            return None
        return np.concatenate(parts)

    def save(self, vid: str, start: int, visual: np.ndarray, source: dict[str, Any], spec: dict[str, Any]) -> None:
        folder = self._dir(vid)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{start:07d}.npz"
        tmp = folder / f".{start:07d}.tmp{os.getpid()}.npz"
        np.savez(tmp, visual=np.ascontiguousarray(visual, np.float32), meta=np.array(_fingerprint(source, spec)))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        fault_point("partial-chunk")
        os.replace(tmp, final)

    def clear(self, vid: str) -> None:
        shutil.rmtree(self._dir(vid), ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
