"""The registry and the model contract (avepipe/models/registry.py), checked for every registered model."""

from __future__ import annotations

import pytest
import torch

import avepipe.models as models
from avepipe.errors import UsageError
from avepipe.models.registry import TASKS, build_model, get_spec, model_names, parameter_count

B, T = 2, 10


def _contract_cases() -> list[tuple[str, str]]:
    return [(name, task) for name in model_names() for task in get_spec(name).tasks]


def _inputs(spec, seconds: int = T):
    cfg = spec.default_config.get("model", {})
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(B, seconds, 7, 7, cfg.get("visual_dim", 512), generator=g)
    audio = torch.randn(B, seconds, cfg.get("audio_dim", 128), generator=g)
    return visual, audio, torch.ones(B, seconds, dtype=torch.bool)


def test_package_exports_and_registers():
    assert set(model_names()) == {"avel", "avsdn", "dam", "m2n", "dmin", "dcmr", "diia", "psp", "cmbs"}
    assert models.build_model is build_model and models.parameter_count is parameter_count
    assert models.get_spec is get_spec and models.model_names is model_names
    assert model_names() == sorted(model_names())


def test_unknown_model_and_task():
    with pytest.raises(UsageError, match="unknown model 'no-such-model'; known: avel"):
        get_spec("no-such-model")
    with pytest.raises(ValueError):
        build_model("avel", "cml")


def test_build_model_applies_overrides_on_defaults():
    model = build_model("avel", "supervised", {"visual_dim": 64, "audio_dim": 32})
    assert model.attention.embed_visual.in_features == 64
    assert model.attention.embed_audio.in_features == 32
    # untouched keys keep their defaults
    assert model.audio_lstm.lstm.hidden_size == get_spec("avel").default_config["model"]["lstm_hidden"]


def test_parameter_count_counts_every_parameter():
    model = build_model("avsdn", "supervised", {"visual_dim": 8, "audio_dim": 4, "hidden": 3})
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", model_names())
def test_specs_are_complete(name):
    spec = get_spec(name)
    assert spec.name == name and spec.paper
    assert spec.tasks and set(spec.tasks) <= set(TASKS)
    train = spec.default_config["train"]
    for key in ("optimizer", "lr", "batch_size", "epochs"):
        assert key in train, (name, key)
    assert train["lr"] > 0 and train["batch_size"] > 0 and train["epochs"] > 0


@pytest.mark.parametrize("name,task", _contract_cases())
def test_contract_forward_loss_predict(name, task):
    torch.manual_seed(0)
    spec = get_spec(name)
    model = build_model(name, task)
    visual, audio, mask = _inputs(spec)
    labels = torch.full((B, T), 28)
    labels[0, 2:6] = 4
    batch = {
        "visual": visual, "audio": audio, "mask": mask, "labels": labels, "event": (labels != 28).float(),
        "video_label": torch.tensor([4, 28]), "query_mask": labels != 28, "target_mask": labels != 28,
    }
    if task == "cml":
        query = batch["query_mask"].clone()
        query[1, :3] = True  # every video needs a query
        batch["query_mask"] = batch["target_mask"] = query
        out = model.forward_cml(visual, audio, mask, query, "a2v")
        assert out["match_logits"].shape == (B, T)
    else:
        out = model(visual, audio, mask)
        assert out["segment_logits"].shape == (B, T, 29)
        if task == "weak":
            assert out["video_logits"].shape == (B, 29)
        pred = model.predict(out, task)
        assert pred.shape == (B, T) and pred.dtype == torch.long
        assert ((pred >= 0) & (pred < 29)).all()
    loss = model.loss(out, batch, task)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_models_command_lists_every_model_task_and_count():
    from tests.helpers import run_cli

    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    rows = [[c.strip() for c in line.strip().strip("│").split("│")] for line in result.stdout.splitlines()
            if line.strip().startswith("│")]
    listed, name = [], None
    for row in rows:
        name = row[0] or name
        if row[1] in TASKS:
            listed.append((name, row[1], int(row[2].replace(",", ""))))
    expected = [(n, t, parameter_count(build_model(n, t))) for n in model_names() for t in get_spec(n).tasks]
    assert listed == expected
