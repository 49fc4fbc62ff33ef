"""Where avepipe keeps what it downloads: one per-user cache folder, as torch hub and whisper do.

Contract (environment variables are read at each call, so a test or a job script may change them at any time):

* :func:`cache_home`: ``$AVEPIPE_HOME``, else ``$XDG_CACHE_HOME/avepipe``, else ``~/.cache/avepipe``.
* :func:`weights_dir`: ``$AVEPIPE_WEIGHTS_DIR``, else ``<cache home>/weights`` (pretrained backbones).
* :func:`dataset_dir`: ``$AVEPIPE_DATA_DIR``, else ``<cache home>/datasets/ave`` (the AVE release, or a dataset of your
  own: ``Annotations.txt``, splits, ``features.h5``).

An empty variable counts as unset. ``~`` in a variable is expanded. Nothing here creates a folder: the commands that
write into one create it. This module imports nothing from avepipe: every stage may use it.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "AVEPIPE_HOME"
WEIGHTS_ENV = "AVEPIPE_WEIGHTS_DIR"
DATA_ENV = "AVEPIPE_DATA_DIR"


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def cache_home() -> Path:
    """``$AVEPIPE_HOME``, else ``$XDG_CACHE_HOME/avepipe``, else ``~/.cache/avepipe``."""
    home = _from_env(HOME_ENV)
    if home is not None:
        return home
    xdg = _from_env("XDG_CACHE_HOME")
    if xdg is not None and xdg.is_absolute():  # the XDG spec: a relative value is invalid and must be ignored
        return xdg / "avepipe"
    return Path.home() / ".cache" / "avepipe"


def weights_dir() -> Path:
    """``$AVEPIPE_WEIGHTS_DIR``, else ``<cache home>/weights``."""
    return _from_env(WEIGHTS_ENV) or cache_home() / "weights"


def dataset_dir() -> Path:
    """``$AVEPIPE_DATA_DIR``, else ``<cache home>/datasets/ave``."""
    return _from_env(DATA_ENV) or cache_home() / "datasets" / "ave"
