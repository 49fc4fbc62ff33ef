"""VGGish backbone: frontend vs. a slow, explicit numpy rendering of the spec; network vs. functional torch ops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avepipe.backbones.logmel import log_mel_spectrogram, resample_to_16k, waveform_to_examples
from avepipe.backbones.vggish import PCAPostprocessor, VGGish, load_vggish, make_vggish_state_dict

SR = 16000


def chirp_with_noise(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Linear chirp 100 Hz -> 7 kHz plus white noise, float32 in [-1, 1]."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * (100.0 * t + (7000.0 - 100.0) * t**2 / (2 * seconds))
    noise = np.random.default_rng(seed).normal(0.0, 0.05, t.shape)
    return (0.6 * np.sin(phase) + noise).clip(-1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# log-mel frontend, reference written out the long way


def reference_log_mel(wave: np.ndarray) -> np.ndarray:
    def htk_mel(hz: float) -> float:
        return 1127.0 * math.log(1.0 + hz / 700.0)

    n_bins = 257
    bin_mels = [htk_mel(8000.0 * k / (n_bins - 1)) for k in range(n_bins)]
    lo, hi = htk_mel(125.0), htk_mel(7500.0)
    edges = [lo + (hi - lo) * i / 65 for i in range(66)]
    weights = np.zeros((n_bins, 64))
    for band in range(64):
        lower, center, upper = edges[band], edges[band + 1], edges[band + 2]
        for k in range(1, n_bins):  # bin 0 (DC) stays zero
            up = (bin_mels[k] - lower) / (center - lower)
            down = (upper - bin_mels[k]) / (upper - center)
            weights[k, band] = max(0.0, min(up, down))

    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / 400) for n in range(400)])
    x = wave.astype(np.float64)
    windowed = []
    for start in range(0, len(x) - 400 + 1, 160):
        windowed.append(x[start : start + 400] * window)
    # Explicit 512-point DFT (the 112 zero-padding samples contribute nothing), as one real matmul per part: per-frame
    # BLAS calls crawl when the CPU is shared.
    angle = 2 * np.pi * np.outer(np.arange(400), np.arange(n_bins)) / 512
    frames = np.array(windowed)
    magnitude = np.hypot(frames @ np.cos(angle), frames @ np.sin(angle))
    return np.log(magnitude @ weights + 0.01)


def test_log_mel_matches_explicit_reference():
    wave = chirp_with_noise(3.5)
    got = log_mel_spectrogram(wave)
    ref = reference_log_mel(wave)
    assert got.dtype == np.float32
    assert got.shape == (1 + (len(wave) - 400) // 160, 64) == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert got.max() - got.min() > 5  # a real spectrogram, not a constant floor


@pytest.mark.parametrize("length, frames", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)])
def test_log_mel_frame_count(length, frames):
    assert log_mel_spectrogram(np.zeros(length, np.float32)).shape == (frames, 64)


def test_silence_is_log_offset():
    np.testing.assert_allclose(log_mel_spectrogram(np.zeros(1000, np.float32)), np.log(0.01), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# framing into 0.96 s examples


def min_samples(t: int) -> int:
    return (96 * t - 1) * 160 + 400


def test_ten_seconds_give_ten_examples():
    wave = chirp_with_noise(10.0)
    examples, padded = waveform_to_examples(wave, SR)
    assert examples.shape == (10, 96, 64) and examples.dtype == np.float32
    assert padded == 0.0
    np.testing.assert_array_equal(examples.reshape(-1, 64), log_mel_spectrogram(wave)[:960])

    exact, padded = waveform_to_examples(wave, SR, num_examples=10)
    assert padded == 0.0
    np.testing.assert_array_equal(exact, examples)

    first3, padded = waveform_to_examples(wave, SR, num_examples=3)
    assert first3.shape == (3, 96, 64) and padded == 0.0
    np.testing.assert_array_equal(first3, examples[:3])


def test_short_audio_is_zero_padded_to_the_minimum_length():
    wave = chirp_with_noise(2.5)  # 40000 samples: 2 whole examples
    assert waveform_to_examples(wave, SR)[0].shape == (2, 96, 64)
    examples, padded = waveform_to_examples(wave, SR, num_examples=4)
    assert examples.shape == (4, 96, 64)
    assert padded == pytest.approx((min_samples(4) - 40000) / SR)
    unpadded = waveform_to_examples(wave, SR)[0]
    np.testing.assert_array_equal(examples[:2], unpadded)
    # Example 3 covers frames 288..383, which start at sample 46080 > 40000: pure zero padding.
    np.testing.assert_allclose(examples[3], np.log(0.01), rtol=1e-6)


def test_padding_boundary_is_exact():
    wave = chirp_with_noise(4.0)
    exact = wave[: min_samples(3)]
    examples, padded = waveform_to_examples(exact, SR, num_examples=3)
    assert examples.shape == (3, 96, 64) and padded == 0.0
    assert waveform_to_examples(exact[:-1], SR)[0].shape == (2, 96, 64)
    examples, padded = waveform_to_examples(exact[:-1], SR, num_examples=3)
    assert examples.shape == (3, 96, 64) and padded == pytest.approx(1 / SR)


@pytest.mark.parametrize("length, rate", [(100, SR), (2, 44100), (0, 48000)])
def test_too_short_for_one_frame_still_gives_examples(length, rate):
    wave = np.full(length, 0.1, np.float32)
    assert waveform_to_examples(wave, rate)[0].shape == (0, 96, 64)
    examples, padded = waveform_to_examples(wave, rate, num_examples=2)
    assert examples.shape == (2, 96, 64)
    samples_16k = int(length * SR / rate)
    assert padded == pytest.approx((min_samples(2) - samples_16k) / SR)


def test_other_rates_frame_the_same_duration():
    t = np.arange(3 * 44100) / 44100
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert waveform_to_examples(wave, 44100)[0].shape == (3, 96, 64)
    examples, padded = waveform_to_examples(wave, 44100, num_examples=3)
    assert examples.shape == (3, 96, 64) and padded == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# resampling


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resample_keeps_length_and_frequency(rate):
    freq, seconds = 1000.0, 2.0
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    out = resample_to_16k(wave, rate)
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == int(len(wave) * SR / rate) == 32000
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum) * SR / len(out)
    assert abs(peak_hz - freq) <= SR / len(out)
    middle = out[1000:-1000]  # away from the filter's edge transients
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_resample_is_identity_at_16k():
    wave = chirp_with_noise(0.5)
    np.testing.assert_array_equal(resample_to_16k(wave, SR), wave)


# ---------------------------------------------------------------------------------------------------------------------
# network


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    return make_vggish_state_dict(seed=0)


@pytest.fixture(scope="module")
def weights_file(random_state, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(random_state, path)
    return path


@pytest.fixture(scope="module")
def model(weights_file) -> VGGish:
    return load_vggish(weights_file)


@pytest.fixture(scope="module")
def examples() -> torch.Tensor:
    return torch.from_numpy(waveform_to_examples(chirp_with_noise(2.0), SR)[0])


def reference_forward(state: dict[str, torch.Tensor], example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding with the TF (H, W, C) flatten, embedding with torch's (C, H, W) flatten) of one [96, 64] example."""
    x = example.reshape(1, 1, 96, 64).float()
    for i, pool in ((0, True), (3, True), (6, False), (8, True), (11, False), (13, True)):
        x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
        if pool:
            x = F.max_pool2d(x, 2, 2)
    assert x.shape == (1, 512, 6, 4)
    outputs = []
    for flat in (x.permute(0, 2, 3, 1).reshape(1, -1), x.reshape(1, -1)):
        for i in (0, 2, 4):
            flat = F.relu(F.linear(flat, state[f"embeddings.{i}.weight"], state[f"embeddings.{i}.bias"]))
        outputs.append(flat[0])
    return outputs[0], outputs[1]


