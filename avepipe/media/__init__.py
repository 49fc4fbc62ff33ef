"""ffmpeg probing and decoding, with typed errors for bad input: the media stage, first of the pipeline.

The ffmpeg binary is the system one when ``ffmpeg`` is on PATH, else the static binary shipped by the ``imageio-ffmpeg``
wheel (so ``pip install`` alone is enough). Probing parses ``ffmpeg -i`` because that wheel ships no ffprobe.

Three modules, each importing only the ones listed above it; every public name is re-exported here (the same
objects), so ``from avepipe.media import probe`` is the function of :mod:`avepipe.media.probing`:

- :mod:`avepipe.media.ffmpeg_tool`: which ffmpeg, how a path is given to it, the error kinds, reading its stderr;
- :mod:`avepipe.media.probing`: :func:`probe` and :func:`index`, what a file holds, read without decoding;
- :mod:`avepipe.media.decoder`: the ffmpeg processes that decode (:class:`Decoder`, :class:`FramePipe`,
  :func:`decode_audio`, :func:`thumbnails`) and OpenCV's resize of the AVE recipe.
"""

from avepipe.errors import MediaError
from avepipe.media.decoder import (
    FRAME_SIZE,
    Decoder,
    DecodeReport,
    FramePipe,
    FrameSelection,
    decode_audio,
    resize_like_opencv,
    thumbnails,
)
from avepipe.media.ffmpeg_tool import (
    INPUT_TOKEN,
    CorruptMediaError,
    FfmpegReport,
    InterruptedDecodeError,
    MediaTooShortError,
    MissingFileError,
    NoAudioStreamError,
    NotMediaError,
    NoVideoStreamError,
    StalledDecodeError,
    TooFewFramesError,
    decode_glitches,
    fatal_error,
    ffmpeg_binary,
    ffmpeg_input,
    last_error,
    split_report,
)
from avepipe.media.probing import TRUNCATION_SLACK_S, MediaIndex, MediaInfo, check_file, index, probe

__all__ = [
    "FRAME_SIZE", "INPUT_TOKEN", "TRUNCATION_SLACK_S",
    "CorruptMediaError", "InterruptedDecodeError", "MediaError", "MediaTooShortError", "MissingFileError",
    "NoAudioStreamError", "NotMediaError", "NoVideoStreamError", "StalledDecodeError", "TooFewFramesError",
    "DecodeReport", "Decoder", "FfmpegReport", "FramePipe", "FrameSelection", "MediaIndex", "MediaInfo",
    "check_file", "decode_audio", "decode_glitches", "fatal_error", "ffmpeg_binary", "ffmpeg_input", "index",
    "last_error", "probe", "resize_like_opencv", "split_report", "thumbnails",
]
