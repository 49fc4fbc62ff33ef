"""`avepipe localize`: windows, records, writers, plots and CML queries; end to end on real videos of every length."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import avepipe
from avepipe.checkpoint import make_checkpoint
from avepipe.errors import UsageError
from avepipe.localization import (
    BACKGROUND,
    MATCH,
    NO_MATCH,
    CheckpointLabeller,
    SecondLabel,
    merge_spans,
    parse_span,
    window_owner,
    window_starts,
)
from avepipe.metrics import max_contiguous_window
from avepipe.models import build_model
from avepipe.outputs import format_probability
from avepipe.timeline import CELL, MIN_WIDTH, PER_ROW
from tests.helpers import run_cli
from tests.test_train import write_dataset

# The length classes of localize's windows, T (whole seconds) per file: one second, shorter than a window, one window,
# a multiple of it (two windows) and more than one window but no multiple (the last window aligned to the end,
# overlapping). Shipped media, and for the two long classes real cuts of shipped media (20 s of big_buck_bunny_0_30,
# 13 s of trailer_bbb): the same classes as the whole 30-s and 55-s files at less than half the VGG-19 work on a CPU.
LENGTHS = {"sample_1s.mp4": 1, "fire2.mp4": 2, "chaplin.mp4": 9, "smpte-2997.mp4": 10,
           "bbb_20s.mp4": 20, "trailer_13s.mp4": 13}
CUTS = {"bbb_20s.mp4": ("big_buck_bunny_0_30.webm", 4, 20), "trailer_13s.mp4": ("trailer_bbb.mp4", 20, 13)}


@pytest.fixture(scope="module")
def length_videos(media_dir, tmp_path_factory) -> list[Path]:
    """The videos of LENGTHS, in its order (the cuts re-encoded from the shipped files, T checked)."""
    from avepipe import media

    folder = tmp_path_factory.mktemp("lengths")
    paths = []
    for name, seconds in LENGTHS.items():
        if name not in CUTS:
            paths.append(media_dir / name)
            continue
        source, start, length = CUTS[name]
        cut = folder / name
        subprocess.run([media.ffmpeg_binary(), "-v", "error", "-y", "-ss", str(start), "-i", str(media_dir / source),
                        "-t", str(length), "-c:v", "mpeg4", "-q:v", "4", "-c:a", "aac", str(cut)], check=True)
        assert media.index(cut).info.seconds == seconds, name
        paths.append(cut)
    return paths


# ---- windows and spans (pure functions) ------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [1, 3, 9, 10, 11, 19, 20, 25, 30, 55, 596])
def test_windows_cover_every_second_once(seconds):
    starts = window_starts(seconds)
    length = min(10, seconds)
    assert starts[0] == 0 and starts[-1] + length == seconds  # the last window is aligned to the end
    assert all(b - a == 10 for a, b in zip(starts[:-2], starts[1:-1]))  # consecutive windows before the last
    owners = window_owner(seconds, starts)
    assert len(owners) == seconds
    for s, w in enumerate(owners):
        assert starts[w] <= s < starts[w] + length
        # no covering window leaves the second closer to an edge than its owner does
        margin = min(s - starts[w], starts[w] + length - 1 - s)
        for other in starts:
            if other <= s < other + length:
                assert min(s - other, other + length - 1 - s) <= margin


def test_overlapping_seconds_take_the_most_central_window():
    # 25 s: windows at 0, 10 and 15; seconds 15..19 lie in [10, 20) and [15, 25).
    starts = window_starts(25)
    assert starts == [0, 10, 15]
    owners = window_owner(25, starts)
    assert owners[10:15] == [1] * 5
    assert owners[15:20] == [1, 1, 1, 2, 2]  # 17: margins 2 vs 2 -> the earlier window; 18: 1 vs 3 -> later
    assert owners[20:] == [2] * 5


def test_merge_spans_and_parse_span():
    labels = ["background", "Dog", "Dog", "background", "Dog"]
    seconds = [SecondLabel(i, i + 1, lab, 0.5, 0.5, []) for i, lab in enumerate(labels)]
    assert merge_spans(seconds) == [
        {"label": "background", "start": 0, "end": 1}, {"label": "Dog", "start": 1, "end": 3},
        {"label": "background", "start": 3, "end": 4}, {"label": "Dog", "start": 4, "end": 5},
    ]
    assert parse_span("3-6") == (3, 6)
    assert parse_span("0-1") == (0, 1)
    for bad in ("6-3", "3-3", "3", "a-b", "-1-2"):  # 3-3: a query of no second
        with pytest.raises(UsageError):
            parse_span(bad)


# ---- the localizer on features ---------------------------------------------------------------------------------------

SMALL = {"visual_dim": 512, "audio_dim": 128, "att_hidden": 32, "lstm_hidden": 16}


def _checkpoint(tmp_path: Path, name: str, task: str, overrides: dict, direction: str | None = None,
                spec: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model(name, task, overrides)
    ckpt = make_checkpoint(model, name=name, task=task, direction=direction, config={"model": overrides, "train": {}},
                           class_names=["Bell", "Dog", "Car", "background"], feature_spec=spec or {}, metrics={},
                           seed=0)
    path = tmp_path / f"{name}-{task}.pt"
    torch.save(ckpt, path)
    return path


def test_labels_are_the_models_predictions_of_the_owning_window(tmp_path):
    path = _checkpoint(tmp_path, "avel", "supervised", SMALL)
    localizer = CheckpointLabeller(path, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    visual, audio = torch.randn(25, 7, 7, 512, generator=g).numpy(), torch.randn(25, 128, generator=g).numpy()
    records = localizer.label(visual, audio)
    assert [r.start for r in records] == list(range(25)) and all(r.end == r.start + 1 for r in records)
    starts = window_starts(25)
    owners = window_owner(25, starts)
    model = localizer.model
    with torch.no_grad():
        for w, start in enumerate(starts):
            v = torch.from_numpy(visual[None, start : start + 10])
            a = torch.from_numpy(audio[None, start : start + 10])
            out = model(v, a, torch.ones(1, 10, dtype=torch.bool))
            # Classes the checkpoint does not name (3..27) can neither be predicted nor take probability.
            out["segment_logits"][..., 3:BACKGROUND] = float("-inf")
            pred = model.predict(out, "supervised")[0]
            probs = out["segment_logits"][0][:, [0, 1, 2, BACKGROUND]].softmax(-1)
            for s in (s for s in range(25) if owners[s] == w):
                expected = int(pred[s - start])
                assert records[s].label == localizer.name(expected)
                # AVEL labels by argmax: the event probability is the best event class against background.
                best, background = float(probs[s - start, :3].max()), float(probs[s - start, 3])
                event = best / (best + background)
                assert records[s].event_probability == pytest.approx(event, abs=1e-4)
                assert (records[s].label == "background") == (records[s].event_probability < 0.5)
                column = [0, 1, 2, BACKGROUND].index(expected)
                assert records[s].probability == pytest.approx(float(probs[s - start, column]), abs=1e-4)
                assert records[s].top3[0]["probability"] == pytest.approx(float(probs[s - start].max()), abs=1e-4)
                assert {t["label"] for t in records[s].top3} <= {"Bell", "Dog", "Car", "background"}


def test_short_video_is_one_window_of_its_length(tmp_path):
    localizer = CheckpointLabeller(_checkpoint(tmp_path, "avel", "supervised", SMALL), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    visual, audio = torch.randn(3, 7, 7, 512, generator=g).numpy(), torch.randn(3, 128, generator=g).numpy()
    records = localizer.label(visual, audio)
    with torch.no_grad():
        out = localizer.model(torch.from_numpy(visual[None]), torch.from_numpy(audio[None]),
                              torch.ones(1, 3, dtype=torch.bool))
    out["segment_logits"][..., 3:BACKGROUND] = float("-inf")
    assert [r.label for r in records] == [localizer.name(int(i)) for i in localizer.model.predict(out, "supervised")[0]]


@pytest.mark.parametrize("direction", ["a2v", "v2a"])
def test_cml_match_is_the_best_window_of_the_query_length(tmp_path, direction):
    cfg = {"visual_dim": 512, "audio_dim": 128, "att_hidden": 32, "cml_hidden": 16, "cml_dim": 8}
    localizer = CheckpointLabeller(_checkpoint(tmp_path, "dam", "cml", cfg, direction=direction), torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    visual, audio = torch.randn(14, 7, 7, 512, generator=g).numpy(), torch.randn(14, 128, generator=g).numpy()
    query = (audio if direction == "a2v" else visual)[2:5] + 0.1
    records = localizer.match(visual, audio, query)
    assert len(records) == 14
    matched = [r.start for r in records if r.label == MATCH]
    assert len(matched) == 3 and matched == list(range(matched[0], matched[0] + 3))
    assert all(r.label in (MATCH, NO_MATCH) for r in records)
    # The same decoding done by hand: scores of each second from its owning window, then the best 3-s window.
    starts, scores = window_starts(14), []
    with torch.no_grad():
        for s, w in enumerate(window_owner(14, starts)):
            v = torch.from_numpy(visual[None, starts[w] : starts[w] + 10])
            a = torch.from_numpy(audio[None, starts[w] : starts[w] + 10])
            q = torch.zeros(1, 10, *query.shape[1:])
            q[0, :3] = torch.from_numpy(query)
            v, a = (v, q) if direction == "a2v" else (q, a)
            qmask = torch.zeros(1, 10, dtype=torch.bool)
            qmask[0, :3] = True
            out = localizer.model.forward_cml(v, a, torch.ones(1, 10, dtype=torch.bool), qmask, direction)
            scores.append(float(out["match_logits"][0, s - starts[w]]))
    assert matched[0] == max_contiguous_window(np.array(scores), 3)
    with pytest.raises(UsageError):
        localizer.match(visual[:2], audio[:2], query)  # a query longer than the video


# ---- end to end on real videos ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_cache):
    """A tiny AVEL checkpoint trained on features extracted from the shipped media (hand-made annotations), and a copy
    of that cache for localize to complete (the three short videos are already in it)."""
    cache, extracted = real_cache
    assert extracted.returncode == 0, extracted.stderr
    root = tmp_path_factory.mktemp("localize")
    annotations = write_dataset(root / "ave", {
        "train": [("Car", "chaplin", 2, 7), ("Dog", "bbb_5s_6ch", 1, 4), ("Bell", "fire2", 0, 2)],
        "val": [("Car", "big_buck_bunny_432_433", 0, 1)],
        "test": [("Bell", "sample_1s", 0, 1)],
    })
    result = run_cli("train", "--model", "avel", "--task", "supervised", "--features", cache, "--annotations",
                     annotations, "--out", root / "run", "--epochs", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    work_cache = root / "localize.h5"
    shutil.copy(cache, work_cache)
    return root / "run" / "checkpoint.pt", work_cache, root


def _table_rows(stdout: str) -> list[list[str]]:
    """Data rows of the rich tables printed by `localize` (COLUMNS=200 in run_cli keeps each row on one line)."""
    out = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.strip().startswith("│") and len(cells) == 6 and cells[0].isdigit():
            out.append(cells)
    return out


def test_localize_real_videos_of_every_length(trained, length_videos, weights_args, tmp_path):
    checkpoint, cache, _ = trained
    videos = length_videos
    common = ["--checkpoint", checkpoint, "--cache", cache, *weights_args]
    # Extracts 43 s of new video with VGG-19 on the CPU (~2 min on 2 idle cores).
    first = run_cli("localize", *videos, *common, "--format", "json", "--out", f"{tmp_path / 'json'}/", "--plot",
                    f"{tmp_path / 'plots'}/", timeout=2400)
    assert first.returncode == 0, first.stderr
    # Everything is in the cache now: the other formats do not decode again.
    outputs = {}
    for fmt in ("csv", "jsonl"):
        again = run_cli("localize", *videos, *common, "--format", fmt, "--out", tmp_path / f"all.{fmt}")
        assert again.returncode == 0, again.stderr
        assert f"{len(videos)} videos already in the cache: skipped" in again.stderr
        outputs[fmt] = (tmp_path / f"all.{fmt}").read_text()
    table = run_cli("localize", *videos, *common)
    assert table.returncode == 0, table.stderr

    csv_rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    jsonl_rows = [json.loads(line) for line in outputs["jsonl"].splitlines()]
    table_rows = _table_rows(table.stdout)
    assert len(csv_rows) == len(jsonl_rows) == len(table_rows) == sum(LENGTHS.values())
    offset = 0
    for name, seconds in LENGTHS.items():
        vid = Path(name).stem
        record = json.loads((tmp_path / "json" / f"{vid}.json").read_text())
        assert len(record) == 1 and record[0]["error"] is None and record[0]["id"] == vid
        per_second = record[0]["seconds"]
        # one label per real second, in order, for every length class
        assert [(s["start"], s["end"]) for s in per_second] == [(t, t + 1) for t in range(seconds)], name
        for k, s in enumerate(per_second):
            c, j, t = csv_rows[offset + k], jsonl_rows[offset + k], table_rows[offset + k]
            assert Path(c["video"]).name == Path(j["video"]).name == name
            assert c["label"] == j["label"] == t[2] == s["label"]
            assert int(c["start"]) == j["start"] == int(t[0]) == s["start"]
            assert float(c["event_probability"]) == j["event_probability"] == s["event_probability"]
            assert float(c["probability"]) == j["probability"] == s["probability"]
            assert format_probability(s["probability"]) == t[3] and format_probability(s["event_probability"]) == t[4]
            assert c["top1"] == j["top1"] == s["top3"][0]["label"]
            assert s["label"] in ("Bell", "Dog", "Car", "background")
            assert 0.0 <= s["event_probability"] <= 1.0 and 0.0 <= s["probability"] <= 1.0
            assert (s["label"] == "background") == (float(t[4]) < 0.5)  # what the table shows agrees with the label
        offset += seconds
        # spans: consecutive seconds with one label, covering the video exactly
        spans = record[0]["spans"]
        assert spans[0]["start"] == 0 and spans[-1]["end"] == seconds
        assert all(a["end"] == b["start"] and a["label"] != b["label"] for a, b in zip(spans, spans[1:]))
        for span in spans:
            assert {s["label"] for s in per_second[span["start"] : span["end"]]} == {span["label"]}
        # the picture: one cell per second, rows of at most PER_ROW seconds (at least MIN_WIDTH for title and legend)
        with Image.open(tmp_path / "plots" / f"{vid}.png") as image:
            assert image.width == max(min(seconds, PER_ROW) * CELL, MIN_WIDTH), name
            assert image.height > CELL // 2


def test_one_bad_video_fails_alone(trained, media_dir, weights_args, tmp_path):
    checkpoint, cache, _ = trained
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n")
    result = run_cli("localize", media_dir / "fire2.mp4", fake, "--checkpoint", checkpoint, "--cache", cache,
                     *weights_args, "--format", "json", "--out", tmp_path / "out.json")
    assert result.returncode == 1
    failures = [line for line in result.stderr.splitlines() if "notes.mp4" in line]
    assert len(failures) == 1 and "Traceback" not in result.stderr
    records = json.loads((tmp_path / "out.json").read_text())  # every input has a record; the failed one its error
    assert [r["id"] for r in records] == ["fire2", "notes"] and len(records[0]["seconds"]) == 2
    assert records[0]["error"] is None and "notes.mp4" in records[1]["error"] and records[1]["seconds"] == []


def test_usage_errors(trained, media_dir, tmp_path):
    checkpoint, _, _ = trained
    video = media_dir / "fire2.mp4"
    cases = [
        (["--checkpoint", checkpoint, "--format", "xml", "--out", tmp_path / "x"], "--format xml"),
        (["--checkpoint", tmp_path / "missing.pt"], "missing.pt"),
        (["--checkpoint", checkpoint, "--query-audio", video, "--query-span", "0-1"], "needs a CML one"),
    ]
    for args, message in cases:
        result = run_cli("localize", video, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_cml_query_through_the_cli(trained, media_dir, weights_args, tmp_path):
    _, cache, _ = trained
    from avepipe.cache import FeatureCache

    with FeatureCache(cache, "r") as reader:
        spec = reader.spec
    cfg = {"visual_dim": 512, "audio_dim": 128, "att_hidden": 32, "cml_hidden": 16, "cml_dim": 8}
    for direction, option in (("a2v", "--query-audio"), ("v2a", "--query-video")):
        checkpoint = _checkpoint(tmp_path, "dam", "cml", cfg, direction=direction, spec=spec)
        result = run_cli("localize", media_dir / "chaplin.mp4", "--checkpoint", checkpoint, "--cache", cache,
                         *weights_args, option, media_dir / "fire2.mp4", "--query-span", "0-2", "--format", "json",
                         "--out", tmp_path / f"{direction}.json")
        assert result.returncode == 0, result.stderr
        record = json.loads((tmp_path / f"{direction}.json").read_text())[0]
        assert record["query"] == {"file": str(media_dir / "fire2.mp4"), "start": 0, "end": 2, "direction": direction}
        labels = [s["label"] for s in record["seconds"]]
        assert len(labels) == 9 and labels.count(MATCH) == 2
        assert [span["label"] for span in record["spans"]].count(MATCH) == 1
    wrong = run_cli("localize", media_dir / "chaplin.mp4", "--checkpoint", checkpoint, "--cache", cache, *weights_args,
                    "--query-audio", media_dir / "fire2.mp4", "--query-span", "0-2")
    assert wrong.returncode == 2 and "--query-video" in wrong.stderr


def test_python_api(trained, media_dir, weights_args):
    checkpoint, cache, _ = trained
    options = dict(zip([a.lstrip("-").replace("-", "_") for a in weights_args[::2]], weights_args[1::2]))
    results = avepipe.localize(media_dir / "fire2.mp4", checkpoint, cache=str(cache), **options)
    assert len(results) == 1 and results[0].error is None
    assert [s.start for s in results[0].seconds] == [0, 1]
    assert results[0].spans == merge_spans(results[0].seconds)


# ---- probabilities that agree with the label, for every model -------------------------------------------------------


def _every_model_and_task():
    from avepipe.models import get_spec, model_names

    cases = [(name, task, "paper") for name in model_names() for task in get_spec(name).tasks if task != "cml"]
    # the released weak heads: DMIN decides with 29 categories, CMBS gives every second the video class
    return cases + [("dmin", "weak", "released"), ("cmbs", "weak", "released")]


@pytest.mark.parametrize("name,task,preset", _every_model_and_task())
@pytest.mark.parametrize("named", [3, 28])
def test_the_probabilities_shown_agree_with_the_label(tmp_path, name, task, preset, named):
    """Untrained models on random features (the case of the report: "event p 0.96" beside "background"): for every
    model, a second is background exactly when its event probability is below 0.5 (also as the table prints it), a
    background second's label is its most probable class, and an event second's label is its most probable event
    class with a probability at most the event probability."""
    from rich.console import Console

    from avepipe.localization import VideoLabels
    from avepipe.models.registry import preset_overrides
    from avepipe.render import localize_table

    torch.manual_seed(0)
    overrides = preset_overrides(name, preset, task).get("model", {})
    model = build_model(name, task, overrides)
    names = [f"class {i}, a name with a comma" for i in range(named)] + ["background"]
    ckpt = make_checkpoint(model, name=name, task=task, direction=None, config={"model": overrides, "train": {}},
                           class_names=names, feature_spec={}, metrics={}, seed=0)
    torch.save(ckpt, tmp_path / "c.pt")
    labeller = CheckpointLabeller(tmp_path / "c.pt", torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    visual, audio = torch.randn(13, 7, 7, 512, generator=g).numpy(), torch.randn(13, 128, generator=g).numpy()
    records = labeller.label(visual, audio)
    assert len(records) == 13
    for r in records:
        background = r.label == "background"
        assert background == (r.event_probability < 0.5), (r.label, r.event_probability)
        assert 0.0 <= r.probability <= 1.0 and 0.0 <= r.event_probability <= 1.0
        shown = {t["label"]: t["probability"] for t in r.top3}
        if r.label in shown:
            assert shown[r.label] == r.probability  # one distribution for the label and the top 3
        if background:
            assert r.top3[0]["label"] == "background"
        else:
            assert r.probability <= r.event_probability + 1e-4  # P(this class) <= P(some event)
            others = [p for label, p in shown.items() if label not in (r.label, "background")]
            assert all(p <= r.probability for p in others)  # the label is the most probable event class
    console = Console(record=True, width=400)
    console.print(localize_table(VideoLabels("v.mp4", "v", 13.0, records)))
    rows = [[c.strip() for c in line.strip().strip("│").split("│")] for line in console.export_text().splitlines()
            if line.strip().startswith("│")]
    assert len(rows) == 13
    for r, row in zip(records, rows):
        assert row[2] == r.label and (float(row[4]) < 0.5) == (r.label == "background")
        assert len(row[5].split("; ")) == len(r.top3)  # top 3 stays readable with commas in the class names


# ---- the library API, the weights it needs, and what a refused start leaves ----------------------------------------


class _Counted:
    """Wraps a function or class; counts the calls."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.target(*args, **kwargs)


