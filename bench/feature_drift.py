"""How far the faster modes move the features from the AVE-compatible float32 reference, on real clips.

    python bench/feature_drift.py [--clips fire2.mp4 sample_1s.mp4 chaplin.mp4] [--device cpu|cuda]

Compares, per clip, the per-second visual features of: ``--sampling fps`` (ffmpeg fps=16 + its bilinear scaler) and
bf16 / fp16 autocast against ``ave`` sampling in float32, all with the same real VGG-19 weights. Prints the mean
relative difference (|a-b| summed / |a| summed) and the worst per-second relative L2 difference.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avepipe import media  # noqa: E402
from avepipe.backbones import weights  # noqa: E402
from avepipe.backbones.vgg19 import load_vgg19  # noqa: E402
from avepipe.decode import decode_file  # noqa: E402


def visual(model, frames: np.ndarray, device: torch.device, dtype: torch.dtype | None) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for second in frames:
            batch = torch.from_numpy(second).to(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(model(batch).float().mean(0).cpu().numpy())
    return np.stack(out)


def tf32_emulated(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose convolutions see TF32 operands (10-bit mantissa), as cuDNN's default on Ampere and
    later GPUs computes float32 convolutions: what ``--precision fp32`` would give with TF32 left on."""
    from tests.fake_cuda import to_tf32

    emulated = copy.deepcopy(model)
    for module in emulated.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = to_tf32(module.weight.data)
            module.register_forward_pre_hook(lambda m, args: (to_tf32(args[0]),))
    return emulated


def drift(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    mean_rel = float(np.abs(ref - other).sum() / np.abs(ref).sum())
    flat_ref, flat_diff = ref.reshape(len(ref), -1), (ref - other).reshape(len(ref), -1)
    per_second = np.linalg.norm(flat_diff, axis=1) / np.linalg.norm(flat_ref, axis=1)
    return mean_rel, float(per_second.max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", nargs="+", default=["fire2.mp4", "sample_1s.mp4", "chaplin.mp4"])
    parser.add_argument("--media", default=os.environ.get("AVEPIPE_TEST_MEDIA", "../shared/media"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vgg19-weights", default=str(weights.default_path("vgg19")))
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_vgg19(args.vgg19_weights, map_location=device)
    precisions = {"bf16": torch.bfloat16} | ({"fp16": torch.float16} if device.type == "cuda" else {})
    print(f"device {device}; reference: sampling=ave, float32")
    print(f"{'clip':28s} {'variant':16s} {'mean rel diff':>14s} {'worst second (rel L2)':>22s}")
    for name in args.clips:
        info = media.probe(Path(args.media) / name)
        ave = decode_file(info.path, "ave")[0]
        fps = decode_file(info.path, "fps")[0]
        ref = visual(model, ave, device, None)
        rows = {"fps": visual(model, fps, device, None)}
        rows |= {label: visual(model, ave, device, dtype) for label, dtype in precisions.items()}
        if device.type == "cpu":
            rows["tf32 (emulated)"] = visual(tf32_emulated(model), ave, device, None)
        for label, feats in rows.items():
            mean_rel, worst = drift(ref, feats)
            print(f"{name:28s} {label:16s} {mean_rel:14.4%} {worst:22.4%}")


if __name__ == "__main__":
    main()
