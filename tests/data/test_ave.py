"""AVE annotation, split, label and noisy-set readers, checked on the real released files (ave_dir fixture)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from avepipe.data.ave import (
    BACKGROUND,
    NUM_CLASSES,
    SECONDS,
    Annotation,
    class_index,
    labels_arrays,
    load_noisy,
    load_split,
    read_annotations,
    read_categories,
    read_order_h5,
    read_split_file,
    write_labels_h5,
)

SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 3339, "val": 402, "test": 402}
N_ROWS = 4143


@pytest.fixture(scope="module")
def categories(ave_dir: Path) -> list[str]:
    return read_categories(ave_dir / "categories.txt")


@pytest.fixture(scope="module")
def annotations(ave_dir: Path, categories: list[str]) -> list[Annotation]:
    return read_annotations(ave_dir / "Annotations.txt", categories)


# --- annotations ------------------------------------------------------------------------------------------------------


def test_real_annotation_counts(annotations: list[Annotation], categories: list[str]) -> None:
    assert len(categories) == 28 == len(set(categories))
    assert categories[0] == "Church bell" and categories[-1] == "Mandolin"
    assert len(annotations) == N_ROWS
    assert [a.row for a in annotations] == list(range(N_ROWS))
    assert len({a.video_id for a in annotations}) == 4097
    assert {a.category for a in annotations} == set(categories)
    assert {a.quality for a in annotations} == {"good"}
    assert annotations[0] == Annotation(0, "Church bell", "RUhOCu3LNXM", "good", 0, 10)
    assert annotations[1] == Annotation(1, "Church bell", "MH3m4AwEcRY", "good", 6, 8)


def test_real_annotations_have_no_identical_rows(annotations: list[Annotation]) -> None:
    # Video ids repeat (one video, several events), but no full row does: split matching is unambiguous.
    keys = Counter(a.key() for a in annotations)
    assert max(keys.values()) == 1
    assert sum(1 for c in Counter(a.video_id for a in annotations).values() if c > 1) == 45


def test_real_file_has_exactly_one_empty_event(ave_dir: Path, annotations: list[Annotation]) -> None:
    empty = [a for a in annotations if a.start == a.end]
    assert empty == [Annotation(26, "Church bell", "VWi2ENBuTbw", "good", 0, 0)]
    with pytest.raises(ValueError, match=r"Annotations\.txt: line 28: "):
        read_annotations(ave_dir / "Annotations.txt", allow_empty=False)


def test_header_is_optional(ave_dir: Path, annotations: list[Annotation], categories, tmp_path: Path) -> None:
    lines = (ave_dir / "Annotations.txt").read_text().splitlines()
    assert lines[0] == "Category&VideoID&Quality&StartTime&EndTime"
    headerless = tmp_path / "no_header.txt"
    headerless.write_text("\n".join(lines[1:]) + "\n")
    assert read_annotations(headerless, categories) == annotations
    # CRLF endings, trailing whitespace and blank lines (before the header too) parse the same.
    messy = tmp_path / "messy.txt"
    messy.write_bytes(("\r\n \r\n" + "  \t\r\n".join(lines) + "\r\n\r\n").encode())
    assert read_annotations(messy, categories) == annotations


@pytest.mark.parametrize(
    "bad_row, why",
    [
        ("Church bell&abc&good&3", "expected 5"),
        ("Church bell&abc&good&3&5&x", "expected 5"),
        ("Church bell&abc&good&3&five", "not integers"),
        ("Church bell&abc&good&3.5&5", "not integers"),
        ("Church bell&abc&good&6&5", "start"),
        ("Church bell&abc&good&0&11", "start"),
        ("Church bell&abc&good&-1&5", "start"),
        ("&abc&good&1&5", "empty category"),
        ("Not a category&abc&good&1&5", "unknown category"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, categories, bad_row: str, why: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(f"Category&VideoID&Quality&StartTime&EndTime\nBark&xyz&good&0&10\n{bad_row}\nBark&uvw&good&1&2\n")
    with pytest.raises(ValueError, match=rf"bad\.txt: line 3: .*{why}"):
        read_annotations(path, categories)


def test_unknown_category_passes_without_category_list(tmp_path: Path) -> None:
    path = tmp_path / "any.txt"
    path.write_text("Whatever&abc&good&2&4\n")
    assert read_annotations(path) == [Annotation(0, "Whatever", "abc", "good", 2, 4)]
    with pytest.raises(ValueError, match="unknown category"):
        class_index(read_annotations(path)[0], ["Bark"])


def test_max_end_and_allow_empty(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("Bark&abc&good&8&15\nBark&abd&good&4&4\n")
    with pytest.raises(ValueError, match="line 1"):
        read_annotations(path)
    assert [a.end for a in read_annotations(path, max_end=20)] == [15, 4]
    with pytest.raises(ValueError, match="line 2"):
        read_annotations(path, max_end=20, allow_empty=False)


# --- labels -----------------------------------------------------------------------------------------------------------


def _explicit_labels(annotations, categories):
    """Independent construction: one second at a time."""
    n = len(annotations)
    labels = np.zeros((n, SECONDS, NUM_CLASSES), np.float32)
    event = np.zeros((n, SECONDS), np.float32)
    video = np.zeros((n, NUM_CLASSES), np.float32)
    for i, ann in enumerate(annotations):
        cls = categories.index(ann.category)
        video[i][cls] = 1
        for t in range(SECONDS):
            inside = ann.start <= t < ann.end
            event[i][t] = 1 if inside else 0
            labels[i][t][cls if inside else 28] = 1
    return labels, event, video


def test_labels_arrays_on_real_annotations(annotations, categories) -> None:
    arrays = labels_arrays(annotations, categories)
    labels, event, video = arrays["labels"], arrays["event"], arrays["video_label"]
    assert labels.shape == (N_ROWS, 10, 29) and event.shape == (N_ROWS, 10) and video.shape == (N_ROWS, 29)
    assert labels.dtype == event.dtype == video.dtype == np.float32
    assert np.all(labels.sum(-1) == 1) and set(np.unique(labels)) == {0.0, 1.0}
    assert np.all(video.sum(-1) == 1)
    assert np.all(labels[..., BACKGROUND][event == 0] == 1)
    assert np.all(labels[..., BACKGROUND][event == 1] == 0)
    for i, ann in enumerate(annotations):
        assert event[i].sum() == ann.end - ann.start
        assert np.all(event[i, ann.start : ann.end] == 1)
        cls = class_index(ann, categories)
        assert np.all(labels[i, ann.start : ann.end].argmax(-1) == cls)
        assert video[i].argmax() == cls
    ref_labels, ref_event, ref_video = _explicit_labels(annotations, categories)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(event, ref_event)
    np.testing.assert_array_equal(video, ref_video)
    # The empty-event row (26) is background throughout but keeps its category as video label.
    assert np.all(labels[26, :, BACKGROUND] == 1) and video[26, 0] == 1
    # 2,750 of the 4,143 events fill the whole 10 s.
    assert int((event.sum(-1) == 10).sum()) == 2750


def test_write_labels_h5_round_trip(annotations, categories, tmp_path: Path) -> None:
    out = tmp_path / "labels.h5"
    out.write_bytes(b"stale")  # replaced, not appended to
    write_labels_h5(annotations[:50], categories, out)
    expected = labels_arrays(annotations[:50], categories)
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"labels", "event", "video_label"}
        for name, value in expected.items():
            assert f[name].dtype == np.float32
            np.testing.assert_array_equal(f[name][()], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.h5"]  # no temporary file left behind


# --- splits -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_split_file_equals_order_file(ave_dir: Path, annotations, split: str) -> None:
    from_txt = read_split_file(ave_dir / f"{split}Set.txt", annotations)
    from_h5 = read_order_h5(ave_dir / f"{split}_order.h5")
    assert from_txt.dtype == from_h5.dtype == np.int64
    assert len(from_txt) == SPLIT_SIZES[split]
    np.testing.assert_array_equal(from_txt, from_h5)
    np.testing.assert_array_equal(load_split("sel", split, ave_dir), from_h5)


def test_sel_splits_partition_rows(ave_dir: Path) -> None:
    parts = [load_split("sel", s, ave_dir) for s in SPLITS]
    joined = np.concatenate(parts)
    assert len(joined) == N_ROWS
    np.testing.assert_array_equal(np.sort(joined), np.arange(N_ROWS))


def test_sel_falls_back_to_split_file(ave_dir: Path, tmp_path: Path) -> None:
    for name in ("Annotations.txt", "valSet.txt"):
        shutil.copy(ave_dir / name, tmp_path / name)
    np.testing.assert_array_equal(load_split("sel", "val", tmp_path), read_order_h5(ave_dir / "val_order.h5"))
    with pytest.raises(FileNotFoundError):
        load_split("cml", "val", tmp_path)  # no text fallback for the CML split
    with pytest.raises(FileNotFoundError):
        load_split("sel", "test", tmp_path)


def test_cml_split_partitions_rows_with_known_test_lengths(ave_dir: Path, annotations) -> None:
    parts = {s: load_split("cml", s, ave_dir) for s in SPLITS}
    assert {s: len(p) for s, p in parts.items()} == SPLIT_SIZES
    np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(N_ROWS))
    lengths = np.array([a.end - a.start for a in annotations])
    test_counts = Counter(lengths[parts["test"]].tolist())
    assert test_counts == dict(zip(range(2, 10), [57, 57, 58, 58, 53, 46, 39, 34]))
    assert 10 in lengths[parts["train"]] and 10 in lengths[parts["val"]]
    # A different partition from SEL: e.g. the test sets share only part of their rows.
    sel_test = load_split("sel", "test", ave_dir)
    assert not np.array_equal(np.sort(sel_test), np.sort(parts["test"]))


def test_split_matching_handles_duplicates_and_misses(tmp_path: Path) -> None:
    rows = ["Bark&a&good&0&10", "Bark&a&good&2&4", "Bark&a&good&0&10", "Cat&b&good&1&3"]
    annotations = tmp_path / "ann.txt"
    annotations.write_text("\n".join(rows) + "\n")
    anns = read_annotations(annotations)
    split = tmp_path / "split.txt"
    split.write_text("Bark&a&good&0&10\nCat&b&good&1&3\nBark&a&good&0&10\n")
    np.testing.assert_array_equal(read_split_file(split, anns), [0, 3, 2])  # k-th copy -> k-th copy, in order
    split.write_text("Bark&a&good&0&10\nBark&a&good&0&10\nBark&a&good&0&10\n")
    with pytest.raises(ValueError, match=r"split\.txt: line 3: row not found"):
        read_split_file(split, anns)
    split.write_text("Bark&a&good&2&5\n")  # same video id, different times: no match
    with pytest.raises(ValueError, match="line 1"):
        read_split_file(split, anns)


def test_load_split_rejects_bad_arguments_and_files(ave_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        load_split("a2v", "test", ave_dir)
    with pytest.raises(ValueError, match="split"):
        load_split("sel", "dev", ave_dir)
    shutil.copy(ave_dir / "Annotations.txt", tmp_path / "Annotations.txt")
    with h5py.File(tmp_path / "test_order.h5", "w") as f:
        f["order"] = np.array([0, 4143], np.int64)
    with pytest.raises(ValueError, match="beyond"):
        load_split("sel", "test", tmp_path)
    with h5py.File(tmp_path / "val_order.h5", "w") as f:
        f["order"] = np.array([1, 1], np.int64)
    with pytest.raises(ValueError, match="repeated"):
        load_split("sel", "val", tmp_path)


# --- noisy set --------------------------------------------------------------------------------------------------------


def test_noisy_set(ave_dir: Path) -> None:
    audio, labels = load_noisy(ave_dir)
    assert audio.shape == (178, 10, 128) and audio.dtype == np.float32
    assert labels.shape == (178, 29) and labels.dtype == np.float32
    assert np.isfinite(audio).all() and audio.min() >= 0 and audio.std() > 0
    # Every row is the one-hot background label.
    expected = np.zeros((178, 29), np.float32)
    expected[:, BACKGROUND] = 1
    np.testing.assert_array_equal(labels, expected)
