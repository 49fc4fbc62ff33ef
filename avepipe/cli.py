"""The ``avepipe`` command line. Thin: parse options, call the stage functions, render with rich.

Commands raise; they never print errors or pick exit codes themselves. :func:`exit_code` (the only place that does)
turns what a command raises into a one-line message on stderr and the exit code of :mod:`avepipe.errors`: 0 success;
1 some videos failed (listed, and stored under /failed in the cache); 2 usage error (bad option, unreadable list,
locked cache, mixed feature specs, missing weights, unusable data or checkpoint); 3 internal error (a bug: one line,
``AVEPIPE_DEBUG=1`` shows the traceback; running out of memory is not one: exit 2 with the remedy); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from avepipe.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE_CLOSED,
    EXIT_SOME_FAILED,
    EXIT_TERMINATED,
    AvepipeError,
    ResourceError,
    UsageError,
)

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


# --- errors -> exit codes: the one place -----------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a command that can say what it kept (see :func:`on_interrupt`)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (finished videos are kept) and exits with 143."""


@contextmanager
def on_interrupt(hint: str) -> Iterator[None]:
    """Ctrl-C inside the block is reported as ``interrupted: <hint>``."""
    try:
        yield
    except Terminated:
        raise Terminated(hint) from None
    except KeyboardInterrupt:
        raise Interrupted(hint) from None


def exit_code(exc: BaseException) -> int:
    """The exit code for what a command raised, after printing its one line on stderr."""
    if isinstance(exc, AvepipeError):
        errors.print(f"[bold red]error:[/] [red]{escape(str(exc))}[/]", soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):  # `avepipe ... | head`: the reader has what it wanted; no message
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more reaches the closed pipe at exit
        return EXIT_PIPE_CLOSED
    if isinstance(exc, KeyboardInterrupt):
        terminated = isinstance(exc, Terminated) or isinstance(exc.__context__, Terminated)
        word = "terminated (SIGTERM)" if terminated else "interrupted"
        errors.print(f"[yellow]{word}[/]{': ' + escape(str(exc)) if str(exc) else ''}", soft_wrap=True)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    if out_of_memory(exc):  # a small container, `ulimit -v`, a full GPU: the remedy, not a bug report
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no details"
        return exit_code(ResourceError(
            f"out of memory ({type(exc).__name__}: {detail}): use a smaller --batch-size and fewer --workers (each "
            "decode worker holds a few seconds of frames), or give the job more memory"))
    # A bug, not bad input: one line, the traceback only on request.
    errors.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (set AVEPIPE_DEBUG=1 for the "
                 "traceback and please report it)", soft_wrap=True)
    return EXIT_INTERNAL


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is an allocation failure: Python's MemoryError (numpy's too), torch's CPU
    allocator ("DefaultCPUAllocator: can't allocate memory") and CUDA out-of-memory errors, ENOMEM from the system."""
    import errno

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
            return True
        if isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _OOM_WORDS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class _Commands(TyperGroup):
    """Runs the chosen command and hands whatever it raises to :func:`exit_code`; shows flags as flags in help."""

    def get_params(self, ctx: Any) -> list:
        return _flags_without_type(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        try:
            with loud_warnings():  # e.g. --device auto on the CPU: one loud line, whichever command
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # exit codes, --help and option errors: typer's own
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if os.environ.get("AVEPIPE_DEBUG") and not isinstance(exc, (AvepipeError, KeyboardInterrupt)):
                raise
            raise typer.Exit(exit_code(exc)) from None


class _Command(TyperCommand):
    """A command whose help shows flags as flags."""

    def get_params(self, ctx: Any) -> list:
        return _flags_without_type(super().get_params(ctx))


def _flags_without_type(params: list) -> list:
    """``--pca`` rather than ``--pca <bool>`` in help: a flag takes no value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


EXIT_CODES_HELP = ("[bold]Exit codes:[/] 0 success · 1 some videos failed (listed, and recorded) · 2 usage error "
                   "(bad option or input file, missing weights, locked cache) · 3 internal error (a bug; "
                   "AVEPIPE_DEBUG=1 shows the traceback) · 130 Ctrl-C · 143 SIGTERM")


def epilog(*examples: str) -> str:
    """A command's help epilog: examples, then the exit codes."""
    lines = ["[bold]Examples:[/]", *(f"  {escape(example)}" for example in examples), "", EXIT_CODES_HELP]
    return "\n".join(lines)


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


app = typer.Typer(cls=_Commands, no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP_OPTIONS,
                  help="Audio-visual event localization: raw video -> features -> models -> per-second labels.",
                  epilog=epilog("avepipe localize video.mp4 --checkpoint runs/avel/checkpoint.pt",
                                "avepipe extract videos/ --cache features.h5",
                                "avepipe train --model avel --dataset ~/.cache/avepipe/datasets/ave --out runs/avel"))
cache_app = typer.Typer(cls=_Commands, no_args_is_help=True, context_settings=HELP_OPTIONS,
                        help="Inspect and merge feature caches.")
app.add_typer(cache_app, name="cache")
dataset_app = typer.Typer(cls=_Commands, no_args_is_help=True, context_settings=HELP_OPTIONS,
                          help="Datasets: the AVE release, your own videos, label files.")
app.add_typer(dataset_app, name="dataset")
weights_app = typer.Typer(cls=_Commands, no_args_is_help=True, context_settings=HELP_OPTIONS,
                          help="Pretrained backbone weights: list, download, import, verify.")
app.add_typer(weights_app, name="weights")


