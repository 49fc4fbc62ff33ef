"""What the benchmarks measure against, in one place: the decode bound and the clips cut from bbb.mp4.

The decode bound is bare ffmpeg decoding a clip with one thread and scaling every frame to 224x224 RGB into a pipe
that is drained and dropped: no avepipe code at all. Benchmarks run it in the same process tree and the same run as
what they measure and print ratios, so machine speed and load cancel out.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avepipe.media import ffmpeg_binary  # noqa: E402


def bare_decode(clip: Path) -> None:
    proc = subprocess.Popen([ffmpeg_binary(), "-loglevel", "error", "-threads", "1", "-i", str(clip), "-an",
                             "-vf", "scale=224:224", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                            stdout=subprocess.PIPE)
    while proc.stdout.read(1 << 20):
        pass
    proc.wait()


def bound_seconds(clips: list[Path], workers: int) -> float:
    """Wall time of ``workers`` parallel bare decodes over ``clips``."""
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(bare_decode, clips))
    return time.perf_counter() - start


def cut(source: Path, clip: Path, start: float, seconds: float, codec_args: list[str]) -> Path:
    """``clip``: ``seconds`` of ``source`` from ``start``, encoded with ``codec_args`` (kept between runs)."""
    if not clip.exists():
        clip.parent.mkdir(parents=True, exist_ok=True)
        tmp = clip.with_name("tmp-" + clip.name)
        subprocess.run([ffmpeg_binary(), "-y", "-loglevel", "error", "-ss", str(start), "-i", str(source),
                        "-t", str(seconds), *codec_args, str(tmp)], check=True)
        tmp.rename(clip)
    return clip
