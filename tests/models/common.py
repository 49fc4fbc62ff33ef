"""Helpers shared by the model tests: small widths of every registered model, small synthetic data, a plain training
loop, held-out accuracy.

The synthetic task (avepipe.data.synthetic): an event second is one where audio and visual show the same class; one
generator call is split into train / held-out so both share the class prototypes.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from avepipe.data.synthetic import make_synthetic_ave
from avepipe.metrics import cml_exact_match, cml_predict
from avepipe.models.registry import build_model, get_spec, model_names

VISUAL_DIM, AUDIO_DIM = 64, 32  # small widths keep the learning tests within ~30 s on 2 CPU cores

# Small widths of every registered model (input widths VISUAL_DIM / AUDIO_DIM): the contract tests
# (tests/models/test_contract.py) run each model and task at these; a new model adds its entry here.
_DMIN_CML = {"visual_dim": 64, "audio_dim": 32, "model_dim": 32, "ff_dim": 64, "encoder_layers": 1}
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "avel": {"visual_dim": 64, "audio_dim": 32, "att_hidden": 64, "lstm_hidden": 32},
    "avsdn": {"visual_dim": 64, "audio_dim": 32, "att_hidden": 64},  # hidden stays at its default 128
    "dam": {"visual_dim": 64, "audio_dim": 32, "att_hidden": 128, "lstm_hidden": 64, "cml_hidden": 64, "cml_dim": 32},
    "m2n": {"visual_dim": 64, "audio_dim": 32, "att_hidden": 32, "att_dim": 16, "dim": 32, "heads": 4},
    "dmin": {**_DMIN_CML, "channel_bottleneck": 16, "agta_dim": 16, "mfb_factor": 2, "agta_lstm_layers": 1},
    "dcmr": _DMIN_CML,
    "diia": {"visual_dim": 64, "audio_dim": 32, "channel_hidden": 64, "channel_bottleneck": 32, "spatial_hidden": 32,
             "dim": 64, "heads": 4, "ff_dim": 128},
    "psp": {"visual_dim": 64, "audio_dim": 32, "embed_hidden": 32, "embed_dim": 32, "att_hidden": 64,
            "lstm_hidden": 32},
    "cmbs": {"visual_dim": 64, "audio_dim": 32, "d_model": 32, "att_hidden": 32, "encoder_ff": 64, "decoder_ff": 64},
}
# Architecture switches the contract tests cover one by one (models not listed: their small config only).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "avel": [{"fusion": "concat"}, {"fusion": "dmrn"}],
    "avsdn": [{"visual_pool": "mean"}, {"visual_pool": "attention"}],
    "diia": [{}, {"blocks": 2}],  # two blocks: the second block's input is the first one's output
}


def move_layernorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every LayerNorm a non-trivial affine, as training does.

    DCMR's query is the channel mean of a LayerNorm output, which is exactly 0 at the standard init (gamma = 1,
    beta = 0: sum_c x_hat_c = 0); until the affine moves, the query carries nothing (tests/models/test_dmin.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return model


# Done to a freshly built small model before a contract test (a model whose init hides a property under test).
PREPARE: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {"dcmr": move_layernorms}


def small_model(name: str, task: str, variant: dict[str, Any] | None = None, seed: int = 0) -> torch.nn.Module:
    """Model ``name`` for ``task`` at its small widths (plus ``variant``), seeded, prepared (PREPARE)."""
    torch.manual_seed(seed)
    model = build_model(name, task, {**SMALL_CONFIGS[name], **(variant or {})})
    return PREPARE.get(name, lambda m: m)(model)


def contract_cases(*tasks: str) -> list:
    """pytest params (model, task, variant) for every registered model, each of its tasks among ``tasks``, each of its
    variants; ids read ``avel-weak-fusion=dmrn``."""
    return [pytest.param(name, task, variant, id="-".join([name, task, *(f"{k}={v}" for k, v in variant.items())]))
            for name in model_names() for task in get_spec(name).tasks if task in tasks
            for variant in VARIANTS.get(name, [{}])]


def small_data(n_videos: int, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    return make_synthetic_ave(n_videos, visual_dim=VISUAL_DIM, audio_dim=AUDIO_DIM, seed=seed, **kw)


def split(data: dict[str, torch.Tensor], n_train: int) -> tuple[dict, dict]:
    return {k: v[:n_train] for k, v in data.items()}, {k: v[n_train:] for k, v in data.items()}


def make_batch(data: dict[str, torch.Tensor], idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of ``data``; for CML the query and the target are the event span (as in the AVE CML split)."""
    batch = {k: v[idx] for k, v in data.items()}
    batch["query_mask"] = batch["target_mask"] = batch["event"].bool()
    return batch


def forward(model, batch: dict[str, torch.Tensor], task: str = "supervised", direction: str | None = None) -> dict:
    if task == "cml":
        return model.forward_cml(batch["visual"], batch["audio"], batch["mask"], batch["query_mask"], direction)
    return model(batch["visual"], batch["audio"], batch["mask"])


def batch_loss(model, batch: dict[str, torch.Tensor], task: str, directions: tuple[str, ...] = ("a2v", "v2a")):
    """The task's loss; for CML one loss per direction, summed (both directions trained jointly)."""
    if task == "cml":
        return sum(model.loss(forward(model, batch, task, d), batch, task) for d in directions)
    return model.loss(forward(model, batch, task), batch, task)


def train(model, data: dict[str, torch.Tensor], *, task: str, epochs: int, batch_size: int = 32, lr: float = 1e-3,
          seed: int = 0, directions: tuple[str, ...] = ("a2v", "v2a"), optimizer=torch.optim.Adam) -> None:
    torch.manual_seed(seed)
    opt = optimizer(model.parameters(), lr=lr)
    n = data["labels"].shape[0]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n).split(batch_size):
            loss = batch_loss(model, make_batch(data, idx), task, directions)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def segment_accuracy(model, data: dict[str, torch.Tensor], task: str) -> float:
    with torch.no_grad():
        pred = model.predict(forward(model, data, task), task)
    return (pred == data["labels"])[data["mask"]].float().mean().item()


def exact_match(model, data: dict[str, torch.Tensor], direction: str, squash: bool = False) -> float:
    """CML exact match decoded as the pipeline does (max contiguous sum of match_logits over the query length);
    ``squash`` sums sigmoid(match_logits) instead."""
    query = data["event"].bool()
    with torch.no_grad():
        scores = model.forward_cml(data["visual"], data["audio"], data["mask"], query, direction)["match_logits"]
    if squash:
        scores = torch.sigmoid(scores)
    return cml_exact_match(cml_predict(scores, query.sum(1)), query.float().argmax(1))


def assert_gradient_reaches_every_parameter(model, loss: torch.Tensor) -> None:
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
