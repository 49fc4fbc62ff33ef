"""The ``avepipe weights`` and ``avepipe dataset`` displays: one download bar per file, each item's outcome (the
files of an unreachable host in one line), the weights listing and the checksum verification. No pipeline logic here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table


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
