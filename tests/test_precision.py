"""`--precision` on the CPU: fp16 is a usage error without CUDA; bf16 autocast stays within the documented drift of
fp32 (docs/features.md: under 1 %) on a tiny input through a random-weight VGG-19."""

from __future__ import annotations

import pytest
import torch

from avepipe.backbones import weights as weights_mod
from avepipe.backbones.extractor import Backbones, resolve_precision
from avepipe.errors import UsageError
from avepipe.settings import ExtractConfig
from tests.helpers import run_cli


def test_fp16_without_cuda_is_a_usage_error(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="choose auto"):
        resolve_precision("fp64", cpu)
    result = run_cli("extract", tmp_path / "clip.mp4", "--cache", tmp_path / "c.h5", "--precision", "fp16",
                     "--device", "cpu", "--vgg19-weights", "random", "--vggish-weights", "random")
    assert result.returncode == 2 and "fp16 needs a CUDA device" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "c.h5").exists()
    if torch.cuda.is_available():  # the CUDA part: there fp16 and auto (bf16) are accepted
        cuda = torch.device("cuda")
        assert resolve_precision("fp16", cuda) is torch.float16 and resolve_precision("auto", cuda) is torch.bfloat16


def test_bf16_autocast_on_cpu_stays_within_the_documented_drift():
    config = ExtractConfig(vgg19_weights=weights_mod.RANDOM, vggish_weights=weights_mod.RANDOM, precision="bf16",
                           device="cpu")
    backbones = Backbones(config, torch.device("cpu"))
    assert backbones.autocast is torch.bfloat16
    frames = torch.randint(0, 256, (2, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.inference_mode():
        reference = backbones.vgg19(frames)
        with backbones._autocast():
            inside = backbones.vgg19.features[0](frames.permute(0, 3, 1, 2).float())
            low = backbones.vgg19(frames)
    assert inside.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    assert low.dtype == torch.float32 and low.shape == reference.shape == (2, 2, 2, 512)
    drift = float((low - reference).norm() / reference.norm())
    assert 0 < drift < 0.01, drift
