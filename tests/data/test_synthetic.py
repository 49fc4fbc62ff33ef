"""The synthetic AVE-like task: shapes, determinism, label structure, and the audio/visual agreement rule."""

from __future__ import annotations

import pytest
import torch

from avepipe.data.synthetic import make_synthetic_ave

BG = 28


def _small(n_videos: int, **kw) -> dict[str, torch.Tensor]:
    return make_synthetic_ave(n_videos, visual_dim=16, audio_dim=8, **kw)


def test_shapes_and_dtypes_default_dims():
    data = make_synthetic_ave(3)
    assert data["visual"].shape == (3, 10, 7, 7, 512) and data["visual"].dtype == torch.float32
    assert data["audio"].shape == (3, 10, 128) and data["audio"].dtype == torch.float32
    assert data["labels"].shape == (3, 10) and data["labels"].dtype == torch.long
    assert data["event"].shape == (3, 10) and data["event"].dtype == torch.float32
    assert data["video_label"].shape == (3,) and data["video_label"].dtype == torch.long
    assert data["mask"].dtype == torch.bool and data["mask"].all()


def test_custom_dims():
    data = make_synthetic_ave(2, seconds=4, num_classes=6, visual_dim=5, audio_dim=3, spatial=3)
    assert data["visual"].shape == (2, 4, 3, 3, 5) and data["audio"].shape == (2, 4, 3)
    assert data["labels"].max() <= 5 and data["labels"].min() >= 0


def test_deterministic_in_seed():
    a, b, c = _small(5, seed=3), _small(5, seed=3), _small(5, seed=4)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["audio"], c["audio"])


def test_one_contiguous_event_span_per_video():
    data = _small(300, min_event=2, max_event=6, seed=1)
    labels, event = data["labels"], data["event"]
    assert torch.equal(event.bool(), labels != BG)
    for row, category in zip(labels, data["video_label"]):
        seconds = (row != BG).nonzero().flatten()
        assert 2 <= len(seconds) <= 6
        assert torch.equal(seconds, torch.arange(seconds[0], seconds[0] + len(seconds)))  # contiguous
        assert (row[seconds] == category).all()
    lengths = event.sum(1)
    assert lengths.min() == 2 and lengths.max() == 6  # the whole range is used


def test_event_length_clipped_to_video():
    data = _small(50, seconds=3, seed=2)  # max_event=10 > seconds
    assert data["labels"].shape == (50, 3)
    assert (data["event"].sum(1) <= 3).all() and (data["event"].sum(1) >= 1).all()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_background_videos_fraction(fraction):
    data = _small(1000, background_videos=fraction, seed=5)
    empty = data["event"].sum(1) == 0
    assert torch.equal(empty, data["video_label"] == BG)
    assert (data["labels"][empty] == BG).all()
    assert abs(empty.float().mean().item() - fraction) < 0.05


def test_invalid_arguments():
    for kwargs in ({"min_event": 0}, {"min_event": 5, "max_event": 4}, {"num_classes": 2}, {"background_videos": 1.5}):
        with pytest.raises(ValueError):
            _small(2, **kwargs)


def _shown_classes(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Without noise, recover the class each modality shows per second by matching prototypes (read off the events)."""
    labels, audio = data["labels"], data["audio"]
    visual = data["visual"].flatten(2, 3)  # [N, T, cells, D]
    proto_a = torch.stack([audio[labels == c][0] for c in range(BG)])
    lit = visual.abs().sum(-1) > 0  # cells carrying a prototype
    proto_v = torch.stack([visual[(labels == c)][lit[labels == c]][0] for c in range(BG)])
    audio_class = torch.cdist(audio, proto_a[None].expand(len(audio), -1, -1)).argmin(-1)
    first_lit = visual.gather(2, lit.float().argmax(-1)[..., None, None].expand(-1, -1, 1, visual.shape[-1]))
    visual_class = torch.cdist(first_lit.squeeze(2), proto_v[None].expand(len(audio), -1, -1)).argmin(-1)
    return audio_class, visual_class


def test_agreement_rule_without_noise():
    data = _small(400, noise=0.0, background_videos=0.2, seed=7)
    labels = data["labels"]
    assert set(range(BG)) <= set(labels.unique().tolist())  # every class occurs, so all prototypes are recovered
    lit = data["visual"].flatten(2, 3).abs().sum(-1) > 0
    assert lit.sum(-1).min() >= 2 and lit.sum(-1).max() <= 4  # "a few" cells carry the visual prototype
    audio_class, visual_class = _shown_classes(data)
    event = labels != BG
    # Event seconds: both modalities show the event class; background seconds: they always disagree ...
    assert torch.equal(audio_class[event], labels[event]) and torch.equal(visual_class[event], labels[event])
    assert (audio_class[~event] != visual_class[~event]).all()
    # ... yet each modality alone sometimes shows the video's category outside the event, so one modality is not
    # enough to localize it.
    category = data["video_label"][:, None].expand_as(labels)
    outside = ~event & (category != BG)
    assert (audio_class[outside] == category[outside]).any()
    assert (visual_class[outside] == category[outside]).any()


def test_visual_prototype_cells_move():
    data = _small(50, noise=0.0, seed=8)
    lit = data["visual"].flatten(2, 3).abs().sum(-1) > 0  # [N, T, cells]
    # Where the prototype sits varies, so a model must search the map (spatial attention helps).
    assert lit.any(0).any(0).sum() > 40
