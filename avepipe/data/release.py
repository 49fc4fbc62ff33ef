"""The official AVE release in a dataset folder: ``avepipe dataset download-ave``.

Contract:

* The files and where they come from are the manifest ``avepipe/data/ave_manifest.json`` (name = file name). A
  ``download`` entry is fetched with the generic machinery of :mod:`avepipe.backbones.download` (``<file>.part``, HTTP
  Range resume, retries, size cap, atomic rename only after verification) from its URL, its ``alternates`` in turn
  (a ``.part`` left by one location is dropped before the next is tried), or ``<mirror>/<file>`` (``--mirror`` or
  ``$AVEPIPE_DATA_MIRROR``: a base URL or a local folder). An entry without any location fails unless a mirror is
  given.
* Verification: an entry's ``sha256``. An entry without one has no published checksum: its first download (or a copy
  already in the folder) is accepted **on trust**, its sha256 recorded in ``<folder>/checksums.json`` and reported
  loudly; every later download of it must match that record (delete the record to trust another copy). Every file
  also passes a content check (HDF5, zip, text) first, so a web page served instead of a file (Google Drive's
  quota/confirmation pages) is refused with a hint, never installed.
* ``derived`` entries are not released as files but written from downloaded ones: ``categories.txt`` (category names
  in their order of first appearance in Annotations.txt) and ``{train,val,test}Set.txt`` (the rows of
  ``{split}_order.h5``, in annotation format). Each must equal its manifest sha256, i.e. the released file.
* An ``unpack`` entry (the video zip) is unpacked into the folder after verification (members stay inside it).
* When ``audio_feature.h5`` and ``visual_feature.h5`` are present, ``features.h5`` (the cache ``train`` reads) is
  built from them with :func:`avepipe.data.released.import_released`, unless it already holds every annotated video.

Every selected item is attempted; problems are ``failed`` outcomes (one line naming the file), not exceptions. An
unknown name or a bad mirror raise :class:`~avepipe.errors.UsageError` before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

import h5py

from avepipe.backbones.download import Outcome, Progress, download_entry, has_checksum, mirror_base, source_url
from avepipe.cache import FeatureCache
from avepipe.data import ave
from avepipe.data.layout import ANNOTATIONS, FEATURES
from avepipe.data.released import RELEASED_SPEC, import_released
from avepipe.errors import AvepipeError, UsageError
from avepipe.files import read_records, write_atomic
from avepipe.locations import dataset_dir

MIRROR_ENV = "AVEPIPE_DATA_MIRROR"
CHECKSUMS_FILE = "checksums.json"  # trust-on-first-use records: file -> {sha256, size, url, date}
AUDIO, VISUAL = "audio_feature.h5", "visual_feature.h5"
WEB_PAGE_HINT = ("got a web page instead of the file (Google Drive answers large downloads with a quota or "
                 "confirmation page): download it in a browser and run again with --mirror FOLDER")

Note = Callable[[str], None]


def manifest() -> dict[str, dict[str, Any]]:
    entries = json.loads(resources.files("avepipe.data").joinpath("ave_manifest.json").read_text())
    return {name: entry for name, entry in entries.items() if not name.startswith("_")}


def select_names(names: Optional[list[str]], entries: Optional[dict[str, dict[str, Any]]] = None) -> list[str]:
    """Names in the order given (duplicates dropped); without names, the manifest's default entries."""
    entries = entries if entries is not None else manifest()
    unknown = [name for name in names or [] if name not in entries]
    if unknown:
        raise UsageError(f"unknown AVE file {', '.join(unknown)}: choose from {', '.join(entries)}")
    if names:
        return list(dict.fromkeys(names))
    return [name for name, entry in entries.items() if entry.get("default", True)]


# --- trust on first use ----------------------------------------------------------------------------------------------


def trust_records(directory: Path) -> dict[str, dict[str, Any]]:
    return read_records(Path(directory) / CHECKSUMS_FILE, UsageError, "file -> {sha256, ...}", ("sha256",))


