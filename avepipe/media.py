"""ffmpeg probing and decoding, with typed errors for bad input.

The ffmpeg binary is the system one when ``ffmpeg`` is on PATH, else the static binary shipped by the ``imageio-ffmpeg``
wheel (so ``pip install`` alone is enough). Probing parses ``ffmpeg -i`` because that wheel ships no ffprobe.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import ffmpeg
import numpy as np

from avepipe.errors import MediaError
from avepipe.sampling import TooShortError, whole_seconds

FRAME_SIZE = 224  # VGG-19 input side


class MissingFileError(MediaError):
    kind = "missing file"


class NotMediaError(MediaError):
    kind = "not a media file"


class CorruptMediaError(MediaError):
    kind = "truncated or corrupt stream"


class NoVideoStreamError(MediaError):
    kind = "no video stream"


class NoAudioStreamError(MediaError):
    kind = "no audio stream"


class MediaTooShortError(MediaError):
    kind = "shorter than 1 s"


class TooFewFramesError(MediaError):
    kind = "too few frames per second"


class StalledDecodeError(MediaError):
    kind = "decoder stalled"


class InterruptedDecodeError(MediaError):
    kind = "decoder interrupted"
    transient = True  # ffmpeg was killed by a signal that did not come from avepipe: worth another try


@functools.lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    """Path of the ffmpeg executable: ``$AVEPIPE_FFMPEG``, the system one, or imageio-ffmpeg's static build."""
    explicit = os.environ.get("AVEPIPE_FFMPEG")
    if explicit:
        return explicit
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


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


def ffmpeg_input(path: str | os.PathLike) -> str:
    """``path`` as ffmpeg must be given a local file: absolute. A relative name with a colon (``10:30 meeting.mp4``,
    ``2024-01-01T10:00:00.mp4``, ``pipe:3.mp4``) would be read by ffmpeg as ``<protocol>:<rest>`` (another file, a
    file descriptor, a network URL); an absolute path starts with ``/`` and is always the file protocol."""
    return os.path.abspath(os.fspath(path))


def _without_path(text: str, path: str) -> str:
    return text.replace(ffmpeg_input(path), "").replace(path, "")


@dataclass(frozen=True)
class _Report:
    """ffmpeg's stderr split into the input description (the lines that state container and stream facts) and the
    diagnostics (everything outside the Input/Output/Stream-mapping dump: warnings and errors).

    ffmpeg prints the file's metadata (title, comment, any tag, verbatim, newlines included) inside that dump, so a tag
    such as ``comment="Duration: 00:02:00.00"`` or ``"partial file"`` reads like ffmpeg's own words. Here every
    ``Metadata:`` / ``Side data:`` block is dropped with all its lines (its entries, and the continuation lines of a
    multi-line value, are indented deeper than its header), and the input's name is replaced by ``<input>`` (a file name
    may hold a newline too): what is left of the dump is ffmpeg's own structure, and only its ``Duration:`` and
    ``Stream #0:N`` lines are read. The static ffmpeg that imageio-ffmpeg ships has no ffprobe, so this description
    is the one probe every install has; the packet facts (frame count, where the streams end) come from the
    machine-readable framecrc lines of :func:`index`."""

    structure: tuple[str, ...]
    diagnostics: tuple[str, ...]

    @property
    def diagnostic_text(self) -> str:
        return "\n".join(self.diagnostics)


_INPUT_TOKEN = "<input>"
_DUMP_STARTS = ("Input #", "Output #", "Stream mapping:")
_SKIPPED_BLOCKS = ("Metadata:", "Side data:")


def _split_report(stderr: str, path: str) -> _Report:
    text = stderr.replace(ffmpeg_input(path), _INPUT_TOKEN)
    if path:
        text = text.replace(path, _INPUT_TOKEN)
    structure: list[str] = []
    diagnostics: list[str] = []
    dump: str | None = None  # the dump being read: "input", "other" (output, stream mapping) or None
    skip_deeper: int | None = None  # inside a metadata block: lines indented deeper than this are its own
    for line in text.splitlines():
        if line.startswith(_DUMP_STARTS):
            dump, skip_deeper = ("input" if line.startswith("Input #") else "other"), None
            if dump == "input":
                structure.append(line)
            continue
        if dump is not None and line[:1] == " ":
            indent = len(line) - len(line.lstrip(" "))
            if skip_deeper is not None and indent > skip_deeper:
                continue
            skip_deeper = None
            if line.strip() in _SKIPPED_BLOCKS:
                skip_deeper = indent
                continue
            if dump == "input":
                structure.append(line)
            continue
        dump = None
        diagnostics.append(line)
    return _Report(tuple(structure), tuple(diagnostics))


