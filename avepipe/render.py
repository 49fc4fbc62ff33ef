"""Rich rendering for the CLI (progress bars, tables). No pipeline logic here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Seconds of video per second of wall time (``3.2× real time``) once any are done, else videos/s."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        seconds = task.fields.get("video_seconds", 0)
        if seconds and elapsed > 0:
            return Text(f"{seconds / elapsed:.3g}× real time", style="cyan")
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.3g} {task.fields.get('unit', 'videos')}/s", style="cyan")


PROGRESS_MODES = ("auto", "bar", "log", "none")
DEFAULT_LOG_INTERVAL_S = 30.0


def progress_mode(mode: str, console: Console) -> str:
    """``bar``, ``log`` or ``none`` for ``--progress MODE``: ``auto`` is a bar on a terminal and plain lines
    (``log``) anywhere else (a log file, ``docker logs``, a Kubernetes pod, SLURM's ``.out``), where a bar that redraws
    itself shows nothing until the end."""
    from avepipe.errors import UsageError

    if mode not in PROGRESS_MODES:
        raise UsageError(f"--progress {mode}: choose {', '.join(PROGRESS_MODES[:-1])} or {PROGRESS_MODES[-1]}")
    if mode == "auto":
        return "bar" if console.is_terminal else "log"
    return mode


def log_interval() -> float:
    """Seconds between two progress lines in log mode while no video finishes (``$AVEPIPE_PROGRESS_INTERVAL``,
    default 30)."""
    import os

    text = os.environ.get("AVEPIPE_PROGRESS_INTERVAL", "")
    try:
        value = float(text) if text else DEFAULT_LOG_INTERVAL_S
    except ValueError:
        from avepipe.errors import UsageError

        raise UsageError(f"AVEPIPE_PROGRESS_INTERVAL={text!r}: expected a number of seconds") from None
    return value if value > 0 else DEFAULT_LOG_INTERVAL_S


def clock(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03`` for a duration; ``?`` when unknown (as tqdm writes them)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def plural(count: int, word: str) -> str:
    """``1 video``, ``2 videos``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class _Heartbeat:
    """Log mode's steady lines: calls ``line()`` whenever ``interval`` seconds passed without a progress line (a
    daemon thread; a long video or a slow backbone still shows signs of life)."""

    def __init__(self, interval: float, line):
        import threading

        self.interval, self.line = interval, line
        self.last = 0.0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="avepipe-progress", daemon=True)

    def touch(self) -> None:
        import time

        self.last = time.monotonic()

    def start(self) -> None:
        self.touch()
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        import time

        while not self.stop_event.wait(max(0.05, self.last + self.interval - time.monotonic())):
            if time.monotonic() - self.last >= self.interval:
                self.line()


