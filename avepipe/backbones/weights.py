"""Where backbone weights are, their checksums, and whether they are the official files (weights/manifest.json)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

RANDOM = "random"  # --vggish-weights random: deterministic random weights, for trying the pipeline only


def manifest() -> dict[str, dict[str, Any]]:
    return json.loads(resources.files("avepipe.backbones").joinpath("manifest.json").read_text())


def weights_dir() -> Path:
    """``$AVEPIPE_WEIGHTS_DIR``, else ``./weights``."""
    return Path(os.environ.get("AVEPIPE_WEIGHTS_DIR") or "weights")


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


def identify(key: str, path: str | os.PathLike) -> WeightsInfo:
    """Checksum ``path`` and compare it with the manifest entry ``key``."""
    entry = manifest()[key]
    md5, sha = file_digests(path)
    if "sha256" in entry:
        official = sha == entry["sha256"]
    elif "md5" in entry:
        official = md5 == entry["md5"]
    else:
        official = sha.startswith(entry["sha256_prefix"])
    return WeightsInfo(key, str(path), sha, official)


def identify_tensors(key: str, label: str, state_dict: dict) -> WeightsInfo:
    """Checksum of an in-memory state dict (e.g. random weights): never official."""
    sha = hashlib.sha256()
    for name in sorted(state_dict):
        sha.update(name.encode())
        sha.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return WeightsInfo(key, label, sha.hexdigest(), False)
