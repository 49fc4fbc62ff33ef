"""Rich rendering for the CLI (progress bars, tables). No pipeline logic here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.3g} videos/s", style="cyan")


class ExtractProgress:
    """Receives extract events and shows a progress bar with videos/s; warnings and failures go to stderr."""

    def __init__(self, console: Console, errors: Console):
        self.errors = errors
        self.progress = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False)
        self.task = None

    def __enter__(self) -> "ExtractProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, event: str, fields: dict[str, Any]) -> None:
        if event == "warning":
            self.errors.print(f"[bold yellow]WARNING:[/] {fields['message']}", soft_wrap=True)
        elif event == "start":
            self.task = self.progress.add_task(f"on {fields['device']}", total=fields["todo"])
            if fields["skipped"]:
                self.progress.console.print(f"{fields['skipped']} videos already in the cache: skipped")
        elif event == "video" and self.task is not None:
            self.progress.advance(self.task)
            if fields["status"] == "failed":
                self.errors.print(f"[red]failed:[/] {fields['error']}", soft_wrap=True)


def render_extract_report(console: Console, errors: Console, report, cache: Path) -> None:  # noqa: ANN001
    table = Table(title=f"extract summary: {cache}", show_header=True)
    for column in ("videos", "extracted", "skipped", "failed", "seconds of video", "time", "videos/s"):
        table.add_column(column, justify="right")
    rate = len(report.done) / report.elapsed_s if report.elapsed_s > 0 else 0.0
    table.add_row(str(report.total), str(len(report.done)), str(len(report.skipped)),
                  str(len(report.failed) + len(report.previously_failed)), str(report.seconds_of_video),
                  f"{report.elapsed_s:.1f} s", f"{rate:.3g}")
    console.print(table)
    for vid, message in sorted(report.failed.items()):
        errors.print(f"[red]failed[/] {vid}: {message}", soft_wrap=True)
    for vid, message in sorted(report.previously_failed.items()):
        errors.print(f"[yellow]failed earlier[/] {vid}: {message} (use --retry-failed)", soft_wrap=True)
    for text in report.warnings:
        errors.print(f"[bold yellow]WARNING:[/] {text}", soft_wrap=True)


def render_cache(console: Console, reader, failed_only: bool = False) -> None:  # noqa: ANN001
    spec = reader.spec or {}
    if not failed_only:
        entries = reader.all_attrs()
        table = Table(title=f"{reader.path}: {len(entries)} videos, sampling={spec.get('sampling', '?')}, audio={spec.get('audio', '?')}")
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
    """One line per epoch: loss, val metric, best so far."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=console)
        self.task = None

    def __enter__(self) -> "TrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def seed(self, seed: int) -> None:
        self.console.print(f"[bold]seed {seed}[/]")
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = None

    def epoch(self, record: dict[str, Any]) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=record["epochs"], completed=record["epoch"] - 1)
        metric = record["metric"]
        text = (f"loss {record['loss']:.4f}  val {metric} {record['val_' + metric]:.4f}  best {record['best']:.4f}"
                f"{'  *' if record['improved'] else ''}")
        self.progress.update(self.task, advance=1, description=text)
        self.progress.console.print(f"epoch {record['epoch']:4d}/{record['epochs']}  {text}  ({record['seconds']:.2f} s)")


def render_train_summary(console: Console, result: dict[str, Any], out: Path) -> None:
    metric = result["metric"]
    if "seeds" in result:
        val, test = result[f"val_{metric}"], result[f"test_{metric}"]
        console.print(f"{len(result['seeds'])} seeds: val {metric} {val['mean']:.4f} ± {val['std']:.4f}, "
                      f"test {metric} {test['mean']:.4f} ± {test['std']:.4f}  ({out}/summary.json)")
    else:
        console.print(f"best epoch {result['best_epoch']} (chosen on val): val {metric} {result['val_' + metric]:.4f}, "
                      f"test {metric} {result['test_' + metric]:.4f}  ({out}/checkpoint.pt, {out}/metrics.json)")
