"""Training loop and evaluation, shared by every registered model and task.

The checkpoint is chosen on the **val** split only; the test split is evaluated once, with the chosen checkpoint.
Checkpoints (plain dicts, never pickled modules) are made, read and checked in :mod:`avepipe.checkpoint`. Bad options
raise :class:`~avepipe.errors.UsageError`, unusable data files :class:`~avepipe.errors.DataError`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import tomllib
import torch

from avepipe.checkpoint import (
    check_categories,
    check_resumable,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from avepipe.data import ave
from avepipe.data.features import FeatureTable, load_feature_table
from avepipe.data.tasks import RowSet, batches, build_rows, with_noisy_videos
from avepipe.devices import resolve_device
from avepipe.errors import DataError, UsageError
from avepipe.metrics import cml_exact_match, cml_predict, segment_accuracy
from avepipe.models.registry import build_model, get_spec

DIRECTIONS = ("a2v", "v2a")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config(model_name: str, config_file: PathLike | None = None,
                   train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's paper defaults, then the TOML file's ``[model]`` / ``[train]`` tables, then command-line values."""
    config = deep_merge({"model": {}, "train": {}}, get_spec(model_name).default_config)
    if config_file:
        try:
            loaded = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{config_file}: cannot read the config ({exc})") from None
        unknown = set(loaded) - {"model", "train"}
        if unknown:
            raise UsageError(f"{config_file}: unknown tables {sorted(unknown)} (use [model] and [train])")
        config = deep_merge(config, loaded)
    config["train"].update({k: v for k, v in (train_overrides or {}).items() if v is not None})
    return config


PathLike = str | os.PathLike


@dataclass
class DataPaths:
    features: PathLike
    annotations: PathLike
    categories: PathLike | None = None  # default: categories.txt beside the annotations
    splits: PathLike | None = None  # folder with {split}_order[_match].h5 or {split}Set.txt; default: the annotations'
    # weak task only: the released extra background videos (audio_feature_noisy.h5, visual_feature_noisy.h5,
    # labels_noisy.h5; key avadataset) added to the training split
    noisy: tuple[PathLike, PathLike, PathLike] | None = None

    def categories_path(self) -> Path:
        return Path(self.categories) if self.categories else Path(self.annotations).parent / "categories.txt"

    def splits_dir(self) -> Path:
        return Path(self.splits) if self.splits else Path(self.annotations).parent


@dataclass
class TaskData:
    table: FeatureTable
    splits: dict[str, RowSet]
    categories: list[str]


def load_task_data(paths: DataPaths, task: str, splits: tuple[str, ...], device: torch.device) -> TaskData:
    try:  # avepipe.data.ave reads plain files: its ValueError / OSError name the file (and line)
        categories = ave.read_categories(paths.categories_path())
        annotations = ave.read_annotations(paths.annotations, categories)
        kind = "cml" if task == "cml" else "sel"
        split_rows = {s: ave.load_split(kind, s, paths.splits_dir()) for s in splits}
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from None
    if any(r.size and r.max() >= len(annotations) for r in split_rows.values()):
        raise DataError(f"{paths.splits_dir()}: split rows beyond the {len(annotations)} rows of {paths.annotations}")
    needed = [annotations[r].video_id for rows in split_rows.values() for r in rows]
    table = load_feature_table(paths.features, needed).to(device)
    rowsets = {s: build_rows(annotations, rows, categories, table, task).to(device) for s, rows in split_rows.items()}
    if paths.noisy and "train" in rowsets:
        if task != "weak":
            raise UsageError("the noisy background videos are extra data for --task weak only")
        visual, audio, video_label = read_noisy(*paths.noisy)
        table, rowsets["train"] = with_noisy_videos(table, rowsets["train"], visual, audio, video_label)
    return TaskData(table, rowsets, categories)


