"""Cost of resampling 10 s of audio to 16 kHz: resampy ``kaiser_best`` vs ``avepipe.backbones.resample``.

    python bench/resample_cost.py [--seconds 10] [--repeats 5]

For 44.1 kHz and 48 kHz input (uniform noise in [-1, 1]) prints the best-of-N time of resampy (after its numba JIT
warm-up) and of the numpy polyphase resampler (after its per-rate-pair weight table is cached), their ratio, and the
largest absolute difference between the two outputs. Also prints the one-off costs: the numpy resampler's import and
first call in this process (table build) and resampy's import plus first call (numba JIT).

Timings on a busy machine are noisy, hence best-of-N. The numpy resampler runs a few BLAS matrix products; on a machine
whose cores are taken by other processes, OpenBLAS's thread pool can make those much slower than single-threaded
(``OPENBLAS_NUM_THREADS=1 python bench/resample_cost.py`` shows the difference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    target = 16000

    start = time.perf_counter()
    from avepipe.backbones.resample import resample

    x = rng.uniform(-1.0, 1.0, int(args.seconds * 44100))
    resample(x, 44100, target)
    print(f"numpy resampler: import + first call (44.1 kHz, builds its table) {time.perf_counter() - start:.3f} s")
    start = time.perf_counter()
    import resampy

    resampy.resample(x, 44100, target, filter="kaiser_best")
    print(f"resampy:         import + first call (numba JIT)                  {time.perf_counter() - start:.3f} s")

    for rate in (44100, 48000):
        x = rng.uniform(-1.0, 1.0, int(args.seconds * rate))
        ref = resampy.resample(x, rate, target, filter="kaiser_best")  # warm-up
        got = resample(x, rate, target)
        assert got.shape == ref.shape
        t_ref = best_of(lambda: resampy.resample(x, rate, target, filter="kaiser_best"), args.repeats)  # noqa: B023
        t_new = best_of(lambda: resample(x, rate, target), args.repeats)  # noqa: B023
        print(f"{rate} Hz -> 16 kHz, {args.seconds:g} s: resampy {t_ref * 1e3:8.1f} ms, numpy {t_new * 1e3:6.1f} ms, "
              f"ratio {t_ref / t_new:6.1f}x, max |diff| {np.abs(got - ref).max():.2e}")


if __name__ == "__main__":
    main()
