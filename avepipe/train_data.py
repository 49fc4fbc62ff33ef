"""The data a training or evaluation run reads: where the files are (:class:`DataPaths`: features, annotations,
categories, split lists, the weak task's released background-only videos) and the features with the labelled rows of
each split, on a device (:func:`load_task_data`). Unusable data files raise :class:`~avepipe.errors.DataError`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from avepipe.checkpoint import check_categories
from avepipe.data import ave
from avepipe.data.features import FeatureTable, load_feature_table
from avepipe.data.tasks import RowSet, build_rows, with_noisy_videos
from avepipe.errors import DataError, DataWarning, UsageError
from avepipe.train_config import PathLike

# The released background-only videos of the weak task, looked for beside the annotations (or in --splits).
NOISY_FILES = ("audio_feature_noisy.h5", ("visual_feature_noisy.h5", "video_feature_noisy.h5"), "labels_noisy.h5")


@dataclass
class DataPaths:
    features: PathLike
    annotations: PathLike
    categories: PathLike | None = None  # default: categories.txt beside the annotations
    splits: PathLike | None = None  # folder with {split}_order[_match].h5 or {split}Set.txt; default: the annotations'
    # weak task only: the released extra background videos (audio_feature_noisy.h5, visual_feature_noisy.h5,
    # labels_noisy.h5; key avadataset) added to the training split. None: used whenever the three files sit in the
    # splits folder or beside the annotations (auto_noisy), as AVEL's, DMIN's, CMBS's and CPSP's released weak training.
    noisy: tuple[PathLike, PathLike, PathLike] | None = None
    auto_noisy: bool = True

    def categories_path(self) -> Path:
        return Path(self.categories) if self.categories else Path(self.annotations).parent / "categories.txt"

    def splits_dir(self) -> Path:
        return Path(self.splits) if self.splits else Path(self.annotations).parent

    def find_noisy(self) -> tuple[tuple[Path, Path, Path] | None, list[str]]:
        """The noisy set's (audio, visual, labels) files, and the names missing when they are not all found.

        Explicit ``noisy`` files win; else the first folder (splits, then the annotations' folder) holding all
        three. The visual file may be named visual_feature_noisy.h5 or (AVEL's weak script) video_feature_noisy.h5."""
        if self.noisy:
            return tuple(Path(p) for p in self.noisy), []  # type: ignore[return-value]
        missing: list[str] = [NOISY_FILES[0], NOISY_FILES[1][0], NOISY_FILES[2]]
        if not self.auto_noisy:
            return None, missing
        for folder in dict.fromkeys([self.splits_dir(), Path(self.annotations).parent]):
            found, lacking = [], []
            for names in NOISY_FILES:
                names = (names,) if isinstance(names, str) else names
                hit = next((folder / n for n in names if (folder / n).is_file()), None)
                found.append(hit)
                if hit is None:
                    lacking.append(str(folder / names[0]))
            if not lacking:
                return tuple(found), []  # type: ignore[return-value]
            if len(lacking) < len(missing):
                missing = lacking
        return None, missing


@dataclass
class TaskData:
    table: FeatureTable
    splits: dict[str, RowSet]
    categories: list[str]
    background_videos: int = 0  # weak task: released background-only videos added to train


def background_warning(missing: list[str]) -> str:
    return ("weak training WITHOUT the released background-only videos (missing: " + ", ".join(missing) + "): no "
            "training target ever says 'background', so every second tends to be labelled with the video's event and "
            "accuracy falls short of the papers' weak numbers (AVEL, DMIN, CMBS, CPSP all train with these 178 "
            "videos). Put audio_feature_noisy.h5, visual_feature_noisy.h5 and labels_noisy.h5 beside the annotations "
            "or pass --noisy-audio/--noisy-visual/--noisy-labels. metrics.json records background_videos = 0.")


def load_task_data(paths: DataPaths, task: str, splits: tuple[str, ...], device: torch.device,
                   trained_on: tuple[dict[str, Any], PathLike] | None = None) -> TaskData:
    """The features and labelled rows of ``splits``. ``trained_on`` (a checkpoint and its path): the data's categories
    must be the checkpoint's, and labels are numbered in the checkpoint's order (a reordered categories.txt is mapped
    by name; other categories raise :class:`~avepipe.errors.CheckpointError`)."""
    try:  # avepipe.data.ave reads plain files: its ValueError / OSError name the file (and line)
        categories = ave.read_categories(paths.categories_path())
        if trained_on is not None:
            categories = check_categories(trained_on[0], trained_on[1], categories, paths.categories_path())
        annotations = ave.read_annotations(paths.annotations, categories)
        kind = "cml" if task == "cml" else "sel"
        split_rows = {s: ave.load_split(kind, s, paths.splits_dir()) for s in splits}
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from None
    if any(r.size and r.max() >= len(annotations) for r in split_rows.values()):
        raise DataError(f"{paths.splits_dir()}: split rows beyond the {len(annotations)} rows of {paths.annotations}")
    needed = [annotations[r].video_id for rows in split_rows.values() for r in rows]
    table = load_feature_table(paths.features, needed).to(device)
    rowsets = {s: build_rows(annotations, rows, categories, table, task).to(device) for s, rows in split_rows.items()}
    if paths.noisy and task != "weak" and "train" in rowsets:
        raise UsageError("the noisy background videos are extra data for --task weak only")
    background = 0
    if task == "weak" and "train" in rowsets:
        files, missing = paths.find_noisy()
        if files is None:
            warnings.warn(background_warning(missing), DataWarning, stacklevel=2)
        else:
            visual, audio, video_label = read_noisy(*files)
            table, rowsets["train"] = with_noisy_videos(table, rowsets["train"], visual, audio, video_label)
            background = int(video_label.shape[0])
    return TaskData(table, rowsets, categories, background)


def read_noisy(audio_path: PathLike, visual_path: PathLike, labels_path: PathLike,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released noisy set: audio [M,10,128], visual [M,10,7,7,512], one-hot video labels [M,29] (key avadataset)."""
    arrays = []
    for path in (audio_path, visual_path, labels_path):
        try:
            with h5py.File(path, "r") as f:
                arrays.append(torch.from_numpy(np.asarray(f["avadataset"][()], dtype=np.float32)))
        except (OSError, KeyError) as exc:
            raise DataError(f"{path}: cannot read dataset 'avadataset' ({exc})") from None
        finite = torch.isfinite(arrays[-1].reshape(len(arrays[-1]), -1)).all(1)
        if not finite.all():
            raise DataError(f"{path}: NaN or inf in row {int((~finite).nonzero()[0])} of 'avadataset'")
    audio, visual, labels = arrays
    if not (audio.shape[0] == visual.shape[0] == labels.shape[0]) or labels.shape[1:] != (ave.NUM_CLASSES,):
        raise DataError(f"noisy set shapes do not fit: audio {tuple(audio.shape)}, visual {tuple(visual.shape)}, "
                         f"labels {tuple(labels.shape)}")
    return visual, audio, labels.argmax(1)