def read_noisy(audio_path: PathLike, visual_path: PathLike, labels_path: PathLike,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released noisy set: audio [M,10,128], visual [M,10,7,7,512], one-hot video labels [M,29] (key avadataset)."""
    arrays = []
    for path in (audio_path, visual_path, labels_path):
        try:
            with h5py.File(path, "r") as f:
                arrays.append(torch.from_numpy(np.asarray(f["avadataset"][()], dtype=np.float32)))
        except (OSError, KeyError) as exc:
            raise DataError(f"{path}: cannot read dataset 'avadataset' ({exc})") from None
    audio, visual, labels = arrays
    if not (audio.shape[0] == visual.shape[0] == labels.shape[0]) or labels.shape[1:] != (ave.NUM_CLASSES,):
        raise DataError(f"noisy set shapes do not fit: audio {tuple(audio.shape)}, visual {tuple(visual.shape)}, "
                         f"labels {tuple(labels.shape)}")
    return visual, audio, labels.argmax(1)


# -- forward / metrics ------------------------------------------------------------------------------------------------

def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, direction: str | None) -> dict:
    if task == "cml":
        return model.forward_cml(batch["visual"], batch["audio"], batch["mask"], batch["query_mask"], direction)
    return model(batch["visual"], batch["audio"], batch["mask"])


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, data: TaskData, split: str, task: str, direction: str | None,
                   batch_size: int = 256) -> float:
    """Segment accuracy (supervised, weak) or CML exact-match accuracy on one split."""
    model.eval()
    rowset = data.splits[split]
    preds, targets, masks = [], [], []
    for b in batches(data.table, rowset, batch_size, shuffle=False):
        out = forward(model, b, task, direction)
        if task == "cml":
            scores = out["match_logits"].float().masked_fill(~b["mask"], -1e9)
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


def metric_name(task: str) -> str:
    return "exact_match" if task == "cml" else "segment_accuracy"


# -- training ---------------------------------------------------------------------------------------------------------

@dataclass
class TrainOptions:
    model: str
    task: str
    out_dir: PathLike
    direction: str | None = None
    seed: int = 0
    device: str = "auto"
    config_file: PathLike | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    resume: bool = False


EpochCallback = Callable[[dict[str, Any]], None]


def _optimizer(model: torch.nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
    name = train_cfg.get("optimizer", "adam").lower()
    lr, wd = float(train_cfg["lr"]), float(train_cfg.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    if name == "sgd":
        momentum = float(train_cfg.get("momentum", 0.9))
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    raise UsageError(f"unknown optimizer {name!r}")


def _scheduler(optimizer: torch.optim.Optimizer, train_cfg: dict):
    gamma = float(train_cfg.get("lr_gamma", 0.1))
    if train_cfg.get("lr_milestones"):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(m) for m in train_cfg["lr_milestones"]], gamma)
    if train_cfg.get("lr_step"):
        return torch.optim.lr_scheduler.StepLR(optimizer, int(train_cfg["lr_step"]), gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def validate_task(options: TrainOptions) -> None:
    spec = get_spec(options.model)
    if options.task not in spec.tasks:
        raise UsageError(f"model {options.model!r} does not support task {options.task!r} "
                         f"(supports: {', '.join(spec.tasks)})")
    if options.task == "cml" and options.direction not in DIRECTIONS:
        raise UsageError("--task cml needs --direction a2v or v2a")
    if options.task != "cml" and options.direction is not None:
        raise UsageError("--direction only applies to --task cml")


def train(options: TrainOptions, paths: DataPaths, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train one model with one seed into ``options.out_dir``; returns the metrics written to metrics.json."""
    validate_task(options)
    config = resolve_config(options.model, options.config_file,
                            {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr})
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    data = load_task_data(paths, options.task, ave.SPLITS, device)
    if len(data.splits["train"]) == 0 or len(data.splits["val"]) == 0:
        raise DataError("the train and val splits must not be empty")
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    model = build_model(options.model, options.task, config["model"]).to(device)
    train_cfg = config["train"]
    optimizer = _optimizer(model, train_cfg)
    scheduler = _scheduler(optimizer, train_cfg)
    shuffle = torch.Generator().manual_seed(options.seed)
    class_names = data.categories + ["background"]
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "history": []}
    last_path, best_path = out / "last.pt", out / "checkpoint.pt"
    if options.resume:
        if not last_path.exists():
            raise UsageError(f"{last_path}: nothing to resume (no last.pt in {out})")
        saved = read_checkpoint(last_path)
        check_resumable(saved, last_path, model=options.model, task=options.task, seed=options.seed)
        check_categories(saved, last_path, data.categories, paths.categories_path())
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["progress"]
    (out / "config.json").write_text(json.dumps({"model": options.model, "task": options.task,
                                                 "direction": options.direction, "seed": options.seed,
                                                 "config": config, "features": os.fspath(paths.features),
                                                 "annotations": os.fspath(paths.annotations)}, indent=2))
    epochs = int(train_cfg["epochs"])
    batch_size = int(train_cfg["batch_size"])
    metric = metric_name(options.task)
    for epoch in range(state["epoch"] + 1, epochs + 1):
        model.train()
        started = time.perf_counter()
        total, count = 0.0, 0
        for b in batches(data.table, data.splits["train"], batch_size, shuffle=True, generator=shuffle):
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(forward(model, b, options.task, options.direction), b, options.task)
            loss.backward()
            if train_cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(train_cfg["grad_clip"]))
            optimizer.step()
            total += float(loss.detach()) * len(b["labels"])
            count += len(b["labels"])
        scheduler.step()
        val = evaluate_split(model, data, "val", options.task, options.direction)
        record = {"epoch": epoch, "loss": total / max(count, 1), f"val_{metric}": val,
                  "seconds": time.perf_counter() - started}
        state["history"].append(record)
        improved = val > state["best"]
        if improved:
            state["best"], state["best_epoch"] = val, epoch
            save_checkpoint(make_checkpoint(model, name=options.model, task=options.task, direction=options.direction,
                                            config=config, class_names=class_names, feature_spec=data.table.spec,
                                            metrics={f"val_{metric}": val, "epoch": epoch}, seed=options.seed),
                            best_path)
        state["epoch"] = epoch
        resume_state = make_checkpoint(model, name=options.model, task=options.task, direction=options.direction,
                                       config=config, class_names=class_names, feature_spec=data.table.spec,
                                       metrics={}, seed=options.seed)
        resume_state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            shuffle_rng=shuffle.get_state(), torch_rng=torch.get_rng_state(), progress=state)
        save_checkpoint(resume_state, last_path)
        if on_epoch:
            on_epoch({**record, "epochs": epochs, "best": state["best"], "improved": improved, "metric": metric})
    best_model, best = load_checkpoint(best_path, device)
    test = evaluate_split(best_model, data, "test", options.task, options.direction)
    metrics = {"model": options.model, "task": options.task, "direction": options.direction, "seed": options.seed,
               "metric": metric, "train_rows": len(data.splits["train"]), "best_epoch": state["best_epoch"],
               f"val_{metric}": state["best"], f"test_{metric}": test, "epochs": epochs, "history": state["history"]}
    best["metrics"] = {k: v for k, v in metrics.items() if k != "history"}
    save_checkpoint(best, best_path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def train_seeds(options: TrainOptions, paths: DataPaths, seeds: int, on_epoch: EpochCallback | None = None,
                on_seed: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``seeds`` runs (seed, seed+1, ...) in ``out_dir/seed-N``; summary.json holds mean and std of val and test."""
    results = []
    for k in range(seeds):
        seed = options.seed + k
        if on_seed:
            on_seed(seed)
        sub = TrainOptions(**{**options.__dict__, "seed": seed, "out_dir": str(Path(options.out_dir) / f"seed-{seed}")})
        results.append(train(sub, paths, on_epoch))
    metric = results[0]["metric"]
    summary: dict[str, Any] = {"model": options.model, "task": options.task, "direction": options.direction,
                               "seeds": [r["seed"] for r in results], "metric": metric}
    for split in ("val", "test"):
        values = np.array([r[f"{split}_{metric}"] for r in results])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[f"{split}_{metric}"] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    Path(options.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(options.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(checkpoint: PathLike, paths: DataPaths, split: str = "test", device: str = "auto") -> dict[str, Any]:
    """The checkpoint's metric on one split of the data (a warning when the features differ from its training's)."""
    if split not in ave.SPLITS:
        raise UsageError(f"--split {split}: choose {', '.join(ave.SPLITS[:-1])} or {ave.SPLITS[-1]}")
    dev = resolve_device(device)
    model, ckpt = load_checkpoint(checkpoint, dev)
    data = load_task_data(paths, ckpt["task"], (split,), dev)
    check_categories(ckpt, checkpoint, data.categories, paths.categories_path())
    trained_on = json.loads(ckpt.get("feature_spec") or "{}")
    warning = None
    if trained_on and data.table.spec and trained_on != data.table.spec:
        warning = f"{paths.features}: feature spec differs from the features {checkpoint} was trained on"
    value = evaluate_split(model, data, split, ckpt["task"], ckpt.get("direction"))
    metric = metric_name(ckpt["task"])
    return {"checkpoint": str(checkpoint), "model": ckpt["model"], "task": ckpt["task"],
            "direction": ckpt.get("direction"), "split": split, "metric": metric, metric: value,
            "rows": len(data.splits[split]), "warning": warning}
