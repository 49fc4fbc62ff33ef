"""numpy polyphase resampler vs the real resampy ``kaiser_best`` (numba), on noise and sines, for many rate pairs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import resampy  # a runtime dependency (pyproject): never skipped

from avepipe.backbones import resample as resample_mod
from avepipe.backbones.logmel import log_mel_spectrogram, resample_to_16k, samples_for_examples, waveform_to_examples
from avepipe.backbones.resample import output_length, resample

RATE_PAIRS = [
    (44100, 16000),  # p=160, q=441
    (48000, 16000),  # p=1, q=3
    (22050, 16000),
    (32000, 16000),
    (8000, 16000),  # upsampling: scale 1, no window scaling
    (11025, 16000),  # upsampling with p=640
    (96000, 16000),
    (44056, 16000),  # p=2000, q=5507
    (37800, 16000),
    (16000, 44100),  # upsampling away from 16 kHz
]
LENGTHS = [0, 1, 2, 3, 100, 44100 * 3 + 17]
ATOL = 1e-6


def reference(x: np.ndarray, sr_orig: int, sr_new: int) -> np.ndarray:
    """resampy's output; it refuses inputs that give no output sample, which here means an empty result."""
    if output_length(len(x), sr_orig, sr_new) < 1:
        with pytest.raises(ValueError):
            resampy.resample(x, sr_orig, sr_new, filter="kaiser_best")
        return np.zeros(0)
    return resampy.resample(x, sr_orig, sr_new, filter="kaiser_best")


def signals(length: int, sr: int) -> dict[str, np.ndarray]:
    t = np.arange(length) / sr
    rng = np.random.default_rng(length)
    return {
        "noise": rng.uniform(-1.0, 1.0, length),
        # one tone well inside both bands, one near the 8 kHz Nyquist of 16 kHz (in the filter's transition band)
        "sines": 0.5 * np.sin(2 * np.pi * 440.0 * t + 0.3) + 0.45 * np.sin(2 * np.pi * 7700.0 * t),
    }


@pytest.mark.parametrize("sr_orig, sr_new", RATE_PAIRS)
def test_matches_resampy(sr_orig, sr_new):
    for length in LENGTHS:
        for name, x in signals(length, sr_orig).items():
            got = resample(x, sr_orig, sr_new)
            ref = reference(x, sr_orig, sr_new)
            assert got.dtype == np.float64 and got.shape == ref.shape, (length, name)
            if ref.size:
                diff = np.abs(got - ref).max()
                assert diff < ATOL, f"{sr_orig}->{sr_new} len {length} {name}: max |diff| {diff:.2e}"
    assert np.abs(got).max() > 0.1  # the long signals were compared, not silence


@pytest.mark.parametrize("sr_orig, sr_new", [(44100, 16000), (48000, 16000), (8000, 16000), (44056, 16000)])
def test_num_out_gives_the_prefix(sr_orig, sr_new):
    x = np.random.default_rng(1).uniform(-1.0, 1.0, 5 * sr_orig + 11)
    full = resample(x, sr_orig, sr_new)
    for num_out in (0, 1, 7, 15360, len(full) - 1, len(full), len(full) + 100):
        part = resample(x, sr_orig, sr_new, num_out=num_out)
        assert part.shape == (min(num_out, len(full)),)
        # same products, only possibly split differently among matrix products: equal to rounding
        np.testing.assert_allclose(part, full[:num_out], rtol=0, atol=1e-12)


def test_identity_and_input_dtypes():
    x = np.random.default_rng(2).uniform(-1.0, 1.0, 1000).astype(np.float32)
    same = resample(x, 16000, 16000)
    assert same.dtype == np.float64 and np.array_equal(same, x)
    assert resample(x, 16000, 16000, num_out=10).shape == (10,)
    as64 = resample(x.astype(np.float64), 44100, 16000)
    np.testing.assert_array_equal(resample(x, 44100, 16000), as64)  # float32 converted exactly, block by block
    ints = (x * 1000).astype(np.int16)
    np.testing.assert_array_equal(resample(ints, 44100, 16000), resample(ints.astype(np.float64), 44100, 16000))


