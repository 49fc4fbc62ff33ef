import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from avepipe.cache import FeatureCache, merge
from avepipe.errors import CacheError, CacheLockedError, SpecMismatchError

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
    assert not list((tmp_path / "f.h5.staging").iterdir())  # compacted on close


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
