"""avepipe: audio-visual event localization from raw video."""

from avepipe.version import __version__

__all__ = ["__version__", "localize"]


def localize(paths, checkpoint, **options):
    """Per-second labels for video files (or directories): a list of ``avepipe.localization.VideoLabels``.

    ``options`` are the fields of :class:`avepipe.localization.LocalizeConfig` (``cache``, ``device``, ``query_audio``,
    ``query_span`` ...). A single path may be given as a string. Bad videos come back with ``error`` set.
    """
    from avepipe.localization import LocalizeConfig, localize_videos

    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    results, _ = localize_videos(paths, LocalizeConfig(checkpoint=checkpoint, **options))
    return results
