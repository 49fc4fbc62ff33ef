"""A training run's configuration: the model's paper defaults, then its preset's (``paper`` / ``released``), then the
TOML file's ``[model]`` / ``[train]`` tables, then command-line values (:func:`resolve_config`); every key a file sets
is checked against what the model and the training loop read, and the loop's settings against their ranges. Bad
options raise :class:`~avepipe.errors.UsageError`.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import tomllib

from avepipe.data.tasks import BATCH_ORDERS
from avepipe.errors import UsageError
from avepipe.models.registry import get_spec, preset_overrides

DIRECTIONS = ("a2v", "v2a")
JOINT = "both"  # --direction both: one module trained on both directions at once (models with JOINT_DIRECTIONS)
PRESETS = ("paper", "released")

PathLike = str | os.PathLike


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