def _print_version(value: bool) -> None:
    if value:
        from avepipe.version import __version__

        console.print(f"avepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Audio-visual event localization: raw video -> features -> models -> per-second labels."""


# --- options shared by several commands ------------------------------------------------------------------------------
# Paths are Path. The weights options are str: a file or the word "random"; localize's --out / --plot are str too,
# since Path() drops the trailing "/" that marks a directory.

Videos = Annotated[Optional[List[Path]], typer.Argument(help="Video files and/or directories (searched recursively).")]
ListFile = Annotated[Optional[Path], typer.Option(
    "--list", help="Text file with one video path per line (relative paths are relative to the list file's folder; "
                   "lines starting with # are skipped).")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Vgg19Weights = Annotated[Optional[str], typer.Option(help="Keras VGG-19 no-top .h5 (default: weights dir).")]
VggishWeights = Annotated[Optional[str], typer.Option(
    help="torchvggish state dict .pth, or 'random' (NOT real features).")]
Precision = Annotated[str, typer.Option(
    help="auto (bf16 on a GPU with native bf16, compute capability 8.0+; else fp32), fp32, bf16 or fp16.")]
Shard = Annotated[Optional[str], typer.Option(
    help="K/N: only the videos whose id hashes to shard K of N (K from 0).")]
RetryFailed = Annotated[bool, typer.Option("--retry-failed", help="Retry videos recorded as failed in the cache.")]
Checkpoint = Annotated[Path, typer.Option("--checkpoint", help="checkpoint.pt written by `avepipe train`.")]
Features = Annotated[Path, typer.Option("--features", help="Feature cache (.h5).")]
Annotations = Annotated[Path, typer.Option("--annotations", help="Annotations.txt.")]
Dataset = Annotated[Optional[Path], typer.Option(
    "--dataset", help="Dataset folder: features.h5, Annotations.txt, splits, categories.txt (default: "
                      "$AVEPIPE_DATA_DIR, else ~/.cache/avepipe/datasets/ave; docs/datasets.md).")]
DatasetFeatures = Annotated[Optional[Path], typer.Option(
    "--features", help="Feature cache (.h5) (default: DATASET/features.h5).")]
DatasetAnnotations = Annotated[Optional[Path], typer.Option(
    "--annotations", help="Annotations.txt; splits and categories.txt are looked for beside it (default: "
                          "DATASET/Annotations.txt).")]
Categories = Annotated[Optional[Path], typer.Option(help="categories.txt (default: beside the annotations).")]
Splits = Annotated[Optional[Path], typer.Option(
    help="Folder with the split/order files (default: beside the annotations).")]
WeightNames = Annotated[Optional[List[str]], typer.Argument(help="Manifest names (default: all).")]
ProgressMode = Annotated[str, typer.Option(
    "--progress", help="auto (a bar on a terminal, else plain lines), bar, log (a line per finished item and every "
                       "$AVEPIPE_PROGRESS_INTERVAL s, default 30) or none.")]


def plural(count: int, word: str) -> str:
    """``1 video``, ``2 videos``."""
    from avepipe.render import plural as _plural

    return _plural(count, word)


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/4 (K counts from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


# --- extract / localize ----------------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog=epilog(
    "avepipe extract videos/ --cache features.h5",
    "avepipe extract --list files.txt --cache features.h5 --device cuda --shard 0/4",
    "avepipe extract videos/ --cache features.h5 --retry-failed"))
def extract(
    paths: Videos = None,
    cache: Annotated[Path, typer.Option("--cache", help="HDF5 feature cache to create or complete.")] = ...,
    list_file: ListFile = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto (the default).")] = None,
    batch_size: Annotated[int, typer.Option(help="Frames per VGG-19 forward (0: 128 on GPU, 32 on CPU).")] = 0,
    workers: Annotated[int, typer.Option(help="Decoder processes (-1: one per CPU; 0: decode in this process). "
                                              "With --devices: per device (-1: CPUs / devices).")] = -1,
    vgg19_weights: Vgg19Weights = None,
    vggish_weights: VggishWeights = None,
    pca: Annotated[bool, typer.Option("--pca", help="Apply VGGish PCA + 8-bit quantisation (off in the AVE spec).")
                   ] = False,
    pca_params: Annotated[Optional[Path], typer.Option(help="vggish_pca_params.npz (default: weights dir).")] = None,
    sampling: Annotated[str, typer.Option(help="ave: AVE-compatible (all frames, OpenCV-like resize); fps: ffmpeg "
                                               "fps=16 + scale (faster, approximate).")] = "ave",
    precision: Precision = "auto",
    shard: Shard = None,
    devices: Annotated[Optional[str], typer.Option(
        help="e.g. cuda:0,cuda:1: one process per device on shard K of N, merged into --cache (instead of --device/"
             "--shard).")] = None,
    retry_failed: RetryFailed = False,
    from_decoded: Annotated[Optional[Path], typer.Option(
        help="Read frames + log-mel from a store written by `avepipe decode` instead of decoding the videos.")] = None,
    progress_mode: ProgressMode = "auto",
) -> None:
    """Extract AVE-compatible VGG-19 pool5 + VGGish features into a resumable HDF5 cache."""
    from avepipe.extract import run_extract
    from avepipe.inputs import discover
    from avepipe.render import ExtractProgress, render_device_results, render_extract_report
    from avepipe.settings import ExtractConfig

    if devices is not None and (device is not None or shard is not None):
        raise UsageError("--devices runs shard K of N on the K-th device itself: give it without --device and --shard")
    config = ExtractConfig(
        device=device or "auto", batch_size=batch_size, workers=workers, vgg19_weights=vgg19_weights,
        vggish_weights=vggish_weights, pca=pca, pca_params=pca_params, sampling=sampling, precision=precision,
        shard=parse_shard(shard), retry_failed=retry_failed,
        from_decoded=str(from_decoded) if from_decoded else None,
    )
    videos = discover(paths or [], list_file)
    with on_interrupt("finished videos are kept; run the same command again to continue"):
        with ExtractProgress(console, errors, mode=progress_mode) as progress:
            if devices is None:
                report = run_extract(videos, cache, config, progress.update)
            else:
                from avepipe.multi_device import parse_devices, run_multi_device

                report = run_multi_device(videos, cache, parse_devices(devices), config, progress.update)
    render_extract_report(console, errors, report, cache, printed=progress.printed)
    if devices is not None:
        render_device_results(console, errors, report.devices)
    raise typer.Exit(report.exit_code)


@app.command(cls=_Command, epilog=epilog(
    "avepipe decode videos/ --out frames.h5",
    "avepipe extract videos/ --cache features.h5 --from-decoded frames.h5"))
def decode(
    paths: Videos = None,
    out: Annotated[Path, typer.Option("--out", help="HDF5 store of decoded frames to create or complete.")] = ...,
    list_file: ListFile = None,
    workers: Annotated[int, typer.Option(help="Decoder processes (-1: one per CPU; 0: decode in this process).")
                       ] = -1,
    sampling: Annotated[str, typer.Option(help="ave (AVE-compatible) or fps (see `extract`).")] = "ave",
    shard: Shard = None,
    retry_failed: RetryFailed = False,
    progress_mode: ProgressMode = "auto",
) -> None:
    """Decode videos into the selected 224x224 frames + VGGish log-mel (no backbones): decode on CPU nodes, then
    `avepipe extract --from-decoded` on GPU nodes. Resumable like extract."""
    from avepipe.decoded import run_decode
    from avepipe.inputs import discover
    from avepipe.render import ExtractProgress, render_extract_report
    from avepipe.settings import ExtractConfig

    config = ExtractConfig(workers=workers, sampling=sampling, shard=parse_shard(shard), retry_failed=retry_failed)
    videos = discover(paths or [], list_file)
    with on_interrupt("finished videos are kept; run the same command again to continue"):
        with ExtractProgress(console, errors, label="decode", mode=progress_mode) as progress:
            report = run_decode(videos, out, config, progress.update)
    render_extract_report(console, errors, report, out, what="decode", printed=progress.printed)
    raise typer.Exit(report.exit_code)


@app.command(cls=_Command, epilog=epilog(
    "avepipe localize video.mp4 --checkpoint runs/avel/checkpoint.pt",
    "avepipe localize videos/ --checkpoint ckpt.pt --cache f.h5 --format json --out labels/ --plot plots/"))
def localize(
    paths: Videos = None,
    checkpoint: Checkpoint = ...,
    list_file: ListFile = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", help="Write --format here: a file, a directory (DIR/: one file per video) or - (stdout; the default "
                      "for json, csv and jsonl when stdout is not a terminal).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table (terminal), json, csv or jsonl.")] = "table",
    plot: Annotated[Optional[str], typer.Option(
        help="Timeline PNG: a file (one video) or a directory (DIR/: <id>.png each).")] = None,
    html: Annotated[Optional[str], typer.Option(
        "--html", help="HTML page with the video beside its labels (click a second to play it): a file (one video) "
                       "or a directory (DIR/: <id>.html each). Videos up to 20 MB are embedded, bigger ones linked.")
                    ] = None,
    cache: Annotated[Optional[Path], typer.Option(
        "--cache", help="Keep features here; a second run on the same video skips extraction.")] = None,
    device: Device = "auto",
    workers: Annotated[int, typer.Option(help="Decoder processes (-1: none for one video, else one per CPU).")] = -1,
    vgg19_weights: Vgg19Weights = None,
    vggish_weights: VggishWeights = None,
    pca_params: Annotated[Optional[Path], typer.Option(
        help="vggish_pca_params.npz, for checkpoints trained on PCA audio.")] = None,
    precision: Precision = "auto",
    shard: Shard = None,
    retry_failed: RetryFailed = False,
    query_audio: Annotated[Optional[Path], typer.Option(help="CML A2V checkpoint: file whose audio is the query.")
                           ] = None,
    query_video: Annotated[Optional[Path], typer.Option(help="CML V2A checkpoint: video whose frames are the query.")
                           ] = None,
    query_span: Annotated[Optional[str], typer.Option(help="START-END seconds of the query file, e.g. 3-6.")] = None,
    progress_mode: ProgressMode = "auto",
) -> None:
    """Per-second event labels for any video (>= 1 s) with a trained checkpoint; spans, files, a timeline picture and
    an HTML page."""
    import sys

    from avepipe.inputs import assign_ids, discover, select_shard
    from avepipe.localization import LocalizeConfig, localize_videos, parse_span
    from avepipe.outputs import check_outputs, check_single_target, get_writer, output_paths, write_results
    from avepipe.render import LocalizeProgress, render_localize

    if fmt != "table":
        get_writer(fmt)  # an unknown format fails here, before any work
        if out is None and sys.stdout.isatty():
            raise UsageError(f"--format {fmt} needs --out FILE, --out DIR/ or --out - (stdout)")
    # `--out -`, or no --out where stdout is a pipe or a file: the labels are stdout's only content (whisper's and the
    # Unix convention); progress, warnings, failures and "wrote" lines go to stderr.
    to_stdout = fmt != "table" and out in (None, "-")
    said = errors if to_stdout else console
    videos = discover(paths or [], list_file)
    ids = list(select_shard(assign_ids(videos), parse_shard(shard)))
    targets = {}
    if not to_stdout and out is not None:
        targets["--out"] = output_paths(out, ids, fmt)
    for option, target, suffix in (("--plot", plot, "png"), ("--html", html, "html")):
        if target is not None:
            check_single_target(option, target, len(ids))  # several videos need DIR/: refused before any work
            targets[option] = output_paths(target, ids, suffix)
    check_outputs(targets, [*videos, checkpoint, list_file, cache, query_audio, query_video, vgg19_weights,
                            vggish_weights, pca_params])
    config = LocalizeConfig(
        checkpoint=checkpoint, cache=cache, device=device, workers=workers, vgg19_weights=vgg19_weights,
        vggish_weights=vggish_weights, pca_params=pca_params, precision=precision, shard=parse_shard(shard),
        retry_failed=retry_failed, query_audio=query_audio, query_video=query_video,
        query_span=parse_span(query_span) if query_span else None,
    )
    # progress on stderr: stdout carries the labels
    with LocalizeProgress(errors, errors, mode=progress_mode) as progress:
        results, _ = localize_videos(paths or [], config, list_file=list_file, progress=progress.update)
    render_localize(said, errors, results, show_seconds=fmt == "table", show_spans=not to_stdout)
    if to_stdout:
        sys.stdout.write(get_writer(fmt)(results))
        sys.stdout.flush()
    elif out is not None:
        for path in write_results(results, fmt, out):
            said.print(f"wrote {escape(str(path))}", soft_wrap=True)
    if plot is not None:
        from avepipe.timeline import save_timelines

        for path in save_timelines(results, plot):
            said.print(f"wrote {escape(str(path))}", soft_wrap=True)
    if html is not None:
        from avepipe.report_html import save_reports

        for path in save_reports(results, html):
            said.print(f"wrote {escape(str(path))}", soft_wrap=True)
    raise typer.Exit(EXIT_SOME_FAILED if any(r.error for r in results) else EXIT_OK)