def test_localizer_loads_the_checkpoint_and_backbones_once(tmp_path, monkeypatch):
    import avepipe.labeller as labeller
    import avepipe.localization as localization
    from tests.helpers import make_clip

    # Each name is patched where it is looked up: the checkpoint by the labeller, the backbones by the Localizer.
    loads, backbones = _Counted(labeller.load_checkpoint), _Counted(localization.Backbones)
    monkeypatch.setattr(labeller, "load_checkpoint", loads)
    monkeypatch.setattr(localization, "Backbones", backbones)
    checkpoint = _checkpoint(tmp_path, "avel", "supervised", SMALL)
    one = make_clip(tmp_path / "one.mp4", 1.0, size="64x48")
    two = make_clip(tmp_path / "two.mp4", 1.0, size="64x48", freq=700, pattern="smptebars")
    options = dict(vgg19_weights="random", vggish_weights="random", workers=0)
    localizer = avepipe.Localizer(checkpoint, device="cpu", cache=tmp_path / "F.h5", **options)
    assert (loads.calls, backbones.calls) == (1, 0)  # backbones only once a video needs them
    first = localizer.localize(one)
    assert (loads.calls, backbones.calls) == (1, 1)
    both = localizer.localize([one, two])  # "two" is extracted with the backbones loaded for "one"
    assert (loads.calls, backbones.calls) == (1, 1)
    assert [r.error for r in both] == [None, None] and [r.id for r in both] == ["one", "two"]
    assert first[0].to_dict() == both[0].to_dict()
    assert both[0].model == "avel supervised" and both[0].checkpoint == str(checkpoint)
    # The one-shot helper gives the same records; with everything cached it loads no backbones at all.
    once = avepipe.localize([one, two], checkpoint, cache=tmp_path / "F.h5", device="cpu", **options)
    assert [r.to_dict() for r in once] == [r.to_dict() for r in both]
    assert (loads.calls, backbones.calls) == (2, 1)
    with pytest.raises(UsageError, match="unknown option"):
        avepipe.localize(one, checkpoint, cache=tmp_path / "F.h5", vgg_weights="random")


