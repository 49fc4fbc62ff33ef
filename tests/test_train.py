"""`avepipe train` / `evaluate` / `dataset`: the training loop on synthetic caches and end to end on real features."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from avepipe.cache import FeatureCache
from avepipe.checkpoint import load_checkpoint
from avepipe.data.synthetic import make_synthetic_ave
from avepipe.train import DataPaths, TrainOptions, train
from tests.helpers import run_cli

CATEGORIES = ["Bell", "Dog", "Car"]


def write_dataset(folder: Path, rows: dict[str, list[tuple[str, str, int, int]]]) -> Path:
    """categories.txt, Annotations.txt (with header) and {split}Set.txt for hand-made rows (category, id, start,
    end)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "categories.txt").write_text("\n".join(CATEGORIES) + "\n")
    lines = {split: [f"{c}&{vid}&good&{s}&{e}" for c, vid, s, e in items] for split, items in rows.items()}
    (folder / "Annotations.txt").write_text(
        "Category&VideoID&Quality&StartTime&EndTime\n"
        + "\n".join(line for split in ("train", "val", "test") for line in lines[split]) + "\n")
    for split, split_lines in lines.items():
        (folder / f"{split}Set.txt").write_text("\n".join(split_lines) + "\n")
    return folder / "Annotations.txt"


def synthetic_task(root: Path, videos: int = 48) -> tuple[Path, Path]:
    """A synthetic AVE-like task written as a real cache + annotation files (2/3 train, 1/6 val, 1/6 test):
    ``(features, annotations)``."""
    data = make_synthetic_ave(videos, num_classes=len(CATEGORIES) + 1, seed=3, min_event=2, max_event=8)
    rows = {"train": [], "val": [], "test": []}
    with FeatureCache(root / "f.h5", "a") as cache:
        cache.ensure_spec({"spec_version": 1, "sampling": "ave", "synthetic": True})
        for i in range(videos):
            vid = f"vid{i:03d}" if videos <= 1000 else f"vid{i:06d}"
            cache.put(vid, data["visual"][i].numpy(), data["audio"][i].numpy(), {"seconds": 10})
            event = data["event"][i].numpy().nonzero()[0]
            split = "train" if i < videos * 2 // 3 else "val" if i < videos * 5 // 6 else "test"
            rows[split].append((CATEGORIES[int(data["video_label"][i])], vid, int(event[0]), int(event[-1]) + 1))
    return root / "f.h5", write_dataset(root / "ave", rows)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A small synthetic AVE-like task written as a real cache + annotation files."""
    return synthetic_task(tmp_path_factory.mktemp("synthetic"))


def test_resume_continues_exactly(tmp_path, synthetic_run):
    features, annotations = synthetic_run
    paths = DataPaths(str(features), str(annotations))
    straight = train(TrainOptions("avel", "supervised", str(tmp_path / "a"), epochs=3, batch_size=8, device="cpu"),
                     paths)
    train(TrainOptions("avel", "supervised", str(tmp_path / "b"), epochs=2, batch_size=8, device="cpu"), paths)
    resumed = train(TrainOptions("avel", "supervised", str(tmp_path / "b"), epochs=3, batch_size=8, device="cpu",
                                 resume=True), paths)
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_selection_takes_the_first_val_maximum_and_never_looks_at_test(tmp_path, synthetic_run, monkeypatch):
    """Scripted curves where val and test disagree and val ties: the kept epoch is the first val maximum (2), not the
    tie's later epoch (3) nor the best test epoch (4), which is reported only as the ORACLE."""
    import avepipe.train as train_module

    curves = {"val": [0.5, 0.7, 0.7, 0.6], "test": [0.9, 0.1, 0.2, 0.95]}
    calls = {"val": 0, "test": 0}

    def scripted(model, data, split, task, direction, batch_size=256):
        i = calls[split]
        calls[split] += 1
        return curves[split][i] if i < len(curves[split]) else -1.0  # the final test of the kept checkpoint

    monkeypatch.setattr(train_module, "evaluate_split", scripted)
    features, annotations = synthetic_run
    metrics = train(TrainOptions("avel", "supervised", str(tmp_path / "run"), epochs=4, batch_size=8, device="cpu"),
                    DataPaths(str(features), str(annotations)))
    assert metrics["best_epoch"] == 2 and metrics["val_segment_accuracy"] == 0.7
    assert metrics["oracle_best_test_epoch"] == 4 and metrics["oracle_best_test_segment_accuracy"] == 0.95
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["metrics"]["best_epoch"] == 2


