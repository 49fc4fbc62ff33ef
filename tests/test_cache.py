import fcntl
import json
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager

import h5py
import numpy as np
import pytest

from avepipe.cache import FeatureCache, merge
from avepipe.errors import CacheError, CacheLockedError, SpecMismatchError
from tests.helpers import run_cli

SPEC = {"spec_version": 1, "sampling": "ave", "audio": "vggish/fc2-relu"}


def features(seed: int, seconds: int = 3):
    rng = np.random.default_rng(seed)
    return rng.random((seconds, 7, 7, 512), dtype=np.float32), rng.random((seconds, 128), dtype=np.float32)


def fill(path, ids, spec=SPEC):
    with FeatureCache(path, "a") as cache:
        cache.ensure_spec(spec)
        for i, vid in enumerate(ids):
            visual, audio = features(i)
            cache.put(vid, visual, audio, {"seconds": 3, "source_path": f"/videos/{vid}.mp4"})


def test_roundtrip_and_layout(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, ["b", "a"])
    reader = FeatureCache(path)
    assert reader.ids() == ["a", "b"] and reader.spec == SPEC
    entry = reader.get("b")
    visual, audio = features(0)
    np.testing.assert_array_equal(entry.visual, visual)
    np.testing.assert_array_equal(entry.audio, audio)
    assert entry.attrs["seconds"] == 3
    with h5py.File(path, "r") as f:  # the documented layout, readable without avepipe
        assert f["videos/a/visual"].shape == (3, 7, 7, 512) and f["videos/a/audio"].dtype == np.float32
        assert json.loads(f.attrs["feature_spec"]) == SPEC
    assert not (tmp_path / "f.h5.staging").exists()  # compacted on close, then the empty folder removed


def test_staged_entries_are_visible_before_compaction(tmp_path):
    path = tmp_path / "f.h5"
    cache = FeatureCache(path, "a")
    cache.ensure_spec(SPEC)
    cache.put("x", *features(1), {"seconds": 3})
    assert FeatureCache(path).ids() == ["x"]  # a reader sees it while the writer is still running
    cache.close()
    assert FeatureCache(path).ids() == ["x"]


def test_second_writer_gets_a_clear_error(tmp_path):
    path = tmp_path / "f.h5"
    first = FeatureCache(path, "a")
    try:
        with pytest.raises(CacheLockedError, match="another avepipe process"):
            FeatureCache(path, "a")
        code = "from avepipe.cache import FeatureCache; FeatureCache(%r, 'a')" % str(path)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "is writing this cache" in proc.stderr
    finally:
        first.close()
    FeatureCache(path, "a").close()  # free again


def test_mixed_specs_are_refused(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, ["a"])
    with FeatureCache(path, "a") as cache:
        with pytest.raises(SpecMismatchError, match="sampling"):
            cache.ensure_spec({**SPEC, "sampling": "fps"})


