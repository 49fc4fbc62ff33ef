"""video(s) -> per-second labels: ``avepipe localize``, :class:`Localizer` and ``avepipe.localize()``.

:class:`Localizer` loads a checkpoint once and labels videos in as many calls as wanted; VGG-19 and VGGish are loaded
the first time a video has to be extracted (never, when every video is in the cache) and then kept. Features come from
the extract stage (into ``--cache``, or a temporary cache), so a second run on the same video with the same cache skips
decoding and needs no weights files.

A video of T seconds is covered by 10-s windows starting at 0, 10, 20, ... with the last window aligned to the end
(T - 10); a video shorter than a window is one window of T seconds. Where two windows overlap, a second takes the
output of the window in which it lies farthest from the window's edges (the most context on both sides; ties go to the
earlier window), so every label is exactly the model's ``predict`` for one window.

Probabilities (:func:`second_probabilities`, docs/localize.md "Probabilities"): each second carries ``probability``,
the probability of its label in the model's per-second distribution over the 29 classes, and ``event_probability``,
P(an event in this second) from the model's own event/background decision: at least 0.5 exactly when the label is an
event class, below 0.5 exactly when it is background, for every model.

CML checkpoints (``--query-audio`` for A2V, ``--query-video`` for V2A) score every second of each video against the
query span and report the best window of the query's length (the max-contiguous-sum decoding of the papers).

Bad options and queries raise :class:`~avepipe.errors.UsageError`, a bad checkpoint
:class:`~avepipe.errors.CheckpointError`, missing weights one :class:`~avepipe.errors.WeightsError` naming all of them;
all of these before any video is decoded (and before a cache is created). A bad video is a record with ``error`` set.
The files are written by :mod:`avepipe.outputs`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from avepipe import media
from avepipe.backbones import logmel
from avepipe.backbones.extractor import Backbones
from avepipe.cache import FeatureCache
from avepipe.checkpoint import class_name, known_classes, load_checkpoint
from avepipe.data.ave import BACKGROUND
from avepipe.data.features import NonFiniteFeaturesError, check_finite
from avepipe.devices import resolve_device, warn_cpu_fallback
from avepipe.errors import UsageError
from avepipe.extract import ExtractReport, check_config, run_extract
from avepipe.inputs import assign_ids, discover, select_shard
from avepipe.metrics import max_contiguous_window
from avepipe.models.layers import cml_decode_scores
from avepipe.settings import SAMPLING_MODES, ExtractConfig

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


# -- the run -----------------------------------------------------------------------------------------------------------

@dataclass
class LocalizeConfig:
    checkpoint: str | os.PathLike
    cache: str | os.PathLike | None = None  # keep features here (re-runs skip extraction); default: a temporary cache
    device: str = "auto"
    workers: int = -1  # decode processes; -1: none for one video (no process start-up), else one per CPU
    vgg19_weights: str | None = None  # a file, or "random"
    vggish_weights: str | None = None  # a file, or "random"
    pca_params: str | os.PathLike | None = None
    precision: str = "auto"
    shard: tuple[int, int] | None = None
    retry_failed: bool = False
    query_audio: str | os.PathLike | None = None  # CML A2V: the audio query's file
    query_video: str | os.PathLike | None = None  # CML V2A: the visual query's file
    query_span: tuple[int, int] | None = None  # [start, end) seconds of the query file


Progress = Callable[[str, dict[str, Any]], None]


def parse_span(text: str) -> tuple[int, int]:
    """``"3-6"`` -> (3, 6): seconds 3, 4 and 5 of the query file."""
    try:
        start, end = (int(x) for x in text.split("-"))
    except ValueError:
        raise UsageError(f"--query-span {text!r}: expected START-END in whole seconds, e.g. 3-6") from None
    if not 0 <= start < end:
        raise UsageError(f"--query-span {text!r}: need 0 <= START < END")
    return start, end


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


class Localizer:
    """Per-second labels for videos with one checkpoint, loaded once and kept across calls (the inferencer pattern of
    mmaction2's ``MMAction2Inferencer``).

    The checkpoint is loaded here (a bad one raises :class:`~avepipe.errors.CheckpointError` at once); VGG-19 and
    VGGish are loaded the first time a video has to be extracted, and kept for later calls. With ``cache``, videos
    already in it are not decoded again, and a call whose videos are all there needs no weights files at all. Without
    it, each call extracts into a temporary cache deleted at its end.

    Example::

        from avepipe import Localizer

        localizer = Localizer("runs/avel/checkpoint.pt", cache="features.h5")
        for video in localizer.localize(["a.mp4", "videos/"]):
            if video.error:
                print(video.error)
                continue
            for span in video.spans:
                print(video.id, span["label"], span["start"], span["end"])
        later = localizer.localize("b.mp4")  # the checkpoint and the backbones are not loaded again

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``. The keyword options are those of
    ``avepipe localize`` (:class:`LocalizeConfig`). Errors: see :meth:`localize`.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", cache: str | os.PathLike | None = None,
                 *, workers: int = -1, vgg19_weights: str | None = None, vggish_weights: str | None = None,
                 pca_params: str | os.PathLike | None = None, precision: str = "auto",
                 retry_failed: bool = False) -> None:
        self.config = LocalizeConfig(checkpoint=checkpoint, cache=cache, device=device, workers=workers,
                                     vgg19_weights=vgg19_weights, vggish_weights=vggish_weights,
                                     pca_params=pca_params, precision=precision, retry_failed=retry_failed)
        self.device = resolve_device(device, warn=False)  # labelling is quick on a CPU; backbones warn
        self.labeller = CheckpointLabeller(checkpoint, self.device)
        spec = self.labeller.feature_spec
        # The feature options follow the checkpoint: its sampling mode and PCA setting are those it was trained on.
        self.extract_config = ExtractConfig(
            device=str(self.device), workers=workers, vgg19_weights=vgg19_weights, vggish_weights=vggish_weights,
            pca=spec.get("audio") == "vggish/pca-uint8", pca_params=str(pca_params) if pca_params else None,
            sampling=spec.get("sampling", "ave") if spec.get("sampling") in SAMPLING_MODES else "ave",
            precision=precision, retry_failed=retry_failed,
        )
        check_config(self.extract_config)  # a bad --precision fails now, not at the first video to extract
        self._backbones: Backbones | None = None  # VGG-19 + VGGish, once a video needed them
        self._audio_backbones: Backbones | None = None  # VGGish alone, for an A2V query when nothing else was needed

    @classmethod
    def from_config(cls, config: LocalizeConfig) -> Localizer:
        return cls(config.checkpoint, config.device, config.cache, workers=config.workers,
                   vgg19_weights=config.vgg19_weights, vggish_weights=config.vggish_weights,
                   pca_params=config.pca_params, precision=config.precision, retry_failed=config.retry_failed)

    @property
    def model(self) -> str:
        """The checkpoint's model and task, e.g. ``"avel supervised"``."""
        return self.labeller.description

    def backbones(self) -> Backbones:
        """VGG-19 and VGGish, loaded on the first call (all missing weights files in one error) and kept."""
        if self._backbones is None:
            warn_cpu_fallback(self.device)
            self._backbones = Backbones(self.extract_config, self.device)
        return self._backbones

    def audio_backbone(self) -> Backbones:
        """VGGish (for an A2V query): the loaded backbones if there are, else VGGish alone, loaded once."""
        if self._backbones is not None:
            return self._backbones
        if self._audio_backbones is None:
            warn_cpu_fallback(self.device)
            self._audio_backbones = Backbones(self.extract_config, self.device, visual=False)
        return self._audio_backbones

    def localize(self, paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                 query_audio: str | os.PathLike | None = None, query_video: str | os.PathLike | None = None,
                 query_span: tuple[int, int] | None = None, shard: tuple[int, int] | None = None,
                 list_file: str | os.PathLike | None = None,
                 progress: Progress | None = None) -> list[VideoLabels]:
        """Per-second labels of each video (files or directories, searched recursively; one path may be a string),
        one :class:`VideoLabels` per input video in input order.

        A video that cannot be used (missing, unreadable, shorter than 1 s, no features) does not raise: its record
        has ``error`` set and no seconds; a missing or unreadable file is found before anything global is checked.
        Problems of the call itself raise an :class:`~avepipe.errors.AvepipeError` before any video is decoded:
        :class:`~avepipe.errors.UsageError` (no videos, a query that does not fit the checkpoint or its file),
        :class:`~avepipe.errors.WeightsError` (weights files missing, all named at once; only when some readable video
        has to be extracted). CML checkpoints take ``query_audio`` (A2V) or ``query_video`` (V2A) and
        ``query_span=(start, end)`` in seconds of the query file. ``progress(event, fields)`` receives the extract
        stage's events (see :mod:`avepipe.extract`) and ``"labelled"`` per video."""
        if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
            paths = [paths]
        results, _ = self.run(paths, query_audio=query_audio, query_video=query_video, query_span=query_span,
                              shard=shard, list_file=list_file, progress=progress)
        return results

    def run(self, paths: Iterable[str | os.PathLike], *, query_audio: str | os.PathLike | None = None,
            query_video: str | os.PathLike | None = None, query_span: tuple[int, int] | None = None,
            shard: tuple[int, int] | None = None, list_file: str | os.PathLike | None = None,
            progress: Progress | None = None) -> tuple[list[VideoLabels], ExtractReport]:
        """:meth:`localize` with the extract stage's report (what was extracted, skipped, failed)."""
        emit = progress or (lambda event, fields: None)
        videos = discover(paths, list_file)
        if not videos:
            raise UsageError("no input videos (give files, directories or --list)")
        config = replace(self.config, query_audio=query_audio, query_video=query_video, query_span=query_span,
                         shard=shard)
        query = _check_query_options(self.labeller, config)
        ids = select_shard(assign_ids(videos), shard)
        if not ids:
            return [], ExtractReport()
        extract_config = self.extract_config
        if self.config.workers < 0:  # no process start-up for one video
            extract_config = replace(extract_config, workers=0 if len(ids) <= 1 else -1)
        with tempfile.TemporaryDirectory(prefix="avepipe-localize-") as tmp:
            cache_path = Path(self.config.cache) if self.config.cache else Path(tmp) / "features.h5"
            inputs = list(ids.values())
            if config.query_video:
                inputs.append(Path(config.query_video))  # its visual features come through the same cache
            report = run_extract(inputs, cache_path, extract_config, emit, load_backbones=self.backbones)
            if not cache_path.exists():  # no input could be read: each one's record says why, nothing was created
                results = [VideoLabels(video=str(path), id=vid, error=report.failed.get(vid)
                                       or f"{path}: no features were extracted") for vid, path in ids.items()]
                for result in results:
                    result.model, result.checkpoint = self.model, str(self.config.checkpoint)
                    emit("labelled", {"id": result.id, "error": result.error})
                return results, report
            with FeatureCache(cache_path, "r") as cache:
                differing = spec_differences(self.labeller.feature_spec, cache.spec or {})
                if differing:
                    emit("warning", {"message": f"{self.config.checkpoint}: trained on features that differ from "
                                                f"these in {', '.join(differing)}; labels may be unreliable"})
                features = None
                if query is not None:
                    features = self._query_features(config, query, cache)
                results = []
                for vid, path in ids.items():
                    results.append(_label_one(vid, path, cache, report, self.labeller, features, config))
                    results[-1].model, results[-1].checkpoint = self.model, str(self.config.checkpoint)
                    emit("labelled", {"id": vid, "error": results[-1].error})
        return results, report

    def _query_features(self, config: LocalizeConfig, query: media.MediaInfo, cache: FeatureCache) -> np.ndarray:
        start, end = config.query_span
        if config.query_video:  # V2A: visual features of the query video, extracted into the same cache
            qpath = Path(config.query_video)
            qid = next(iter(assign_ids([qpath])))
            if qid not in cache:
                failure = cache.failures().get(qid, {}).get("error", f"{qpath}: no features")
                raise UsageError(f"query {failure}")
            visual = cache.get(qid).visual
            if end > len(visual):
                raise UsageError(f"--query-span {start}-{end}: {qpath} has {len(visual)} s")
            return np.asarray(visual[start:end], dtype=np.float32)
        # A2V: VGGish of the query file's audio (any media file with sound, audio-only included).
        try:
            wave, rate = media.decode_audio(query)
        except media.MediaError as exc:  # a bad input video fails alone (exit 1); a bad query fails the run (exit 2)
            raise UsageError(f"query {exc}") from None
        examples, _ = logmel.waveform_to_examples(wave, rate, query.seconds)
        return self.audio_backbone().audio(examples[start:end])


