"""The decode stage: one pass per video, frames equal to the AVE recipe (OpenCV), the `decode` store, and resume."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from avepipe import media
from avepipe.decode import decode_file
from avepipe.sampling import ave_frame_indices
from tests.helpers import make_clip, run_cli


def recipe_frames(path: Path, duration: float) -> np.ndarray:
    """The original AVE recipe: every frame VideoCapture returns, cv2.resize to 224, the spec's indices (RGB)."""
    capture = cv2.VideoCapture(str(path))
    # The 2018 recipe's OpenCV returned frames in coded orientation; OpenCV >= 4.5 applies a rotation tag by default
    # (fire2.mp4 carries a 180-degree one), so switch that off, as avepipe does (-noautorotate, docs/features.md).
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    indices = ave_frame_indices(len(frames), duration)
    return np.stack([[cv2.resize(frames[i], (224, 224), interpolation=cv2.INTER_LINEAR)[:, :, ::-1] for i in row]
                     for row in indices])


@pytest.fixture(scope="module")
def codec_clips(tmp_path_factory, media_dir) -> list[Path]:
    """Real files of several codecs and containers, plus two made from them: an MPEG-4/MP3 AVI and an MP4 cut by
    stream copy (its edit list makes the demuxer return packets that decode to no frame)."""
    folder = tmp_path_factory.mktemp("codecs")
    ff = media.ffmpeg_binary()
    avi, cut = folder / "xvid.avi", folder / "editlist.mp4"
    subprocess.run([ff, "-v", "error", "-y", "-i", str(media_dir / "fire2.mp4"), "-c:v", "mpeg4", "-vtag", "XVID",
                    "-q:v", "5", "-c:a", "libmp3lame", str(avi)], check=True)
    subprocess.run([ff, "-v", "error", "-y", "-ss", "3.3", "-i", str(media_dir / "trailer_bbb.mp4"), "-t", "3",
                    "-c", "copy", str(cut)], check=True)
    return [media_dir / "chaplin.mp4", media_dir / "big_buck_bunny_432_433.webm", media_dir / "sample_1s.mp4",
            media_dir / "fire2.mp4",  # a 180-degree rotation tag: frames stay in coded orientation
            media_dir / "smpte-2997.mp4", avi, cut]


def test_frames_equal_the_opencv_recipe_bit_for_bit(codec_clips):
    for path in codec_clips:
        frames, examples, meta = decode_file(path)
        assert meta["frames_indexed"] == meta["frames_decoded"], path
        np.testing.assert_array_equal(frames, recipe_frames(path, meta["duration"]), err_msg=str(path))
        assert examples.shape == (frames.shape[0], 96, 64)


def test_index_counts_the_frames_a_decoder_returns(codec_clips):
    cut = codec_clips[-1]
    listing = subprocess.run([media.ffmpeg_binary(), "-v", "error", "-i", str(cut), "-map", "0:v", "-c", "copy",
                              "-f", "framecrc", "-"], capture_output=True, text=True, check=True).stdout
    packets = sum(1 for line in listing.splitlines() if line and not line.startswith("#"))
    idx = media.index(cut)
    decoded = sum(1 for _ in media.FramePipe(idx.info))
    capture = cv2.VideoCapture(str(cut))
    opencv = 0
    while capture.grab():
        opencv += 1
    assert packets > idx.frames == decoded == opencv  # the edit list's packets are not frames


