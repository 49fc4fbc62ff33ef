"""Real-world files and batch mistakes: each case is a test named after it (nothing lost, nothing silently wrong)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from avepipe import media
from avepipe.cache import FeatureCache
from avepipe.decode import decode_file
from avepipe.decoded import run_decode
from avepipe.inputs import discover
from avepipe.settings import ExtractConfig
from tests.helpers import make_clip


def damage_one_audio_packet(avi: Path, out: Path) -> Path:
    """Overwrite the first bytes of one AC-3 packet in the middle of an AVI (its '01wb' chunks)."""
    data = bytearray(avi.read_bytes())
    chunks = [i for i in range(len(data) - 4) if data[i:i + 4] == b"01wb"]
    start = chunks[len(chunks) // 2] + 8
    data[start:start + 6] = bytes(b ^ 0xFF for b in data[start:start + 6])
    out.write_bytes(bytes(data))
    return out


def ac3_avi(path: Path, seconds: float = 3.0) -> Path:
    subprocess.run([media.ffmpeg_binary(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=160x120:rate=25:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate=48000:duration={seconds}", "-c:v", "mpeg4", "-c:a", "ac3",
                    "-t", str(seconds), str(path)], check=True)
    return path


def test_a_file_with_an_isolated_decode_glitch_is_accepted(tmp_path):
    bad = damage_one_audio_packet(ac3_avi(tmp_path / "good.avi"), tmp_path / "glitch.avi")
    frames, examples, meta = decode_file(bad)
    assert frames.shape[0] == 3 and examples.shape[0] == 3 and meta["seconds"] == 3
    assert meta["decode_glitches"] >= 1  # recorded in the entry's attributes
    truncated = tmp_path / "cut.avi"
    truncated.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(media.CorruptMediaError, match="truncated"):
        media.index(truncated)


def test_a_video_stream_shorter_than_the_audio_is_recorded(tmp_path):
    clip = tmp_path / "short_video.mkv"
    subprocess.run([media.ffmpeg_binary(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=64x48:rate=25:duration=1", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=16000:duration=3", "-c:v", "libx264", str(clip)], check=True)
    frames, _, meta = decode_file(clip)
    assert meta["seconds"] == 3 and frames.shape[0] == 3
    assert meta["video_padded_s"] == pytest.approx(2.0, abs=0.1)


def test_a_slideshow_says_too_few_frames_per_second(tmp_path):
    clip = make_clip(tmp_path / "slides.mp4", 4.0, fps=1, size="64x48")
    subprocess.run([media.ffmpeg_binary(), "-v", "error", "-y", "-i", str(clip), "-vf", "fps=0.5", "-c:a", "copy",
                    str(tmp_path / "half.mp4")], check=True)
    with pytest.raises(ValueError, match="too few frames per second"):
        decode_file(tmp_path / "half.mp4")


def test_a_jpeg_renamed_mp4_is_not_a_video(tmp_path):
    fake = tmp_path / "photo.mp4"
    subprocess.run([media.ffmpeg_binary(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=64x48",
                    "-frames:v", "1", "-f", "image2", str(fake)], check=True)
    with pytest.raises(media.NotMediaError, match="still image"):
        media.index(fake)


def test_an_unreadable_file_says_permission_denied(tmp_path, media_dir, monkeypatch):
    clip = tmp_path / "locked.mp4"
    clip.write_bytes((media_dir / "sample_1s.mp4").read_bytes())
    clip.chmod(0)
    if os.getuid() == 0:  # root reads any file: make the access check see what another user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(clip) else real(p, mode))
    with pytest.raises(media.MissingFileError, match="permission denied"):
        media.index(clip)


def test_a_hidden_file_in_an_input_folder_is_skipped(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    make_clip(folder / "good.mp4", 1.0, size="64x48")
    (folder / "._good.mp4").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (folder / ".x.mp4").write_bytes((folder / "good.mp4").read_bytes())
    report = run_decode(discover([folder]), tmp_path / "d.h5", ExtractConfig(workers=0))
    assert report.done == ["good"] and not report.failed
    named = run_decode([folder / ".x.mp4"], tmp_path / "e.h5", ExtractConfig(workers=0))
    assert "cannot be a video id" in named.failed[".x"]  # named explicitly: one failure, not a batch abort


def test_a_245_byte_file_name_is_a_per_video_failure(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    make_clip(folder / "ok.mp4", 1.0, size="64x48")
    long_name = folder / ("x" * 241 + ".mp4")
    long_name.write_bytes((folder / "ok.mp4").read_bytes())
    report = run_decode(discover([folder]), tmp_path / "d.h5", ExtractConfig(workers=0))
    assert report.done == ["ok"] and "too long" in report.failed["x" * 241]
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert list(f["videos"]) == ["ok"]


def test_transient_failures_are_retried_on_the_next_run(tmp_path):
    clip = make_clip(tmp_path / "v.mp4", 1.0, size="64x48")
    store = tmp_path / "d.h5"
    from avepipe.decoded import DecodedStore

    writer = DecodedStore(store, "a")
    writer.ensure_spec({"sampling": "ave", "spec_version": 1})
    writer.put_failure("v", str(clip), f"{clip}: decoder process died", transient=True)
    writer.close()
    report = run_decode([clip], store, ExtractConfig(workers=0))
    assert report.done == ["v"]  # no --retry-failed needed

    broken = tmp_path / "w.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    first = run_decode([broken], store, ExtractConfig(workers=0))
    assert "w" in first.failed
    assert "w" in run_decode([broken], store, ExtractConfig(workers=0)).previously_failed  # permanent: kept
    broken.write_bytes(clip.read_bytes())  # the file changed since it failed: retried
    assert run_decode([broken], store, ExtractConfig(workers=0)).done == ["w"]


def test_a_hung_decode_becomes_a_recorded_failure(tmp_path):
    clip = make_clip(tmp_path / "v.mp4", 2.0, size="64x48")
    hang = tmp_path / "ffmpeg"
    real = media.ffmpeg_binary()
    hang.write_text(f"#!/bin/sh\ncase \"$*\" in *framecrc*) exec {real} \"$@\";; esac\nexec sleep 600\n")
    hang.chmod(0o755)
    code = "\n".join([
        "import time",
        "from pathlib import Path",
        "from avepipe.decoded import run_decode",
        "from avepipe.settings import ExtractConfig",
        "start = time.monotonic()",
        f"report = run_decode([Path({str(clip)!r})], {str(tmp_path / 'd.h5')!r}, ExtractConfig(workers=1, "
        "stall_seconds=2))",
        "print(report.failed['v'], round(time.monotonic() - start))",
    ])
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "AVEPIPE_FFMPEG": str(hang)})
    assert "decoder stalled: ffmpeg produced no frame for 2 s" in out.stdout, out.stderr
    assert int(out.stdout.split()[-1]) < 30


def test_python_api_runs_from_a_plain_script_without_main_guard(tmp_path, media_dir):
    code = "\n".join([
        "from pathlib import Path",
        "from avepipe.decoded import run_decode",
        "from avepipe.settings import ExtractConfig",
        f"videos = [Path({str(media_dir / 'fire2.mp4')!r}), Path({str(media_dir / 'sample_1s.mp4')!r})]",
        f"report = run_decode(videos, {str(tmp_path / 'd.h5')!r}, ExtractConfig(workers=2))",
        "print('DONE', sorted(report.done), report.failed)",
    ])
    script = tmp_path / "plain.py"
    script.write_text(code)
    for args in ([str(script)], ["-"]):  # a script file, and code piped to stdin
        (tmp_path / "d.h5").unlink(missing_ok=True)
        out = subprocess.run([sys.executable, *args], input=code, capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert "DONE ['fire2', 'sample_1s'] {}" in out.stdout, out.stderr
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert np.asarray(f["videos/fire2/frames"]).shape == (2, 16, 224, 224, 3)


# -- the cache: signals, permissions, disks -------------------------------------------------------------------------

def test_a_usage_error_at_start_leaves_nothing_behind(tmp_path, small_clip):
    from avepipe.errors import WeightsError
    from avepipe.extract import run_extract

    config = ExtractConfig(vgg19_weights=str(tmp_path / "missing.h5"), vggish_weights="random", device="cpu",
                           workers=0)
    with pytest.raises(WeightsError, match="VGG-19 weights not found"):
        run_extract([small_clip], tmp_path / "F.h5", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


@pytest.fixture()
def small_clip(tmp_path) -> Path:
    return make_clip(tmp_path / "v.mp4", 1.0, size="64x48")


def test_a_symlinked_cache_writes_the_real_file(tmp_path):
    real_dir, link_dir = tmp_path / "disk", tmp_path / "here"
    real_dir.mkdir()
    link_dir.mkdir()
    writer = FeatureCache(real_dir / "real.h5", "a")
    writer.ensure_spec({"spec_version": 1})
    writer.close()
    (link_dir / "linked.h5").symlink_to(real_dir / "real.h5")
    writer = FeatureCache(link_dir / "linked.h5", "a")
    writer.put("a", np.zeros((1, 7, 7, 512), np.float32), np.zeros((1, 128), np.float32), {"seconds": 1})
    writer.close()
    assert (link_dir / "linked.h5").is_symlink()
    assert FeatureCache(real_dir / "real.h5").ids() == ["a"]


def test_merge_overwrite_starts_clean(tmp_path):
    from avepipe.cache import merge

    def cache_with(path: Path, vid: str) -> Path:
        writer = FeatureCache(path, "a")
        writer.ensure_spec({"spec_version": 1})
        writer.put(vid, np.zeros((1, 7, 7, 512), np.float32), np.zeros((1, 128), np.float32), {"seconds": 1})
        writer.close()
        return path

    source = cache_with(tmp_path / "a.h5", "a")
    out = cache_with(tmp_path / "out.h5", "stale")
    stale = tmp_path / "out.h5.staging" / "leftover.h5"
    stale.parent.mkdir(exist_ok=True)  # a killed writer leaves its staging folder (a clean one removes it)
    stale.write_bytes((tmp_path / "a.h5").read_bytes())  # a killed writer's staged entry of the output
    merge([source], out, overwrite=True)
    assert FeatureCache(out).ids() == ["a"]


def test_one_corrupt_staged_entry_is_quarantined_and_named(tmp_path):
    writer = FeatureCache(tmp_path / "F.h5", "a")
    writer.ensure_spec({"spec_version": 1})
    writer.put("good", np.zeros((1, 7, 7, 512), np.float32), np.zeros((1, 128), np.float32), {"seconds": 1})
    (tmp_path / "F.h5.staging" / "bad.h5").write_bytes(b"garbage, not HDF5")
    (tmp_path / "F.h5.staging" / "worse.failed.json").write_text("{not json")
    assert sorted(writer.all_attrs()) == ["good"]
    assert writer.failures() == {}
    writer.close()
    assert sorted(Path(p).name for p in writer.quarantined) == ["bad.h5.corrupt", "worse.failed.json.corrupt"]
    assert FeatureCache(tmp_path / "F.h5").ids() == ["good"]
    assert (tmp_path / "F.h5.staging" / "bad.h5.corrupt").exists()


def test_an_unwritable_cache_location_is_a_clear_error(tmp_path):
    from avepipe.errors import CacheError

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(CacheError, match="cannot write"):
        FeatureCache(blocker / "sub" / "F.h5", "a")


def test_pca_parameters_are_part_of_the_feature_spec(tmp_path, weights_dir):
    import torch

    from avepipe.backbones.extractor import Backbones

    other = tmp_path / "other_pca.npz"
    params = dict(np.load(weights_dir / "vggish_pca_params.npz"))
    params["pca_means"] = params["pca_means"] + 1
    np.savez(other, **params)
    specs = []
    for pca_file in (weights_dir / "vggish_pca_params.npz", other):
        config = ExtractConfig(vgg19_weights="random", vggish_weights="random", pca=True, pca_params=str(pca_file))
        specs.append(Backbones(config, torch.device("cpu")).spec("ave"))
    assert specs[0]["pca_sha256"] != specs[1]["pca_sha256"]


def test_sigterm_is_handled_like_ctrl_c_with_exit_143(tmp_path):
    import signal
    import time

    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(8):
        make_clip(folder / f"v{i}.mp4", 1.0, size="64x48", freq=300 + 40 * i)
    cache = tmp_path / "F.h5"
    proc = subprocess.Popen([sys.executable, "-m", "avepipe", "extract", str(folder), "--cache", str(cache),
                             "--workers", "2", "--device", "cpu", "--vgg19-weights", "random",
                             "--vggish-weights", "random"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / "F.h5.staging"
    deadline = time.time() + 300
    while time.time() < deadline and not list(staging.glob("v*.h5")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - sent < 10
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    def running(pid: str) -> bool:  # a zombie waiting for a reaper (no init in a container) is not running
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    deadline = time.time() + 10
    while time.time() < deadline and any(running(c) for c in children):
        time.sleep(0.2)
    assert not [c for c in children if running(c)]  # decode processes ended with it
    kept = FeatureCache(cache).ids()
    assert 1 <= len(kept) < 8  # finished videos kept (compacted into F.h5)
