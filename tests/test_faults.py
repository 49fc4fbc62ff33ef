"""Kill -9 at every write point (issue 25): a real subprocess SIGKILLs itself where ``AVEPIPE_FAULT=<point>[:n]`` says
(:mod:`avepipe.faults`: the n-th time it reaches that point), then the same command runs again and must give exactly
what one uninterrupted run gives: the same ids, the same arrays bit for bit, the same attributes (times aside), the
same failures, and no temporary or hidden file left.

Points: ``stage-entry`` (a staged entry written, not yet renamed), ``partial-chunk`` (a long video's chunk written, not
yet renamed), ``compact`` (a compacted store written, not yet renamed over the old one), ``compact-cleared`` (renamed,
its staged entries not yet removed), ``decoded-second`` (a decoded store's entry half filled), ``merge-put`` (a merge
half copied), ``merge-rename`` (the merged output complete under its hidden name), ``write-index`` (a store's
entries written, its index not yet: compaction and merge), ``upgrade`` (``cache upgrade``: the format_version 2 copy
complete, not yet renamed over the format_version 1 store). The checkpoint of ``train`` is not
covered here (avepipe/train.py writes it; tests/test_train_resume.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import make_clip

DRIVER = r"""
import sys
from pathlib import Path
from avepipe.settings import ExtractConfig
command, out, *paths = sys.argv[1:]
paths = [Path(p) for p in paths]
if command == "extract":
    import numpy as np
    import torch
    from avepipe.backbones.extractor import Backbones, HostResult
    from avepipe.extract import run_extract

    # The store's write points are the subject here, not the backbones: cheap stand-ins for VGG-19 and VGGish that
    # still depend on every frame and example (a mixed-up or half-written entry shows in the arrays), at a small
    # fraction of VGG-19's CPU time (the real backbones' features are checked in tests/backbones and test_extract).
    def visual_async(self, frames):
        x = frames.float().mean(dim=1).permute(0, 3, 1, 2)  # [k, 3, 224, 224]: the mean of each second's frames
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 7).permute(0, 2, 3, 1)  # [k, 7, 7, 3]
        return HostResult(pooled.repeat(1, 1, 1, 171)[..., :512].contiguous())

    def audio_async(self, examples):
        flat = torch.from_numpy(np.ascontiguousarray(examples, dtype=np.float32)).reshape(len(examples), -1)
        return HostResult(flat[:, :128].contiguous())

    Backbones.visual_async, Backbones.audio_async = visual_async, audio_async
    config = ExtractConfig(vgg19_weights="random", vggish_weights="random", device="cpu", workers=0, batch_size=16,
                           checkpoint_seconds=2)
    report = run_extract(paths, out, config)
elif command == "decode":
    from avepipe.decoded import run_decode
    report = run_decode(paths, out, ExtractConfig(workers=0))
elif command == "merge":
    from avepipe.cache import merge
    merge(paths, out)
    sys.exit(0)
elif command == "upgrade":
    from avepipe.cache import upgrade
    from avepipe.decoded import DecodedStore
    upgrade(out, kinds=[DecodedStore])
    sys.exit(0)
