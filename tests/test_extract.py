"""``avepipe extract`` end to end, through the real CLI in subprocesses (exit codes, messages, kill -9, resume)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from avepipe import media
from avepipe.backbones.logmel import waveform_to_examples
from avepipe.backbones.vgg19 import load_vgg19
from avepipe.backbones.vggish import load_vggish
from avepipe.cache import FeatureCache
from avepipe.decode import decode_file
from tests.helpers import make_clip, run_cli


@pytest.fixture(scope="session")
def small_clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for i, (name, seconds) in enumerate([("one", 1.0), ("two", 1.0), ("three", 1.0), ("four", 1.0)]):
        make_clip(folder / f"{name}.mp4", seconds, size="160x120", freq=300 + 100 * i,
                  pattern="testsrc2" if i % 2 else "rgbtestsrc")
    return folder


def test_real_media_features_equal_direct_computation(real_cache, media_dir, vgg19_weights, vggish_file):
    cache, result = real_cache
    names = {"sample_1s": 1, "fire2": 2, "chaplin": 9, "big_buck_bunny_432_433": 1, "bbb_5s_6ch": 5}
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "NOT the published" in result.stderr  # unofficial VGGish weights
    reader = FeatureCache(cache)
    assert reader.ids() == sorted(names)
    for name, seconds in names.items():
        entry = reader.get(name)
        assert entry.visual.shape == (seconds, 7, 7, 512) and entry.audio.shape == (seconds, 128)
        assert entry.attrs["vgg19_official"] and not entry.attrs["vggish_official"]
        assert entry.attrs["vgg19_sha256"].startswith("bde7da0d") and len(entry.attrs["vggish_sha256"]) == 64
    # The pipeline equals the backbones applied to the spec's frames and examples, computed here directly.
    info = media.probe(media_dir / "fire2.mp4")
    frames, _, _ = decode_file(media_dir / "fire2.mp4")
    with torch.inference_mode():
        pool5 = load_vgg19(vgg19_weights)(torch.from_numpy(frames.reshape(-1, 224, 224, 3))).numpy()
        wave, rate = media.decode_audio(info)
        examples, _ = waveform_to_examples(wave, rate, info.seconds)
        audio = load_vggish(vggish_file)(torch.from_numpy(examples)).numpy()
    expected = pool5.reshape(2, 16, 7, 7, 512).mean(axis=1)
    np.testing.assert_allclose(reader.get("fire2").visual, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reader.get("fire2").audio, audio, rtol=1e-4, atol=1e-5)
    listing = run_cli("cache", "ls", cache)
    assert listing.returncode == 0 and all(n in listing.stdout for n in names)


def test_bad_inputs_are_reported_and_the_batch_goes_on(tmp_path, small_clips, weights_args):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "good.mp4").write_bytes((small_clips / "one.mp4").read_bytes())
    (folder / "notes.mp4").write_text("not a video\n" * 20)
    cut = make_clip(tmp_path / "cut.mp4", 3.0, size="160x120")
    (folder / "cut.mp4").write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    make_clip(folder / "sound.mp4", 2.0, video=False)  # a "video" download with sound only
    make_clip(folder / "silent.mp4", 2.0, audio=False, size="160x120")
    make_clip(folder / "blink.mp4", 0.5, size="160x120")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{folder / 'missing.mp4'}\n")
    cache = tmp_path / "f.h5"
    result = run_cli("extract", folder, "--list", listed, "--cache", cache, "--workers", "0", *weights_args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    expected = {"notes": "not a media file", "cut": "truncated", "sound": "no video stream",
                "silent": "no audio stream", "blink": "shorter than 1 s", "missing": "missing file"}
    reader = FeatureCache(cache)
    assert reader.ids() == ["good"]
    failures = reader.failures()
    assert set(failures) == set(expected)
    for vid, words in expected.items():
        assert words in failures[vid]["error"] and vid in failures[vid]["error"]
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("failed:") and f"/{vid}.mp4" in ln]
        assert len(lines) == 1 and words in lines[0]  # one line per failure, naming the file and the problem
    with h5py.File(cache, "r") as f:
        assert set(f["failed"]) == set(expected)
    # A re-run does not retry recorded failures unless asked, and keeps what was written.
    again = run_cli("extract", folder, "--list", listed, "--cache", cache, "--workers", "0", *weights_args)
    assert again.returncode == 1 and "failed earlier" in again.stderr and "--retry-failed" in again.stderr
    (folder / "notes.mp4").write_bytes((small_clips / "two.mp4").read_bytes())  # the user fixed one file
    retry = run_cli("extract", folder, "--list", listed, "--cache", cache, "--workers", "0", "--retry-failed",
                    *weights_args)
    assert retry.returncode == 1
    reader = FeatureCache(cache)
    assert reader.ids() == ["good", "notes"] and "notes" not in reader.failures()


def test_killed_run_resumes_to_the_same_cache(tmp_path, small_clips, weights_args):
    clean = tmp_path / "clean.h5"
    assert run_cli("extract", small_clips, "--cache", clean, "--workers", "0", *weights_args).returncode == 0
    killed = tmp_path / "killed.h5"
    staging = tmp_path / "killed.h5.staging"
    proc = subprocess.Popen([sys.executable, "-m", "avepipe", "extract", str(small_clips), "--cache", str(killed),
                             "--workers", "2", *weights_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.suffix == ".h5" for p in staging.glob("*.h5")):
        time.sleep(0.05)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.send_signal(signal.SIGKILL)  # mid-run: at least one video staged, the others not
    proc.wait()
    # Decoder processes notice their parent is gone and exit instead of lingering.
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{c}/cmdline").exists() and b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
                   for c in children)
    partial = FeatureCache(killed)  # the store opens after kill -9
    assert 1 <= len(partial.ids()) < 4
    resumed = run_cli("extract", small_clips, "--cache", killed, "--workers", "2", *weights_args)
    assert resumed.returncode == 0, resumed.stderr
    assert "already in the cache" in resumed.stdout
    a, b = FeatureCache(clean), FeatureCache(killed)
    assert a.ids() == b.ids() == ["four", "one", "three", "two"]
    for vid in a.ids():
        x, y = a.get(vid), b.get(vid)
        context = f"{vid}: clean attrs {x.attrs}, resumed attrs {y.attrs}"
        np.testing.assert_array_equal(x.visual, y.visual, err_msg=context)
        np.testing.assert_array_equal(x.audio, y.audio, err_msg=context)


def test_second_writer_is_refused(tmp_path, small_clips, weights_args):
    cache = tmp_path / "f.h5"
    holder = FeatureCache(cache, "a")
    try:
        result = run_cli("extract", small_clips / "one.mp4", "--cache", cache, *weights_args)
    finally:
        holder.close()
    assert result.returncode == 2
    assert "another avepipe process" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2(tmp_path, small_clips, weights_args):
    cases = [
        (["--shard", "5/4"], "--shard"),
        (["--sampling", "best"], "--sampling"),
        (["--list", tmp_path / "nolist.txt"], "cannot read the list"),
        (["--device", "gpu9"], "not a device name"),
    ]
    for extra, words in cases:
        result = run_cli("extract", small_clips / "one.mp4", "--cache", tmp_path / "f.h5", *weights_args, *extra)
        assert result.returncode == 2 and words in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "same.mp4").write_bytes((small_clips / "one.mp4").read_bytes())
    result = run_cli("extract", tmp_path / "a", tmp_path / "b", "--cache", tmp_path / "g.h5", *weights_args)
    assert result.returncode == 2 and "used by two files" in result.stderr
    assert str(tmp_path / "a" / "same.mp4") in result.stderr and str(tmp_path / "b" / "same.mp4") in result.stderr
    missing_weights = run_cli("extract", small_clips / "one.mp4", "--cache", tmp_path / "h.h5",
                              "--vgg19-weights", tmp_path / "none.h5", "--vggish-weights", "random")
    assert missing_weights.returncode == 2 and "VGG-19 weights not found" in missing_weights.stderr


def test_mixed_sampling_is_refused(tmp_path, small_clips, weights_args):
    cache = tmp_path / "f.h5"
    first = run_cli("extract", small_clips / "one.mp4", "--cache", cache, "--workers", "0", *weights_args)
    assert first.returncode == 0
    result = run_cli("extract", small_clips / "two.mp4", "--cache", cache, "--sampling", "fps", *weights_args)
    assert result.returncode == 2 and "feature spec differs" in result.stderr and "sampling" in result.stderr
    assert FeatureCache(cache).ids() == ["one"]
