"""resampy's ``kaiser_best`` resampling as a cached polyphase filter in plain numpy (no numba, no JIT warm-up).

Contract: ``resample(x, sr_orig, sr_new)`` returns what ``resampy.resample(x, sr_orig, sr_new, filter="kaiser_best")``
returns, to within 1e-6 absolute for signals in [-1, 1], with the same output length ``int(len(x) * sr_new /
sr_orig)`` and the same zero boundary before the first and after the last input sample. Measured: about 1e-15 when
``sr_orig`` is a multiple of ``sr_new``; otherwise about 1e-11 on seconds of audio, growing with the output index
(3e-9 at 10 minutes), because resampy computes its output times as ``t * (1 / ratio)`` in float64, which drifts by
rounding, where this module uses exact integer phases. No numba, no JIT: numpy only. Differences from
resampy: 1-D only, integer rates only, float64 out, and an input too short for one output sample gives an empty array
instead of a ValueError.

How resampy computes an output sample (Smith's band-limited interpolation): output ``t`` sits at input time
``t * sr_orig / sr_new = n + f`` (``n`` integer, ``0 <= f < 1``). The half window (right wing of a Kaiser-windowed
sinc, 8192 table entries per zero crossing, 50 crossings) is read at the table positions ``(f * scale + i * scale)``
crossings for the left wing (input samples ``n - i``) and ``((1 - f) * scale + k * scale)`` for the right wing
(inputs ``n + 1 + k``), by linear interpolation between table entries. For downsampling ``scale = sr_new / sr_orig``
stretches the sinc (the anti-aliasing low-pass) and the table is multiplied by the same ratio; for upsampling
``scale = 1`` and the table is used as is. The table step is truncated to an integer, ``index_step =
int(scale * 8192)``, and each wing has ``(len(table) - offset) // index_step`` taps; this module reproduces both.

Why it can be fast: with ``sr_new / sr_orig = p / q`` in lowest terms, output ``t + p`` sits exactly ``q`` inputs
after output ``t`` with the same fraction ``f``, so there are only ``p`` distinct weight vectors ("phases"). They are
computed once per rate pair (cached) and the resampling becomes a polyphase FIR filter. To run it as a few large
matrix products, ``g`` periods are merged into a super-period of ``P = g * p`` outputs per ``Q = g * q`` inputs (``Q``
about one filter length) and its phases are split into groups whose windows start within one filter length of each
other; each group is one ``[rows, width] @ [width, phases]`` product, where row ``m`` is the padded input from
``m * Q + start`` on. Rows are processed in blocks, so the working memory stays small for long inputs. The blocks
are large enough (a few MB) that a multi-threaded BLAS on a busy machine is called a few times per 10 s of audio, not
dozens: each call of OpenBLAS's thread pool can cost milliseconds when its threads compete for the cores.

The filter table is resampy's own ``data/kaiser_best.npz``, found with ``importlib.util.find_spec`` and read with numpy
without importing resampy (whose import pulls in numba, seconds of start-up).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILTER_NAME = "kaiser_best"
_BLOCK_INPUTS = 1 << 18  # input samples per block of rows: a few MB of windows, few BLAS calls (module docstring)


@functools.lru_cache(maxsize=1)
def _filter_table() -> tuple[np.ndarray, int]:
    """(half window, table entries per zero crossing) of resampy's ``kaiser_best``, read without importing resampy."""
    spec = importlib.util.find_spec("resampy")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            "avepipe's resampler reads the 'kaiser_best' filter table shipped with resampy, which is not installed "
            "(pip install 'resampy>=0.4')"
        )
    for folder in locations:
        path = Path(folder) / "data" / f"{FILTER_NAME}.npz"
        if path.is_file():
            with np.load(path) as data:
                window = np.asarray(data["half_window"], dtype=np.float64)
                precision = int(data["precision"])
            window.flags.writeable = False
            return window, precision
    raise ImportError(f"resampy is installed at {locations[0]} but its data/{FILTER_NAME}.npz filter table is missing")


@dataclass(frozen=True)
class _Group:
    first: int  # first phase (output index within the super-period)
    stop: int  # one past the last phase
    start: int  # column offset of the group's window within a row of the padded input
    weights: np.ndarray  # [width, stop - first]: the phases' taps, column j shifted to its own start


@dataclass(frozen=True)
class _Plan:
    period_out: int  # P
    period_in: int  # Q
    pad_left: int  # zeros before x[0] in the padded input
    row_len: int  # padded-input samples one row of the super-period reads (from m * Q on)
    groups: tuple[_Group, ...]


def _wing(table: np.ndarray, delta: np.ndarray, frac: np.ndarray, num_table: int, step: int) -> np.ndarray:
    """[phases, taps] one wing per phase: the table linearly interpolated at ``frac * num_table + i * step``.

    Phase ``j`` has ``(len(table) - offset_j) // step`` taps, as in resampy; its row is zero beyond them.
    """
    index = frac * num_table
    offset = index.astype(np.int64)
    eta = index - offset
    count = (len(table) - offset) // step
    tap = np.arange(int(count.max()))
    valid = tap < count[:, None]
    pos = np.where(valid, offset[:, None] + step * tap, 0)
    return np.where(valid, table[pos] + eta[:, None] * delta[pos], 0.0)


