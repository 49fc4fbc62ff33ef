"""ffmpeg processes that decode: :class:`Decoder` (one pass for the selected video frames and the audio track),
:class:`FramePipe` (raw RGB frames through ffmpeg filters), :func:`decode_audio` (the audio alone, mono float32),
:func:`thumbnails` (small pictures), and OpenCV's resize that the AVE recipe's frames go through. Each takes a probed
:class:`~avepipe.media.probing.MediaInfo`; ffmpeg's failures become :class:`~avepipe.errors.MediaError` kinds.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import ffmpeg
import numpy as np

from avepipe.media.ffmpeg_tool import (
    CorruptMediaError,
    InterruptedDecodeError,
    StalledDecodeError,
    decode_glitches,
    fatal_error,
    ffmpeg_binary,
    ffmpeg_input,
    last_error,
)
from avepipe.media.probing import MediaInfo

FRAME_SIZE = 224  # VGG-19 input side


def _frame_buffer(width: int, height: int) -> tuple[memoryview, np.ndarray]:
    """One reused RGB frame buffer: a yielded frame is valid until the next one is read into it."""
    buffer = bytearray(width * height * 3)
    return memoryview(buffer), np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)


def _read_frame(stdout, view: memoryview, path: str) -> bool:  # noqa: ANN001 - a binary pipe
    """Fill ``view`` with the next raw frame: True, or False at the end of the stream (a partial frame is corrupt)."""
    got = 0
    while got < len(view):
        n = stdout.readinto(view[got:])
        if not n:
            break
        got += n
    if 0 < got < len(view):
        raise CorruptMediaError(path, "video stream ends in the middle of a frame")
    return got > 0


class FramePipe:
    """Raw RGB frames of one video streamed from an ffmpeg process, one ``[H, W, 3]`` uint8 array at a time.

    The yielded array is overwritten by the next frame (no per-frame allocation): copy what you keep.

    ``filters`` is a list of ``(name, args, kwargs)`` ffmpeg filters; ``size`` is the frame size they produce (default:
    native size). Frames are yielded as they are decoded; call :meth:`check` after iterating to surface decode errors.
    """

    def __init__(self, info: MediaInfo, filters: list[tuple[str, tuple, dict]] | None = None,
                 size: tuple[int, int] | None = None):
        self.info = info
        self.width, self.height = size or (info.width, info.height)
        stream = ffmpeg.input(ffmpeg_input(info.path), noautorotate=None)[str(info.video_stream)]
        for name, args, kwargs in filters or ():
            stream = stream.filter(name, *args, **kwargs)
        args = (
            ffmpeg.output(stream, "pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")
            .global_args("-hide_banner", "-nostdin", "-loglevel", "error")
            .compile(cmd=ffmpeg_binary())
        )
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.frames_read = 0
        self.stderr = ""
        self.returncode: int | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        stdout = self._proc.stdout
        assert stdout is not None
        view, frame = _frame_buffer(self.width, self.height)
        try:
            while _read_frame(stdout, view, self.info.path):
                self.frames_read += 1
                yield frame
        finally:
            self.close()

    def close(self) -> None:
        if self.returncode is not None:
            return
        if self._proc.poll() is None and self._proc.stdout and not self._proc.stdout.closed:
            # Stopped early: drain nothing, just end the process.
            self._proc.kill()
        stderr = self._proc.stderr.read() if self._proc.stderr else b""
        self.returncode = self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe:
                pipe.close()
        self.stderr = stderr.decode(errors="replace")

    def check(self) -> None:
        """Raise :class:`CorruptMediaError` when ffmpeg failed while decoding."""
        fatal = fatal_error(self.stderr)
        if self.returncode not in (0, None) or fatal:
            reason = fatal or last_error(self.stderr, self.info.path) or "ffmpeg failed"
            raise CorruptMediaError(self.info.path, reason)


def decode_audio(info: MediaInfo) -> tuple[np.ndarray, int]:
    """The audio track as float32 mono (mean of the channels, as VGGish's wav reader does) at its native rate."""
    args = (
        ffmpeg.input(ffmpeg_input(info.path))[str(info.audio_stream)]
        .output("pipe:", format="wav", acodec="pcm_f32le", map_metadata=-1)
        .global_args("-hide_banner", "-nostdin", "-loglevel", "error")
        .compile(cmd=ffmpeg_binary())
    )
    proc = subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL)
    stderr = proc.stderr.decode(errors="replace")
    fatal = fatal_error(stderr)
    if proc.returncode != 0 or fatal:
        raise CorruptMediaError(info.path, fatal or last_error(stderr, info.path) or "audio decode failed")
    return _mono_from_wav(proc.stdout, info.path)


