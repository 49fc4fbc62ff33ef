"""avepipe: audio-visual event localization from raw video."""

from avepipe.version import __version__

__all__ = ["__version__", "localize"]


def localize(paths, checkpoint, **options):
    """Per-second labels for video files (or directories): a list of ``avepipe.localization.VideoLabels``.

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
    from avepipe.localization import LocalizeConfig, localize_videos

    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    results, _ = localize_videos(paths, LocalizeConfig(checkpoint=checkpoint, **options))
    return results
