"""Training loop and evaluation, shared by every registered model and task.

The checkpoint is chosen on the **val** split only; the test split is evaluated once, with the chosen checkpoint.
Checkpoints (plain dicts, never pickled modules) are made, read and checked in :mod:`avepipe.checkpoint`. Bad options
raise :class:`~avepipe.errors.UsageError`, unusable data files :class:`~avepipe.errors.DataError`.

This module holds the loop (:func:`train`, :func:`train_seeds`: options, optimizer, resume, early stopping, what is
saved each epoch); the configuration is resolved in :mod:`avepipe.train_config`, the data loaded in
:mod:`avepipe.train_data`, and splits scored in :mod:`avepipe.evaluation`. Their public names are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from avepipe.checkpoint import (
    check_resumable,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from avepipe.data import ave
from avepipe.data.tasks import batches
from avepipe.devices import cuda_rng_states, resolve_device, restore_cuda_rng
from avepipe.errors import DataError, TrainingError, UsageError
from avepipe.evaluation import (
    evaluate,
    evaluate_directions,
    evaluate_split,
    forward,
    metric_name,
    oracle_summary,
    published_number,
)
from avepipe.models.registry import build_model, get_spec
from avepipe.train_config import (
    DIRECTIONS,
    JOINT,
    PRESETS,
    TRAIN_KEYS,
    PathLike,
    check_config_keys,
    check_train_config,
    config_keys,
    deep_merge,
    resolve_config,
)
from avepipe.train_data import NOISY_FILES, DataPaths, TaskData, background_warning, load_task_data, read_noisy

__all__ = [  # the loop's own names, and those of its parts that were defined here before they had their own modules
    "DIRECTIONS", "JOINT", "NOISY_FILES", "PRESETS", "TRAIN_KEYS",
    "DataPaths", "EpochCallback", "PathLike", "TaskData", "TrainOptions",
    "background_warning", "batches", "check_config_keys", "check_resume_settings", "check_train_config",
    "config_keys", "deep_merge", "diverged", "evaluate", "evaluate_directions", "evaluate_split", "forward",
    "load_task_data", "metric_name", "oracle_summary", "published_number", "read_noisy", "resolve_config", "train",
    "train_seeds", "validate_task",
]


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
    patience: int | None = None  # stop when val has not improved for this many epochs (None / 0: run every epoch)
    resume: bool = False
    preset: str = "paper"  # paper: the paper's text; released: the authors' public code (see docs/models.md)
    cml_protocol: str | None = None  # models with a cml_protocol option (dcmr): leak-free (default) or paper
    train_noisy: bool = True  # weak: use the released background videos when found (DataPaths.auto_noisy)
    overwrite: bool = False  # replace a finished or killed run in out_dir (else only --resume may use it)
    should_stop: Callable[[], bool] | None = None  # polled between batches: True ends the run (KeyboardInterrupt) there


EpochCallback = Callable[[dict[str, Any]], None]


def make_optimizer(model: torch.nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
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
    joint = getattr(spec.cls, "JOINT_DIRECTIONS", False)
    if options.task == "cml" and options.direction not in DIRECTIONS + ((JOINT,) if joint else ()):
        raise UsageError("--task cml needs --direction a2v or v2a" + (" or both" if joint else "")
                         + ("" if joint or options.direction != JOINT else
                            f" (--direction both: model {options.model!r} trains one direction per network)"))
    if options.preset not in spec.preset_names():
        raise UsageError(f"model {options.model!r} has no preset {options.preset!r} "
                         f"(presets: {', '.join(spec.preset_names())})")
    if options.cml_protocol is not None and "cml_protocol" not in spec.default_config.get("model", {}):
        raise UsageError(f"--cml-protocol: model {options.model!r} has no protocol choice (dcmr has)")
    if options.task != "cml" and options.direction is not None:
        raise UsageError("--direction only applies to --task cml")


def train(options: TrainOptions, paths: DataPaths, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train one model with one seed into ``options.out_dir``; returns the metrics written to metrics.json."""
    validate_task(options)
    config = resolve_config(options.model, options.config_file,
                            {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr,
                             "patience": options.patience},
                            preset=options.preset, task=options.task)
    if options.cml_protocol is not None:
        config["model"]["cml_protocol"] = options.cml_protocol
    if not options.train_noisy:
        paths = DataPaths(**{**paths.__dict__, "noisy": None, "auto_noisy": False})
    check_train_config(config["train"])
    out = Path(options.out_dir)
    last_path, best_path = out / "last.pt", out / "checkpoint.pt"
    saved = None
    if options.resume:
        if options.overwrite:
            raise UsageError("--resume continues the run in --out, --overwrite replaces it: give one of them")
        if not last_path.exists():
            raise UsageError(f"{last_path}: nothing to resume (no last.pt in {out})")
        saved = read_checkpoint(last_path)
        check_resumable(saved, last_path, model=options.model, task=options.task, seed=options.seed)
        if saved["config"].get("preset", "paper") != options.preset:
            raise UsageError(f"{last_path}: trained with --preset {saved['config'].get('preset', 'paper')}, "
                             f"not {options.preset}")
        check_resume_settings(out, config, paths)
    elif not options.overwrite:
        existing = [p.name for p in (best_path, last_path) if p.exists()]
        if existing:
            raise UsageError(f"{out} already holds a run ({', '.join(existing)}): --resume to continue it, "
                             "--overwrite to replace it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    for temporary in out.glob(".*.pt.tmp*"):  # a checkpoint write that a kill interrupted (save_checkpoint)
        temporary.unlink(missing_ok=True)
    device = resolve_device(options.device)
    data = load_task_data(paths, options.task, ave.SPLITS, device, trained_on=(saved, last_path) if saved else None)
    if len(data.splits["train"]) == 0 or len(data.splits["val"]) == 0:
        raise DataError("the train and val splits must not be empty")
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    model = build_model(options.model, options.task, config["model"]).to(device)
    train_cfg = config["train"]
    data.splits["train"].batch_order = train_cfg.get("batch_order", "shuffled")  # data.tasks.batches
    optimizer = make_optimizer(model, train_cfg)
    scheduler = _scheduler(optimizer, train_cfg)
    shuffle = torch.Generator().manual_seed(options.seed)
    class_names = data.categories + ["background"]  # a resumed run's own order (see load_task_data)
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "history": []}
    if saved is None:  # --overwrite (or a fresh folder): nothing of an earlier run may mix with this one
        for stale in (best_path, last_path, out / "metrics.json"):
            stale.unlink(missing_ok=True)
    else:
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        restore_cuda_rng(saved.get("cuda_rng"), device)  # dropout on the GPU draws from these
        state = saved["progress"]
    (out / "config.json").write_text(json.dumps({"model": options.model, "task": options.task,
                                                 "direction": options.direction, "seed": options.seed,
                                                 "preset": options.preset, "config": config,
                                                 "background_videos": data.background_videos,
                                                 "features": os.fspath(paths.features),
                                                 "annotations": os.fspath(paths.annotations)}, indent=2))
    epochs = int(train_cfg["epochs"])
    batch_size = int(train_cfg["batch_size"])
    metric = metric_name(options.task)
    patience = int(train_cfg.get("patience") or 0)
    stop_reason = f"all {epochs} epochs run"
    for epoch in range(state["epoch"] + 1, epochs + 1):
        if patience and state["epoch"] - state["best_epoch"] >= patience:  # early stopping (a resumed run too)
            stop_reason = (f"stopped after epoch {state['epoch']} of {epochs}: no val gain in {patience} epochs "
                           f"(--patience {patience})")
            break
        model.train()
        started = time.perf_counter()
        # Losses are summed on the device and read once per epoch (a float() per step would wait for the GPU at
        # every step); a non-finite loss is found at the epoch's end, and nothing of that epoch is saved.
        losses, sizes = [], []
        for b in batches(data.table, data.splits["train"], batch_size, shuffle=True, generator=shuffle):
            if options.should_stop is not None and options.should_stop():
                raise KeyboardInterrupt  # at a batch boundary: last.pt holds the last finished epoch
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(forward(model, b, options.task, options.direction), b, options.task)
            loss.backward()
            if train_cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(train_cfg["grad_clip"]))
            optimizer.step()
            losses.append(loss.detach())
            sizes.append(len(b["labels"]))
        per_batch = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
        bad = (~torch.isfinite(per_batch)).nonzero()
        if len(bad):
            step = int(bad[0, 0]) + 1
            raise diverged(out, epoch, f"the loss of batch {step} is {float(per_batch[step - 1])}")
        total, count = float((per_batch * torch.tensor(sizes, dtype=torch.float64)).sum()), sum(sizes)
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise diverged(out, epoch, "the weights hold NaN or inf after its last batch")
        scheduler.step()
        val = evaluate_split(model, data, "val", options.task, options.direction)
        # The test curve is recorded for the honest comparison with papers that pick their epoch on test; it never
        # takes part in choosing the checkpoint (val does).
        test_now = evaluate_split(model, data, "test", options.task, options.direction)
        record = {"epoch": epoch, "loss": total / max(count, 1), f"val_{metric}": val, f"test_{metric}": test_now,
                  "seconds": time.perf_counter() - started}
        if options.task == "cml" and options.direction == JOINT:
            for split in ("val", "test"):
                for d, value in evaluate_directions(model, data, split).items():
                    record[f"{split}_{metric}_{d}"] = value
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
                            shuffle_rng=shuffle.get_state(), torch_rng=torch.get_rng_state(), progress=state,
                            cuda_rng=cuda_rng_states())
        save_checkpoint(resume_state, last_path)
        if on_epoch:
            on_epoch({**record, "epochs": epochs, "best": state["best"], "improved": improved, "metric": metric,
                      "patience": patience, "since_best": epoch - state["best_epoch"]})
    best_model, best = load_checkpoint(best_path, device)
    test = evaluate_split(best_model, data, "test", options.task, options.direction)
    metrics = {"model": options.model, "task": options.task, "direction": options.direction, "seed": options.seed,
               "preset": options.preset, "metric": metric, "train_rows": len(data.splits["train"]),
               "background_videos": data.background_videos, "selection": "val", "best_epoch": state["best_epoch"],
               f"val_{metric}": state["best"], f"test_{metric}": test, "epochs": epochs,
               "epochs_run": state["epoch"], "patience": patience or None, "stopped_early": state["epoch"] < epochs,
               "stop_reason": stop_reason}
    if options.task == "cml" and options.direction == JOINT:
        metrics.update({f"test_{metric}_{d}": v for d, v in evaluate_directions(best_model, data, "test").items()})
    metrics.update(oracle_summary(state["history"], metric))
    on_ave = ave.is_ave_release(paths.annotations)  # the papers' numbers are AVE's: only then compared
    metrics["dataset"] = "AVE" if on_ave else "custom"
    metrics["published"] = published_number(options.model, options.task, options.direction) if on_ave else None
    metrics["history"] = state["history"]
    best["metrics"] = {k: v for k, v in metrics.items() if k != "history"}
    save_checkpoint(best, best_path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def diverged(out: Path, epoch: int, what: str) -> TrainingError:
    """The one-line error of a run whose loss or weights stopped being finite; nothing of ``epoch`` is saved."""
    kept = (f"{out / 'checkpoint.pt'} and {out / 'last.pt'} are from earlier epochs" if epoch > 1 else
            "no checkpoint was written")
    return TrainingError(f"epoch {epoch}: {what}; training stopped, nothing of epoch {epoch} was saved ({kept}); "
                         "lower --lr or set [train] grad_clip")


def check_resume_settings(out: Path, config: dict[str, Any], paths: DataPaths) -> None:
    """``--resume`` must use the features, annotations and settings of the run's config.json (only the number of
    epochs and the patience may change): anything else would continue another run than the one saved."""
    path = out / "config.json"
    try:
        before = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    differences = []
    for key in ("features", "annotations"):
        then, now = before.get(key), os.fspath(getattr(paths, key))
        if then is not None and Path(then).resolve() != Path(now).resolve():
            differences.append(f"--{key} {then} -> {now}")
    now_config = json.loads(json.dumps(config))  # as config.json holds it (tuples become lists)
    for part in ("model", "train"):
        then, now = (before.get("config") or {}).get(part, {}), now_config.get(part, {})
        for key in sorted(set(then) | set(now)):
            if (part, key) not in (("train", "epochs"), ("train", "patience")) and then.get(key) != now.get(key):
                name = f"--{key.replace('_', '-')}" if part == "train" and key in ("lr", "batch_size") else \
                    f"[{part}] {key}"
                differences.append(f"{name} {then.get(key)!r} -> {now.get(key)!r}")
    if differences:
        raise UsageError(f"{out}: --resume with other settings than the run's {path.name}: {'; '.join(differences)} "
                         "(resume with the run's settings, or train into another --out)")


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
    for key in (f"val_{metric}", f"test_{metric}", f"oracle_best_test_{metric}"):
        values = np.array([r[key] for r in results if r.get(key) is not None])
        if not len(values):
            continue
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[key] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    summary["published"] = results[0].get("published")
    Path(options.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(options.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
