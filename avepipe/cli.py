"""The ``avepipe`` command line. Thin: parse options, call the stage functions, render with rich.

Exit codes: 0 success; 1 some videos failed (listed, and stored under /failed in the cache); 2 usage error (bad
option, unreadable list, locked cache, mixed feature specs, missing weights); 3 internal error (a bug: one line,
``AVEPIPE_DEBUG=1`` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audio-visual event localization: raw video -> features -> models -> per-second labels.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and merge feature caches.")
app.add_typer(cache_app, name="cache")
dataset_app = typer.Typer(no_args_is_help=True, help="The AVE dataset: label files and the released features.")
app.add_typer(dataset_app, name="dataset")
weights_app = typer.Typer(no_args_is_help=True, help="Pretrained backbone weights: list, download, import, verify.")
app.add_typer(weights_app, name="weights")

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def fail_usage(message: str) -> None:
    errors.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        fail_usage(f"--shard {text!r}: expected K/N, e.g. 0/4 (K counts from 0)")
    if n < 1 or not 0 <= k < n:
        fail_usage(f"--shard {text!r}: need 0 <= K < N")
    return k, n


@app.command()
def extract(
    paths: List[Path] = typer.Argument(None, help="Video files and/or directories (searched recursively)."),
    cache: Path = typer.Option(..., "--cache", help="HDF5 feature cache to create or complete."),
    list_file: Optional[Path] = typer.Option(None, "--list", help="Text file with one video path per line."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N or auto (the default)."),
    batch_size: int = typer.Option(0, help="Frames per VGG-19 forward (0: 128 on GPU, 32 on CPU)."),
    workers: int = typer.Option(-1, help="Decoder processes (-1: min(8, CPUs); 0: decode in this process). With --devices: per device (-1: CPUs / devices, at most 8)."),
    vgg19_weights: Optional[Path] = typer.Option(None, help="Keras VGG-19 no-top .h5 (default: weights dir)."),
    vggish_weights: Optional[str] = typer.Option(None, help="torchvggish state dict .pth, or 'random' (NOT real features)."),
    pca: bool = typer.Option(False, "--pca", help="Apply VGGish PCA + 8-bit quantisation (off in the AVE spec)."),
    pca_params: Optional[Path] = typer.Option(None, help="vggish_pca_params.npz (default: weights dir)."),
    sampling: str = typer.Option("ave", help="ave: AVE-compatible (all frames, OpenCV-like resize); fps: ffmpeg fps=16 + scale (faster, approximate)."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."),
    shard: Optional[str] = typer.Option(None, help="K/N: only the videos whose id hashes to shard K of N (K from 0)."),
    devices: Optional[str] = typer.Option(None, help="e.g. cuda:0,cuda:1: one process per device on shard K of N, merged into --cache (instead of --device/--shard)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry videos recorded as failed."),
) -> None:
    """Extract AVE-compatible VGG-19 pool5 + VGGish features into a resumable HDF5 cache."""
    if devices is not None and (device is not None or shard is not None):
        fail_usage("--devices runs shard K of N on the K-th device itself: give it without --device and --shard")
    from avepipe.cache import CacheError
    from avepipe.extract import ExtractConfig, UsageError, discover, run_extract
    from avepipe.render import ExtractProgress, render_extract_report

    config = ExtractConfig(
        device=device or "auto", batch_size=batch_size, workers=workers,
        vgg19_weights=str(vgg19_weights) if vgg19_weights else None, vggish_weights=vggish_weights,
        pca=pca, pca_params=str(pca_params) if pca_params else None, sampling=sampling, precision=precision,
        shard=parse_shard(shard), retry_failed=retry_failed,
    )
    try:
        videos = discover(paths or [], str(list_file) if list_file else None)
        with ExtractProgress(console, errors) as progress:
            if devices is None:
                report = run_extract(videos, cache, config, progress.update)
            else:
                from avepipe.scale import parse_devices, run_multi_device

                report = run_multi_device(videos, cache, parse_devices(devices), config, progress.update)
    except (UsageError, CacheError) as exc:
        fail_usage(str(exc))
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]: finished videos are kept; run the same command again to continue")
        raise typer.Exit(EXIT_INTERRUPTED)
    render_extract_report(console, errors, report, cache)
    if devices is not None:
        from avepipe.render import render_device_results

        render_device_results(console, errors, report.devices)
    raise typer.Exit(report.exit_code)


@app.command()
def localize(
    paths: List[Path] = typer.Argument(None, help="Video files and/or directories (searched recursively)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint from `avepipe train`."),
    list_file: Optional[Path] = typer.Option(None, "--list", help="Text file with one video path per line."),
    out: Optional[str] = typer.Option(None, "--out", help="Write --format here: a file, or a directory (DIR/: one file per video)."),
    fmt: str = typer.Option("table", "--format", help="table (terminal), json, csv or jsonl."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Timeline PNG: a file (one video) or a directory (DIR/: <id>.png each)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Keep features here; a second run on the same video skips extraction."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    workers: int = typer.Option(-1, help="Decoder processes (-1: none for one video, else min(8, CPUs))."),
    vgg19_weights: Optional[Path] = typer.Option(None, help="Keras VGG-19 no-top .h5 (default: weights dir)."),
    vggish_weights: Optional[str] = typer.Option(None, help="torchvggish state dict .pth, or 'random' (NOT real features)."),
    pca_params: Optional[Path] = typer.Option(None, help="vggish_pca_params.npz, for checkpoints trained on PCA audio."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."),
    shard: Optional[str] = typer.Option(None, help="K/N: only the videos whose id hashes to shard K of N (K from 0)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry videos recorded as failed in --cache."),
    query_audio: Optional[Path] = typer.Option(None, help="CML A2V checkpoint: file whose audio is the query."),
    query_video: Optional[Path] = typer.Option(None, help="CML V2A checkpoint: video whose frames are the query."),
    query_span: Optional[str] = typer.Option(None, help="START-END seconds of the query file, e.g. 3-6."),
) -> None:
    """Per-second event labels for any video (>= 1 s) with a trained checkpoint; spans, files and a timeline picture."""
    from avepipe.cache import CacheError
    from avepipe.extract import UsageError
    from avepipe.localization import FORMATS, LocalizeConfig, LocalizeError, localize_videos, parse_span, write_results
    from avepipe.render import LocalizeProgress, render_localize

    if fmt not in FORMATS:
        fail_usage(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt != "table" and out is None:
        fail_usage(f"--format {fmt} needs --out FILE or --out DIR/")
    try:
        config = LocalizeConfig(
            checkpoint=str(checkpoint), cache=str(cache) if cache else None, device=device, workers=workers,
            vgg19_weights=str(vgg19_weights) if vgg19_weights else None, vggish_weights=vggish_weights,
            pca_params=str(pca_params) if pca_params else None, precision=precision, shard=parse_shard(shard),
            retry_failed=retry_failed, query_audio=str(query_audio) if query_audio else None,
            query_video=str(query_video) if query_video else None,
            query_span=parse_span(query_span) if query_span else None,
        )
        with LocalizeProgress(errors, errors) as progress:  # progress on stderr: stdout carries the labels
            results, _ = localize_videos(paths or [], config, list_file=str(list_file) if list_file else None,
                                         progress=progress.update)
    except (UsageError, CacheError, LocalizeError) as exc:
        fail_usage(str(exc))
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    render_localize(console, errors, results, show_seconds=fmt == "table")
    if out is not None and fmt != "table":
        for path in write_results(results, fmt, out):
            console.print(f"wrote {path}")
    if plot is not None:
        from avepipe.timeline import save_timeline

        ok = [r for r in results if r.error is None]
        # Kept as a string: Path() would drop the trailing "/" that marks a directory.
        many = len(ok) > 1 or Path(plot).is_dir() or plot.endswith(("/", os.sep))
        for result in ok:
            target = Path(plot) / f"{result.id}.png" if many else Path(plot)
            console.print(f"wrote {save_timeline(result, target)}")
    raise typer.Exit(EXIT_FAILED if any(r.error for r in results) else EXIT_OK)


@cache_app.command("ls")
def cache_ls(
    cache: Path = typer.Argument(..., help="Cache file."),
    failed: bool = typer.Option(False, "--failed", help="List only the failures."),
) -> None:
    """List the videos in a cache (and its recorded failures)."""
    from avepipe.cache import CacheError, FeatureCache
    from avepipe.render import render_cache

    try:
        reader = FeatureCache(cache, "r")
        render_cache(console, reader, failed_only=failed)
    except CacheError as exc:
        fail_usage(str(exc))


@cache_app.command("merge")
def cache_merge(
    inputs: List[Path] = typer.Argument(..., help="Caches to join (same feature spec)."),
    out: Path = typer.Option(..., "--out", help="Output cache."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Join shard caches into one; refuses caches built with different feature specs."""
    from avepipe.cache import CacheError, merge

    try:
        count = merge([str(p) for p in inputs], out, overwrite=overwrite)
    except CacheError as exc:
        fail_usage(str(exc))
    console.print(f"merged {len(inputs)} caches into {out}: {count} videos")


