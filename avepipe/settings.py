"""Options of the extract stages, below the stages that read them (inputs, decode, backbones, extract).

One dataclass per stage, each field with its default and a comment; :class:`ExtractConfig` is what ``avepipe extract``
and ``avepipe localize`` build from their options and hand down (the decode and backbone stages read only their part).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SAMPLING_MODES = ("ave", "fps")  # ave: the AVE recipe (all frames, OpenCV resize); fps: ffmpeg fps=16 + scale (faster)


def default_workers() -> int:
    """Decode processes when ``--workers`` is not given: one per usable core (decoding is the bound of extraction).
    Cores this process may run on (a cpuset, ``taskset``), not all of the host's; a CPU quota (``docker --cpus``) is
    not visible here: pass ``--workers`` then."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(usable))


@dataclass
class DecodeConfig:
    sampling: str = "ave"  # see SAMPLING_MODES
    workers: int = -1  # decode processes; -1: one per core (default_workers); 0: decode in the calling process
    decoder_threads: int = 0  # ffmpeg decoder threads per process; 0: cores // workers (at least 1)
    stall_seconds: float = 300.0  # a video whose ffmpeg produces nothing for this long is a failure (0: wait forever)


@dataclass
class BackboneConfig:
    device: str = "auto"  # auto: cuda when available
    batch_size: int = 0  # frames per VGG-19 forward; 0: 128 on cuda, 32 on cpu
    vgg19_weights: str | None = None  # default: $AVEPIPE_WEIGHTS_DIR/<manifest file>; "random": benchmarks only
    vggish_weights: str | None = None  # a torchvggish state dict, or "random"
    pca: bool = False  # VGGish PCA + 8-bit quantisation (off in the AVE spec)
    pca_params: str | None = None  # default: $AVEPIPE_WEIGHTS_DIR/<manifest file>
    precision: str = "auto"  # auto: bf16 autocast on a GPU with native bf16 (sm >= 80), else fp32; or fp32/bf16/fp16


@dataclass
class ExtractConfig(DecodeConfig, BackboneConfig):
    shard: tuple[int, int] | None = None  # (k, n): this process takes ids with shard_of(id, n) == k
    retry_failed: bool = False  # extract again the videos recorded under /failed
    checkpoint_seconds: int = 60  # long videos: stage finished seconds every this many (a killed run resumes there)
    from_decoded: str | None = None  # read frames + log-mel from an `avepipe decode` store instead of decoding

    def decode_part(self) -> DecodeConfig:
        return DecodeConfig(sampling=self.sampling, workers=self.workers, decoder_threads=self.decoder_threads,
                            stall_seconds=self.stall_seconds)
