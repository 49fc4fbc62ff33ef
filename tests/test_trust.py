"""Trust under real-world files, signals and mistakes: nothing lost, nothing silently wrong.

One test (or a few) per item of the issue, each named after what it guards: reordered categories, NaN features and
losses, run folders that must not be replaced, config keys that would be ignored, files that are not checkpoints,
outputs that would overwrite inputs, failed videos in the outputs, and the Python API from an unguarded script.
(Downloads capped at the manifest size and local-folder mirrors: tests/backbones/test_weights_download.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avepipe.cache import FeatureCache
from avepipe.data.synthetic import make_synthetic_ave
from avepipe.errors import CheckpointError, TrainingError, UsageError
from avepipe.localization import SecondLabel, VideoLabels
from avepipe.models.avel import AVEL
from avepipe.outputs import write_results
from avepipe.train import DataPaths, TrainOptions, evaluate, train
from tests.helpers import run_cli
from tests.test_localize import SMALL, _checkpoint
from tests.test_train import CATEGORIES, write_dataset

SPEC = {"spec_version": 1, "sampling": "ave", "synthetic": True}


def _write_cache(path: Path, data: dict, ids: list[str], poison: dict[str, str] | None = None) -> Path:
    with FeatureCache(path, "a") as cache:
        cache.ensure_spec(SPEC)
        for i, vid in enumerate(ids):
            visual, audio = data["visual"][i].numpy().copy(), data["audio"][i].numpy().copy()
            if (poison or {}).get(vid) == "visual":
                visual[3, 0, 0, 0] = np.nan
            elif (poison or {}).get(vid) == "audio":
                audio[5, 7] = np.inf
            cache.put(vid, visual, audio, {"seconds": 10})
    return path


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """24 synthetic videos (16 train, 4 val, 4 test) as a real cache + annotation files."""
    root = tmp_path_factory.mktemp("trust")
    data = make_synthetic_ave(24, num_classes=len(CATEGORIES) + 1, seed=5, min_event=2, max_event=8)
    ids = [f"vid{i:03d}" for i in range(24)]
    rows = {"train": [], "val": [], "test": []}
    for i, vid in enumerate(ids):
        event = data["event"][i].numpy().nonzero()[0]
        split = "train" if i < 16 else "val" if i < 20 else "test"
        rows[split].append((CATEGORIES[int(data["video_label"][i])], vid, int(event[0]), int(event[-1]) + 1))
    annotations = write_dataset(root / "ave", rows)
    return _write_cache(root / "f.h5", data, ids), annotations, data, ids


def _options(out: Path, **extra) -> TrainOptions:
    return TrainOptions("avel", "supervised", str(out), **{"epochs": 1, "batch_size": 8, "device": "cpu", **extra})


def _train_args(features: Path, annotations: Path, out: Path, *extra) -> list:
    return ["train", "--model", "avel", "--features", features, "--annotations", annotations, "--out", out,
            "--batch-size", "8", "--device", "cpu", *extra]


# ---- 1. categories.txt reordered -------------------------------------------------------------------------------------


def test_reordered_categories_are_mapped_by_name_and_other_categories_refused(tmp_path, small_task):
    features, annotations, _, _ = small_task
    paths = DataPaths(str(features), str(annotations))
    train(_options(tmp_path / "run", epochs=2), paths)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    reordered = tmp_path / "reordered.txt"
    reordered.write_text("\n".join(reversed(CATEGORIES)) + "\n")
    as_trained = evaluate(checkpoint, paths, "test", "cpu")
    mapped = evaluate(checkpoint, DataPaths(str(features), str(annotations), categories=str(reordered)), "test", "cpu")
    assert mapped["segment_accuracy"] == as_trained["segment_accuracy"]

    # --resume with the reordered file continues exactly as the run in the original order.
    straight = train(_options(tmp_path / "straight", epochs=2), paths)
    train(_options(tmp_path / "resumed", epochs=1), paths)
    resumed = train(_options(tmp_path / "resumed", epochs=2, resume=True),
                    DataPaths(str(features), str(annotations), categories=str(reordered)))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["class_names"] == \
        CATEGORIES + ["background"]

    other = tmp_path / "other.txt"
    other.write_text("Bell\nDog\nTrain\n")
    result = run_cli("evaluate", "--checkpoint", checkpoint, "--features", features, "--annotations", annotations,
                     "--categories", other, "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert "not in " in result.stderr and "Car" in result.stderr and "Train" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="Car"):
        train(_options(tmp_path / "resumed", epochs=3, resume=True),
              DataPaths(str(features), str(annotations), categories=str(other)))


# ---- 2. NaN / inf ----------------------------------------------------------------------------------------------------


def test_nan_or_inf_features_are_refused_naming_the_video(tmp_path, small_task):
    _, annotations, data, ids = small_task
    for modality, vid in (("visual", "vid004"), ("audio", "vid017")):
        features = _write_cache(tmp_path / f"{modality}.h5", data, ids, poison={vid: modality})
        run = tmp_path / f"run-{modality}"
        result = run_cli(*_train_args(features, annotations, run, "--epochs", "1"))
        assert result.returncode == 2, result.stderr
        assert f"video {vid}: NaN or inf in its {modality} features" in result.stderr
        assert not (run / "checkpoint.pt").exists() and "loss nan" not in result.stdout


def test_non_finite_loss_stops_the_run_without_a_checkpoint_of_that_epoch(tmp_path, small_task, monkeypatch):
    features, annotations, _, _ = small_task
    real_loss = AVEL.loss
    state = {"epoch": 0}

    def loss(self, outputs, batch, task):
        value = real_loss(self, outputs, batch, task)
        return value * float("nan") if state["epoch"] >= 1 else value

    monkeypatch.setattr(AVEL, "loss", loss)
    with pytest.raises(TrainingError) as caught:
        train(_options(tmp_path / "run", epochs=3), DataPaths(str(features), str(annotations)),
              on_epoch=lambda record: state.update(epoch=record["epoch"]))
    message = str(caught.value)
    assert "\n" not in message and "epoch 2" in message and "nan" in message and "--lr" in message
    best = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert best["metrics"]["epoch"] == 1 and last["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())

    state["epoch"] = 1  # from the first batch on: nothing may be written at all
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        train(_options(tmp_path / "fresh", epochs=2), DataPaths(str(features), str(annotations)))
    assert not (tmp_path / "fresh" / "checkpoint.pt").exists() and not (tmp_path / "fresh" / "last.pt").exists()


# ---- 3. run folders: no silent replacement, resume with the same settings, Ctrl-C hint ------------------------------


def test_train_into_an_existing_run_needs_resume_or_overwrite(tmp_path, small_task):
    features, annotations, _, _ = small_task
    run = tmp_path / "run"
    assert run_cli(*_train_args(features, annotations, run, "--epochs", "2")).returncode == 0
    before = (run / "checkpoint.pt").read_bytes()
    again = run_cli(*_train_args(features, annotations, run, "--epochs", "1"))
    assert again.returncode == 2, again.stderr
    assert "already holds a run" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (run / "checkpoint.pt").read_bytes() == before
    both = run_cli(*_train_args(features, annotations, run, "--epochs", "3", "--resume", "--overwrite"))
    assert both.returncode == 2 and "give one of them" in both.stderr
    replaced = run_cli(*_train_args(features, annotations, run, "--epochs", "1", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1


def test_resume_with_other_features_lr_or_batch_size_is_refused(tmp_path, small_task):
    features, annotations, data, ids = small_task
    paths = DataPaths(str(features), str(annotations))
    train(_options(tmp_path / "run", lr=1e-3), paths)
    copy = _write_cache(tmp_path / "copy.h5", data, ids)
    with pytest.raises(UsageError) as caught:
        train(_options(tmp_path / "run", epochs=2, lr=1e-2, batch_size=4, resume=True),
              DataPaths(str(copy), str(annotations)))
    message = str(caught.value)
    assert f"--features {features} -> {copy}" in message
    assert "--lr 0.001 -> 0.01" in message and "--batch-size 8 -> 4" in message
    resumed = train(_options(tmp_path / "run", epochs=2, lr=1e-3, resume=True), paths)  # only epochs may change
    assert len(resumed["history"]) == 2


def test_ctrl_c_during_train_prints_the_resume_command(tmp_path, small_task):
    features, annotations, _, _ = small_task
    run = tmp_path / "run"
    args = [str(a) for a in _train_args(features, annotations, run, "--epochs", "100000")]
    proc = subprocess.Popen([sys.executable, "-m", "avepipe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "400"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (run / "last.pt").exists(), proc.communicate()[1] if proc.poll() is not None else "no epoch in 120 s"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    hint = " ".join(stderr.split())
    expected = "avepipe " + " ".join(args) + " --resume"
    assert "interrupted" in hint and expected in hint, stderr
    resumed = run_cli(*args[:-2], "--epochs", "1", "--resume")  # the hinted command works (finished: nothing to do)
    assert resumed.returncode == 0, resumed.stderr


# ---- 4. config keys and values ---------------------------------------------------------------------------------------


def test_unknown_config_key_names_the_nearest_valid_one(tmp_path, small_task):
    features, annotations, _, _ = small_task
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepoch = 2\n")
    result = run_cli(*_train_args(features, annotations, tmp_path / "run", "--config", config))
    assert result.returncode == 2, result.stderr
    assert "unknown key 'epoch' in [train]" in result.stderr and "did you mean 'epochs'?" in result.stderr
    config.write_text("[model]\nlstm_hiden = 16\n")
    with pytest.raises(UsageError, match="did you mean 'lstm_hidden'"):
        train(_options(tmp_path / "run2", config_file=str(config)), DataPaths(str(features), str(annotations)))
    config.write_text("[train]\nweight_decay = 0.0001\ngrad_clip = 5.0\n[model]\nlstm_hidden = 16\n")  # valid keys
    train(_options(tmp_path / "run3", config_file=str(config)), DataPaths(str(features), str(annotations)))


def test_zero_epochs_zero_batch_size_and_nan_lr_are_usage_errors(tmp_path, small_task):
    features, annotations, _, _ = small_task
    result = run_cli(*_train_args(features, annotations, tmp_path / "run", "--epochs", "0"))
    assert result.returncode == 2 and "--epochs" in result.stderr, result.stderr
    paths = DataPaths(str(features), str(annotations))
    for extra, option in (({"batch_size": 0}, "--batch-size"), ({"lr": float("nan")}, "--lr"),
                          ({"lr": -1.0}, "--lr"), ({"lr": float("inf")}, "--lr")):
        with pytest.raises(UsageError, match=option):
            train(_options(tmp_path / "x", **extra), paths)
    assert not (tmp_path / "x").exists()


# ---- 5. files that are not checkpoints -------------------------------------------------------------------------------


class _Code:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_file_that_is_not_a_checkpoint_is_refused_without_unsafe_advice(tmp_path, small_task, media_dir):
    features, annotations, _, _ = small_task
    with open(tmp_path / "code.pt", "wb") as handle:
        pickle.dump({"state_dict": _Code()}, handle)
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    for name in ("code.pt", "random.pt", "plain.pt"):
        path = tmp_path / name
        for args in (["evaluate", "--checkpoint", path, "--features", features, "--annotations", annotations,
                      "--device", "cpu"],
                     ["localize", media_dir / "sample_1s.mp4", "--checkpoint", path, "--device", "cpu"]):
            result = run_cli(*args)
            assert result.returncode == 2, (name, result.stderr)
            assert f"{path}: not an avepipe checkpoint" in result.stderr, result.stderr
            assert "weights_only" not in result.stderr and "Traceback" not in result.stderr
            assert "arbitrary code" not in result.stderr and "UserWarning" not in result.stderr


# ---- 7. outputs: never over an input; failed videos in JSON / JSONL --------------------------------------------------


def test_localize_out_onto_an_input_file_is_refused(tmp_path):
    checkpoint = _checkpoint(tmp_path, "avel", "supervised", SMALL)
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"precious video bytes")
    listed = tmp_path / "videos.txt"
    listed.write_text("clip.mp4\n")
    cases = [
        ([video, "--format", "json", "--out", video], "--out"),
        ([video, "--format", "csv", "--out", checkpoint], "--out"),
        (["--list", listed, "--format", "jsonl", "--out", listed], "--out"),
        ([video, "--plot", video], "--plot"),
    ]
    for args, option in cases:
        result = run_cli("localize", *args, "--checkpoint", checkpoint, "--device", "cpu")
        assert result.returncode == 2, (args, result.stderr)
        assert f"error: {option} " in result.stderr and "is an input" in result.stderr, result.stderr
    assert video.read_bytes() == b"precious video bytes" and checkpoint.stat().st_size > 0
    assert listed.read_text() == "clip.mp4\n"
    same_name = tmp_path / "dir" / "clip.json"  # an input that DIR/<id>.json would replace
    same_name.parent.mkdir()
    same_name.write_text("{}")
    result = run_cli("localize", same_name, "--checkpoint", checkpoint, "--format", "json", "--out",
                     f"{same_name.parent}/", "--device", "cpu")
    assert result.returncode == 2 and "is an input" in result.stderr, result.stderr


def test_json_and_jsonl_outputs_include_failed_videos_csv_does_not(tmp_path):
    ok = VideoLabels("a.mp4", "a", 2.0, [SecondLabel(0, 1, "Dog", 0.9, 0.8, [{"label": "Dog", "probability": 0.8}]),
                                         SecondLabel(1, 2, "Dog", 0.9, 0.8, [{"label": "Dog", "probability": 0.8}])])
    ok.spans = [{"label": "Dog", "start": 0, "end": 2}]
    bad = VideoLabels("b.mp4", "b", error="b.mp4: not a media file: invalid data")
    results = [bad, ok]
    records = json.loads(write_results(results, "json", tmp_path / "all.json")[0].read_text())
    assert [(r["id"], r["error"]) for r in records] == [("b", bad.error), ("a", None)]
    lines = [json.loads(line) for line in write_results(results, "jsonl", tmp_path / "all.jsonl")[0].read_text()
             .splitlines()]
    assert lines[0] == {"video": "b.mp4", "id": "b", "error": bad.error} and len(lines) == 3
    assert all("error" not in line for line in lines[1:])
    csv_text = write_results(results, "csv", tmp_path / "all.csv")[0].read_text()
    assert "b.mp4" not in csv_text and csv_text.count("a.mp4") == 2  # documented: no row for a failed video
    per_video = write_results(results, "json", f"{tmp_path / 'dir'}/")
    assert sorted(p.name for p in per_video) == ["a.json", "b.json"]
    assert json.loads((tmp_path / "dir" / "b.json").read_text())[0]["error"] == bad.error
    assert [p.name for p in write_results(results, "csv", f"{tmp_path / 'csvdir'}/")] == ["a.csv"]


# ---- 8. the Python API: per-video errors, unguarded scripts ---------------------------------------------------------


SCRIPT = """
import json, sys
import avepipe

results = avepipe.localize([sys.argv[1], sys.argv[2]], sys.argv[3], workers=2, device="cpu",
                           vgg19_weights=sys.argv[4], vggish_weights=sys.argv[5])
print("RESULT " + json.dumps([[r.id, r.error, len(r.seconds)] for r in results]))
"""


def test_python_api_returns_per_video_errors_from_a_script_without_main_guard(tmp_path, media_dir, vgg19_weights,
                                                                              vggish_file):
    checkpoint = _checkpoint(tmp_path, "avel", "supervised", SMALL)
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video\n")
    # The script comes from stdin (python -), has no __main__ guard, and decodes in 2 processes.
    result = subprocess.run([sys.executable, "-", str(media_dir / "sample_1s.mp4"), str(bad), str(checkpoint),
                             str(vgg19_weights), str(vggish_file)], input=SCRIPT, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout  # printed once: the decoder processes did not run the script again
    (ok_id, ok_error, ok_seconds), (bad_id, bad_error, bad_seconds) = json.loads(lines[0][len("RESULT "):])
    assert (ok_id, ok_error, ok_seconds) == ("sample_1s", None, 1)
    assert bad_id == "broken" and "broken.mp4" in bad_error and bad_seconds == 0
