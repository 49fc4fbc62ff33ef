"""Shared fixtures: real assets under ../shared are found through environment variables.

Without the variable a test that needs the asset is skipped, except in CI (``CI`` set), where a missing
asset is a failure: CI must never silently skip the real-asset checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``-n N``), each worker's torch takes its share of the cores instead of all of them (N
    workers each running all-core matmuls would thrash); subprocesses the tests start get the same share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        import torch

        torch.set_num_threads(share)


def _skipped(session) -> list:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


def pytest_sessionfinish(session, exitstatus):
    """In CI (``CI`` set) a skipped test fails the run: CI must run every test, or say why it cannot."""
    if os.environ.get("CI") and exitstatus == pytest.ExitCode.OK and _skipped(session):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get("CI") and skipped:
        terminalreporter.write_line(f"CI: {len(skipped)} test(s) skipped, and CI fails on any skip (-rs lists the "
                                    "reasons)", red=True, bold=True)


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


@pytest.fixture(scope="session")
def vggish_file(tmp_path_factory) -> Path:
    """VGGish weights in the real torchvggish format, made here (the real file cannot be had on these machines)."""
    import torch

    from avepipe.backbones.vggish import make_vggish_state_dict

    path = tmp_path_factory.mktemp("weights") / "my-vggish.pth"
    torch.save(make_vggish_state_dict(seed=1), path)
    return path


@pytest.fixture()
def weights_args(vgg19_weights, vggish_file) -> list[str]:
    return ["--vgg19-weights", str(vgg19_weights), "--vggish-weights", str(vggish_file), "--device", "cpu"]


REAL_CACHE_VIDEOS = ("sample_1s.mp4", "fire2.mp4", "chaplin.mp4", "big_buck_bunny_432_433.webm", "bbb_5s_6ch.mp4")


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory, media_dir, vgg19_weights, vggish_file):
    """Features of five short real videos (1, 2, 9, 1 and 5 s), extracted once per test session through the CLI."""
    from tests.helpers import run_cli

    cache = tmp_path_factory.mktemp("real") / "real.h5"
    result = run_cli("extract", *[media_dir / name for name in REAL_CACHE_VIDEOS], "--cache", cache, "--workers", "2",
                     "--vgg19-weights", vgg19_weights, "--vggish-weights", vggish_file, "--device", "cpu")
    return cache, result


@pytest.fixture()
def serve():
    """``serve(files)`` starts a :class:`tests.helpers.FileServer` (name -> bytes); all are closed after the test."""
    from tests.helpers import FileServer

    servers = []

    def start(files: dict[str, bytes]) -> FileServer:
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