def test_state_dict_has_the_torchvggish_keys(random_state):
    keys = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")]
    keys += [f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert sorted(random_state) == sorted(keys)
    assert random_state["embeddings.0.weight"].shape == (4096, 12288)
    with torch.device("meta"):
        assert sorted(VGGish().state_dict()) == sorted(keys)
    assert torch.equal(make_vggish_state_dict(seed=0)["features.0.weight"], random_state["features.0.weight"])


def test_forward_matches_functional_reference(model, random_state, examples):
    with torch.no_grad():
        got = model(examples[:1])
        ref, wrong_order = reference_forward(random_state, examples[0])
    assert got.shape == (1, 128) and got.dtype == torch.float32
    assert (ref > 0).sum() > 10  # the comparison is not between two vectors of zeros
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=0)
    assert (wrong_order - ref).abs().max() > 1e-2  # the flatten order is visible in the output


def test_forward_accepts_channel_axis_and_batches(model, examples):
    with torch.no_grad():
        batched = model(examples.unsqueeze(1))  # [2, 1, 96, 64]
        single = model(examples[1:2])  # [1, 96, 64]
    assert batched.shape == (2, 128)
    assert not torch.allclose(batched[0], batched[1])
    torch.testing.assert_close(single[0], batched[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="96, 64"):
        model(torch.zeros(1, 64, 96))


def constant_state(prefix: str = "") -> dict[str, torch.Tensor]:
    """Full-shape state dict of stride-0 constants: each key is tagged by its value, and the file stays tiny."""
    with torch.device("meta"):  # shapes only: skip the random init of 72M parameters
        shapes = {k: v.shape for k, v in VGGish().state_dict().items()}
    return {prefix + k: torch.tensor(float(i)).expand(shape) for i, (k, shape) in enumerate(sorted(shapes.items()))}


def test_prefixed_keys_and_pproc_entries_are_accepted(tmp_path):
    state = constant_state("module.")
    state["module.pproc._pca_matrix"] = torch.zeros(128, 128)
    state["module.pproc._pca_means"] = torch.zeros(128, 1)
    path = tmp_path / "wrapped.pth"
    torch.save(state, path)
    loaded = load_vggish(path).state_dict()
    for i, name in enumerate(sorted(loaded)):
        assert torch.all(loaded[name] == float(i)), name


def test_missing_key_names_the_file(tmp_path):
    state = constant_state()
    del state["embeddings.2.bias"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_vggish(path)
    message = str(info.value)
    assert str(path) in message and "embeddings.2.bias" in message and "\n" not in message


def test_unexpected_key_and_bad_shape_name_the_file(tmp_path):
    state = constant_state()
    state["classifier.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="classifier.weight") as info:
        load_vggish(path)
    assert str(path) in str(info.value)

    state = constant_state()
    state["features.3.weight"] = torch.zeros(()).expand(128, 64, 5, 5)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.3\.weight.*\(128, 64, 5, 5\)") as info:
        load_vggish(path)
    assert str(path) in str(info.value)


def test_unreadable_or_absent_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_vggish(path)
    with pytest.raises(ValueError, match="absent.pth"):
        load_vggish(tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------------------------------------
# PCA postprocessing


def test_quantisation_truncates_and_clips():
    pca = PCAPostprocessor(np.eye(128), np.zeros(128))
    values = torch.tensor([-5.0, -2.0, -1.0, 0.0, 1.0, 1.999, 2.0, 7.0])
    emb = torch.zeros(len(values), 128)
    emb[:, 0] = values
    got = pca(emb)[:, 0]
    # (clip(v, -2, 2) + 2) * 63.75, truncated: -1 -> 63.75 -> 63, 0 -> 127.5 -> 127, 1 -> 191.25 -> 191
    assert got.tolist() == [0.0, 0.0, 63.0, 127.0, 191.0, 254.0, 255.0, 255.0]
    assert got.dtype == torch.float32


def upstream_postprocess(emb: np.ndarray, eigen: np.ndarray, means: np.ndarray) -> np.ndarray:
    """AudioSet ``Postprocessor.postprocess`` written out in numpy."""
    pca_applied = np.dot(eigen, (emb.T - means.reshape(-1, 1))).T
    clipped = np.clip(pca_applied, -2.0, 2.0)
    return ((clipped + 2.0) * (255.0 / 4.0)).astype(np.uint8)


def test_pca_matches_upstream_formula_on_real_params(weights_dir):
    path = weights_dir / "vggish_pca_params.npz"
    with np.load(path) as params:
        eigen, means = params["pca_eigen_vectors"], params["pca_means"]
    rng = np.random.default_rng(3)
    emb = np.maximum(rng.normal(0.3, 0.6, (64, 128)), 0.0).astype(np.float32)  # ReLU outputs, like fc2
    emb[0] *= 40  # push some components past the clip
    got = PCAPostprocessor.from_npz(path)(torch.from_numpy(emb)).numpy()
    ref = upstream_postprocess(emb, eigen, means)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 100


def test_load_vggish_applies_pca(weights_file, model, examples, weights_dir):
    pca_path = weights_dir / "vggish_pca_params.npz"
    with_pca = load_vggish(weights_file, pca_path)
    with torch.no_grad():
        got = with_pca(examples[:1])
        ref = PCAPostprocessor.from_npz(pca_path)(model(examples[:1]))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert sorted(with_pca.state_dict()) == sorted(model.state_dict())  # PCA buffers stay out of the state dict


def test_pca_file_problems_name_the_file(tmp_path):
    path = tmp_path / "bad_pca.npz"
    np.savez(path, pca_means=np.zeros(128))
    with pytest.raises(ValueError, match="bad_pca.npz.*pca_eigen_vectors"):
        PCAPostprocessor.from_npz(path)
    np.savez(path, pca_means=np.zeros(64), pca_eigen_vectors=np.eye(128))
    with pytest.raises(ValueError, match="bad_pca.npz"):
        PCAPostprocessor.from_npz(path)
