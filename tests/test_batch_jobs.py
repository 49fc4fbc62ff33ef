"""Batch jobs and the second hour (issue 27): progress in logs, early stopping, JSON on stdout, per-video errors first,
honest comparisons, one-line refusals."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from avepipe.checkpoint import load_checkpoint
from avepipe.render import ExtractProgress
from tests.helpers import make_clip, run_cli
from tests.test_train import CATEGORIES, write_dataset

LOG_LINE = re.compile(r"^extract (\d+)/(\d+) videos \| (\d+) s of video \| (?:[\d.e+-]+x real time|speed \?) \| "
                      r"elapsed [\d:]+ \| eta (?:[\d:]+|\?) \| (\d+) failed")


# --- row 1: progress lines when stdout is not a terminal -------------------------------------------------------------


def _log_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=80, highlight=False), buffer  # a file: not a terminal


def test_progress_auto_is_plain_lines_when_stdout_is_not_a_terminal(monkeypatch):
    monkeypatch.setenv("AVEPIPE_PROGRESS_INTERVAL", "0.2")
    out, buffer = _log_console()
    err, _ = _log_console()
    with ExtractProgress(out, err) as progress:
        assert progress.mode == "log"
        progress.update("start", {"total": 3, "todo": 3, "skipped": 0, "device": "cpu"})
        progress.update("seconds", {"id": "long", "done": 20, "total": 60})
        time.sleep(0.5)  # nothing finishes: the heartbeat still writes lines
        progress.update("video", {"id": "a", "status": "done", "seconds": 10})
        progress.update("video", {"id": "b", "status": "failed", "error": "b.mp4: missing file: no such file"})
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "extract on cpu: 3 videos to do"
    progress_lines = [line for line in lines[1:] if LOG_LINE.match(line)]
    assert len(progress_lines) == len(lines) - 1, lines  # nothing else: no bar, no escape codes
    heartbeats = [line for line in progress_lines if line.startswith("extract 0/3")]
    assert len(heartbeats) >= 1 and "in flight: long 20/60 s" in heartbeats[0]
    assert progress_lines[-2].startswith("extract 1/3 videos | 30 s of video") and progress_lines[-2].endswith(
        "| done a")
    assert progress_lines[-1].startswith("extract 2/3 videos") and "| 1 failed |" in progress_lines[-1]
    assert "\x1b" not in buffer.getvalue() and "\r" not in buffer.getvalue()


def test_progress_none_and_bar_and_bad_mode():
    out, buffer = _log_console()
    err, _ = _log_console()
    with ExtractProgress(out, err, mode="none") as progress:
        progress.update("start", {"total": 1, "todo": 1, "skipped": 0, "device": "cpu"})
        progress.update("video", {"id": "a", "status": "done", "seconds": 10})
    assert buffer.getvalue().splitlines() == ["extract on cpu: 1 video to do"]
    from avepipe.errors import UsageError

    with pytest.raises(UsageError, match="--progress fancy: choose auto, bar, log or none"):
        ExtractProgress(out, err, mode="fancy")


def test_extract_with_stdout_to_a_file_writes_progress_lines_at_a_steady_interval(tmp_path, weights_args):
    """The batch-job case: `avepipe extract ... > job.log`. Lines at each finished video and every
    $AVEPIPE_PROGRESS_INTERVAL seconds in between, read from the file while the job runs."""
    clips = [make_clip(tmp_path / f"clip{i}.mp4", 1.0 + i, size="160x120") for i in range(2)]
    log = tmp_path / "job.log"
    interval = 1.0
    env = {**os.environ, "AVEPIPE_PROGRESS_INTERVAL": str(interval), "COLUMNS": "80"}
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "avepipe", "extract", *map(str, clips), "--cache",
                                 str(tmp_path / "f.h5"), "--workers", "0", *weights_args], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env=env)
        seen: list[tuple[float, str]] = []  # (when the line reached the file, the line)
        text = ""
        while True:
            running = proc.poll() is None
            now = time.monotonic()
            new = log.read_text()
            if len(new) > len(text):
                complete = new[:new.rfind("\n") + 1]
                seen += [(now, line) for line in complete[len(text):].splitlines()]
                text = complete
            if not running:
                break
            time.sleep(0.05)
        stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    lines = [line for _, line in seen]
    assert lines[0] == "extract on cpu: 2 videos to do", lines
    timed = [(when, line) for when, line in seen if LOG_LINE.match(line)]
    assert len(timed) >= 4, lines  # the two finished videos and heartbeats while the backbones work
    finished = [line for _, line in timed if re.search(r"\| done clip\d$", line)]
    assert [LOG_LINE.match(line).group(1) for line in finished] == ["1", "2"]
    assert finished[-1].startswith("extract 2/2 videos | 3 s of video")
    gaps = [b - a for (a, _), (b, _) in zip(timed, timed[1:])]
    assert max(gaps) < interval + 2.0, gaps  # steady: never a long silence (generous: a loaded 2-core machine)
    assert "\x1b" not in text and "━" not in text.split("extract summary")[0]  # no bar, no escape codes


# --- row 2: --patience -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic AVE-like task (as tests/test_train.py's): a cache and annotation files."""
    from avepipe.cache import FeatureCache
    from avepipe.data.synthetic import make_synthetic_ave

    root = tmp_path_factory.mktemp("synthetic")
    data = make_synthetic_ave(48, num_classes=len(CATEGORIES) + 1, seed=3, min_event=2, max_event=8)
    rows = {"train": [], "val": [], "test": []}
    with FeatureCache(root / "f.h5", "a") as cache:
        cache.ensure_spec({"spec_version": 1, "sampling": "ave", "synthetic": True})
        for i in range(48):
            vid = f"vid{i:03d}"
            cache.put(vid, data["visual"][i].numpy(), data["audio"][i].numpy(), {"seconds": 10})
            event = data["event"][i].numpy().nonzero()[0]
            split = "train" if i < 32 else "val" if i < 40 else "test"
            rows[split].append((CATEGORIES[int(data["video_label"][i])], vid, int(event[0]), int(event[-1]) + 1))
    return root / "f.h5", write_dataset(root / "ave", rows)