def localize_videos(paths: Iterable[str | os.PathLike], config: LocalizeConfig, *,
                    list_file: str | os.PathLike | None = None,
                    progress: Progress | None = None) -> tuple[list[VideoLabels], ExtractReport]:
    """Label every second of each video with a one-off :class:`Localizer` (``avepipe localize``). Bad videos get a
    record with ``error`` set; the others finish."""
    localizer = Localizer.from_config(config)
    return localizer.run(paths, query_audio=config.query_audio, query_video=config.query_video,
                         query_span=config.query_span, shard=config.shard, list_file=list_file, progress=progress)


def _label_one(vid: str, path: Path, cache: FeatureCache, report: ExtractReport, labeller: CheckpointLabeller,
               query: np.ndarray | None, config: LocalizeConfig) -> VideoLabels:
    result = VideoLabels(video=str(path), id=vid)
    error = report.failed.get(vid) or report.previously_failed.get(vid)
    if error is None and vid not in cache:
        error = f"{path}: no features were extracted"
    if error is not None:
        result.error = error
        return result
    entry = cache.get(vid)
    result.duration = float(entry.attrs.get("duration", entry.visual.shape[0]))
    try:
        check_finite(entry, cache.path)
    except NonFiniteFeaturesError as exc:  # labels from NaN features would be noise: this video's error
        result.error = str(exc)
        return result
    try:
        if query is not None:
            result.seconds = labeller.match(entry.visual, entry.audio, query)
            start, end = config.query_span
            result.query = {"file": str(config.query_video or config.query_audio), "start": start, "end": end,
                            "direction": labeller.direction}
        else:
            result.seconds = labeller.label(entry.visual, entry.audio)
    except UsageError as exc:  # a query longer than this video: this video's problem, not the run's
        result.error = f"{path}: {exc}"
        return result
    result.spans = merge_spans(result.seconds)
    return result


