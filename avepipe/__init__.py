"""avepipe: audio-visual event localization from raw video."""

__version__ = "0.1.0"
