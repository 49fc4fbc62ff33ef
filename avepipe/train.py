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
import warnings
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
from avepipe.data.tasks import BATCH_ORDERS, RowSet, batches, build_rows, with_noisy_videos
from avepipe.devices import cuda_rng_states, resolve_device, restore_cuda_rng
from avepipe.errors import DataError, DataWarning, TrainingError, UsageError
from avepipe.metrics import cml_exact_match, cml_predict, segment_accuracy
from avepipe.models.layers import cml_decode_scores
from avepipe.models.registry import build_model, get_spec, preset_overrides

DIRECTIONS = ("a2v", "v2a")
JOINT = "both"  # --direction both: one module trained on both directions at once (models with JOINT_DIRECTIONS)
PRESETS = ("paper", "released")
# The released background-only videos of the weak task, looked for beside the annotations (or in --splits).
NOISY_FILES = ("audio_feature_noisy.h5", ("visual_feature_noisy.h5", "video_feature_noisy.h5"), "labels_noisy.h5")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config(model_name: str, config_file: PathLike | None = None,
                   train_overrides: dict[str, Any] | None = None, preset: str = "paper",
                   task: str | None = None) -> dict[str, Any]:
    """The model's paper defaults, then the preset's (``released``: the authors' public code), then the TOML file's
    ``[model]`` / ``[train]`` tables, then command-line values. The preset's name is kept under ``"preset"``."""
    config = deep_merge({"model": {}, "train": {}}, get_spec(model_name).default_config)
    config = deep_merge(config, preset_overrides(model_name, preset, task))
    if config_file:
        try:
            loaded = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{config_file}: cannot read the config ({exc})") from None
        unknown = set(loaded) - {"model", "train"}
        if unknown:
            raise UsageError(f"{config_file}: unknown tables {sorted(unknown)} (use [model] and [train])")
        check_config_keys(model_name, loaded, config_file)
        config = deep_merge(config, loaded)
    config["train"].update({k: v for k, v in (train_overrides or {}).items() if v is not None})
    config["preset"] = preset
    return config


# [train] keys the training loop reads for every model (models' defaults and presets may add more).
TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "momentum", "lr_gamma", "lr_milestones",
              "lr_step", "grad_clip", "batch_order", "patience")


def config_keys(model_name: str) -> dict[str, set[str]]:
    """The keys a config file may set in [model] and [train] for this model: its defaults', its presets' (common and
    per task) and, for [train], the training loop's :data:`TRAIN_KEYS`."""
    spec = get_spec(model_name)
    keys = {part: set(spec.default_config.get(part, {})) for part in ("model", "train")}
    keys["train"] |= set(TRAIN_KEYS)
    for preset in spec.presets.values():
        for entry in (preset, *preset.get("tasks", {}).values()):
            for part in keys:
                keys[part] |= set(entry.get(part, {}))
    return keys


def check_config_keys(model_name: str, loaded: dict[str, Any], source: PathLike) -> None:
    """A key no model option or training setting reads would be silently ignored: refuse it, naming the nearest."""
    import difflib

    valid = config_keys(model_name)
    for part in ("model", "train"):
        table = loaded.get(part, {})
        if not isinstance(table, dict):
            raise UsageError(f"{source}: [{part}] must be a table")
        for key in table:
            if key not in valid[part]:
                near = difflib.get_close_matches(key, sorted(valid[part]), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"valid: {', '.join(sorted(valid[part]))}"
                raise UsageError(f"{source}: unknown key {key!r} in [{part}] for model {model_name!r} ({hint})")


def check_train_config(train_cfg: dict[str, Any]) -> None:
    """Epochs and batch size at least 1, a finite positive learning rate (from the file or the options)."""
    for key, option in (("epochs", "--epochs"), ("batch_size", "--batch-size")):
        value = train_cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{option} / [train] {key} must be a whole number of at least 1, not {value!r}")
    if train_cfg.get("batch_order", "shuffled") not in BATCH_ORDERS:
        raise UsageError(f"[train] batch_order must be one of {', '.join(BATCH_ORDERS)}, "
                         f"not {train_cfg['batch_order']!r}")
    patience = train_cfg.get("patience")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 0):
        raise UsageError(f"--patience / [train] patience must be a whole number of epochs (0: off), not {patience!r}")
    lr = train_cfg.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UsageError(f"--lr / [train] lr must be a finite number above 0, not {lr!r}")


PathLike = str | os.PathLike