class ExtractProgress:
    """Receives extract events and shows them in one of three modes (``--progress``, see :func:`progress_mode`):

    - ``bar``: one bar: videos done / to do, seconds of video done, speed (× real time), elapsed, ETA, and the
      video(s) in flight with their seconds done / total;
    - ``log``: plain lines, one when each video finishes and one every :func:`log_interval` seconds in between
      (``extract 3/10 videos | 30 s of video | 0.28x real time | elapsed 1:47 | eta 4:12 | 0 failed | ...``), as tqdm
      does where the output is not a terminal, but line by line;
    - ``none``: no progress at all.

    In every mode each warning and failure is printed once, on stderr, when it happens (the summary table only counts
    them), and a run with nothing to do says so."""

    def __init__(self, console: Console, errors: Console, label: str = "extract", print_failures: bool = True,
                 mode: str = "auto"):
        import threading

        self.console = console
        self.errors = errors
        self.label = label
        self.mode = progress_mode(mode, console)
        self.print_failures = print_failures  # False: the caller lists the failures itself (localize, with the labels)
        # At 80 columns the numbers stay whole: the videos in flight are shown only where there is room for them
        # (the long videos' own bars of seconds name them anyway).
        columns = [TextColumn("[bold]{task.fields[label]}"), BarColumn(bar_width=10), MofNCompleteColumn(),
                   TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[amount]}"), _RateColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        if console.width < 100:  # 80 columns: the ETA stays, the elapsed time goes
            columns.remove(columns[6])
        if console.width >= 120:
            columns.append(TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")))
        self.progress = Progress(*columns, console=console, transient=False)
        self.task = None
        self.long_videos: dict[str, Any] = {}  # video id -> its seconds bar (videos of LONG_VIDEO_S or more)
        self.in_flight: dict[str, tuple[int, int]] = {}  # video id -> (seconds done, seconds in all)
        self.finished_seconds = 0
        self.printed: set[str] = set()  # ids of the failures printed so far
        self.warned: set[str] = set()  # the warnings printed so far (each once, however often it is emitted)
        self.todo = self.done = self.failed = 0
        self.started_at = 0.0
        self.lock = threading.RLock()  # log mode: the heartbeat thread reads what the events write
        self.heartbeat = _Heartbeat(log_interval(), self._log_line) if self.mode == "log" else None

    def __enter__(self) -> ExtractProgress:
        if self.mode == "bar":
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode == "bar":
            self.progress.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def update(self, event: str, fields: dict[str, Any]) -> None:
        with self.lock:
            self._update(event, fields)

    def _update(self, event: str, fields: dict[str, Any]) -> None:
        if event == "warning":
            if fields["message"] not in self.warned:
                self.warned.add(fields["message"])
                self.errors.print(f"[bold yellow]WARNING:[/] {fields['message']}", soft_wrap=True)
        elif event == "start":
            self._start(fields)
        elif event == "seconds":
            self.in_flight[fields["id"]] = (fields["done"], fields["total"])
            self._seconds(fields)
            self._refresh()
        elif event == "video" and self.task is not None:
            self.in_flight.pop(fields["id"], None)
            self.finished_seconds += fields.get("seconds") or 0
            self.done += 1
            self.failed += fields["status"] == "failed"
            if self.mode == "bar":
                self.progress.advance(self.task)
                bar = self.long_videos.pop(fields["id"], None)
                if bar is not None:
                    self.progress.remove_task(bar)
            self._refresh()
        if (event == "video" and fields["status"] == "failed" and self.print_failures
                and fields["id"] not in self.printed):
            self.printed.add(fields["id"])
            self.errors.print(f"[red]failed:[/] {escape(fields['error'])}", soft_wrap=True)
        if event == "video" and self.mode == "log" and self.task is not None:
            self._log_line(f"{fields['status']} {fields['id']}")

    def _start(self, fields: dict[str, Any]) -> None:
        import time

        console = self.console
        earlier = fields.get("previously_failed", 0)
        parts = [f"{plural(fields['skipped'], 'video')} already in the cache: skipped"] if fields["skipped"] else []
        if earlier:
            parts.append(f"{earlier} failed earlier (--retry-failed to try them again)")
        if fields.get("unreadable"):
            parts.append(f"{plural(fields['unreadable'], 'input')} could not be read")
        if not fields["todo"]:
            console.print(f"nothing to {self.label}: " + "; ".join(parts or ["no videos"]), soft_wrap=True)
            return
        self.todo = fields["todo"]
        self.started_at = time.monotonic()
        if self.mode == "bar":
            self.task = self.progress.add_task("", total=fields["todo"], label=self.label, unit="videos",
                                               video_seconds=0, amount="0 s")
        else:
            self.task = -1  # counted here, drawn by no bar
        console.print("; ".join([f"{self.label} on {fields['device']}: {plural(fields['todo'], 'video')} to do",
                                 *parts]), soft_wrap=True)
        if fields.get("resumed_seconds"):
            console.print(f"{fields['resumed_seconds']} seconds of partly extracted long videos resumed from the "
                          f"last run", soft_wrap=True)
        if self.heartbeat is not None:
            self.heartbeat.start()

    def status_line(self) -> str:
        """Log mode's line: videos done/total, seconds of video, speed, elapsed, ETA, failures, videos in flight."""
        import time

        elapsed = time.monotonic() - self.started_at
        seconds = self.finished_seconds + sum(done for done, _ in self.in_flight.values())
        # The fraction done counts the finished seconds of videos in flight, so that the ETA moves during a long one.
        fraction = (self.done + sum(d / t for d, t in self.in_flight.values() if t)) / max(self.todo, 1)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        speed = f"{seconds / elapsed:.3g}x real time" if seconds and elapsed > 0 else "speed ?"
        parts = [f"{self.label} {self.done}/{plural(self.todo, 'video')}", f"{seconds} s of video", speed,
                 f"elapsed {clock(elapsed)}", f"eta {clock(eta)}", f"{self.failed} failed"]
        if self.in_flight:
            shown = list(self.in_flight.items())[:2]
            more = len(self.in_flight) - len(shown)
            parts.append("in flight: " + ", ".join(f"{vid} {done}/{total} s" for vid, (done, total) in shown)
                         + (f" (+{more})" if more else ""))
        return " | ".join(parts)

    def _log_line(self, last: str | None = None) -> None:
        with self.lock:
            if self.task is None:
                return
            line = self.status_line() + (f" | {last}" if last else "")
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            if self.heartbeat is not None:
                self.heartbeat.touch()

    def _refresh(self) -> None:
        if self.task is None or self.mode != "bar":
            return
        shown = list(self.in_flight.items())[:2]
        current = "  ".join(f"{escape(vid)} {done}/{total} s" for vid, (done, total) in shown)
        more = len(self.in_flight) - len(shown)
        seconds = self.finished_seconds + sum(done for done, _ in self.in_flight.values())
        self.progress.update(self.task, video_seconds=seconds, amount=f"{seconds} s",
                             description=current + (f" (+{more})" if more else ""))

    def _seconds(self, fields: dict[str, Any]) -> None:
        """A bar of seconds (with an ETA) for each long video while it is being extracted."""
        if fields["total"] < LONG_VIDEO_S or self.mode != "bar":
            return
        bar = self.long_videos.get(fields["id"])
        if bar is None:
            bar = self.progress.add_task(escape(fields["id"]), total=fields["total"], completed=fields["done"],
                                         label="  seconds", unit="s", video_seconds=0,
                                         amount=escape(_shorten(fields["id"], 14)))
            self.long_videos[fields["id"]] = bar
        self.progress.update(bar, completed=fields["done"])


LONG_VIDEO_S = 30  # videos this long get their own progress bar of seconds


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def render_extract_report(console: Console, errors: Console, report: Any, cache: Path, what: str = "extract",
                          printed: set[str] | frozenset[str] = frozenset()) -> None:
    """The summary table. Failures already printed while the run went on (``printed``) are only counted; warnings
    were printed when they happened."""
    if not (report.done or report.failed or report.previously_failed):
        return  # nothing was to do: the progress display said so
    table = Table(title=f"{what} summary: {cache}", show_header=True)
    done = "extracted" if what == "extract" else "decoded"
    for column in ("videos", done, "skipped", "failed", "seconds of video", "time", "videos/s"):
        table.add_column(column, justify="right")
    rate = len(report.done) / report.elapsed_s if report.elapsed_s > 0 else 0.0
    table.add_row(str(report.total), str(len(report.done)), str(len(report.skipped)),
                  str(len(report.failed) + len(report.previously_failed)), str(report.seconds_of_video),
                  f"{report.elapsed_s:.1f} s", f"{rate:.3g}")
    console.print(table)
    for vid, message in sorted(report.failed.items()):
        if vid not in printed:
            errors.print(f"[red]failed:[/] {escape(message)}", soft_wrap=True)
    for vid, message in sorted(report.previously_failed.items()):
        errors.print(f"[yellow]failed earlier[/] {escape(vid)}: {escape(message)} (use --retry-failed)",
                     soft_wrap=True)
    if (report.failed or report.previously_failed) and what == "extract" and Path(cache).exists():
        errors.print(f"{len(report.failed) + len(report.previously_failed)} failed; the list stays in the cache: "
                     f"avepipe cache ls {escape(str(cache))} --failed", soft_wrap=True)


def render_device_results(console: Console, errors: Console, devices: list) -> None:
    """One row per device of ``extract --devices`` (avepipe.multi_device.DeviceResult); a device that stopped early
    is reported on stderr."""
    table = Table(title="per device", show_header=True)
    for column in ("device", "shard", "videos", "extracted", "failed", "time"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for d in devices:
        table.add_row(d.device, f"{d.shard}/{d.shards}", str(d.videos), str(d.done), str(d.failed),
                      f"{d.elapsed_s:.1f} s" if d.videos else "-")
    console.print(table)
    for d in devices:
        if d.error:
            errors.print(f"[red]device {d.device} (shard {d.shard}/{d.shards}) stopped:[/] {d.error}; "
                         f"run the same command again to extract its remaining videos", soft_wrap=True)


def render_cache(console: Console, reader, failed_only: bool = False) -> None:
    spec = reader.spec or {}
    if not failed_only and getattr(reader, "FORMAT", "") == "avepipe-decoded":  # `avepipe decode`'s frames
        entries = reader.all_attrs()
        table = Table(title=f"{reader.path}: {len(entries)} decoded videos, sampling={spec.get('sampling', '?')}")
        for column in ("id", "T", "duration", "frames", "decoded at", "source"):
            table.add_column(column, justify="right" if column in ("T", "duration", "frames") else "left")
        for vid, attrs in entries.items():
            table.add_row(vid, str(attrs.get("seconds")), f"{float(attrs.get('duration', 0)):.2f}",
                          str(attrs.get("frames_decoded", attrs.get("frames_indexed", ""))),
                          str(attrs.get("decoded_at", "")), str(attrs.get("source_path", "")))
        console.print(table)
    elif not failed_only:
        entries = reader.all_attrs()
        table = Table(title=f"{reader.path}: {plural(len(entries), 'video')}, sampling={spec.get('sampling', '?')}, "
                            f"audio={spec.get('audio', '?')}")
        for column in ("id", "T", "duration", "VGG-19", "VGGish", "precision", "source"):
            table.add_column(column, justify="right" if column in ("T", "duration") else "left")
        for vid, attrs in entries.items():
            table.add_row(vid, str(attrs.get("seconds")), f"{float(attrs.get('duration', 0)):.2f}",
                          "official" if attrs.get("vgg19_official") else "[yellow]unofficial[/]",
                          "official" if attrs.get("vggish_official") else "[yellow]unofficial[/]",
                          str(attrs.get("precision", "")), str(attrs.get("source_path", "")))
        console.print(table)
    failures = reader.failures()
    if failures:
        table = Table(title=f"{len(failures)} failed")
        table.add_column("id")
        table.add_column("error")
        for vid, record in failures.items():
            table.add_row(vid, str(record.get("error", "")))
        console.print(table)
    elif failed_only:
        console.print("no failures recorded")


class TrainProgress:
    """One line per epoch: loss, val metric, best so far (``*`` when val improved), the epoch's time and, in log mode
    (``--progress log``, the default where stdout is not a terminal), the elapsed time and the ETA; in bar mode a bar of
    epochs too; in ``none`` mode no line."""

    def __init__(self, console: Console, mode: str = "auto"):
        self.console = console
        self.mode = progress_mode(mode, console)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=console)
        self.task = None
        self.started_at: float | None = None
        self.first_epoch = 1

    def __enter__(self) -> TrainProgress:
        if self.mode == "bar":
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode == "bar":
            self.progress.stop()

    def seed(self, seed: int) -> None:
        if self.mode != "none":
            self.console.print(f"[bold]seed {seed}[/]")
        if self.task is not None and self.mode == "bar":
            self.progress.remove_task(self.task)
        self.task = None
        self.started_at = None

    def epoch(self, record: dict[str, Any]) -> None:
        import time

        if self.started_at is None:  # the clock of this run (a resumed run starts at its own first epoch)
            self.started_at = time.monotonic() - record["seconds"]
            self.first_epoch = record["epoch"]
        if self.mode == "none":
            return
        metric = record["metric"]
        text = (f"loss {record['loss']:.4f}  val {metric} {record['val_' + metric]:.4f}  best {record['best']:.4f}"
                f"{'  *' if record['improved'] else ''}")
        if self.mode == "bar":
            if self.task is None:
                self.task = self.progress.add_task("", total=record["epochs"], completed=record["epoch"] - 1)
            self.progress.update(self.task, advance=1, description=text)
            self.progress.console.print(
                f"epoch {record['epoch']:4d}/{record['epochs']}  {text}  ({record['seconds']:.2f} s)")
            return
        elapsed = time.monotonic() - self.started_at
        done = record["epoch"] - self.first_epoch + 1
        eta = elapsed / done * (record["epochs"] - record["epoch"])
        patience = record.get("patience")
        waited = f"  no gain {record['since_best']}/{patience}" if patience and record.get("since_best") else ""
        self.console.print(f"epoch {record['epoch']}/{record['epochs']}  {text}{waited}  ({record['seconds']:.2f} s, "
                           f"elapsed {clock(elapsed)}, eta {clock(eta)})", markup=False, highlight=False,
                           soft_wrap=True)


def render_train_summary(console: Console, result: dict[str, Any], out: Path) -> None:
    metric = result["metric"]
    if "seeds" in result:
        val, test = result[f"val_{metric}"], result[f"test_{metric}"]
        console.print(f"{len(result['seeds'])} seeds: val {metric} {val['mean']:.4f} ± {val['std']:.4f}, "
                      f"test {metric} {test['mean']:.4f} ± {test['std']:.4f}  ({out}/summary.json)")
    else:
        console.print(f"kept epoch {result['best_epoch']} of {result.get('epochs_run', result['epochs'])} (best val "
                      f"{metric} {result['val_' + metric]:.4f}); test {result['test_' + metric]:.4f}", soft_wrap=True)
        if result.get("stop_reason"):
            console.print(result["stop_reason"], soft_wrap=True)
        console.print(f"wrote {out}/checkpoint.pt, {out}/metrics.json", soft_wrap=True)


class LocalizeProgress(ExtractProgress):
    """Extraction progress for localize; labelling itself is quick and shows no bar. Each failure is printed once, with
    the labels (:func:`render_localize`), never by the progress display; each warning once, however often it is
    emitted."""

    def __init__(self, console: Console, errors: Console, label: str = "extract", mode: str = "auto"):
        super().__init__(console, errors, label, print_failures=False, mode=mode)

    def update(self, event: str, fields: dict[str, Any]) -> None:
        if event != "labelled":
            super().update(event, fields)


def localize_table(result) -> Table:
    """Per-second labels of one video as a rich table (what the terminal shows): the label with its own probability
    (``p(label)``), the event probability (``p(event)``, >= 0.50 exactly for event labels) and the top 3 classes,
    separated by ``;`` (class names such as "Male speech, man speaking" contain commas)."""
    from avepipe.outputs import format_probability
    title = f"{result.video}: {len(result.seconds)} s"
    if result.model:
        title += f" ({result.model})"
    if result.query:
        query = result.query
        title += f", {query['direction']} query {query['file']} {query['start']}-{query['end']} s"
    table = Table(title=escape(title))
    for column in ("start", "end", "label", "p(label)", "p(event)", "top-3"):
        table.add_column(column, justify="right" if column in ("start", "end", "p(label)", "p(event)") else "left")
    for s in result.seconds:
        top = "; ".join(f"{escape(t['label'])} {t['probability']:.2f}" for t in s.top3)
        table.add_row(str(s.start), str(s.end), escape(s.label), format_probability(s.probability),
                      format_probability(s.event_probability), top)
    return table


def render_localize(console: Console, errors: Console, results, show_seconds: bool = True,
                    show_spans: bool = True) -> None:
    """The labels of each video on ``console`` (a table, then its spans); each failed video's error once on
    ``errors``. ``show_spans=False`` (the labels go to stdout as a file format): only the failures."""
    for result in results:
        if result.error:
            errors.print(f"[red]failed:[/] {escape(result.error)}", soft_wrap=True)
            continue
        if not show_spans:
            continue
        if show_seconds:
            console.print(localize_table(result))
        spans = "  ".join(f"[bold]{escape(s['label'])}[/] {s['start']}-{s['end']} s" for s in result.spans)
        console.print(f"{escape(result.video)}: {spans}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
# avepipe weights


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f} MB"


class DownloadProgress:
    """One bar per weights file (bytes, speed, time left); retries are announced on stderr."""

    def __init__(self, console: Console, errors: Console):
        from rich.progress import (
            DownloadColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.errors = errors
        self.progress = Progress(TextColumn("[bold]{task.fields[name]}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> DownloadProgress:
        return self  # the bars start with the first download (nothing to draw when every file is present)

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.progress.stop()

    def update(self, event: str, fields: dict[str, Any]) -> None:
        name = fields["name"]
        if event == "start":
            task = self.tasks.get(name)
            if task is None:
                if not self.tasks:
                    self.progress.start()
                self.tasks[name] = self.progress.add_task("", total=fields["total"], completed=fields["resumed"],
                                                          name=name)
            else:  # a retry: the bar restarts from what the .part holds now
                self.progress.reset(task, total=fields["total"], completed=fields["resumed"])
            if fields["resumed"]:
                self.progress.console.print(
                    f"{name}: resuming at {_megabytes(fields['resumed'])} ({escape(fields['url'])})")
        elif event == "advance" and name in self.tasks:
            self.progress.advance(self.tasks[name], fields["bytes"])
        elif event == "retry":
            self.errors.print(f"[yellow]retry {fields['attempt']}/{fields['retries']}[/] {name}: "
                              f"{escape(fields['message'])}", soft_wrap=True)


def render_unreachable(errors: Console, outcomes: list, remedy: str) -> list:
    """The failures of files whose host this machine cannot reach (offline, no DNS), as one line naming the hosts,
    the files and ``remedy``; returns the other outcomes."""
    offline = [item for item in outcomes if getattr(item, "unreachable", "")]
    if offline:
        hosts = ", ".join(dict.fromkeys(item.unreachable for item in offline))
        names = ", ".join(item.name for item in offline)
        reason = offline[0].message.rsplit(": ", 1)[-1]
        errors.print(f"[bold red]error:[/] this machine cannot reach {escape(hosts)} ({escape(reason)}): "
                     f"{escape(names)} not downloaded; {remedy}", soft_wrap=True)
    return [item for item in outcomes if not getattr(item, "unreachable", "")]


def render_weights_outcomes(console: Console, errors: Console, outcomes: list) -> None:
    """One line per item of ``avepipe weights download`` / ``import``: done on stdout, failures on stderr; the files
    of a host this machine cannot reach in one line with the ways around it."""
    outcomes = render_unreachable(errors, outcomes, "copy them from a machine that can, then `avepipe weights import "
                                                    "FILE...`, or use --mirror URL|FOLDER")
    for item in outcomes:
        message = escape(item.message)
        if item.status == "failed":
            errors.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        elif item.status == "present":
            console.print(f"{item.name}: {escape(item.path)} {message}", soft_wrap=True)
        elif item.official:
            console.print(f"{item.name}: {item.status} {escape(item.path)} ({message})", soft_wrap=True)
        else:
            errors.print(f"[bold yellow]WARNING:[/] {item.name}: {item.status} {escape(item.path)} ({message}); "
                         f"features "
                         "computed with it are NOT the published AVE features", soft_wrap=True)


def render_dataset_outcomes(console: Console, errors: Console, outcomes: list) -> None:
    """One line per item of ``avepipe dataset download-ave``: done on stdout, failures on stderr, and a file accepted
    without a published checksum (trust on first use) as a loud warning on stderr; the files of a host this machine
    cannot reach in one line with the way around it."""
    outcomes = render_unreachable(errors, outcomes, "use --mirror URL|FOLDER with a copy of the release")
    for item in outcomes:
        message = escape(item.message)
        if item.status == "failed":
            errors.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        elif not item.official:
            errors.print(f"[bold yellow]WARNING:[/] {item.name}: {item.status} {escape(item.path)}: {message}",
                         soft_wrap=True)
        else:
            console.print(f"{item.name}: {item.status} {escape(item.path)} ({message})", soft_wrap=True)


def _state_text(status) -> str:
    if status.state == "official":
        return "[green]official[/]"
    if status.state == "unofficial":
        record = status.record or {}
        return f"[yellow]unofficial[/] (imported {record.get('date', '?')} from {escape(record.get('source', '?'))})"
    if status.state == "mismatch":
        return "[bold red]MISMATCH[/] (neither the official file nor a recorded import)"
    return "-"


def weights_list_records(statuses: list) -> list[dict[str, Any]]:
    """``weights list --json``: one object per manifest file (name, file, path, state, official, size, sha256, url)."""
    from avepipe.backbones.download import source_url
    from avepipe.backbones.weights import expected_checksum

    return [{"name": s.name, "file": s.entry["file"], "path": str(s.path), "state": s.state,
             "present": s.state != "missing", "official": s.state == "official",
             "size": s.size if s.size is not None else s.entry.get("size"), "sha256": s.sha256,
             "expected": expected_checksum(s.entry), "partial_bytes": s.partial, "url": source_url(s.entry)}
            for s in statuses]


def render_weights_list(console: Console, statuses: list, directory: Path) -> None:
    """The manifest's files as a table; names and file names are never cut (folded at most). On a terminal narrower
    than 120 columns the URLs follow the table, one whole line each (they are there to be copied)."""
    from avepipe.backbones.download import source_url

    wide = console.width >= 120
    table = Table(title=f"weights in {escape(str(directory))}")
    columns = ("name", "file", "present", "official", "size") + (("url",) if wide else ())
    for column in columns:
        # The URL is folded, never cut: it is there to be copied.
        table.add_column(column, justify="right" if column == "size" else "left",
                         no_wrap=column in ("name", "size"), overflow="fold",
                         min_width=20 if column == "url" else None)
    for status in statuses:
        if status.state != "missing":
            present = "yes"
        elif status.partial is not None:
            present = f"[yellow]no[/] (partial download: {_megabytes(status.partial)})"
        else:
            present = "[yellow]no[/]"
        size = status.size if status.size is not None else status.entry.get("size")
        row = [status.name, status.entry["file"], present, _state_text(status), _megabytes(size)]
        table.add_row(*row, *([escape(source_url(status.entry))] if wide else []))
    console.print(table)
    if not wide:
        for status in statuses:
            console.print(f"{status.name}: {escape(source_url(status.entry))}", soft_wrap=True)


def _short(checksum: str | None) -> str:
    """``sha256 bde7da0dfd621cbf…``: enough to tell files apart in a table (error lines print the whole checksum)."""
    if checksum is None:
        return "-"
    kind, _, digest = checksum.rpartition(" ")
    return f"{kind} {digest[:16]}…" if len(digest) > 16 else checksum


def render_weights_verify(console: Console, statuses: list, directory: Path) -> None:
    from avepipe.backbones.weights import expected_checksum

    table = Table(title=f"verify {directory}")
    for column in ("name", "file", "status", "checksum", "manifest"):
        table.add_column(column)
    for status in statuses:
        state = "[yellow]missing[/]" if status.state == "missing" else _state_text(status)
        table.add_row(status.name, status.entry["file"], state, _short(status.actual),
                      _short(expected_checksum(status.entry)))
    console.print(table)