def _parse_wav(data: bytes, path: str) -> tuple[int, int, np.ndarray]:
    """Channels, rate and float32 samples of the WAV ffmpeg wrote to a pipe (sizes in the header may be unset)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise CorruptMediaError(path, "audio decoder produced no WAV data")
    pos, channels, rate = 12, 0, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt ":
            _, channels, rate = struct.unpack("<HHI", data[body : body + 8])
        elif chunk == b"data":
            payload = data[body:]
            if size not in (0, 0xFFFFFFFF) and size <= len(payload):
                payload = payload[:size]
            usable = len(payload) - len(payload) % (4 * max(channels, 1))
            if channels == 0:
                break
            return channels, rate, np.frombuffer(payload[:usable], dtype="<f4")
        pos = body + size + (size & 1)
    raise CorruptMediaError(path, "audio decoder produced a malformed WAV stream")


def resize_like_opencv(frame: np.ndarray, out: np.ndarray | None = None, size: int = FRAME_SIZE) -> np.ndarray:
    """Resize one uint8 ``[H, W, 3]`` frame to ``[size, size, 3]`` with OpenCV's own ``INTER_LINEAR`` (bit-exact with
    the AVE recipe's ``cv2.resize``; ffmpeg's and torch's bilinear scalers differ by a grey level, which moves pool5
    features by ~1 %, see docs/features.md). ``out``: write into this array (e.g. a shared-memory slot)."""
    if out is None:
        return cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(frame, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class FrameSelection:
    """Which decoded frames leave ffmpeg: those with index ``n < limit`` and ``n % period`` in ``residues``.

    The AVE sampling is periodic (frame ``l*interval + int(i/16*interval)``), so this describes it exactly; frames not
    selected are dropped inside ffmpeg before their colour conversion, so they cost neither conversion nor transfer."""

    period: int
    residues: tuple[int, ...]
    limit: int

    def expression(self) -> str:
        terms = "+".join(f"eq(mod(n\\,{self.period})\\,{r})" for r in self.residues)
        return f"lt(n\\,{self.limit})*({terms})"


@dataclass
class DecodeReport:
    """What ffmpeg says at the end of a decode."""

    frames_decoded: int  # frames the video decoder returned (selected or not)
    glitches: int  # isolated decode errors ffmpeg skipped (a damaged packet), over both streams


# ffmpeg's closing statistics (``-loglevel level+verbose``): "[verbose]   Input stream #0:0 (video): 75 packets read
# (102169 bytes); 75 frames decoded; [0 decode errors]" (the error count from ffmpeg 6 on). Read only from a line that
# starts with its own level tag: the file's metadata is printed verbatim at [info] (continuation lines of a multi-line
# tag carry no tag at all), so a tag that copies this text is never taken for it.
_STREAM_STATS = re.compile(r"\s*Input stream #0:(\d+) \((\w+)\): \d+ packets read \(\d+ bytes\); (?:(\d+) "
                           r"(?:frames|samples) decoded;)?(?: \d+ decoded frames;)?(?: (\d+) decode errors)?")
_LEVEL = re.compile(r"^(?:\[[^\]]*\] )?\[(panic|fatal|error|warning|info|verbose)\] ?")
_PROBLEM_LEVELS = ("panic", "fatal", "error", "warning")


class Decoder:
    """One ffmpeg process that decodes a file once: the video frames (native size, RGB, in the order a decoder returns
    them, as OpenCV's ``VideoCapture`` does: ``-fps_mode passthrough``; only the ``select``-ed ones when a
    :class:`FrameSelection` is given) on stdout, and the audio track as a float32 WAV on a second pipe (read by a
    thread, so neither pipe can block the other).

    Iterate for the frames (one reused ``[H, W, 3]`` array: copy or resize what you keep), then call :meth:`finish`
    for the audio and the decode report; it raises :class:`CorruptMediaError` when ffmpeg failed.
    """

    def __init__(self, info: MediaInfo, threads: int = 1, audio: bool = True, select: FrameSelection | None = None,
                 stall_s: float = 0.0):
        self.info = info
        self.frames_read = 0
        self.stall_s = stall_s  # > 0: end ffmpeg when it produces nothing for this long while we wait on it
        self._waiting_since: float | None = None
        self.stalled = False
        read_fd, write_fd = os.pipe() if audio else (None, None)
        cmd = [ffmpeg_binary(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+verbose",
               "-threads", str(max(1, threads)), "-noautorotate", "-i", ffmpeg_input(info.path),
               "-map", f"0:{info.video_stream}"]
        if select is not None:
            cmd += ["-vf", f"select='{select.expression()}'"]
        cmd += ["-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
        if audio:
            cmd += ["-map", f"0:{info.audio_stream}", "-map_metadata", "-1", "-acodec", "pcm_f32le", "-f", "wav",
                    f"pipe:{write_fd}"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      pass_fds=(write_fd,) if audio else ())
        self._audio_bytes: list[bytes] = []
        self._stderr: list[bytes] = []
        self._threads = [threading.Thread(target=_drain, args=(self._proc.stderr, self._stderr), daemon=True)]
        self._audio_file = None
        if audio:
            os.close(write_fd)
            self._audio_file = os.fdopen(read_fd, "rb")
            self._threads.append(threading.Thread(target=_drain, args=(self._audio_file, self._audio_bytes),
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        if stall_s > 0:
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """End a hung ffmpeg (no output while we wait on it; waiting for the consumer does not count)."""
        while self._proc.poll() is None:
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.stall_s:
                self.stalled = True
                self._proc.kill()
                return
            time.sleep(min(1.0, self.stall_s / 4))

    def __iter__(self) -> Iterator[np.ndarray]:
        stdout = self._proc.stdout
        assert stdout is not None
        view, frame = _frame_buffer(self.info.width, self.info.height)
        while True:
            self._waiting_since = time.monotonic()
            try:
                more = _read_frame(stdout, view, self.info.path)
            finally:  # a killed (stalled) ffmpeg ends mid-frame: the stall is the reason to report
                self._waiting_since = None
                self._check_stall()
            if not more:
                return
            self.frames_read += 1
            yield frame

    def _check_stall(self) -> None:
        if self.stalled:
            raise StalledDecodeError(self.info.path, f"ffmpeg produced no frame for {self.stall_s:g} s")

    def close(self) -> None:
        """Stop early (a failure elsewhere): end the process, keep nothing."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        for pipe in (self._proc.stdout, self._audio_file):
            if pipe is not None:
                pipe.close()

    def finish(self) -> tuple[np.ndarray | None, int, DecodeReport]:
        """After the frames: (mono float32 waveform or None, its sample rate, what the decode reported)."""
        if self._proc.stdout is not None:
            self._waiting_since = time.monotonic()
            self._proc.stdout.read()  # frames nobody asked for (iteration stopped early): let ffmpeg end
        returncode = self._proc.wait()
        self._waiting_since = None
        self._check_stall()
        for thread in self._threads:
            thread.join()
        self.close()
        problems, stats = [], {}
        for line in b"".join(self._stderr).decode(errors="replace").splitlines():
            level = _LEVEL.match(line)
            if level is None:
                continue  # a continuation line (of a multi-line metadata value): ffmpeg's words start with a level
            text = line[level.end():]
            if level.group(1) in _PROBLEM_LEVELS:
                problems.append(text)
            found = _STREAM_STATS.match(text) if level.group(1) == "verbose" else None
            if found and found.group(3) is not None:
                stats[found.group(2)] = (int(found.group(3)), int(found.group(4) or 0))
        stderr = "\n".join(problems)
        if returncode < 0:
            raise InterruptedDecodeError(self.info.path, f"ffmpeg ended by signal {-returncode}")
        fatal = fatal_error(stderr)
        if returncode != 0 or fatal:
            raise CorruptMediaError(self.info.path, fatal or last_error(stderr, self.info.path) or "ffmpeg failed")
        decoded = stats.get("video", (self.frames_read, 0))[0]
        if decoded == 0:
            raise CorruptMediaError(self.info.path, "no video frame could be decoded")
        glitches = max(sum(errors for _, errors in stats.values()), decode_glitches(stderr))
        report = DecodeReport(decoded, glitches)
        if not self._audio_bytes:
            return None, 0, report
        wave, rate = _mono_from_wav(b"".join(self._audio_bytes), self.info.path)
        return wave, rate, report


