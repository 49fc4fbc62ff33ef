"""The ``--device`` option, shared by every command that runs a network."""

from __future__ import annotations

import torch

from avepipe.errors import UsageError


class DeviceError(UsageError, ValueError):
    """A ``--device`` this machine cannot run on. Also a ValueError for callers that still catch that (extract)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU. Raises :class:`DeviceError` for a name torch does not know or a CUDA
    device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device
