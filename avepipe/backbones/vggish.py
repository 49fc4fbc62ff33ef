"""VGGish audio backbone: Google's log-mel frontend in numpy and the torchvggish network in torch.

The frontend follows ``vggish_input`` / ``mel_features`` of the AudioSet release (16 kHz, 25 ms periodic-Hann frames
every 10 ms, 64 HTK mel bands over 125-7500 Hz, ``log(mel + 0.01)``, 0.96 s examples of 96 frames). The network keeps
the torchvggish module layout so its released ``.pth`` state dict loads as is. The default output is the 128-d "fc2"
layer after its ReLU; the PCA / 8-bit quantisation of the AudioSet embeddings is optional (:class:`PCAPostprocessor`).
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
EMBEDDING_SIZE = 128
PCA_CLIP = 2.0  # quantisation range [-2, 2] -> 0..255

# (index in ``features``, in channels, out channels, followed by a 2x2 max-pool)
_CONVS = ((0, 1, 64, True), (3, 64, 128, True), (6, 128, 256, False), (8, 256, 256, True),
          (11, 256, 512, False), (13, 512, 512, True))  # fmt: skip
_FC = ((0, 512 * 6 * 4, 4096), (2, 4096, 4096), (4, 4096, EMBEDDING_SIZE))  # (index in ``embeddings``, in, out)
_MODEL_PARTS = ("features", "embeddings")
_IGNORED_PARTS = ("pproc",)  # torchvggish's full model also saves its PCA postprocessor


# -- frontend ----------------------------------------------------------------------------------------------------------

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


# -- network -----------------------------------------------------------------------------------------------------------

class PCAPostprocessor(nn.Module):
    """AudioSet embedding postprocessing: PCA, clip to [-2, 2], 8-bit quantisation (returned as float 0..255).

    The parameters are non-persistent float64 buffers, so a VGGish state dict stays in the torchvggish format and the
    truncation to integers sees the same values as upstream's float64 numpy code.
    """

    def __init__(self, eigen_vectors: np.ndarray | torch.Tensor, means: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        eigen = torch.as_tensor(np.asarray(eigen_vectors), dtype=torch.float64)
        # The released file stores the means as [128]; upstream code reshapes them to [128, 1]. Accept both.
        mean = torch.as_tensor(np.asarray(means), dtype=torch.float64).reshape(-1)
        if eigen.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE) or mean.shape != (EMBEDDING_SIZE,):
            raise ValueError(
                f"PCA parameters have shapes {tuple(eigen.shape)} / {tuple(mean.shape)}, expected (128, 128) / (128,)"
            )
        self.register_buffer("eigen_vectors", eigen, persistent=False)
        self.register_buffer("means", mean, persistent=False)

    @classmethod
    def from_npz(cls, path: str | Path) -> PCAPostprocessor:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: VGGish PCA parameter file not found")
        try:
            with np.load(path) as params:
                arrays = {key: params[key] for key in ("pca_eigen_vectors", "pca_means") if key in params}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
        for key in ("pca_eigen_vectors", "pca_means"):
            if key not in arrays:
                raise ValueError(f"{path}: missing array {key!r}")
        try:
            return cls(arrays["pca_eigen_vectors"], arrays["pca_means"])
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, 128] -> [N, 128] float32 holding integers 0..255."""
        # float64 throughout, as upstream's numpy: values near an integer must truncate the same way.
        pca = (embeddings.to(torch.float64) - self.means.double()) @ self.eigen_vectors.double().T
        quantised = (pca.clamp(-PCA_CLIP, PCA_CLIP) + PCA_CLIP) * (255.0 / (2 * PCA_CLIP))
        return quantised.trunc().float()  # astype(uint8) truncates


class VGGish(nn.Module):
    """torchvggish layout: ``features`` (6 convs, 4 pools) and ``embeddings`` (3 linear layers, each with ReLU)."""

    def __init__(self, postprocess: PCAPostprocessor | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _, cin, cout, pool in _CONVS:
            layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        fcs: list[nn.Module] = []
        for _, fin, fout in _FC:
            fcs += [nn.Linear(fin, fout), nn.ReLU(inplace=True)]
        self.embeddings = nn.Sequential(*fcs)
        self.postprocess = postprocess

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """[N, 96, 64] or [N, 1, 96, 64] log-mel examples -> [N, 128] float32."""
        if examples.ndim == 3:
            examples = examples.unsqueeze(1)
        if examples.ndim != 4 or tuple(examples.shape[1:]) != (1, EXAMPLE_FRAMES, NUM_BANDS):
            raise ValueError(f"VGGish expects examples [N, 96, 64] or [N, 1, 96, 64], got {tuple(examples.shape)}")
        first = self.features[0].weight
        x = self.features(examples.to(device=first.device, dtype=first.dtype))
        # The weights come from TF (NHWC), so the first linear layer expects the (H, W, C) flatten order.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        x = self.embeddings(x).float()
        if self.postprocess is not None:
            x = self.postprocess(x)
        return x


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, cin, cout, _ in _CONVS:
        shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{i}.bias"] = (cout,)
    for i, fin, fout in _FC:
        shapes[f"embeddings.{i}.weight"] = (fout, fin)
        shapes[f"embeddings.{i}.bias"] = (fout,)
    return shapes


def make_vggish_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the torchvggish format (He-scaled so activations neither vanish nor explode)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in _expected_shapes().items():
        std = (2.0 / int(np.prod(shape[1:]))) ** 0.5 if name.endswith(".weight") else 0.01
        state[name] = torch.empty(shape).normal_(0.0, std, generator=gen)
    return state


def _summarise(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _normalise_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes such as ``module.``, drop ``pproc.*`` and check keys and shapes against VGGish."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(raw).__name__}")
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        parts = str(key).split(".")
        start = next((i for i, part in enumerate(parts) if part in _MODEL_PARTS + _IGNORED_PARTS), None)
        if start is None:
            unexpected.append(str(key))
            continue
        if parts[start] in _IGNORED_PARTS:
            continue
        name = ".".join(parts[start:])
        if name in state:
            raise ValueError(f"{path}: two entries map to {name!r} (one is {key!r})")
        state[name] = value
    expected = _expected_shapes()
    unexpected += [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(f"{path}: unexpected keys for VGGish: {_summarise(unexpected)}")
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(f"{path}: missing VGGish keys: {_summarise(missing)}")
    for name, shape in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {name} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, expected {shape}")
    return state


def load_vggish(
    weights_path: str | Path | None,
    pca_params_path: str | Path | None = None,
    map_location: str | torch.device = "cpu",
) -> VGGish:
    """VGGish in eval mode on ``map_location``.

    ``weights_path``: a torchvggish state dict (``None`` keeps torch's random init; benchmarks only).
    ``pca_params_path``: ``vggish_pca_params.npz`` to return quantised PCA embeddings instead of raw fc2 outputs.
    """
    postprocess = PCAPostprocessor.from_npz(pca_params_path) if pca_params_path is not None else None
    if weights_path is None:
        return VGGish(postprocess).to(map_location).eval()
    path = Path(weights_path)
    if not path.is_file():
        raise ValueError(f"{path}: VGGish weight file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, runtime) for unreadable files
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a loadable torch state dict ({message})") from None
    state = _normalise_state_dict(raw, path)
    # Built on the meta device to skip the random init of 72M parameters (about a second) that the weights replace.
    with torch.device("meta"):
        model = VGGish()
    model = model.to_empty(device="cpu")
    model.load_state_dict(state)
    model.postprocess = postprocess  # attached after to_empty, which would have wiped its buffers
    return model.to(map_location).eval()