def test_patience_stops_and_keeps_the_best_val_epoch(tmp_path, synthetic):
    features, annotations = synthetic
    run = tmp_path / "run"
    patience = 3
    result = run_cli("train", "--model", "avel", "--features", features, "--annotations", annotations, "--out", run,
                     "--epochs", "60", "--batch-size", "8", "--device", "cpu", "--patience", patience)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["curves"]["val_segment_accuracy"]
    best = metrics["best_epoch"]
    assert metrics["stopped_early"] and metrics["epochs_run"] == len(val) < 60
    assert len(val) == best + patience  # stopped exactly `patience` epochs after the last gain
    assert best == 1 + val.index(max(val)) and max(val[best:]) <= val[best - 1]  # the kept epoch is val's best
    assert metrics["stop_reason"] == f"stopped after epoch {len(val)} of 60: no val gain in {patience} epochs " \
                                     f"(--patience {patience})"
    checkpoint = load_checkpoint(run / "checkpoint.pt", "cpu")[1]
    assert checkpoint["metrics"]["best_epoch"] == best and checkpoint["metrics"]["epochs_run"] == len(val)
    lines = result.stdout.splitlines()
    assert f"kept epoch {best} of {len(val)} (best val segment_accuracy {val[best - 1]:.4f})" in result.stdout
    assert metrics["stop_reason"] in lines
    assert sum(line.startswith("epoch ") for line in lines) == len(val)
    # without --patience every epoch runs (the paper presets' default), and metrics.json says so
    full = run_cli("train", "--model", "avel", "--features", features, "--annotations", annotations, "--out",
                   tmp_path / "full", "--epochs", "3", "--batch-size", "8", "--device", "cpu")
    assert full.returncode == 0, full.stderr
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert not metrics["stopped_early"] and metrics["epochs_run"] == 3 and metrics["patience"] is None
    assert metrics["stop_reason"] == "all 3 epochs run" and "all 3 epochs run" in full.stdout.splitlines()


def test_patience_must_be_a_whole_number(tmp_path, synthetic):
    features, annotations = synthetic
    result = run_cli("train", "--model", "avel", "--features", features, "--annotations", annotations, "--out",
                     tmp_path / "x", "--patience", "-1", "--device", "cpu")
    assert result.returncode == 2 and "--patience / [train] patience must be a whole number" in result.stderr


