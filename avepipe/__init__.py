"""avepipe: audio-visual event localization from raw video.

The library API: :class:`Localizer` (a checkpoint loaded once, videos labelled in as many calls as wanted) and
:func:`localize` (one call, one-off). ``import avepipe`` itself stays light: torch and the models are imported on first
use of either.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

from avepipe.version import __version__

if TYPE_CHECKING:
    from avepipe.localization import Localizer, VideoLabels

__all__ = ["__version__", "Localizer", "localize"]


def __getattr__(name: str) -> Any:
    if name == "Localizer":  # imported on first use: ``import avepipe`` does not import torch
        from avepipe.localization import Localizer

        return Localizer
    raise AttributeError(f"module 'avepipe' has no attribute {name!r}")


def localize(paths: str | os.PathLike | Iterable[str | os.PathLike], checkpoint: str | os.PathLike,
             **options: Any) -> list[VideoLabels]:
    """Per-second labels for video files (or directories): a list of ``avepipe.localization.VideoLabels``.

    One-off: the checkpoint (and, if a video has to be extracted, VGG-19 and VGGish) is loaded for this call. To label
    videos in several calls, make a :class:`Localizer` once and call its ``localize``.

    ``options`` are the fields of :class:`avepipe.localization.LocalizeConfig` (``cache``, ``device``, ``query_audio``,
    ``query_span`` ...). A single path may be given as a string.

    Errors, per video: a video that cannot be used (unreadable, too short, no features) does NOT raise. Its record
    comes back, in input order like every other, with ``error`` set to its one-line message and no ``seconds`` /
    ``spans``; the other videos are labelled. Check ``[r for r in results if r.error]``. Problems of the call itself
    raise an :class:`avepipe.errors.AvepipeError` before any video is labelled: ``UsageError`` (no videos, bad
    options or query), ``CheckpointError`` (not an avepipe checkpoint), ``WeightsError`` (missing backbone weights).

    Safe from a plain script without an ``if __name__ == "__main__":`` guard (and from ``python -``): the decoder
    processes never re-run the calling script.
    """
    from dataclasses import fields

    from avepipe.errors import UsageError
    from avepipe.localization import LocalizeConfig, Localizer

    known = {f.name for f in fields(LocalizeConfig)} - {"checkpoint"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"avepipe.localize: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    config = LocalizeConfig(checkpoint=checkpoint, **options)
    return Localizer.from_config(config).localize(paths, query_audio=config.query_audio,
                                                  query_video=config.query_video, query_span=config.query_span,
                                                  shard=config.shard)