# --- avepipe cache: ls / merge / upgrade ------------------------------------------------------------------------------

LS_SUMMARY_OVER = 50  # `cache ls` of a store with more entries: a summary unless --limit / --all


@cache_app.command("ls", cls=_Command, epilog=epilog(
    "avepipe cache ls features.h5",
    "avepipe cache ls features.h5 --failed",
    "avepipe cache ls features.h5 --limit 20",
    "avepipe cache ls features.h5 --json"))
def cache_ls(
    cache: Annotated[Path, typer.Argument(help="Cache file.")],
    failed: Annotated[bool, typer.Option("--failed", help="List only the failures.")] = False,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=0, help=f"List the first N videos (more than {LS_SUMMARY_OVER}: a summary by default).")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="List every video, however many.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: the summary and the rows listed.")] = False,
) -> None:
    """List the videos in a cache or a decoded-frames store (and its recorded failures); a summary for a large one."""
    from avepipe.cache import FeatureCache, file_format
    from avepipe.decoded import DecodedStore
    from avepipe.render import render_cache

    kind = DecodedStore if file_format(cache) == DecodedStore.FORMAT else FeatureCache  # `avepipe decode`'s store too
    reader = kind(cache, "r")
    entries, failures = reader.all_attrs(), reader.failures()
    if all_rows:
        shown = entries
    elif limit is not None:
        shown = dict(list(entries.items())[:limit])
    else:
        shown = entries if len(entries) <= LS_SUMMARY_OVER else {}
    if as_json:
        import json

        summary = reader.summary(entries, failures)
        summary["rows"] = [] if failed else [{"id": vid, **attrs} for vid, attrs in shown.items()]
        failed_shown = list(failures.items())
        if not (failed or all_rows or len(shown) == len(entries)):
            failed_shown = failed_shown[:limit or 0]
        summary["failed_rows"] = [{"id": vid, **record} for vid, record in failed_shown]
        typer.echo(json.dumps(summary, default=str))
        return
    if failed or len(shown) == len(entries):
        render_cache(console, reader, failed_only=failed)
        return
    if shown:
        render_cache(console, _Listed(reader, shown, {}))
        console.print(f"first {plural(len(shown), 'video')} of {len(entries):,} (--all lists every one)")
    render_cache_summary(console, reader.summary(entries, failures), listed=bool(shown))


