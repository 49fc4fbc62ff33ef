"""VGG-19 and VGGish on one device, with the identity of their weights: loaded once, used for every video.

The feature spec recorded in a cache (:meth:`Backbones.spec`) names the sampling, the layers and the weights' checksums;
a cache refuses a run whose spec differs. :meth:`Backbones.visual_async` is the GPU path of ``extract``: uint8 frames
from a pinned host buffer go to the device without blocking, and the per-second features come back into pinned host
memory without a synchronising ``.cpu()``; the caller waits on the returned handle only when it needs the numbers.

Before anything is loaded, :func:`check_weight_files` looks for every file the run needs (VGG-19, VGGish, the PCA
parameters) and raises one :class:`~avepipe.errors.WeightsError` naming all the missing ones, so a user fixes them in
one go. Callers that may have nothing to extract (``extract`` and ``localize`` on cached videos) construct
:class:`Backbones` only once they know there is work.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avepipe.backbones import vggish as vggish_mod
from avepipe.backbones import weights as weights_mod
from avepipe.backbones.vgg19 import load_vgg19
from avepipe.devices import exact_fp32, native_bf16
from avepipe.errors import UsageError, WeightsError
from avepipe.sampling import FRAMES_PER_SECOND
from avepipe.settings import BackboneConfig
from avepipe.version import __version__

SPEC_VERSION = 1
POOL5_SHAPE = (7, 7, 512)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32. ``auto`` is bf16 only on a GPU that computes bf16 natively (compute
    capability 8.0 and later: A100, H100, L4, RTX 30xx ...); before that (V100, T4) bf16 is emulated and slow, and fp16
    overflows are possible on VGG-19's unscaled 0..255 input, so ``auto`` is fp32 there (``--precision fp16`` asks
    for fp16 explicitly). On the CPU ``auto`` is fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise UsageError(f"--precision {precision}: choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device")
    return table[precision]


@dataclass
class HostResult:
    """Features of one submitted batch, on their way to the host; ``get()`` waits for the device only when called."""

    features: torch.Tensor  # [k, ...] float32, host (pinned on CUDA: written by an asynchronous copy)
    done: Any = None  # a CUDA event recorded on the stream of the device that did the work; None on the CPU
    keep: Any = None  # the pinned input of the upload, alive until the copies are done

    def ready(self) -> bool:
        """True when ``get()`` will not wait."""
        return self.done is None or self.done.query()

    def get(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
            self.keep = None
        return self.features.numpy()


def weight_files(config: BackboneConfig, visual: bool = True) -> dict[str, Path]:
    """The files a run with ``config`` reads: ``{option: path}`` for VGG-19 (``visual``), VGGish and the PCA parameters
    (``config.pca``); ``random`` weights need no file."""
    files = {}
    if visual and config.vgg19_weights != weights_mod.RANDOM:
        files["--vgg19-weights"] = Path(config.vgg19_weights or weights_mod.default_path("vgg19"))
    if config.vggish_weights != weights_mod.RANDOM:
        files["--vggish-weights"] = Path(config.vggish_weights or weights_mod.default_path("vggish"))
    if config.pca:
        files["--pca-params"] = Path(config.pca_params or weights_mod.default_path("vggish_pca"))
    return files


_WHAT = {"--vgg19-weights": "VGG-19 weights", "--vggish-weights": "VGGish weights",
         "--pca-params": "VGGish PCA parameters"}


def check_weight_files(config: BackboneConfig, visual: bool = True) -> None:
    """Raise one :class:`~avepipe.errors.WeightsError` naming every weights file of ``config`` that is missing (one
    line: ``<file>: VGG-19 weights not found; <file>: VGGish weights not found (what to do)``)."""
    missing = {option: path for option, path in weight_files(config, visual).items() if not path.is_file()}
    if not missing:
        return
    found = "; ".join(f"{path}: {_WHAT[option]} not found" for option, path in missing.items())
    options = " / ".join(f"{option} FILE" for option in missing)
    hint = f"run `avepipe weights download` or pass {options}"
    if "--vggish-weights" in missing:
        hint += ("; --vggish-weights random tries the pipeline with audio features that are NOT the published "
                 "ones")
    raise WeightsError(f"{found} ({hint})")


class Backbones:
    """VGG-19 and VGGish on one device, with the weights' identities. Constructing one loads them (seconds): do it
    only when there is something to extract."""

    def __init__(self, config: BackboneConfig, device: torch.device, visual: bool = True):
        if device.type == "cuda" and device.index is None:  # "cuda": the current device, named once for all
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.config = config
        self.autocast = resolve_precision(config.precision, device)
        if device.type == "cuda":
            exact_fp32()  # no TF32: float32 work (VGGish always, VGG-19 with --precision fp32) is float32
        check_weight_files(config, visual)  # every missing file in one message, before seconds of loading
        self.vggish, self.vggish_info, self.pca_info = self._load_vggish(config, device)
        self.vggish.eval()
        if not visual:  # audio only (a CML audio query): VGG-19 is not loaded at all
            self.vgg19, self.vgg19_info = None, None
            return
        if config.vgg19_weights == weights_mod.RANDOM:  # benchmarks only: speed does not depend on the values
            torch.manual_seed(0)
            self.vgg19 = load_vgg19(None, map_location=device)
            self.vgg19_info = weights_mod.identify_tensors("vgg19", weights_mod.RANDOM, self.vgg19.state_dict())
        else:
            vgg_path = Path(config.vgg19_weights) if config.vgg19_weights else weights_mod.default_path("vgg19")
            self.vgg19_info = weights_mod.identify("vgg19", vgg_path)
            try:
                self.vgg19 = load_vgg19(vgg_path, map_location=device)
            except ValueError as exc:  # the loader's format checks
                raise WeightsError(str(exc)) from None
        if device.type == "cuda":
            self.vgg19 = self.vgg19.to(memory_format=torch.channels_last)
        self.vgg19.eval()

    @staticmethod
    def _load_vggish(config: BackboneConfig, device: torch.device):
        pca = None
        pca_info = None
        if config.pca:
            pca_path = Path(config.pca_params) if config.pca_params else weights_mod.default_path("vggish_pca")
            pca_info = weights_mod.identify("vggish_pca", pca_path)
            pca = pca_path
        choice = config.vggish_weights
        if choice == weights_mod.RANDOM:
            state = vggish_mod.make_vggish_state_dict(seed=0)
            info = weights_mod.identify_tensors("vggish", weights_mod.RANDOM, state)
            model = vggish_mod.load_vggish(None, pca)
            model.load_state_dict(state, strict=False)
        else:
            path = Path(choice) if choice else weights_mod.default_path("vggish")
            info = weights_mod.identify("vggish", path)
            try:
                model = vggish_mod.load_vggish(path, pca)
            except ValueError as exc:
                raise WeightsError(str(exc)) from None
        return model.to(device), info, pca_info

    def warnings(self) -> list[str]:
        out = []
        if not self.vggish_info.official:
            out.append(
                f"VGGish weights {self.vggish_info.path} are not the official torchvggish file "
                f"(sha256 {self.vggish_info.sha256[:12]}…): the audio features are NOT the published AVE features"
            )
        if self.vgg19_info is not None and not self.vgg19_info.official:
            out.append(
                f"VGG-19 weights {self.vgg19_info.path} are not the official Keras file: "
                f"the visual features are NOT the published AVE features"
            )
        return out

    def spec(self, sampling: str) -> dict[str, Any]:
        spec = {
            "spec_version": SPEC_VERSION,
            "sampling": sampling,
            "visual": "vgg19-keras-imagenet/block5_pool/mean-of-16",
            "audio": "vggish/pca-uint8" if self.config.pca else "vggish/fc2-relu",
            "vgg19_sha256": self.vgg19_info.sha256,
            "vggish_sha256": self.vggish_info.sha256,
        }
        if self.pca_info is not None:  # PCA parameters change the audio features: caches of other files never mix
            spec["pca_sha256"] = self.pca_info.sha256
        return spec

    def entry_attrs(self, sampling: str) -> dict[str, Any]:
        attrs = {
            "sampling": sampling, "spec_version": SPEC_VERSION,
            "vgg19_weights": self.vgg19_info.path, "vgg19_sha256": self.vgg19_info.sha256,
            "vgg19_official": self.vgg19_info.official,
            "vggish_weights": self.vggish_info.path, "vggish_sha256": self.vggish_info.sha256,
            "vggish_official": self.vggish_info.official,
            "vggish_pca": self.config.pca,
            "precision": "fp32" if self.autocast is None else str(self.autocast).replace("torch.", ""),
            "fp32_math": "ieee",  # float32 work in IEEE float32 (TF32 is switched off on CUDA)
            "device": self.device.type, "avepipe_version": __version__, "torch_version": torch.__version__,
        }
        if self.pca_info is not None:
            attrs.update(pca_sha256=self.pca_info.sha256, pca_official=self.pca_info.official)
        return attrs

    def _autocast(self):
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _on_device(self):
        """The device guard of every CUDA call: pinned allocations, events and the current stream belong to
        ``self.device`` (not to the process's current device, cuda:0 unless someone set it)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def host_buffer(self, seconds: int) -> torch.Tensor:
        """A uint8 ``[seconds, 16, 224, 224, 3]`` host buffer to fill with frames (pinned on CUDA: async copies)."""
        buffer = torch.empty((seconds, FRAMES_PER_SECOND, 224, 224, 3), dtype=torch.uint8)
        if self.device.type != "cuda":
            return buffer
        with self._on_device():
            return buffer.pin_memory()

    def _to_host(self, result: torch.Tensor, keep: Any = None) -> HostResult:
        """Start the copy of a device result into pinned host memory; the returned handle waits for it on demand."""
        if self.device.type != "cuda":
            return HostResult(result)
        host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(result, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the stream the copies and kernels were queued on
        return HostResult(host, event, keep)

    @torch.inference_mode()
    def visual_async(self, frames: torch.Tensor) -> HostResult:
        """uint8 ``[k, 16, 224, 224, 3]`` host frames -> per-second pool5 means ``[k, 7, 7, 512]`` float32.

        On CUDA the copies are asynchronous: ``frames`` may be refilled once the returned result is ``get()``-able
        (the input copy precedes the compute on the same stream, and ``get()`` waits for the output copy)."""
        k = frames.shape[0]
        batch = frames.reshape(-1, *frames.shape[2:])
        with self._on_device():
            if self.device.type == "cuda":
                batch = batch.to(self.device, non_blocking=True)
            with self._autocast():
                pool5 = self.vgg19(batch)
            means = pool5.float().reshape(k, FRAMES_PER_SECOND, *pool5.shape[1:]).mean(dim=1)
            return self._to_host(means)

    def visual(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[k, 16, 224, 224, 3]`` -> per-second pool5 means float32 ``[k, 7, 7, 512]`` (synchronous)."""
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            with self._on_device():
                tensor = tensor.pin_memory()
        return self.visual_async(tensor).get()

    @torch.inference_mode()
    def audio_async(self, examples: np.ndarray) -> HostResult:
        """log-mel examples [T, 96, 64] -> embeddings float32 [T, 128] (VGGish in float32: it is cheap), without
        waiting for the device: the examples go up from pinned memory (a pageable upload would wait for the visual
        batch in flight) and the embeddings come back like the visual features."""
        tensor = torch.from_numpy(np.ascontiguousarray(examples, dtype=np.float32))
        with self._on_device():
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
                batch = tensor.to(self.device, non_blocking=True)
            else:
                batch = tensor
            return self._to_host(self.vggish(batch).float(), keep=tensor)

    def audio(self, examples: np.ndarray) -> np.ndarray:
        """log-mel examples [T, 96, 64] -> embeddings float32 [T, 128] (synchronous)."""
        return self.audio_async(examples).get()
