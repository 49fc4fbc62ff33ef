"""VGG-19 up to pool5, loaded from the Keras ImageNet weights (the visual backbone of the AVE features).

The released AVE visual features are Keras VGG-19 ``block5_pool`` maps (7x7x512 per 224x224 frame) computed with Keras'
"caffe" preprocessing. This module reproduces that network in torch: the weights are read from the Keras ``.h5`` file
and the preprocessing runs inside :meth:`VGG19Pool5.forward`, so callers pass decoded RGB frames as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

# Keras "caffe" preprocessing: ImageNet channel means in B, G, R order, subtracted from 0..255 BGR pixels (no scaling).
BGR_MEAN = (103.939, 116.779, 123.68)

# (block, number of 3x3 convs, output channels)
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 4, 256), (4, 4, 512), (5, 4, 512))


def _conv_layers() -> list[tuple[str, int, int]]:
    """Keras layer names with their (in, out) channels, in network order."""
    layers, cin = [], 3
    for block, n_convs, cout in _BLOCKS:
        for i in range(1, n_convs + 1):
            layers.append((f"block{block}_conv{i}", cin, cout))
            cin = cout
    return layers


CONV_LAYERS = _conv_layers()


class VGG19Pool5(nn.Module):
    """Keras VGG-19 convolutional part, ``block1_conv1`` .. ``block5_pool``.

    Parameters are named ``features.<keras layer name>.weight`` / ``.bias``.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = 3
        for block, n_convs, cout in _BLOCKS:
            for i in range(1, n_convs + 1):
                layers[f"block{block}_conv{i}"] = nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)
                layers[f"block{block}_relu{i}"] = nn.ReLU(inplace=True)
                cin = cout
            layers[f"block{block}_pool"] = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential(layers)
        # Not persistent: it is a constant of the preprocessing, not a learned weight.
        self.register_buffer("bgr_mean", torch.tensor(BGR_MEAN, dtype=torch.float32), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames``: uint8 (or float 0..255) [N, H, W, 3] RGB -> float32 [N, H/32, W/32, 512] channel-last."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"VGG19Pool5 expects RGB frames [N, H, W, 3], got shape {tuple(frames.shape)}")
        # Preprocessing stays float32 even under autocast (elementwise ops are not autocast); the mean is subtracted
        # from the pixels, never folded into the first bias, because the zero padding would make that inexact.
        # RGB -> BGR by reversing the channel axis.
        x = frames.to(self.bgr_mean.device).flip(-1).float() - self.bgr_mean.float()
        # NHWC -> NCHW as a view: the strides are already channels_last, which is what a channels_last model wants.
        x = self.features(x.permute(0, 3, 1, 2))
        return x.permute(0, 2, 3, 1).float().contiguous()


def _layer_arrays(group: h5py.Group, layer: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Find the kernel and bias datasets of one layer group, whichever Keras naming the file uses.

    Old files: ``block1_conv1/block1_conv1_W_1:0`` and ``..._b_1:0``; newer ones: ``block1_conv1/block1_conv1/kernel:0``
    and ``bias:0``. The layer name itself contains a "b" ("block"), so only the part after it is inspected.
    """
    found: dict[str, np.ndarray] = {}

    def visit(name: str, obj: object) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        base = name.rsplit("/", 1)[-1]
        if base.startswith(layer):
            base = base[len(layer):]
        tokens = set(base.replace(":", "_").split("_"))
        if tokens & {"W", "kernel"}:
            found.setdefault("kernel", obj[()])
        elif tokens & {"b", "bias"}:
            found.setdefault("bias", obj[()])

    group.visititems(visit)
    for kind in ("kernel", "bias"):
        if kind not in found:
            raise ValueError(f"{path}: layer {layer!r} has no {kind} dataset")
    return found["kernel"], found["bias"]


def keras_vgg19_state_dict(weights_path: str | Path) -> dict[str, torch.Tensor]:
    """Convert a Keras VGG-19 (no-top) ``.h5`` weight file into a :class:`VGG19Pool5` state dict."""
    path = Path(weights_path)
    if not path.is_file():
        raise ValueError(f"{path}: VGG-19 weight file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    with f:
        # A full-model save keeps the weights under "model_weights"; a weights-only save has the layers at the root.
        root = f["model_weights"] if "model_weights" in f else f
        for layer, cin, cout in CONV_LAYERS:
            group = root.get(layer)
            if not isinstance(group, h5py.Group):
                raise ValueError(f"{path}: missing layer {layer!r}")
            kernel, bias = _layer_arrays(group, layer, path)
            if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,):
                raise ValueError(
                    f"{path}: layer {layer!r} has kernel {kernel.shape} / bias {bias.shape}, "
                    f"expected {(3, 3, cin, cout)} / {(cout,)}"
                )
            # Keras conv is cross-correlation like torch: only the axis order differs,
            # (kh, kw, in, out) -> (out, in, kh, kw).
            weight = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
            state[f"features.{layer}.weight"] = torch.from_numpy(weight)
            state[f"features.{layer}.bias"] = torch.from_numpy(bias.astype(np.float32))
    return state


def load_vgg19(weights_path: str | Path | None, map_location: str | torch.device = "cpu") -> VGG19Pool5:
    """VGG19Pool5 in eval mode on ``map_location``; ``weights_path=None`` gives random weights (benchmarks only)."""
    model = VGG19Pool5()
    if weights_path is not None:
        model.load_state_dict(keras_vgg19_state_dict(weights_path))
    return model.to(map_location).eval()
