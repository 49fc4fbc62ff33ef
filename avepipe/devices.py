"""The ``--device`` option, shared by every command that runs a network.

``auto`` is CUDA when torch can use it, else the CPU, and never silently: the CPU choice comes with a
:class:`~avepipe.errors.DeviceWarning` saying why CUDA cannot be used (a torch build without CUDA, no GPU visible,
a driver older than the torch build needs ...), worded for Python (``device='auto'``; the command line shows it as
``--device auto``). Work that is quick on a CPU (evaluating, labelling cached features) resolves the device with
``warn=False``; the warning then comes once, when a backbone is loaded (:func:`warn_cpu_fallback`).
``cuda``/``cuda:N`` on a machine without it is a usage error with the same reason.
"""

from __future__ import annotations

import ctypes
import glob
import os
import warnings

import torch

from avepipe.errors import DeviceWarning, UsageError


class DeviceError(UsageError, ValueError):
    """A ``--device`` this machine cannot run on. Also a ValueError for callers that still catch that (extract)."""


_init_messages: list[str] = []  # what torch said when CUDA failed to initialise (it says so once per process)
_pending_fallback: list[str] = []  # why a quiet `auto` chose the CPU, said by warn_cpu_fallback once


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, keeping torch's one-time warning about a failed CUDA initialisation (e.g. a
    driver too old) for :func:`cuda_unavailable_reason` instead of letting it scroll by."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    for warning in caught:
        text = str(warning.message)
        if "cuda" in text.lower() and not available:
            _init_messages.append(text)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return available


def _driver_cuda_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports (1000 * major + 10 * minor), None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value
    except (OSError, AttributeError):
        return None


def _gpu_device_files() -> list[str]:
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/dxg")  # /dev/dxg: the GPU under WSL 2


def _version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_unavailable_reason() -> str:
    """Why torch cannot use CUDA on this machine, in one phrase (for when :func:`cuda_available` is False)."""
    built = torch.version.cuda
    if not built and getattr(torch.version, "hip", None):
        return f"this ROCm build of torch ({torch.__version__}) finds no usable AMD GPU"
    if not built:
        return (f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch to use "
                "a GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles", "void"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    driver = _driver_cuda_version()
    built_major = int(built.split(".")[0])
    if driver is not None and driver // 1000 < built_major:
        supported = _version_text(driver)
        return (f"the NVIDIA driver supports CUDA up to {supported}, older than the CUDA {built} this torch build "
                f"needs: update the driver or install a torch build for CUDA {supported} (docs/docker.md, "
                "TORCH_INDEX_URL)")
    for message in _init_messages:  # torch's own words: the most specific reason there is
        text = message.split("CUDA initialization:", 1)[-1].strip()
        return f"CUDA failed to initialise: {text.split('. ')[0].strip().rstrip('.')}"
    if not _gpu_device_files():
        return ("no NVIDIA GPU is visible to this process (no /dev/nvidia* device; in Docker pass --gpus, on "
                "Kubernetes request nvidia.com/gpu)")
    if driver is None:
        return ("the NVIDIA driver library libcuda.so.1 cannot be loaded (in a container, the NVIDIA Container Toolkit "
                "provides it)")
    return (f"torch finds no usable CUDA device (driver for CUDA {_version_text(driver)}, torch built for CUDA "
            f"{built})")


def resolve_device(name: str, warn: bool = True) -> torch.device:
    """``auto`` is CUDA when available, else the CPU with a :class:`DeviceWarning` that says why (``warn=False``: kept
    for :func:`warn_cpu_fallback`, for work that is quick on a CPU unless a backbone has to run). Raises
    :class:`DeviceError` for a name torch does not know or a CUDA device this machine does not have."""
    if name == "auto":
        if cuda_available():
            return torch.device("cuda")
        message = f"device='auto' runs on the CPU (far slower than a GPU): {cuda_unavailable_reason()}"
        if warn:
            warnings.warn(DeviceWarning(message), stacklevel=2)
        else:
            _pending_fallback[:] = [message]
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not cuda_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine: {cuda_unavailable_reason()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def warn_cpu_fallback(device: torch.device) -> None:
    """The :class:`DeviceWarning` of a quiet ``auto`` that chose the CPU (see :func:`resolve_device`), once, when the
    slow work (a backbone) starts on ``device``."""
    if device.type == "cpu" and _pending_fallback:
        warnings.warn(DeviceWarning(_pending_fallback.pop()), stacklevel=2)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA compute capability 8.0 and later); before that torch
    emulates it, slowly."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def exact_fp32() -> None:
    """Switch TF32 off for this process: float32 convolutions, matmuls and RNNs on CUDA compute in float32.

    torch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa) by default on Ampere and later GPUs, which moves
    VGG-19's pool5 by ~1e-4 relative and VGGish's embeddings by ~7e-4 (enough to flip PCA's uint8 codes); a cache that
    says ``fp32`` must hold float32 results. Autocast (bf16/fp16) is unaffected."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the per-backend precision settings
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def cuda_rng_states() -> list[torch.Tensor] | None:
    """The CUDA generators' states of every visible device (for a resumable checkpoint), None without CUDA."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def restore_cuda_rng(states: list[torch.Tensor] | None, device: torch.device) -> None:
    """Restore the CUDA generator states a checkpoint saved, for the devices present.

    A run resumed with another set of GPUs (another SLURM allocation, ``CUDA_VISIBLE_DEVICES``) restores the states
    of the devices both runs have, and says once that the rest differ; a run on the CPU needs none of them. Never a
    traceback: torch would raise an IndexError (or a deferred CUDA error an epoch later) for a state without its
    device."""
    if not states or device.type != "cuda":
        return
    present = torch.cuda.device_count()
    for index, state in enumerate(states[:present]):
        torch.cuda.set_rng_state(state, index)
    if len(states) != present:
        warnings.warn(DeviceWarning(
            f"the checkpoint holds the random states of {len(states)} CUDA devices and this run has {present}: "
            f"the states of cuda:0..cuda:{min(len(states), present) - 1} are restored, so dropout on "
            f"{device} draws as in the interrupted run only if it is the same device index"), stacklevel=2)
