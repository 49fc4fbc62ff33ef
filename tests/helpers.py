"""Small synthetic media files made by the tests with ffmpeg's lavfi sources (no assets needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from avepipe.media import ffmpeg_binary


def make_clip(path: Path, seconds: float = 1.0, *, size: str = "320x240", fps: int = 25, video: bool = True,
              audio: bool = True, channels: int = 2, rate: int = 44100, pattern: str = "testsrc2",
              faststart: bool = False, freq: int = 440, audio_filter: str | None = None,
              audio_codec: str | None = None) -> Path:
    args = [ffmpeg_binary(), "-y", "-hide_banner", "-loglevel", "error"]
    if video:
        args += ["-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
        args += ["-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate={rate}:duration={seconds}",
                 "-af", audio_filter or f"aformat=channel_layouts={layout}"]
    if video:
        args += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "12"] if path.suffix in (".mp4", ".mkv") else []
    if audio and (audio_codec or path.suffix in (".mp4", ".m4a")):
        args += ["-c:a", audio_codec or "aac"]
    if faststart:
        args += ["-movflags", "+faststart"]
    args += ["-t", str(seconds), str(path)]
    subprocess.run(args, check=True)
    return path


def run_cli(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m avepipe ARGS`` the way a user would; wide terminal so rich does not wrap messages."""
    import os
    import sys

    return subprocess.run([sys.executable, "-m", "avepipe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})