def _tree(root: Path) -> dict[str, tuple[int, float, bytes]]:
    """Every file under ``root``: (size, mtime, bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cached_videos_need_no_weights_and_leave_the_cache_untouched(trained, media_dir, tmp_path, monkeypatch):
    import avepipe.localization as localization

    checkpoint, cache, _ = trained
    folder = tmp_path / "cache"
    folder.mkdir()
    shutil.copy(cache, folder / "F.h5")
    before = _tree(folder)
    backbones = _Counted(localization.Backbones)
    monkeypatch.setattr(localization, "Backbones", backbones)
    missing = dict(vgg19_weights=str(tmp_path / "no-vgg19.h5"), vggish_weights=str(tmp_path / "no-vggish.pth"))
    results = avepipe.Localizer(checkpoint, device="cpu", cache=folder / "F.h5", **missing).localize(
        [media_dir / "sample_1s.mp4", media_dir / "fire2.mp4"])
    assert [r.error for r in results] == [None, None] and [len(r.seconds) for r in results] == [1, 2]
    assert backbones.calls == 0
    assert _tree(folder) == before  # no lock file, no staging folder, no rewrite: read only


def test_missing_weights_are_named_together_before_any_work(tmp_path, media_dir, monkeypatch):
    import avepipe.backbones.extractor as extractor
    from avepipe.errors import WeightsError

    def never(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the weights were checked")

    monkeypatch.setattr(extractor, "load_vgg19", never)
    monkeypatch.setattr(extractor.vggish_mod, "load_vggish", never)
    checkpoint = _checkpoint(tmp_path, "avel", "supervised", SMALL)
    video = tmp_path / "in" / "clip.mp4"
    video.parent.mkdir()
    shutil.copy(media_dir / "sample_1s.mp4", video)
    vgg19, vggish = tmp_path / "w" / "vgg19.h5", tmp_path / "w" / "vggish.pth"
    with pytest.raises(WeightsError) as raised:
        avepipe.localize(video, checkpoint, cache=tmp_path / "new" / "F.h5", device="cpu", vgg19_weights=str(vgg19),
                         vggish_weights=str(vggish))
    message = str(raised.value)
    assert "\n" not in message and str(vgg19) in message and str(vggish) in message
    assert "VGG-19 weights not found" in message and "VGGish weights not found" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avel-supervised.pt", "in"]  # no cache, no folder for it


def test_refused_starts_leave_no_files(trained, media_dir, tmp_path):
    """Through the CLI: missing weights, a bad checkpoint, a bad option, a picture or page file for several videos.
    A new cache is not created (nor its lock or staging folder); an existing one is left as it was."""
    checkpoint, cache, _ = trained
    video = tmp_path / "clip.mp4"
    shutil.copy(media_dir / "sample_1s.mp4", video)
    other = tmp_path / "other.mp4"
    shutil.copy(media_dir / "fire2.mp4", other)
    existing = tmp_path / "kept"
    existing.mkdir()
    shutil.copy(cache, existing / "F.h5")
    kept = _tree(existing)
    missing = ["--vgg19-weights", tmp_path / "no-vgg19.h5", "--vggish-weights", tmp_path / "no-vggish.pth"]
    cases = [
        ([video, "--checkpoint", checkpoint, "--cache", tmp_path / "new.h5", *missing], "no-vgg19.h5"),
        ([video, "--checkpoint", checkpoint, "--cache", existing / "F.h5", *missing], "no-vggish.pth"),
        ([video, "--checkpoint", tmp_path / "missing.pt", "--cache", tmp_path / "new.h5"], "missing.pt"),
        ([video, "--checkpoint", checkpoint, "--cache", tmp_path / "new.h5", "--precision", "fp8"], "--precision"),
        ([video, other, "--checkpoint", checkpoint, "--cache", tmp_path / "new.h5", "--plot", tmp_path / "both.png"],
         "--plot"),
        ([video, other, "--checkpoint", checkpoint, "--cache", tmp_path / "new.h5", "--html", tmp_path / "r.html"],
         "--html"),
    ]
    for args, words in cases:
        result = run_cli("localize", *args, "--device", "cpu")
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (args, result.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "kept", "other.mp4"], args
        assert _tree(existing) == kept, args
    assert "DIR/" in result.stderr or "/ writes" in result.stderr  # the way out is named


def test_each_failure_and_warning_is_printed_once(trained, media_dir, weights_args, tmp_path):
    from avepipe.cache import FeatureCache

    _, cache, _ = trained
    with FeatureCache(cache, "r") as reader:
        spec = dict(reader.spec, vgg19_sha256="0" * 64)  # a checkpoint trained on other features: a warning
    checkpoint = _checkpoint(tmp_path, "avel", "supervised", SMALL, spec=spec)
    work = tmp_path / "F.h5"
    shutil.copy(cache, work)
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n")
    args = ["localize", media_dir / "fire2.mp4", fake, "--checkpoint", checkpoint, "--cache", work, *weights_args,
            "--html", f"{tmp_path / 'pages'}/", "--plot", f"{tmp_path / 'plots'}/"]
    for run in ("first", "again"):  # again: the failure comes from the cache ("failed earlier")
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        # a page and a picture for the labelled video, none for the failed one
        assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["fire2.html"]
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["fire2.png"]
        lines = result.stderr.splitlines()
        failures = [line for line in lines if "notes.mp4" in line and "not a media file" in line]
        differ = [line for line in lines if "trained on features that differ" in line]
        assert len(failures) == 1 and len(differ) == 1, (run, result.stderr)
        if run == "first":  # the backbones were loaded for notes.mp4: its VGGish file is not the official one
            assert len([line for line in lines if "VGGish weights" in line and "not the official" in line]) == 1
        warnings = [line for line in lines if line.startswith("WARNING")]
        assert len(warnings) == len(set(warnings)), result.stderr


def test_timeline_picture_has_title_legend_and_readable_size():
    from avepipe.localization import VideoLabels
    from avepipe.timeline import label_colour, legend_labels, render_timeline, timeline_title

    names = ["background", "Male speech, man speaking", "Male speech, man speaking", "Dog", "background"]
    seconds = [SecondLabel(i, i + 1, name, 0.3 if name == "background" else 0.8, 0.6, [])
               for i, name in enumerate(names)]
    result = VideoLabels("/videos/clip.mp4", "clip", 5.0, seconds, merge_spans(seconds), model="avel supervised",
                         checkpoint="runs/avel/checkpoint.pt")
    assert legend_labels(result) == ["Male speech, man speaking", "Dog", "background"]
    assert timeline_title(result) == "clip.mp4 · 5 s · avel supervised (avel/checkpoint.pt)"  # the run's folder
    thumbs = np.full((5, 54, CELL, 3), 255, np.uint8)  # white thumbnails: colours below come from the drawing
    image = np.asarray(render_timeline(result, thumbs))
    assert image.shape[1] == MIN_WIDTH  # 5 cells would be 480 px: too narrow for the title and the legend
    first_row = image.shape[0] - (54 + 22 + 18 + 18 + 10)
    legend, rows = image[:first_row], image[first_row:]
    for name in legend_labels(result):  # every label has its swatch in the legend and its colour in the band
        colour = np.array(label_colour(name, legend_labels(result)))
        assert (np.abs(legend.astype(int) - colour).max(-1) == 0).sum() >= 100, name
        assert (np.abs(rows.astype(int) - colour).max(-1) == 0).sum() >= CELL * 10, name
    dark = (image[:40].max(-1) < 80).sum()  # the title's text: 16 px glyphs, not the 11 px bitmap font
    assert dark > 300
