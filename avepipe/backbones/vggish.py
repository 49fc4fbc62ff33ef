"""VGGish audio backbone: the torchvggish network in torch (its log-mel frontend is avepipe.backbones.logmel).

Input: ``[N, 96, 64]`` log-mel examples (0.96 s each). The network keeps the torchvggish module layout so its released
``.pth`` state dict loads as is. The default output is the 128-d "fc2"
layer after its ReLU; the PCA / 8-bit quantisation of the AudioSet embeddings is optional (:class:`PCAPostprocessor`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from avepipe.backbones.logmel import EXAMPLE_FRAMES, NUM_BANDS

EMBEDDING_SIZE = 128
PCA_CLIP = 2.0  # quantisation range [-2, 2] -> 0..255

# (index in ``features``, in channels, out channels, followed by a 2x2 max-pool)
_CONVS = ((0, 1, 64, True), (3, 64, 128, True), (6, 128, 256, False), (8, 256, 256, True),
          (11, 256, 512, False), (13, 512, 512, True))  # fmt: skip
_FC = ((0, 512 * 6 * 4, 4096), (2, 4096, 4096), (4, 4096, EMBEDDING_SIZE))  # (index in ``embeddings``, in, out)
_MODEL_PARTS = ("features", "embeddings")
_IGNORED_PARTS = ("pproc",)  # torchvggish's full model also saves its PCA postprocessor


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
