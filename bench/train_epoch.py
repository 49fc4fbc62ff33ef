"""Seconds per training epoch of every registered model on an AVE-sized synthetic feature set.

    python bench/train_epoch.py [--videos 4143] [--device cuda] [--models avel dam ...] [--epochs 2]

The feature set has the released shapes (N x 10 x 7x7x512 visual in float16, N x 10 x 128 audio) and lives on the
device, as `avepipe train` keeps it. For each model and task the first epoch is a warm-up; the next ones are timed.
"Data" is the time spent gathering batches (indexing, dtype conversion), "model" the forward + backward + optimiser
step; the share outside the model is data / epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avepipe.data.features import FeatureTable  # noqa: E402
from avepipe.data.synthetic import make_synthetic_ave  # noqa: E402
from avepipe.data.tasks import RowSet, batch  # noqa: E402
from avepipe.models import build_model, get_spec, model_names  # noqa: E402
from avepipe.train import forward, make_optimizer  # noqa: E402


def synthetic_table(videos: int, device: torch.device) -> tuple[FeatureTable, RowSet]:
    # Generated in slices to bound host memory, then moved to the device once.
    parts = [make_synthetic_ave(min(512, videos - s), seed=s) for s in range(0, videos, 512)]
    visual = torch.cat([p["visual"].half() for p in parts])
    audio = torch.cat([p["audio"] for p in parts])
    mask = torch.ones(videos, 10, dtype=torch.bool)
    table = FeatureTable([f"v{i}" for i in range(videos)], visual, audio, mask, None).to(device)
    rows = RowSet(np.arange(videos), torch.arange(videos), torch.cat([p["labels"] for p in parts]),
                  torch.cat([p["event"] for p in parts]), torch.cat([p["video_label"] for p in parts]), mask).to(device)
    return table, rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch(model, optimizer, table, rows, task, batch_size, device, generator) -> tuple[float, float]:
    model.train()
    order = torch.randperm(len(rows), generator=generator).to(device)
    data_s = model_s = 0.0
    direction = "a2v" if task == "cml" else None
    for start in range(0, len(rows), batch_size):
        t0 = time.perf_counter()
        b = batch(table, rows, order[start : start + batch_size])
        sync(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(forward(model, b, task, direction), b, task)
        loss.backward()
        optimizer.step()
        sync(device)
        t2 = time.perf_counter()
        data_s += t1 - t0
        model_s += t2 - t1
    return data_s, model_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4143)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--batch-size", type=int, default=0, help="0: each model's default")
    args = parser.parse_args()
    device = torch.device(args.device)
    table, rows = synthetic_table(args.videos, device)
    print(f"device {device}; {args.videos} videos x 10 s; visual {tuple(table.visual.shape)} {table.visual.dtype}")
    print(f"{'model':8s} {'task':11s} {'batch':>5s} {'s/epoch':>9s} {'data s':>8s} {'model s':>8s} "
          f"{'outside model':>14s}")
    for name in args.models or model_names():
        spec = get_spec(name)
        for task in spec.tasks:
            torch.manual_seed(0)
            model = build_model(name, task).to(device)
            cfg = spec.default_config.get("train", {})
            optimizer = make_optimizer(model, cfg)
            batch_size = args.batch_size or int(cfg.get("batch_size", 64))
            generator = torch.Generator().manual_seed(0)
            epoch(model, optimizer, table, rows, task, batch_size, device, generator)  # warm-up
            timings = [epoch(model, optimizer, table, rows, task, batch_size, device, generator)
                       for _ in range(args.epochs)]
            data_s = float(np.mean([t[0] for t in timings]))
            model_s = float(np.mean([t[1] for t in timings]))
            total = data_s + model_s
            print(f"{name:8s} {task:11s} {batch_size:5d} {total:9.3f} {data_s:8.3f} {model_s:8.3f} "
                  f"{data_s / total:14.1%}")


if __name__ == "__main__":
    main()
