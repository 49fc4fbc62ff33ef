"""video(s) -> per-second labels: ``avepipe localize`` and ``avepipe.localize()``.

Features come from the extract stage (into ``--cache``, or a temporary cache), so a second run on the same video with
the same cache skips decoding. A video of T seconds is covered by 10-s windows starting at 0, 10, 20, ... with the last
window aligned to the end (T - 10); a video shorter than a window is one window of T seconds. Where two windows overlap,
a second takes the output of the window in which it lies farthest from the window's edges (the most context on both
sides; ties go to the earlier window), so every label is exactly the model's ``predict`` for one window.

CML checkpoints (``--query-audio`` for A2V, ``--query-video`` for V2A) score every second of each video against the
query span and report the best window of the query's length (the max-contiguous-sum decoding of the papers).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from avepipe import media
from avepipe.backbones import vggish as vggish_mod
from avepipe.cache import FeatureCache
from avepipe.devices import resolve_device
from avepipe.extract import (
    ExtractConfig, ExtractReport, UsageError, assign_ids, discover, run_extract, select_shard,
)
from avepipe.metrics import max_contiguous_window
from avepipe.train import TrainError, load_checkpoint

WINDOW = 10  # seconds per model input: the AVE clip length every model was trained on
BACKGROUND = 28
MATCH, NO_MATCH = "match", "-"
FORMATS = ("table", "json", "csv", "jsonl")


class LocalizeError(Exception):
    """Bad options, checkpoint or query (exit code 2)."""


# -- records -----------------------------------------------------------------------------------------------------------

@dataclass
class SecondLabel:
    start: int
    end: int
    label: str
    event_probability: float
    class_probability: float
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
    checkpoint: str
    cache: str | None = None  # keep features here (re-runs skip extraction); default: a temporary cache
    device: str = "auto"
    workers: int = -1  # decode processes; -1: none for one video (no process start-up), else min(8, CPUs)
    vgg19_weights: str | None = None
    vggish_weights: str | None = None
    pca_params: str | None = None
    precision: str = "auto"
    shard: tuple[int, int] | None = None
    retry_failed: bool = False
    query_audio: str | None = None  # CML A2V: the audio query's file
    query_video: str | None = None  # CML V2A: the visual query's file
    query_span: tuple[int, int] | None = None  # [start, end) seconds of the query file


Progress = Callable[[str, dict[str, Any]], None]


def parse_span(text: str) -> tuple[int, int]:
    """``"3-6"`` -> (3, 6): seconds 3, 4 and 5 of the query file."""
    try:
        start, end = (int(x) for x in text.split("-"))
    except ValueError:
        raise LocalizeError(f"--query-span {text!r}: expected START-END in whole seconds, e.g. 3-6") from None
    if not 0 <= start < end:
        raise LocalizeError(f"--query-span {text!r}: need 0 <= START < END")
    return start, end


class Localizer:
    """A loaded checkpoint on a device, turning cached features of one video into per-second records."""

    def __init__(self, checkpoint: str | os.PathLike, device: torch.device):
        try:
            self.model, self.ckpt = load_checkpoint(checkpoint, map_location=device)
        except TrainError as exc:
            raise LocalizeError(str(exc)) from None
        self.device = device
        self.task = self.ckpt["task"]
        self.direction = self.ckpt.get("direction")
        self.class_names = list(self.ckpt.get("class_names") or [])
        self.feature_spec = json.loads(self.ckpt.get("feature_spec") or "{}")
        # Classes the checkpoint knows by name (a model trained on a subset of categories has untrained outputs).
        n_named = max(0, len(self.class_names) - 1)
        self.known = torch.tensor(sorted(set(range(min(n_named, BACKGROUND))) | {BACKGROUND}), device=device)

    def name(self, index: int) -> str:
        if index == BACKGROUND:
            return "background"
        return self.class_names[index] if index < len(self.class_names) - 1 else f"class{index}"

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
        probs = out["segment_logits"].float().softmax(-1)
        if "relevance" in out:  # models with an explicit event/background decision report it directly
            event = out["relevance"].float()
        else:
            event = 1.0 - probs[..., BACKGROUND]
        top_p, top_i = probs.topk(min(3, len(self.known)), dim=-1)
        records = []
        for s, w in enumerate(window_owner(seconds, starts)):
            t = s - starts[w]
            label = int(pred[w, t])
            records.append(SecondLabel(
                start=s, end=s + 1, label=self.name(label), event_probability=round(float(event[w, t]), 4),
                class_probability=round(float(probs[w, t, label]), 4),
                top3=[{"label": self.name(int(i)), "probability": round(float(p), 4)}
                      for p, i in zip(top_p[w, t].tolist(), top_i[w, t].tolist())],
            ))
        return records

    def _known_only(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class scores of classes the checkpoint does not name set to -inf (a model trained on a subset of the
        categories has untrained outputs for the others; they must not win). Class scores are the outputs whose last
        dimension is 29 (all classes) or 28 (event categories)."""
        unknown = torch.ones(BACKGROUND + 1, dtype=torch.bool, device=self.device)
        unknown[self.known] = False
        if not unknown.any():
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
            raise LocalizeError(f"the query lasts {span} s but the video only {seconds} s")
        starts = window_starts(seconds)
        length = min(WINDOW, seconds)
        if span > length:
            raise LocalizeError(f"the query lasts {span} s; a model input is {length} s")
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
        best = max_contiguous_window(scores, span)
        records = []
        for s, score in enumerate(scores):
            p = round(1.0 / (1.0 + math.exp(-score)), 4) if score > -50 else 0.0
            label = MATCH if best <= s < best + span else NO_MATCH
            records.append(SecondLabel(start=s, end=s + 1, label=label, event_probability=p, class_probability=p,
                                       top3=[]))
        return records


