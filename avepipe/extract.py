"""decode -> batch -> backbones -> cache: ``avepipe extract``.

Decoding (ffmpeg + frame selection + resize, audio + log-mel) runs in worker processes that stream uint8 frame chunks
through a bounded queue, so host memory stays flat whatever the video lengths; the main process batches frames across
videos through VGG-19 on the device, runs VGGish, and stages each finished video in the cache (atomic per video).
Re-running skips videos already in the cache; failures are recorded and retried only with ``retry_failed``.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from avepipe import __version__
from avepipe import media
from avepipe.backbones import vggish as vggish_mod
from avepipe.backbones import weights as weights_mod
from avepipe.backbones.vgg19 import load_vgg19
from avepipe.cache import FeatureCache
from avepipe.devices import resolve_device
from avepipe.sampling import FRAMES_PER_SECOND

SPEC_VERSION = 1
MEDIA_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp", ".ogv"}


class UsageError(Exception):
    """Bad options or inputs detected before any work starts (exit code 2)."""


@dataclass
class ExtractConfig:
    device: str = "auto"  # auto: cuda when available
    batch_size: int = 0  # frames per VGG-19 forward; 0: 128 on cuda, 32 on cpu
    workers: int = -1  # decode processes; -1: min(8, cpus); 0: decode in the main process
    vgg19_weights: str | None = None  # default: $AVEPIPE_WEIGHTS_DIR/<manifest file>
    vggish_weights: str | None = None  # a torchvggish state dict, or "random"
    pca: bool = False  # VGGish PCA + 8-bit quantisation (off in the AVE spec)
    pca_params: str | None = None
    sampling: str = "ave"
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu; or fp32 / bf16 / fp16
    shard: tuple[int, int] | None = None  # (k, n): this process takes ids with shard_of(id, n) == k
    retry_failed: bool = False
    chunk_seconds: int = 8


@dataclass
class ExtractReport:
    total: int = 0
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # id -> one-line error
    previously_failed: dict[str, str] = field(default_factory=dict)
    seconds_of_video: int = 0
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.previously_failed else 0


# -- inputs ----------------------------------------------------------------------------------------------------------

def discover(paths: Iterable[str | os.PathLike], list_file: str | None = None) -> list[Path]:
    """Media files named directly, found in directories (recursively, by extension) or listed one per line."""
    found: list[Path] = []
    items = [Path(p) for p in paths]
    if list_file:
        try:
            lines = Path(list_file).read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"{list_file}: cannot read the list ({exc.strerror})") from None
        base = Path(list_file).parent
        items += [Path(s) if Path(s).is_absolute() else base / s for s in (ln.strip() for ln in lines) if s and not s.startswith("#")]
    for item in items:
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
        else:
            found.append(item)  # a missing or bad file is reported per video, not as a usage error
    return found


def video_id(path: Path) -> str:
    return path.stem


def shard_of(vid: str, n: int) -> int:
    """Deterministic shard of a video id (stable across machines and Python runs)."""
    return int.from_bytes(hashlib.sha1(vid.encode()).digest()[:8], "big") % n


def select_shard(ids: dict[str, Path], shard: tuple[int, int] | None) -> dict[str, Path]:
    """The ids of shard ``(k, n)`` (all of them when ``shard`` is None)."""
    if shard is None:
        return ids
    k, n = shard
    return {vid: p for vid, p in ids.items() if shard_of(vid, n) == k}


def assign_ids(paths: list[Path]) -> dict[str, Path]:
    ids: dict[str, Path] = {}
    for path in paths:
        vid = video_id(path)
        if vid in ids and ids[vid].resolve() != path.resolve():
            raise UsageError(f"video id {vid!r} is used by two files: {ids[vid]} and {path} (ids are file names without extension)")
        ids.setdefault(vid, path)
    return ids


# -- decoding (runs in workers) --------------------------------------------------------------------------------------

def decode_messages(vid: str, path: str, sampling: str, chunk_seconds: int) -> Iterator[tuple]:
    """Messages for one video: ('start', vid, meta, examples), ('frames', vid, chunk)..., ('restart', vid), ('done', vid)
    or ('error', vid, message)."""
    try:
        info = media.probe(path)
        wave, rate = media.decode_audio(info)
        examples, padded = vggish_mod.waveform_to_examples(wave, rate, info.seconds)
        stat = os.stat(path)
        meta = {
            "source_path": str(Path(path).resolve()), "source_size": stat.st_size, "source_mtime": stat.st_mtime,
            "duration": info.duration, "seconds": info.seconds, "audio_padded_s": float(padded),
            "width": info.width, "height": info.height, "audio_sample_rate": rate,
        }
        n_frames = media.scan_packets(info)  # also rejects truncated files before any work
        yield ("start", vid, meta, examples)
        first_count = n_frames
        while True:
            try:
                for chunk in media.sampled_frames(info, sampling, chunk_seconds, n_frames=n_frames):
                    yield ("frames", vid, chunk)
                break
            except media.FrameCountChanged as changed:
                if n_frames != first_count:
                    raise media.CorruptMediaError(path, "frame count changes between decodes") from None
                n_frames = changed.n_frames
                yield ("restart", vid)
        yield ("done", vid)
    except media.MediaError as exc:
        yield ("error", vid, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure of one video must not stop the batch
        last = traceback.format_exc(limit=1).strip().splitlines()[-1]
        yield ("error", vid, f"{path}: unexpected error: {type(exc).__name__}: {exc} ({last})")


def _exit_with_parent(parent: int) -> None:
    """Watchdog thread: end this worker at once when the main process is gone (kill -9 runs no cleanup, and a worker
    waiting to flush its queue into a pipe nobody reads would otherwise live forever)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _worker(tasks: "mp.Queue", results: "mp.Queue", sampling: str, chunk_seconds: int) -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    while True:
        task = tasks.get()
        if task is None:
            return
        vid, path = task
        for message in decode_messages(vid, path, sampling, chunk_seconds):
            results.put(message)


