"""What a media file holds, read without decoding: :func:`probe` (the container's description: duration, streams,
frame size, rates) and :func:`index` (one demux pass: the frames a decoder will return, where the streams end, the
frame times), each raising a typed :class:`~avepipe.errors.MediaError` for an unusable file.

Probing parses ``ffmpeg -i`` because the imageio-ffmpeg wheel ships no ffprobe.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import numpy as np

from avepipe.errors import MediaError
from avepipe.media.ffmpeg_tool import (
    INPUT_TOKEN,
    CorruptMediaError,
    FfmpegReport,
    MediaTooShortError,
    MissingFileError,
    NoAudioStreamError,
    NotMediaError,
    NoVideoStreamError,
    StalledDecodeError,
    fatal_error,
    ffmpeg_binary,
    ffmpeg_input,
    last_error,
    split_report,
)
from avepipe.sampling import TooShortError, whole_seconds


@dataclass(frozen=True)
class MediaInfo:
    path: str
    duration: float  # container duration, seconds
    seconds: int  # T, whole seconds (see avepipe.sampling)
    video_stream: int  # absolute stream index
    width: int
    height: int
    fps: float
    audio_stream: int
    sample_rate: int


_INPUT_FORMAT = re.compile(r"Input #0, ([\w,]+?), from")
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif", "apng"}
_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")  # matched at the start of a structure line
_STREAM = re.compile(r"Stream #0:(\d+)[^:]*:\s*(Video|Audio):(.*)")  # idem
_SIZE = re.compile(r",\s(\d+)x(\d+)(?=[\s,\[]|$)")
_FPS = re.compile(r"(\d+(?:\.\d+)?)\s(?:fps|tbr)")
_RATE = re.compile(r"(\d+)\sHz")


def _classify_open_error(path: str, report: FfmpegReport) -> MediaError:
    lines = [ln.strip() for ln in report.diagnostics if ln.strip()]
    last = next((ln for ln in reversed(lines) if INPUT_TOKEN in ln or "error" in ln.lower()),
                lines[-1] if lines else "")
    text = report.diagnostic_text.lower()
    if ("moov atom not found" in text and _looks_like_mp4(path)) or "partial file" in text or "truncat" in text:
        return CorruptMediaError(path, "container index missing or cut off (file truncated?)")
    if "moov atom not found" in text:
        return NotMediaError(path, "no MP4/MOV structure (ffmpeg guessed the format from the extension)")
    if "invalid data found" in text or "unknown format" in text or "could not find codec" in text:
        return NotMediaError(path, "ffmpeg cannot read it as audio/video")
    return CorruptMediaError(path, last.replace(INPUT_TOKEN, "").strip(" :'") or "ffmpeg could not open it")


def _looks_like_mp4(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(12)
    return head[4:8] in (b"ftyp", b"mdat", b"moov", b"free", b"wide", b"skip")


def probe(path: str | os.PathLike, require_video: bool = True) -> MediaInfo:
    """Duration, streams and sizes of ``path``; raises a :class:`MediaError` subclass for unusable files.

    ``require_video=False`` accepts audio-only files (a CML audio query); their video fields are -1 / 0."""
    path = check_file(path)
    proc = subprocess.run(
        [ffmpeg_binary(), "-hide_banner", "-nostdin", "-i", ffmpeg_input(path)], capture_output=True, text=True,
        errors="replace",
    )
    return _parse_header(path, proc.stderr, require_video)


def check_file(path: str | os.PathLike) -> str:
    path = str(path)
    if not os.path.isfile(path):
        raise MissingFileError(path, _not_a_file(path))
    if not os.access(path, os.R_OK):
        raise MissingFileError(path, "permission denied")
    if os.path.getsize(path) == 0:
        raise NotMediaError(path, "empty file")
    return path


def _not_a_file(path: str) -> str:
    """What ``path`` is when it is not a regular file (nothing here opens it: a FIFO would block)."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "no such file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a regular file"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    return "not a regular file (a socket or device)"


def _parse_header(path: str, stderr: str, require_video: bool = True) -> MediaInfo:
    """The input description ffmpeg prints before it processes anything (``Input #0 ... Duration ... Stream #0:N``),
    metadata excluded (see :class:`FfmpegReport`)."""
    report = split_report(stderr, path)
    streams = [m for m in (_STREAM.match(ln.lstrip()) for ln in report.structure) if m]
    if not streams:
        raise _classify_open_error(path, report)
    container = _INPUT_FORMAT.search(report.structure[0]) if report.structure else None
    if container and (container.group(1) in _IMAGE_FORMATS or container.group(1).endswith("_pipe")):
        raise NotMediaError(path, f"a still image ({container.group(1)}), not a video")
    video = next((m for m in streams if m.group(2) == "Video" and "attached pic" not in m.group(3)), None)
    audio = next((m for m in streams if m.group(2) == "Audio"), None)
    if video is None and (require_video or audio is None):
        raise NoVideoStreamError(path, "the file has audio only" if audio else "no decodable video stream")
    if audio is None:
        raise NoAudioStreamError(path, "the video has no sound track (AVE features need both)")
    size = _SIZE.search(video.group(3)) if video else None
    if video is not None and size is None:
        raise CorruptMediaError(path, "video stream has no frame size")
    fps_match = _FPS.search(video.group(3)) if video else None
    rate = _RATE.search(audio.group(3))
    duration_match = next((m for m in (_DURATION.match(ln.lstrip()) for ln in report.structure) if m), None)
    if duration_match is None:
        raise CorruptMediaError(path, "no duration in the container (stream truncated?)")
    h, m, s = duration_match.groups()
    duration = int(h) * 3600 + int(m) * 60 + float(s)
    try:
        seconds = whole_seconds(duration)
    except TooShortError as exc:
        raise MediaTooShortError(path, str(exc)) from None
    return MediaInfo(
        path=path,
        duration=duration,
        seconds=seconds,
        video_stream=int(video.group(1)) if video else -1,
        width=int(size.group(1)) if size else 0,
        height=int(size.group(2)) if size else 0,
        fps=float(fps_match.group(1)) if fps_match else 0.0,
        audio_stream=int(audio.group(1)),
        sample_rate=int(rate.group(1)) if rate else 0,
    )