def test_decode_store_then_extract_equals_direct_extract(tmp_path, media_dir, vgg19_weights, vggish_file):
    videos = [media_dir / "fire2.mp4", media_dir / "sample_1s.mp4"]
    store = tmp_path / "frames.h5"
    decoded = run_cli("decode", *videos, "--out", store, "--workers", "2")
    assert decoded.returncode == 0, decoded.stderr
    with h5py.File(store, "r") as f:
        assert f.attrs["format"] == "avepipe-decoded"
        assert f["videos/fire2/frames"].shape == (2, 16, 224, 224, 3)
        assert f["videos/fire2/examples"].shape == (2, 96, 64)
    again = run_cli("decode", *videos, "--out", store)
    assert again.returncode == 0 and "2 videos already" in again.stdout  # resumable: nothing decoded twice
    weights = ["--vgg19-weights", vgg19_weights, "--vggish-weights", vggish_file, "--device", "cpu"]
    direct, split = tmp_path / "direct.h5", tmp_path / "split.h5"
    assert run_cli("extract", *videos, "--cache", direct, *weights).returncode == 0
    result = run_cli("extract", *videos, "--cache", split, "--from-decoded", store, *weights)
    assert result.returncode == 0, result.stderr
    with h5py.File(direct, "r") as a, h5py.File(split, "r") as b:
        for vid in ("fire2", "sample_1s"):
            np.testing.assert_array_equal(a[f"videos/{vid}/visual"][()], b[f"videos/{vid}/visual"][()])
            np.testing.assert_array_equal(a[f"videos/{vid}/audio"][()], b[f"videos/{vid}/audio"][()])
    missing = run_cli("extract", media_dir / "chaplin.mp4", "--cache", tmp_path / "m.h5", "--from-decoded", store,
                      *weights)
    assert missing.returncode == 1 and "not in the decoded store" in missing.stderr


