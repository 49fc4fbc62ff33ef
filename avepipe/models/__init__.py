"""Localization models; importing this package registers every model with the registry."""

from avepipe.models import avel, avsdn, cmbs, dam, diia, dmin, m2n, psp  # noqa: F401  (imported for registration)
from avepipe.models.registry import build_model, get_spec, model_names, parameter_count

__all__ = ["build_model", "get_spec", "model_names", "parameter_count"]
