"""Per-video decoding: one pass over a file gives the selected 224x224 frames of every second and the log-mel examples.

Contract of one video (:func:`decode_video`):

1. :func:`avepipe.media.index` reads the file once without decoding: the probe, the number of frames a decoder will
   return (video packets minus empty ones and those an edit list discards) and the completeness check.
2. That count fixes the AVE sampling (``interval = int(n / T)``, frame ``int(l*interval + i/16*interval)``,
   :mod:`avepipe.sampling`) before decoding starts, so frames are selected as they stream out of ffmpeg and only the
   selected ones are resized (OpenCV ``INTER_LINEAR``, bit-exact with the AVE recipe); the rest are dropped unread.
3. One ffmpeg process decodes video and audio together (:class:`avepipe.media.Decoder`); the audio is resampled to
   16 kHz (resampy's ``kaiser_best`` filter in polyphase form) and cut into VGGish log-mel examples at the end.

The video is never decoded twice. If the decoder returns a different number of frames than the index said (a damaged
packet that yields no picture), the sampling planned on the index is kept when the interval is unchanged (the selected
frames are then identical); otherwise the frames are kept as selected, a missing tail repeats the last frame, and the
entry records ``frames_indexed`` / ``frames_decoded`` so the difference is visible.

Messages (:class:`Started`, :class:`Second`, :class:`Finished`, :class:`Failed`) go from the decoder to the consumer
in order per video. Many videos in decode processes: :mod:`avepipe.decode.workers`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avepipe import media
from avepipe.backbones import logmel
from avepipe.sampling import (
    FRAMES_PER_SECOND,
    VFR_DRIFT_S,
    TooFewFramesError,
    TooShortError,
    ave_frame_indices,
    frame_drift,
    frame_interval,
    timestamp_frame_indices,
)
from avepipe.settings import DecodeConfig

FRAME_SHAPE = (FRAMES_PER_SECOND, media.FRAME_SIZE, media.FRAME_SIZE, 3)  # one second of selected frames
SECOND_BYTES = int(np.prod(FRAME_SHAPE))


@dataclass
class VideoTask:
    vid: str
    path: str
    skip_seconds: int = 0  # seconds already extracted (a resumed long video): decoded, but not resized or sent


@dataclass
class Started:
    vid: str
    meta: dict[str, Any]  # cache attributes known before decoding (source, duration, seconds T, sizes, frames_indexed)


@dataclass
class Second:
    vid: str
    second: int  # index l of this second in the video
    frames: np.ndarray | None  # [16, 224, 224, 3] uint8 when decoded in this process
    worker: int = -1  # else: the ring of this decode process ...
    slot: int = -1  # ... and the slot holding the frames (the consumer releases it)


@dataclass
class Finished:
    vid: str
    examples: np.ndarray  # [T, 96, 64] float32 VGGish log-mel examples
    meta: dict[str, Any]  # attributes known only at the end (frames_decoded, audio_padded_s, decode_glitches)


@dataclass
class Failed:
    vid: str
    error: str  # one line naming the file and the problem
    transient: bool = False  # not the file's fault (a killed decoder): retried by the next run


Message = Started | Second | Finished | Failed
SlotSource = Callable[[], tuple[int, np.ndarray]]  # () -> (slot id, writable [16, 224, 224, 3] array)


def fresh_slot() -> tuple[int, np.ndarray]:
    return -1, np.empty(FRAME_SHAPE, np.uint8)


def decode_video(task: VideoTask, config: DecodeConfig, acquire: SlotSource = fresh_slot,
                 threads: int = 1) -> Iterator[Message]:
    """The messages of one video; every failure becomes one :class:`Failed` (never an exception)."""
    try:
        idx = media.index(task.path, timeout_s=config.stall_seconds or None)
        info = idx.info
        stat = os.stat(task.path)
        meta = {
            "source_path": str(Path(task.path).resolve()), "source_size": stat.st_size, "source_mtime": stat.st_mtime,
            "duration": info.duration, "seconds": info.seconds, "width": info.width, "height": info.height,
            "audio_sample_rate": info.sample_rate, "frames_indexed": idx.frames,
            # A video stream shorter than the labelled seconds: its frames are spread over all T seconds (the AVE
            # formula); how much is missing is recorded, like audio_padded_s for a short sound track.
            "video_padded_s": round(max(0.0, info.seconds - idx.video_end), 3),
        }
        indices = None
        if config.sampling == "ave":
            indices, drift = plan_frames(idx)
            if drift is not None:  # VFR: recorded, so a user can see which entries were sampled by time
                meta.update(frame_selection="timestamp", vfr_drift_s=round(drift, 3))
        yield Started(task.vid, meta)
        if config.sampling == "ave":
            frames = _ave_seconds(idx, indices, task, acquire, threads, config.stall_seconds)
        elif config.sampling == "fps":
            frames = _fps_seconds(info, task, acquire)
        else:
            raise ValueError(f"unknown sampling mode {config.sampling!r}")
        outcome: dict[str, Any] = {}
        for second in frames:
            if isinstance(second, dict):
                outcome = second
            else:
                yield second
        wave, rate = outcome.pop("wave"), outcome.pop("rate")
        examples, padded = logmel.waveform_to_examples(wave, rate, info.seconds)
        yield Finished(task.vid, examples, {**outcome, "audio_padded_s": float(padded)})
    except media.MediaError as exc:
        yield Failed(task.vid, str(exc), exc.transient)
    except TooShortError as exc:
        yield Failed(task.vid, str(media.MediaTooShortError(task.path, str(exc))))
    except TooFewFramesError as exc:
        yield Failed(task.vid, str(media.TooFewFramesError(task.path, str(exc))))
    except Exception as exc:  # noqa: BLE001 - any failure of one video must not stop the batch
        last = traceback.format_exc(limit=1).strip().splitlines()[-1]
        yield Failed(task.vid, f"{task.path}: unexpected error: {type(exc).__name__}: {exc} ({last})")


def decode_file(path: str | os.PathLike, sampling: str = "ave") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """All of one video in memory (short videos, tests, benchmarks): frames ``[T, 16, 224, 224, 3]`` uint8, log-mel
    examples ``[T, 96, 64]`` and the attributes; raises the :class:`avepipe.media.MediaError` message as ValueError."""
    seconds: list[np.ndarray] = []
    meta: dict[str, Any] = {}
    for message in decode_video(VideoTask(Path(path).stem, str(path)), DecodeConfig(sampling=sampling)):
        if isinstance(message, Failed):
            raise ValueError(message.error)
        if isinstance(message, Second):
            seconds.append(message.frames)
        elif isinstance(message, Started):
            meta.update(message.meta)
        elif isinstance(message, Finished):
            meta.update(message.meta)
            examples = message.examples
    return np.stack(seconds), examples, meta


class SecondFiller:
    """Places frames, in order, into seconds of 16 (each second in a slot from ``acquire``); :meth:`put` returns the
    :class:`Second` a frame completes. Starts at frame position ``start`` (a resumed video skips its done seconds)."""

    def __init__(self, vid: str, acquire: SlotSource, start: int = 0):
        self.vid, self.acquire, self.position = vid, acquire, start
        self.slot, self.target = -1, None

    def put(self, frame: np.ndarray) -> Second | None:
        if self.target is None:
            self.slot, self.target = self.acquire()
        self.target[self.position % FRAMES_PER_SECOND] = frame
        self.position += 1
        if self.position % FRAMES_PER_SECOND:
            return None
        done = Second(self.vid, self.position // FRAMES_PER_SECOND - 1, self.target if self.slot < 0 else None,
                      slot=self.slot)
        self.slot, self.target = -1, None
        return done


def plan_frames(idx: media.MediaIndex) -> tuple[np.ndarray, float | None]:
    """The ``[T, 16]`` frame indices of ``--sampling ave`` and, for a VFR video, how far its timestamps drift from a
    constant rate (None for a constant-rate video): the AVE formula by frame count for constant-rate videos (bit-exact
    with the recipe), frames chosen by timestamp for VFR ones (:mod:`avepipe.sampling`)."""
    times = idx.frame_times
    if times is not None and len(times) == idx.frames:
        drift = frame_drift(times)
        if drift > VFR_DRIFT_S:
            return timestamp_frame_indices(times, idx.info.duration), drift
    return ave_frame_indices(idx.frames, idx.info.duration), None


def _ave_seconds(idx: media.MediaIndex, indices: np.ndarray, task: VideoTask, acquire: SlotSource, threads: int,
                 stall_s: float) -> Iterator:
    info = idx.info
    flat = indices.reshape(-1)
    interval = int(indices[1, 0] - indices[0, 0]) if len(indices) > 1 else frame_interval(idx.frames, info.duration)
    residues = tuple(sorted({int(r) for r in indices[0] - indices[0, 0]}))
    periodic = interval > 0 and np.array_equal(indices, np.arange(len(indices))[:, None] * interval + indices[0])
    selection = media.FrameSelection(interval, residues, int(len(indices) * interval)) if periodic else None
    # Not periodic (frames chosen by timestamp, a VFR video): every frame leaves ffmpeg and the wanted ones are kept.
    wanted = np.unique(flat) if periodic else np.arange(idx.frames)  # the frames ffmpeg lets out, in order
    decoder = media.Decoder(info, threads=threads, select=selection, stall_s=stall_s)
    filler = SecondFiller(task.vid, acquire, task.skip_seconds * FRAMES_PER_SECOND)
    small = np.empty(FRAME_SHAPE[1:], np.uint8)  # the last selected frame, resized (a frame may serve several i)
    have_small = False
    try:
        for j, frame in enumerate(decoder):
            k = int(wanted[j]) if j < len(wanted) else -1  # the decoded index of the j-th frame ffmpeg selected
            if filler.position >= len(flat) or flat[filler.position] != k:
                continue  # a second finished by an earlier run (resume): not resized
            media.resize_like_opencv(frame, out=small)
            have_small = True
            while filler.position < len(flat) and flat[filler.position] == k:
                second = filler.put(small)
                if second is not None:
                    yield second
    except BaseException:
        decoder.close()
        raise
    wave, rate, report = decoder.finish()
    if report.frames_decoded < idx.frames / 2 or (filler.position < len(flat) and not have_small):
        # Isolated glitches are fine; a stream that mostly fails to decode is not.
        raise media.CorruptMediaError(info.path, f"only {report.frames_decoded} of {idx.frames} frames decode")
    while filler.position < len(flat):  # fewer frames than indexed (damaged packets): the tail repeats the last one
        second = filler.put(small)
        if second is not None:
            yield second
    if wave is None:
        raise media.NoAudioStreamError(info.path, "the sound track decodes to nothing")
    yield {"wave": wave, "rate": rate, "frames_decoded": report.frames_decoded, "decode_glitches": report.glitches}


def _fps_seconds(info: media.MediaInfo, task: VideoTask, acquire: SlotSource) -> Iterator:
    """``--sampling fps``: ffmpeg resamples to 16 frames/s and scales to 224 itself (not AVE-compatible)."""
    filters = [("fps", (FRAMES_PER_SECOND,), {}),
               ("scale", (media.FRAME_SIZE, media.FRAME_SIZE), {"flags": "bilinear"})]
    needed = info.seconds * FRAMES_PER_SECOND
    skip = task.skip_seconds * FRAMES_PER_SECOND
    pipe = media.FramePipe(info, filters, size=(media.FRAME_SIZE, media.FRAME_SIZE))
    filler = SecondFiller(task.vid, acquire, skip)
    seen, last = 0, None
    for frame in pipe:
        seen += 1
        if seen <= skip or filler.position >= needed:
            continue
        last = frame.copy()
        second = filler.put(frame)
        if second is not None:
            yield second
    pipe.check()
    if seen == 0:
        raise media.CorruptMediaError(info.path, "no video frame could be decoded")
    last = last if last is not None else frame.copy()
    while filler.position < needed:  # the fps filter can end a frame or two short of T*16: repeat the last frame
        second = filler.put(last)
        if second is not None:
            yield second
    wave, rate = media.decode_audio(info)
    yield {"wave": wave, "rate": rate, "frames_decoded": seen, "decode_glitches": 0}
