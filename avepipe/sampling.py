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

Variable frame rate (phone videos): the formula above counts frames, so where the rate changes, frames of one second
end up in another (a video at 10 fps for 2 s then 30 fps: "second 1" would average frames from 2.0-2.6 s), while the
audio is cut by time. A video is treated as VFR when some frame's timestamp lies more than ``VFR_DRIFT_S`` from where
a constant rate (first to last frame, evenly spread) puts it (:func:`frame_drift`); a constant-rate file, even with
timestamps rounded to its time base or a dropped frame, stays far below that and keeps the formula above, bit for bit.
For a VFR video, frame ``i`` of second ``l`` is the frame on screen at ``l + i/16`` seconds after the first frame
(:func:`timestamp_frame_indices`), so second ``l``'s frames are those shown during ``[l, l+1)``.
"""

from __future__ import annotations

import math

import numpy as np

FRAMES_PER_SECOND = 16  # frames averaged per second of video (AVE spec)
TOLERANCE_S = 0.05
VFR_DRIFT_S = 0.1  # a tenth of a labelled second: constant-rate files measured here stay below 0.02 s


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


def frame_drift(times: np.ndarray) -> float:
    """Largest distance (seconds) between a frame's presentation time (``times`` sorted) and where a constant rate puts
    it (the first to the last frame evenly spread)."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 3:
        return 0.0
    ideal = times[0] + np.arange(len(times)) * ((times[-1] - times[0]) / (len(times) - 1))
    return float(np.max(np.abs(times - ideal)))


def timestamp_frame_indices(times: np.ndarray, duration: float) -> np.ndarray:
    """Frame indices ``[T, 16]`` chosen by time (VFR videos): frame ``i`` of second ``l`` is the last frame whose
    presentation time (``times`` sorted, relative to the first) is at or before ``l + i/16``."""
    seconds = whole_seconds(duration)
    frame_interval(len(times), duration)  # the same "fewer than one frame per second" refusal as the formula
    relative = np.asarray(times, dtype=np.float64) - float(times[0])
    targets = np.arange(seconds, dtype=np.float64)[:, None] + \
        np.arange(FRAMES_PER_SECOND, dtype=np.float64)[None, :] / FRAMES_PER_SECOND
    chosen = np.searchsorted(relative, targets + 1e-9, side="right") - 1
    return np.clip(chosen, 0, len(relative) - 1).astype(np.int64)
