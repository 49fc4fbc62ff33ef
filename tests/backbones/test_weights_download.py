"""`avepipe weights` download / import / verify / list against a local HTTP server serving the real weight files.

The server (the ``serve`` fixture: tests.helpers.FileServer on 127.0.0.1, a free port) supports Range requests and
can misbehave on purpose: cut the connection half way, ignore Range headers, send wrong bytes. The official
checksums are the manifest's; the real files come from ``$AVEPIPE_WEIGHTS_DIR``. Generic logic (prefix checksums,
416, file:// mirrors) uses small self-made files.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest

from avepipe.backbones.download import MIRROR_ENV, download_entry, import_file
from avepipe.backbones.weights import UNOFFICIAL_FILE, manifest, unofficial_records, weights_status
from tests.helpers import run_cli

VGG19 = manifest()["vgg19"]
PCA = manifest()["vggish_pca"]


@pytest.fixture(autouse=True)
def no_mirror_from_outside(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


@pytest.fixture(scope="module")
def pca_bytes(weights_dir: Path) -> bytes:
    path = weights_dir / PCA["file"]
    if not path.is_file():
        pytest.fail(f"missing real VGGish PCA parameters: {path}")
    return path.read_bytes()


@pytest.fixture()
def target(tmp_path, monkeypatch) -> Path:
    """An empty weights dir, also the one the CLI sees."""
    directory = tmp_path / "weights"
    monkeypatch.setenv("AVEPIPE_WEIGHTS_DIR", str(directory))
    return directory


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tiny_entry(data: bytes, **extra) -> dict:
    """A manifest-like entry for a self-made file, checked by sha256 prefix like the vggish entry."""
    return {"file": "tiny-weights.bin", "url": "http://127.0.0.1:9/unused", "sha256_prefix": sha256(data)[:8], **extra}


# ---------------------------------------------------------------------------------------------------------------------
# download through the CLI: real files, real checksums


def test_download_from_mirror_checks_every_file_and_skips_verified_ones_on_rerun(serve, target, vgg19_weights,
                                                                                 pca_bytes):
    vgg19_bytes = vgg19_weights.read_bytes()
    server = serve({VGG19["file"]: vgg19_bytes, PCA["file"]: pca_bytes})  # no vggish: 404
    server.corrupt.add(PCA["file"])
    wrong = pca_bytes[:100] + bytes([pca_bytes[100] ^ 0xFF]) + pca_bytes[101:]

    result = run_cli("weights", "download", "--mirror", server.url + "/")
    assert result.returncode == 1, result.stderr
    assert hashlib.md5((target / VGG19["file"]).read_bytes()).hexdigest() == VGG19["md5"]
    assert sorted(p.name for p in target.iterdir()) == [VGG19["file"]]  # no .npz, no .part, nothing else
    lines = error_lines(result.stderr)
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("error: vggish-10086976.pth: HTTP 404")  # manifest order: vgg19, vggish, vggish_pca
    assert lines[1].startswith(f"error: {PCA['file']}: checksum mismatch: expected sha256 {PCA['sha256']}, "
                               f"got sha256 {sha256(wrong)}")

    server.corrupt.clear()
    server.log.clear()
    result = run_cli("weights", "download", "--mirror", server.url)  # no trailing slash this time
    assert result.returncode == 1, result.stderr  # vggish is still not to be had
    assert server.requests_for(VGG19["file"]) == []  # verified, so not fetched again
    assert "already present and verified" in result.stdout
    assert (target / PCA["file"]).read_bytes() == pca_bytes
    assert not (target / (PCA["file"] + ".part")).exists()

    server.log.clear()
    result = run_cli("weights", "download", "vgg19", "vggish_pca")
    assert result.returncode == 0, result.stderr
    assert server.log == []

    result = run_cli("weights", "list")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 2}
    assert "official" in rows["vgg19"] and "official" in rows["vggish_pca"] and "80.1 MB" in rows["vgg19"]
    assert " no " in rows["vggish"] and VGG19["url"][:60] in rows["vgg19"]


def test_mirror_from_the_environment(serve, target, pca_bytes, monkeypatch):
    server = serve({PCA["file"]: pca_bytes})
    monkeypatch.setenv(MIRROR_ENV, server.url)
    result = run_cli("weights", "download", "vggish_pca")
    assert result.returncode == 0, result.stderr
    assert server.requests_for(PCA["file"]) == [(None, 200)]
    assert (target / PCA["file"]).read_bytes() == pca_bytes


def test_unknown_name_is_a_usage_error(target):
    result = run_cli("weights", "download", "vgg19", "vgg16")
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: unknown weights vgg16: choose from vgg19, vggish, vggish_pca"]


# ---------------------------------------------------------------------------------------------------------------------
# dropped connections, resume, restart


def test_dropped_connection_is_resumed_with_a_range_request(serve, tmp_path, pca_bytes):
    server = serve({PCA["file"]: pca_bytes})
    server.cuts[PCA["file"]] = 1
    events = []
    outcome = download_entry("vggish_pca", PCA, tmp_path, mirror=server.url, retries=2, backoff=0,
                             progress=lambda event, fields: events.append((event, fields)))
    assert outcome.status == "downloaded", outcome.message
    assert (tmp_path / PCA["file"]).read_bytes() == pca_bytes
    half = len(pca_bytes) // 2
    assert server.requests_for(PCA["file"]) == [(None, 200), (f"bytes={half}-", 206)]
    assert [f["resumed"] for e, f in events if e == "start"] == [0, half]
    assert [e for e, _ in events].count("retry") == 1
    assert sum(f["bytes"] for e, f in events if e == "advance") == len(pca_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PCA["file"]]


def test_dropped_connection_restarts_cleanly_when_the_server_ignores_ranges(serve, tmp_path, pca_bytes):
    server = serve({PCA["file"]: pca_bytes})
    server.cuts[PCA["file"]] = 1
    server.ignore_range = True
    outcome = download_entry("vggish_pca", PCA, tmp_path, mirror=server.url, retries=1, backoff=0)
    assert outcome.status == "downloaded", outcome.message
    assert server.requests_for(PCA["file"]) == [(None, 200), (f"bytes={len(pca_bytes) // 2}-", 200)]
    assert (tmp_path / PCA["file"]).read_bytes() == pca_bytes  # not half a file + the whole file


def test_exhausted_retries_leave_only_a_part_file_that_a_rerun_resumes(serve, tmp_path, pca_bytes):
    server = serve({PCA["file"]: pca_bytes})
    server.cuts[PCA["file"]] = 10
    final, part = tmp_path / PCA["file"], tmp_path / (PCA["file"] + ".part")
    outcome = download_entry("vggish_pca", PCA, tmp_path, mirror=server.url, retries=1, backoff=0)
    assert outcome.status == "failed"
    assert "\n" not in outcome.message and "download failed after 2 attempts" in outcome.message
    assert str(part) in outcome.message
    assert not final.exists()
    kept = part.read_bytes()
    assert 0 < len(kept) < len(pca_bytes) and kept == pca_bytes[: len(kept)]
    assert weights_status("vggish_pca", tmp_path).state == "missing"
    assert weights_status("vggish_pca", tmp_path).partial == len(kept)

    server.cuts.clear()
    outcome = download_entry("vggish_pca", PCA, tmp_path, mirror=server.url, retries=0, backoff=0)
    assert outcome.status == "downloaded", outcome.message
    assert server.requests_for(PCA["file"])[-1] == (f"bytes={len(kept)}-", 206)
    assert final.read_bytes() == pca_bytes and not part.exists()


# ---------------------------------------------------------------------------------------------------------------------
# generic entries: prefix checksums, complete .part files, present files, file:// mirrors


def test_wrong_bytes_fail_with_both_checksums_and_leave_nothing(serve, tmp_path):
    data = bytes(range(256)) * 300
    entry = tiny_entry(data)
    server = serve({entry["file"]: data})
    server.corrupt.add(entry["file"])
    outcome = download_entry("tiny", entry, tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "failed"
    wrong = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    assert outcome.message.startswith(f"tiny-weights.bin: checksum mismatch: expected sha256 prefix "
                                      f"{entry['sha256_prefix']}, got sha256 {sha256(wrong)}")
    assert list(tmp_path.iterdir()) == []


def test_a_complete_part_file_is_verified_without_downloading_again(serve, tmp_path):
    data = b"weights" * 5000
    server = serve({"tiny-weights.bin": data})
    (tmp_path / "tiny-weights.bin.part").write_bytes(data)
    # no size in the entry: the server answers the Range past the end with 416
    outcome = download_entry("tiny", tiny_entry(data), tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "downloaded", outcome.message
    assert server.log == [("tiny-weights.bin", f"bytes={len(data)}-", 416)]
    assert (tmp_path / "tiny-weights.bin").read_bytes() == data
    # with a size in the entry no request is made at all
    (tmp_path / "tiny-weights.bin").rename(tmp_path / "tiny-weights.bin.part")
    server.log.clear()
    outcome = download_entry("tiny", tiny_entry(data, size=len(data)), tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "downloaded" and server.log == []


def test_a_present_file_that_is_not_official_is_kept_unless_forced(serve, tmp_path):
    data = b"official" * 4000
    server = serve({"tiny-weights.bin": data})
    (tmp_path / "tiny-weights.bin").write_bytes(b"my own weights")
    outcome = download_entry("tiny", tiny_entry(data), tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "failed" and "is not the official file" in outcome.message and "--force" in outcome.message
    assert (tmp_path / "tiny-weights.bin").read_bytes() == b"my own weights" and server.log == []
    outcome = download_entry("tiny", tiny_entry(data), tmp_path, mirror=server.url, force=True, backoff=0)
    assert outcome.status == "downloaded"
    assert (tmp_path / "tiny-weights.bin").read_bytes() == data


def test_file_url_mirror(tmp_path):
    data = b"local mirror" * 1000
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "tiny-weights.bin").write_bytes(data)
    outcome = download_entry("tiny", tiny_entry(data), tmp_path / "w", mirror=(tmp_path / "mirror").as_uri(), backoff=0)
    assert outcome.status == "downloaded", outcome.message
    assert (tmp_path / "w" / "tiny-weights.bin").read_bytes() == data
    missing = download_entry("tiny", tiny_entry(data), tmp_path / "w2", mirror=(tmp_path / "none").as_uri(), backoff=0)
    assert missing.status == "failed" and "\n" not in missing.message


# ---------------------------------------------------------------------------------------------------------------------
# import, verify, list


def test_import_recognises_the_official_file_by_checksum(target, weights_dir, pca_bytes):
    result = run_cli("weights", "import", weights_dir / PCA["file"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == [PCA["file"]]  # no temporary copy, no unofficial record
    assert (target / PCA["file"]).read_bytes() == pca_bytes
    assert f"vggish_pca: imported {target / PCA['file']}" in result.stdout


def test_import_refuses_an_altered_file_unless_forced_and_records_it_as_unofficial(target, tmp_path, weights_dir,
                                                                                    pca_bytes):
    altered = tmp_path / "src" / PCA["file"]
    altered.parent.mkdir()
    altered_bytes = pca_bytes[:-1] + bytes([pca_bytes[-1] ^ 1])
    altered.write_bytes(altered_bytes)

    result = run_cli("weights", "import", altered)  # matches nothing, and no --as
    assert result.returncode == 1
    digest = sha256(altered_bytes)
    assert error_lines(result.stderr) == [f"error: {altered} matches no manifest entry (sha256 {digest}); "
                                          "to use it anyway: --as NAME --force (recorded as unofficial)"]
    result = run_cli("weights", "import", altered, "--as", "vggish_pca")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: {altered} is not the official vggish_pca file: expected sha256 {PCA['sha256']}, got sha256 "
        f"{sha256(altered_bytes)}; use --force to import it anyway (recorded as unofficial)"]
    assert list(target.iterdir()) == []  # refused before anything got a real name (and the copy is gone)

    result = run_cli("weights", "import", altered, "--force")  # the entry is told by the file name
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "NOT the published AVE features" in result.stderr
    assert (target / PCA["file"]).read_bytes() == altered_bytes
    record = unofficial_records(target)["vggish_pca"]
    assert record["sha256"] == sha256(altered_bytes) and record["source"] == str(altered.resolve())
    assert record["file"] == PCA["file"] and datetime.fromisoformat(record["date"]).tzinfo is not None

    for command in ("verify", "list"):
        result = run_cli("weights", command)
        assert result.returncode == 0, result.stderr
        row = next(line for line in result.stdout.splitlines() if "vggish_pca" in line)
        assert "unofficial" in row, result.stdout

    tampered = b"changed behind avepipe's back"
    (target / PCA["file"]).write_bytes(tampered)
    result = run_cli("weights", "verify")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"error: {target / PCA['file']}: checksum mismatch: expected sha256 {PCA['sha256']}, got sha256 "
        f"{sha256(tampered)}"]
    assert "MISMATCH" in result.stdout

    outcome = import_file(weights_dir / PCA["file"])  # the official file replaces it and the record goes
    assert outcome.status == "imported" and outcome.official
    assert not (target / UNOFFICIAL_FILE).exists()
    assert weights_status("vggish_pca").state == "official"


def test_import_usage_errors(target, tmp_path):
    stray = tmp_path / "stray.bin"
    stray.write_bytes(b"not weights")
    result = run_cli("weights", "import", stray, "--force")
    assert result.returncode == 2
    assert "say which it is with --as NAME" in error_lines(result.stderr)[0]
    result = run_cli("weights", "import", tmp_path / "absent.h5")
    assert result.returncode == 2 and "no such file" in result.stderr
    assert not target.exists() or list(target.iterdir()) == []


def test_verify_reports_missing_files_and_fails_only_for_named_ones(target, weights_dir, monkeypatch):
    result = run_cli("weights", "verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("│ missing ") == 3
    result = run_cli("weights", "verify", "vgg19")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {target / VGG19['file']}: missing (avepipe weights download)"]

    monkeypatch.setenv("AVEPIPE_WEIGHTS_DIR", str(weights_dir))  # the real files
    result = run_cli("weights", "verify", "vgg19", "vggish_pca")
    assert result.returncode == 0, result.stderr
    statuses = {name: weights_status(name).state for name in ("vgg19", "vggish_pca")}
    assert statuses == {"vgg19": "official", "vggish_pca": "official"}
    assert result.stdout.count("│ official ") == 2


def test_unreadable_unofficial_record_is_a_usage_error(target):
    target.mkdir()
    (target / UNOFFICIAL_FILE).write_text("{not json")
    result = run_cli("weights", "list")
    assert result.returncode == 2 and "unofficial.json: unreadable" in result.stderr
    (target / UNOFFICIAL_FILE).write_text(json.dumps({"vggish": "not a record"}))
    assert run_cli("weights", "verify").returncode == 2


# ---------------------------------------------------------------------------------------------------------------------
# the trust issue: downloads capped at the manifest size, --mirror as a local folder


def test_endless_body_is_cut_at_the_manifest_size(serve, tmp_path, monkeypatch):
    data = b"0123456789abcdef" * 4096
    server = serve({"tiny-weights.bin": data})
    server.endless.add("tiny-weights.bin")
    outcome = download_entry("tiny", tiny_entry(data, size=len(data)), tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "failed"
    assert "\n" not in outcome.message and f"sent more than the {len(data)} bytes the manifest gives" in outcome.message
    assert list(tmp_path.iterdir()) == []  # nothing kept: no .part growing on disk
    # An entry without a size is capped too (at UNSIZED_LIMIT).
    monkeypatch.setattr("avepipe.backbones.download.UNSIZED_LIMIT", 3 * len(data))
    outcome = download_entry("tiny", tiny_entry(data), tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "failed" and f"sent more than the {3 * len(data)} bytes allowed" in outcome.message
    assert list(tmp_path.iterdir()) == []
    # A Content-Length above the size is refused before anything is written.
    server.endless.clear()
    outcome = download_entry("tiny", tiny_entry(data, size=len(data) - 1), tmp_path, mirror=server.url, backoff=0)
    assert outcome.status == "failed" and f"announces {len(data)} bytes" in outcome.message
    assert list(tmp_path.iterdir()) == []


def test_mirror_as_a_local_folder_is_copied_and_verified(tmp_path, target, pca_bytes):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / PCA["file"]).write_bytes(pca_bytes)
    result = run_cli("weights", "download", "vggish_pca", "--mirror", folder)  # a plain path, not file://
    assert result.returncode == 0, result.stderr
    assert (target / PCA["file"]).read_bytes() == pca_bytes
    (target / PCA["file"]).unlink()
    (folder / PCA["file"]).write_bytes(pca_bytes[:-1] + b"X")
    result = run_cli("weights", "download", "vggish_pca", "--mirror", folder)
    assert result.returncode == 1 and "checksum mismatch" in result.stderr
    assert not (target / PCA["file"]).exists()
    result = run_cli("weights", "download", "vggish_pca", "--mirror", tmp_path / "no-such-folder")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: --mirror {tmp_path / 'no-such-folder'}: neither a URL (http://, "
                                          "https://, file://) nor an existing folder"]
