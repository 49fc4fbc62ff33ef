"""What a finished command prints: the extract / decode summary table and the per-device rows, a cache's listing,
training's summary, and localize's per-second labels with their spans. No pipeline logic here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from avepipe.render.progress import plural


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