def _drain(pipe, sink: list[bytes]) -> None:
    while True:
        block = pipe.read(1 << 20)
        if not block:
            return
        sink.append(block)


def _mono_from_wav(data: bytes, path: str) -> tuple[np.ndarray, int]:
    channels, rate, samples = _parse_wav(data, path)
    wave = samples.reshape(-1, channels).mean(axis=1, dtype=np.float64).astype(np.float32)
    if wave.size == 0:
        raise CorruptMediaError(path, "the audio stream decodes to no samples")
    return wave, rate


def thumbnails(info: MediaInfo, seconds: int, width: int = 96) -> np.ndarray:
    """One small RGB frame per second (the frame at s + 0.5 s), uint8 ``[seconds, h, width, 3]``.

    For pictures, not features: ffmpeg's scaler is fine here. A video whose frames end early repeats its last frame.
    """
    height = max(2, int(round(width * info.height / max(1, info.width) / 2)) * 2)
    filters = [("trim", (), {"start": 0.5}), ("setpts", ("PTS-STARTPTS",), {}), ("fps", (), {"fps": 1}),
               ("scale", (width, height), {"flags": "area"})]
    pipe = FramePipe(info, filters, size=(width, height))
    out = np.zeros((seconds, height, width, 3), np.uint8)
    got = 0
    for frame in pipe:
        if got < seconds:
            out[got] = frame
        got += 1
        if got >= seconds:
            break
    pipe.close()
    if got < seconds:
        pipe.check()
        if got:
            out[got:] = out[got - 1]
    return out
