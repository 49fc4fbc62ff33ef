"""The ffmpeg executable and how avepipe reads what it says: which binary, how a path is passed, the kinds of
:class:`~avepipe.errors.MediaError` a bad input raises, and ffmpeg's stderr split into the input description and the
diagnostics (fatal errors vs tolerated decoder glitches). Shared by :mod:`avepipe.media.probing` and
:mod:`avepipe.media.decoder`; nothing here starts a decode.

The ffmpeg binary is the system one when ``ffmpeg`` is on PATH, else the static binary shipped by the ``imageio-ffmpeg``
wheel (so ``pip install`` alone is enough).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import dataclass

from avepipe.errors import MediaError


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


def ffmpeg_input(path: str | os.PathLike) -> str:
    """``path`` as ffmpeg must be given a local file: absolute. A relative name with a colon (``10:30 meeting.mp4``,
    ``2024-01-01T10:00:00.mp4``, ``pipe:3.mp4``) would be read by ffmpeg as ``<protocol>:<rest>`` (another file, a
    file descriptor, a network URL); an absolute path starts with ``/`` and is always the file protocol."""
    return os.path.abspath(os.fspath(path))


def _without_path(text: str, path: str) -> str:
    return text.replace(ffmpeg_input(path), "").replace(path, "")


@dataclass(frozen=True)
class FfmpegReport:
    """ffmpeg's stderr split into the input description (the lines that state container and stream facts) and the
    diagnostics (everything outside the Input/Output/Stream-mapping dump: warnings and errors).

    ffmpeg prints the file's metadata (title, comment, any tag, verbatim, newlines included) inside that dump, so a tag
    such as ``comment="Duration: 00:02:00.00"`` or ``"partial file"`` reads like ffmpeg's own words. Here every
    ``Metadata:`` / ``Side data:`` block is dropped with all its lines (its entries, and the continuation lines of a
    multi-line value, are indented deeper than its header), and the input's name is replaced by ``<input>`` (a file name
    may hold a newline too): what is left of the dump is ffmpeg's own structure, and only its ``Duration:`` and
    ``Stream #0:N`` lines are read. The static ffmpeg that imageio-ffmpeg ships has no ffprobe, so this description
    is the one probe every install has; the packet facts (frame count, where the streams end) come from the
    machine-readable framecrc lines of :func:`avepipe.media.probing.index`."""

    structure: tuple[str, ...]
    diagnostics: tuple[str, ...]

    @property
    def diagnostic_text(self) -> str:
        return "\n".join(self.diagnostics)


INPUT_TOKEN = "<input>"
_DUMP_STARTS = ("Input #", "Output #", "Stream mapping:")
_SKIPPED_BLOCKS = ("Metadata:", "Side data:")


def split_report(stderr: str, path: str) -> FfmpegReport:
    text = stderr.replace(ffmpeg_input(path), INPUT_TOKEN)
    if path:
        text = text.replace(path, INPUT_TOKEN)
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
    return FfmpegReport(tuple(structure), tuple(diagnostics))


# ffmpeg messages that mean the stream is cut off or unreadable (ffmpeg may still exit 0 after printing them).
# Glitches such as "error while decoding MB" are tolerated: the video is still usable.
_FATAL_MARKERS = ("partial file", "invalid data found", "moov atom not found", "error submitting packet", "truncated")


def fatal_error(stderr: str) -> str | None:
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


def last_error(stderr: str, path: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("frame=", "size="))]
    return _without_path(lines[-1], path).replace(INPUT_TOKEN, "").strip(" :'") if lines else ""