def test_checkpoint_is_chosen_on_val(tmp_path, synthetic_run):
    features, annotations = synthetic_run
    metrics = train(TrainOptions("avel", "supervised", str(tmp_path / "run"), epochs=4, batch_size=8, device="cpu"),
                    DataPaths(str(features), str(annotations)))
    vals = [h["val_segment_accuracy"] for h in metrics["history"]]
    assert metrics["best_epoch"] == int(np.argmax(vals)) + 1  # first maximum of val, never test
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["metrics"]["best_epoch"] == metrics["best_epoch"]
    assert ckpt["class_names"] == CATEGORIES + ["background"]
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written) >= {"val_segment_accuracy", "test_segment_accuracy"}


def test_seeds_report_mean_and_std(tmp_path, synthetic_run):
    features, annotations = synthetic_run
    result = run_cli("train", "--model", "avel", "--features", features, "--annotations", annotations, "--out",
                     tmp_path / "runs", "--seeds", "2", "--epochs", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["test_segment_accuracy"]["values"]) == 2
    assert "±" in result.stdout
    assert (tmp_path / "runs" / "seed-1" / "checkpoint.pt").exists()


def test_train_usage_errors(tmp_path, synthetic_run):
    features, annotations = synthetic_run
    cases = [
        (["--model", "nope"], "unknown model"),
        (["--model", "avel", "--task", "cml", "--direction", "a2v"], "does not support task"),
        (["--model", "dam", "--task", "cml"], "--direction"),
    ]
    for extra, words in cases:
        result = run_cli("train", *extra, "--features", features, "--annotations", annotations, "--out", tmp_path / "x",
                         "--epochs", "1", "--device", "cpu")
        assert result.returncode == 2 and words in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
    empty = tmp_path / "empty.h5"
    with FeatureCache(empty, "a") as cache:
        cache.ensure_spec({"spec_version": 1})
    result = run_cli("train", "--model", "avel", "--features", empty, "--annotations", annotations, "--out",
                     tmp_path / "y", "--epochs", "1", "--device", "cpu")
    assert result.returncode == 2 and "no features for" in result.stderr


