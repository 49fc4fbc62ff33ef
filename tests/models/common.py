"""Helpers shared by the model tests: small synthetic data, a plain training loop, held-out accuracy.

The synthetic task (avepipe.data.synthetic): an event second is one where audio and visual show the same class; one
generator call is split into train / held-out so both share the class prototypes.
"""

from __future__ import annotations

import torch

from avepipe.data.synthetic import make_synthetic_ave
from avepipe.metrics import cml_exact_match, cml_predict

VISUAL_DIM, AUDIO_DIM = 64, 32  # small widths keep the learning tests within ~30 s on 2 CPU cores


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
