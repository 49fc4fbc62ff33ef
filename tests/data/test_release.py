"""`avepipe dataset download-ave`: the AVE release fetched from a loopback HTTP server or a mirror folder.

Small synthetic files in the released layout (made here: header-less Annotations.txt, order files, ``avadataset``
feature and label files) stand in for the release, under a copy of the real manifest whose URLs point at the server
and whose checksums are the synthetic files'. The real manifest's checksums are checked against the real reference
files of ``$AVEPIPE_AVE_DIR``. These machines cannot reach GitHub or Google Drive: the public URLs are not fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import h5py
import numpy as np
import pytest

from avepipe.cache import FeatureCache
from avepipe.data.release import CHECKSUMS_FILE, MIRROR_ENV, download_ave, manifest
from tests.helpers import run_cli

ROWS = [("Bell", "v0", 0, 10), ("Dog", "v1", 2, 6), ("Car", "v2", 0, 4), ("Bell", "v3", 5, 10), ("Dog", "v4", 0, 10),
        ("Car", "v5", 3, 9), ("Bell", "v6", 1, 3), ("Dog", "v7", 0, 10), ("Car", "v7", 0, 5)]  # v7: two events
ORDERS = {"train": [0, 1, 2, 3, 4], "val": [5, 8], "test": [6, 7]}
MATCH_ORDERS = {"train": [1, 2, 3, 4, 5], "val": [0, 8], "test": [6, 7]}
TOFU = ("audio_feature.h5", "visual_feature.h5", "visual_feature_noisy.h5")  # no published checksum


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def h5_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return buffer.getvalue()


def release_files(seed: int = 0) -> dict[str, bytes]:
    """The release's files for :data:`ROWS`, in the released formats."""
    rng = np.random.default_rng(seed)
    audio = rng.random((len(ROWS), 10, 128))  # float64, as released
    visual = rng.random((len(ROWS), 10, 7, 7, 512), dtype=np.float32)
    audio[8], visual[8] = audio[7], visual[7]  # rows of one video share its features, as in the release
    background = np.zeros((2, 29))
    background[:, 28] = 1
    files = {
        "Annotations.txt": "".join(f"{c}&{v}&good&{s}&{e}\n" for c, v, s, e in ROWS).encode(),
        "audio_feature.h5": h5_bytes(avadataset=audio),
        "visual_feature.h5": h5_bytes(avadataset=visual),
        "audio_feature_noisy.h5": h5_bytes(avadataset=rng.random((2, 10, 128))),
        "visual_feature_noisy.h5": h5_bytes(avadataset=rng.random((2, 10, 7, 7, 512), dtype=np.float32)),
        "labels_noisy.h5": h5_bytes(avadataset=background),
    }
    for split in ORDERS:
        files[f"{split}_order.h5"] = h5_bytes(order=np.array(ORDERS[split], dtype=np.int64))
        files[f"{split}_order_match.h5"] = h5_bytes(order=np.array(MATCH_ORDERS[split], dtype=np.int64))
    return files


def expected_derived() -> dict[str, bytes]:
    """What the derived files must hold, written here independently of avepipe."""
    out = {"categories.txt": b"Bell\nDog\nCar\n"}
    for split, order in ORDERS.items():
        out[f"{split}Set.txt"] = "".join("&".join(map(str, (ROWS[i][0], ROWS[i][1], "good", *ROWS[i][2:]))) + "\n"
                                         for i in order).encode()
    return out


def entries_for(base_url: str, files: dict[str, bytes]) -> dict[str, dict]:
    """The real manifest with its URLs on ``base_url`` and its checksums those of ``files``."""
    entries = {}
    for name, entry in manifest().items():
        entry = dict(entry)
        if entry["kind"] == "download":
            entry.pop("alternates", None)
            if entry.get("url"):
                entry["url"] = f"{base_url}/{name}"
            if "sha256" in entry:
                entry["sha256"], entry["size"] = sha256(files[name]), len(files[name])
        else:
            entry["sha256"] = sha256(expected_derived()[name])
        entries[name] = entry
    return entries