class _Listed:
    """A reader seen through the rows ``cache ls`` lists (for :func:`avepipe.render.render_cache`)."""

    def __init__(self, reader: Any, entries: dict[str, Any], failures: dict[str, Any]):
        self._reader, self._entries, self._failures = reader, entries, failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def all_attrs(self) -> dict[str, Any]:
        return self._entries

    def failures(self) -> dict[str, Any]:
        return self._failures


def render_cache_summary(out: Any, summary: dict[str, Any], listed: bool = False) -> None:
    """The summary ``cache ls`` prints for a store of more than LS_SUMMARY_OVER entries."""
    seconds = summary["seconds_of_video"]
    out.print(f"{summary['path']}: {summary['entries']:,} videos, {summary['failures']:,} failed, {seconds:,} s of "
              f"video ({seconds / 3600:.1f} h), {summary['size_bytes'] / 1e6:,.1f} MB, format_version "
              f"{summary['format_version']}" + (f", {summary['staged_entries']:,} staged (not yet compacted)"
                                                if summary["staged_entries"] else ""), soft_wrap=True)
    spec = summary["spec"] or {}
    out.print("spec: " + (", ".join(f"{k}={v}" for k, v in sorted(spec.items()) if not k.endswith("sha256"))
                          or "none recorded"), soft_wrap=True)
    weights = summary.get("weights")
    if weights:
        parts = [f"{name} official in {w['official']:,} of {summary['entries']:,}"
                 + (f" ([yellow]{w['unofficial']:,} unofficial[/])" if w["unofficial"] else "")
                 for name, w in (("VGG-19", weights["vgg19"]), ("VGGish", weights["vggish"]))]
        out.print("weights: " + "; ".join(parts), soft_wrap=True)
    if not listed:
        out.print(f"more than {LS_SUMMARY_OVER} videos: a summary (--limit N lists the first N, --all every one, "
                  f"--failed the failures, --json all of it for a program)", soft_wrap=True)


@cache_app.command("merge", cls=_Command, epilog=epilog("avepipe cache merge shard-0.h5 shard-1.h5 --out features.h5"))
def cache_merge(
    inputs: Annotated[List[Path], typer.Argument(help="Caches to join (same feature spec).")],
    out: Annotated[Path, typer.Option("--out", help="Output cache.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    allow_unsharded: Annotated[bool, typer.Option(
        "--allow-unsharded", help="Also take caches written without --shard along with shard caches.")] = False,
) -> None:
    """Join caches into one. Shard caches (extract --shard K/N) must be all N shards of one run; refuses caches built
    with different feature specs and caches still being written."""
    from avepipe.cache import merge

    count = merge(inputs, out, overwrite=overwrite, allow_unsharded=allow_unsharded)
    console.print(f"merged {len(inputs)} caches into {out}: {plural(count, 'video')}")