@dataclass
class DataPaths:
    features: PathLike
    annotations: PathLike
    categories: PathLike | None = None  # default: categories.txt beside the annotations
    splits: PathLike | None = None  # folder with {split}_order[_match].h5 or {split}Set.txt; default: the annotations'
    # weak task only: the released extra background videos (audio_feature_noisy.h5, visual_feature_noisy.h5,
    # labels_noisy.h5; key avadataset) added to the training split. None: used whenever the three files sit in the
    # splits folder or beside the annotations (auto_noisy), as AVEL's, DMIN's, CMBS's and CPSP's released weak training.
    noisy: tuple[PathLike, PathLike, PathLike] | None = None
    auto_noisy: bool = True

    def categories_path(self) -> Path:
        return Path(self.categories) if self.categories else Path(self.annotations).parent / "categories.txt"

    def splits_dir(self) -> Path:
        return Path(self.splits) if self.splits else Path(self.annotations).parent

    def find_noisy(self) -> tuple[tuple[Path, Path, Path] | None, list[str]]:
        """The noisy set's (audio, visual, labels) files, and the names missing when they are not all found.

        Explicit ``noisy`` files win; else the first folder (splits, then the annotations' folder) holding all
        three. The visual file may be named visual_feature_noisy.h5 or (AVEL's weak script) video_feature_noisy.h5."""
        if self.noisy:
            return tuple(Path(p) for p in self.noisy), []  # type: ignore[return-value]
        missing: list[str] = [NOISY_FILES[0], NOISY_FILES[1][0], NOISY_FILES[2]]
        if not self.auto_noisy:
            return None, missing
        for folder in dict.fromkeys([self.splits_dir(), Path(self.annotations).parent]):
            found, lacking = [], []
            for names in NOISY_FILES:
                names = (names,) if isinstance(names, str) else names
                hit = next((folder / n for n in names if (folder / n).is_file()), None)
                found.append(hit)
                if hit is None:
                    lacking.append(str(folder / names[0]))
            if not lacking:
                return tuple(found), []  # type: ignore[return-value]
            if len(lacking) < len(missing):
                missing = lacking
        return None, missing


@dataclass
class TaskData:
    table: FeatureTable
    splits: dict[str, RowSet]
    categories: list[str]
    background_videos: int = 0  # weak task: released background-only videos added to train


def background_warning(missing: list[str]) -> str:
    return ("weak training WITHOUT the released background-only videos (missing: " + ", ".join(missing) + "): no "
            "training target ever says 'background', so every second tends to be labelled with the video's event and "
            "accuracy falls short of the papers' weak numbers (AVEL, DMIN, CMBS, CPSP all train with these 178 "
            "videos). Put audio_feature_noisy.h5, visual_feature_noisy.h5 and labels_noisy.h5 beside the annotations "
            "or pass --noisy-audio/--noisy-visual/--noisy-labels. metrics.json records background_videos = 0.")


def load_task_data(paths: DataPaths, task: str, splits: tuple[str, ...], device: torch.device,
                   trained_on: tuple[dict[str, Any], PathLike] | None = None) -> TaskData:
    """The features and labelled rows of ``splits``. ``trained_on`` (a checkpoint and its path): the data's categories
    must be the checkpoint's, and labels are numbered in the checkpoint's order (a reordered categories.txt is mapped
    by name; other categories raise :class:`~avepipe.errors.CheckpointError`)."""
    try:  # avepipe.data.ave reads plain files: its ValueError / OSError name the file (and line)
        categories = ave.read_categories(paths.categories_path())
        if trained_on is not None:
            categories = check_categories(trained_on[0], trained_on[1], categories, paths.categories_path())
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
    if paths.noisy and task != "weak" and "train" in rowsets:
        raise UsageError("the noisy background videos are extra data for --task weak only")
    background = 0
    if task == "weak" and "train" in rowsets:
        files, missing = paths.find_noisy()
        if files is None:
            warnings.warn(background_warning(missing), DataWarning, stacklevel=2)
        else:
            visual, audio, video_label = read_noisy(*files)
            table, rowsets["train"] = with_noisy_videos(table, rowsets["train"], visual, audio, video_label)
            background = int(video_label.shape[0])
    return TaskData(table, rowsets, categories, background)


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
        finite = torch.isfinite(arrays[-1].reshape(len(arrays[-1]), -1)).all(1)
        if not finite.all():
            raise DataError(f"{path}: NaN or inf in row {int((~finite).nonzero()[0])} of 'avadataset'")
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
    patience: int | None = None  # stop when val has not improved for this many epochs (None / 0: run every epoch)
    resume: bool = False
    preset: str = "paper"  # paper: the paper's text; released: the authors' public code (see docs/models.md)
    cml_protocol: str | None = None  # models with a cml_protocol option (dcmr): leak-free (default) or paper
    train_noisy: bool = True  # weak: use the released background videos when found (DataPaths.auto_noisy)
    overwrite: bool = False  # replace a finished or killed run in out_dir (else only --resume may use it)
    should_stop: Callable[[], bool] | None = None  # polled between batches: True ends the run (KeyboardInterrupt) there


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
    optimizer = _optimizer(model, train_cfg)
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
