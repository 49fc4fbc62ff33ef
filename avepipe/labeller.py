"""One video's cached features -> per-second labels with a loaded checkpoint (:class:`CheckpointLabeller`), and the
records they are given in (:class:`SecondLabel`, :class:`VideoLabels`, the spans of :func:`merge_spans`).

A video of T seconds is covered by 10-s windows starting at 0, 10, 20, ... with the last window aligned to the end
(T - 10); a video shorter than a window is one window of T seconds. Where two windows overlap, a second takes the
output of the window in which it lies farthest from the window's edges (the most context on both sides; ties go to the
earlier window), so every label is exactly the model's ``predict`` for one window.

Probabilities (:func:`second_probabilities`, docs/localize.md "Probabilities"): each second carries ``probability``,
the probability of its label in the model's per-second distribution over the 29 classes, and ``event_probability``,
P(an event in this second) from the model's own event/background decision: at least 0.5 exactly when the label is an
event class, below 0.5 exactly when it is background, for every model.

CML checkpoints score every second of each video against the query span and report the best window of the query's
length (the max-contiguous-sum decoding of the papers). A query that does not fit raises
:class:`~avepipe.errors.UsageError`. Finding, extracting and caching the videos is :mod:`avepipe.localization`'s.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from avepipe.checkpoint import class_name, known_classes, load_checkpoint
from avepipe.data.ave import BACKGROUND
from avepipe.errors import UsageError
from avepipe.metrics import max_contiguous_window
from avepipe.models.layers import cml_decode_scores

WINDOW = 10  # seconds per model input: the AVE clip length every model was trained on
MATCH, NO_MATCH = "match", "-"


# -- records -----------------------------------------------------------------------------------------------------------

@dataclass
class SecondLabel:
    start: int
    end: int
    label: str  # a class name or "background" (CML: "match" or "-")
    # P(an event happens in this second), from the model's own event/background decision: >= 0.5 exactly when
    # ``label`` is an event class, < 0.5 exactly when it is background (see second_probabilities). CML: the match
    # probability of the second (the match is the best window, not a threshold).
    event_probability: float
    # The probability of ``label`` itself: P(background) for a background second, P(that class) for an event second,
    # in the distribution ``top3`` is taken from (CML: the match probability for "match", 1 - it for "-").
    probability: float
    top3: list[dict[str, Any]]  # [{"label", "probability"}], best first (empty for CML)


@dataclass
class VideoLabels:
    video: str  # the path as given
    id: str
    duration: float | None = None
    seconds: list[SecondLabel] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)  # consecutive seconds with one label
    error: str | None = None
    query: dict[str, Any] | None = None  # CML: {"file", "start", "end", "direction"}
    model: str | None = None  # the checkpoint's model and task, e.g. "avel supervised"
    checkpoint: str | None = None  # the checkpoint file as given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_spans(seconds: Sequence[SecondLabel]) -> list[dict[str, Any]]:
    """Consecutive seconds with the same label -> [{label, start, end}] in time order."""
    spans: list[dict[str, Any]] = []
    for second in seconds:
        if spans and spans[-1]["label"] == second.label and spans[-1]["end"] == second.start:
            spans[-1]["end"] = second.end
        else:
            spans.append({"label": second.label, "start": second.start, "end": second.end})
    return spans


# -- windows -----------------------------------------------------------------------------------------------------------

def window_starts(seconds: int, window: int = WINDOW) -> list[int]:
    """Starts of the windows covering ``seconds`` (consecutive, the last one aligned to the end)."""
    if seconds < 1:
        raise ValueError("a video needs at least one second")
    if seconds <= window:
        return [0]
    starts = list(range(0, seconds - window + 1, window))
    if starts[-1] + window < seconds:
        starts.append(seconds - window)
    return starts


def window_owner(seconds: int, starts: Sequence[int], window: int = WINDOW) -> list[int]:
    """For each second, the index of the window whose output it takes: the covering window in which the second is
    farthest from both edges (ties: the earlier window)."""
    length = min(window, seconds)
    owners = []
    for s in range(seconds):
        best, best_margin = -1, -1
        for i, start in enumerate(starts):
            if start <= s < start + length:
                margin = min(s - start, start + length - 1 - s)
                if margin > best_margin:
                    best, best_margin = i, margin
        owners.append(best)
    return owners


def _stack_windows(x: np.ndarray, starts: Sequence[int], length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([x[s : s + length] for s in starts]).astype(np.float32))


# -- labels of one video ----------------------------------------------------------------------------------------------

def second_probabilities(model: torch.nn.Module, outputs: dict[str, torch.Tensor],
                         task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-second class distribution ``[..., 29]`` and event probability ``[...]`` of a model's outputs (classes the
    checkpoint does not name already masked), consistent with the model's ``predict``.

    * Models whose ``predict`` is the argmax of ``segment_logits`` (one stage: AVEL, AVSDN, PSP, DIIA, CMBS weak): the
      distribution is the softmax of the 29 scores, and the event/background decision is "the best event class beats
      background", so ``event = sigmoid(best event score - background score) = P(best) / (P(best) + P(background))``.
      (Not ``1 - P(background)``: a model that spreads its mass over many classes has a high ``1 - P(background)``
      while no single class beats background, and labels the second background.)
    * Models that decide event vs background first, then the category (two stages: DAM, M2N, DMIN, CMBS supervised),
      say so with ``model.event_logits(outputs, task)`` (the registry contract): ``event = sigmoid(event logit)`` (DAM's
      ``p_t``, M2N's ``p^r``, DMIN's ``s_t``, CMBS's event score), ``P(background) = 1 - event`` and
      ``P(class c) = event * P(c | event)``, with ``P(c | event)`` the softmax of the event classes' scores.

    Either way ``event >= 0.5`` exactly when ``predict`` gives an event class (up to exact ties), and the predicted
    class is the most probable event class of the distribution."""
    scores = outputs["segment_logits"].float()
    hook = getattr(model, "event_logits", None)
    logits = hook(outputs, task) if hook is not None else None
    if logits is None:
        event = torch.sigmoid(scores[..., :BACKGROUND].max(-1).values - scores[..., BACKGROUND])
        return scores.softmax(-1), event
    event = torch.sigmoid(logits.float()).expand(scores.shape[:-1])
    given_event = scores[..., :BACKGROUND].softmax(-1).nan_to_num(0.0)  # no named event class: all zero
    return torch.cat([event[..., None] * given_event, (1.0 - event)[..., None]], -1), event