@cache_app.command("upgrade", cls=_Command, epilog=epilog("avepipe cache upgrade features.h5"))
def cache_upgrade(
    cache: Annotated[Path, typer.Argument(help="Cache file (or decoded store) to rewrite in the current format.")],
) -> None:
    """Rewrite a cache of an older format_version in the current one (any writer also does it at its next
    compaction); refuses a cache still being written."""
    from avepipe.cache import upgrade
    from avepipe.decoded import DecodedStore

    before, after, count = upgrade(cache, kinds=[DecodedStore])
    if before == after:
        console.print(f"{cache}: already format_version {after} ({plural(count, 'video')})")
    else:
        console.print(f"{cache}: format_version {before} -> {after} ({plural(count, 'video')})")


# --- avepipe weights: list / download / import / verify (avepipe/backbones/weights.py, download.py) -------------------


@weights_app.command("list", cls=_Command, epilog=epilog("avepipe weights list", "avepipe weights list --json"))
def weights_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of the table (for scripts).")
                       ] = False,
) -> None:
    """The manifest's weight files: present or not, official or not, size and download URL."""
    from avepipe.backbones.weights import select_names, weights_dir, weights_status
    from avepipe.render import render_weights_list, weights_list_records

    statuses = [weights_status(name) for name in select_names(None)]
    if as_json:
        import json

        print(json.dumps(weights_list_records(statuses), indent=2))
    else:
        render_weights_list(console, statuses, weights_dir())


@weights_app.command("download", cls=_Command, epilog=epilog(
    "avepipe weights download",
    "avepipe weights download vgg19 --mirror https://mirror.example.org/avepipe"))
def weights_download(
    names: WeightNames = None,
    mirror: Annotated[Optional[str], typer.Option(
        "--mirror", help="Base URL (fetch <URL>/<file>) or local folder (copy <folder>/<file>) instead of the "
                         "manifest URL; checksums are still verified (env AVEPIPE_WEIGHTS_MIRROR).")
    ] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a present file that does not match the manifest.")] = False,
    retries: Annotated[int, typer.Option(help="Retries after a dropped connection (each resumes the download).")] = 3,
) -> None:
    """Download weights into the weights dir: checksum-verified, atomic, resumable (re-run to continue)."""
    from avepipe.backbones.download import download
    from avepipe.backbones.weights import select_names, weights_dir
    from avepipe.render import DownloadProgress, render_weights_outcomes

    selected = select_names(names)
    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    with on_interrupt("the partial download is kept as <file>.part; run the same command again to resume"):
        with DownloadProgress(console, errors) as progress:
            outcomes = download(selected, weights_dir(), mirror=mirror, progress=progress.update, force=force,
                                retries=retries)
    render_weights_outcomes(console, errors, outcomes)
    raise typer.Exit(EXIT_SOME_FAILED if any(item.status == "failed" for item in outcomes) else EXIT_OK)


@weights_app.command("import", cls=_Command, epilog=epilog(
    "avepipe weights import ~/Downloads/vggish-10086976.pth",
    "avepipe weights import /mnt/usb/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 /mnt/usb/vggish-10086976.pth"))
def weights_import(
    files: Annotated[List[Path], typer.Argument(help="Weights files you already have (each found by its checksum).")],
    as_name: Annotated[Optional[str], typer.Option(
        "--as", help="Manifest name it stands for (one file only; default: found by checksum).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Import it even if it is not the official file (recorded as unofficial).")] = False,
) -> None:
    """Copy weights files into the weights dir under their manifest names, after checking each is the official file.
    """
    from avepipe.backbones.download import import_file
    from avepipe.errors import WeightsError
    from avepipe.render import render_weights_outcomes

    if as_name is not None and len(files) > 1:
        raise UsageError(f"--as {as_name} names the entry of one file, not of {len(files)}: import them one by one")
    missing = [str(file) for file in files if not file.is_file()]
    if missing:  # refused before anything is copied
        raise WeightsError(f"{', '.join(missing)}: no such file")
    outcomes = [import_file(file, as_name, force=force) for file in files]
    render_weights_outcomes(console, errors, outcomes)
    raise typer.Exit(EXIT_SOME_FAILED if any(item.status == "failed" for item in outcomes) else EXIT_OK)


@weights_app.command("verify", cls=_Command, epilog=epilog("avepipe weights verify", "avepipe weights verify vgg19"))
def weights_verify(names: WeightNames = None) -> None:
    """Checksum the weight files: official, unofficial (recorded import), MISMATCH or missing (exit 1 if named)."""
    from avepipe.backbones.weights import expected_checksum, select_names, weights_dir, weights_status
    from avepipe.render import render_weights_verify

    statuses = [weights_status(name) for name in select_names(names)]
    render_weights_verify(console, statuses, weights_dir())
    bad = [s for s in statuses if s.state == "mismatch" or (s.state == "missing" and names)]
    for status in bad:
        problem = ("missing (avepipe weights download)" if status.state == "missing" else
                   f"checksum mismatch: expected {expected_checksum(status.entry)}, got {status.actual}")
        errors.print(f"[bold red]error:[/] {escape(str(status.path))}: {problem}", soft_wrap=True)
    raise typer.Exit(EXIT_SOME_FAILED if bad else EXIT_OK)


# --- models / train / evaluate ---------------------------------------------------------------------------------------


