"""Live progress on the terminal while a command runs: ``--progress`` modes (a bar, plain log lines, nothing), the
extract / decode / localize display (:class:`ExtractProgress`, :class:`LocalizeProgress`) and training's one line per
epoch (:class:`TrainProgress`), with the small formatters they share (:func:`clock`, :func:`plural`). No pipeline logic
here.
"""

from __future__ import annotations

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
from rich.table import Column
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


class LocalizeProgress(ExtractProgress):
    """Extraction progress for localize; labelling itself is quick and shows no bar. Each failure is printed once, with
    the labels (:func:`render_localize`), never by the progress display; each warning once, however often it is
    emitted."""

    def __init__(self, console: Console, errors: Console, label: str = "extract", mode: str = "auto"):
        super().__init__(console, errors, label, print_failures=False, mode=mode)

    def update(self, event: str, fields: dict[str, Any]) -> None:
        if event != "labelled":
            super().update(event, fields)