def spec_differences(trained: dict[str, Any], used: dict[str, Any]) -> list[str]:
    """Feature-spec keys on which the checkpoint's training features and these features differ."""
    keys = ("sampling", "visual", "audio", "vgg19_sha256", "vggish_sha256")
    return [k for k in keys if k in trained and k in used and trained[k] != used[k]]


def localize_videos(paths: Iterable[str | os.PathLike], config: LocalizeConfig, *, list_file: str | None = None,
                    progress: Progress | None = None) -> tuple[list[VideoLabels], ExtractReport]:
    """Label every second of each video. Bad videos get a record with ``error`` set; the others finish."""
    emit = progress or (lambda event, fields: None)
    videos = discover(paths, list_file)
    if not videos:
        raise UsageError("no input videos (give files, directories or --list)")
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    localizer = Localizer(config.checkpoint, device)
    _check_query_options(localizer, config)
    ids = select_shard(assign_ids(videos), config.shard)
    spec = localizer.feature_spec
    extract_config = ExtractConfig(
        device=str(device), workers=config.workers if config.workers >= 0 else (0 if len(ids) <= 1 else -1),
        vgg19_weights=config.vgg19_weights, vggish_weights=config.vggish_weights,
        pca=spec.get("audio") == "vggish/pca-uint8", pca_params=config.pca_params,
        sampling=spec.get("sampling", "ave") if spec.get("sampling") in media.SAMPLING_MODES else "ave",
        precision=config.precision, retry_failed=config.retry_failed,
    )
    if not ids:
        return [], ExtractReport()
    with tempfile.TemporaryDirectory(prefix="avepipe-localize-") as tmp:
        cache_path = Path(config.cache) if config.cache else Path(tmp) / "features.h5"
        inputs = list(ids.values())
        if config.query_video:
            inputs.append(Path(config.query_video))  # its visual features come through the same cache
        report = run_extract(inputs, cache_path, extract_config, emit)
        with FeatureCache(cache_path, "r") as cache:
            differing = spec_differences(spec, cache.spec or {})
            if differing:
                emit("warning", {"message": f"{config.checkpoint}: trained on features that differ from these in "
                                            f"{', '.join(differing)}; labels may be unreliable"})
            query = None
            if config.query_video or config.query_audio:
                query = _query_features(config, localizer, cache, extract_config)
            results = []
            for vid, path in ids.items():
                results.append(_label_one(vid, path, cache, report, localizer, query, config))
                emit("labelled", {"id": vid, "error": results[-1].error})
    return results, report


