"""Throughput of ``avepipe extract`` against the decode bound, measured in the same run.

    python bench/extract_throughput.py --clips 16 --workers 16 [--device cuda] [--vgg19-weights random]

1. Cuts N ten-second 720p clips from bbb.mp4 (``$AVEPIPE_TEST_MEDIA/bbb.mp4``) into --clip-dir (kept between runs).
2. Decode bound: the same clips decoded by bare ffmpeg (all frames, scaled to 224x224, raw RGB to a pipe that is
   drained and dropped), with the same number of parallel processes as extract's workers.
3. ``avepipe extract`` on the same clips into a fresh cache (same workers), timed end to end and without start-up.
Prints videos/s of both and their ratio. Speed does not depend on weight values, so ``--vgg19-weights random`` and
``--vggish-weights random`` (the default here) are fine for timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline import bound_seconds, cut  # noqa: E402

from avepipe.backbones.extractor import Backbones, VisualResult  # noqa: E402
from avepipe.extract import run_extract  # noqa: E402
from avepipe.settings import ExtractConfig  # noqa: E402


def use_null_backbone() -> None:
    """Benchmark only: VGG-19 and VGGish replaced by zero-cost stand-ins, so what is left is decoding, transport,
    batching and cache writes (the part of extract that must stay within 10 % of the decode bound)."""
    import numpy as np
    import torch

    def visual_async(self, frames):  # noqa: ANN001, ANN202
        return VisualResult(torch.zeros((frames.shape[0], 7, 7, 512)))

    def audio(self, examples):  # noqa: ANN001, ANN202
        return np.zeros((examples.shape[0], 128), np.float32)

    Backbones.visual_async, Backbones.audio = visual_async, audio


def cut_clips(source: Path, folder: Path, count: int, seconds: float) -> list[Path]:
    reencode = ["-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac"]
    return [cut(source, folder / f"bbb_{i:03d}.mp4", 30 + 20 * i, seconds, reencode) for i in range(count)]


def decode_bound(clips: list[Path], workers: int) -> float:
    return len(clips) / bound_seconds(clips, workers)


def decode_stage(clips: list[Path], workers: int) -> float:
    """Videos/s of avepipe's decode stage alone (processes, ring, messages; every second released unused): what
    extract adds on top of it is batching, the backbones, transport to the device and cache writes."""
    from avepipe.decode import DecodeSource, Second, VideoTask
    from avepipe.settings import DecodeConfig

    source = DecodeSource([VideoTask(c.stem, str(c)) for c in clips], DecodeConfig(workers=workers))
    start = time.perf_counter()
    for message in source:
        if isinstance(message, Second):
            source.release(message)
    return len(clips) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--sampling", default="ave")
    parser.add_argument("--vgg19-weights", default="random")
    parser.add_argument("--vggish-weights", default="random")
    media = os.environ.get("AVEPIPE_TEST_MEDIA", "../shared/media")
    parser.add_argument("--source", default=os.path.join(media, "bbb.mp4"))
    parser.add_argument("--clip-dir", default=".bench/clips")
    parser.add_argument("--null-backbone", action="store_true", help="zero-cost stand-ins for VGG-19 and VGGish")
    args = parser.parse_args()
    if args.null_backbone:
        use_null_backbone()

    clips = cut_clips(Path(args.source), Path(args.clip_dir), args.clips, args.seconds)
    bound = decode_bound(clips, args.workers)
    stage = decode_stage(clips, args.workers)
    config = ExtractConfig(device=args.device, batch_size=args.batch_size, workers=args.workers,
                           vgg19_weights=args.vgg19_weights, vggish_weights=args.vggish_weights,
                           sampling=args.sampling, precision=args.precision)
    started: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = run_extract(clips, Path(tmp) / "bench.h5", config,
                             lambda event, fields: started.append(time.perf_counter()) if event == "start" else None)
        end = time.perf_counter()
    wall, work = end - start, end - started[0]
    assert len(report.done) == len(clips), report.failed
    ours, ours_work = len(clips) / wall, len(clips) / work
    print(f"clips: {len(clips)} x {args.seconds:.0f} s 720p, workers: {args.workers}, device: {config.device}, "
          f"sampling: {args.sampling}, precision: {args.precision}, null backbone: {args.null_backbone}")
    print(f"decode bound (ffmpeg decode + scale 224, {args.workers} processes): {bound:.2f} videos/s")
    print(f"avepipe extract (model load included):                  {ours:.2f} videos/s")
    print(f"avepipe extract (after start-up: weights loaded, cache opened): {ours_work:.2f} videos/s")
    print(f"avepipe decode stage alone ({args.workers} processes, frames dropped): {stage:.2f} videos/s")
    print(f"ratio extract / decode bound: {ours / bound:.2f} (after start-up: {ours_work / bound:.2f})")
    print(f"ratio extract / decode stage: {ours / stage:.2f} (after start-up: {ours_work / stage:.2f})")


if __name__ == "__main__":
    main()