def _record_trust(directory: Path, name: str, path: Path, sha256: str, url: str) -> None:
    records = trust_records(directory)
    records[name] = {"sha256": sha256, "size": path.stat().st_size, "url": url,
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomic(Path(directory) / CHECKSUMS_FILE, json.dumps(records, indent=2, sort_keys=True) + "\n")


# --- content checks --------------------------------------------------------------------------------------------------


def _looks_like_web_page(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<head" in head


def content_check(name: str) -> Callable[[Path], Optional[str]]:
    """A check of what a download must be, by file type: HDF5, zip, or UTF-8 text."""
    def check(path: Path) -> Optional[str]:
        if _looks_like_web_page(path):
            return WEB_PAGE_HINT
        if name.endswith(".h5") and not h5py.is_hdf5(path):
            return "not an HDF5 file"
        if name.endswith(".zip") and not zipfile.is_zipfile(path):
            return "not a zip file"
        if name.endswith(".txt"):
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                return "not a UTF-8 text file"
        return None
    return check


# --- download --------------------------------------------------------------------------------------------------------


def download_ave(names: Optional[list[str]] = None, directory: Optional[Path] = None, *,
                 mirror: Optional[str] = None, progress: Optional[Progress] = None, note: Optional[Note] = None,
                 force: bool = False, retries: int = 3, timeout: float = 30.0, backoff: float = 1.0,
                 entries: Optional[dict[str, dict[str, Any]]] = None) -> list[Outcome]:
    """Fetch, derive and import the selected AVE files into ``directory`` (default: the dataset folder)."""
    entries = entries if entries is not None else manifest()
    selected = select_names(names, entries)
    directory = Path(directory) if directory is not None else dataset_dir()
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    mirror_base(mirror)  # a bad mirror fails before any work
    trust_records(directory)  # an unreadable record file too
    say = note or (lambda message: None)
    outcomes: list[Outcome] = []
    for name in selected:
        entry = entries[name]
        if entry.get("kind", "download") != "download":
            continue
        outcome = _download_one(name, entry, directory, mirror, progress, force, retries, timeout, backoff)
        outcomes.append(outcome)
        if entry.get("unpack") and outcome.status != "failed":
            outcomes.append(_unpack(name, Path(outcome.path), outcome.sha256, say))
    for name in selected:
        if entries[name].get("kind") == "derived":
            outcomes.append(_derive(name, entries[name], directory, force))
    failed = {item.name for item in outcomes if item.status == "failed"}
    if (directory / AUDIO).is_file() and (directory / VISUAL).is_file() and not failed & {AUDIO, VISUAL, ANNOTATIONS}:
        outcomes.append(_import_features(directory, say))
    return outcomes


def _download_one(name: str, entry: dict[str, Any], directory: Path, mirror: Optional[str],
                  progress: Optional[Progress], force: bool, retries: int, timeout: float, backoff: float) -> Outcome:
    record = trust_records(directory).get(name)
    effective = dict(entry)
    if not has_checksum(entry) and record is not None:
        effective["sha256"] = record["sha256"]  # verified against what was trusted the first time
    if mirror:
        urls = [source_url(entry, mirror, env=MIRROR_ENV)]
    else:
        urls = [url for url in [entry.get("url"), *entry.get("alternates", [])] if url]
    if not urls:
        return Outcome(name, str(directory / entry["file"]), "failed",
                       f"{entry['file']}: no public download location is known ({entry.get('source', '')}); "
                       "give --mirror URL|FOLDER holding it")
    outcome = None
    for attempt, url in enumerate(urls):
        if attempt:  # never resume one server's partial bytes from another: the file could be a mix of two
            (directory / f"{entry['file']}.part").unlink(missing_ok=True)
        outcome = download_entry(name, effective, directory, url=url, progress=progress, force=force,
                                 retries=retries, timeout=timeout, backoff=backoff, check=content_check(entry["file"]),
                                 trust_first_use=True)
        if outcome.status != "failed" or Path(outcome.path).exists():  # a present file that does not match: final
            break
    assert outcome is not None
    if outcome.status == "failed" and len(urls) > 1:
        outcome = Outcome(outcome.name, outcome.path, "failed",
                          f"{outcome.message} (tried {len(urls)} locations: {', '.join(urls)})")
    if outcome.status != "failed" and not has_checksum(effective):
        path = Path(outcome.path)
        _record_trust(directory, name, path, outcome.sha256, "already in the folder" if outcome.status == "present"
                      else url)
        outcome = Outcome(name, outcome.path, outcome.status,
                          f"sha256 {outcome.sha256}: NOT verified, the release publishes no checksum; trusted on first "
                          f"use and recorded in {directory / CHECKSUMS_FILE}: later downloads must match it",
                          official=False, sha256=outcome.sha256)
    elif record is not None and outcome.status != "failed":
        outcome = Outcome(name, outcome.path, outcome.status, f"{outcome.message} against the sha256 recorded on first "
                          f"use in {directory / CHECKSUMS_FILE}", sha256=outcome.sha256)
    elif record is not None and outcome.status == "failed" and ("checksum mismatch" in outcome.message
                                                                or "exists but" in outcome.message):
        outcome = Outcome(name, outcome.path, "failed", f"{outcome.message}; the expected sha256 is the one recorded "
                          f"on first use in {directory / CHECKSUMS_FILE} (delete that record to trust another copy)")
    return outcome


def _unpack(name: str, archive: Path, sha256: str, say: Note) -> Outcome:
    """Unpack a verified zip into its folder, once (a marker file keeps the archive's sha256). Members are extracted
    into a temporary folder first, then moved into place; members outside the folder are refused."""
    directory = archive.parent
    marker = directory / f".{archive.name}.unpacked"
    label = f"{name} (unpacked)"
    if marker.is_file() and marker.read_text().strip() == sha256:
        return Outcome(label, str(directory), "present", "already unpacked")
    staging = directory / f".{archive.name}.unpack"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    return Outcome(label, str(archive), "failed", f"{archive}: member {member.filename!r} would "
                                   f"land outside {directory}; not unpacked")
            say(f"unpacking {archive.name}: {len(members)} entries")
            zf.extractall(staging)
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        return Outcome(label, str(archive), "failed", f"{archive}: cannot unpack ({exc})")
    moved, kept = 0, []
    for item in sorted(staging.iterdir()):
        target = directory / item.name
        if target.exists():
            kept.append(item.name)  # never overwrite what is already in the folder (e.g. our Annotations.txt)
            continue
        os.replace(item, target)
        moved += 1
    shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(sha256 + "\n")
    extra = f"; kept the existing {', '.join(kept)} (the archive's copies were not unpacked)" if kept else ""
    return Outcome(label, str(directory), "unpacked", f"{moved} top-level entries into {directory}{extra}")


# --- derived files ---------------------------------------------------------------------------------------------------


def categories_text(annotations: Path) -> str:
    """The category names of an annotation file in their order of first appearance, one a line."""
    names = list(dict.fromkeys(row.category for row in ave.read_annotations(annotations)))
    return "".join(f"{name}\n" for name in names)


def split_text(annotations: Path, order: Path) -> str:
    """The rows of an order file (indices into the annotations) in annotation format: a ``{split}Set.txt``."""
    rows = ave.read_annotations(annotations)
    indices = ave.read_order_h5(order)
    if indices.size and indices.max() >= len(rows):
        raise ValueError(f"{order}: row index {indices.max()} beyond the {len(rows)} rows of {annotations}")
    return "".join("&".join(map(str, rows[i].key())) + "\n" for i in indices)


def _derive(name: str, entry: dict[str, Any], directory: Path, force: bool) -> Outcome:
    target = directory / entry["file"]
    expected = entry.get("sha256")
    if target.is_file():
        sha = hashlib.sha256(target.read_bytes()).hexdigest()
        if expected is None or sha == expected:
            return Outcome(name, str(target), "present", "already present and verified" if expected else
                           "already present", sha256=sha)
        if not force:
            return Outcome(name, str(target), "failed",
                           f"{target} exists but is not the released file (sha256 {sha}, expected {expected}); move "
                           "it away, or use --force to rewrite it")
    how = entry["derive"]
    annotations = directory / ANNOTATIONS
    sources = [annotations] + ([directory / f"{how.split(':', 1)[1]}_order.h5"] if how.startswith("split:") else [])
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        return Outcome(name, str(target), "failed", f"{entry['file']}: cannot be written without {', '.join(missing)}")
    try:
        text = categories_text(annotations) if how == "categories" else split_text(annotations, sources[1])
    except (OSError, ValueError) as exc:
        return Outcome(name, str(target), "failed", f"{entry['file']}: {exc}")
    data = text.encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    if expected is not None and sha != expected:
        return Outcome(name, str(target), "failed",
                       f"{entry['file']}: written from {', '.join(p.name for p in sources)} it is not the released "
                       f"file (sha256 {sha}, expected {expected}); not written")
    write_atomic(target, data)
    return Outcome(name, str(target), "derived",
                   f"written from {', '.join(p.name for p in sources)}" + (", equal to the released file" if expected
                                                                            else ""), sha256=sha)


# --- the cache train reads -------------------------------------------------------------------------------------------


def _import_features(directory: Path, say: Note) -> Outcome:
    out = directory / FEATURES
    annotations = directory / ANNOTATIONS
    try:
        if out.is_file():
            wanted = {row.video_id for row in ave.read_annotations(annotations)}
            with FeatureCache(out, "r") as cache:
                complete = cache.spec == RELEASED_SPEC and wanted <= set(cache.ids())
            if complete:
                return Outcome(FEATURES, str(out), "present", f"already holds the {len(wanted)} annotated videos")
        say(f"importing {AUDIO} + {VISUAL} into {out} (the cache train and evaluate read)")
        stats = import_released(directory / AUDIO, directory / VISUAL, annotations, out)
    except (AvepipeError, OSError, ValueError) as exc:
        return Outcome(FEATURES, str(out), "failed", f"{out}: not built: {exc}")
    return Outcome(FEATURES, str(out), "imported",
                   f"{stats['videos']} videos from {stats['rows']} rows of the released features")
