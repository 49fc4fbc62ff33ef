"""Cost of the decode stage against the decode bound, measured in the same run.

    python bench/decode_cost.py [--repeats 3] [--parallel-clips 16 --workers 2]

1. Per clip (a 10-s 720p h264 cut of bbb.mp4 with an edit list, a 1080p h264 clip, an MPEG-4/MP3 AVI), one process:
   the whole decode stage of one video (``avepipe.decode.decode_file``: index pass, one decode of video and audio,
   frame selection + OpenCV resize, resampling to 16 kHz, log-mel) against bare ``ffmpeg -threads 1 -i CLIP -vf
   scale=224:224 -f rawvideo -pix_fmt rgb24 -`` (video only, every frame scaled). Medians of --repeats, after one
   warm-up call (what a long-running decode process pays once).
2. ``avepipe decode`` of N ten-second 720p clips with W worker processes (wall time, into a fresh store) against W
   parallel bare ffmpeg processes on the same clips: in-process (``run_decode``) and as the command (process start,
   store writes and compaction included), with the store's size per second of video.
Prints seconds and ratios (stage / bound).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline import bare_decode, bound_seconds, cut  # noqa: E402

from avepipe.decode import SECOND_BYTES, decode_file  # noqa: E402
from avepipe.decoded import run_decode  # noqa: E402
from avepipe.settings import ExtractConfig  # noqa: E402


def make_clips(source: Path, folder: Path) -> dict[str, Path]:
    return {
        "720p h264 (stream-copied cut, edit list)": cut(source, folder / "c720.mp4", 60, 10, ["-c", "copy"]),
        "1080p h264": cut(source, folder / "c1080.mp4", 100, 10, ["-vf", "scale=1920:1080", "-c:v", "libx264",
                                                                  "-preset", "veryfast", "-c:a", "copy"]),
        "AVI MPEG-4 + MP3": cut(source, folder / "c.avi", 200, 10, ["-c:v", "mpeg4", "-vtag", "XVID", "-q:v", "4",
                                                                    "-c:a", "libmp3lame"]),
    }


def cut_720p(source: Path, folder: Path, count: int) -> list[Path]:
    return [cut(source, folder / f"p720_{i:02d}.mp4", 300 + 20 * i, 10, ["-c", "copy"]) for i in range(count)]


def timed(fn, *args) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parallel-clips", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--source", default=os.path.join(os.environ.get("AVEPIPE_TEST_MEDIA", "../shared/media"),
                                                         "bbb.mp4"))
    parser.add_argument("--clip-dir", default=".bench/decode")
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in a decode worker process

    clips = make_clips(Path(args.source), Path(args.clip_dir))
    decode_file(next(iter(clips.values())))  # warm-up: first-call costs are paid once per process
    print(f"{'clip':44s} {'bare ffmpeg s':>14s} {'decode stage s':>15s} {'ratio':>6s}")
    for label, clip in clips.items():
        bound = statistics.median(timed(bare_decode, clip) for _ in range(args.repeats))
        ours = statistics.median(timed(decode_file, clip) for _ in range(args.repeats))
        print(f"{label:44s} {bound:14.3f} {ours:15.3f} {ours / bound:6.2f}")

    many = cut_720p(Path(args.source), Path(args.clip_dir), args.parallel_clips)
    bound = bound_seconds(many, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        config = ExtractConfig(workers=args.workers, decoder_threads=1)
        start = time.perf_counter()
        report = run_decode(many, Path(tmp) / "frames.h5", config)
        ours = time.perf_counter() - start
    assert len(report.done) == len(many), report.failed
    print(f"avepipe decode (in-process), {len(many)} x 10 s 720p, {args.workers} workers: {ours:.2f} s; "
          f"{args.workers} parallel bare ffmpeg: {bound:.2f} s; ratio {ours / bound:.2f}")

    # The command as a user runs it: process start, store writes, compaction and the final rename included.
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "frames.h5"
        command = [sys.executable, "-m", "avepipe", "decode", *map(str, many), "--out", str(store),
                   "--workers", str(args.workers), "--progress", "none"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        cli = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"avepipe decode failed (exit {done.returncode}): {done.stderr.strip()}")
        seconds = 10 * len(many)
        stored = store.stat().st_size
    print(f"`avepipe decode` command, {len(many)} x 10 s 720p, --workers {args.workers}: {cli:.2f} s, ratio to bare "
          f"ffmpeg {cli / bound:.2f}; store {stored / 1e6:.1f} MB = {stored / seconds / 1e6:.2f} MB per second of "
          f"video (uncompressed frames: {SECOND_BYTES / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
