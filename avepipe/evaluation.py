"""Scoring a model on one split: segment accuracy (supervised, weak) or CML exact match (:func:`evaluate_split`),
``avepipe evaluate`` on a saved checkpoint (:func:`evaluate`), and the numbers reported beside the val-selected one:
the ORACLE best test epoch (never used for selection) and the paper's published number.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from avepipe.checkpoint import load_checkpoint
from avepipe.data import ave
from avepipe.data.tasks import batches
from avepipe.devices import resolve_device
from avepipe.errors import UsageError
from avepipe.metrics import cml_exact_match, cml_predict, segment_accuracy
from avepipe.models.layers import cml_decode_scores
from avepipe.models.registry import get_spec
from avepipe.train_config import DIRECTIONS, JOINT, PathLike
from avepipe.train_data import DataPaths, TaskData, load_task_data


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, direction: str | None) -> dict:
    if task == "cml":
        return model.forward_cml(batch["visual"], batch["audio"], batch["mask"], batch["query_mask"], direction)
    return model(batch["visual"], batch["audio"], batch["mask"])


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, data: TaskData, split: str, task: str, direction: str | None,
                   batch_size: int = 256) -> float:
    """Segment accuracy (supervised, weak) or CML exact-match accuracy on one split (``--direction both``: the mean
    of A2V and V2A, see :func:`evaluate_directions`)."""
    if task == "cml" and direction == JOINT:
        return float(np.mean(list(evaluate_directions(model, data, split, batch_size).values())))
    model.eval()
    rowset = data.splits[split]
    preds, targets, masks = [], [], []
    for b in batches(data.table, rowset, batch_size, shuffle=False):
        out = forward(model, b, task, direction)
        if task == "cml":
            scores = cml_decode_scores(model, out["match_logits"]).masked_fill(~b["mask"], -1e9)
            lengths = b["target_mask"].sum(1)
            preds.append(cml_predict(scores.cpu().numpy(), lengths.cpu().numpy()))
            targets.append(b["target_mask"].float().argmax(1).cpu().numpy())
        else:
            preds.append(model.predict(out, task).cpu().numpy())
            targets.append(b["labels"].cpu().numpy())
            masks.append(b["mask"].cpu().numpy())
    if task == "cml":
        return cml_exact_match(np.concatenate(preds), np.concatenate(targets))
    return segment_accuracy(np.concatenate(preds), np.concatenate(targets), np.concatenate(masks))


def evaluate_directions(model: torch.nn.Module, data: TaskData, split: str, batch_size: int = 256) -> dict:
    """CML exact match of a jointly trained model in each direction: {"a2v": ..., "v2a": ...}."""
    return {d: evaluate_split(model, data, split, "cml", d, batch_size) for d in DIRECTIONS}


def metric_name(task: str) -> str:
    return "exact_match" if task == "cml" else "segment_accuracy"


def oracle_summary(history: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The ORACLE numbers: the best test score over the epochs and its epoch (what papers that select on test, or
    report their best test epoch, publish), plus the per-epoch val and test curves. Never used for selection."""
    key = f"test_{metric}"
    curve = [h.get(key) for h in history]
    scored = [(v, h["epoch"]) for v, h in zip(curve, history) if v is not None]
    out: dict[str, Any] = {f"oracle_best_test_{metric}": None, "oracle_best_test_epoch": None}
    if scored:
        best = max(v for v, _ in scored)
        out.update({f"oracle_best_test_{metric}": best,
                    "oracle_best_test_epoch": next(e for v, e in scored if v == best)})
    out["curves"] = {f"val_{metric}": [h.get(f"val_{metric}") for h in history], key: curve}
    return out


def published_number(model: str, task: str, direction: str | None) -> dict[str, Any] | None:
    """The paper's published test number for this model and task (None where the paper gives none)."""
    spec = get_spec(model)
    key = task if task != "cml" else f"cml-{direction}"
    if direction == JOINT:
        key = "cml-average"
    value = spec.published.get(key)
    if value is None:
        return None
    return {"value": value, "selection": spec.published.get("selection", "unknown"),
            "source": spec.published.get("source", spec.paper)}


def evaluate(checkpoint: PathLike, paths: DataPaths, split: str = "test", device: str = "auto") -> dict[str, Any]:
    """The checkpoint's metric on one split of the data (a warning when the features differ from its training's)."""
    if split not in ave.SPLITS:
        raise UsageError(f"--split {split}: choose {', '.join(ave.SPLITS[:-1])} or {ave.SPLITS[-1]}")
    dev = resolve_device(device, warn=False)  # evaluating is quick on a CPU: no warning
    model, ckpt = load_checkpoint(checkpoint, dev)
    data = load_task_data(paths, ckpt["task"], (split,), dev, trained_on=(ckpt, checkpoint))
    trained_on = json.loads(ckpt.get("feature_spec") or "{}")
    warning = None
    if trained_on and data.table.spec and trained_on != data.table.spec:
        warning = f"{paths.features}: feature spec differs from the features {checkpoint} was trained on"
    value = evaluate_split(model, data, split, ckpt["task"], ckpt.get("direction"))
    metric = metric_name(ckpt["task"])
    trained = ckpt.get("metrics") or {}
    result = {"checkpoint": str(checkpoint), "model": ckpt["model"], "task": ckpt["task"],
              "direction": ckpt.get("direction"), "preset": ckpt["config"].get("preset", "paper"), "split": split,
              "metric": metric, metric: value, "rows": len(data.splits[split]), "warning": warning,
              # From training: the test score at the val-selected epoch (what avepipe reports) and the ORACLE best
              # test score over epochs (what papers selecting on test report), next to the paper's own number.
              "val_selected_test": trained.get(f"test_{metric}"), "val_selected_epoch": trained.get("best_epoch"),
              "oracle_best_test": trained.get(f"oracle_best_test_{metric}"),
              "oracle_best_test_epoch": trained.get("oracle_best_test_epoch"),
              "background_videos": trained.get("background_videos"),
              "dataset": "AVE" if ave.is_ave_release(paths.annotations) else "custom"}
    result["published"] = (published_number(ckpt["model"], ckpt["task"], ckpt.get("direction"))
                           if result["dataset"] == "AVE" else None)
    if ckpt["task"] == "cml" and ckpt.get("direction") == JOINT:
        result.update({f"{metric}_{d}": v for d, v in evaluate_directions(model, data, split).items()})
    return result
