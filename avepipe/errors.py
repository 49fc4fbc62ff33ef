"""One error tree for the whole package.

Every problem a user must resolve is an :class:`AvepipeError`; its ``str()`` is one line naming the file or option and
the problem, and its ``exit_code`` is what the CLI exits with (the CLI maps errors to exit codes in one place). Modules
raise the most specific class where the problem is found and never re-wrap one error class in another.

Exit codes (all commands): 0 success, 1 some videos failed (per-video :class:`MediaError`, listed and recorded),
2 usage / data / weights / cache problems found before or instead of the work, 3 internal error (anything that is not
an :class:`AvepipeError` is a bug), 130 interrupted (Ctrl-C), 141 the output pipe was closed (`| head`), 143 terminated
(SIGTERM).
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (docker stop, Kubernetes, SLURM): 128 + 15
EXIT_PIPE_CLOSED = 141  # the output pipe was closed by its reader (`avepipe ... | head`): 128 + SIGPIPE


class AvepipeError(Exception):
    """Base of every error a user must resolve (exit code 2 unless a subclass says otherwise)."""

    exit_code = EXIT_USAGE


class UsageError(AvepipeError):
    """Bad options or inputs detected before any work starts."""


class DataError(AvepipeError):
    """Annotations, splits, labels, features or checkpoints that cannot be used as given."""


class CheckpointError(DataError):
    """A checkpoint that is unreadable, not an avepipe checkpoint, or does not fit the data it is used with."""


class TrainingError(AvepipeError):
    """A training run that cannot go on: its loss or weights stopped being finite (NaN / inf)."""


class WeightsError(AvepipeError):
    """Backbone weights missing, unreadable, of the wrong format, or failing their checksum."""


class DownloadError(WeightsError):
    """A weights download that could not complete (network, mirror, checksum)."""


class CacheError(AvepipeError):
    """A feature cache problem the user must resolve (not an avepipe cache, locked, read-only...)."""


class CacheLockedError(CacheError):
    """Another process holds the cache's writer lock."""


class SpecMismatchError(CacheError):
    """The cache was built with another feature spec than this run's."""


class ResourceError(AvepipeError):
    """The machine ran out of something the run needs (memory): not a bug; the message names the remedy."""


class MediaError(AvepipeError):
    """A video that cannot be used. Per video: a batch records it and goes on (exit code 1 at the end).

    ``str()`` is ``"<path>: <kind>: <reason>"``; subclasses set ``kind`` (see :mod:`avepipe.media`)."""

    kind = "media error"
    exit_code = EXIT_SOME_FAILED
    transient = False  # True: the cause was not the file (a killed decoder); the next run retries the video

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason.strip().splitlines()[0] if reason.strip() else self.kind
        super().__init__(f"{self.path}: {self.kind}: {self.reason}")


class DataWarning(UserWarning):
    """Training runs, but on less than the method's published recipe uses (e.g. the weak task without the released
    background-only videos); the command line prints it loudly and metrics.json records what was missing."""


class DeviceWarning(UserWarning):
    """``--device auto`` found no usable GPU and runs on the CPU; the message says why (the command line prints it
    loudly: a GPU job that silently runs on the CPU is hours slower)."""
