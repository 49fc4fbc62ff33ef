"""``avepipe extract --devices cuda:0,cuda:1,...``: one extract process per device, merged into one cache.

Device ``k`` of ``N`` runs the ordinary single-device extraction (:func:`avepipe.extract.run_extract`) on shard ``k`` of
``N`` — the videos with ``shard_of(id, N) == k``, exactly what ``--shard k/N`` takes — into its own cache
``F.h5.shard-k-of-N.h5`` next to the target ``F.h5``. When every device process has ended, the shard caches are folded
into the target and deleted.

Resumable like a single-device run: the target's writer lock is held from start to end (a second run on the same
target fails fast); videos already in the target are not handed out; a killed run leaves its shard caches, and the next
run first folds whatever they hold into the target (whatever N they were made with), so finished videos are never
extracted twice.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from avepipe.backbones.extractor import resolve_precision
from avepipe.cache import FeatureCache, describe_spec_difference
from avepipe.decode import exit_with_parent, start_processes
from avepipe.devices import resolve_device
from avepipe.errors import AvepipeError, SpecMismatchError, UsageError
from avepipe.extract import ExtractReport, Progress, run_extract
from avepipe.inputs import shard_of
from avepipe.planning import plan, record_plan_failures
from avepipe.settings import SAMPLING_MODES, ExtractConfig


@dataclass
class DeviceResult:
    device: str
    shard: int
    shards: int
    videos: int  # handed to this device
    done: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    error: str | None = None  # the device process stopped early: its unfinished videos are extracted by a re-run


@dataclass
class DeviceMessage:
    """From a device process to the coordinator."""

    kind: str  # "event" (progress), "report" (finished), "usage" (refused its work), "interrupted", "error"
    device: int  # index of the device process
    event: str = ""  # kind "event": the progress event's name ...
    fields: dict[str, Any] = field(default_factory=dict)  # ... and its fields
    report: ExtractReport | None = None  # kind "report"
    text: str = ""  # kinds "usage", "interrupted", "error": one line


@dataclass
class MultiDeviceReport(ExtractReport):
    devices: list[DeviceResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if ExtractReport.exit_code.fget(self) or any(d.error for d in self.devices) else 0


# -- names -----------------------------------------------------------------------------------------------------------

def parse_devices(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if any(not name for name in names):
        raise UsageError(f"--devices {text!r}: expected a comma-separated list, e.g. cuda:0,cuda:1")
    if "auto" in names:
        raise UsageError("--devices: name each device (cpu, cuda:N); 'auto' is for --device")
    return names


def shard_cache_path(target: Path, k: int, n: int) -> Path:
    return target.with_name(f"{target.name}.shard-{k}-of-{n}.h5")


def leftover_shard_caches(target: Path) -> list[Path]:
    """Shard caches of ``target`` left by an earlier (killed or failed) ``--devices`` run, whatever its N."""
    if not target.parent.is_dir():
        return []
    pattern = re.compile(re.escape(target.name) + r"\.shard-\d+-of-\d+\.h5(\.staging)?$")
    found = {target.with_name(p.name.removesuffix(".staging"))
             for p in target.parent.iterdir() if pattern.match(p.name)}
    return sorted(found)


def _remove_cache(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".lock").unlink(missing_ok=True)
    staging = path.with_name(path.name + ".staging")
    if staging.is_dir():
        shutil.rmtree(staging)


def fold(target: FeatureCache, sources: list[Path]) -> int:
    """Move the videos and failure records of shard caches into ``target`` (a writer), then delete the shard caches.

    Not :func:`avepipe.cache.merge`: that writes a new file, while here the target is an existing cache whose lock this
    run holds, and a shard's entry legitimately replaces the target's (a changed file that was extracted again)."""
    moved = 0
    for source in sources:
        reader = FeatureCache(source, "r")
        spec = reader.spec
        if spec is not None and target.spec is not None and spec != target.spec:
            raise SpecMismatchError(f"{source} (a shard cache of {target.path}): "
                                    f"{describe_spec_difference(target.spec, spec)}; delete it or use another --cache")
        if spec is not None:
            target.ensure_spec(spec)
        for video_id in reader.ids():
            entry = reader.get(video_id)
            target.put(video_id, entry.visual, entry.audio, entry.attrs)
            target.maybe_compact()
            moved += 1
        for video_id, record in reader.failures().items():
            if video_id not in target:
                target.put_failure(video_id, str(record.get("source_path", "")), str(record.get("error", "")))
        reader.close()  # a reader keeps its file open: closed before the shard cache is deleted
    if sources:
        target.compact()  # everything is in the target file before any shard cache goes
    for source in sources:
        _remove_cache(source)
    return moved


# -- one device (a spawned process) ----------------------------------------------------------------------------------

def _device_main(index: int, paths: list[str], cache_path: str, config: ExtractConfig, threads: int | None,
                 events: mp.Queue) -> None:
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()

    def forward(event: str, fields: dict[str, Any]) -> None:
        events.put(DeviceMessage("event", index, event=event, fields=fields))

    try:
        if threads:
            torch.set_num_threads(threads)
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is not None:
            # Work that names no device (pinned host memory) would otherwise open a context on cuda:0 in every process.
            torch.cuda.set_device(device)
        report = run_extract([Path(p) for p in paths], cache_path, config, forward)
        events.put(DeviceMessage("report", index, report=report))
    except AvepipeError as exc:
        events.put(DeviceMessage("usage", index, text=str(exc)))
    except KeyboardInterrupt:
        events.put(DeviceMessage("interrupted", index, text="interrupted"))
    except Exception as exc:  # noqa: BLE001 - reported as this device's failure; the other devices go on
        where = traceback.extract_tb(exc.__traceback__)[-1]
        events.put(DeviceMessage("error", index,
                                 text=f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"))


# -- the run ---------------------------------------------------------------------------------------------------------

def check_devices(names: list[str], config: ExtractConfig) -> None:
    """Everything that can be refused before any process starts."""
    if config.sampling not in SAMPLING_MODES:
        raise UsageError(f"--sampling {config.sampling}: choose one of {', '.join(SAMPLING_MODES)}")
    for name in names:
        try:
            device = resolve_device(name)
        except ValueError as exc:
            raise UsageError(str(exc).replace("--device ", "--devices: ")) from None
        resolve_precision(config.precision, device)


def run_multi_device(paths: list[Path], cache_path: str | os.PathLike, names: list[str], config: ExtractConfig,
                     progress: Progress | None = None) -> MultiDeviceReport:
    """Extract ``paths`` into ``cache_path`` with one process per device in ``names`` (``config.device`` and
    ``config.shard`` are ignored). Raises UsageError before any work for bad options, and after folding the finished
    work when a device process refused its work (e.g. missing weights)."""
    emit = progress or (lambda event, fields: None)
    if not paths:
        raise UsageError("no input videos (give files, directories or --list)")
    check_devices(names, config)
    n = len(names)
    cpus = os.cpu_count() or 1
    cpu_devices = sum(resolve_device(name).type == "cpu" for name in names)
    workers = config.workers if config.workers >= 0 else max(1, cpus // n)  # decoders per device
    report = MultiDeviceReport()
    started = time.perf_counter()
    target_path = Path(cache_path)
    target = FeatureCache(target_path, "a")  # held to the end: one run per target
    refused: list[str] = []
    try:
        fold(target, leftover_shard_caches(target_path))
        todo = plan(paths, target, replace(config, shard=None), report)
        record_plan_failures(target, paths, report)
        shares: list[dict[str, Path]] = [{} for _ in names]
        for vid, path in todo.items():
            shares[shard_of(vid, n)][vid] = path
        report.devices = [DeviceResult(name, k, n, len(shares[k])) for k, name in enumerate(names)]
        spec = target.spec
        jobs = []
        for k, name in enumerate(names):
            if not shares[k]:
                continue
            shard_path = shard_cache_path(target_path, k, n)
            if spec is not None:  # a shard built with other weights or sampling is refused before extracting anything
                with FeatureCache(shard_path, "a") as shard_cache:
                    shard_cache.ensure_spec(spec)
            threads = max(1, cpus // cpu_devices) if resolve_device(name).type == "cpu" else None
            jobs.append((k, [str(p) for p in shares[k].values()], str(shard_path),
                         replace(config, device=name, shard=None, workers=workers), threads))
        emit("start", {"total": report.total, "todo": len(todo), "skipped": len(report.skipped),
                       "previously_failed": len(report.previously_failed), "device": ", ".join(names)})
        refused = run_device_processes(jobs, report, emit)
        fold(target, [shard_cache_path(target_path, k, n) for k, *_ in jobs])
    finally:
        target.close()
    report.elapsed_s = time.perf_counter() - started
    if refused:
        raise UsageError(refused[0])
    return report


def run_device_processes(jobs: list[tuple], report: MultiDeviceReport, emit: Progress) -> list[str]:
    """Run the device processes to their end, forwarding progress; returns the usage errors they raised."""
    ctx = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
    events: mp.Queue = ctx.Queue()
    # Not daemons: a device process starts its own decoder processes. Each watches this process and exits with it.
    procs = {k: ctx.Process(target=_device_main, args=(k, paths, cache, config, threads, events))
             for k, paths, cache, config, threads in jobs}
    start_processes(list(procs.values()))
    pending = set(procs)
    refused: list[str] = []
    seen_warnings: set[str] = set()

    def handle(message: DeviceMessage) -> None:
        kind, k = message.kind, message.device
        result = report.devices[k]
        label = f"{result.device} (shard {k}/{result.shards})"
        if kind == "event":
            event, fields = message.event, message.fields
            if event == "warning" and fields["message"] not in seen_warnings:
                seen_warnings.add(fields["message"])
                report.warnings.append(fields["message"])
                emit(event, fields)
            elif event in ("video", "seconds"):
                emit(event, fields)
            return
        pending.discard(k)
        if kind == "report":
            part = message.report
            report.done += part.done
            report.failed.update(part.failed)
            report.previously_failed.update(part.previously_failed)
            report.seconds_of_video += part.seconds_of_video
            result.done, result.failed, result.elapsed_s = len(part.done), len(part.failed), part.elapsed_s
        elif kind == "usage":
            refused.append(f"{label}: {message.text}")
            result.error = message.text
        else:
            result.error = message.text

    try:
        while pending:
            try:
                handle(events.get(timeout=1.0))
                continue
            except queue.Empty:
                pass
            dead = [k for k in pending if not procs[k].is_alive()]
            if dead:
                # What a process sent before it ended is already in the pipe: read it before declaring it lost.
                while True:
                    try:
                        handle(events.get(timeout=0.2))
                    except queue.Empty:
                        break
                for k in dead:
                    if k in pending:
                        pending.discard(k)
                        report.devices[k].error = f"the device process ended with exit code {procs[k].exitcode}"
    finally:
        # Normally every process has sent its last message and is exiting. After Ctrl-C (which reaches them too) they
        # get a moment to stage what they finished; one that is still busy is then stopped (finished videos are safe).
        for proc in procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    return refused