@pytest.fixture(autouse=True)
def no_mirror_from_outside(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


@pytest.fixture()
def release(serve):
    files = release_files()
    server = serve(files)
    return server, files, entries_for(server.url, files)


def failures(outcomes) -> list[str]:
    return [item.message for item in outcomes if item.status == "failed"]


def test_download_verifies_derives_and_builds_the_features_train_reads(release, tmp_path, monkeypatch):
    server, files, entries = release
    folder = tmp_path / "ave"
    outcomes = download_ave(None, folder, entries=entries, backoff=0)
    assert failures(outcomes) == []
    status = {item.name: item.status for item in outcomes}
    assert status["Annotations.txt"] == "downloaded" and status["categories.txt"] == "derived"
    assert status["features.h5"] == "imported"
    assert "labels.h5" not in status and "AVE_Dataset.zip" not in status  # not default entries
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    for name, data in expected_derived().items():
        assert (folder / name).read_bytes() == data, name
    assert not list(folder.glob("*.part"))
    # Files without a published checksum: accepted on trust, recorded, reported loudly (official=False).
    records = json.loads((folder / CHECKSUMS_FILE).read_text())
    assert {name: records[name]["sha256"] for name in TOFU} == {name: sha256(files[name]) for name in TOFU}
    assert all(not item.official and "NOT verified" in item.message for item in outcomes if item.name in TOFU)
    with FeatureCache(folder / "features.h5", "r") as cache:
        assert sorted(cache.ids()) == [f"v{i}" for i in range(8)]
        with h5py.File(folder / "visual_feature.h5", "r") as f:
            np.testing.assert_array_equal(cache.get("v7").visual, f["avadataset"][7])

    # Run again: everything present and verified (the trusted files against their records), nothing fetched.
    served = len(server.log)
    again = download_ave(None, folder, entries=entries)
    assert failures(again) == [] and len(server.log) == served
    assert {item.status for item in again} == {"present"}
    assert all("recorded on first use" in item.message for item in again if item.name in TOFU)

    # train and evaluate read the folder with no further step (the default folder: $AVEPIPE_DATA_DIR).
    run = run_cli("train", "--model", "avel", "--dataset", folder, "--epochs", "1", "--batch-size", "4",
                  "--device", "cpu", "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    monkeypatch.setenv("AVEPIPE_DATA_DIR", str(folder))
    evaluated = run_cli("evaluate", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "over 2 rows" in evaluated.stdout  # the test split of test_order.h5


def test_checksum_mismatch_is_refused_and_nothing_is_kept(release, tmp_path):
    server, files, entries = release
    server.corrupt.add("test_order.h5")  # still an HDF5 file: only its checksum tells
    outcomes = download_ave(["test_order.h5"], tmp_path, entries=entries, backoff=0)
    [message] = failures(outcomes)
    corrupted = bytearray(files["test_order.h5"])
    corrupted[100] ^= 0xFF  # what the server sent
    assert message == (f"test_order.h5: checksum mismatch: expected sha256 {entries['test_order.h5']['sha256']}, "
                       f"got sha256 {sha256(bytes(corrupted))} (from {server.url}/test_order.h5); the download was "
                       "deleted")
    assert os.listdir(tmp_path) == []


def test_a_trusted_file_must_match_its_first_download_later(release, tmp_path):
    server, files, entries = release
    assert failures(download_ave(["visual_feature_noisy.h5"], tmp_path, entries=entries)) == []
    (tmp_path / "visual_feature_noisy.h5").unlink()
    server.files["visual_feature_noisy.h5"] = h5_bytes(avadataset=np.zeros((2, 10, 7, 7, 512), np.float32))
    [message] = failures(download_ave(["visual_feature_noisy.h5"], tmp_path, entries=entries))
    assert "checksum mismatch" in message and "recorded on first use" in message
    assert not (tmp_path / "visual_feature_noisy.h5").exists()
    assert not (tmp_path / "visual_feature_noisy.h5.part").exists()


def test_dropped_connection_is_resumed(release, tmp_path):
    server, files, entries = release
    server.cuts["train_order.h5"] = 1
    outcomes = download_ave(["train_order.h5"], tmp_path, entries=entries, backoff=0)
    assert failures(outcomes) == []
    assert (tmp_path / "train_order.h5").read_bytes() == files["train_order.h5"]
    half = len(files["train_order.h5"]) // 2
    assert server.requests_for("train_order.h5") == [(None, 200), (f"bytes={half}-", 206)]


def test_a_web_page_instead_of_the_file_is_refused_with_a_hint(release, tmp_path):
    server, files, entries = release
    server.files["audio_feature.h5"] = b"<!DOCTYPE html><html><head><title>Google Drive</title></head></html>"
    [message] = failures(download_ave(["audio_feature.h5"], tmp_path, entries=entries))
    assert message.startswith("audio_feature.h5: got a web page instead of the file")
    assert "--mirror FOLDER" in message
    assert not (tmp_path / "audio_feature.h5").exists() and not (tmp_path / CHECKSUMS_FILE).exists()


def test_alternate_location_after_a_failing_one_and_no_location_at_all(release, tmp_path):
    server, files, entries = release
    entries["audio_feature.h5"]["url"] = f"{server.url}/gone/audio_feature.h5"  # 404
    entries["audio_feature.h5"]["alternates"] = [f"{server.url}/audio_feature.h5"]
    outcomes = download_ave(["audio_feature.h5", "labels.h5"], tmp_path, entries=entries)
    assert (tmp_path / "audio_feature.h5").read_bytes() == files["audio_feature.h5"]
    [message] = failures(outcomes)  # labels.h5: no public location, no mirror
    assert message.startswith("labels.h5: no public download location is known") and "--mirror" in message


def test_mirror_folder_from_the_environment(release, tmp_path, monkeypatch):
    server, files, entries = release
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "Annotations.txt").write_bytes(files["Annotations.txt"])
    (mirror / "labels.h5").write_bytes(h5_bytes(avadataset=np.zeros((9, 10, 29))))
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    served = len(server.log)
    outcomes = download_ave(["Annotations.txt", "labels.h5", "categories.txt"], tmp_path / "ave", entries=entries)
    assert failures(outcomes) == [] and len(server.log) == served  # the server was never asked
    assert (tmp_path / "ave" / "categories.txt").read_bytes() == b"Bell\nDog\nCar\n"


def test_the_video_zip_is_unpacked_after_verification_and_never_outside(release, tmp_path):
    server, files, entries = release
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("AVE_Dataset/AVE/v0.mp4", b"not really a video")
        zf.writestr("AVE_Dataset/Annotations.txt", "Category&VideoID&Quality&StartTime&EndTime\n")
    server.files["AVE_Dataset.zip"] = archive.getvalue()
    folder = tmp_path / "ave"
    outcomes = download_ave(["AVE_Dataset.zip"], folder, entries=entries)
    assert [item.status for item in outcomes] == ["downloaded", "unpacked"]
    assert (folder / "AVE_Dataset" / "AVE" / "v0.mp4").read_bytes() == b"not really a video"
    assert [item.status for item in download_ave(["AVE_Dataset.zip"], folder, entries=entries)] == ["present",
                                                                                                  "present"]
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", b"x")
    server.files["AVE_Dataset.zip"] = evil.getvalue()
    other = tmp_path / "other"
    [message] = failures(download_ave(["AVE_Dataset.zip"], other, entries=entries))
    assert "would land outside" in message
    assert not (tmp_path / "outside.txt").exists()


def test_usage_errors(tmp_path):
    bad_name = run_cli("dataset", "download-ave", "features.zip", "--dir", tmp_path)
    assert bad_name.returncode == 2 and "unknown AVE file features.zip" in bad_name.stderr
    bad_mirror = run_cli("dataset", "download-ave", "--dir", tmp_path, "--mirror", tmp_path / "absent")
    assert bad_mirror.returncode == 2 and "neither a URL" in bad_mirror.stderr
    assert os.listdir(tmp_path) == []


def test_real_manifest_checksums_are_the_reference_files(ave_dir, tmp_path):
    """The manifest's checksums against the real files (through the CLI and a mirror folder): the order, noisy and
    annotation files verify, and the split files and categories.txt written from them are the released ones."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    # The repository's Annotations.txt has no header line; the reference copy has one.
    raw = (ave_dir / "Annotations.txt").read_bytes()
    header = b"Category&VideoID&Quality&StartTime&EndTime\n"
    assert raw.startswith(header)
    (mirror / "Annotations.txt").write_bytes(raw[len(header):])
    names = ["Annotations.txt", "labels_noisy.h5", "audio_feature_noisy.h5", "categories.txt"]
    for split in ("train", "val", "test"):
        names += [f"{split}_order.h5", f"{split}_order_match.h5", f"{split}Set.txt"]
    for name in names:
        if name.endswith(".h5"):
            (mirror / name).symlink_to(ave_dir / name)
    folder = tmp_path / "ave"
    result = run_cli("dataset", "download-ave", *names, "--dir", folder, "--mirror", mirror)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # every file verified against a published checksum: no warning
    for name in names:
        if name != "Annotations.txt":
            assert (folder / name).read_bytes() == (ave_dir / name).read_bytes(), name


def test_a_missing_dataset_names_the_fix(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Bell&v0&good&0&10\n")
    for name in ("audio_feature.h5", "visual_feature.h5"):
        (tmp_path / name).write_bytes(b"")
    result = run_cli("train", "--model", "avel", "--dataset", tmp_path, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: dataset {tmp_path}: no features.h5: run `avepipe dataset download-ave --dir {tmp_path}` (it builds "
        "features.h5 from the released features beside it)"]
