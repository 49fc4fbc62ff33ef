"""VGGish's log-mel frontend in numpy (no torch): what the decode processes compute for every video.

It follows ``vggish_input`` / ``mel_features`` of the AudioSet release: mono waveform resampled to 16 kHz with
resampy's ``kaiser_best`` filter (:mod:`avepipe.backbones.resample`), 25 ms periodic-Hann frames every 10 ms, 512-point
FFT magnitude, 64 HTK mel bands over 125-7500 Hz, ``log(mel + 0.01)``, non-overlapping 0.96-s examples of 96 frames.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

from avepipe.backbones.resample import resample

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
FFT_LENGTH = 512  # next power of two above the window
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s, non-overlapping


def resample_to_16k(wave: np.ndarray, sample_rate: int, num_out: int | None = None) -> np.ndarray:
    """Mono waveform at ``sample_rate`` -> float32 mono at 16 kHz (resampy ``kaiser_best``, as VGGish does).

    The filter is :func:`avepipe.backbones.resample.resample`, resampy's to within 1e-6 but without numba. ``num_out``:
    only the first ``num_out`` samples (the same values as those of the full output). Audio too short for one sample
    at 16 kHz gives an empty array.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wave.shape}")
    sample_rate = operator.index(sample_rate)
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    if num_out is not None:
        num_out = operator.index(num_out)
        if num_out < 0:
            raise ValueError(f"num_out must be >= 0, got {num_out}")
    if sample_rate == SAMPLE_RATE:
        return wave[:num_out].astype(np.float32, copy=False)
    # float64 like upstream (which resamples wav / 32768.0); only the result is narrowed.
    return resample(wave, sample_rate, SAMPLE_RATE, num_out=num_out).astype(np.float32)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=1)
def mel_matrix() -> np.ndarray:
    """[257, 64] float64 weights from rfft magnitude bins to mel bands (triangles in mel space, DC row zeroed)."""
    bin_mel = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT_LENGTH // 2 + 1))[:, None]
    edges = np.linspace(_hz_to_mel(MEL_MIN_HZ), _hz_to_mel(MEL_MAX_HZ), NUM_BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - lower) / (center - lower)
    falling = (upper - bin_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # upstream drops the DC bin (already 0 here: 0 Hz is below the 125 Hz lower edge)
    weights.flags.writeable = False  # shared through the cache
    return weights


@functools.lru_cache(maxsize=1)
def _periodic_hann() -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW_SAMPLES) / WINDOW_SAMPLES)
    window.flags.writeable = False
    return window


def log_mel_spectrogram(wave16k: np.ndarray) -> np.ndarray:
    """16 kHz mono waveform -> [frames, 64] float32 log-mel, frames = 1 + (len - 400) // 160 (0 when shorter)."""
    wave = np.asarray(wave16k, dtype=np.float64)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono 1-D waveform, got shape {wave.shape}")
    if wave.shape[0] < WINDOW_SAMPLES:
        return np.zeros((0, NUM_BANDS), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(wave, WINDOW_SAMPLES)[::HOP_SAMPLES]
    magnitude = np.abs(np.fft.rfft(frames * _periodic_hann(), n=FFT_LENGTH, axis=1))
    return np.log(magnitude @ mel_matrix() + LOG_OFFSET).astype(np.float32)


def samples_for_examples(num_examples: int) -> int:
    """Fewest 16 kHz samples that give ``num_examples`` whole examples."""
    if num_examples <= 0:
        return 0
    return (EXAMPLE_FRAMES * num_examples - 1) * HOP_SAMPLES + WINDOW_SAMPLES


def waveform_to_examples(
    wave: np.ndarray, sample_rate: int, num_examples: int | None = None
) -> tuple[np.ndarray, float]:
    """Waveform -> ([N, 96, 64] float32 log-mel examples, seconds of zero padding added at the end).

    ``num_examples=None``: every whole example the audio gives. ``num_examples=T``: exactly T; audio too short is
    zero-padded (at 16 kHz) to the minimum length for T examples, longer audio keeps its first T.
    """
    padded_seconds = 0.0
    if num_examples is None:
        wave16 = resample_to_16k(wave, sample_rate)
    else:
        num_examples = operator.index(num_examples)
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        needed = samples_for_examples(num_examples)
        # Only the samples of T examples: the same values as the first ``needed`` of the full resampled audio.
        wave16 = resample_to_16k(wave, sample_rate, num_out=needed)
        if wave16.shape[0] < needed:
            padded_seconds = (needed - wave16.shape[0]) / SAMPLE_RATE
            wave16 = np.concatenate([wave16, np.zeros(needed - wave16.shape[0], dtype=np.float32)])
    log_mel = log_mel_spectrogram(wave16)
    count = log_mel.shape[0] // EXAMPLE_FRAMES
    examples = log_mel[: count * EXAMPLE_FRAMES].reshape(count, EXAMPLE_FRAMES, NUM_BANDS)
    return np.ascontiguousarray(examples), padded_seconds