def test_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        resample(np.zeros((2, 100)), 44100, 16000)
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(100), 0, 16000)
    with pytest.raises(ValueError, match="num_out"):
        resample(np.zeros(100), 44100, 16000, num_out=-1)
    with pytest.raises(TypeError):
        resample(np.zeros(100), 44100.5, 16000)
    with pytest.raises(TypeError, match="real"):
        resample(np.zeros(100, dtype=complex), 44100, 16000)


def test_missing_resampy_is_a_clear_import_error(monkeypatch):
    resample_mod._filter_table.cache_clear()
    resample_mod._plan.cache_clear()
    monkeypatch.setattr(resample_mod.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(ImportError, match="resampy"):
            resample(np.zeros(1000), 22050, 16000)
    finally:
        monkeypatch.undo()
        resample_mod._filter_table.cache_clear()
    assert resample(np.zeros(1000), 22050, 16000).shape == (725,)


def test_long_input_in_blocks_matches_resampy():
    x = np.random.default_rng(3).uniform(-1.0, 1.0, 48000 * 20 + 5)  # many row blocks
    np.testing.assert_allclose(resample(x, 48000, 16000), reference(x, 48000, 16000), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# VGGish frontend on top of it


@pytest.mark.parametrize("rate", [44100, 48000, 8000])
def test_resample_to_16k_matches_resampy(rate):
    wave = np.random.default_rng(4).uniform(-1.0, 1.0, 2 * rate + 3).astype(np.float32)
    got = resample_to_16k(wave, rate)
    ref = resampy.resample(wave.astype(np.float64), rate, 16000, filter="kaiser_best").astype(np.float32)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    too_short = int(np.ceil(rate / 16000)) - 1  # the most samples that still give no 16 kHz sample
    assert resample_to_16k(wave[:too_short], rate).shape == (0,)
    assert resample_to_16k(wave[: too_short + 1], rate).shape == (output_length(too_short + 1, rate, 16000),) != (0,)
    np.testing.assert_allclose(resample_to_16k(wave, rate, num_out=100), got[:100], rtol=0, atol=1e-7)


@pytest.mark.parametrize("seconds", [1.5, 3.7])
def test_examples_from_the_needed_samples_only(seconds):
    rate, count = 44100, 2
    wave = np.random.default_rng(5).uniform(-0.5, 0.5, int(seconds * rate)).astype(np.float32)
    examples, padded = waveform_to_examples(wave, rate, num_examples=count)
    # what the function did before: resample everything, then cut (or zero-pad) to the samples of ``count`` examples
    full = resampy.resample(wave.astype(np.float64), rate, 16000, filter="kaiser_best").astype(np.float32)
    needed = samples_for_examples(count)
    cut = np.concatenate([full, np.zeros(max(0, needed - len(full)), np.float32)])[:needed]
    expected = log_mel_spectrogram(cut).reshape(count, 96, 64)
    assert examples.shape == (count, 96, 64)
    assert padded == pytest.approx(max(0, needed - len(full)) / 16000)
    np.testing.assert_allclose(examples, expected, rtol=0, atol=1e-4)


def test_no_numba_import():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from avepipe.backbones.resample import resample
        resample(np.random.default_rng(0).uniform(-1, 1, 44100), 44100, 16000)
        assert "numba" not in sys.modules and "resampy" not in sys.modules, "resample imported numba"
        from avepipe.backbones.logmel import waveform_to_examples
        waveform_to_examples(np.zeros(48000, np.float32), 48000, num_examples=1)
        assert "numba" not in sys.modules and "resampy" not in sys.modules, "vggish imported numba"
        """
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
