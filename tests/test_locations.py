"""The per-user cache folder for weights and datasets (avepipe.locations) and its environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from avepipe import locations
from avepipe.backbones import weights
from tests.helpers import run_cli

VARIABLES = ("AVEPIPE_HOME", "XDG_CACHE_HOME", "AVEPIPE_WEIGHTS_DIR", "AVEPIPE_DATA_DIR")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fake home folder and none of the variables set."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    return tmp_path / "me"


def test_default_is_the_cache_folder_in_home(home):
    assert locations.cache_home() == home / ".cache" / "avepipe"
    assert locations.weights_dir() == home / ".cache" / "avepipe" / "weights"
    assert locations.dataset_dir() == home / ".cache" / "avepipe" / "datasets" / "ave"
    assert weights.weights_dir() == locations.weights_dir()  # the backbones use the same folder


def test_xdg_cache_home_is_respected(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert locations.cache_home() == tmp_path / "xdg" / "avepipe"
    assert locations.dataset_dir() == tmp_path / "xdg" / "avepipe" / "datasets" / "ave"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG spec: ignored
    assert locations.cache_home() == home / ".cache" / "avepipe"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset
    assert locations.cache_home() == home / ".cache" / "avepipe"


def test_avepipe_home_wins_over_xdg(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("AVEPIPE_HOME", str(tmp_path / "ah"))
    assert locations.cache_home() == tmp_path / "ah"
    assert locations.weights_dir() == tmp_path / "ah" / "weights"
    assert locations.dataset_dir() == tmp_path / "ah" / "datasets" / "ave"
    monkeypatch.setenv("AVEPIPE_HOME", "~/elsewhere")
    assert locations.cache_home() == home / "elsewhere"


def test_weights_and_data_variables_override_each_folder(home, tmp_path, monkeypatch):
    monkeypatch.setenv("AVEPIPE_HOME", str(tmp_path / "ah"))
    monkeypatch.setenv("AVEPIPE_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("AVEPIPE_DATA_DIR", str(tmp_path / "d"))
    assert locations.weights_dir() == tmp_path / "w"
    assert weights.weights_dir() == tmp_path / "w"
    assert locations.dataset_dir() == tmp_path / "d"
    assert locations.cache_home() == tmp_path / "ah"  # the others are unaffected


def test_the_command_line_uses_the_default_folders(home):
    listing = run_cli("weights", "list")
    assert listing.returncode == 0, listing.stderr
    assert str(home / ".cache" / "avepipe" / "weights") in listing.stdout
    training = run_cli("train", "--model", "avel", "--out", home / "run")
    assert training.returncode == 2
    assert f"dataset {home / '.cache' / 'avepipe' / 'datasets' / 'ave'}: no features.h5 and no Annotations.txt" \
        in training.stderr
    assert not (home / ".cache").exists()  # reading the defaults creates nothing