def _classify_open_error(path: str, report: _Report) -> MediaError:
    lines = [ln.strip() for ln in report.diagnostics if ln.strip()]
    last = next((ln for ln in reversed(lines) if _INPUT_TOKEN in ln or "error" in ln.lower()),
                lines[-1] if lines else "")
    text = report.diagnostic_text.lower()
    if ("moov atom not found" in text and _looks_like_mp4(path)) or "partial file" in text or "truncat" in text:
        return CorruptMediaError(path, "container index missing or cut off (file truncated?)")
    if "moov atom not found" in text:
        return NotMediaError(path, "no MP4/MOV structure (ffmpeg guessed the format from the extension)")
    if "invalid data found" in text or "unknown format" in text or "could not find codec" in text:
        return NotMediaError(path, "ffmpeg cannot read it as audio/video")
    return CorruptMediaError(path, last.replace(_INPUT_TOKEN, "").strip(" :'") or "ffmpeg could not open it")


def _looks_like_mp4(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(12)
    return head[4:8] in (b"ftyp", b"mdat", b"moov", b"free", b"wide", b"skip")


def probe(path: str | os.PathLike, require_video: bool = True) -> MediaInfo:
    """Duration, streams and sizes of ``path``; raises a :class:`MediaError` subclass for unusable files.

    ``require_video=False`` accepts audio-only files (a CML audio query); their video fields are -1 / 0."""
    path = _check_file(path)
    proc = subprocess.run(
        [ffmpeg_binary(), "-hide_banner", "-nostdin", "-i", ffmpeg_input(path)], capture_output=True, text=True,
        errors="replace",
    )
    return _parse_header(path, proc.stderr, require_video)


def _check_file(path: str | os.PathLike) -> str:
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
    metadata excluded (see :class:`_Report`)."""
    report = _split_report(stderr, path)
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
    path = _check_file(path)
    try:
        proc = subprocess.run(
            [ffmpeg_binary(), "-hide_banner", "-nostdin", "-i", ffmpeg_input(path), "-map", "0:V:0?", "-map", "0:a:0?",
             "-c", "copy", "-f", "framecrc", "-"],
            capture_output=True, errors="replace", text=True, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        raise StalledDecodeError(path, f"reading the packets took more than {timeout_s:g} s") from None
    info = _parse_header(path, proc.stderr)
    diagnostics = _split_report(proc.stderr, path).diagnostic_text  # the file's metadata is not ffmpeg's verdict
    fatal = _fatal_error(diagnostics)
    if proc.returncode != 0 or fatal:
        raise CorruptMediaError(path, fatal or _last_error(diagnostics, path) or "cannot read the packets")
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


# ffmpeg messages that mean the stream is cut off or unreadable (ffmpeg may still exit 0 after printing them).
# Glitches such as "error while decoding MB" are tolerated: the video is still usable.
_FATAL_MARKERS = ("partial file", "invalid data found", "moov atom not found", "error submitting packet", "truncated")


def _fatal_error(stderr: str) -> str | None:
    for line in stderr.splitlines():
        lower = line.lower()
        if _is_decoder_glitch(lower):
            continue  # an isolated glitch: the decoder skips the packet and goes on (see decode_glitches)
        if any(marker in lower for marker in _FATAL_MARKERS):
            return re.sub(r"^\[[^\]]*\]\s*", "", line.strip())
    return None


def _is_decoder_glitch(lower: str) -> bool:
    """A decoder's complaint about one packet (ffmpeg skips or conceals it and goes on), not a broken file."""
    return ("[dec:" in lower or "error while decoding" in lower or "submitting packet to decoder" in lower
            or "error decoding" in lower)


def decode_glitches(stderr: str) -> int:
    """Isolated decode errors ffmpeg reported and skipped (a damaged packet): the file is still usable."""
    return sum(_is_decoder_glitch(line.lower()) for line in stderr.splitlines())


def _last_error(stderr: str, path: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("frame=", "size="))]
    return _without_path(lines[-1], path).replace(_INPUT_TOKEN, "").strip(" :'") if lines else ""


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
        fatal = _fatal_error(self.stderr)
        if self.returncode not in (0, None) or fatal:
            reason = fatal or _last_error(self.stderr, self.info.path) or "ffmpeg failed"
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
    fatal = _fatal_error(stderr)
    if proc.returncode != 0 or fatal:
        raise CorruptMediaError(info.path, fatal or _last_error(stderr, info.path) or "audio decode failed")
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
        fatal = _fatal_error(stderr)
        if returncode != 0 or fatal:
            raise CorruptMediaError(self.info.path, fatal or _last_error(stderr, self.info.path) or "ffmpeg failed")
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
