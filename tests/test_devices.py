"""``--device``: auto never falls back to the CPU silently (it says why), cuda without a GPU is a usage error."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from avepipe import devices
from avepipe.devices import DeviceError, cuda_unavailable_reason, resolve_device
from avepipe.errors import DeviceWarning
from tests.helpers import run_cli


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where torch cannot use CUDA; each test then sets what is missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_init_messages", [])
    monkeypatch.setattr(devices, "_driver_cuda_version", lambda: None)
    monkeypatch.setattr(devices, "_gpu_device_files", lambda: [])
    return monkeypatch


def auto_warning() -> str:
    with pytest.warns(DeviceWarning) as caught:
        assert resolve_device("auto") == torch.device("cpu")
    assert len(caught) == 1
    message = str(caught[0].message)
    # worded for Python (the command line shows it as --device auto)
    assert message.startswith("device='auto' runs on the CPU (far slower than a GPU): ") and "\n" not in message
    return message


def test_auto_says_why_it_runs_on_the_cpu(no_cuda):
    no_cuda.setattr(torch.version, "cuda", None)
    assert "this torch build (" in auto_warning() and "has no CUDA support" in auto_warning()
    no_cuda.setattr(torch.version, "cuda", "13.0")
    assert "no NVIDIA GPU is visible to this process (no /dev/nvidia* device" in auto_warning()
    no_cuda.setattr(devices, "_gpu_device_files", lambda: ["/dev/nvidia0"])
    assert "libcuda.so.1 cannot be loaded" in auto_warning()
    no_cuda.setattr(devices, "_driver_cuda_version", lambda: 12080)  # CUDA 12.8 driver, CUDA 13.0 wheel
    too_old = "the NVIDIA driver supports CUDA up to 12.8, older than the CUDA 13.0 this torch build needs"
    assert too_old in auto_warning()
    no_cuda.setattr(devices, "_driver_cuda_version", lambda: 13010)
    assert "torch finds no usable CUDA device (driver for CUDA 13.1, torch built for CUDA 13.0)" in auto_warning()
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in auto_warning()


def test_auto_reports_torch_s_own_reason(no_cuda):
    # torch warns once per process when CUDA fails to initialise; the reason must reach the CPU line, not scroll by.
    def is_available():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). "
                      "Please update your GPU driver by downloading and installing a new version.", UserWarning,
                      stacklevel=1)
        return False

    no_cuda.setattr(torch.cuda, "is_available", is_available)
    no_cuda.setattr(devices, "_gpu_device_files", lambda: ["/dev/nvidia0"])
    message = auto_warning()  # exactly one warning: torch's own is folded into it
    assert message.endswith("CUDA failed to initialise: The NVIDIA driver on your system is too old "
                            "(found version 11040)")


def test_auto_on_a_usable_gpu_says_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_a_usable_gpu_is_a_usage_error(no_cuda):
    with pytest.raises(DeviceError, match=r"^--device cuda: CUDA is not available on this machine: no NVIDIA GPU is "
                                          r"visible"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_command_line_prints_one_loud_line_and_exits_2_for_cuda(tmp_path):
    # CUDA_VISIBLE_DEVICES="" makes CUDA unusable on any machine, with or without a GPU.
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # never opened: the device is checked first
    env = {"CUDA_VISIBLE_DEVICES": ""}
    from tests.helpers import make_clip

    real = make_clip(tmp_path / "real.mp4", 1.0, size="64x48")
    auto = run_cli("extract", real, "--cache", tmp_path / "auto.h5", "--vgg19-weights", "random", "--vggish-weights",
                   "random", "--workers", "0", env=env)  # the warning comes once, as the backbones load
    warned = [line for line in auto.stderr.splitlines() if "WARNING: --device" in line]
    assert len(warned) == 1 and "--device auto runs on the CPU" in warned[0], auto.stderr
    expected = cuda_unavailable_reason() if not torch.version.cuda else "CUDA_VISIBLE_DEVICES='' hides every GPU"
    assert warned[0].endswith(expected), (warned, expected)
    assert auto.returncode == 0, auto.stderr  # then the command goes on

    cuda = run_cli("extract", clip, "--cache", tmp_path / "f.h5", "--device", "cuda", env=env)
    lines = [line for line in cuda.stderr.splitlines() if line.strip()]
    assert cuda.returncode == 2 and len(lines) == 1, cuda.stderr
    assert lines[0].startswith("error: --device cuda: CUDA is not available on this machine: ")
    assert not (tmp_path / "f.h5").exists() and not os.path.exists(tmp_path / "f.h5.lock")
