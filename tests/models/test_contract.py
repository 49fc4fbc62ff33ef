"""The mask and gradient side of the model contract (avepipe/models/registry.py), checked on every registered model,
task and variant at its small widths (tests/models/common.py): padded seconds never change the real ones, masks must be
prefixes, a CML model reads the query modality only inside the query, and every parameter gets a gradient.

Checks specific to one model (its equations, shapes at real widths, learning) stay in that model's test file.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from avepipe.models.registry import get_spec, model_names
from tests.models.common import batch_loss, contract_cases, forward, make_batch, small_data, small_model

SEL = ("supervised", "weak")
DIRECTIONS = ("a2v", "v2a")
CML_MODELS = [name for name in model_names() if "cml" in get_spec(name).tasks]
# Running 3 real seconds alone vs inside a padded batch: M2N's 3 x 3 proposal map sums in another order.
ALONE_TOLERANCE = {"m2n": {"rtol": 1e-4, "atol": 1e-5}}


def _compared_outputs(out: dict[str, torch.Tensor], seconds: int) -> dict[str, bool]:
    """The score outputs (``*logits``, ``relevance``) -> whether they are per second ([B, T, ...]) or per video."""
    return {key: value.dim() >= 2 and value.shape[1] == seconds for key, value in out.items()
            if key.endswith("logits") or key == "relevance"}


def test_every_model_has_small_widths():
    from tests.models.common import SMALL_CONFIGS

    assert set(SMALL_CONFIGS) == set(model_names())


@pytest.mark.parametrize("name,task,variant", contract_cases(*SEL))
def test_padding_does_not_change_real_seconds(name, task, variant):
    model = small_model(name, task, variant).eval()
    data = small_data(3, seed=1, max_event=5, background_videos=0.3)
    mask = data["mask"].clone()
    mask[0, 6:] = False
    mask[2, 3:] = False
    batch = {**data, "mask": mask}
    out = forward(model, batch, task)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["visual"][~mask] = float("nan")
    changed["audio"][~mask] = float("inf")
    changed["labels"][~mask] = 3
    changed["event"][~mask] = 1.0
    out2 = forward(model, changed, task)
    compared = _compared_outputs(out, 10)
    assert "segment_logits" in compared and ("video_logits" in compared) == (task == "weak")
    for key, per_second in compared.items():
        real = mask if per_second else slice(None)
        torch.testing.assert_close(out2[key][real], out[key][real], msg=key)
    torch.testing.assert_close(model.loss(out2, changed, task), model.loss(out, batch, task))
    # ... and equal to running the real seconds alone.
    alone = model(data["visual"][2:, :3], data["audio"][2:, :3], data["mask"][2:, :3])
    for key, per_second in compared.items():
        torch.testing.assert_close(alone[key][0], out[key][2, :3] if per_second else out[key][2], msg=key,
                                   **ALONE_TOLERANCE.get(name, {}))


@pytest.mark.parametrize("name,task,variant", contract_cases(*SEL, "cml"))
def test_rejects_non_prefix_mask(name, task, variant):
    model = small_model(name, task, variant)
    data = small_data(1, seed=2, min_event=2, max_event=4)
    mask = data["mask"].clone()
    mask[0, 4] = False
    with pytest.raises(ValueError):
        if task == "cml":
            model.forward_cml(data["visual"], data["audio"], mask, data["event"].bool() & mask, "a2v")
        else:
            model(data["visual"], data["audio"], mask)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", CML_MODELS)
def test_cml_query_modality_used_only_inside_query(name, direction):
    model = small_model(name, "cml").eval()
    data = small_data(4, seed=1, min_event=2, max_event=6)
    query, mask = data["event"].bool(), data["mask"]
    ref = model.forward_cml(data["visual"], data["audio"], mask, query, direction)["match_logits"]
    visual, audio = data["visual"].clone(), data["audio"].clone()
    changed = audio if direction == "a2v" else visual
    changed[~query] = 10 * torch.randn_like(changed[~query])
    torch.testing.assert_close(model.forward_cml(visual, audio, mask, query, direction)["match_logits"], ref)
    # The query modality inside the query does matter (otherwise the check above would be vacuous).
    changed[query] += 5 * torch.randn_like(changed[query])
    assert not torch.allclose(model.forward_cml(visual, audio, mask, query, direction)["match_logits"], ref)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", CML_MODELS)
def test_cml_padding_does_not_change_real_seconds(name, direction):
    model = small_model(name, "cml").eval()
    data = small_data(2, seed=2, min_event=2, max_event=4)
    mask = data["mask"].clone()
    mask[:, 8:] = False
    query = data["event"].bool() & mask
    ref = model.forward_cml(data["visual"], data["audio"], mask, query, direction)["match_logits"]
    visual, audio = data["visual"].clone(), data["audio"].clone()
    visual[:, 8:] = float("nan")
    audio[:, 8:] = float("inf")
    out = model.forward_cml(visual, audio, mask, query, direction)["match_logits"]
    torch.testing.assert_close(out[mask], ref[mask])
    # Padded seconds can never win a decoding window: they score the model's PAD_SCORE (far below any real score).
    pad_score = getattr(inspect.getmodule(get_spec(name).cls), "PAD_SCORE", None)
    assert pad_score is not None and pad_score < -1e3, "a CML model names its PAD_SCORE"
    assert (out[~mask] == pad_score).all()


@pytest.mark.parametrize("name,task,variant", contract_cases(*SEL, "cml"))
def test_gradient_reaches_every_parameter(name, task, variant):
    model = small_model(name, task, variant)
    data = small_data(6, seed=3, min_event=2, max_event=8, background_videos=0.3 if task == "weak" else 0.0)
    batch = make_batch(data, slice(None))
    batch["mask"][1, 7:] = False
    batch["query_mask"] = batch["target_mask"] = batch["query_mask"] & batch["mask"]
    batch_loss(model, batch, task).backward()  # cml: both directions
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key
