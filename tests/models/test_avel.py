"""AVEL (Tian et al. ECCV18): registry entry, shapes, masks, gradients, shared layers, synthetic learning."""

from __future__ import annotations

import pytest
import torch

from avepipe.data.synthetic import make_synthetic_ave
from avepipe.metrics import segment_accuracy as _segment_accuracy
from avepipe.models.avel import AVEL
from avepipe.models.layers import DMRN, MaskedLSTM, lengths_from_mask, masked_mean, mil_pool
from avepipe.models.registry import build_model, get_spec, parameter_count
from tests.models.common import SMALL_CONFIGS
from tests.models.common import forward as _forward
from tests.models.common import small_data as _small_data
from tests.models.common import split as _split
from tests.models.common import train as _train

SMALL = SMALL_CONFIGS["avel"]
VARIANTS = [("supervised", "concat"), ("supervised", "dmrn"), ("weak", "concat"), ("weak", "dmrn")]


# ---- registry and shapes ---------------------------------------------------------------------------------------------


def test_registered_with_paper_defaults():
    spec = get_spec("avel")
    assert spec.cls is AVEL and spec.tasks == ("supervised", "weak")
    model_cfg, train_cfg = spec.default_config["model"], spec.default_config["train"]
    assert (model_cfg["visual_dim"], model_cfg["audio_dim"], model_cfg["lstm_hidden"]) == (512, 128, 128)
    assert (model_cfg["fusion"], model_cfg["mil_pooling"]) == ("concat", "max")
    assert (train_cfg["optimizer"], train_cfg["lr"], train_cfg["batch_size"]) == ("adam", 1e-3, 64)
    with pytest.raises(ValueError):
        build_model("avel", "cml")
    with pytest.raises(ValueError):
        build_model("avel", "supervised", {"fusion": "sum"})


@pytest.mark.parametrize("seconds", [10, 3])
@pytest.mark.parametrize("task,fusion", VARIANTS)
def test_shapes_real_dims(seconds, task, fusion):
    torch.manual_seed(0)
    model = build_model("avel", task, {"fusion": fusion}).eval()
    data = make_synthetic_ave(2, seconds=seconds)
    with torch.no_grad():
        out = _forward(model, data)
    assert out["segment_logits"].shape == (2, seconds, 29)
    assert out["attention"].shape == (2, seconds, 49)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, seconds))
    assert ("video_logits" in out) == (task == "weak")
    if task == "weak":
        assert out["video_logits"].shape == (2, 29)
    pred = model.predict(out, task)
    assert pred.shape == (2, seconds) and pred.dtype == torch.long
    assert torch.equal(pred, out["segment_logits"].argmax(-1))


def test_attention_is_guided_by_audio():
    torch.manual_seed(0)
    model = build_model("avel", "supervised", SMALL).eval()
    data = _small_data(2)
    with torch.no_grad():
        ref = _forward(model, data)["attention"]
        other = model(data["visual"], data["audio"].flip(0), data["mask"])["attention"]
    assert not torch.allclose(ref, other)


# Masks (padding, prefix-only), CML query leakage and gradient flow: tests/models/test_contract.py, for every model.


# ---- shared layers (avepipe.models.layers) ---------------------------------------------------------------------------


def test_masked_pooling_uses_real_seconds_only():
    scores = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [100.0, 100.0]]])  # [1, 3, 2]; the last second is padding
    mask = torch.tensor([[True, True, False]])
    assert mil_pool(scores, mask, "max").tolist() == [[3.0, 5.0]]
    assert mil_pool(scores, mask, "mean").tolist() == [[2.0, 2.0]]
    assert masked_mean(scores.masked_fill(~mask[..., None], float("nan")), mask).tolist() == [[2.0, 2.0]]
    with pytest.raises(ValueError):
        mil_pool(scores, mask, "sum")


def test_lengths_from_mask_validates():
    assert lengths_from_mask(torch.tensor([[True, True, False], [True, True, True]])).tolist() == [2, 3]
    for bad in ([[True, False, True]], [[False, False, False]]):
        with pytest.raises(ValueError):
            lengths_from_mask(torch.tensor(bad))


def test_masked_lstm_final_state_is_last_real_second():
    torch.manual_seed(0)
    lstm = MaskedLSTM(4, 5, bidirectional=False)
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out, (h_n, _) = lstm(x, mask)
    assert out.shape == (2, 6, 5) and (out[1, 4:] == 0).all()
    torch.testing.assert_close(h_n[0, 1], out[1, 3])
    _, (h_alone, _) = lstm.lstm(x[1:, :4])
    torch.testing.assert_close(h_n[:, 1], h_alone[:, 0])


def test_dmrn_block_follows_the_residual_equations():
    torch.manual_seed(0)
    audio, visual = torch.randn(3, 8), torch.randn(3, 8)
    separate, shared = DMRN(8), DMRN(8, shared_update=True, combine="sum")
    assert 2 * parameter_count(shared) == parameter_count(separate)  # one g_theta (AVSDN) vs U_a and U_v (AVEL)
    merged = 0.5 * (separate.update_audio(audio) + separate.update_visual(visual))
    expected = 0.5 * (torch.tanh(audio + merged) + torch.tanh(visual + merged))
    torch.testing.assert_close(separate(audio, visual), expected)
    g = shared.update_audio
    merged = 0.5 * (g(audio) + g(visual))
    torch.testing.assert_close(shared(audio, visual), torch.tanh(audio + merged) + torch.tanh(visual + merged))
    with pytest.raises(ValueError):
        DMRN(8, combine="max")


# ---- learning --------------------------------------------------------------------------------------------------------
# Synthetic AVE-like task (avepipe.data.synthetic): an event second is one where audio and visual show the same class.
# Events last >= 2 s as in AVE. Small widths keep each test under a minute on 2 CPU cores.


def test_learns_synthetic_supervised():
    train, test = _split(_small_data(1800, seed=10, min_event=2), 1500)
    torch.manual_seed(0)
    model = build_model("avel", "supervised", SMALL)
    _train(model, train, task="supervised", epochs=10)
    with torch.no_grad():
        pred = model.predict(_forward(model, test), "supervised")
    accuracy = _segment_accuracy(pred, test["labels"], test["mask"])
    assert accuracy >= 0.95, accuracy


def test_learns_synthetic_weak_from_video_labels_only():
    train, test = _split(_small_data(1800, seed=11, min_event=2, background_videos=0.3), 1500)
    train["labels"] = torch.full_like(train["labels"], -100)  # the weak loss must not need per-second labels
    train["event"] = torch.full_like(train["event"], float("nan"))
    torch.manual_seed(0)
    model = build_model("avel", "weak", SMALL)
    _train(model, train, task="weak", epochs=10)
    with torch.no_grad():
        pred = model.predict(_forward(model, test), "weak")
    accuracy = _segment_accuracy(pred, test["labels"], test["mask"])
    # Trivial baselines on this test set: all-background 0.60; the true video category on every second 0.71.
    assert accuracy >= 0.85, accuracy


def test_parameter_count_real_dims():
    # Pinned so a change of architecture is a conscious one (docs/models.md quotes these numbers).
    assert parameter_count(build_model("avel", "supervised")) == 1_335_246
    assert parameter_count(build_model("avel", "weak")) == 1_335_246
    assert parameter_count(build_model("avel", "supervised", {"fusion": "dmrn"})) == 1_571_150