def test_end_to_end_on_real_extracted_features(tmp_path, real_cache):
    """Real clips -> extract -> hand-labelled annotations -> train 2 epochs -> evaluate -> weights_only load."""
    cache, extracted = real_cache
    assert extracted.returncode == 0, extracted.stderr
    annotations = write_dataset(tmp_path / "ave", {
        "train": [("Car", "chaplin", 2, 7), ("Dog", "bbb_5s_6ch", 1, 4), ("Bell", "fire2", 0, 2)],
        "val": [("Car", "big_buck_bunny_432_433", 0, 1)],
        "test": [("Bell", "sample_1s", 0, 1), ("Dog", "chaplin", 0, 3)],
    })
    run = tmp_path / "run"
    trained = run_cli("train", "--model", "avel", "--task", "supervised", "--features", cache, "--annotations",
                      annotations, "--out", run, "--epochs", "2", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    assert "epoch 2/2" in trained.stdout
    for name in ("checkpoint.pt", "last.pt", "config.json", "metrics.json"):
        assert (run / name).exists()
    evaluated = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--features", cache, "--annotations",
                        annotations, "--split", "test", "--out", tmp_path / "eval.json", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert result["rows"] == 2 and result["segment_accuracy"] == pytest.approx(metrics["test_segment_accuracy"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["model"] == "avel" and ckpt["versions"]["torch"] == torch.__version__
    model, _ = load_checkpoint(run / "checkpoint.pt")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dataset_labels_equal_the_released_construction(tmp_path, ave_dir):
    out = tmp_path / "labels.h5"
    result = run_cli("dataset", "labels", "--annotations", ave_dir / "Annotations.txt", "--out", out)
    assert result.returncode == 0, result.stderr
    lines = (ave_dir / "Annotations.txt").read_text().splitlines()[1:]
    names = (ave_dir / "categories.txt").read_text().splitlines()
    with h5py.File(out, "r") as f:
        labels, event, video = f["labels"][()], f["event"][()], f["video_label"][()]
    assert labels.shape == (4143, 10, 29) and labels.dtype == np.float32
    for n, line in enumerate(lines):  # the released files: event[n, s:e] = 1, class there, background elsewhere
        category, _, _, start, end = line.split("&")
        c, s, e = names.index(category), int(start), int(end)
        expected_event = np.zeros(10, np.float32)
        expected_event[s:e] = 1
        assert np.array_equal(event[n], expected_event)
        assert np.array_equal(labels[n].argmax(1), np.where(expected_event == 1, c, 28))
        assert video[n].argmax() == c and video[n].sum() == 1


def test_import_released_features(tmp_path, ave_dir):
    """Files in the released layout (key avadataset, Annotations order) become a cache that trains."""
    rows = (ave_dir / "Annotations.txt").read_text().splitlines()[:41]  # header + 40 rows
    (tmp_path / "Annotations.txt").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    n = 40
    audio = rng.random((n, 10, 128), dtype=np.float32)
    visual = rng.random((n, 10, 7, 7, 512), dtype=np.float32)
    with h5py.File(tmp_path / "audio_feature.h5", "w") as f:
        f["avadataset"] = audio
    with h5py.File(tmp_path / "visual_feature.h5", "w") as f:
        f["avadataset"] = visual
    out = tmp_path / "imported.h5"
    result = run_cli("dataset", "import-ave", "--audio", tmp_path / "audio_feature.h5", "--visual",
                     tmp_path / "visual_feature.h5", "--annotations", tmp_path / "Annotations.txt", "--out", out)
    assert result.returncode == 0, result.stderr
    ids = [r.split("&")[1] for r in rows[1:]]
    cache = FeatureCache(out)
    assert cache.ids() == sorted(set(ids))
    first = {vid: i for i, vid in reversed(list(enumerate(ids)))}
    for vid, i in first.items():
        entry = cache.get(vid)
        np.testing.assert_array_equal(entry.visual, visual[i])
        np.testing.assert_array_equal(entry.audio, audio[i])
    bad = run_cli("dataset", "import-ave", "--audio", tmp_path / "audio_feature.h5", "--visual",
                  tmp_path / "visual_feature.h5", "--annotations", ave_dir / "Annotations.txt",
                  "--out", tmp_path / "b.h5")
    assert bad.returncode == 2 and "must match" in bad.stderr


def test_weak_training_takes_the_noisy_background_videos(tmp_path, synthetic_run):
    """Extra background-only videos in the released layout join the weak training split (video labels only)."""
    features, annotations = synthetic_run
    rng = np.random.default_rng(1)
    files = {"audio": rng.random((5, 10, 128), dtype=np.float32),
             "visual": rng.random((5, 10, 7, 7, 512), dtype=np.float32),
             "labels": np.tile(np.eye(29, dtype=np.float32)[28], (5, 1))}
    for name, array in files.items():
        with h5py.File(tmp_path / f"{name}_noisy.h5", "w") as f:
            f["avadataset"] = array
    noisy = tuple(str(tmp_path / f"{name}_noisy.h5") for name in ("audio", "visual", "labels"))
    base = train(TrainOptions("avel", "weak", str(tmp_path / "a"), epochs=1, batch_size=8, device="cpu"),
                 DataPaths(str(features), str(annotations)))
    extra = train(TrainOptions("avel", "weak", str(tmp_path / "b"), epochs=1, batch_size=8, device="cpu"),
                  DataPaths(str(features), str(annotations), noisy=noisy))
    assert extra["train_rows"] == base["train_rows"] + 5
    result = run_cli("train", "--model", "avel", "--task", "supervised", "--features", features, "--annotations",
                     annotations, "--out", tmp_path / "c", "--epochs", "1", "--device", "cpu",
                     "--noisy-audio", noisy[0], "--noisy-visual", noisy[1], "--noisy-labels", noisy[2])
    assert result.returncode == 2 and "--task weak only" in result.stderr