# --- avepipe weights: list / download / import / verify (avepipe/backbones/weights.py, download.py) -------------------


def _weights_selection(names: Optional[List[str]]) -> list[str]:
    from avepipe.backbones.weights import WeightsError, select_names

    try:
        return select_names(names)
    except WeightsError as exc:
        fail_usage(str(exc))


@weights_app.command("list")
def weights_list() -> None:
    """The manifest's weight files: present or not, official or not, size and download URL."""
    from avepipe.backbones.weights import WeightsError, weights_dir, weights_status
    from avepipe.render import render_weights_list

    try:
        statuses = [weights_status(name) for name in _weights_selection(None)]
    except WeightsError as exc:
        fail_usage(str(exc))
    render_weights_list(console, statuses, weights_dir())


@weights_app.command("download")
def weights_download(
    names: List[str] = typer.Argument(None, help="Manifest names (default: all)."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Base URL: fetch <URL>/<file> instead of the manifest URL (env AVEPIPE_WEIGHTS_MIRROR)."),
    force: bool = typer.Option(False, "--force", help="Replace a present file that does not match the manifest."),
    retries: int = typer.Option(3, help="Retries after a dropped connection (each resumes the download)."),
) -> None:
    """Download weights into the weights dir: checksum-verified, atomic, resumable (re-run to continue)."""
    from avepipe.backbones.download import download
    from avepipe.backbones.weights import WeightsError, weights_dir
    from avepipe.render import DownloadProgress, render_weights_outcomes

    selected = _weights_selection(names)
    if retries < 0:
        fail_usage("--retries must be 0 or more")
    try:
        with DownloadProgress(console, errors) as progress:
            outcomes = download(selected, weights_dir(), mirror=mirror, progress=progress.update, force=force,
                                retries=retries)
    except WeightsError as exc:
        fail_usage(str(exc))
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]: the partial download is kept as <file>.part; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    render_weights_outcomes(console, errors, outcomes)
    raise typer.Exit(EXIT_FAILED if any(item.status == "failed" for item in outcomes) else EXIT_OK)