@app.command("models", cls=_Command, epilog=epilog("avepipe models"))
def models_command() -> None:
    """List the registered localization models with their tasks and parameter counts."""
    from avepipe.models import build_model, get_spec, model_names, parameter_count

    table = Table(title="models (parameters at the default config, per task; presets: --preset, docs/models.md)")
    for column in ("name", "task", "parameters", "presets", "paper"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name in model_names():
        spec = get_spec(name)
        for i, task in enumerate(spec.tasks):
            count = parameter_count(build_model(name, task))
            table.add_row(name if i == 0 else "", task, f"{count:,}", ", ".join(spec.preset_names()) if i == 0 else "",
                          spec.paper if i == 0 else "")
    console.print(table)


@contextmanager
def loud_warnings() -> Iterator[None]:
    """Print avepipe's DataWarnings and DeviceWarnings at once, in bold on stderr (the command goes on); each device
    warning once."""
    import warnings

    from avepipe.errors import DataWarning, DeviceWarning

    shown: set[str] = set()

    def show(message, category, *_args, **_kwargs):
        if issubclass(category, DeviceWarning) and str(message) in shown:
            return
        if issubclass(category, (DataWarning, DeviceWarning)):
            shown.add(str(message))
            text = str(message).replace("device='auto'", "--device auto")  # worded for Python; the flag here
            errors.print(f"[bold yellow]WARNING:[/] [yellow]{escape(text)}[/]", soft_wrap=True)
        else:
            previous(message, category, *_args, **_kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.simplefilter("always", DeviceWarning)
        previous = warnings.showwarning
        warnings.showwarning = show
        yield


def comparison_table(result: dict[str, Any]) -> Table:
    """avepipe's number (test at the val-selected epoch) next to the ORACLE best test epoch and the paper's number."""
    def pct(value: Any) -> str:
        return "—" if value is None else f"{100 * value:.1f}" if value <= 1 else f"{value:.1f}"

    on_ave = result.get("dataset", "AVE") == "AVE"  # a custom dataset: nothing about papers
    name = f"{result['model']} {result['task']}{' ' + result['direction'] if result['direction'] else ''}"
    table = Table(title=f"{name}: avepipe vs the paper (%)" if on_ave else f"{name} (%)")
    for column in ("number", "value", "epoch chosen on"):
        table.add_column(column)
    table.add_row(f"this evaluation ({result['split']})", pct(result[result["metric"]]), "—")
    table.add_row("avepipe: test at the val-selected epoch", pct(result.get("val_selected_test")),
                  f"val (epoch {result.get('val_selected_epoch')})")
    table.add_row("ORACLE: best test over epochs", pct(result.get("oracle_best_test")),
                  f"test (epoch {result.get('oracle_best_test_epoch')}) — not a fair estimate")
    if not on_ave:
        return table
    published = result.get("published") or {}
    table.add_row(f"paper ({published.get('source', 'no published number')})", pct(published.get("value")),
                  published.get("selection", "—"))
    if result["task"] == "weak" and result.get("background_videos") == 0:
        table.caption = "trained WITHOUT the background-only videos: expect less than the paper's weak number"
    return table


@app.command(cls=_Command, epilog=epilog(
    "avepipe train --model avel --task supervised --out runs/avel",
    "avepipe train --model psp --task weak --features ave.h5 --annotations Annotations.txt --out runs/psp --seeds 3"))
def train(
    model: Annotated[str, typer.Option("--model", help="Registered model name (see `avepipe models`).")],
    task: Annotated[str, typer.Option("--task", help="supervised, weak or cml.")] = "supervised",
    direction: Annotated[Optional[str], typer.Option(
        help="cml only: a2v or v2a (dam: also both, one module trained on both directions).")] = None,
    preset: Annotated[str, typer.Option(
        help="paper (the paper's text) or released (the authors' public code); `avepipe models` lists them.")
    ] = "paper",
    cml_protocol: Annotated[Optional[str], typer.Option(
        help="dcmr: leak-free (default: the query modality seen only on its query seconds) or paper (whole "
             "sequences encoded, as the released code; comparable to the published table).")] = None,
    dataset: Dataset = None,
    features: DatasetFeatures = None,
    annotations: DatasetAnnotations = None,
    categories: Categories = None,
    splits: Splits = None,
    out: Annotated[Path, typer.Option(
        "--out", help="Run folder: checkpoint.pt, last.pt, config.json, metrics.json.")] = ...,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML with \\[model] / \\[train] overrides.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (first seed with --seeds).")] = 0,
    seeds: Annotated[int, typer.Option(help="Train this many seeds and report mean ± std.")] = 1,
    epochs: Annotated[Optional[int], typer.Option(help="Override the number of epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Override the batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Override the learning rate.")] = None,
    patience: Annotated[Optional[int], typer.Option(
        help="Stop when val has not improved for N epochs (default: off, every epoch of the preset is run; 0: off).")
    ] = None,
    device: Device = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from RUN/last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the run already in --out (without it, train refuses a folder holding one).")
    ] = False,
    noisy_audio: Annotated[Optional[Path], typer.Option(
        help="weak only: audio_feature_noisy.h5 (extra background videos).")] = None,
    noisy_visual: Annotated[Optional[Path], typer.Option(help="weak only: visual_feature_noisy.h5.")] = None,
    noisy_labels: Annotated[Optional[Path], typer.Option(help="weak only: labels_noisy.h5.")] = None,
    no_noisy: Annotated[bool, typer.Option(
        "--no-noisy", help="weak only: do not add the background videos found beside the annotations.")] = False,
    progress_mode: ProgressMode = "auto",
) -> None:
    """Train a model; the checkpoint is chosen on val, test is evaluated once with it."""
    from avepipe.data.layout import dataset_inputs
    from avepipe.render import TrainProgress, render_train_summary
    from avepipe.train import DataPaths, TrainOptions, train_seeds
    from avepipe.train import train as train_one

    noisy = (noisy_audio, noisy_visual, noisy_labels)
    if any(noisy) and not all(noisy):
        raise UsageError("--noisy-audio, --noisy-visual and --noisy-labels go together")
    if seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if resume and seeds > 1:
        raise UsageError("--resume works on one run at a time (use --seed N --out RUN/seed-N)")
    if no_noisy and any(noisy):
        raise UsageError("--no-noisy contradicts --noisy-audio/--noisy-visual/--noisy-labels")
    options = TrainOptions(model=model, task=task, out_dir=out, direction=direction, seed=seed, device=device,
                           config_file=config, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                           resume=resume,
                           preset=preset, cml_protocol=cml_protocol, train_noisy=not no_noisy,
                           overwrite=overwrite)
    features, annotations = dataset_inputs(dataset, features, annotations)
    paths = DataPaths(features, annotations, categories, splits, noisy if all(noisy) else None)
    current = [seed]
    stop = StopRequest()
    options.should_stop = stop
    try:
        with loud_warnings(), TrainProgress(console, progress_mode) as progress, stop.on_sigint():
            if seeds == 1:
                result = train_one(options, paths, progress.epoch)
            else:
                def on_seed(number: int) -> None:
                    current[0] = number
                    progress.seed(number)

                result = train_seeds(options, paths, seeds, progress.epoch, on_seed)
    except Terminated:
        raise Terminated(resume_hint(out, seeds, current[0])) from None
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(out, seeds, current[0])) from None
    render_train_summary(console, result, out)


