"""Checkpoints: written by ``avepipe train``, read by ``avepipe evaluate``, ``avepipe localize`` and a resumed train.

A checkpoint is a plain dict, loadable with ``torch.load(..., weights_only=True)`` (no code from the file is executed):
``format``, ``format_version``, ``model``, ``task``, ``direction`` (cml), ``config`` ({"model": ..., "train": ...}),
``state_dict``, ``class_names`` (the categories in label order, then ``"background"``), ``feature_spec`` (JSON of the
cache spec it was trained on), ``metrics``, ``seed`` and ``versions``. ``last.pt`` (``--resume``) is a checkpoint plus
the optimizer, scheduler, RNG and progress states.

Every problem with a checkpoint is a :class:`~avepipe.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from avepipe.data.ave import BACKGROUND, NUM_CLASSES
from avepipe.errors import CheckpointError
from avepipe.faults import fault_point
from avepipe.models.registry import build_model, get_spec, model_names
from avepipe.version import __version__

CHECKPOINT_FORMAT = "avepipe-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "task", "config", "state_dict")


def make_checkpoint(model: torch.nn.Module, *, name: str, task: str, direction: str | None, config: dict,
                    class_names: list[str], feature_spec: dict | None, metrics: dict, seed: int) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
        "model": name, "task": task, "direction": direction, "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names), "feature_spec": json.dumps(feature_spec or {}, sort_keys=True),
        "metrics": metrics, "seed": seed,
        "versions": {"avepipe": __version__, "torch": str(torch.__version__)},
    }


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Write atomically: a reader (or a killed run) sees the previous file or this one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(checkpoint, tmp)
    fault_point("checkpoint-write")  # tests/test_train_resume.py kills the process here
    os.replace(tmp, path)


def validate_checkpoint(checkpoint: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``checkpoint`` if it is an avepipe checkpoint of a registered model and task, with usable class names."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an avepipe checkpoint")
    if checkpoint.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {checkpoint['format_version']} is newer than this avepipe "
                              f"reads ({CHECKPOINT_VERSION}); upgrade avepipe")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    name, task = checkpoint["model"], checkpoint["task"]
    if name not in model_names():
        raise CheckpointError(f"{path}: model {name!r} is not registered in this avepipe "
                              f"(known: {', '.join(model_names())})")
    if task not in get_spec(name).tasks:
        raise CheckpointError(f"{path}: model {name!r} has no task {task!r}")
    names = checkpoint.get("class_names") or []
    if names and (not all(isinstance(n, str) for n in names) or names[-1] != "background" or len(names) > NUM_CLASSES):
        raise CheckpointError(f"{path}: class_names must be at most {NUM_CLASSES - 1} category names then 'background'")
    return checkpoint


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict of ``path``, validated (weights_only load: no code from the file is executed)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's warnings about pickle protocols would only confuse
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or type(exc).__name__})") from None
    except Exception:  # noqa: BLE001 - any failure of the safe unpickler: not a file avepipe wrote
        # Deliberately not torch's message: it suggests weights_only=False, i.e. running the file's code.
        raise CheckpointError(f"{path}: not an avepipe checkpoint (unreadable as one; avepipe never loads "
                              "checkpoints that hold code)") from None
    return validate_checkpoint(checkpoint, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a checkpoint, rebuilt from its config and weights, in eval mode on ``map_location``.

    The file is read into host memory and the model then moved: tensors saved from ``cuda:3`` load on a machine with
    one GPU (or none), and nothing is deserialised straight onto a device."""
    checkpoint = read_checkpoint(path, "cpu")
    try:
        model = build_model(checkpoint["model"], checkpoint["task"], checkpoint["config"].get("model"))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:  # config or weights of another architecture
        raise CheckpointError(f"{path}: does not rebuild its model ({str(exc).splitlines()[0]})") from None
    return model.to(map_location).eval(), checkpoint


def check_categories(checkpoint: dict[str, Any], path: str | os.PathLike, categories: Sequence[str],
                     source: str | os.PathLike) -> list[str]:
    """The category order in which the data's labels must be numbered to mean what the checkpoint's outputs mean.

    ``categories`` come from ``source`` (a categories.txt). The same names in another order are mapped by name: the
    checkpoint's order is returned, so label k is the checkpoint's category k whatever the file's order. Other names
    raise :class:`CheckpointError` naming the difference. Checkpoints without class names are not checked."""
    trained = list(checkpoint.get("class_names") or [])[:-1]
    if not trained or trained == list(categories):
        return list(categories)
    if sorted(trained) == sorted(categories):
        return trained
    missing = [name for name in trained if name not in categories]
    extra = [name for name in categories if name not in trained]
    parts = []
    if missing:
        parts.append(f"not in {source}: {', '.join(missing)}")
    if extra:
        parts.append(f"not in the checkpoint: {', '.join(extra)}")
    raise CheckpointError(f"{path}: trained on other categories than {source} ({'; '.join(parts)})")


def check_resumable(saved: dict[str, Any], path: str | os.PathLike, *, model: str, task: str, seed: int) -> None:
    """``last.pt`` must come from the same model, task and seed as the run that resumes it."""
    if (saved.get("model"), saved.get("task"), saved.get("seed")) != (model, task, seed):
        raise CheckpointError(f"{path}: was trained with model={saved.get('model')} task={saved.get('task')} "
                              f"seed={saved.get('seed')}")


def known_classes(checkpoint: dict[str, Any]) -> list[int]:
    """Class indices the checkpoint names, background included: a model trained on a subset of the categories has
    untrained outputs for the others, which must never be predicted."""
    named = max(0, len(checkpoint.get("class_names") or []) - 1)
    return sorted(set(range(min(named, BACKGROUND))) | {BACKGROUND})


def class_name(checkpoint: dict[str, Any], index: int) -> str:
    """The name of class ``index`` (``background`` for 28, ``class<k>`` for a class the checkpoint does not name)."""
    names = checkpoint.get("class_names") or []
    if index == BACKGROUND:
        return "background"
    return names[index] if index < len(names) - 1 else f"class{index}"