@weights_app.command("import")
def weights_import(
    file: Path = typer.Argument(..., help="A weights file you already have."),
    as_name: Optional[str] = typer.Option(None, "--as", help="Manifest name it stands for (default: found by checksum)."),
    force: bool = typer.Option(False, "--force", help="Import it even if it is not the official file (recorded as unofficial)."),
) -> None:
    """Copy a weights file into the weights dir under its manifest name, after checking it is the official file."""
    from avepipe.backbones.download import import_file
    from avepipe.backbones.weights import WeightsError
    from avepipe.render import render_weights_outcomes

    try:
        outcome = import_file(file, as_name, force=force)
    except WeightsError as exc:
        fail_usage(str(exc))
    render_weights_outcomes(console, errors, [outcome])
    raise typer.Exit(EXIT_FAILED if outcome.status == "failed" else EXIT_OK)


@weights_app.command("verify")
def weights_verify(names: List[str] = typer.Argument(None, help="Manifest names (default: all).")) -> None:
    """Checksum the weight files: official, unofficial (recorded import), MISMATCH or missing (exit 1 if named)."""
    from rich.markup import escape

    from avepipe.backbones.weights import WeightsError, expected_checksum, weights_dir, weights_status
    from avepipe.render import render_weights_verify

    try:
        statuses = [weights_status(name) for name in _weights_selection(names)]
    except WeightsError as exc:
        fail_usage(str(exc))
    render_weights_verify(console, statuses, weights_dir())
    bad = [s for s in statuses if s.state == "mismatch" or (s.state == "missing" and names)]
    for status in bad:
        problem = ("missing (avepipe weights download)" if status.state == "missing" else
                   f"checksum mismatch: expected {expected_checksum(status.entry)}, got {status.actual}")
        errors.print(f"[bold red]error:[/] {escape(str(status.path))}: {problem}", soft_wrap=True)
    raise typer.Exit(EXIT_FAILED if bad else EXIT_OK)


