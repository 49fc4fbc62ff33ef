"""Fault injection for tests: ``AVEPIPE_FAULT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time (default
the first) it reaches the write point ``<point>``.

The points sit at the moments a crash is most harmful (a staged entry, a partial chunk, a compaction, a merge output,
a decoded store being written); tests/test_faults.py kills a real subprocess at each and checks that the next run gives
exactly what an uninterrupted run gives. Unset (every normal run), :func:`fault_point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def fault_point(name: str) -> None:
    wanted = os.environ.get("AVEPIPE_FAULT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
