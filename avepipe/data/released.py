"""Import the officially released AVE feature files into the cache format (``avepipe dataset import-ave``)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from avepipe.cache import FeatureCache
from avepipe.data.ave import read_annotations
from avepipe.errors import DataError

RELEASED_SPEC = {
    "spec_version": 1,
    "sampling": "ave",
    "visual": "vgg19-keras-imagenet/block5_pool/mean-of-16",
    "audio": "vggish/fc2-relu",
    "vgg19_sha256": "released-ave-features",
    "vggish_sha256": "released-ave-features",
}
DATASET_KEY = "avadataset"


def _open_h5(path: str | os.PathLike) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot open as HDF5 ({exc})") from None


def import_released(audio_path: str | os.PathLike, visual_path: str | os.PathLike, annotations_path: str | os.PathLike,
                    out: str | os.PathLike) -> dict[str, int]:
    """Rows are in Annotations order; rows of the same video share one cache entry (the first row's features).

    Files that cannot be read or do not fit the annotations raise :class:`DataError`; cache problems ``CacheError``."""
    try:
        annotations = read_annotations(annotations_path)
    except (OSError, ValueError) as exc:  # unreadable file, malformed rows (avepipe.data.ave names file and line)
        raise DataError(str(exc)) from None
    with _open_h5(audio_path) as fa, _open_h5(visual_path) as fv:
        for path, f in ((audio_path, fa), (visual_path, fv)):
            if DATASET_KEY not in f:
                raise DataError(f"{path}: no dataset {DATASET_KEY!r} (keys: {', '.join(f.keys())})")
        audio, visual = fa[DATASET_KEY], fv[DATASET_KEY]
        if audio.shape[0] != len(annotations) or visual.shape[0] != len(annotations):
            raise DataError(f"{audio_path} has {audio.shape[0]} rows, {visual_path} {visual.shape[0]}, "
                            f"{annotations_path} {len(annotations)}: they must match (Annotations order)")
        if audio.shape[1:] != (10, 128) or visual.shape[1:] != (10, 7, 7, 512):
            raise DataError(f"unexpected shapes {audio.shape} / {visual.shape} (want [N,10,128] / [N,10,7,7,512])")
        stats = {"rows": len(annotations), "videos": 0, "shared_rows": 0, "shared_rows_differing": 0}
        first_row: dict[str, int] = {}
        with FeatureCache(out, "a") as cache:
            cache.ensure_spec(RELEASED_SPEC)
            for row, annotation in enumerate(annotations):
                vid = annotation.video_id
                a = np.asarray(audio[row], dtype=np.float32)
                v = np.asarray(visual[row], dtype=np.float32)
                if vid in first_row:
                    stats["shared_rows"] += 1
                    earlier = first_row[vid]
                    if not (np.array_equal(a, audio[earlier]) and np.array_equal(v, visual[earlier])):
                        stats["shared_rows_differing"] += 1
                    continue
                first_row[vid] = row
                cache.put(vid, v, a, {"source_path": str(Path(visual_path).resolve()), "row": row, "seconds": 10,
                                      "duration": 10.0, "sampling": "ave", "origin": "released AVE feature files"})
                cache.maybe_compact()
                stats["videos"] += 1
    return stats
