"""Per-row targets of the three tasks and on-device batching.

* ``supervised`` (SEL): a label per second (28 categories + background 28).
* ``weak``: the same evaluation, but training sees only the video-level label (the category of the row).
* ``cml`` (cross-modality localization): the query is the event span of one modality; the target is the same span in
  the other modality (AVE events are synchronised). Rows with an empty event have no query and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from avepipe.data.ave import BACKGROUND, Annotation, class_index
from avepipe.data.features import FeatureTable


@dataclass
class RowSet:
    """The rows of one split, ready to batch on one device."""

    rows: np.ndarray  # annotation row indices
    video: torch.Tensor  # [N] index into the feature table
    labels: torch.Tensor  # [N, S] long
    event: torch.Tensor  # [N, S] float
    video_label: torch.Tensor  # [N] long
    mask: torch.Tensor  # [N, S] bool (real seconds)
    # How training batches these rows (:func:`batches` with shuffle=True): "shuffled", "shuffled-full" (the leftover
    # rows dropped), or "released", the released AVEL scripts' order (dataloader.py get_batch(i): rows i*B .. i*B+B-1
    # in stored order, every epoch the same, and the ``len // B`` loop drops the leftover rows; in the weak split those
    # are the last background videos).
    batch_order: str = "shuffled"

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str) -> "RowSet":
        return RowSet(self.rows, self.video.to(device), self.labels.to(device), self.event.to(device),
                      self.video_label.to(device), self.mask.to(device), self.batch_order)


def build_rows(annotations: Sequence[Annotation], rows: Sequence[int], categories: Sequence[str], table: FeatureTable,
               task: str) -> RowSet:
    seconds = table.mask.shape[1]
    rows = np.asarray(rows, dtype=np.int64)
    if task == "cml":
        rows = np.array([r for r in rows if annotations[r].end > annotations[r].start], dtype=np.int64)
    chosen = [annotations[r] for r in rows]
    video = table.index([a.video_id for a in chosen])
    labels = torch.full((len(rows), seconds), BACKGROUND, dtype=torch.long)
    event = torch.zeros((len(rows), seconds))
    video_label = torch.empty(len(rows), dtype=torch.long)
    for i, a in enumerate(chosen):
        c = class_index(a, categories)
        labels[i, a.start : a.end] = c
        event[i, a.start : a.end] = 1.0
        video_label[i] = c
    mask = table.mask[video]
    return RowSet(rows, video, labels, event, video_label, mask)


def batch(table: FeatureTable, rowset: RowSet, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch gathered on the table's device: features in float32 plus every target the losses use."""
    video = rowset.video[index]
    event = rowset.event[index]
    mask = rowset.mask[index]
    return {
        "visual": table.visual[video].float(),
        "audio": table.audio[video],
        "mask": mask,
        "labels": rowset.labels[index],
        "event": event,
        "video_label": rowset.video_label[index],
        "query_mask": event.bool() & mask,
        "target_mask": event.bool() & mask,
    }


BATCH_ORDERS = ("shuffled", "released", "shuffled-full")


def batches(table: FeatureTable, rowset: RowSet, batch_size: int, *, shuffle: bool,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``rowset``: all rows in stored order (``shuffle=False``, evaluation), or for training a fresh
    permutation drawn from ``generator`` -- unless ``rowset.batch_order`` is "released": then the stored order and only
    the ``len // batch_size`` full batches (the generator is not drawn from); "shuffled-full": the permutation's first
    ``len // batch_size`` full batches (PSP's released loader: a shuffle per epoch, the leftover rows dropped)."""
    if rowset.batch_order not in BATCH_ORDERS:
        raise ValueError(f"unknown batch_order {rowset.batch_order!r} (expected one of {', '.join(BATCH_ORDERS)})")
    n = len(rowset)
    device = rowset.video.device
    if shuffle and rowset.batch_order == "released":
        shuffle, n = False, n - n % batch_size
    order = torch.randperm(n, generator=generator).to(device) if shuffle else torch.arange(n, device=device)
    if shuffle and rowset.batch_order == "shuffled-full":
        n -= n % batch_size
    for start in range(0, n, batch_size):
        yield batch(table, rowset, order[start : start + batch_size])


def with_noisy_videos(table: FeatureTable, rowset: RowSet, visual: torch.Tensor, audio: torch.Tensor,
                      video_label: torch.Tensor) -> tuple[FeatureTable, RowSet]:
    """Append the weakly supervised extra videos (background-only, video labels only) to a training split.

    ``visual`` [M, S, 7, 7, Dv], ``audio`` [M, S, Da], ``video_label`` [M] (28 for the released noisy set). Their
    per-second labels are background and their event masks empty; only the video label is used by the weak losses.
    """
    m, seconds = audio.shape[0], table.mask.shape[1]
    device = table.visual.device
    start = len(table.video_ids)
    merged = FeatureTable(
        table.video_ids + [f"noisy-{i}" for i in range(m)],
        torch.cat([table.visual, visual.to(device=device, dtype=table.visual.dtype)]),
        torch.cat([table.audio, audio.to(device=device, dtype=table.audio.dtype)]),
        torch.cat([table.mask, torch.ones(m, seconds, dtype=torch.bool, device=device)]),
        table.spec,
    )
    rows = RowSet(
        np.concatenate([rowset.rows, np.full(m, -1, dtype=np.int64)]),  # -1: not an Annotations row
        torch.cat([rowset.video, torch.arange(start, start + m, device=device)]),
        torch.cat([rowset.labels, torch.full((m, seconds), BACKGROUND, dtype=torch.long, device=device)]),
        torch.cat([rowset.event, torch.zeros(m, seconds, device=device)]),
        torch.cat([rowset.video_label, video_label.to(device=device, dtype=torch.long)]),
        torch.cat([rowset.mask, torch.ones(m, seconds, dtype=torch.bool, device=device)]),
    )
    return merged, rows
