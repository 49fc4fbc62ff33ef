"""Model registry: every localization model registers here under its paper name.

The contract every model follows (the training loop, evaluate and localize rely on it):

* ``__init__(self, task: str, **config)`` where ``task`` is one of ``supervised``, ``weak``, ``cml`` and ``config`` is
  the model's entry of ``default_config`` (possibly overridden by the user).
* ``forward(visual, audio, mask)`` for ``supervised`` / ``weak``: ``visual`` float [B, T, 7, 7, Dv] (channel-last pool5
  maps), ``audio`` float [B, T, Da], ``mask`` bool [B, T] (True on real seconds, a prefix of each row: any other mask
  raises ValueError; padded seconds must not influence the real ones). Returns a dict with at least
  ``segment_logits`` [B, T, 29] (background is class 28); weak models also return ``video_logits`` [B, 29] (MIL
  pooling over the real seconds).
* ``forward_cml(visual, audio, mask, query_mask, direction)`` for ``cml``: ``query_mask`` bool [B, T] marks the event
  seconds of the query modality (audio for ``a2v``, visual for ``v2a``); only those seconds of the query modality may be
  used. Returns a dict with ``match_logits`` [B, T]: per-second score that the candidate modality's second belongs to
  the matching span; decoding (max contiguous sum of the query length) is in ``avepipe.metrics``.
* ``loss(outputs, batch, task) -> scalar tensor`` where ``batch`` holds ``labels`` long [B, T] (0..28), ``event`` float
  [B, T], ``video_label`` long [B] (category, 28 for background-only videos), ``mask`` bool [B, T] and, for cml,
  ``query_mask`` / ``target_mask`` bool [B, T].
* ``predict(outputs, task)`` -> long [B, T] segment labels (supervised / weak), the argmax of ``segment_logits``
  up to exact ties (models with a decision rule of their own shape ``segment_logits`` so that its argmax is the rule).
* ``event_logits(outputs, task)`` (optional) -> float [B, T] or None: for a model that decides event vs background
  before the category, the logit of that decision (``predict`` gives background exactly when it is < 0); localize
  reports its sigmoid as the event probability. Absent (or None): ``predict`` is the argmax of the 29 scores, and the
  event probability is the sigmoid of the best event class's score minus background's
  (:func:`avepipe.localization.second_probabilities`).

tests/models/test_contract.py checks the mask and gradient parts of this contract on every registered model.

Registration: importing anything under ``avepipe.models`` first runs the package's ``__init__``, which imports every
model module; each applies ``@register``. The registry itself imports no model (imports only point down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from avepipe.errors import UsageError

TASKS = ("supervised", "weak", "cml")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type[torch.nn.Module]
    tasks: tuple[str, ...]
    paper: str
    # {"model": {...constructor kwargs...},
    #  "train": {"lr", "batch_size", "epochs", "optimizer", "lr_step", "lr_gamma", ...}}
    default_config: dict[str, Any] = field(default_factory=dict)
    # Named sets of defaults layered over default_config ({"model": {...}, "train": {...}} overrides). "paper" (what
    # the paper's text says) is default_config itself; "released" is what the authors' public code does.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The paper's published test numbers: {"supervised": 72.7, "weak": ..., "cml-a2v": ..., "cml-v2a": ...} in %, and
    # how the paper picked its epoch ("val", "test" or "unknown") under "selection".
    published: dict[str, Any] = field(default_factory=dict)

    def preset_names(self) -> tuple[str, ...]:
        return ("paper", *sorted(k for k in self.presets if k != "paper"))


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, tasks: tuple[str, ...], paper: str, default_config: dict[str, Any],
             presets: dict[str, dict[str, Any]] | None = None, published: dict[str, Any] | None = None) -> Callable:
    """Class decorator adding a model to the registry (``presets``: see :attr:`ModelSpec.presets`)."""

    def wrap(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"model {name!r}: unknown tasks {sorted(unknown)}")
        _REGISTRY[name] = ModelSpec(name, cls, tuple(tasks), paper, default_config, dict(presets or {}),
                                    dict(published or {}))
        return cls

    return wrap


def get_spec(name: str) -> ModelSpec:
    """The registered model ``name``; :class:`~avepipe.errors.UsageError` (naming the known ones) for another name."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, task: str, model_config: dict[str, Any] | None = None) -> torch.nn.Module:
    spec = get_spec(name)
    if task not in spec.tasks:
        raise ValueError(f"model {name!r} does not support task {task!r} (supports: {', '.join(spec.tasks)})")
    config = dict(spec.default_config.get("model", {}))
    config.update(model_config or {})
    return spec.cls(task=task, **config)


def preset_overrides(name: str, preset: str, task: str | None = None) -> dict[str, Any]:
    """The ``{"model": ..., "train": ...}`` overrides of ``preset`` for model ``name`` and ``task`` ({} for "paper").

    A preset may hold per-task overrides under ``"tasks": {task: {"model": ..., "train": ...}}``, applied after its
    common ones. Any other preset name raises :class:`~avepipe.errors.UsageError` naming the model's presets."""
    spec = get_spec(name)
    if preset == "paper" and "paper" not in spec.presets:
        return {}
    if preset not in spec.presets:
        raise UsageError(f"model {name!r} has no preset {preset!r} (presets: {', '.join(spec.preset_names())})")
    entry = spec.presets[preset]
    out: dict[str, Any] = {part: dict(entry.get(part, {})) for part in ("model", "train")}
    for part, values in entry.get("tasks", {}).get(task, {}).items():
        out.setdefault(part, {}).update(values)
    return out


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