def _event_side(event: float, is_background: bool) -> float:
    """``event`` rounded to 4 places. At 0.5 (a tie, or 0.49996 rounding up) it is kept on the side of 0.5 its label
    is on: a background second must not show event probability 0.5. Nothing else is adjusted: a value on the wrong
    side would be a bug of :func:`second_probabilities`, and the tests must see it."""
    rounded = round(event, 4)
    if abs(event - 0.5) < 1e-4:
        return min(rounded, 0.4999) if is_background else max(rounded, 0.5)
    return rounded


class CheckpointLabeller:
    """A loaded checkpoint on a device, turning cached features of one video into per-second records."""

    def __init__(self, checkpoint: str | os.PathLike, device: torch.device):
        self.model, self.ckpt = load_checkpoint(checkpoint, map_location=device)
        self.device = device
        self.task = self.ckpt["task"]
        self.direction = self.ckpt.get("direction")
        self.feature_spec = json.loads(self.ckpt.get("feature_spec") or "{}")
        self.known = known_classes(self.ckpt)
        unknown = torch.ones(BACKGROUND + 1, dtype=torch.bool)
        unknown[self.known] = False
        # None when the checkpoint names every class; decided here, on the host, not once per video on the device
        self.unknown = unknown.to(device) if bool(unknown.any()) else None
        self.description = f"{self.ckpt['model']} {self.task}"

    def name(self, index: int) -> str:
        return class_name(self.ckpt, index)

    @torch.inference_mode()
    def label(self, visual: np.ndarray, audio: np.ndarray) -> list[SecondLabel]:
        """Per-second labels of one video's features (visual [T, 7, 7, 512], audio [T, 128])."""
        seconds = min(len(visual), len(audio))
        starts = window_starts(seconds)
        length = min(WINDOW, seconds)
        v = _stack_windows(visual, starts, length).to(self.device)
        a = _stack_windows(audio, starts, length).to(self.device)
        mask = torch.ones(len(starts), length, dtype=torch.bool, device=self.device)
        out = self._known_only(self.model(v, a, mask))
        pred = self.model.predict(out, self.task)  # [W, L]
        probs, event = second_probabilities(self.model, out, self.task)
        top_p, top_i = probs.topk(min(3, len(self.known)), dim=-1)
        # Each second's row of the window that owns it, packed into one float32 table on the device and read once
        # (class indices < 29 are exact in float32): one device->host sync per video, not several per second.
        owners = window_owner(seconds, starts)
        rows = torch.tensor(owners), torch.tensor([s - starts[w] for s, w in enumerate(owners)])
        label = pred[rows].long()
        packed = torch.cat([label[:, None].float(), event[rows][:, None].float(),
                            probs[rows].gather(1, label[:, None]).float(), top_p[rows].float(), top_i[rows].float()],
                           dim=1).cpu().tolist()
        k = top_p.shape[-1]
        records = []
        for s, row in enumerate(packed):
            label = int(row[0])
            records.append(SecondLabel(
                start=s, end=s + 1, label=self.name(label),
                event_probability=_event_side(row[1], label == BACKGROUND),
                probability=round(row[2], 4),
                top3=[{"label": self.name(int(i)), "probability": round(p, 4)}
                      for p, i in zip(row[3:3 + k], row[3 + k:3 + 2 * k])],
            ))
        return records

    def _known_only(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class scores of classes the checkpoint does not name set to -inf (a model trained on a subset of the
        categories has untrained outputs for the others; they must not win). Class scores are the outputs whose last
        dimension is 29 (all classes) or 28 (event categories)."""
        unknown = self.unknown
        if unknown is None:
            return out
        masked = dict(out)
        for key, value in out.items():
            if value.is_floating_point() and value.shape[-1] in (BACKGROUND, BACKGROUND + 1):
                masked[key] = value.masked_fill(unknown[: value.shape[-1]], float("-inf"))
        return masked

    @torch.inference_mode()
    def match(self, visual: np.ndarray, audio: np.ndarray, query: np.ndarray) -> list[SecondLabel]:
        """CML: per-second match scores of one video against the query features [L, D] (audio for a2v, visual for
        v2a); the best window of L seconds is labelled ``match``."""
        seconds = min(len(visual), len(audio))
        span = len(query)
        if span > seconds:
            raise UsageError(f"the query lasts {span} s but the video only {seconds} s")
        starts = window_starts(seconds)
        length = min(WINDOW, seconds)
        if span > length:
            raise UsageError(f"the query lasts {span} s; a model input is {length} s")
        # The query goes in the first `span` seconds of the query modality; models use it position-free
        # (pooled), and nothing outside query_mask of that modality is read (the registry contract).
        candidates = _stack_windows(visual if self.direction == "a2v" else audio, starts, length)
        queries = torch.zeros((len(starts), length, *query.shape[1:]))
        queries[:, :span] = torch.from_numpy(query.astype(np.float32))
        v, a = (candidates, queries) if self.direction == "a2v" else (queries, candidates)
        mask = torch.ones(len(starts), length, dtype=torch.bool)
        query_mask = torch.zeros_like(mask)
        query_mask[:, :span] = True
        out = self.model.forward_cml(v.to(self.device), a.to(self.device), mask.to(self.device),
                                     query_mask.to(self.device), self.direction)
        logits = out["match_logits"].float().cpu()
        owners = window_owner(seconds, starts)
        scores = np.array([float(logits[w, s - starts[w]]) for s, w in enumerate(owners)])
        best = max_contiguous_window(cml_decode_scores(self.model, torch.from_numpy(scores)).numpy(), span)
        records = []
        for s, score in enumerate(scores):
            p = round(1.0 / (1.0 + math.exp(-score)), 4) if score > -50 else 0.0
            label = MATCH if best <= s < best + span else NO_MATCH
            records.append(SecondLabel(start=s, end=s + 1, label=label, event_probability=p,
                                       probability=p if label == MATCH else round(1.0 - p, 4), top3=[]))
        return records


def spec_differences(trained: dict[str, Any], used: dict[str, Any]) -> list[str]:
    """Feature-spec keys on which the checkpoint's training features and these features differ."""
    keys = ("sampling", "visual", "audio", "vgg19_sha256", "vggish_sha256")
    return [k for k in keys if k in trained and k in used and trained[k] != used[k]]