def _check_query_options(labeller: CheckpointLabeller, config: LocalizeConfig) -> media.MediaInfo | None:
    """Whether the query options fit the checkpoint, and the query file its span: the probed query file (None for a
    checkpoint that takes no query). Raises :class:`UsageError` before any video is decoded."""
    if labeller.task != "cml":
        if config.query_audio or config.query_video:
            raise UsageError(f"{config.checkpoint} is a {labeller.task} checkpoint; --query-* needs a CML one")
        return None
    direction = labeller.ckpt.get("direction")
    if direction == "both":  # trained on both directions (dam --direction both): the query picks one
        if bool(config.query_audio) == bool(config.query_video):
            raise UsageError(f"{config.checkpoint} is a CML checkpoint of both directions: give --query-audio FILE "
                             "(A2V) or --query-video FILE (V2A), and --query-span START-END")
        direction = "a2v" if config.query_audio else "v2a"
    wanted = "--query-audio" if direction == "a2v" else "--query-video"
    given = config.query_audio if direction == "a2v" else config.query_video
    other = config.query_video if direction == "a2v" else config.query_audio
    if not given or other:
        raise UsageError(f"{config.checkpoint} is a CML {direction} checkpoint: give {wanted} FILE "
                         f"and --query-span START-END")
    if config.query_span is None:
        raise UsageError("--query-span START-END is needed with a query (seconds of the query file)")
    labeller.direction = direction
    try:
        info = media.probe(given, require_video=direction == "v2a")
    except media.MediaError as exc:  # a bad input video fails alone (exit 1); a bad query fails the run (exit 2)
        raise UsageError(f"query {exc}") from None
    start, end = config.query_span
    if end > info.seconds:
        raise UsageError(f"--query-span {start}-{end}: {given} has {info.seconds} s")
    return info
