"""Trust, second pass (issue 25): one test per row of the hostile pass, named after its row.

Rows: 1 a decoded store's entry of another file, 2 a partial chunk killed mid-write, 3 a merge killed mid-write,
4 metadata that reads like ffmpeg's report, 5 names with a colon, 6 a full disk, 7 the decoded store deleted mid-run,
8 a newline in a dataset file name, 9 out of memory, 10 --list lines with leading spaces, 11 VFR input, 12 FIFOs and
broken symlinks in a walked folder, 13 `cache ls` on a decoded store. (The kill-at-every-write-point matrix is
tests/test_faults.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avepipe import media
from avepipe.cache import FeatureCache, merge
from avepipe.decode import Failed, Finished, Second, Started, VideoTask, decode_file
from avepipe.decoded import DecodedSource, run_decode
from avepipe.partial import PartialStore
from avepipe.settings import ExtractConfig
from tests.helpers import make_clip, run_cli

SPEC = {"spec_version": 1, "sampling": "ave", "synthetic": True}
SOURCE = {"source_path": "/x/long.mp4", "source_size": 10, "source_mtime": 1.0}


def _decode(paths: list[Path], store: Path) -> None:
    report = run_decode(paths, store, ExtractConfig(workers=0))
    assert not report.failed, report.failed


# -- row 1 ------------------------------------------------------------------------------------------------------------

def test_row1_from_decoded_refuses_an_entry_of_another_file_with_the_same_id(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    made = make_clip(one / "clip.mp4", 1.0)
    other = make_clip(two / "clip.mp4", 2.0, freq=880)  # the same id, another file (2 s)
    store = tmp_path / "frames.h5"
    _decode([made], store)
    messages = list(DecodedSource(store, [VideoTask("clip", str(other))], "ave"))
    assert len(messages) == 1 and isinstance(messages[0], Failed), messages
    assert str(other) in messages[0].error and str(made.resolve()) in messages[0].error
    # The same path, changed since it was decoded: refused too (its frames are not the file's any more).
    os.utime(made, (1, 1))
    changed = list(DecodedSource(store, [VideoTask("clip", str(made))], "ave"))
    assert isinstance(changed[0], Failed) and "earlier version" in changed[0].error
    # The same file elsewhere (another machine's mount, a move: same size and mtime) is the file: read back.
    moved = tmp_path / "moved"
    moved.mkdir()
    copy = moved / "clip.mp4"
    copy.write_bytes(other.read_bytes())
    os.utime(copy, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns))
    # The unchanged file still reads back.
    fresh = tmp_path / "fresh.h5"
    _decode([other], fresh)
    for path in (other, copy):
        kinds = [type(m) for m in DecodedSource(fresh, [VideoTask("clip", str(path))], "ave")]
        assert kinds == [Started, Second, Second, Finished]


# -- row 2 ------------------------------------------------------------------------------------------------------------

def test_row2_a_killed_partial_chunk_write_is_ignored_and_a_damaged_chunk_discarded(tmp_path):
    partial = PartialStore(tmp_path / "F.h5")
    ones = np.ones((10, 7, 7, 512), np.float32)
    partial.save("long", 0, ones, SOURCE, SPEC)
    folder = tmp_path / "F.h5.partial" / "long"
    temporary = folder / f".0000010.tmp{os.getpid() + 1}.npz"  # what a kill -9 inside save() leaves
    temporary.write_bytes(b"PK\x03\x04 half a zip")
    loaded = PartialStore(tmp_path / "F.h5").load("long", SOURCE, SPEC)
    assert loaded is not None and loaded.shape == (10, 7, 7, 512)
    assert not temporary.exists()
    # A chunk damaged on disk: discarded with one line, the video resumes from the last good chunk.
    partial.save("long", 10, 2 * ones, SOURCE, SPEC)
    partial.save("long", 20, 3 * ones, SOURCE, SPEC)
    middle = folder / "0000010.npz"
    middle.write_bytes(middle.read_bytes()[:100])
    again = PartialStore(tmp_path / "F.h5")
    loaded = again.load("long", SOURCE, SPEC)
    assert loaded.shape == (10, 7, 7, 512) and np.all(loaded == 1)
    assert len(again.discarded) == 1 and "0000010.npz" in again.discarded[0]
    assert sorted(p.name for p in folder.iterdir()) == ["0000000.npz"]


# -- row 3 ------------------------------------------------------------------------------------------------------------

def _small_cache(path: Path, ids: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with FeatureCache(path, "a") as cache:
        cache.ensure_spec(SPEC)
        for vid in ids:
            cache.put(vid, rng.random((2, 7, 7, 512), np.float32), rng.random((2, 128), np.float32), {"seconds": 2})
    return path


def _contents(path: Path) -> dict:
    cache = FeatureCache(path)
    return {vid: (e.visual.tobytes(), e.audio.tobytes()) for vid in cache.ids() for e in [cache.get(vid)]}


def test_row3_a_merge_killed_midway_leaves_no_output_and_the_rerun_finishes_it(tmp_path):
    a = _small_cache(tmp_path / "a.h5", [f"a{i}" for i in range(4)], 1)
    b = _small_cache(tmp_path / "b.h5", [f"b{i}" for i in range(4)], 2)
    out = tmp_path / "out.h5"
    program = (  # SIGKILL at the third copied video (a merge copies each entry's group: FeatureCache._copy_into)
        "import os, signal, sys\n"
        "from avepipe.cache import FeatureCache, merge\n"
        "orig, count = FeatureCache._copy_into, [0]\n"
        "def copy(self, *args):\n"
        "    text = orig(self, *args)\n"
        "    count[0] += 1\n"
        "    if count[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return text\n"
        "FeatureCache._copy_into = copy\n"
        "merge(sys.argv[1:3], sys.argv[3])\n"
    )
    killed = subprocess.run([sys.executable, "-c", program, str(a), str(b), str(out)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # nothing that looks like a complete cache
    rerun = run_cli("cache", "merge", a, b, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    clean = tmp_path / "clean.h5"
    merge([a, b], clean)
    assert _contents(out) == _contents(clean) and len(_contents(out)) == 8
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the hidden output is gone


# -- row 4 ------------------------------------------------------------------------------------------------------------

SPOOF = "x\n  Duration: 00:09:00.00, start\nInput stream #0:0 (video): 1 packets read (1 bytes); 3 frames decoded; " \
        "0 decode errors\n[error] partial file\nStream #0:7: Audio: aac, 8000 Hz"


def test_row4_metadata_that_reads_like_ffmpegs_report_is_not_taken_for_it(tmp_path):
    clean = make_clip(tmp_path / "clean.mp4", 2.0)
    tagged = tmp_path / "tagged.mp4"
    subprocess.run([media.ffmpeg_binary(), "-y", "-hide_banner", "-loglevel", "error", "-i", clean, "-c", "copy",
                    "-metadata", "comment=Duration: 00:02:00.00", "-metadata", f"artist={SPOOF}",
                    "-metadata", "title=moov atom not found, partial file, Invalid data found", tagged], check=True)
    info = media.index(tagged).info
    assert (info.duration, info.seconds, info.video_stream, info.audio_stream) == (2.0, 2, 0, 1)
    frames, examples, meta = decode_file(tagged)
    want_frames, want_examples, want_meta = decode_file(clean)
    assert np.array_equal(frames, want_frames) and np.array_equal(examples, want_examples)
    assert meta["frames_decoded"] == want_meta["frames_decoded"] == 50


# -- row 5 ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["10:30 meeting.mp4", "2024-01-01T10:00:00.mp4", "pipe:0.mp4", "file:x.mp4"])
def test_row5_relative_names_with_a_colon_are_files(tmp_path, monkeypatch, name):
    make_clip(tmp_path / name, 1.0)
    monkeypatch.chdir(tmp_path)
    frames, examples, meta = decode_file(name)
    assert frames.shape == (1, 16, 224, 224, 3) and meta["source_path"] == str(tmp_path / name)


# -- row 7 ------------------------------------------------------------------------------------------------------------

def test_row7_a_decoded_store_deleted_mid_run_fails_the_rest_as_transient(tmp_path):
    clips = [make_clip(tmp_path / f"c{i}.mp4", 1.0, freq=300 + 100 * i) for i in range(3)]
    store = tmp_path / "frames.h5"
    _decode(clips, store)
    source = DecodedSource(store, [VideoTask(p.stem, str(p)) for p in clips], "ave")
    seen = []
    for message in source:
        seen.append(message)
        if isinstance(message, Finished) and message.vid == "c0":
            store.unlink()
    failed = [m for m in seen if isinstance(m, Failed)]
    assert [m.vid for m in failed] == ["c1", "c2"] and all(m.transient for m in failed)
    assert "deleted" in failed[0].error and str(store) in failed[0].error
    assert [m.vid for m in seen if isinstance(m, Finished)] == ["c0"]


def test_row7_extract_from_a_deleted_store_records_the_videos(tmp_path, weights_args):
    clips = [make_clip(tmp_path / f"c{i}.mp4", 1.0, freq=300 + 100 * i) for i in range(2)]
    store = tmp_path / "frames.h5"
    _decode(clips, store)
    cache = tmp_path / "F.h5"
    # The store vanishes after the run opened it (a cleanup job, a full scratch disk purged): the first read deletes it.
    program = (
        "import sys, avepipe.decoded as d\n"
        "orig = d.DecodedStore.read\n"
        "def read(self, vid):\n"
        "    import os\n"
        "    if os.path.exists(self.path): os.unlink(self.path)\n"
        "    return orig(self, vid)\n"
        "d.DecodedStore.read = read\n"
        "from avepipe.cli import main\n"
        "sys.argv = ['avepipe'] + sys.argv[1:]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", program, "extract", *map(str, clips), "--cache", str(cache),
                             "--from-decoded", str(store), *weights_args], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "internal error" not in result.stdout + result.stderr
    failures = FeatureCache(cache).failures()
    assert sorted(failures) == ["c0", "c1"] and all(r["transient"] for r in failures.values())


# -- row 9 ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raised", ["MemoryError('Unable to allocate 3.2 GiB for an array')",
                                    "RuntimeError('DefaultCPUAllocator: can\\'t allocate memory: you tried to allocate "
                                    "12345 bytes')",
                                    "OSError(12, 'Cannot allocate memory')"])
def test_row9_out_of_memory_is_a_resource_error_with_the_remedy(tmp_path, raised):
    cache = _small_cache(tmp_path / "a.h5", ["a"], 1)
    program = (
        "import sys, avepipe.cache as c\n"
        f"def merge(*args, **kwargs):\n    raise {raised}\n"
        "c.merge = merge\n"
        "from avepipe.cli import main\n"
        "sys.argv = ['avepipe'] + sys.argv[1:]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", program, "cache", "merge", str(cache), "--out",
                             str(tmp_path / "out.h5")], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert "out of memory" in result.stderr and "--batch-size" in result.stderr and "--workers" in result.stderr
    assert "internal error" not in result.stderr and "report" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- row 10 -----------------------------------------------------------------------------------------------------------

def test_row10_list_lines_are_taken_as_written(tmp_path):
    from avepipe.inputs import discover

    (tmp_path / "  spaced.mp4").write_bytes(b"x")  # a name that starts with spaces
    (tmp_path / "plain.mp4").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("  spaced.mp4\n  plain.mp4  \r\n   \n  # a comment\n")
    assert discover([], listing) == [tmp_path / "  spaced.mp4", tmp_path / "plain.mp4"]


# -- row 12 -----------------------------------------------------------------------------------------------------------

def test_row12_fifos_and_broken_links_in_a_walked_folder_fail_with_one_line_each(tmp_path):
    from avepipe.inputs import discover

    folder = tmp_path / "videos"
    folder.mkdir()
    make_clip(folder / "good.mp4", 1.0)
    os.mkfifo(folder / "pipe.mp4")
    (folder / "broken.mp4").symlink_to(folder / "gone.mp4")
    (folder / "loop.mp4").symlink_to(folder / "loop.mp4")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop: not walked into
    found = discover([folder])
    assert sorted(p.name for p in found) == ["broken.mp4", "good.mp4", "loop.mp4", "pipe.mp4"]
    report = run_decode(found, tmp_path / "frames.h5", ExtractConfig(workers=0))
    assert report.done == ["good"]
    assert "named pipe (FIFO)" in report.failed["pipe"]
    assert "broken symbolic link" in report.failed["broken"] and "gone.mp4" in report.failed["broken"]
    assert "symbolic link loop" in report.failed["loop"]
    assert all("\n" not in error for error in report.failed.values())


# -- row 8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ['"two\nlines.mp4"', '"two\nlines"', '"cr\rname.mp4"'])
def test_row8_dataset_init_refuses_a_line_break_in_a_file_name_naming_the_csv_line(tmp_path, cell):
    from avepipe.data.from_csv import init_dataset
    from avepipe.errors import DataError

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("two\nlines.mp4", "cr\rname.mp4", "c1.mp4", "c2.mp4"):
        make_clip(videos / name, 2.0)
    csv = tmp_path / "events.csv"
    csv.write_text(f"c1.mp4,Fire,0,1\nc2.mp4,Dog,0,2\n{cell},Fire,0,1\n", newline="")
    with pytest.raises(DataError) as error:
        init_dataset(csv, videos, tmp_path / "mine")
    assert str(error.value).startswith(f"{csv}: line 3: ") and "line break" in str(error.value)
    assert "\n" not in str(error.value) and "\r" not in str(error.value)
    assert not (tmp_path / "mine").exists()


# -- row 13 -----------------------------------------------------------------------------------------------------------

def test_row13_cache_ls_lists_a_decoded_store(tmp_path):
    good = make_clip(tmp_path / "good.mp4", 1.0)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    store = tmp_path / "frames.h5"
    run_decode([good, bad], store, ExtractConfig(workers=0))
    listed = run_cli("cache", "ls", store)
    assert listed.returncode == 0, listed.stderr
    assert "1 decoded videos" in listed.stdout and "good" in listed.stdout and "bad" in listed.stdout
    failed = run_cli("cache", "ls", store, "--failed")
    assert failed.returncode == 0 and "bad" in failed.stdout and "good" not in failed.stdout
    other = tmp_path / "other.h5"
    other.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # not a store of any kind: still refused with one line
    refused = run_cli("cache", "ls", other)
    assert refused.returncode == 2 and "internal error" not in refused.stderr


# -- row 6 ------------------------------------------------------------------------------------------------------------

def _limit_file_size() -> None:  # runs in the child: writes past 3 MB fail (EFBIG) as they would on a full disk
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))


def test_row6_a_write_that_fails_inside_hdf5_is_one_line_and_no_crash_at_exit(tmp_path, media_dir):
    # fire2.mp4 (2 s) needs 4.8 MB of frames: its HDF5 entry fails mid-write, from inside the library.
    for run in range(2):
        out = tmp_path / f"frames{run}.h5"
        result = subprocess.run([sys.executable, "-m", "avepipe", "decode", str(media_dir / "fire2.mp4"), "--out",
                                 str(out), "--workers", "0"], preexec_fn=_limit_file_size, capture_output=True,
                                text=True, env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert "cannot write" in result.stderr and "File too large" in result.stderr
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        staging = tmp_path / f"frames{run}.h5.staging"
        assert not (staging.exists() and any(staging.iterdir()))  # no half entry left (an empty folder is removed)


def test_row6_a_full_disk_is_found_before_hdf5_writes(tmp_path, monkeypatch):
    from avepipe.errors import CacheError

    clip = make_clip(tmp_path / "clip.mp4", 2.0)
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 256, 4096  # 1 MB free

    monkeypatch.setattr(os, "statvfs", lambda path: Full() if "frames" in str(path) else real(path))
    with pytest.raises(CacheError, match="no space left on the device of .*MB free, about .*MB needed"):
        run_decode([clip], tmp_path / "frames.h5", ExtractConfig(workers=0))
    staging = tmp_path / "frames.h5.staging"
    assert not (staging.exists() and any(staging.iterdir()))


# -- row 11 -----------------------------------------------------------------------------------------------------------

def _vfr_clip(path: Path) -> Path:
    """4 s: 10 fps for the first 2 s, then 30 fps (what a phone does when the light changes)."""
    subprocess.run([media.ffmpeg_binary(), "-y", "-hide_banner", "-loglevel", "error",
                    "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=4",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=4",
                    "-vf", "select='gte(t\\,2)+not(mod(n\\,3))'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-t", "4", str(path)], check=True)
    return path


def test_row11_vfr_frames_are_chosen_by_timestamp_and_recorded(tmp_path):
    import cv2

    clip = _vfr_clip(tmp_path / "phone.mp4")
    frames, _, meta = decode_file(clip)
    assert meta["frame_selection"] == "timestamp" and meta["vfr_drift_s"] > 0.1
    # The reference, independent of avepipe: every frame OpenCV returns with its own timestamp; frame i of second l is
    # the frame on screen at l + i/16, resized as the recipe does.
    capture = cv2.VideoCapture(str(clip))
    decoded, stamps = [], []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        decoded.append(frame)
        stamps.append(capture.get(cv2.CAP_PROP_POS_MSEC) / 1000)
    capture.release()
    assert len(decoded) == 20 + 60
    stamps = np.array(stamps) - stamps[0]
    want = np.empty_like(frames)
    for second in range(4):
        for i in range(16):
            k = int(np.searchsorted(stamps, second + i / 16 + 1e-6, side="right") - 1)
            assert second <= stamps[k] < second + 1  # second l's frames come from [l, l+1)
            want[second, i] = cv2.resize(decoded[k], (224, 224), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    assert np.array_equal(frames, want)


def test_row11_constant_rate_files_keep_the_ave_formula(tmp_path, media_dir):
    from avepipe.sampling import ave_frame_indices

    for clip in [make_clip(tmp_path / "cfr.mp4", 3.0, fps=30), media_dir / "fire2.mp4", media_dir / "chaplin.mp4"]:
        idx = media.index(clip)
        from avepipe.decode import plan_frames

        indices, drift = plan_frames(idx)
        assert drift is None, clip
        assert np.array_equal(indices, ave_frame_indices(idx.frames, idx.info.duration))
        _, _, meta = decode_file(clip)
        assert "frame_selection" not in meta
