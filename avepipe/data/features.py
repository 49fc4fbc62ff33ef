"""Features of annotated rows, loaded once from a cache into memory (the whole AVE set is ~2 GB in float16).

Rows share a video's features (4,143 AVE rows over 4,097 videos): features are stored once per video and rows index
them. Every sequence is ``seconds`` long (10 for AVE): shorter videos are padded and masked, longer ones are cut.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from avepipe.cache import Entry, FeatureCache
from avepipe.errors import DataError


class MissingFeaturesError(DataError):
    """Annotated videos that have no features in the cache."""


class NonFiniteFeaturesError(DataError):
    """Features holding NaN or inf: training on them gives a NaN loss and a useless checkpoint."""


def check_finite(entry: Entry, cache_path: str | os.PathLike, seconds: int | None = None) -> None:
    """Refuse a video whose features (its first ``seconds``, or all) hold NaN or inf, naming the video."""
    for name in ("visual", "audio"):
        array = getattr(entry, name)[:seconds]
        finite = np.isfinite(array.reshape(len(array), -1)).all(1)  # per second
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise NonFiniteFeaturesError(f"{cache_path}: video {entry.video_id}: NaN or inf in its {name} features "
                                         f"(second {bad}); re-extract it or drop it from the annotations")


@dataclass
class FeatureTable:
    video_ids: list[str]
    visual: torch.Tensor  # [V, S, 7, 7, Dv], float16 by default (halves memory; models compute in float32)
    audio: torch.Tensor  # [V, S, Da] float32
    mask: torch.Tensor  # [V, S] bool, True on real seconds
    spec: dict | None

    def index(self, video_ids: Sequence[str]) -> torch.Tensor:
        position = {vid: i for i, vid in enumerate(self.video_ids)}
        return torch.tensor([position[v] for v in video_ids], dtype=torch.long)

    def to(self, device: torch.device | str) -> "FeatureTable":
        return FeatureTable(self.video_ids, self.visual.to(device), self.audio.to(device), self.mask.to(device),
                            self.spec)


def load_feature_table(cache_path: str | os.PathLike, video_ids: Sequence[str], seconds: int = 10,
                       visual_dtype: torch.dtype = torch.float16) -> FeatureTable:
    """Features of ``video_ids`` (deduplicated, order kept) from one cache. Missing ids raise with a short list."""
    cache = FeatureCache(cache_path, "r")
    unique = list(dict.fromkeys(video_ids))
    available = set(cache.ids())
    missing = [v for v in unique if v not in available]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingFeaturesError(f"{cache_path}: no features for {len(missing)} of {len(unique)} videos ({shown})")
    first = cache.get(unique[0]) if unique else None
    spatial = first.visual.shape[1:] if first is not None else (7, 7, 512)
    audio_dim = first.audio.shape[-1] if first is not None else 128
    visual = torch.zeros((len(unique), seconds, *spatial), dtype=visual_dtype)
    audio = torch.zeros((len(unique), seconds, audio_dim), dtype=torch.float32)
    mask = torch.zeros((len(unique), seconds), dtype=torch.bool)
    for i, entry in enumerate(cache.entries(unique)):
        t = min(seconds, entry.visual.shape[0], entry.audio.shape[0])
        check_finite(entry, cache_path, t)
        visual[i, :t] = torch.from_numpy(np.ascontiguousarray(entry.visual[:t])).to(visual_dtype)
        audio[i, :t] = torch.from_numpy(np.ascontiguousarray(entry.audio[:t]))
        if not torch.isfinite(visual[i, :t]).all():
            raise NonFiniteFeaturesError(f"{cache_path}: video {entry.video_id}: visual features beyond the range of "
                                         f"{visual_dtype} (|x| > {torch.finfo(visual_dtype).max:g}); not AVE features")
        mask[i, :t] = True
    return FeatureTable(unique, visual, audio, mask, cache.spec)
