"""DAM: shapes, masks, CML leakage, gradient flow, and learning synthetic SEL / CML tasks."""

from __future__ import annotations

import pytest
import torch

from avepipe.data.synthetic import make_synthetic_ave
from avepipe.metrics import segment_accuracy
from avepipe.models.dam import BACKGROUND, DAM
from avepipe.models.registry import build_model, get_spec, parameter_count
from tests.models.common import SMALL_CONFIGS
from tests.models.common import exact_match as _exact_match
from tests.models.common import train as _train

# Small widths keep the learning tests within ~30 s on 2 CPU cores.
SMALL = SMALL_CONFIGS["dam"]


def _synthetic(n_videos, *, visual_dim=512, audio_dim=128, **kwargs):
    # Held-out data of the same task comes from splitting one call (the prototypes are drawn from the seed).
    return make_synthetic_ave(n_videos, visual_dim=visual_dim, audio_dim=audio_dim, **kwargs)


# ---- registry and shapes ---------------------------------------------------------------------------------------------


def test_registered_with_paper_defaults():
    spec = get_spec("dam")
    assert spec.cls is DAM and spec.tasks == ("supervised", "cml")
    cfg = spec.default_config["model"]
    assert (cfg["visual_dim"], cfg["audio_dim"], cfg["lambda_category"]) == (512, 128, 0.5)
    with pytest.raises(ValueError):
        build_model("dam", "weak")


@pytest.mark.parametrize("seconds", [10, 3])
def test_supervised_shapes_real_dims(seconds):
    torch.manual_seed(0)
    model = build_model("dam", "supervised").eval()
    data = _synthetic(2, seconds=seconds, max_event=seconds)
    out = model(data["visual"], data["audio"], data["mask"])
    assert out["segment_logits"].shape == (2, seconds, 29)
    assert out["category_logits"].shape == (2, 28)
    pred = model.predict(out, "supervised")
    assert pred.shape == (2, seconds) and pred.dtype == torch.long
    # The scores encode the paper's decision rule, so argmax and predict agree.
    assert torch.equal(out["segment_logits"].argmax(-1), pred)


@pytest.mark.parametrize("seconds", [10, 3])
@pytest.mark.parametrize("direction", ["a2v", "v2a"])
def test_cml_shapes_real_dims(seconds, direction):
    torch.manual_seed(0)
    model = build_model("dam", "cml").eval()
    data = _synthetic(2, seconds=seconds, max_event=seconds)
    out = model.forward_cml(data["visual"], data["audio"], data["mask"], data["event"].bool(), direction)
    assert out["match_logits"].shape == (2, seconds)
    assert torch.isfinite(out["match_logits"]).all()


def test_predict_rule():
    model = build_model("dam", "supervised", SMALL)
    log_rel = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    out = {"category_logits": torch.zeros(1, 28).index_fill(1, torch.tensor([7]), 3.0), "log_relevance": log_rel,
           "log_background": torch.log1p(-log_rel.exp())}
    assert model.predict(out, "supervised").tolist() == [[BACKGROUND, 7, 7]]


# Masks (padding, prefix-only), CML query leakage and gradient flow: tests/models/test_contract.py, for every model.


# ---- learning --------------------------------------------------------------------------------------------------------


# Synthetic AVE-like task (avepipe.data.synthetic): an event second is one where audio and visual show the video's
# class; background seconds show other (mismatched) classes. Held-out data is the tail of the same call (same
# prototypes).


def test_learns_synthetic_supervised():
    # Events >= 2 s as in AVE. DAM decides relevance through one modality's global feature, which must single out the
    # video's class among the background classes; that needs more videos than per-second fusion models (~93% at 400).
    data = _synthetic(1800, visual_dim=64, audio_dim=32, seed=10, min_event=2)
    train, test = ({k: v[s] for k, v in data.items()} for s in (slice(0, 1500), slice(1500, None)))
    model = build_model("dam", "supervised", SMALL)
    _train(model, train, epochs=8, lr=2e-3, batch_size=32, task="supervised")
    with torch.no_grad():
        pred = model.predict(model(test["visual"], test["audio"], test["mask"]), "supervised")
    accuracy = segment_accuracy(pred, test["labels"], test["mask"])
    assert accuracy >= 0.95, accuracy


def test_learns_synthetic_cml():
    data = _synthetic(1100, visual_dim=64, audio_dim=32, seed=20, min_event=2, max_event=9)
    train, test = ({k: v[s] for k, v in data.items()} for s in (slice(0, 800), slice(800, None)))
    model = build_model("dam", "cml", SMALL)
    _train(model, train, epochs=10, lr=1e-3, batch_size=32, task="cml")
    for direction in ("a2v", "v2a"):
        accuracy = _exact_match(model, test, direction)
        assert accuracy >= 0.90, (direction, accuracy)
        # The pipeline sums match_logits; the paper sums sigmoid scores. Both decodings must find the span.
        assert _exact_match(model, test, direction, squash=True) >= 0.90


def test_parameter_count_real_dims():
    # Pinned so a change of architecture is a conscious one (docs/models.md quotes these numbers).
    assert parameter_count(build_model("dam", "supervised")) == 2_892_877
    assert parameter_count(build_model("dam", "cml")) == 577_201