@functools.lru_cache(maxsize=8)
def _plan(sr_orig: int, sr_new: int) -> _Plan:
    """Weights of every output phase for ``sr_orig -> sr_new``, grouped into matrix-product-sized pieces."""
    table, num_table = _filter_table()
    divisor = math.gcd(sr_orig, sr_new)
    p, q = sr_new // divisor, sr_orig // divisor
    sample_ratio = float(sr_new) / sr_orig
    if sample_ratio < 1:
        table = sample_ratio * table  # the low-pass for downsampling keeps unit DC gain
    delta = np.diff(table, append=table[-1])
    scale = min(1.0, sample_ratio)
    step = int(scale * num_table)
    if step < 1:
        raise ValueError(f"cannot downsample {sr_orig} -> {sr_new}: ratios below 1/{num_table} are not supported")

    remainder = (np.arange(p, dtype=np.int64) * q) % p  # phase j sits at input time (j * q) // p + remainder / p
    frac = scale * (remainder / p)
    left = _wing(table, delta, frac, num_table, step)  # left[j, i] multiplies x[n - i]
    right = _wing(table, delta, scale - frac, num_table, step)  # right[j, k] multiplies x[n + 1 + k]
    n_left = left.shape[1]
    taps = n_left + right.shape[1]
    kernel = np.concatenate([left[:, ::-1], right], axis=1)  # column c multiplies x[n - (n_left - 1) + c]

    # Super-period: about one filter length of input per period, so that short periods (48k -> 16k: 1 output per 3
    # inputs) still make wide matrix products. Groups: phases whose windows start within ``span`` inputs.
    span = taps
    repeat = max(1, -(-span // q))
    period_out, period_in = repeat * p, repeat * q
    base = (np.arange(period_out, dtype=np.int64) * q) // p  # n of each phase, also its window start in padded input
    groups = []
    first = 0
    while first < period_out:
        stop = int(np.searchsorted(base, base[first] + span, side="left"))
        start = int(base[first])
        width = int(base[stop - 1]) - start + taps
        phases = np.arange(first, stop)
        weights = np.zeros((width, stop - first))
        rows = (base[first:stop] - start)[:, None] + np.arange(taps)
        weights[rows, (phases - first)[:, None]] = kernel[phases % p]
        weights.flags.writeable = False
        groups.append(_Group(first, stop, start, weights))
        first = stop
    return _Plan(period_out, period_in, n_left - 1, int(base[-1]) + taps, tuple(groups))


def output_length(num_in: int, sr_orig: int, sr_new: int) -> int:
    """Samples resampy returns for ``num_in`` inputs (computed in float the same way, resampy issue #111)."""
    return int(num_in * float(sr_new) / float(sr_orig))


def resample(x: np.ndarray, sr_orig: int, sr_new: int, *, num_out: int | None = None) -> np.ndarray:
    """1-D signal at ``sr_orig`` -> float64 at ``sr_new``, as ``resampy.resample(..., filter="kaiser_best")``.

    ``x`` may have any real dtype; it is converted to float64 a block at a time (no full float64 copy of a long input).
    ``num_out``: compute only the first ``num_out`` output samples (fewer if the full output is shorter). They are the
    same values as the first ``num_out`` of the full output: later input samples still count where they reach them.
    An input too short for any output sample gives an empty array.
    """
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D signal, got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"expected a real-valued signal, got dtype {x.dtype}")
    sr_orig, sr_new = operator.index(sr_orig), operator.index(sr_new)
    if sr_orig <= 0 or sr_new <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_orig} -> {sr_new}")
    total = output_length(x.shape[0], sr_orig, sr_new)
    if num_out is not None:
        num_out = operator.index(num_out)
        if num_out < 0:
            raise ValueError(f"num_out must be >= 0, got {num_out}")
        total = min(total, num_out)
    if sr_orig == sr_new:
        return x[:total].astype(np.float64)  # always a copy, as resampy
    if total <= 0:
        return np.zeros(0)

    plan = _plan(sr_orig, sr_new)
    rows = -(-total // plan.period_out)
    out = np.empty((rows, plan.period_out))
    block = max(1, _BLOCK_INPUTS // plan.period_in)
    for row0 in range(0, rows, block):
        row1 = min(rows, row0 + block)
        # Padded input for these rows: padded[i] = x[i - pad_left], zero outside x.
        lo = row0 * plan.period_in
        hi = (row1 - 1) * plan.period_in + plan.row_len
        chunk = np.zeros(hi - lo)
        src_lo, src_hi = max(0, lo - plan.pad_left), min(x.shape[0], hi - plan.pad_left)
        if src_hi > src_lo:
            chunk[src_lo + plan.pad_left - lo : src_hi + plan.pad_left - lo] = x[src_lo:src_hi]
        for group in plan.groups:
            width = group.weights.shape[0]
            windows = np.lib.stride_tricks.sliding_window_view(chunk[group.start :], width)[:: plan.period_in]
            out[row0:row1, group.first : group.stop] = np.ascontiguousarray(windows[: row1 - row0]) @ group.weights
    return out.reshape(-1)[:total]