def _label_one(vid: str, path: Path, cache: FeatureCache, report: ExtractReport, localizer: Localizer,
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
        if query is not None:
            result.seconds = localizer.match(entry.visual, entry.audio, query)
            start, end = config.query_span
            result.query = {"file": str(config.query_video or config.query_audio), "start": start, "end": end,
                            "direction": localizer.direction}
        else:
            result.seconds = localizer.label(entry.visual, entry.audio)
    except LocalizeError as exc:
        result.error = f"{path}: {exc}"
        return result
    result.spans = merge_spans(result.seconds)
    return result


def _check_query_options(localizer: Localizer, config: LocalizeConfig) -> None:
    if localizer.task != "cml":
        if config.query_audio or config.query_video:
            raise LocalizeError(f"{config.checkpoint} is a {localizer.task} checkpoint; --query-* needs a CML one")
        return
    wanted = "--query-audio" if localizer.direction == "a2v" else "--query-video"
    given = config.query_audio if localizer.direction == "a2v" else config.query_video
    other = config.query_video if localizer.direction == "a2v" else config.query_audio
    if not given or other:
        raise LocalizeError(f"{config.checkpoint} is a CML {localizer.direction} checkpoint: give {wanted} FILE "
                            f"and --query-span START-END")
    if config.query_span is None:
        raise LocalizeError("--query-span START-END is needed with a query (seconds of the query file)")


def _query_features(config: LocalizeConfig, localizer: Localizer, cache: FeatureCache,
                    extract_config: ExtractConfig) -> np.ndarray:
    start, end = config.query_span
    if config.query_video:  # V2A: visual features of the query video, extracted into the same cache
        qpath = Path(config.query_video)
        qid = next(iter(assign_ids([qpath])))
        if qid not in cache:
            failure = cache.failures().get(qid, {}).get("error", f"{qpath}: no features")
            raise LocalizeError(f"query {failure}")
        visual = cache.get(qid).visual
        if end > len(visual):
            raise LocalizeError(f"--query-span {start}-{end}: {qpath} has {len(visual)} s")
        return np.asarray(visual[start:end], dtype=np.float32)
    # A2V: VGGish of the query file's audio (any media file with sound, audio-only included).
    from avepipe.extract import Backbones

    try:
        info = media.probe(config.query_audio, require_video=False)
        wave, rate = media.decode_audio(info)
    except media.MediaError as exc:
        raise LocalizeError(f"query {exc}") from None
    if end > info.seconds:
        raise LocalizeError(f"--query-span {start}-{end}: {config.query_audio} has {info.seconds} s")
    examples, _ = vggish_mod.waveform_to_examples(wave, rate, info.seconds)
    backbones = Backbones(extract_config, localizer.device, visual=False)
    return backbones.audio(examples[start:end])


# -- writers -----------------------------------------------------------------------------------------------------------

CSV_FIELDS = ("video", "start", "end", "label", "event_probability", "class_probability",
              "top1", "top1_probability", "top2", "top2_probability", "top3", "top3_probability")


def rows(result: VideoLabels) -> list[dict[str, Any]]:
    """Flat per-second rows (CSV / JSONL)."""
    out = []
    for s in result.seconds:
        row = {"video": result.video, "start": s.start, "end": s.end, "label": s.label,
               "event_probability": s.event_probability, "class_probability": s.class_probability}
        for k in range(3):
            top = s.top3[k] if k < len(s.top3) else {"label": "", "probability": ""}
            row[f"top{k + 1}"], row[f"top{k + 1}_probability"] = top["label"], top["probability"]
        out.append(row)
    return out


def format_results(results: Sequence[VideoLabels], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([r.to_dict() for r in results], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for r in results for row in rows(r))
    if fmt == "csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in results:
            writer.writerows(rows(r))
        return buffer.getvalue()
    raise LocalizeError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")


def write_results(results: Sequence[VideoLabels], fmt: str, out: str | os.PathLike) -> list[Path]:
    """One file (``out``) for all videos, or one ``<id>.<fmt>`` per video when ``out`` is a directory (an existing
    one, or a path ending in ``/``). Files are written atomically."""
    out_text = str(out)
    out = Path(out)
    written = []
    if out.is_dir() or out_text.endswith(("/", os.sep)):
        out.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r.error is None:
                written.append(_write_atomic(out / f"{r.id}.{fmt}", format_results([r], fmt)))
    else:
        written.append(_write_atomic(out, format_results([r for r in results if r.error is None], fmt)))
    return written


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