class StopRequest:
    """Ctrl-C during training, taken at the next batch boundary instead of wherever the signal lands (an exception
    raised inside a lock held by the progress display or a checkpoint write could hang or corrupt it). A second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def on_sigint(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def resume_hint(out: Path, seeds: int, seed: int) -> str:
    """What to run after an interrupted `avepipe train`: the same command with --resume (one seed's folder with
    --seeds), or the same command again when no epoch had finished."""
    import shlex
    import sys

    run = out if seeds == 1 else out / f"seed-{seed}"
    if not (run / "last.pt").exists():
        return f"no epoch of {run} had finished, nothing to resume: run the same command again"
    args, drop = [], {"--resume": 0, "--overwrite": 0, **({"--seeds": 1, "--seed": 1, "--out": 1} if seeds > 1 else {})}
    argv = iter(sys.argv[1:])
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in drop:
            if "=" not in arg:
                for _ in range(drop[name]):
                    next(argv, None)
            continue
        args.append(arg)
    if seeds > 1:
        args += ["--seed", str(seed), "--out", str(run)]
    return f"{run}/last.pt keeps the last finished epoch; continue with: {shlex.join(['avepipe', *args, '--resume'])}"


@app.command(cls=_Command, epilog=epilog("avepipe evaluate --checkpoint runs/avel/checkpoint.pt --split test"))
def evaluate(
    checkpoint: Checkpoint,
    dataset: Dataset = None,
    features: DatasetFeatures = None,
    annotations: DatasetAnnotations = None,
    categories: Categories = None,
    splits: Splits = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the result as JSON here (-: on stdout, the table then on stderr).")] = None,
    device: Device = "auto",
) -> None:
    """Evaluate a checkpoint: segment accuracy (supervised, weak) or exact-match accuracy (cml)."""
    import json

    from avepipe.data.layout import dataset_inputs
    from avepipe.train import DataPaths
    from avepipe.train import evaluate as evaluate_checkpoint

    features, annotations = dataset_inputs(dataset, features, annotations)
    result = evaluate_checkpoint(checkpoint, DataPaths(features, annotations, categories, splits), split, device)
    if result.get("warning"):
        errors.print(f"[bold yellow]WARNING:[/] {escape(result['warning'])}", soft_wrap=True)
    metric, direction = result["metric"], f" {result['direction']}" if result["direction"] else ""
    said = errors if out is not None and str(out) == "-" else console  # stdout holds only the JSON then
    said.print(f"{result['model']} {result['task']}{direction} ({result['preset']} preset) {split}: "
               f"{metric} = {result[metric]:.4f} over {result['rows']} rows", soft_wrap=True)
    said.print(comparison_table(result))
    if out is not None and str(out) == "-":
        print(json.dumps(result, indent=2), flush=True)
    elif out:
        out.write_text(json.dumps(result, indent=2))


# --- avepipe dataset: labels / import-ave / download-ave / init -------------------------------------------------------


@dataset_app.command("labels", cls=_Command, epilog=epilog(
    "avepipe dataset labels --annotations Annotations.txt --out labels.h5"))
def dataset_labels(
    annotations: Annotations,
    categories: Categories = None,
    out: Annotated[Path, typer.Option("--out", help="labels.h5 to write.")] = ...,
) -> None:
    """Write labels [N,10,29], event [N,10] and video_label [N,29] in annotation row order (as the released label
    files)."""
    from avepipe.data.ave import write_label_file

    rows, names = write_label_file(annotations, categories or annotations.parent / "categories.txt", out)
    console.print(f"wrote {out}: {rows} rows, {names} categories + background")


@dataset_app.command("import-ave", cls=_Command, epilog=epilog(
    "avepipe dataset import-ave --audio audio_feature.h5 --visual visual_feature.h5 --annotations Annotations.txt "
    "--out ave.h5"))
def dataset_import_ave(
    audio: Annotated[Path, typer.Option(
        "--audio", help="Released audio_feature.h5 (key avadataset, [N,10,128]).")],
    visual: Annotated[Path, typer.Option(
        "--visual", help="Released visual_feature.h5 (key avadataset, [N,10,7,7,512]).")],
    annotations: Annotated[Path, typer.Option(
        "--annotations", help="Annotations.txt (row order of the released files).")],
    out: Annotated[Path, typer.Option("--out", help="Cache to write.")],
) -> None:
    """Convert the officially released AVE feature files into the cache format."""
    from avepipe.data.released import import_released

    stats = import_released(audio, visual, annotations, out)
    console.print(f"imported {stats['videos']} videos from {stats['rows']} rows into {out} "
                  f"({stats['shared_rows']} rows share a video's features)")
    if stats["shared_rows_differing"]:
        errors.print(f"[yellow]note:[/] {stats['shared_rows_differing']} rows of a shared video carry different "
                     "features in the released files; the first row's are kept")


@dataset_app.command("download-ave", cls=_Command, epilog=epilog(
    "avepipe dataset download-ave",
    "avepipe dataset download-ave --dir /data/ave --mirror /mnt/share/ave-release",
    "avepipe dataset download-ave AVE_Dataset.zip"))
def dataset_download_ave(
    names: Annotated[Optional[List[str]], typer.Argument(
        help="File names of the manifest (default: all but labels.h5 and the video zip AVE_Dataset.zip).")] = None,
    directory: Annotated[Optional[Path], typer.Option(
        "--dir", help="Dataset folder (default: $AVEPIPE_DATA_DIR, else ~/.cache/avepipe/datasets/ave).")] = None,
    mirror: Annotated[Optional[str], typer.Option(
        "--mirror", help="Base URL (fetch <URL>/<file>) or local folder (copy <folder>/<file>) instead of the public "
                         "locations; checksums are still verified (env AVEPIPE_DATA_MIRROR).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a present file that does not match its checksum.")] = False,
    retries: Annotated[int, typer.Option(help="Retries after a dropped connection (each resumes the download).")] = 3,
) -> None:
    """Download the AVE release (annotations, splits, released features) into the dataset folder: checksum-verified,
    atomic, resumable (re-run to continue); then build features.h5, so train and evaluate need no further step."""
    from avepipe.data.release import download_ave, select_names
    from avepipe.locations import dataset_dir
    from avepipe.render import DownloadProgress, render_dataset_outcomes

    select_names(names)
    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    folder = directory if directory is not None else dataset_dir()
    with on_interrupt("partial downloads are kept as <file>.part; run the same command again to resume"):
        with DownloadProgress(console, errors) as progress:
            outcomes = download_ave(names, folder, mirror=mirror, progress=progress.update, force=force,
                                    retries=retries, note=lambda message: console.print(escape(message)))
    render_dataset_outcomes(console, errors, outcomes)
    failed = any(item.status == "failed" for item in outcomes)
    if not failed and (folder / "features.h5").is_file():
        console.print(f"ready: avepipe train --model avel --dataset {escape(str(folder))} --out runs/avel")
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)


@dataset_app.command("init", cls=_Command, epilog=epilog(
    "avepipe dataset init --csv events.csv --videos clips/ --out mydata",
    "avepipe extract clips/ --cache mydata/features.h5",
    "avepipe train --model avel --dataset mydata --out runs/mine"))
def dataset_init(
    csv_file: Annotated[Path, typer.Option(
        "--csv", help="One event per row: video,label,start,end[,split] (whole seconds; docs/datasets.md).")],
    videos: Annotated[Path, typer.Option("--videos", help="Folder with the videos the CSV names.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Dataset folder to write (default: $AVEPIPE_DATA_DIR, else ~/.cache/avepipe/datasets/ave).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the label files already in --out.")] = False,
) -> None:
    """Write Annotations.txt, train/val/test split files and categories.txt (the AVE formats) for your own videos from
    a CSV, after checking every row against its video."""
    from avepipe.data.from_csv import init_dataset
    from avepipe.locations import dataset_dir

    folder = out if out is not None else dataset_dir()
    summary = init_dataset(csv_file, videos, folder, overwrite=overwrite)
    console.print(f"wrote {', '.join(escape(p.name) for p in summary.written)} in {escape(str(folder))}: "
                  f"{plural(summary.rows, 'event')} in {plural(summary.videos, 'video')}, "
                  f"{len(summary.categories)} {'category' if len(summary.categories) == 1 else 'categories'}")
    how = "by a hash of the video id" if summary.hashed_split else "from the CSV"
    console.print("splits (" + how + "): " + ", ".join(
        f"{s} {plural(summary.split_videos[s], 'video')} / {plural(summary.split_rows[s], 'event')}"
        for s in summary.split_rows))
    for warning in getattr(summary, "warnings", []):  # labels a split lacks: the files are written all the same
        errors.print(f"[bold yellow]WARNING:[/] [yellow]{escape(warning)}[/]", soft_wrap=True)
    longer = summary.longer_than_clip
    if longer:
        shown = ", ".join(longer[:5]) + (", ..." if len(longer) > 5 else "")
        errors.print(f"[yellow]note:[/] {plural(len(longer), 'video')} longer than 10 s ({escape(shown)}): train and "
                     "evaluate use their first 10 s", soft_wrap=True)
    for line in next_steps(folder):
        console.print(escape(line), soft_wrap=True)


def next_steps(folder: Path) -> list[str]:
    """The commands that take a new dataset folder to a trained model on this machine, as they run here: weights
    first where VGG-19 is missing, ``--vggish-weights random`` where only VGGish is (with a note on stderr)."""
    import shlex

    from avepipe.backbones.weights import weights_dir, weights_status

    usable = {name: weights_status(name).state in ("official", "unofficial") for name in ("vgg19", "vggish")}
    extract = ["avepipe", "extract", "--list", str(folder / "videos.txt"), "--cache", str(folder / "features.h5")]
    steps = []
    if not usable["vgg19"]:
        steps.append("avepipe weights download   (offline: avepipe weights import FILE...)")
    elif not usable["vggish"]:
        extract += ["--vggish-weights", "random"]
        errors.print(f"[yellow]note:[/] the VGGish weights are not in {escape(str(weights_dir()))}: extract below "
                     "uses --vggish-weights random (audio features that are NOT the published ones); `avepipe weights "
                     "download vggish` or `avepipe weights import FILE` first to leave it out", soft_wrap=True)
    steps.append(shlex.join(extract))
    steps.append(shlex.join(["avepipe", "train", "--model", "avel", "--dataset", str(folder), "--out", "runs/mine"]))
    return [f"{'next' if i == 0 else 'then'}: {step}" for i, step in enumerate(steps)]


def main() -> None:
    # SIGTERM (docker stop, Kubernetes, SLURM) is handled like Ctrl-C: the same cleanup, finished work kept, exit 143.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except SystemExit as done:
        _skip_hdf5_cleanup_after_a_failed_write(done.code)
        raise


def _skip_hdf5_cleanup_after_a_failed_write(code: Any) -> None:
    """After an HDF5 write failed (a full disk), the HDF5 library can crash closing its files at interpreter exit
    (exit 139 after the right message): the message is out and avepipe's files are closed or discarded, so the process
    ends here, with its exit code, without that cleanup."""
    import sys

    cache = sys.modules.get("avepipe.cache")
    if cache is None or not cache.hdf5_write_failed():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))



def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup must not be interrupted again
    raise Terminated()


if __name__ == "__main__":
    main()