TRUNCATION_SLACK_S = 0.25  # complete files measured here end within 0.11 s of their container duration
_DISCARD = 0x4  # AV_PKT_FLAG_DISCARD: a packet outside the edit list; the decoder drops its frame
_NOPTS = -(2**63)


@dataclass(frozen=True)
class MediaIndex:
    """What one demux pass (no decoding) tells about a file."""

    info: MediaInfo
    frames: int  # video frames a decoder returns: packets that carry data and are not discarded by an edit list
    video_end: float  # seconds: end of the last kept video packet
    audio_end: float  # seconds: end of the last audio packet
    # Presentation times (seconds, sorted: the order a decoder returns the frames) of those frames; None when some
    # packet has no timestamp. Used to detect a variable frame rate (avepipe.sampling.frame_drift).
    frame_times: np.ndarray | None = None


def index(path: str | os.PathLike, timeout_s: float | None = None) -> MediaIndex:
    """Probe ``path`` and index its packets in one pass that reads the file but decodes nothing.

    ffmpeg stream-copies the first video and audio streams into its ``framecrc`` muxer, which prints one line per
    packet with its timestamps, size and flags; the input description on stderr is the probe. The frame count is the
    number of video packets that are neither empty nor flagged "discard" (the packets an MP4 edit list cuts: their
    frames are decoded as references but never returned, by OpenCV as by ffmpeg). The same pass checks the file is
    complete: a file cut short (a truncated download) still announces its full duration in the header, but its
    packets end early; the later stream must reach the container duration within ``TRUNCATION_SLACK_S``.
    """
    path = check_file(path)
    try:
        proc = subprocess.run(
            [ffmpeg_binary(), "-hide_banner", "-nostdin", "-i", ffmpeg_input(path), "-map", "0:V:0?", "-map", "0:a:0?",
             "-c", "copy", "-f", "framecrc", "-"],
            capture_output=True, errors="replace", text=True, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        raise StalledDecodeError(path, f"reading the packets took more than {timeout_s:g} s") from None
    info = _parse_header(path, proc.stderr)
    diagnostics = split_report(proc.stderr, path).diagnostic_text  # the file's metadata is not ffmpeg's verdict
    fatal = fatal_error(diagnostics)
    if proc.returncode != 0 or fatal:
        raise CorruptMediaError(path, fatal or last_error(diagnostics, path) or "cannot read the packets")
    kinds: dict[int, str] = {}
    bases: dict[int, float] = {}
    ends = {"video": 0.0, "audio": 0.0}
    frames = 0
    times: list[float] | None = []
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            head, _, value = line[1:].partition(":")
            name, _, number = head.partition(" ")
            if name == "media_type":
                kinds[int(number)] = value.strip()
            elif name == "tb":
                num, _, den = value.strip().partition("/")
                bases[int(number)] = int(num) / int(den)
            continue
        fields = line.split(",")
        if len(fields) < 6:
            continue
        stream, dts, pts, duration, size = (int(f) for f in fields[:5])
        flags = int(fields[6].split("=")[1], 16) if len(fields) > 6 else 1
        kind = kinds.get(stream)
        if kind == "video" and (flags & _DISCARD or size == 0):
            continue
        stamp = pts if pts != _NOPTS else dts
        if kind in ends and stamp != _NOPTS:
            ends[kind] = max(ends[kind], (stamp + max(duration, 0)) * bases.get(stream, 0.0))
        if kind == "video":
            frames += 1
            if times is not None:
                if pts == _NOPTS:  # (a decode timestamp is not a presentation time: no VFR test then)
                    times = None
                else:
                    times.append(pts * bases.get(stream, 0.0))
    if frames == 0:
        raise CorruptMediaError(path, "the video stream has no frames")
    end = max(ends.values())
    if end < info.duration - TRUNCATION_SLACK_S:
        raise CorruptMediaError(path, f"streams end at {end:.2f} s but the header says {info.duration:.2f} s "
                                      f"(file truncated?)")
    frame_times = np.sort(np.array(times, dtype=np.float64)) if times else None
    return MediaIndex(info, frames, ends["video"], ends["audio"], frame_times)
