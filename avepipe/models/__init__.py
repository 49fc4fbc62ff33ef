"""Localization models; importing this package registers every model with the registry."""

import importlib
import importlib.util

from avepipe.models import avel, avsdn  # noqa: F401  (imported for registration)
from avepipe.models.registry import build_model, get_spec, model_names, parameter_count

# dam.py is written separately; register it only once it exists so the other models work without it.
if importlib.util.find_spec("avepipe.models.dam") is not None:
    importlib.import_module("avepipe.models.dam")

__all__ = ["build_model", "get_spec", "model_names", "parameter_count"]