@app.command("models")
def models_command() -> None:
    """List the registered localization models with their tasks and parameter counts."""
    from avepipe.models import build_model, get_spec, model_names, parameter_count

    table = Table(title="models (parameters at the default config, per task)")
    for column in ("name", "task", "parameters", "paper"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for name in model_names():
        spec = get_spec(name)
        for i, task in enumerate(spec.tasks):
            count = parameter_count(build_model(name, task))
            table.add_row(name if i == 0 else "", task, f"{count:,}", spec.paper if i == 0 else "")
    console.print(table)


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="Registered model name (see `avepipe models`)."),
    task: str = typer.Option("supervised", "--task", help="supervised, weak or cml."),
    direction: Optional[str] = typer.Option(None, help="cml only: a2v or v2a."),
    features: Path = typer.Option(..., "--features", help="Feature cache (.h5)."),
    annotations: Path = typer.Option(..., "--annotations", help="Annotations.txt."),
    categories: Optional[Path] = typer.Option(None, help="categories.txt (default: beside the annotations)."),
    splits: Optional[Path] = typer.Option(None, help="Folder with the split/order files (default: beside the annotations)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint.pt, last.pt, config.json, metrics.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML with [model] / [train] overrides."),
    seed: int = typer.Option(0, help="Random seed (first seed with --seeds)."),
    seeds: int = typer.Option(1, help="Train this many seeds and report mean ± std."),
    epochs: Optional[int] = typer.Option(None, help="Override the number of epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Override the batch size."),
    lr: Optional[float] = typer.Option(None, help="Override the learning rate."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from RUN/last.pt."),
    noisy_audio: Optional[Path] = typer.Option(None, help="weak only: audio_feature_noisy.h5 (extra background videos)."),
    noisy_visual: Optional[Path] = typer.Option(None, help="weak only: visual_feature_noisy.h5."),
    noisy_labels: Optional[Path] = typer.Option(None, help="weak only: labels_noisy.h5."),
) -> None:
    """Train a model; the checkpoint is chosen on val, test is evaluated once with it."""
    from avepipe.render import TrainProgress, render_train_summary
    from avepipe.train import DataPaths, TrainError, TrainOptions, train_seeds

    options = TrainOptions(model=model, task=task, out_dir=str(out), direction=direction, seed=seed, device=device,
                           config_file=str(config) if config else None, epochs=epochs, batch_size=batch_size, lr=lr,
                           resume=resume)
    noisy = [noisy_audio, noisy_visual, noisy_labels]
    if any(noisy) and not all(noisy):
        fail_usage("--noisy-audio, --noisy-visual and --noisy-labels go together")
    paths = DataPaths(str(features), str(annotations), str(categories) if categories else None,
                      str(splits) if splits else None, tuple(str(p) for p in noisy) if all(noisy) else None)
    if seeds < 1:
        fail_usage("--seeds must be at least 1")
    if resume and seeds > 1:
        fail_usage("--resume works on one run at a time (use --seed N --out RUN/seed-N)")
    try:
        with TrainProgress(console) as progress:
            if seeds == 1:
                from avepipe.train import train as train_one

                result = train_one(options, paths, progress.epoch)
            else:
                result = train_seeds(options, paths, seeds, progress.epoch, progress.seed)
    except TrainError as exc:
        fail_usage(str(exc))
    render_train_summary(console, result, out)


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="checkpoint.pt written by `avepipe train`."),
    features: Path = typer.Option(..., "--features", help="Feature cache (.h5)."),
    annotations: Path = typer.Option(..., "--annotations", help="Annotations.txt."),
    categories: Optional[Path] = typer.Option(None, help="categories.txt (default: beside the annotations)."),
    splits: Optional[Path] = typer.Option(None, help="Folder with the split/order files (default: beside the annotations)."),
    split: str = typer.Option("test", help="train, val or test."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result as JSON here."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Evaluate a checkpoint: segment accuracy (supervised, weak) or exact-match accuracy (cml)."""
    import json

    from avepipe.train import DataPaths, TrainError, evaluate as evaluate_checkpoint

    if split not in ("train", "val", "test"):
        fail_usage(f"--split {split}: choose train, val or test")
    paths = DataPaths(str(features), str(annotations), str(categories) if categories else None,
                      str(splits) if splits else None)
    try:
        result = evaluate_checkpoint(str(checkpoint), paths, split, device)
    except TrainError as exc:
        fail_usage(str(exc))
    if result.get("warning"):
        errors.print(f"[bold yellow]WARNING:[/] {result['warning']}", soft_wrap=True)
    metric = result["metric"]
    console.print(f"{result['model']} {result['task']}{' ' + result['direction'] if result['direction'] else ''} "
                  f"{split}: {metric} = {result[metric]:.4f} over {result['rows']} rows")
    if out:
        out.write_text(json.dumps(result, indent=2))


@dataset_app.command("labels")
def dataset_labels(
    annotations: Path = typer.Option(..., "--annotations", help="Annotations.txt."),
    categories: Optional[Path] = typer.Option(None, help="categories.txt (default: beside the annotations)."),
    out: Path = typer.Option(..., "--out", help="labels.h5 to write."),
) -> None:
    """Write labels [N,10,29], event [N,10] and video_label [N,29] in annotation row order (the released label files)."""
    from avepipe.data import ave

    try:
        names = ave.read_categories(categories or annotations.parent / "categories.txt")
        rows = ave.read_annotations(annotations, names)
        ave.write_labels_h5(rows, names, out)
    except (OSError, ValueError) as exc:
        fail_usage(str(exc))
    console.print(f"wrote {out}: {len(rows)} rows, {len(names)} categories + background")


@dataset_app.command("import-ave")
def dataset_import_ave(
    audio: Path = typer.Option(..., "--audio", help="Released audio_feature.h5 (key avadataset, [N,10,128])."),
    visual: Path = typer.Option(..., "--visual", help="Released visual_feature.h5 (key avadataset, [N,10,7,7,512])."),
    annotations: Path = typer.Option(..., "--annotations", help="Annotations.txt (row order of the released files)."),
    out: Path = typer.Option(..., "--out", help="Cache to write."),
) -> None:
    """Convert the officially released AVE feature files into the cache format."""
    from avepipe.cache import CacheError
    from avepipe.data.released import ImportError_, import_released

    try:
        stats = import_released(audio, visual, annotations, out)
    except (OSError, ValueError, CacheError, ImportError_) as exc:
        fail_usage(str(exc))
    console.print(f"imported {stats['videos']} videos from {stats['rows']} rows into {out} "
                  f"({stats['shared_rows']} rows share a video's features)")
    if stats["shared_rows_differing"]:
        errors.print(f"[yellow]note:[/] {stats['shared_rows_differing']} rows of a shared video carry different "
                     "features in the released files; the first row's are kept")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug, not bad input: one line, the traceback only on request
        if os.environ.get("AVEPIPE_DEBUG"):
            raise
        errors.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set AVEPIPE_DEBUG=1 for the traceback "
                     "and please report it)", soft_wrap=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
