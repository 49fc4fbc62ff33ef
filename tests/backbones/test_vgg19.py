"""VGG-19 pool5 backbone: torch model vs. an explicit numpy computation on the raw Keras arrays."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from avepipe.backbones.vgg19 import VGG19Pool5, keras_vgg19_state_dict, load_vgg19

BLOCKS = ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))  # (block, convs), independent of the module under test


# ---------------------------------------------------------------------------------------------------------------------
# numpy reference, written against the Keras file layout (not against avepipe's conversion)
# keras.applications.imagenet_utils.preprocess_input(mode='caffe'): ImageNet means in B, G, R order, written out here
# rather than imported, so a wrong constant in avepipe cannot pass by changing the reference too.
KERAS_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@pytest.fixture(scope="module")
def keras_arrays(vgg19_weights: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {}
    with h5py.File(vgg19_weights, "r") as f:
        for block, n in BLOCKS:
            for i in range(1, n + 1):
                name = f"block{block}_conv{i}"
                arrays[name] = (f[name][f"{name}_W_1:0"][()], f[name][f"{name}_b_1:0"][()])
    return arrays


def conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """'same' 3x3 cross-correlation of x [H, W, Cin] with a Keras kernel [3, 3, Cin, Cout], as 9 shifted matmuls."""
    h, w, cin = x.shape
    padded = np.zeros((h + 2, w + 2, cin), dtype=x.dtype)
    padded[1:-1, 1:-1] = x
    out = np.zeros((h * w, kernel.shape[3]), dtype=x.dtype)
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + h, dx : dx + w].reshape(h * w, cin) @ kernel[dy, dx].astype(x.dtype)
    return (out + bias).reshape(h, w, -1)


def reference_pool5(frame_rgb: np.ndarray, arrays) -> np.ndarray:
    """Keras VGG-19 block5_pool of one uint8 RGB frame [H, W, 3], in float64."""
    x = frame_rgb[..., ::-1].astype(np.float64) - np.array(KERAS_CAFFE_BGR_MEAN)  # caffe: RGB -> BGR, minus the mean
    for block, n in BLOCKS:
        for i in range(1, n + 1):
            x = np.maximum(conv3x3_same(x, *arrays[f"block{block}_conv{i}"]), 0.0)
        h, w, c = x.shape
        x = x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
    return x


def decode_frame(video: Path, t: float = 2.0) -> np.ndarray:
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-ss", str(t), "-i", str(video),
        "-vf", "scale=224:224", "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:",
    ]  # fmt: skip
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    assert len(raw) == 224 * 224 * 3, f"ffmpeg returned {len(raw)} bytes"
    return np.frombuffer(raw, dtype=np.uint8).reshape(224, 224, 3)


@pytest.fixture(scope="module")
def model(vgg19_weights: Path) -> VGG19Pool5:
    return load_vgg19(vgg19_weights)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------------------------------
# real weights


@pytest.mark.slow
def test_real_frame_matches_numpy_reference(model, keras_arrays, media_dir: Path) -> None:
    # chaplin.mp4 is black and white (R == G == B), so this frame checks weights, padding, pooling and the per-channel
    # means, but not the RGB->BGR swap: test_colour_order_and_mean covers that.
    frame = decode_frame(media_dir / "chaplin.mp4")
    ref = reference_pool5(frame, keras_arrays)
    assert ref.shape == (7, 7, 512) and np.abs(ref).max() > 1.0  # a real image gives non-trivial activations

    with torch.no_grad():
        got = model(torch.from_numpy(frame.copy())[None])
    assert got.dtype == torch.float32 and got.shape == (1, 7, 7, 512)
    got = got[0].numpy().astype(np.float64)
    assert rel_err(got, ref) < 1e-5
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()

    # Float 0..255 input is accepted and means the same thing as uint8.
    with torch.no_grad():
        got_float = model(torch.from_numpy(frame.astype(np.float32))[None])
    np.testing.assert_array_equal(got_float[0].numpy(), got.astype(np.float32))


@pytest.mark.slow
def test_colour_order_and_mean(model, keras_arrays) -> None:
    # A constant frame with distinct R and B: a missing RGB->BGR swap, a wrong mean order, or the mean folded into the
    # first bias (wrong at the zero-padded border) all change pool5.
    frame = np.empty((224, 224, 3), dtype=np.uint8)
    frame[...] = (200, 40, 10)
    ref = reference_pool5(frame, keras_arrays)
    with torch.no_grad():
        got = model(torch.from_numpy(frame)[None])[0].numpy().astype(np.float64)
    assert rel_err(got, ref) < 1e-5

    swapped_ref = reference_pool5(frame[..., ::-1], keras_arrays)
    assert rel_err(swapped_ref, ref) > 1e-2  # the check above can tell the two colour orders apart


@pytest.mark.slow
def test_newer_keras_naming(vgg19_weights: Path, tmp_path: Path) -> None:
    # Re-save the weights with the "<layer>/<layer>/kernel:0" / "bias:0" naming of newer Keras versions.
    newer = tmp_path / "newer.h5"
    with h5py.File(vgg19_weights, "r") as src, h5py.File(newer, "w") as dst:
        for block, n in BLOCKS:
            for i in range(1, n + 1):
                name = f"block{block}_conv{i}"
                dst[f"{name}/{name}/kernel:0"] = src[name][f"{name}_W_1:0"][()]
                dst[f"{name}/{name}/bias:0"] = src[name][f"{name}_b_1:0"][()]
    old_sd, new_sd = keras_vgg19_state_dict(vgg19_weights), keras_vgg19_state_dict(newer)
    assert old_sd.keys() == new_sd.keys() == VGG19Pool5().state_dict().keys()
    for key in old_sd:
        assert torch.equal(old_sd[key], new_sd[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# no assets needed


def test_shape_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    model = load_vgg19(None)
    frames = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(frames)
        assert out.shape == (2, 2, 3, 512) and out.dtype == torch.float32 and out.is_contiguous()

        cl = load_vgg19(None).to(memory_format=torch.channels_last)
        cl.load_state_dict(model.state_dict())
        torch.testing.assert_close(cl(frames), out, rtol=1e-4, atol=1e-4 * out.abs().max().item())

        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(frames)
    assert low.dtype == torch.float32 and low.shape == out.shape
    assert rel_err(low.numpy(), out.numpy()) < 0.1

    with pytest.raises(ValueError, match="RGB frames"):
        model(frames.permute(0, 3, 1, 2))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.h5"
    with pytest.raises(ValueError, match="absent.h5"):
        load_vgg19(path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"this is not an HDF5 file\n" * 100)
    with pytest.raises(ValueError, match=r"weights\.h5.*HDF5"):
        load_vgg19(path)


def test_missing_layer(tmp_path: Path) -> None:
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as f:
        f["block1_conv1/block1_conv1_W_1:0"] = np.zeros((3, 3, 3, 64), np.float32)
        f["block1_conv1/block1_conv1_b_1:0"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match=r"partial\.h5.*block1_conv2"):
        load_vgg19(path)


def test_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "wrong.h5"
    with h5py.File(path, "w") as f:
        f["block1_conv1/block1_conv1_W_1:0"] = np.zeros((3, 3, 3, 32), np.float32)
        f["block1_conv1/block1_conv1_b_1:0"] = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match=r"wrong\.h5.*block1_conv1.*expected"):
        load_vgg19(path)