def _messages_inline(todo: dict[str, Path], config: ExtractConfig) -> Iterator[tuple]:
    for vid, path in todo.items():
        yield from decode_messages(vid, str(path), config.sampling, config.chunk_seconds)


def _messages_from_workers(todo: dict[str, Path], config: ExtractConfig, workers: int) -> Iterator[tuple]:
    ctx = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
    tasks: mp.Queue = ctx.Queue()
    results: mp.Queue = ctx.Queue(maxsize=max(4, 3 * workers))  # bounded: decoding never runs far ahead of the GPU
    for item in todo.items():
        tasks.put((item[0], str(item[1])))
    procs = [ctx.Process(target=_worker, args=(tasks, results, config.sampling, config.chunk_seconds), daemon=True)
             for _ in range(workers)]
    for p in procs:
        tasks.put(None)
        p.start()
    remaining = set(todo)
    try:
        while remaining:
            try:
                message = results.get(timeout=5.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    for vid in sorted(remaining):
                        yield ("error", vid, f"{todo[vid]}: decoder process died")
                    return
                continue
            if message[0] in ("done", "error"):
                remaining.discard(message[1])
            yield message
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)


# -- backbones (main process) ----------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise UsageError(f"--precision {precision}: choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device")
    return table[precision]


class Backbones:
    """VGG-19 and VGGish on one device, with the weights' identities."""

    def __init__(self, config: ExtractConfig, device: torch.device, visual: bool = True):
        self.device = device
        self.autocast = resolve_precision(config.precision, device)
        self.vggish, self.vggish_info, self.pca_info = self._load_vggish(config, device)
        self.vggish.eval()
        if not visual:  # audio only (a CML audio query): VGG-19 is not loaded at all
            self.vgg19, self.vgg19_info = None, None
            return
        if config.vgg19_weights == weights_mod.RANDOM:  # benchmarks only: speed does not depend on the values
            torch.manual_seed(0)
            self.vgg19 = load_vgg19(None, map_location=device)
            self.vgg19_info = weights_mod.identify_tensors("vgg19", weights_mod.RANDOM, self.vgg19.state_dict())
        else:
            vgg_path = Path(config.vgg19_weights) if config.vgg19_weights else weights_mod.default_path("vgg19")
            if not vgg_path.is_file():
                raise UsageError(f"{vgg_path}: VGG-19 weights not found (run `avepipe weights download` or pass --vgg19-weights)")
            self.vgg19_info = weights_mod.identify("vgg19", vgg_path)
            try:
                self.vgg19 = load_vgg19(vgg_path, map_location=device)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if device.type == "cuda":
            self.vgg19 = self.vgg19.to(memory_format=torch.channels_last)
        self.vgg19.eval()

    @staticmethod
    def _load_vggish(config: ExtractConfig, device: torch.device):
        pca = None
        pca_info = None
        if config.pca:
            pca_path = Path(config.pca_params) if config.pca_params else weights_mod.default_path("vggish_pca")
            if not pca_path.is_file():
                raise UsageError(f"{pca_path}: VGGish PCA parameters not found (pass --pca-params)")
            pca_info = weights_mod.identify("vggish_pca", pca_path)
            pca = pca_path
        choice = config.vggish_weights
        if choice == weights_mod.RANDOM:
            state = vggish_mod.make_vggish_state_dict(seed=0)
            info = weights_mod.identify_tensors("vggish", weights_mod.RANDOM, state)
            model = vggish_mod.load_vggish(None, pca)
            model.load_state_dict(state, strict=False)
        else:
            path = Path(choice) if choice else weights_mod.default_path("vggish")
            if not path.is_file():
                raise UsageError(
                    f"{path}: VGGish weights not found (run `avepipe weights download`, pass --vggish-weights FILE, "
                    f"or --vggish-weights random to try the pipeline with features that are NOT the published ones)"
                )
            info = weights_mod.identify("vggish", path)
            try:
                model = vggish_mod.load_vggish(path, pca)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        return model.to(device), info, pca_info

    def warnings(self) -> list[str]:
        out = []
        if not self.vggish_info.official:
            out.append(
                f"VGGish weights {self.vggish_info.path} are not the official torchvggish file "
                f"(sha256 {self.vggish_info.sha256[:12]}…): the audio features are NOT the published AVE features"
            )
        if not self.vgg19_info.official:
            out.append(
                f"VGG-19 weights {self.vgg19_info.path} are not the official Keras file: "
                f"the visual features are NOT the published AVE features"
            )
        return out

    def spec(self, config: ExtractConfig) -> dict[str, Any]:
        return {
            "spec_version": SPEC_VERSION,
            "sampling": config.sampling,
            "visual": "vgg19-keras-imagenet/block5_pool/mean-of-16",
            "audio": "vggish/pca-uint8" if config.pca else "vggish/fc2-relu",
            "vgg19_sha256": self.vgg19_info.sha256,
            "vggish_sha256": self.vggish_info.sha256,
        }

    def entry_attrs(self, config: ExtractConfig) -> dict[str, Any]:
        attrs = {
            "sampling": config.sampling, "spec_version": SPEC_VERSION,
            "vgg19_weights": self.vgg19_info.path, "vgg19_sha256": self.vgg19_info.sha256,
            "vgg19_official": self.vgg19_info.official,
            "vggish_weights": self.vggish_info.path, "vggish_sha256": self.vggish_info.sha256,
            "vggish_official": self.vggish_info.official,
            "vggish_pca": config.pca,
            "precision": "fp32" if self.autocast is None else str(self.autocast).replace("torch.", ""),
            "device": self.device.type, "avepipe_version": __version__, "torch_version": torch.__version__,
        }
        if self.pca_info is not None:
            attrs.update(pca_sha256=self.pca_info.sha256, pca_official=self.pca_info.official)
        return attrs

    def _autocast(self):
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.inference_mode()
    def visual(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [k, 16, 224, 224, 3] -> per-second pool5 means float32 [k, 7, 7, 512]."""
        k = frames.shape[0]
        batch = torch.from_numpy(frames.reshape(-1, *frames.shape[2:]))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with self._autocast():
            pool5 = self.vgg19(batch)
        return pool5.float().reshape(k, FRAMES_PER_SECOND, *pool5.shape[1:]).mean(dim=1).cpu().numpy()

    @torch.inference_mode()
    def audio(self, examples: np.ndarray) -> np.ndarray:
        """log-mel examples [T, 96, 64] -> embeddings float32 [T, 128] (VGGish in float32: it is cheap)."""
        return self.vggish(torch.from_numpy(examples).to(self.device)).float().cpu().numpy()


# -- the run ---------------------------------------------------------------------------------------------------------

@dataclass
class _Pending:
    meta: dict[str, Any]
    audio: np.ndarray
    seconds: list[np.ndarray] = field(default_factory=list)
    decoded: bool = False


Progress = Callable[[str, dict[str, Any]], None]  # (event, fields): "start", "video", "warning"


def plan(paths: list[Path], cache: FeatureCache, config: ExtractConfig, report: ExtractReport) -> dict[str, Path]:
    """Which of ``paths`` need work: applies the shard, skips finished videos and (unless retrying) recorded failures."""
    ids = select_shard(assign_ids(paths), config.shard)
    report.total = len(ids)
    done = cache.all_attrs()
    failures = cache.failures()
    todo: dict[str, Path] = {}
    for vid, path in ids.items():
        if vid in done:
            attrs = done[vid]
            same_file = _same_source(attrs, path)
            if same_file:
                report.skipped.append(vid)
                continue
            if str(Path(attrs.get("source_path", "")).resolve()) != str(path.resolve()):
                report.failed[vid] = (f"{path}: video id {vid!r} is already in the cache for another file "
                                      f"({attrs.get('source_path')}); rename one of them")
                continue
            # Same path, changed file: extract again (the new entry replaces the old one).
        if vid in failures and not config.retry_failed:
            report.previously_failed[vid] = failures[vid].get("error", "failed earlier")
            continue
        todo[vid] = path
    return todo


def _same_source(attrs: dict[str, Any], path: Path) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    return int(attrs.get("source_size", -1)) == stat.st_size and abs(float(attrs.get("source_mtime", -1)) - stat.st_mtime) < 1e-3


def run_extract(paths: list[Path], cache_path: str | os.PathLike, config: ExtractConfig,
                progress: Progress | None = None) -> ExtractReport:
    emit = progress or (lambda event, fields: None)
    if config.sampling not in media.SAMPLING_MODES:
        raise UsageError(f"--sampling {config.sampling}: choose one of {', '.join(media.SAMPLING_MODES)}")
    if not paths:
        raise UsageError("no input videos (give files, directories or --list)")
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    report = ExtractReport()
    started = time.perf_counter()
    cache = FeatureCache(cache_path, "a")  # takes the writer lock first: a second writer fails fast
    try:
        backbones = Backbones(config, device)
        cache.ensure_spec(backbones.spec(config))
        report.warnings = backbones.warnings()
        for text in report.warnings:
            emit("warning", {"message": text})
        todo = plan(paths, cache, config, report)
        for vid in list(report.failed):
            cache.put_failure(vid, str(assign_ids(paths).get(vid, "")), report.failed[vid])
        emit("start", {"total": report.total, "todo": len(todo), "skipped": len(report.skipped),
                       "previously_failed": len(report.previously_failed), "device": str(device)})
        if todo:
            _process(todo, cache, backbones, config, report, emit)
    finally:
        cache.close()
    report.elapsed_s = time.perf_counter() - started
    return report


def _process(todo: dict[str, Path], cache: FeatureCache, backbones: Backbones, config: ExtractConfig,
             report: ExtractReport, emit: Progress) -> None:
    workers = config.workers if config.workers >= 0 else min(8, os.cpu_count() or 1)
    workers = min(workers, len(todo))
    batch_frames = config.batch_size or (128 if backbones.device.type == "cuda" else 32)
    batch_seconds = max(1, batch_frames // FRAMES_PER_SECOND)
    messages = _messages_from_workers(todo, config, workers) if workers > 0 else _messages_inline(todo, config)
    pending: dict[str, _Pending] = {}
    queued: list[tuple[str, np.ndarray]] = []  # (video id, frames of whole seconds) waiting for a full batch
    entry_attrs = backbones.entry_attrs(config)

    def run_batch() -> None:
        nonlocal queued
        frames = np.concatenate([chunk for _, chunk in queued])
        features = backbones.visual(frames)
        offset = 0
        for vid, chunk in queued:
            pending[vid].seconds.append(features[offset : offset + len(chunk)])
            offset += len(chunk)
        queued = []
        for vid in [v for v, p in pending.items() if p.decoded]:
            finish(vid)

    def finish(vid: str) -> None:
        if any(v == vid for v, _ in queued):
            return
        item = pending.pop(vid)
        visual = np.concatenate(item.seconds) if item.seconds else np.zeros((0, 7, 7, 512), np.float32)
        attrs = {**item.meta, **entry_attrs, "extracted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        cache.put(vid, visual, item.audio, attrs)
        cache.maybe_compact()
        report.done.append(vid)
        report.seconds_of_video += int(item.meta["seconds"])
        emit("video", {"id": vid, "status": "done", "seconds": int(item.meta["seconds"])})

    for message in messages:
        kind, vid = message[0], message[1]
        if kind == "start":
            meta, examples = message[2], message[3]
            pending[vid] = _Pending(meta=meta, audio=backbones.audio(examples))
        elif kind == "frames":
            chunk = message[2]
            for start in range(0, len(chunk), batch_seconds):
                queued.append((vid, chunk[start : start + batch_seconds]))
                if sum(len(c) for _, c in queued) >= batch_seconds:
                    run_batch()
        elif kind == "restart":
            pending[vid].seconds.clear()
            queued = [(v, c) for v, c in queued if v != vid]
        elif kind == "done":
            pending[vid].decoded = True
            if not any(v == vid for v, _ in queued):
                finish(vid)
        elif kind == "error":
            pending.pop(vid, None)
            queued = [(v, c) for v, c in queued if v != vid]
            report.failed[vid] = message[2]
            cache.put_failure(vid, str(todo[vid]), message[2])
            emit("video", {"id": vid, "status": "failed", "error": message[2]})
    if queued:
        run_batch()
    for vid in [v for v, p in pending.items() if p.decoded]:
        finish(vid)