def test_failures_recorded_and_cleared_by_success(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureCache(path, "a") as cache:
        cache.ensure_spec(SPEC)
        cache.put_failure("bad", "/v/bad.mp4", "/v/bad.mp4: not a media file")
        cache.put_failure("later_ok", "/v/later_ok.mp4", "boom")
    assert set(FeatureCache(path).failures()) == {"bad", "later_ok"}
    with FeatureCache(path, "a") as cache:
        cache.put("later_ok", *features(2), {"seconds": 3})
    reader = FeatureCache(path)
    assert set(reader.failures()) == {"bad"} and reader.ids() == ["later_ok"]
    with h5py.File(path, "r") as f:
        assert f["failed/bad"].attrs["error"] == "/v/bad.mp4: not a media file"


def test_leftovers_of_a_killed_writer_are_ignored(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, ["a"])
    staging = tmp_path / "f.h5.staging"
    staging.mkdir(exist_ok=True)  # a killed writer leaves its staging folder (a clean one removes it)
    (staging / ".b.tmp999").write_bytes(b"half an entry")  # killed mid-write
    (tmp_path / ".f.h5.compact-999").write_bytes(b"half a compaction")
    assert FeatureCache(path).ids() == ["a"]
    with FeatureCache(path, "a") as cache:
        assert cache.ids() == ["a"]
        assert not (staging / ".b.tmp999").exists()  # removed as the writer opens, not only at compaction
    assert not (staging / ".b.tmp999").exists() and not (tmp_path / ".f.h5.compact-999").exists()


def test_a_put_killed_mid_write_leaves_no_entry(tmp_path, monkeypatch):
    """A writer that dies inside put (here: an error while writing the audio) never leaves a visible half entry."""
    path = tmp_path / "f.h5"
    fill(path, ["a"])
    real = h5py.Group.create_dataset

    def dies_on_audio(self, name, *args, **kwargs):
        if name == "audio":
            raise KeyboardInterrupt("killed mid-write")
        return real(self, name, *args, **kwargs)

    cache = FeatureCache(path, "a")
    monkeypatch.setattr(h5py.Group, "create_dataset", dies_on_audio)
    with pytest.raises(KeyboardInterrupt):
        cache.put("b", *features(1), {"seconds": 3})
    monkeypatch.undo()
    assert cache.ids() == ["a"]
    cache.close()
    with FeatureCache(path, "a") as again:  # the next writer finds only complete entries, and no leftovers
        assert again.ids() == ["a"]
    assert [p.name for p in (tmp_path / "f.h5.staging").glob("*")] == []


def test_merge_equals_single_cache_and_refuses_mixed_specs(tmp_path):
    fill(tmp_path / "all.h5", ["a", "b", "c"])
    with FeatureCache(tmp_path / "s1.h5", "a") as s1, FeatureCache(tmp_path / "s2.h5", "a") as s2:
        s1.ensure_spec(SPEC)
        s2.ensure_spec(SPEC)
        for i, vid in enumerate(["a", "b", "c"]):
            (s1 if vid != "b" else s2).put(vid, *features(i), {"seconds": 3, "source_path": f"/videos/{vid}.mp4"})
    assert merge([tmp_path / "s1.h5", tmp_path / "s2.h5"], tmp_path / "m.h5") == 3
    whole, merged = FeatureCache(tmp_path / "all.h5"), FeatureCache(tmp_path / "m.h5")
    assert merged.ids() == whole.ids() and merged.spec == whole.spec
    for vid in whole.ids():
        np.testing.assert_array_equal(merged.get(vid).visual, whole.get(vid).visual)
    fill(tmp_path / "other.h5", ["d"], spec={**SPEC, "sampling": "fps"})
    with pytest.raises(SpecMismatchError):
        merge([tmp_path / "all.h5", tmp_path / "other.h5"], tmp_path / "mixed.h5")
    assert not (tmp_path / "mixed.h5").exists()
    with pytest.raises(CacheError, match="already exists"):
        merge([tmp_path / "s1.h5"], tmp_path / "m.h5")


def test_merge_refuses_conflicting_duplicates(tmp_path):
    fill(tmp_path / "a.h5", ["x"])
    with FeatureCache(tmp_path / "b.h5", "a") as cache:
        cache.ensure_spec(SPEC)
        cache.put("x", *features(7), {"seconds": 3})
    with pytest.raises(CacheError, match="'x' is in both"):
        merge([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5")


def test_not_a_cache(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("hello")
    with pytest.raises(CacheError, match="cannot open as HDF5"):
        FeatureCache(bogus)
    with pytest.raises(CacheError, match="no such cache"):
        FeatureCache(tmp_path / "missing.h5")


# -- shard caches: recorded by extract --shard K/N, checked by merge ---------------------------------------------------

def shard_ids(n: int, per_shard: int = 2) -> dict[int, list[str]]:
    """Video ids grouped by the shard they hash to (``avepipe.inputs.shard_of``), ``per_shard`` of each."""
    from avepipe.inputs import shard_of

    groups: dict[int, list[str]] = {k: [] for k in range(n)}
    i = 0
    while any(len(ids) < per_shard for ids in groups.values()):
        vid = f"v{i}"
        if len(groups[shard_of(vid, n)]) < per_shard:
            groups[shard_of(vid, n)].append(vid)
        i += 1
    return groups


def fill_shard(path, k: int, n: int, ids, spec=SPEC):
    with FeatureCache(path, "a") as cache:
        cache.ensure_spec(spec)
        cache.ensure_shard((k, n))
        for vid in ids:
            cache.put(vid, *features(int(vid[1:])), {"seconds": 3})
    return path


def test_a_shard_cache_records_its_shard_and_refuses_other_runs(tmp_path):
    groups = shard_ids(3)
    path = fill_shard(tmp_path / "s1.h5", 1, 3, groups[1])
    with h5py.File(path, "r") as f:
        assert f.attrs["shard"] == "1/3"  # the documented root attribute
    with FeatureCache(path, "a") as cache:  # compaction keeps it
        cache.put("extra", *features(9), {"seconds": 3})
    assert FeatureCache(path).shard == (1, 3)
    with FeatureCache(path, "a") as cache:
        cache.ensure_shard((1, 3))  # the same shard again (a resumed run): fine
        with pytest.raises(CacheError, match=r"holds shard 1/3 .*not --shard 2/3; use another --cache"):
            cache.ensure_shard((2, 3))
        with pytest.raises(CacheError, match="not a run without --shard"):
            cache.ensure_shard(None)
    # A cache written before shards were recorded: recorded when its videos are all of that shard, else refused.
    old = tmp_path / "old.h5"
    fill(old, groups[2])
    assert FeatureCache(old).shard is None
    with FeatureCache(old, "a") as cache:
        with pytest.raises(CacheError, match=rf"videos of other shards than 0/3 \(e.g. '{groups[2][0]}', shard 2/3\)"):
            cache.ensure_shard((0, 3))
        cache.ensure_shard((2, 3))
    assert FeatureCache(old).shard == (2, 3) and FeatureCache(old).ids() == sorted(groups[2])


def test_merge_takes_shard_caches_only_as_all_shards_of_one_run(tmp_path):
    groups = shard_ids(3)
    shards = [fill_shard(tmp_path / f"s{k}.h5", k, 3, groups[k]) for k in range(3)]
    out = tmp_path / "m.h5"
    assert merge(shards, out) == 6
    assert FeatureCache(out).shard is None and FeatureCache(out).ids() == sorted(sum(groups.values(), []))

    def refused(inputs, pattern, error=CacheError, **options):
        with pytest.raises(error, match=pattern):
            merge(inputs, tmp_path / "refused.h5", **options)
        assert not (tmp_path / "refused.h5").exists()

    refused([shards[0], shards[2]], r"^shard 1 of 3 missing: 2 of the 3 shard caches of that run given")
    refused(shards[:1], r"^shards 1, 2 of 3 missing")
    again = fill_shard(tmp_path / "s0-again.h5", 0, 3, groups[0][:1])
    refused([*shards, again], r"s0-again.h5: shard 0/3 again \(.*s0.h5 is shard 0/3 too\)")
    refused([*shards, shards[1]], r"s1.h5: given twice")
    other_run = fill_shard(tmp_path / "n2.h5", 0, 2, [])
    refused([*shards, other_run], r"n2.h5: shard 0/2 of another run than .*s0.h5 \(shard 0/3\)")
    fps = fill_shard(tmp_path / "fps.h5", 1, 3, groups[1], spec={**SPEC, "sampling": "fps"})
    refused([shards[0], fps, shards[2]], "feature spec differs", SpecMismatchError)
    plain = tmp_path / "plain.h5"
    fill(plain, ["w"])
    refused([*shards, plain], r"plain.h5: not a shard cache, but .*s0.h5 is \(shard 0/3\).*--allow-unsharded")
    assert merge([*shards, plain], out, overwrite=True, allow_unsharded=True) == 7
    refused([shards[0], plain], "shards 1, 2 of 3 missing", allow_unsharded=True)  # still all shards of the run


def test_merge_refuses_a_cache_being_written(tmp_path):
    groups = shard_ids(2)
    shards = [fill_shard(tmp_path / f"s{k}.h5", k, 2, groups[k]) for k in range(2)]
    writer = FeatureCache(shards[1], "a")
    try:
        with pytest.raises(CacheLockedError, match=rf"s1.h5: another avepipe process \(pid {os.getpid()} on host "
                                                   rf"{re.escape(socket.gethostname())} since .*\) is writing this "
                                                   r"cache; merge once it has finished"):
            merge(shards, tmp_path / "m.h5")
    finally:
        writer.close()
    assert merge(shards, tmp_path / "m.h5") == 4


def test_merge_command_names_the_missing_shards(tmp_path):
    groups = shard_ids(4, per_shard=1)
    shards = [fill_shard(tmp_path / f"features-{k}.h5", k, 4, groups[k]) for k in (0, 2)]
    run = run_cli("cache", "merge", *shards, "--out", tmp_path / "m.h5")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "shards 1, 3 of 4 missing" in lines[0] and "features-0.h5" in lines[0]
    assert not (tmp_path / "m.h5").exists()


# -- the writer lock: who holds it, and when it is stale -----------------------------------------------------------

@contextmanager
def held_lock(cache_path, record):
    """Another writer's lock: ``record`` in ``F.h5.lock``, flock held through a separate open file (as a process on
    another node, or a dead process's lock that an NFS server keeps, would hold it)."""
    lock = cache_path.with_name(cache_path.name + ".lock")
    with open(lock, "w") as handle:
        handle.write(record if isinstance(record, str) else json.dumps(record))
        handle.flush()
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield lock


def locked_error(path) -> str:
    with pytest.raises(CacheLockedError) as caught:
        FeatureCache(path, "a")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_lock_file_names_its_holder(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureCache(path, "a"):
        record = json.loads((tmp_path / "f.h5.lock").read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["started_at"])
        message = locked_error(path)
        assert f"another avepipe process (pid {os.getpid()} on host {socket.gethostname()} since" in message
        assert "wait for it or use another --cache" in message
        assert "stale" not in message and "NFS" not in message  # a live holder on this host: nothing else to say


def test_a_lock_held_from_another_host_says_what_to_do_if_that_node_is_gone(tmp_path):
    path = tmp_path / "f.h5"
    record = {"host": "gpu-node-7", "pid": 4242, "started_at": "2025-01-02T03:04:05Z"}
    with held_lock(path, record) as lock:
        message = locked_error(path)
    assert "another avepipe process (pid 4242 on host gpu-node-7 since 2025-01-02T03:04:05Z)" in message
    assert f"if gpu-node-7 is down, its lock can outlive it on NFS: remove {lock} once you are sure" in message
    FeatureCache(path, "a").close()  # released: a writer gets it


def test_a_lock_whose_holder_is_not_running_on_this_host_is_stale(tmp_path):
    path = tmp_path / "f.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {"host": socket.gethostname(), "started_at": "2025-01-02T03:04:05Z"}
    with held_lock(path, {**here, "pid": dead.pid}) as lock:
        message = locked_error(path)
    assert f"locked by pid {dead.pid} on host {socket.gethostname()} since 2025-01-02T03:04:05Z (this host), " \
           "which is not running: a stale lock" in message
    assert f"remove {lock} and run again" in message
    # A live pid that is not the holder any more (the pid was reused: another start time) is not the holder either.
    from avepipe.cache import _process_start

    start = _process_start(os.getpid())
    if start is not None:  # Linux
        with held_lock(path, {**here, "pid": os.getpid(), "process_start": start + 1}):
            assert "which is not running" in locked_error(path)
        with held_lock(path, {**here, "pid": os.getpid(), "process_start": start}):
            assert "which is not running" not in locked_error(path)


def test_a_lock_file_of_an_older_version_or_without_a_record(tmp_path):
    path = tmp_path / "f.h5"
    with held_lock(path, "4242"):  # earlier versions wrote the pid alone
        assert "another avepipe process (pid 4242) is writing this cache" in locked_error(path)
    with held_lock(path, ""):
        assert "another avepipe process (a process that left no record in the lock file)" in locked_error(path)


def test_removing_a_stale_lock_file_frees_the_cache(tmp_path):
    # What the stale-lock message tells the user to do: the next writer locks a new lock file.
    path = tmp_path / "f.h5"
    with held_lock(path, {"host": "gone-node", "pid": 1}) as lock:
        lock.unlink()
        with FeatureCache(path, "a") as cache:
            cache.ensure_spec(SPEC)
            assert json.loads(lock.read_text())["pid"] == os.getpid()


# -- format_version 2 (issue 24): the index, new-style groups, v1 stores read and migrated ----------------------------

def write_v1(path, count=4, failures=("gone",)):
    """A store as avepipe wrote it before format_version 2: groups only, no index, HDF5's default (old-style) groups."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "avepipe-cache"
        f.attrs["format_version"] = 1
        f.attrs["feature_spec"] = json.dumps(SPEC, sort_keys=True)
        videos = f.create_group("videos")
        for i in range(count):
            visual, audio = features(i)
            group = videos.create_group(f"v{i}")
            group.create_dataset("visual", data=visual)
            group.create_dataset("audio", data=audio)
            group.attrs.update({"seconds": 3, "source_path": f"/videos/v{i}.mp4", "source_mtime": 1.5 + i / 3,
                                "vgg19_official": True, "precision": "fp32"})
        failed = f.create_group("failed")
        for vid in failures:
            failed.create_group(vid).attrs.update({"source_path": f"/videos/{vid}.mp4", "error": "missing file",
                                                   "failed_at": "2026-01-01T00:00:00Z"})


def contents(path):
    reader = FeatureCache(path)
    out = {"spec": reader.spec, "failures": reader.failures(), "all_attrs": reader.all_attrs()}
    for vid in reader.ids():
        entry = reader.get(vid)
        out[vid] = (entry.visual.tobytes(), entry.audio.tobytes(), entry.attrs)
    reader.close()
    return out


def test_a_v2_store_has_an_index_and_new_style_groups(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, ["b", "a", "c"])
    with FeatureCache(path, "a") as cache:
        cache.put_failure("bad", "/nowhere.mp4", "missing file")
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2
        assert f.id.get_create_plist().get_version()[0] >= 2  # the 1.10 file format: new-style groups
        assert f["index/ids"].asstr()[()].tolist() == ["a", "b", "c"]
        attrs = [json.loads(text) for text in f["index/attrs"].asstr()[()]]
        assert attrs[1] == {"seconds": 3, "source_path": "/videos/b.mp4"}
        assert f["index/failed_ids"].asstr()[()].tolist() == ["bad"]
        assert json.loads(f["index/failed_attrs"].asstr()[0])["error"] == "missing file"
        assert sorted(f["videos"]) == ["a", "b", "c"] and "bad" in f["failed"]  # the groups stay, for h5py users
    reader = FeatureCache(path)
    assert reader.ids() == ["a", "b", "c"] and "b" in reader and "zz" not in reader
    assert reader.all_attrs()["c"] == reader.attrs("c") and list(reader.failures()) == ["bad"]


def test_a_reader_keeps_the_file_open_and_sees_a_replaced_store(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, ["a"])
    reader = FeatureCache(path)
    reader.get("a")
    opened = reader._h5
    reader.get("a")
    assert reader._h5 is opened and opened.id.valid  # one open file across reads
    fill(path, ["a", "b"])  # a writer compacts: a new file renamed over the store
    assert reader.ids() == ["a", "b"] and reader.get("b").attrs["seconds"] == 3
    assert reader._h5 is not opened
    reader.close()
    assert reader._h5 is None


def test_a_v1_store_is_read_and_migrated_by_the_next_compaction(tmp_path):
    path = tmp_path / "f.h5"
    write_v1(path)
    before = contents(path)
    reader = FeatureCache(path)
    assert reader.format_version == 1 and reader.ids() == ["v0", "v1", "v2", "v3"] and "v2" in reader
    assert list(reader.failures()) == ["gone"] and reader.all_attrs()["v1"]["source_mtime"] == 1.5 + 1 / 3
    reader.close()
    with FeatureCache(path, "a") as cache:
        cache.put("new", *features(9), {"seconds": 3})
    after = contents(path)
    assert after.pop("new")[2] == {"seconds": 3}
    after["all_attrs"].pop("new")
    assert after == before
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2 and "index" in f
        assert f.id.get_create_plist().get_version()[0] >= 2


def test_cache_upgrade_migrates_a_v1_store_with_identical_contents(tmp_path):
    path = tmp_path / "f.h5"
    write_v1(path)
    before = contents(path)
    done = run_cli("cache", "upgrade", path)
    assert done.returncode == 0, done.stderr
    assert "format_version 1 -> 2 (4 videos)" in done.stdout
    assert contents(path) == before
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2 and f["index/ids"].asstr()[()].tolist() == ["v0", "v1", "v2", "v3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no lock, staging or temporary left
    again = run_cli("cache", "upgrade", path)
    assert again.returncode == 0 and "already format_version 2" in again.stdout


def test_cache_upgrade_refuses_a_cache_being_written_and_a_missing_one(tmp_path):
    path = tmp_path / "f.h5"
    write_v1(path)
    with FeatureCache(path, "a"):
        refused = run_cli("cache", "upgrade", path)
    assert refused.returncode == 2 and "another avepipe process" in refused.stderr
    assert FeatureCache(path).format_version == 1
    missing = run_cli("cache", "upgrade", tmp_path / "nothing.h5")
    assert missing.returncode == 2 and "no such cache" in missing.stderr
    assert not (tmp_path / "nothing.h5").exists()


def test_a_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, ["a"])
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="format_version 99, written by a newer avepipe"):
        FeatureCache(path)


def test_cache_ls_summarises_a_large_store(tmp_path):
    path = tmp_path / "f.h5"
    fill(path, [f"v{i:02d}" for i in range(55)])
    summary = run_cli("cache", "ls", path)
    assert summary.returncode == 0, summary.stderr
    assert "55 videos, 0 failed, 165 s of video" in summary.stdout and "v03" not in summary.stdout
    assert "--limit N" in summary.stdout
    limited = run_cli("cache", "ls", path, "--limit", "2")
    assert "v00" in limited.stdout and "v01" in limited.stdout and "v02" not in limited.stdout
    assert "first 2 videos of 55" in limited.stdout
    every = run_cli("cache", "ls", path, "--all")
    assert "v54" in every.stdout and "v00" in every.stdout
    listed = json.loads(run_cli("cache", "ls", path, "--json", "--limit", "3").stdout)
    assert listed["entries"] == 55 and listed["seconds_of_video"] == 165 and listed["format_version"] == 2
    assert [row["id"] for row in listed["rows"]] == ["v00", "v01", "v02"] and listed["rows"][0]["seconds"] == 3
    assert listed["spec"] == SPEC and listed["weights"]["vgg19"] == {"official": 0, "unofficial": 55}
    assert json.loads(run_cli("cache", "ls", path, "--json").stdout)["rows"] == []


def test_one_lookup_reads_its_attributes_from_the_index_across_blocks(tmp_path):
    from avepipe.cache import INDEX_BLOCK

    path = tmp_path / "f.h5"
    ids = [f"v{i:04d}" for i in range(2 * INDEX_BLOCK + 3)]
    with FeatureCache(path, "a") as cache:
        for i, vid in enumerate(ids):
            cache.put(vid, np.zeros((1, 1, 1, 2), np.float32), np.zeros((1, 128), np.float32),
                      {"seconds": 1, "n": i, "source_mtime": i / 7})
    for vid in (ids[0], ids[INDEX_BLOCK - 1], ids[INDEX_BLOCK], ids[-1]):
        reader = FeatureCache(path)  # a fresh reader: the lookup, not the whole index
        with h5py.File(path, "r") as f:
            want = {k: (v.item() if hasattr(v, "item") else v) for k, v in f["videos"][vid].attrs.items()}
        assert reader.get(vid).attrs == want and reader.attrs(vid) == want
        assert "attrs" not in reader._memo
        reader.close()
    reader = FeatureCache(path)
    with pytest.raises(KeyError):
        reader.get("v9999")
    assert reader._index_attrs_json("a") is None and reader._index_attrs_json("zz") is None
