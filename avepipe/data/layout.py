"""A dataset folder and what ``train`` / ``evaluate`` read from it.

A dataset folder (``--dataset DIR``, default :func:`avepipe.locations.dataset_dir`) holds ``Annotations.txt``, the
split files (``{split}_order.h5`` / ``{split}_order_match.h5`` or ``{split}Set.txt``), ``categories.txt``, optionally
the noisy background set, and ``features.h5``: the feature cache, built by ``avepipe dataset download-ave`` from the
released features or by ``avepipe extract VIDEOS --cache DIR/features.h5`` for a dataset of your own.

:func:`dataset_inputs` fills in the features and annotations a command was not given explicitly; explicit paths are
returned unchanged (their own problems are reported where they are read; ``--dataset`` with both of them is a
:class:`~avepipe.errors.UsageError`, as it would be ignored). Missing files of the folder raise one
:class:`~avepipe.errors.DataError` naming what is missing and the command that makes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from avepipe.errors import DataError, UsageError
from avepipe.locations import dataset_dir

FEATURES = "features.h5"
ANNOTATIONS = "Annotations.txt"
RELEASED_FEATURES = ("audio_feature.h5", "visual_feature.h5")


def dataset_inputs(dataset: Optional[Path], features: Optional[Path], annotations: Optional[Path]
                   ) -> tuple[Path, Path]:
    """(features, annotations): the explicit ones, else ``DIR/features.h5`` and ``DIR/Annotations.txt``."""
    if features is not None and annotations is not None:
        if dataset is not None:
            raise UsageError(f"--dataset {dataset} is not used when both --features and --annotations are given")
        return Path(features), Path(annotations)
    given_features, given_annotations = features is not None, annotations is not None
    folder = Path(dataset) if dataset is not None else dataset_dir()
    features = Path(features) if features is not None else folder / FEATURES
    annotations = Path(annotations) if annotations is not None else folder / ANNOTATIONS
    missing = [path for path, given in ((features, given_features), (annotations, given_annotations))
               if not given and not path.is_file()]
    if missing:
        raise DataError(f"dataset {folder}: no {' and no '.join(p.name for p in missing)}: {_fix(folder, missing)}")
    return features, annotations


def _fix(folder: Path, missing: list[Path]) -> str:
    names = {path.name for path in missing}
    download = f"avepipe dataset download-ave --dir {folder}"
    if names == {FEATURES} and all((folder / name).is_file() for name in RELEASED_FEATURES):
        return f"run `{download}` (it builds {FEATURES} from the released features beside it)"
    if names == {FEATURES}:
        videos = f"--list {folder / 'videos.txt'}" if (folder / "videos.txt").is_file() else "VIDEOS"
        return (f"run `avepipe extract {videos} --cache {folder / FEATURES}` for your videos, or `{download}` for the "
                "AVE release")
    return (f"run `{download}` for the AVE release, or `avepipe dataset init --csv FILE --videos VIDEOS --out "
            f"{folder}` then `avepipe extract --list {folder / 'videos.txt'} --cache {folder / FEATURES}` for your own "
            "videos (or give --features and --annotations)")
