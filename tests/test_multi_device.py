"""Scale-out: shards in separate processes + ``cache merge``, and ``extract --devices``, against the single-process
``real_cache``; the array-job examples in docs/ (Kubernetes Indexed Job, SLURM array) against the --shard contract."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from avepipe.cache import FeatureCache
from avepipe.extract import ExtractConfig, UsageError
from avepipe.multi_device import DeviceResult, MultiDeviceReport, check_devices, parse_devices, run_device_processes
from tests.conftest import REAL_CACHE_VIDEOS
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock time of the extraction: the only per-video attribute that may differ between two runs on the same inputs.
TIMING_ATTRS = {"extracted_at"}


def documented_shard(video_id: str, n: int) -> int:
    """docs/scale-out.md: the first 8 bytes of sha1(id), big-endian, modulo N (computed here independently)."""
    return int(hashlib.sha1(video_id.encode()).hexdigest()[:16], 16) % n


def assert_same_videos(actual: FeatureCache, expected: FeatureCache, ids: list[str]) -> None:
    assert actual.spec == expected.spec
    for vid in ids:
        a, e = actual.get(vid), expected.get(vid)
        np.testing.assert_array_equal(a.visual, e.visual, err_msg=vid)  # bit for bit
        np.testing.assert_array_equal(a.audio, e.audio, err_msg=vid)
        assert a.visual.dtype == e.visual.dtype == np.float32 and a.audio.dtype == np.float32
        assert set(a.attrs) == set(e.attrs), vid
        differing = {k for k in a.attrs if k not in TIMING_ATTRS and a.attrs[k] != e.attrs[k]}
        assert not differing, {k: (a.attrs[k], e.attrs[k]) for k in differing}


def test_three_shard_processes_merge_to_the_single_process_cache(real_cache, media_dir, vgg19_weights, vggish_file,
                                                                 tmp_path):
    reference, result = real_cache
    assert result.returncode == 0, result.stderr
    videos = [media_dir / name for name in REAL_CACHE_VIDEOS]
    shards = [tmp_path / f"shard-{k}.h5" for k in range(3)]

    def extract_shard(k: int):
        return run_cli("extract", *videos, "--cache", shards[k], "--shard", f"{k}/3", "--workers", "0",
                       "--vgg19-weights", vgg19_weights, "--vggish-weights", vggish_file, "--device", "cpu")

    with ThreadPoolExecutor(3) as pool:  # three separate processes at once, like three array tasks
        runs = list(pool.map(extract_shard, range(3)))
    for k, run in enumerate(runs):
        assert run.returncode == 0, (k, run.stderr)
    expected = FeatureCache(reference)
    ids = expected.ids()
    assert ids == sorted(Path(name).stem for name in REAL_CACHE_VIDEOS)
    per_shard = [FeatureCache(path).ids() for path in shards]
    for vid in ids:  # every video in exactly one shard: the one its id hashes to
        assert [k for k in range(3) if vid in per_shard[k]] == [documented_shard(vid, 3)], (vid, per_shard)
    assert sorted(sum(per_shard, [])) == ids
    # (With these ids shard 2 is empty: merging an empty shard cache is covered too.)
    assert [FeatureCache(path).shard for path in shards] == [(0, 3), (1, 3), (2, 3)]  # what merge checks

    merged = tmp_path / "merged.h5"
    partial = run_cli("cache", "merge", shards[0], shards[2], "--out", merged)  # a shard cache missing: refused
    assert partial.returncode == 2 and "shard 1 of 3 missing" in partial.stderr and not merged.exists()
    joined = run_cli("cache", "merge", *shards, "--out", merged)
    assert joined.returncode == 0, joined.stderr
    assert "5 videos" in joined.stdout
    merged_cache = FeatureCache(merged)
    assert merged_cache.ids() == ids and merged_cache.failures() == {}
    assert_same_videos(merged_cache, expected, ids)


def test_devices_cpu_cpu_equals_the_single_process_cache(real_cache, media_dir, vgg19_weights, vggish_file, tmp_path):
    reference, _ = real_cache
    expected = FeatureCache(reference)
    target = tmp_path / "out" / "f.h5"
    target.parent.mkdir()
    # A killed earlier run with three devices left a shard cache holding fire2: it must be kept, not extracted again.
    with FeatureCache(target.with_name("f.h5.shard-2-of-3.h5"), "a") as leftover:
        leftover.ensure_spec(expected.spec)
        entry = expected.get("fire2")
        leftover.put("fire2", entry.visual, entry.audio, entry.attrs)
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    names = ["sample_1s", "big_buck_bunny_432_433"]  # 1 s each: one per device (shards 0 and 1 of 2)
    assert sorted(documented_shard(n, 2) for n in names) == [0, 1]
    inputs = [media_dir / "sample_1s.mp4", media_dir / "big_buck_bunny_432_433.webm", media_dir / "fire2.mp4", bad]
    args = ["extract", *inputs, "--cache", target, "--devices", "cpu,cpu", "--workers", "1",
            "--vgg19-weights", vgg19_weights, "--vggish-weights", vggish_file]
    run = run_cli(*args)
    assert run.returncode == 1, run.stderr  # the bad file failed; the rest is done
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("failed:") and "notes.mp4" in ln]
    assert "Traceback" not in run.stderr + run.stdout
    assert "1 video already in the cache" in run.stdout
    assert "per device" in run.stdout and "0/2" in run.stdout and "1/2" in run.stdout
    cache = FeatureCache(target)
    assert cache.ids() == sorted(names + ["fire2"])
    assert set(cache.failures()) == {"notes"}
    assert_same_videos(cache, expected, cache.ids())
    assert cache.attrs("fire2")["extracted_at"] == expected.attrs("fire2")["extracted_at"]  # folded, not redone
    assert not [p.name for p in target.parent.iterdir() if ".shard-" in p.name]  # shard caches are gone

    again = run_cli(*args)  # resumable: nothing left to extract, the recorded failure is not retried
    assert again.returncode == 1 and "3 videos already in the cache" in again.stdout
    assert "failed earlier notes" in again.stderr
    assert FeatureCache(target).ids() == cache.ids()


def test_devices_usage_errors(tmp_path):
    video = tmp_path / "clip.mp4"  # never opened: the options are refused first
    for extra in (["--device", "cpu"], ["--shard", "0/2"]):
        run = run_cli("extract", video, "--cache", tmp_path / "f.h5", "--devices", "cpu,cpu", *extra)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2 and len(lines) == 1, (extra, run.stderr)
        assert "without --device and --shard" in lines[0]
    assert not (tmp_path / "f.h5").exists()
    for text, words in (("cpu,,cpu", "comma-separated"), ("auto,auto", "name each device"), ("cpu,gpu0", "gpu0")):
        with pytest.raises(UsageError, match=words):
            check_devices(parse_devices(text), ExtractConfig())
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            check_devices(parse_devices("cpu,cuda:1"), ExtractConfig())


def test_a_device_process_that_fails_is_reported(tmp_path):
    # Past check_devices (which would refuse it), a process given a CUDA device the machine does not have (cuda:0
    # without CUDA, cuda:N with N GPUs) fails as it starts: runs (never skipped) with and without CUDA.
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    report = MultiDeviceReport(devices=[DeviceResult(missing, 0, 1, videos=1)])
    shard = str(tmp_path / "f.h5.shard-0-of-1.h5")
    job = (0, [str(tmp_path / "clip.mp4")], shard, ExtractConfig(device=missing), None)
    refused = run_device_processes([job], report, lambda event, fields: None)
    assert refused == []  # not a usage error: a device failure
    assert report.devices[0].error and "(at " in report.devices[0].error
    assert report.exit_code == 1 and report.done == [] and report.failed == {}


# -- the array-job examples: plain text checks (no YAML parser needed) -----------------------------------------------

def _shard_arguments(text: str) -> list[tuple[str, str]]:
    """(index expression, N) of every ``--shard X/N`` in a script."""
    return re.findall(r'--shard\s+"?(\$\{?\w+\}?)/(\d+)"?', text)


def test_kubernetes_indexed_job_runs_shard_index_of_completions():
    text = (ROOT / "docs/k8s/extract-job.yaml").read_text()
    assert re.search(r"^\s+completionMode:\s*Indexed\s*(#.*)?$", text, re.M)
    completions = int(re.search(r"^\s+completions:\s*(\d+)\s*(#.*)?$", text, re.M).group(1))
    parallelism = int(re.search(r"^\s+parallelism:\s*(\d+)\s*(#.*)?$", text, re.M).group(1))
    assert 1 <= parallelism <= completions
    assert "avepipe extract" in text and "nvidia.com/gpu" in text and "persistentVolumeClaim" in text
    shard_args = _shard_arguments(text)
    assert shard_args == [("${JOB_COMPLETION_INDEX}", str(completions))], shard_args
    # Each index writes its own cache (the index is in the --cache path), which the merge Job joins.
    cache_arg = re.search(r"--cache\s+(\S+)", text).group(1).strip('"')
    assert "${JOB_COMPLETION_INDEX}" in cache_arg
    merge = (ROOT / "docs/k8s/merge-job.yaml").read_text()
    assert "avepipe cache merge" in merge
    shard_dir = cache_arg.rsplit("/", 1)[0]
    assert shard_dir in merge


def test_slurm_array_runs_task_id_of_array_size():
    text = (ROOT / "docs/slurm/extract-array.sh").read_text()
    first, last = map(int, re.search(r"^#SBATCH\s+--array=(\d+)-(\d+)", text, re.M).groups())
    assert first == 0
    shard_args = _shard_arguments(text)
    assert shard_args == [("${SLURM_ARRAY_TASK_ID}", str(last + 1))], shard_args
    cache_arg = re.search(r"--cache\s+(\S+)", text).group(1).strip('"')
    assert "${SLURM_ARRAY_TASK_ID}" in cache_arg
    # submit.sh submits the array, then merge.sh once every task has succeeded (tests/test_deploy.py runs them).
    submit = (ROOT / "docs/slurm/submit.sh").read_text()
    assert "extract-array.sh" in submit and "--dependency=" in submit and "afterok:" in submit
    assert "cache merge" in (ROOT / "docs/slurm/merge.sh").read_text()