def test_decode_second_writer_fails_fast_and_kill_loses_nothing(tmp_path, media_dir):
    import sys

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(6):
        make_clip(folder / f"v{i}.mp4", 2.0, size="320x240", freq=300 + 50 * i)
    (folder / "v9_trailer.mp4").symlink_to(media_dir / "trailer_bbb.mp4")  # 55 s: still decoding when checked
    store = tmp_path / "frames.h5"
    proc = subprocess.Popen([sys.executable, "-m", "avepipe", "decode", str(folder), "--out", str(store),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = tmp_path / "frames.h5.staging"
    deadline = time.time() + 120
    while time.time() < deadline and not list(staging.glob("v*.h5")):
        time.sleep(0.05)
    second = run_cli("decode", folder, "--out", store)
    assert proc.poll() is None, "the first decode ended before the second writer was tried"
    assert second.returncode == 2 and "another avepipe process" in second.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("decode", folder, "--out", store)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(store, "r") as f:
        assert sorted(f["videos"]) == [f"v{i}" for i in range(6)] + ["v9_trailer"]
        assert all(f[f"videos/v{i}/frames"].shape == (2, 16, 224, 224, 3) for i in range(6))
    assert not list(staging.glob(".*"))  # no half-written entry left behind


def test_a_long_video_resumes_from_its_last_staged_second(tmp_path):
    """Extraction interrupted inside a video restarts at the last staged second, with the same features."""
    from avepipe.cache import FeatureCache
    from avepipe.extract import run_extract
    from avepipe.settings import ExtractConfig

    clip = make_clip(tmp_path / "long.mp4", 6.0, size="64x48", fps=16)
    config = ExtractConfig(vgg19_weights="random", vggish_weights="random", device="cpu", workers=0,
                           batch_size=16, checkpoint_seconds=2)
    clean = run_extract([clip], tmp_path / "clean.h5", config)
    assert clean.done == ["long"] and clean.resumed_seconds == 0

    class Stop(Exception):
        pass

    def stop_after_four(event, fields):
        if event == "seconds" and fields["done"] >= 4:
            raise Stop

    with pytest.raises(Stop):
        run_extract([clip], tmp_path / "cut.h5", config, stop_after_four)
    assert len(list((tmp_path / "cut.h5.partial" / "long").glob("*.npz"))) == 2  # seconds 0-1 and 2-3
    seen = []
    resumed = run_extract([clip], tmp_path / "cut.h5", config, lambda e, f: seen.append((e, f)))
    assert resumed.resumed_seconds == 4 and resumed.done == ["long"]
    assert min(f["done"] for e, f in seen if e == "seconds") == 4  # seconds 0-3 were not extracted again
    assert not (tmp_path / "cut.h5.partial").exists()
    a, b = FeatureCache(tmp_path / "clean.h5").get("long"), FeatureCache(tmp_path / "cut.h5").get("long")
    np.testing.assert_allclose(a.visual, b.visual, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.audio, b.audio)


def test_visual_features_equal_the_recipe_on_real_files(real_cache, media_dir, vgg19_weights):
    """Features in the cache against VGG-19 pool5 of the recipe's frames (VideoCapture + cv2.resize), real weights."""
    import torch

    from avepipe.backbones.vgg19 import load_vgg19
    from avepipe.cache import FeatureCache

    cache, result = real_cache
    assert result.returncode == 0, result.stderr
    model = load_vgg19(vgg19_weights)
    reader = FeatureCache(cache)
    for name in ("fire2", "sample_1s"):
        entry = reader.get(name)
        frames = recipe_frames(media_dir / f"{name}.mp4", entry.attrs["duration"])
        with torch.inference_mode():
            pool5 = model(torch.from_numpy(frames.reshape(-1, 224, 224, 3))).numpy()
        expected = pool5.reshape(len(frames), 16, 7, 7, 512).mean(axis=1)
        relative = np.abs(entry.visual - expected).sum() / np.abs(expected).sum()
        assert relative < 1e-3, (name, relative)


def test_ring_slots_fit_in_shared_memory():
    from avepipe.decode import RING_SLOTS, SECOND_BYTES, SHM_RESERVE, ring_slots

    assert ring_slots(7, None) == RING_SLOTS  # nothing to ask (not Linux): the default
    assert ring_slots(7, 10 << 30) == RING_SLOTS  # plenty
    docker_default = 64 << 20  # 64 MiB: 7 x 6 seconds (101 MB) would die of SIGBUS
    assert 1 <= ring_slots(7, docker_default) < RING_SLOTS
    assert 7 * ring_slots(7, docker_default) * SECOND_BYTES <= docker_default - SHM_RESERVE
    assert ring_slots(7, SHM_RESERVE + SECOND_BYTES) == 0  # not one second per process


@pytest.mark.parametrize("free", [64 << 20, 0])
def test_decode_processes_fit_a_small_dev_shm(tmp_path, monkeypatch, free):
    """With Docker's 64 MiB /dev/shm fewer seconds are in flight; with none free the videos decode in this process.
    The frames are the same either way."""
    import avepipe.decode as decode
    from avepipe.settings import DecodeConfig

    clips = [make_clip(tmp_path / f"c{i}.mp4", 2.0, freq=300 + 100 * i) for i in range(3)]
    tasks = [decode.VideoTask(p.stem, str(p)) for p in clips]

    def frames(source):
        got = {}
        for message in source:
            if isinstance(message, decode.Second):
                got[(message.vid, message.second)] = source.frames(message).copy()
                source.release(message)
        return got

    reference = frames(decode.DecodeSource(tasks, DecodeConfig(workers=0)))
    # patched where DecodeSource looks it up
    monkeypatch.setattr(decode.workers, "shared_memory_free", lambda path="/dev/shm": free)
    source = decode.DecodeSource(tasks, DecodeConfig(workers=2))
    small = frames(source)
    assert source.workers == (2 if free else 0)
    assert small.keys() == reference.keys() and len(small) == 6
    for key in reference:
        np.testing.assert_array_equal(small[key], reference[key])


def test_decode_compacts_while_other_videos_are_in_flight(tmp_path, monkeypatch):
    """A compaction during ``avepipe decode`` (threshold lowered to one byte: whenever the staged entries outweigh the
    store) folds the finished entries and leaves
    the temporaries of the videos still being decoded alone: 12 clips with 2 workers, every one stored."""
    from avepipe.decoded import run_decode
    from avepipe.settings import ExtractConfig

    folder = tmp_path / "videos"
    folder.mkdir()
    clips = [make_clip(folder / f"c{i:02d}.mp4", 1.0 + (i % 3), size="64x48") for i in range(12)]
    monkeypatch.setenv("AVEPIPE_COMPACT_BYTES", "1")
    compactions = []
    from avepipe.cache import FeatureCache

    real_compact = FeatureCache.compact

    def counting(self):
        in_flight = sorted(p.name for p in self.staging.glob(".*.tmp*"))
        compactions.append(in_flight)
        real_compact(self)
        assert sorted(p.name for p in self.staging.glob(".*.tmp*")) == in_flight  # untouched

    monkeypatch.setattr(FeatureCache, "compact", counting)
    report = run_decode(clips, tmp_path / "d.h5", ExtractConfig(workers=2))
    assert sorted(report.done) == [c.stem for c in clips] and not report.failed
    assert len(compactions) >= 3 and any(compactions[:-1])  # compacted several times, with videos in flight
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert sorted(f["videos"]) == [c.stem for c in clips]
        assert [f[f"videos/{c.stem}/frames"].shape[0] for c in clips] == [1 + (i % 3) for i in range(12)]