# --- row 4: labels on stdout -----------------------------------------------------------------------------------------

RANDOM = ["--vgg19-weights", "random", "--vggish-weights", "random", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from tests.test_localize import SMALL, _checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return _checkpoint(root, "avel", "supervised", SMALL)


def test_localize_json_on_stdout_parses_from_the_pipe(tmp_path, small_checkpoint):
    clip = make_clip(tmp_path / "clip.mp4", 2.0, size="64x48")
    common = [clip, "--checkpoint", small_checkpoint, "--cache", tmp_path / "f.h5", *RANDOM]
    dashed = run_cli("localize", *common, "--format", "json", "--out", "-", "--plot", tmp_path / "t.png")
    assert dashed.returncode == 0, dashed.stderr
    records = json.loads(dashed.stdout)  # stdout is the JSON and nothing else
    assert [r["id"] for r in records] == ["clip"] and len(records[0]["seconds"]) == 2
    assert not (Path.cwd() / "-").exists() and not (tmp_path / "-").exists()
    assert f"wrote {tmp_path / 't.png'}" in dashed.stderr  # what is said goes to stderr
    # stdout not a terminal and no --out: the same, for every file format
    for fmt in ("json", "jsonl", "csv"):
        piped = subprocess.run([sys.executable, "-m", "avepipe", "localize", *map(str, common), "--format", fmt],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        assert piped.returncode == 0, piped.stderr
        if fmt == "json":
            assert json.loads(piped.stdout) == records
        elif fmt == "jsonl":
            assert [json.loads(line)["start"] for line in piped.stdout.splitlines()] == [0, 1]
        else:
            assert piped.stdout.splitlines()[0].startswith("video,start,end,label") and \
                len(piped.stdout.splitlines()) == 3


def test_localize_progress_lines_go_to_stderr(tmp_path, small_checkpoint, monkeypatch):
    clip = make_clip(tmp_path / "clip.mp4", 1.0, size="64x48")
    result = run_cli("localize", clip, "--checkpoint", small_checkpoint, *RANDOM, "--format", "jsonl", "--out", "-",
                     "--progress", "log")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip())["label"]
    assert "extract 1/1 video |" in result.stderr and "extract" not in result.stdout


# --- rows 3 and 9: per-video problems first; nothing created when no input can be read -------------------------------

NO_WEIGHTS = ["--vgg19-weights", "/nonexistent/vgg19.h5", "--vggish-weights", "/nonexistent/vggish.pth",
              "--device", "cpu"]


def test_localize_a_missing_file_is_that_videos_problem_not_the_weights(tmp_path, small_checkpoint):
    missing = tmp_path / "missing.mp4"
    result = run_cli("localize", missing, "--checkpoint", small_checkpoint, *NO_WEIGHTS)
    assert result.returncode == 1, result.stderr  # a per-video failure (exit 1), not a usage error (exit 2)
    assert f"failed: {missing}: missing file" in result.stderr
    assert "weights" not in result.stderr.lower() and "Traceback" not in result.stderr
    import avepipe

    records = avepipe.localize([missing], small_checkpoint, device="cpu", vgg19_weights="/nonexistent/vgg19.h5",
                               vggish_weights="/nonexistent/vggish.pth")
    assert [r.id for r in records] == ["missing"] and "missing file" in records[0].error and not records[0].seconds


def test_extract_with_no_readable_input_creates_nothing_and_loads_nothing(tmp_path):
    cache = tmp_path / "x.h5"
    result = run_cli("extract", tmp_path / "missing.mp4", "--cache", cache, *NO_WEIGHTS)
    assert result.returncode == 1, result.stderr
    assert f"failed: {tmp_path / 'missing.mp4'}: missing file" in result.stderr and "weights" not in result.stderr
    assert "nothing to extract: 1 input could not be read" in result.stdout
    assert "cache ls" not in result.stderr  # nothing was recorded: no cache to look at
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no x.h5, no lock, no staging folder


def test_an_id_collision_is_said_only_when_the_other_file_exists(tmp_path):
    import numpy as np

    from avepipe.cache import FeatureCache
    from avepipe.planning import BatchReport, plan
    from avepipe.settings import ExtractConfig

    stored = make_clip(tmp_path / "a" / "clip.mp4", 1.0, size="64x48") if (tmp_path / "a").mkdir() is None else None
    cache_path = tmp_path / "f.h5"
    with FeatureCache(cache_path, "a") as cache:
        cache.ensure_spec({"spec_version": 1, "sampling": "ave", "synthetic": True})
        cache.put("clip", np.zeros((1, 7, 7, 512), np.float32), np.zeros((1, 128), np.float32),
                  {"seconds": 1, "source_path": str(stored.resolve()), "source_size": 1, "source_mtime": 0.0})

    def planned(path: Path) -> tuple[dict, BatchReport]:
        report = BatchReport()
        with FeatureCache(cache_path, "r") as reader:
            return plan([path], reader, ExtractConfig(), report), report

    todo, report = planned(tmp_path / "typo" / "clip.mp4")  # a mistyped folder: a missing file
    assert not todo and "missing file" in report.failed["clip"] and "already in the cache" not in report.failed["clip"]
    other = make_clip(tmp_path / "b" / "clip.mp4", 1.0, size="64x48", freq=700) \
        if (tmp_path / "b").mkdir() is None else None
    todo, report = planned(other)  # another existing file with the same id: the collision
    assert "already in the cache for another file" in report.failed["clip"]
    stored.unlink()  # the stored entry's file is gone (moved): extracted again, no collision
    todo, report = planned(other)
    assert todo == {"clip": other} and not report.failed


# --- row 5: the paper comparison only on AVE -------------------------------------------------------------------------


def test_the_paper_comparison_only_on_the_ave_annotations(tmp_path, synthetic, ave_dir):
    from avepipe.data.ave import is_ave_release

    features, annotations = synthetic
    run = tmp_path / "run"
    trained = run_cli("train", "--model", "avel", "--features", features, "--annotations", annotations, "--out", run,
                      "--epochs", "1", "--batch-size", "8", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "custom" and metrics["published"] is None
    evaluated = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--features", features, "--annotations",
                        annotations, "--device", "cpu", "--out", "-")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["dataset"] == "custom" and result["published"] is None
    said = (evaluated.stderr + trained.stdout).replace("(paper preset)", "").replace(str(tmp_path), "")
    assert "paper" not in said.lower() and "published" not in said.lower()
    assert "ORACLE" in evaluated.stderr  # the honest numbers stay
    # The AVE release is recognised by its checksum, with or without the header line; an edited copy is not AVE.
    text = (ave_dir / "Annotations.txt").read_bytes()
    assert is_ave_release(ave_dir / "Annotations.txt")
    (tmp_path / "bare.txt").write_bytes(text.split(b"\n", 1)[1])
    assert is_ave_release(tmp_path / "bare.txt")
    (tmp_path / "edited.txt").write_bytes(text.replace(b"&good&", b"&bad&", 1))
    assert not is_ave_release(tmp_path / "edited.txt")


# --- row 13: the CPU warning once, where it matters, worded for its reader --------------------------------------------


def test_the_cpu_warning_once_per_command_that_loads_a_backbone_or_trains(tmp_path, synthetic, small_checkpoint):
    import warnings

    import torch

    from avepipe.devices import resolve_device
    from avepipe.errors import DeviceWarning

    env = {"CUDA_VISIBLE_DEVICES": ""}  # CUDA unusable on any machine
    features, annotations = synthetic
    trained = run_cli("train", "--model", "avel", "--features", features, "--annotations", annotations, "--out",
                      tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--seeds", "2", env=env)
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.count("WARNING: --device auto runs on the CPU") == 1, trained.stderr  # 2 runs, 1 line
    evaluated = run_cli("evaluate", "--checkpoint", tmp_path / "run" / "seed-0" / "checkpoint.pt", "--features",
                        features, "--annotations", annotations, env=env)
    assert evaluated.returncode == 0 and "WARNING" not in evaluated.stderr, evaluated.stderr  # seconds on a CPU
    clip = make_clip(tmp_path / "clip.mp4", 1.0, size="64x48")
    common = [clip, "--checkpoint", small_checkpoint, "--cache", tmp_path / "f.h5", "--vgg19-weights", "random",
              "--vggish-weights", "random", "--workers", "0"]
    first = run_cli("localize", *common, env=env)  # extracts: backbones load
    assert first.returncode == 0 and first.stderr.count("WARNING: --device auto runs on the CPU") == 1, first.stderr
    again = run_cli("localize", *common, env=env)  # cached: no backbone, no warning
    assert again.returncode == 0 and "--device auto" not in again.stderr, again.stderr
    # In Python the warning names the argument, not the command line's flag.
    if not torch.cuda.is_available():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resolve_device("auto")
        [message] = [str(w.message) for w in caught if issubclass(w.category, DeviceWarning)]
        assert message.startswith("device='auto' runs on the CPU") and "--device" not in message


# --- row 6: weights download offline ---------------------------------------------------------------------------------


def test_weights_download_offline_is_one_line_with_the_ways_around(tmp_path):
    # A host that never resolves (.invalid, RFC 2606) stands for a machine without network or DNS.
    result = run_cli("weights", "download", "--mirror", "http://weights.avepipe.invalid/files",
                     env={"AVEPIPE_WEIGHTS_DIR": str(tmp_path / "weights")}, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: this machine cannot reach weights.avepipe.invalid (")
    assert "avepipe weights import FILE" in lines[0] and "--mirror" in lines[0]
    assert "retry" not in result.stderr and not list((tmp_path / "weights").glob("*.part"))


# --- row 11: weights import A B ---------------------------------------------------------------------------------------


def test_weights_import_takes_several_files(tmp_path, weights_dir):
    target = tmp_path / "weights"
    env = {"AVEPIPE_WEIGHTS_DIR": str(target)}
    files = [weights_dir / "vggish_pca_params.npz", weights_dir / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"]
    result = run_cli("weights", "import", *files, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(f.name for f in files)
    assert "vggish_pca: imported" in result.stdout and "vgg19: imported" in result.stdout
    stray = tmp_path / "stray.bin"
    stray.write_bytes(b"not weights")
    mixed = run_cli("weights", "import", files[0], stray, env=env)  # each file is its own outcome
    assert mixed.returncode == 1 and "vggish_pca" in mixed.stdout and "stray.bin matches no manifest entry" in \
        mixed.stderr
    absent = run_cli("weights", "import", files[0], tmp_path / "absent.h5", env=env)  # refused before any copy
    assert absent.returncode == 2 and f"{tmp_path / 'absent.h5'}: no such file" in absent.stderr
    named = run_cli("weights", "import", *files, "--as", "vgg19", env=env)
    assert named.returncode == 2 and "--as vgg19 names the entry of one file" in named.stderr


# --- row 7: dataset init's next steps run as printed -----------------------------------------------------------------


def test_dataset_init_next_steps_run_as_printed_on_this_machine(tmp_path, weights_dir):
    import shlex

    videos = tmp_path / "my clips"
    videos.mkdir()
    for name, freq in (("a", 440), ("b", 660), ("c", 880)):
        make_clip(videos / f"{name}.mp4", 1.0, size="64x48", freq=freq)
    csv = tmp_path / "events.csv"
    csv.write_text("video,label,start,end,split\na.mp4,Bell,0,1,train\nb.mp4,Bell,0,1,val\nc.mp4,Bell,0,1,test\n")
    data = tmp_path / "my data"
    env = {"AVEPIPE_WEIGHTS_DIR": str(weights_dir)}  # VGG-19 here, VGGish not (as on these machines)
    init = run_cli("dataset", "init", "--csv", csv, "--videos", videos, "--out", data, env=env)
    assert init.returncode == 0, init.stderr
    steps = [line.split(": ", 1)[1] for line in init.stdout.splitlines() if line.startswith(("next: ", "then: "))]
    assert steps[0].startswith("avepipe extract") and steps[0].endswith("--vggish-weights random")
    assert "--vggish-weights random" in init.stderr and "NOT the published" in init.stderr
    extract = run_cli(*shlex.split(steps[0])[1:], env=env)  # exactly as printed (a folder name with a space)
    assert extract.returncode == 0, extract.stderr
    assert (data / "features.h5").is_file()
    # Without VGG-19 the first step is getting the weights.
    bare = run_cli("dataset", "init", "--csv", csv, "--videos", videos, "--out", tmp_path / "other",
                   env={"AVEPIPE_WEIGHTS_DIR": str(tmp_path / "no-weights")})
    assert bare.returncode == 0 and "next: avepipe weights download" in bare.stdout, bare.stderr


# --- row 12: 80 columns, the README's models, the timeline picture ---------------------------------------------------


def test_output_fits_80_columns():
    from avepipe.render import render_train_summary

    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    progress = ExtractProgress(console, console, mode="bar")
    progress.update("start", {"total": 12, "todo": 12, "skipped": 0, "device": "cuda:0"})
    progress.update("seconds", {"id": "big_buck_bunny_0_30", "done": 12, "total": 30})
    time.sleep(0.3)
    progress.update("video", {"id": "fire2", "status": "done", "seconds": 2})
    shot = io.StringIO()
    Console(file=shot, width=80, color_system=None).print(progress.progress.get_renderable())
    lines = shot.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert "× real time" in lines[0] and "1/12 videos" in lines[0] and "eta" in lines[0], lines  # whole, one line
    summary = io.StringIO()
    render_train_summary(Console(file=summary, width=80, color_system=None),
                         {"metric": "segment_accuracy", "best_epoch": 117, "epochs": 300, "epochs_run": 127,
                          "val_segment_accuracy": 0.78125, "test_segment_accuracy": 0.7213,
                          "stop_reason": "stopped after epoch 127 of 300: no val gain in 10 epochs (--patience 10)"},
                         Path("runs/avel"))
    lines = summary.getvalue().splitlines()
    assert lines[0] == "kept epoch 117 of 127 (best val segment_accuracy 0.7812); test 0.7213"
    assert all(len(line) <= 80 for line in lines), lines


def test_weights_list_at_80_columns_cuts_no_name(weights_dir):
    from avepipe.backbones.weights import manifest

    result = run_cli("weights", "list", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines[:-3]) and "…" not in result.stdout, result.stdout
    flat = re.sub(r"[│\s]+", "", result.stdout)
    for name, entry in manifest().items():
        assert re.search(rf"│ {name} +│", result.stdout) and entry["file"] in flat, name
        assert any(line.startswith(f"{name}: http") for line in lines), name  # whole URLs, to copy


def test_readme_names_every_model_and_the_picture_is_told_apart():
    from avepipe.localization import SecondLabel, VideoLabels
    from avepipe.models import model_names
    from avepipe.timeline import BACKGROUND_COLOUR, MIN_WIDTH, PAD, PALETTE, _fit, _font, label_colour, timeline_title

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    models_line = next(line for line in readme.splitlines() if line.startswith("Models:"))
    for name in model_names():
        assert name.upper() in models_line.upper().replace("/", " ").replace(",", " ").split(), name
    # The caption closes its parenthesis at the narrowest width; the title names the run's folder.
    from PIL import Image, ImageDraw

    from avepipe import timeline

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    source = Path(timeline.__file__).read_text()
    caption = re.search(r'caption = "([^"]+)"', source).group(1)
    assert _fit(draw, caption, MIN_WIDTH - 2 * PAD, _font(timeline.FONT)) == caption
    assert caption.count("(") == caption.count(")")
    seconds = [SecondLabel(0, 1, "Dog", 0.9, 0.9, [])]
    runs = [VideoLabels("/v/clip.mp4", "clip", 1.0, seconds, [], model="avel supervised",
                        checkpoint=f"runs/{run}/checkpoint.pt") for run in ("a", "b")]
    assert [timeline_title(r) for r in runs] == ["clip.mp4 · 1 s · avel supervised (a/checkpoint.pt)",
                                                 "clip.mp4 · 1 s · avel supervised (b/checkpoint.pt)"]
    # A qualitative palette: the labels of one video take its distinct colours in order, far from each other and
    # from the background's grey.
    labels = [f"class {i}" for i in range(len(PALETTE))] + ["background"]
    colours = [label_colour(label, labels) for label in labels]
    assert colours[:-1] == list(PALETTE) and colours[-1] == BACKGROUND_COLOUR
    import itertools
    import math

    assert min(math.dist(a, b) for a, b in itertools.combinations(colours, 2)) > 60


def test_a_missing_file_among_good_ones_is_said_before_any_decoding(tmp_path):
    good = make_clip(tmp_path / "good.mp4", 1.0, size="64x48")
    missing = tmp_path / "missing.mp4"
    result = run_cli("extract", good, missing, "--cache", tmp_path / "f.h5", "--vgg19-weights", "random",
                     "--vggish-weights", "random", "--workers", "0", "--device", "cpu", "--progress", "log")
    assert result.returncode == 1, result.stderr
    assert "extract on cpu: 1 video to do" in result.stdout  # the missing file is not queued for decoding
    assert result.stderr.count(f"failed: {missing}: missing file") == 1
    from avepipe.cache import FeatureCache

    with FeatureCache(tmp_path / "f.h5") as reader:  # recorded, as any failure
        assert reader.ids() == ["good"] and "missing file" in reader.failures()["missing"]["error"]


# --- row 8: every bad CSV row in one run; labels a split lacks -------------------------------------------------------


def _clips(folder: Path, names: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        make_clip(folder / f"{name}.mp4", 2.0, size="64x48", freq=300 + 100 * i)


def test_dataset_init_reports_every_bad_row_in_one_run(tmp_path):
    videos = tmp_path / "clips"
    _clips(videos, ["a", "b", "c"])
    csv = tmp_path / "events.csv"
    csv.write_text("video,label,start,end,split\n"
                   "a.mp4,Bell,0,1,train\n"
                   "b.mp4,Dog,0,1,vall\n"      # line 3: no such split
                   "c.mp4,Car,0,12,test\n"     # line 4: past 10 s
                   "b.mp4,Dog,0,1,val\n"
                   "zz.mp4,Car,0,1,test\n"     # line 6: no such video
                   "c.mp4,Car,0,2,test\n")
    result = run_cli("dataset", "init", "--csv", csv, "--videos", videos, "--out", tmp_path / "mine")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr  # one line, every bad row in it
    assert lines[0].startswith(f"error: {csv}: 3 bad rows: line 3: split 'vall'")
    assert "; line 4: end 12 is past 10 s" in lines[0] and "; line 6: video 'zz.mp4'" in lines[0]
    assert not (tmp_path / "mine").exists()  # nothing written


def test_dataset_init_warns_about_labels_a_split_lacks(tmp_path):
    videos = tmp_path / "clips"
    _clips(videos, ["a", "b", "c"])
    csv = tmp_path / "events.csv"
    csv.write_text("a.mp4,Bell,0,1\nb.mp4,Dog,0,1\nc.mp4,Car,0,1\n")  # 3 videos, 3 labels, hashed split
    result = run_cli("dataset", "init", "--csv", csv, "--videos", videos, "--out", tmp_path / "mine")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("WARNING:")]
    assert any("in val/test but in no train row: the model never learns them" in line for line in warned), warned
    assert any("never checks" in line for line in warned), warned
    assert all("add a split column to choose" in line for line in warned)
    fine = tmp_path / "fine.csv"
    fine.write_text("a.mp4,Bell,0,1,train\nb.mp4,Bell,0,1,val\nc.mp4,Bell,0,1,test\n")
    ok = run_cli("dataset", "init", "--csv", fine, "--videos", videos, "--out", tmp_path / "fine")
    assert ok.returncode == 0 and "WARNING" not in ok.stderr, ok.stderr


# --- row 10: nothing left beside the cache after a clean run --------------------------------------------------------


def test_a_clean_run_leaves_only_the_cache(tmp_path):
    import numpy as np

    from avepipe.cache import FeatureCache

    with FeatureCache(tmp_path / "f.h5", "a") as cache:
        cache.ensure_spec({"spec_version": 1, "sampling": "ave", "synthetic": True})
        cache.put("v", np.zeros((1, 7, 7, 512), np.float32), np.zeros((1, 128), np.float32), {"seconds": 1})
        assert (tmp_path / "f.h5.lock").exists()  # held while writing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no .lock, no empty .staging/
    with FeatureCache(tmp_path / "f.h5", "a") as cache:  # a second writer: the same
        assert "v" in cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]
    with FeatureCache(tmp_path / "f.h5") as reader:
        assert reader.ids() == ["v"]
