"""Cold ``avepipe localize`` of one video, as a user runs it: a fresh process, no feature cache.

    python bench/localize_latency.py [--video smpte-2997.mp4] [--device cpu|cuda] [--repeats 3]

The checkpoint is a randomly initialised AVEL at the real dimensions and, unless ``--vgg19-weights`` names the real
file, VGG-19 has random weights too: latency does not depend on the values. Printed against two baselines measured in
the same run: the bare ffmpeg decode of the same video (the floor of any pipeline that must read it) and the start-up of
``avepipe --help`` (Python + imports). Each figure is the median of ``--repeats`` runs.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avepipe.backbones.vggish import make_vggish_state_dict  # noqa: E402
from avepipe.checkpoint import make_checkpoint  # noqa: E402
from avepipe.media import ffmpeg_binary  # noqa: E402
from avepipe.models import build_model  # noqa: E402


def timed(args: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])}...: exit {result.returncode}\n{result.stderr[-2000:]}")
    return elapsed


def median_of(repeats: int, args: list[str], env: dict[str, str] | None = None) -> float:
    return statistics.median(timed(args, env) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    media = os.environ.get("AVEPIPE_TEST_MEDIA", "../shared/media")
    parser.add_argument("--video", default=os.path.join(media, "smpte-2997.mp4"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vgg19-weights", default="random")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = build_model("avel", "supervised")
        checkpoint = tmp / "avel.pt"
        torch.save(make_checkpoint(model, name="avel", task="supervised", direction=None,
                                   config={"model": {}, "train": {}}, class_names=[f"c{i}" for i in range(28)]
                                   + ["background"], feature_spec={}, metrics={}, seed=0), checkpoint)
        vggish = tmp / "vggish.pth"
        torch.save(make_vggish_state_dict(seed=0), vggish)

        decode = median_of(args.repeats, [ffmpeg_binary(), "-loglevel", "error", "-i", args.video, "-f", "rawvideo",
                                          "-pix_fmt", "rgb24", "-y", os.devnull])
        startup = median_of(args.repeats, [sys.executable, "-m", "avepipe", "--help"])
        localize = median_of(args.repeats, [
            sys.executable, "-m", "avepipe", "localize", args.video, "--checkpoint", str(checkpoint), "--device",
            args.device, "--vgg19-weights", args.vgg19_weights, "--vggish-weights", str(vggish), "--format", "json",
            "--out", str(tmp / "labels.json"),
        ])
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"video: {args.video}, device: {device}, cpus: {os.cpu_count()}, median of {args.repeats}")
    print(f"ffmpeg decode of the video (floor):        {decode:6.2f} s")
    print(f"avepipe --help (Python + imports):         {startup:6.2f} s")
    print(f"cold avepipe localize (decode + models):   {localize:6.2f} s")
    print(f"ratio localize / decode: {localize / decode:.1f}   localize / start-up: {localize / startup:.1f}")


if __name__ == "__main__":
    main()
