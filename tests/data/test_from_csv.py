"""`avepipe dataset init`: a dataset of your own videos from a CSV, checked against the videos (the shipped clips of
``$AVEPIPE_TEST_MEDIA``), then extract + train on it end to end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from avepipe.data import ave
from avepipe.data.from_csv import hash_fraction, hashed_splits, init_dataset
from avepipe.errors import DataError, UsageError
from tests.helpers import run_cli

# The shipped clips used here: whole seconds as avepipe counts them (docs/features.md).
CLIPS = {"fire2.mp4": 2, "big_buck_bunny_432_433.webm": 1, "sample_1s.mp4": 1, "chaplin.mp4": 9}


def write_csv(folder: Path, text: str) -> Path:
    path = folder / "events.csv"
    path.write_text(text)
    return path


def test_hashed_splits_are_stable_about_80_10_10_and_never_empty():
    ids = [f"clip{i:04d}" for i in range(2000)]
    split = hashed_splits(ids)
    assert split == hashed_splits(list(reversed(ids)))  # depends on the ids only
    share = Counter(split.values())
    assert 0.77 < share["train"] / len(ids) < 0.83 and 0.08 < share["val"] / len(ids) < 0.12
    assert hash_fraction("clip0001") == hash_fraction("clip0001") and 0 <= hash_fraction("x") < 1
    for start in range(0, 300, 3):  # 100 triples: each fills train, val and test
        assert sorted(hashed_splits(ids[start:start + 3]).values()) == ["test", "train", "val"]
    assert set(hashed_splits(ids[:4]).values()) == {"train", "val", "test"}
    with pytest.raises(ValueError, match="cannot fill"):
        hashed_splits(ids[:2])


def test_writes_the_ave_formats_the_loaders_read(media_dir, tmp_path):
    csv = write_csv(tmp_path, "video,label,start,end\n"
                              "fire2.mp4,Fire crackling,0,2\n"
                              "# a comment line\n"
                              "big_buck_bunny_432_433,Rodents,0,1\n"  # an id, not a file name
                              "sample_1s.mp4,Speech,0,1\n"
                              "chaplin.mp4,Speech,2,9\n"
                              "chaplin.mp4,Fire crackling,0,2\n")  # two events in one video
    summary = init_dataset(csv, media_dir, tmp_path / "mine")
    out = tmp_path / "mine"
    assert ave.read_categories(out / "categories.txt") == ["Fire crackling", "Rodents", "Speech"]
    rows = ave.read_annotations(out / "Annotations.txt", summary.categories)
    assert [(r.category, r.video_id, r.start, r.end) for r in rows] == [
        ("Fire crackling", "fire2", 0, 2), ("Rodents", "big_buck_bunny_432_433", 0, 1), ("Speech", "sample_1s", 0, 1),
        ("Speech", "chaplin", 2, 9), ("Fire crackling", "chaplin", 0, 2)]
    assert (out / "Annotations.txt").read_text().splitlines()[0] == "Category&VideoID&Quality&StartTime&EndTime"
    together = []
    for split in ("train", "val", "test"):
        indices = ave.load_split("sel", split, out)  # what train reads (no order files: the split files)
        assert len(indices) > 0
        assert len({rows[i].video_id for i in indices} & set(together)) == 0  # a video in one split only
        together += [rows[i].video_id for i in indices]
    assert sorted(together) == sorted(r.video_id for r in rows)
    assert summary.hashed_split and summary.videos == 4 and summary.rows == 5
    assert summary.longer_than_clip == []


def test_the_split_column_is_used(media_dir, tmp_path):
    csv = write_csv(tmp_path, "fire2.mp4,Fire,0,2,train\nsample_1s.mp4,Speech,0,1,val\n"
                              "big_buck_bunny_432_433.webm,Fire,0,1,test\nchaplin.mp4,Speech,0,9,train\n")
    summary = init_dataset(csv, media_dir, tmp_path / "mine")
    assert not summary.hashed_split and summary.split_rows == {"train": 2, "val": 1, "test": 1}
    assert (tmp_path / "mine" / "valSet.txt").read_text() == "Speech&sample_1s&good&0&1\n"


@pytest.mark.parametrize("text, problem", [
    ("fire2.mp4,Fire,0,2\nnope.mp4,Fire,0,1\n", "line 2: video 'nope.mp4': no such file in"),
    ("fire2.mp4,Fire,0,2\nnope,Fire,0,1\n", "line 2: video 'nope': no such file or video id in"),
    ("fire2.mp4,Fire,2,2\n", "line 1: need 0 <= start < end, got start=2 end=2"),
    ("fire2.mp4,Fire,2,1\n", "line 1: need 0 <= start < end, got start=2 end=1"),
    ("fire2.mp4,Fire,1,3\n", "line 1: end 3 is past the end of"),
    ("chaplin.mp4,Speech,0,10\n", "line 1: end 10 is past the end of"),  # 9.64 s: 9 whole seconds
    ("video,label,start,end\nfire2.mp4,Fire,0,2\n\nfire2.mp4,Fire,0,2\n", "line 4: duplicate of line 2"),
    ("fire2.mp4,Rock & roll,0,2\n", "line 1: label 'Rock & roll' holds '&'"),
    ("fire2.mp4,background,0,2\n", "line 1: 'background' is not a label"),
    ("fire2.mp4,Fire,0,1.5\n", "line 1: start '0' / end '1.5': expected whole seconds"),
    ("fire2.mp4,Fire,0,12\n", "line 1: end 12 is past 10 s: the models see 10-s clips"),
    ("fire2.mp4,Fire,0\n", "line 1: expected 4 or 5 fields"),
    ("fire2.mp4,Fire,0,2,train\nchaplin.mp4,Fire,0,2\n", "line 2: rows with and without a split column"),
    ("fire2.mp4,Fire,0,2,train\nfire2.mp4,Dog,0,1,test\n", "line 2: video fire2 is in split test, but in train on"),
    ("fire2.mp4,Fire,0,2,training\n", "line 1: split 'training': expected train, val or test"),
    ("fire2.mp4,Fire,0,2,train\nchaplin.mp4,Fire,0,2,train\nsample_1s.mp4,Fire,0,1,val\n", ": no test rows"),
    ("fire2.mp4,Fire,0,2\nchaplin.mp4,Fire,0,2\n", "2 videos cannot fill train, val and test"),
    ("video,label,begin,end\nfire2.mp4,Fire,0,2\n", "line 1: header 'video,label,begin,end': expected the columns"),
])
def test_bad_rows_are_refused_naming_the_line(media_dir, tmp_path, text, problem):
    csv = write_csv(tmp_path, text)
    with pytest.raises(DataError) as error:
        init_dataset(csv, media_dir, tmp_path / "mine")
    assert str(error.value).startswith(f"{csv}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "mine").exists()


def test_more_labels_than_the_models_have_are_refused(media_dir, tmp_path):
    text = "".join(f"fire2.mp4,label {i},0,1\n" for i in range(29))
    with pytest.raises(DataError, match="29 labels, but the models have 28 categories"):
        init_dataset(write_csv(tmp_path, text), media_dir, tmp_path / "mine")


def test_the_output_folder_is_protected(media_dir, tmp_path):
    csv = write_csv(tmp_path, "fire2.mp4,Fire,0,2\nsample_1s.mp4,Fire,0,1\nbig_buck_bunny_432_433.webm,Dog,0,1\n")
    out = tmp_path / "mine"
    init_dataset(csv, media_dir, out)
    with pytest.raises(UsageError, match="already holds Annotations.txt, trainSet.txt"):
        init_dataset(csv, media_dir, out)
    init_dataset(csv, media_dir, out, overwrite=True)
    (out / "train_order.h5").write_bytes(b"")
    with pytest.raises(UsageError, match="holds train_order.h5, which would take precedence"):
        init_dataset(csv, media_dir, out, overwrite=True)


def test_csv_to_extract_to_train_end_to_end(media_dir, vgg19_weights, tmp_path):
    """What docs/datasets.md shows: init, extract into DIR/features.h5, train --dataset DIR (short clips, CPU)."""
    csv = write_csv(tmp_path, "video,label,start,end\n"
                              "fire2.mp4,Fire crackling,0,2\n"
                              "big_buck_bunny_432_433.webm,Rodents,0,1\n"
                              "sample_1s.mp4,Speech,0,1\n")
    data = tmp_path / "mine"
    init = run_cli("dataset", "init", "--csv", csv, "--videos", media_dir, "--out", data)
    assert init.returncode == 0, init.stderr
    assert f"next: avepipe extract --list {data / 'videos.txt'} --cache {data / 'features.h5'}" in init.stdout
    clips = [media_dir / name for name in ("fire2.mp4", "big_buck_bunny_432_433.webm", "sample_1s.mp4")]
    assert (data / "videos.txt").read_text().splitlines() == [str(c.resolve()) for c in clips]  # just the CSV's
    extract = run_cli("extract", "--list", data / "videos.txt", "--cache", data / "features.h5",
                      "--vgg19-weights", vgg19_weights,
                      "--vggish-weights", "random", "--device", "cpu", "--workers", "0")
    assert extract.returncode == 0, extract.stderr
    train = run_cli("train", "--model", "avel", "--dataset", data, "--epochs", "1", "--device", "cpu",
                    "--out", tmp_path / "run")
    assert train.returncode == 0, train.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["class_names"] == ["Fire crackling", "Rodents", "Speech", "background"]


def test_cli_errors_are_one_line(media_dir, tmp_path):
    csv = write_csv(tmp_path, "fire2.mp4,Fire,0,2\nfire2.mp4,Fire,0,2\n")
    result = run_cli("dataset", "init", "--csv", csv, "--videos", media_dir, "--out", tmp_path / "mine")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {csv}: line 2: duplicate of line 1"]
    missing = run_cli("dataset", "init", "--csv", tmp_path / "absent.csv", "--videos", media_dir)
    assert missing.returncode == 2 and "--csv" in missing.stderr and "no such file" in missing.stderr
