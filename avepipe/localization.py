"""video(s) -> per-second labels: ``avepipe localize``, :class:`Localizer` and ``avepipe.localize()``.

:class:`Localizer` loads a checkpoint once and labels videos in as many calls as wanted; VGG-19 and VGGish are loaded
the first time a video has to be extracted (never, when every video is in the cache) and then kept. Features come from
the extract stage (into ``--cache``, or a temporary cache), so a second run on the same video with the same cache skips
decoding and needs no weights files.

Per-second labels come from :mod:`avepipe.labeller` (windows of 10 s, the owner of each second, the probabilities:
see there); its public names are re-exported here.

CML checkpoints (``--query-audio`` for A2V, ``--query-video`` for V2A) score every second of each video against the
query span and report the best window of the query's length (the max-contiguous-sum decoding of the papers).

Bad options and queries raise :class:`~avepipe.errors.UsageError`, a bad checkpoint
:class:`~avepipe.errors.CheckpointError`, missing weights one :class:`~avepipe.errors.WeightsError` naming all of them;
all of these before any video is decoded (and before a cache is created). A bad video is a record with ``error`` set.
The files are written by :mod:`avepipe.outputs`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from avepipe import media
from avepipe.backbones import logmel
from avepipe.backbones.extractor import Backbones
from avepipe.cache import FeatureCache
from avepipe.data.ave import BACKGROUND
from avepipe.data.features import NonFiniteFeaturesError, check_finite
from avepipe.devices import resolve_device, warn_cpu_fallback
from avepipe.errors import UsageError
from avepipe.extract import ExtractReport, check_config, run_extract
from avepipe.inputs import assign_ids, discover, select_shard
from avepipe.labeller import (
    MATCH,
    NO_MATCH,
    WINDOW,
    CheckpointLabeller,
    SecondLabel,
    VideoLabels,
    merge_spans,
    second_probabilities,
    spec_differences,
    window_owner,
    window_starts,
)
from avepipe.settings import SAMPLING_MODES, ExtractConfig

__all__ = [  # this module's own names, and the labeller's that were defined here before it had its own module
    "BACKGROUND", "MATCH", "NO_MATCH", "WINDOW",
    "CheckpointLabeller", "LocalizeConfig", "Localizer", "Progress", "SecondLabel", "VideoLabels",
    "localize_videos", "merge_spans", "parse_span", "second_probabilities", "spec_differences", "window_owner",
    "window_starts",
]


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
