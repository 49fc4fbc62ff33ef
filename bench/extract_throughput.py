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
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline import bound_seconds, cut  # noqa: E402

from avepipe.backbones.extractor import Backbones, HostResult  # noqa: E402
from avepipe.extract import run_extract  # noqa: E402
from avepipe.sampling import FRAMES_PER_SECOND  # noqa: E402
from avepipe.settings import ExtractConfig  # noqa: E402


def use_null_backbone() -> None:
    """Benchmark only: VGG-19 and VGGish replaced by zero-cost stand-ins, so what is left is decoding, transport,
    batching and cache writes (the part of extract that must stay within 10 % of the decode bound)."""
    import torch

    def visual_async(self, frames):  # noqa: ANN001, ANN202
        return HostResult(torch.zeros((frames.shape[0], 7, 7, 512)))

    def audio_async(self, examples):  # noqa: ANN001, ANN202
        return HostResult(torch.zeros((examples.shape[0], 128)))

    Backbones.visual_async, Backbones.audio_async = visual_async, audio_async


class StandInDevice:
    """A device stand-in for the CPU: one thread runs the submitted batches in order, each taking a fixed time per
    frame (``time.sleep``, which releases the GIL as a GPU kernel leaves the CPU free), and records how long it was
    busy. The fraction of the run it is busy says whether the feed keeps a device that is the bound fed."""

    def __init__(self, seconds_per_frame: float, seconds_per_example: float):
        self.per_frame, self.per_example = seconds_per_frame, seconds_per_example
        self.jobs: queue.Queue = queue.Queue()
        self.busy = 0.0
        self.first: float | None = None
        self.last = 0.0
        threading.Thread(target=self._run, daemon=True, name="stand-in-device").start()

    def _run(self) -> None:
        while True:
            cost, done = self.jobs.get()
            start = time.perf_counter()
            self.first = start if self.first is None else self.first
            time.sleep(cost)
            self.last = time.perf_counter()
            self.busy += self.last - start
            done.set()

    def submit(self, cost: float, shape: tuple[int, ...], wait: bool = False):
        import torch

        done = threading.Event()
        self.jobs.put((cost, done))
        result = StandInResult(torch.zeros(shape), done)
        if wait:  # what a blocking .cpu() does: wait for everything queued before it
            done.wait()
        return result

    def busy_fraction(self) -> float:
        return self.busy / max(self.last - (self.first or 0.0), 1e-9)


class StandInResult(HostResult):
    def __init__(self, features, done: threading.Event):
        super().__init__(features)
        self.event = done

    def ready(self) -> bool:
        return self.event.is_set()

    def get(self):
        self.event.wait()
        return self.features.numpy()


def use_standin_device(device: StandInDevice, blocking_audio: bool) -> None:
    """VGG-19 and VGGish run on ``device``. ``blocking_audio``: VGGish waits for its result at once, as the feed did
    before its audio call became asynchronous (a pageable upload and a ``.cpu()`` that waited for the batch in
    flight)."""
    frames = FRAMES_PER_SECOND

    def visual_async(self, batch):  # noqa: ANN001, ANN202
        return device.submit(batch.shape[0] * frames * device.per_frame, (batch.shape[0], 7, 7, 512))

    def audio_async(self, examples):  # noqa: ANN001, ANN202
        return device.submit(examples.shape[0] * device.per_example, (examples.shape[0], 128), wait=blocking_audio)

    Backbones.visual_async, Backbones.audio_async = visual_async, audio_async


def busy_fraction(clips: list[Path], workers: int, stage_rate: float, seconds: float, blocking_audio: bool,
                  slower: float = 1.5) -> tuple[float, float]:
    """(busy fraction, videos/s) of a stand-in device ``slower`` times slower than the decode stage."""
    video_seconds_per_s = stage_rate * seconds  # what decoding delivers
    per_frame = slower / (video_seconds_per_s * FRAMES_PER_SECOND) * 0.95  # VGG-19: 95 % of the device's work
    per_example = slower / video_seconds_per_s * 0.05  # VGGish: one example per second of video
    device = StandInDevice(per_frame, per_example)
    use_standin_device(device, blocking_audio)
    config = ExtractConfig(device="cpu", workers=workers, vgg19_weights="random", vggish_weights="random",
                           batch_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = run_extract(clips, Path(tmp) / "standin.h5", config)
        wall = time.perf_counter() - start
    assert len(report.done) == len(clips), report.failed
    return device.busy_fraction(), len(clips) / wall


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
    parser.add_argument("--standin-device", action="store_true",
                        help="the CPU proxy for 'the GPU never waits': a stand-in device 1.5x slower than decoding; "
                             "prints the fraction of the run it is busy, with the feed as it was (VGGish blocking) "
                             "and as it is")
    args = parser.parse_args()
    if args.null_backbone:
        use_null_backbone()

    clips = cut_clips(Path(args.source), Path(args.clip_dir), args.clips, args.seconds)
    bound = decode_bound(clips, args.workers)
    stage = decode_stage(clips, args.workers)
    if args.standin_device:
        print(f"clips: {len(clips)} x {args.seconds:.0f} s 720p, decode workers: {args.workers}")
        print(f"decode bound: {bound:.2f} videos/s; decode stage: {stage:.2f} videos/s; stand-in device: 1.5x the "
              f"decode stage's time per video")
        for label, blocking in (("VGGish blocking (the earlier feed)", True), ("VGGish asynchronous", False)):
            fraction, rate = busy_fraction(clips, args.workers, stage, args.seconds, blocking)
            print(f"{label:36s} busy fraction {fraction:.3f}, {rate:.2f} videos/s ({rate / bound:.2f} of the "
                  f"decode bound)")
        return
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
