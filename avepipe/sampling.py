"""How seconds of video map to frames and audio examples (the AVE feature spec, generalised to any length).

The released AVE features come from 10-s clips: all frames are decoded, ``interval = int(n_frames / 10)`` and second
``l`` averages the 16 frames ``int(l * interval + i / 16 * interval)``, i = 0..15. For other lengths:

* ``T`` = number of whole seconds = ``floor(duration + TOLERANCE_S)``. Clips cut at second boundaries often come out a
  frame or two short (a "1 s" clip of 23 frames at 23.98 fps lasts 0.96 s), so 50 ms of slack counts as a whole second.
  ``T < 1`` is an error (the video is shorter than 1 s).
* When the clip is whole seconds (``duration < T + TOLERANCE_S``) the original formula is used with ``T`` in place of
  10: ``interval = int(n_frames / T)`` -- identical to the released features for 10-s clips.
* Otherwise (e.g. 9.64 s: T = 9 plus a 0.64-s tail) ``interval = int(n_frames / duration)``, the real frames per second,
  so second ``l`` still covers real second ``l``; the partial tail gets no label of its own.
"""

from __future__ import annotations

import math

import numpy as np

FRAMES_PER_SECOND = 16  # frames averaged per second of video (AVE spec)
TOLERANCE_S = 0.05


class TooShortError(ValueError):
    """The media lasts less than one whole second."""


class TooFewFramesError(ValueError):
    """Fewer video frames than seconds (a slideshow): no frame for some seconds."""


def whole_seconds(duration: float) -> int:
    """Number of labelled seconds ``T`` of a clip lasting ``duration`` seconds."""
    if not math.isfinite(duration) or duration <= 0:
        raise TooShortError(f"duration {duration!r} s is not a positive number")
    seconds = int(math.floor(duration + TOLERANCE_S))
    if seconds < 1:
        raise TooShortError(f"lasts {duration:.2f} s, shorter than 1 s")
    return seconds


def frame_interval(n_frames: int, duration: float) -> int:
    """Frames per labelled second, as the AVE scripts compute it (see module docstring)."""
    seconds = whole_seconds(duration)
    span = seconds if duration < seconds + TOLERANCE_S else duration
    interval = int(n_frames / span)
    if interval < 1:
        raise TooFewFramesError(f"{n_frames} frames in {duration:.2f} s: fewer than one frame per second")
    return interval


def ave_frame_indices(n_frames: int, duration: float) -> np.ndarray:
    """Frame indices ``[T, 16]`` of the AVE-compatible sampling: ``int(l * interval + i / 16 * interval)``."""
    seconds = whole_seconds(duration)
    interval = frame_interval(n_frames, duration)
    second = np.arange(seconds, dtype=np.float64)[:, None]
    step = np.arange(FRAMES_PER_SECOND, dtype=np.float64)[None, :] / FRAMES_PER_SECOND
    # Same float arithmetic as the original: l*interval + (i/16)*interval, truncated.
    indices = (second * interval + step * interval).astype(np.int64)
    assert indices[-1, -1] < n_frames  # l*interval + 15/16*interval < T*interval <= n_frames
    return indices
