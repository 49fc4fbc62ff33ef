"""The weak task's background videos, presets in config.json / the checkpoint, and the honest comparison numbers
(val-selected test, ORACLE best test, per-epoch curves) in metrics.json and `avepipe evaluate`."""

from __future__ import annotations

import json
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avepipe.errors import DataWarning
from avepipe.models.registry import build_model
from avepipe.train import DataPaths, TrainOptions, load_task_data, train
from tests.helpers import run_cli
from tests.models.common import SMALL_CONFIGS
from tests.test_train import synthetic_run  # noqa: F401 (fixture)

NOISY = 6


def add_noisy_set(folder, seed: int = 0) -> None:
    """Background-only videos in the released layout (key avadataset), beside the annotations."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((NOISY, 29))
    labels[:, 28] = 1
    for name, value in (("audio_feature_noisy.h5", rng.normal(size=(NOISY, 10, 128))),
                        ("visual_feature_noisy.h5", rng.normal(size=(NOISY, 10, 7, 7, 512)).astype(np.float32)),
                        ("labels_noisy.h5", labels)):
        with h5py.File(folder / name, "w") as f:
            f.create_dataset("avadataset", data=value)


@pytest.fixture()
def dataset(tmp_path, synthetic_run):  # noqa: F811
    features, annotations = synthetic_run
    folder = tmp_path / "ave"
    shutil.copytree(annotations.parent, folder)
    return features, folder / "Annotations.txt"


def background_targets(paths: DataPaths) -> torch.Tensor:
    """The weak training targets of the background class (one-hot video labels, column 28) over the train split."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = load_task_data(paths, "weak", ("train",), torch.device("cpu"))
    return F.one_hot(data.splits["train"].video_label, 29)[:, 28]


def test_weak_training_sees_background_only_with_the_noisy_set(dataset):
    features, annotations = dataset
    paths = DataPaths(str(features), str(annotations))
    with pytest.warns(DataWarning, match="WITHOUT the released background-only videos"):
        load_task_data(paths, "weak", ("train",), torch.device("cpu"))
    assert background_targets(paths).sum() == 0  # no target ever says "background"
    add_noisy_set(annotations.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # found: no warning
        data = load_task_data(paths, "weak", ("train",), torch.device("cpu"))
    assert data.background_videos == NOISY
    assert background_targets(paths).sum() == NOISY
    # ... and the loss pushes the background class up for exactly those videos (AVEL's weak loss and DMIN's).
    rows = data.splits["train"]
    for name in ("avel", "dmin"):
        torch.manual_seed(0)
        model = build_model(name, "weak", {**SMALL_CONFIGS[name], "visual_dim": 512, "audio_dim": 128})
        b = {"visual": data.table.visual[rows.video].float(), "audio": data.table.audio[rows.video],
             "mask": rows.mask, "video_label": rows.video_label, "labels": rows.labels, "event": rows.event}
        out = model(b["visual"], b["audio"], b["mask"])
        out["video_logits"].retain_grad()
        model.loss(out, b, "weak").backward()
        pushed_up = out["video_logits"].grad[:, 28] < 0
        assert torch.equal(pushed_up, rows.video_label == 28), name
    assert background_targets(DataPaths(str(features), str(annotations), auto_noisy=False)).sum() == 0


def test_metrics_record_background_oracle_and_curves(tmp_path, dataset):
    features, annotations = dataset
    paths = DataPaths(str(features), str(annotations))
    with pytest.warns(DataWarning):
        metrics = train(TrainOptions("avel", "weak", str(tmp_path / "a"), epochs=3, batch_size=8, device="cpu"),
                        paths)
    assert metrics["background_videos"] == 0 and metrics["selection"] == "val"
    curve = metrics["curves"]["test_segment_accuracy"]
    assert len(curve) == 3 and curve == [h["test_segment_accuracy"] for h in metrics["history"]]
    assert metrics["oracle_best_test_segment_accuracy"] == max(curve)
    assert curve[metrics["oracle_best_test_epoch"] - 1] == max(curve)
    # the reported number is the test score of the val-selected epoch, never the oracle
    assert metrics["test_segment_accuracy"] == pytest.approx(curve[metrics["best_epoch"] - 1])
    assert metrics["published"] is None and metrics["dataset"] == "custom"  # not the AVE annotations: no paper number
    add_noisy_set(annotations.parent)
    metrics = train(TrainOptions("avel", "weak", str(tmp_path / "b"), epochs=1, batch_size=8, device="cpu",
                                 preset="released"), paths)
    assert metrics["background_videos"] == NOISY and metrics["preset"] == "released"
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["preset"] == "released" and config["config"]["model"]["attention_form"] == "released"
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["config"]["preset"] == "released"
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert written["background_videos"] == NOISY and "oracle_best_test_segment_accuracy" in written


def test_cli_preset_warning_and_evaluate_comparison(tmp_path, dataset):
    features, annotations = dataset
    run = tmp_path / "run"
    result = run_cli("train", "--model", "avel", "--task", "weak", "--features", features, "--annotations",
                     annotations, "--out", run, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                     "--preset", "released")
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "background" in result.stderr
    result = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--features", features, "--annotations",
                     annotations, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for words in ("val-selected", "ORACLE", "released"):
        assert words in result.stdout, (words, result.stdout)
    assert "66.7" not in result.stdout  # AVEL weak's published number: the paper comparison is for AVE only
    result = run_cli("train", "--model", "avsdn", "--features", features, "--annotations", annotations, "--out",
                     tmp_path / "x", "--epochs", "1", "--device", "cpu", "--preset", "released")
    assert result.returncode == 2 and "no preset 'released'" in result.stderr
    result = run_cli("models")
    assert result.returncode == 0 and "presets" in result.stdout and "released" in result.stdout
