"""Shared fixtures: real assets under ../shared are found through environment variables.

Without the variable a test that needs the asset is skipped, except in CI (``CI`` set), where a missing
asset is a failure: CI must never silently skip the real-asset checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _asset_dir(var: str) -> Path:
    value = os.environ.get(var)
    if value and Path(value).is_dir():
        return Path(value).resolve()
    message = f"{var} is not set or not a directory ({value!r}); real-asset test needs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return _asset_dir("AVEPIPE_WEIGHTS_DIR")


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return _asset_dir("AVEPIPE_TEST_MEDIA")


@pytest.fixture(scope="session")
def ave_dir() -> Path:
    return _asset_dir("AVEPIPE_AVE_DIR")


@pytest.fixture(scope="session")
def vgg19_weights(weights_dir: Path) -> Path:
    path = weights_dir / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    if not path.is_file():
        pytest.fail(f"missing real VGG-19 weights: {path}")
    return path
