"""Localization models; importing this package registers every model with the registry."""

from avepipe.models import avel, avsdn, dam, diia, dmin, m2n  # noqa: F401  (imported for registration)
from avepipe.models.registry import build_model, get_spec, model_names, parameter_count

__all__ = ["build_model", "get_spec", "model_names", "parameter_count"]