sys.exit(report.exit_code)
"""

TIMES = {"extracted_at", "decoded_at", "failed_at"}


def _run(command: str, out: Path, inputs: list[Path], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AVEPIPE_FAULT"}
    if fault:
        env["AVEPIPE_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", DRIVER, command, str(out), *map(str, inputs)], capture_output=True,
                          text=True, env=env, timeout=600)


def _snapshot(path: Path) -> dict:
    """Everything a reader sees in a store (main file + staged entries), times aside."""
    from avepipe.cache import FeatureCache, file_format
    from avepipe.decoded import DecodedStore

    store = (DecodedStore if file_format(path) == DecodedStore.FORMAT else FeatureCache)(path)
    seen = {"spec": store.spec, "failures": {vid: {k: v for k, v in r.items() if k not in TIMES}
                                             for vid, r in store.failures().items()}}
    for vid in store.ids():
        if isinstance(store, DecodedStore):
            f, group = store.read(vid)
            with f:
                arrays = {name: group[name][()].tobytes() for name in ("frames", "examples")}
                attrs = {k: v for k, v in store.attrs(vid).items() if k not in TIMES}
        else:
            entry = store.get(vid)
            arrays = {"visual": entry.visual.tobytes(), "audio": entry.audio.tobytes()}
            attrs = {k: v for k, v in entry.attrs.items() if k not in TIMES}
        seen[vid] = (arrays, attrs)
    return seen


def _leftovers(folder: Path) -> list[str]:
    """Temporaries, half entries and hidden outputs anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith(".") or p.name.endswith(".partial") or ".tmp" in p.name)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, media_dir):
    folder = tmp_path_factory.mktemp("fault-clips")
    long = make_clip(folder / "long.mp4", 4.0, size="64x48", fps=16)  # 4 s: a partial chunk at second 2
    short = make_clip(folder / "short.mp4", 1.0, size="64x48", fps=16, freq=660)
    bad = folder / "bad.mp4"
    bad.write_bytes(b"not a video")  # a recorded failure, which must survive every kill too
    return [long, short, bad]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from avepipe.cache import FeatureCache

    folder = tmp_path_factory.mktemp("fault-shards")
    rng = np.random.default_rng(3)
    paths = []
    for name, ids in (("a.h5", ["a0", "a1", "a2"]), ("b.h5", ["b0", "b1", "b2"])):
        with FeatureCache(folder / name, "a") as cache:
            cache.ensure_spec({"spec_version": 1, "sampling": "ave"})
            for vid in ids:
                cache.put(vid, rng.random((2, 7, 7, 512), np.float32), rng.random((2, 128), np.float32),
                          {"seconds": 2})
            cache.put_failure(f"{name[0]}-bad", "/nowhere.mp4", "missing file")
        paths.append(folder / name)
    return paths


MATRIX = [
    ("extract", "partial-chunk:1"),
    ("extract", "stage-entry:1"),
    ("extract", "stage-entry:2"),
    ("extract", "compact:1"),
    ("extract", "compact:2"),
    ("extract", "compact-cleared:1"),
    ("extract", "write-index:2"),
    ("decode", "decoded-second:3"),
    ("decode", "stage-entry:1"),
    ("decode", "compact:2"),
    ("decode", "compact-cleared:1"),
    ("merge", "merge-put:2"),
    ("merge", "merge-rename:1"),
    ("merge", "write-index:1"),
]


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory, clips, shards):
    folder = tmp_path_factory.mktemp("fault-clean")
    out = {}
    for command in ("extract", "decode", "merge"):
        target = folder / f"{command}.h5"
        result = _run(command, target, shards if command == "merge" else clips)
        assert result.returncode in (0, 1), result.stderr[-2000:]
        out[command] = (_snapshot(target), result.returncode)
    return out


@pytest.mark.parametrize(("command", "fault"), MATRIX)
def test_a_kill_at_each_write_point_then_a_rerun_gives_the_clean_result(tmp_path, clips, shards, clean_runs, command,
                                                                        fault):
    inputs = shards if command == "merge" else clips
    target = tmp_path / "out.h5"
    killed = _run(command, target, inputs, fault)
    assert killed.returncode == -9, f"{fault} was not reached: {killed.returncode} {killed.stderr[-1500:]}"
    if command == "merge":
        assert not target.exists()  # no output that looks complete
    rerun = _run(command, target, inputs)
    want, code = clean_runs[command]
    assert rerun.returncode == code, rerun.stderr[-2000:]
    assert _snapshot(target) == want
    assert _leftovers(tmp_path) == []
    with h5py.File(target, "r"):
        pass


@pytest.mark.parametrize("fault", ["write-index:1", "upgrade:1"])
def test_a_kill_during_an_upgrade_leaves_the_v1_store_and_the_next_writer_migrates_it(tmp_path, fault):
    from avepipe.cache import FeatureCache
    from tests.test_cache import write_v1

    target = tmp_path / "f.h5"
    write_v1(target)
    before = _snapshot(target)
    killed = _run("upgrade", target, [], fault)
    assert killed.returncode == -9, f"{fault} was not reached: {killed.returncode} {killed.stderr[-1500:]}"
    assert _snapshot(target) == before  # the previous complete version, untouched
    with h5py.File(target, "r") as f:
        assert f.attrs["format_version"] == 1 and "index" not in f
    assert _leftovers(tmp_path)  # the killed writer's temporary, never read
    rerun = _run("upgrade", target, [])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _snapshot(target) == before and FeatureCache(target).format_version == 2
    assert _leftovers(tmp_path) == []
