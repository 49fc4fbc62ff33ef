"""CML end to end on a synthetic cache: the `{split}_order_match.h5` splits, the empty-event filter, the targets, and
the exact-match decoding of `train` / `evaluate`, checked against an independent decoding of the annotations."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from avepipe.cache import FeatureCache
from avepipe.checkpoint import load_checkpoint
from avepipe.data.synthetic import make_synthetic_ave
from avepipe.train import DataPaths, TrainOptions, evaluate, evaluate_split, load_task_data, train

CATEGORIES = ["Bell", "Dog", "Car"]
N_VIDEOS = 40
EMPTY = {"train": 1, "test": 1}  # rows with start == end (the official file has one 0&0 row): no query, left out
SMALL_TOML = {
    "dam": "[model]\natt_hidden = 64\ncml_hidden = 32\ncml_dim = 16\nheads = 4\n",
    "dcmr": "[model]\nmodel_dim = 32\nff_dim = 64\nencoder_layers = 1\n",
}


@pytest.fixture(scope="module")
def cml_data(tmp_path_factory):
    """Cache + Annotations.txt + {train,val,test}_order_match.h5; returns (features, annotations, rows per split)."""
    root = tmp_path_factory.mktemp("cml")
    data = make_synthetic_ave(N_VIDEOS, num_classes=len(CATEGORIES) + 1, seed=7, min_event=2, max_event=6)
    lines, splits = [], {"train": [], "val": [], "test": []}
    with FeatureCache(root / "f.h5", "a") as cache:
        cache.ensure_spec({"spec_version": 1, "sampling": "ave", "synthetic": True})
        for i in range(N_VIDEOS):
            vid = f"vid{i:03d}"
            cache.put(vid, data["visual"][i].numpy(), data["audio"][i].numpy(), {"seconds": 10})
            event = data["event"][i].numpy().nonzero()[0]
            split = "train" if i < 24 else "val" if i < 32 else "test"
            splits[split].append(len(lines))
            lines.append((CATEGORIES[int(data["video_label"][i])], vid, int(event[0]), int(event[-1]) + 1))
    for split, count in EMPTY.items():
        for _ in range(count):
            splits[split].append(len(lines))
            lines.append((CATEGORIES[0], "vid000", 3, 3))
    ave = root / "ave"
    ave.mkdir()
    (ave / "categories.txt").write_text("\n".join(CATEGORIES) + "\n")
    (ave / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                         + "".join(f"{c}&{v}&good&{s}&{e}\n" for c, v, s, e in lines))
    for split, rows in splits.items():
        with h5py.File(ave / f"{split}_order_match.h5", "w") as f:
            f["order"] = np.asarray(rows, dtype=np.int64)
    starts = [lines[r][2] for r in splits["test"] if lines[r][3] > lines[r][2]]
    assert len(set(starts)) > 2 and min(starts) >= 0 and max(starts) > 0  # targets are not all one start
    for name, text in SMALL_TOML.items():
        (root / f"{name}.toml").write_text(text)
    return root / "f.h5", ave / "Annotations.txt", lines, splits


def independent_exact_match(model, features, lines, rows, direction, sigmoid: bool) -> float:
    """Exact match from the annotation lines and the cache, decoded by brute force over every window."""
    cache = FeatureCache(features, "r")
    hits, total = 0, 0
    for r in rows:
        _, vid, start, end = lines[r]
        if end <= start:
            continue
        entry = cache.get(vid)
        visual = torch.from_numpy(np.asarray(entry.visual, dtype=np.float32))[None]
        audio = torch.from_numpy(np.asarray(entry.audio, dtype=np.float32))[None]
        mask = torch.ones(1, 10, dtype=torch.bool)
        query = torch.zeros(1, 10, dtype=torch.bool)
        query[0, start:end] = True
        with torch.no_grad():
            scores = model.forward_cml(visual, audio, mask, query, direction)["match_logits"][0].double()
        if sigmoid:
            scores = torch.sigmoid(scores)
        length = end - start
        sums = [float(scores[s:s + length].sum()) for s in range(10 - length + 1)]
        hits += int(int(np.argmax(sums)) == start)
        total += 1
    return hits / total


class Oracle(torch.nn.Module):
    """Scores +1 inside a fixed span per video (the true one, or shifted), -1 elsewhere: decodes exactly that span."""

    cml_decode = "logits"

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward_cml(self, visual, audio, mask, query_mask, direction):
        scores = torch.where(query_mask.roll(self.shift, 1), 1.0, -1.0)
        return {"match_logits": scores}


def test_cml_targets_empty_filter_and_oracle_decoding(cml_data):
    features, annotations, lines, splits = cml_data
    data = load_task_data(DataPaths(str(features), str(annotations)), "cml", ("train", "val", "test"),
                          torch.device("cpu"))
    for split, rows in splits.items():
        kept = [r for r in rows if lines[r][3] > lines[r][2]]
        assert data.splits[split].rows.tolist() == kept  # the empty-event rows are left out, nothing else
        rowset = data.splits[split]
        for i, r in enumerate(kept):
            expected = torch.zeros(10)
            expected[lines[r][2]:lines[r][3]] = 1
            assert torch.equal(rowset.event[i], expected)
    # The decoding and the targets of evaluate_split: a model scoring the true span wins every query, one scoring a
    # span shifted by a second wins none (a target of the wrong start, e.g. 0, would give other numbers).
    for direction in ("a2v", "v2a"):
        assert evaluate_split(Oracle(), data, "test", "cml", direction) == 1.0
        assert evaluate_split(Oracle(shift=1), data, "test", "cml", direction) == 0.0


@pytest.mark.parametrize("name", ["dam", "dcmr"])
def test_cml_train_and_evaluate_end_to_end(tmp_path, cml_data, name):
    features, annotations, lines, splits = cml_data
    paths = DataPaths(str(features), str(annotations))
    metrics = train(TrainOptions(name, "cml", str(tmp_path / "run"), direction="a2v", epochs=2, batch_size=8,
                                 device="cpu", config_file=str(features.parent / f"{name}.toml")), paths)
    kept = sum(lines[r][3] > lines[r][2] for r in splits["train"])
    assert metrics["train_rows"] == kept == len(splits["train"]) - EMPTY["train"]
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = independent_exact_match(model, features, lines, splits["test"], "a2v",
                                       sigmoid=getattr(model, "cml_decode", "logits") == "sigmoid")
    assert metrics["test_exact_match"] == pytest.approx(expected)
    result = evaluate(tmp_path / "run" / "checkpoint.pt", paths, "test", "cpu")
    assert result["exact_match"] == pytest.approx(expected) and result["rows"] == len(splits["test"]) - 1
