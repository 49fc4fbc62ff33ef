"""Cost of the feature store's operations as it grows: 1 k, 10 k (and 100 k with --sizes) entries.

    python bench/store_scale.py [--sizes 1000 10000] [--dir .bench/store_scale] [--json out.json]

Stores are built with the project's own API (``FeatureCache.put`` + ``close``), with **tiny** arrays (visual
``[2, 1, 1, 8]``, audio ``[2, 128]``: the costs measured here are the store's per-entry costs, not the bytes of real
features) and the 27 attributes a real ``extract`` entry has. Each operation runs in a fresh process (so that one
operation's open files and caches do not help the next); its time and its peak memory over the process's own start
(max RSS growth) are printed:

- ``plan``: open the store + the skip plan of ``extract`` (``avepipe.planning.plan``) over N existing files, all done;
- ``ls``: ``avepipe cache ls F.h5`` (a summary for a large store where the code has one; the full table before);
- ``lookup``: one ``get`` of one id, repeated (median), in one process;
- ``add 1k``: a writer that adds 1 000 new videos to a copy of the store and closes (time and bytes written: ``wchar``
  of ``/proc/self/io``);
- ``merge 16``: ``cache merge`` of 16 shard stores of N/16 entries each;
- ``read all``: ``get`` of every entry through one reader.

Then the growth between the two largest sizes (``t ~ N^b``) extrapolated to 2 M entries. Run it against another
checkout with ``PYTHONPATH=/that/checkout python bench/store_scale.py``: the code measured is whatever ``avepipe``
imports (printed first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after $PYTHONPATH: another checkout can be measured

SPEC = {"spec_version": 1, "sampling": "ave", "visual": "vgg19-keras-imagenet/block5_pool/mean-of-16",
        "audio": "vggish/fc2-relu", "vgg19_sha256": "0" * 64, "vggish_sha256": "1" * 64}
TARGET = 2_000_000


def attrs_for(vid: str, source: Path, stat: os.stat_result) -> dict:
    """The 27 attributes of a real entry (avepipe/extract.py + avepipe/decode.py), with plausible values."""
    return {"source_path": str(source), "source_size": stat.st_size, "source_mtime": stat.st_mtime,
            "duration": 10.01, "seconds": 10, "width": 1280, "height": 720, "audio_sample_rate": 44100,
            "audio_padded_s": 0.0, "frames_indexed": 250, "frames_decoded": 250, "decode_glitches": 0,
            "sampling": "ave", "spec_version": 1, "vgg19_weights": "/weights/vgg19.h5", "vgg19_sha256": "0" * 64,
            "vgg19_official": True, "vggish_weights": "/weights/vggish.pth", "vggish_sha256": "1" * 64,
            "vggish_official": True, "vggish_pca": False, "precision": "bfloat16", "fp32_math": "ieee",
            "device": "cuda:0", "avepipe_version": "0.1.0", "torch_version": "2.5.1",
            "extracted_at": "2026-12-07T00:00:00Z"}


def sources(folder: Path, prefix: str, count: int) -> list[Path]:
    """``count`` tiny files standing for videos (the skip plan stats each one)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i:07d}.mp4" for i in range(count)]
    for p in paths:
        if not p.exists():
            p.write_bytes(b"x")
    return paths


def build(path: Path, paths: list[Path]) -> None:
    import numpy as np

    from avepipe.cache import FeatureCache

    visual, audio = np.ones((2, 1, 1, 8), np.float32), np.ones((2, 128), np.float32)
    with FeatureCache(path, "a") as cache:
        cache.ensure_spec(SPEC)
        for p in paths:
            cache.put(p.stem, visual, audio, attrs_for(p.stem, p, p.stat()))


# -- the operations, each run in its own process ----------------------------------------------------------------------

def op_plan(store: str, folder: str) -> dict:
    from avepipe.cache import FeatureCache
    from avepipe.planning import BatchReport, plan
    from avepipe.settings import ExtractConfig

    paths = sorted(Path(folder).glob("v*.mp4"))
    start = time.perf_counter()
    report = BatchReport()
    todo = plan(paths, FeatureCache(store, "r"), ExtractConfig(), report)
    seconds = time.perf_counter() - start
    assert not todo and len(report.skipped) == len(paths), (len(todo), len(report.skipped))
    return {"s": seconds}


def op_ls(store: str) -> dict:
    from avepipe.cli import app

    devnull = open(os.devnull, "w")
    saved, sys.stdout = sys.stdout, devnull
    start = time.perf_counter()
    try:
        app(["cache", "ls", store], standalone_mode=False)
    finally:
        sys.stdout = saved
    return {"s": time.perf_counter() - start}


def op_lookup(store: str, vid: str) -> dict:
    from avepipe.cache import FeatureCache

    reader = FeatureCache(store, "r")
    start = time.perf_counter()
    reader.get(vid)
    first = time.perf_counter() - start
    times = []
    for _ in range(200):
        start = time.perf_counter()
        reader.get(vid)
        times.append(time.perf_counter() - start)
    return {"s": statistics.median(times), "first_s": first}


def op_add(store: str, folder: str) -> dict:
    paths = sorted(Path(folder).glob("n*.mp4"))
    before = io_written()
    start = time.perf_counter()
    build(Path(store), paths)
    return {"s": time.perf_counter() - start, "written": io_written() - before}


def op_merge(out: str, *shards: str) -> dict:
    from avepipe.cache import merge

    start = time.perf_counter()
    merge(list(shards), out, overwrite=True)
    return {"s": time.perf_counter() - start, "bytes": os.path.getsize(out)}


def op_read_all(store: str) -> dict:
    from avepipe.cache import FeatureCache

    reader = FeatureCache(store, "r")
    start = time.perf_counter()
    count = sum(1 for _ in reader.entries())
    return {"s": time.perf_counter() - start, "entries": count}


OPS = {"plan": op_plan, "ls": op_ls, "lookup": op_lookup, "add": op_add, "merge": op_merge, "read_all": op_read_all}


def io_written() -> int:
    with open("/proc/self/io") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("wchar"))


def child(op: str, args: list[str]) -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import avepipe.cache  # noqa: F401  (imports are not the operation)
    import avepipe.cli  # noqa: F401
    import avepipe.planning  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = OPS[op](*args)
    result["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps(result))


def run(op: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", op, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{op} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(n: int, root: Path) -> dict:
    folder = root / f"n{n}"
    if folder.exists():
        shutil.rmtree(folder)
    videos = sources(folder / "videos", "v", n)
    sources(folder / "videos", "n", 1000)  # the 1 000 videos "add 1k" puts
    store = folder / "F.h5"
    out: dict = {}
    start = time.perf_counter()
    build(store, videos)
    out["build"] = {"s": time.perf_counter() - start, "bytes": store.stat().st_size}
    print(f"  built {n} entries in {out['build']['s']:.1f} s ({store.stat().st_size / 1e6:.1f} MB)", flush=True)
    out["plan"] = run("plan", str(store), str(folder / "videos"))
    out["ls"] = run("ls", str(store))
    out["lookup"] = run("lookup", str(store), videos[n // 2].stem)
    copy = folder / "G.h5"
    shutil.copy(store, copy)
    out["add"] = run("add", str(copy), str(folder / "videos"))
    copy.unlink()
    shards = []
    for k in range(16):
        shard = folder / f"shard-{k:02d}.h5"
        build(shard, videos[k::16])
        shards.append(str(shard))
    out["merge"] = run("merge", str(folder / "merged.h5"), *shards)
    out["read_all"] = run("read_all", str(store))
    shutil.rmtree(folder)
    return out


ROWS = [("open + skip plan", "plan", "s"), ("open + skip plan, peak MB", "plan", "peak_mb"),
        ("`cache ls`", "ls", "s"), ("`cache ls`, peak MB", "ls", "peak_mb"),
        ("one lookup (get, warm reader), ms", "lookup", "ms"), ("first get (opens the file), ms", "lookup", "first_ms"),
        ("add 1 k videos", "add", "s"), ("add 1 k videos, MB written", "add", "written_mb"),
        ("merge 16 shards", "merge", "s"), ("read all entries", "read_all", "s"), ("store size, MB", "build", "mb"),
        ("build (put + close)", "build", "s")]


def value(result: dict, op: str, key: str) -> float:
    item = result[op]
    if key == "ms":
        return item["s"] * 1e3
    if key == "first_ms":
        return item["first_s"] * 1e3
    if key == "written_mb":
        return item["written"] / 1e6
    if key == "mb":
        return item["bytes"] / 1e6
    return item[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--dir", default=".bench/store_scale")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    import avepipe.cache

    print(f"code: {Path(avepipe.cache.__file__).resolve().parents[1]} (format_version "
          f"{avepipe.cache.FORMAT_VERSION}); tiny entries: visual [2,1,1,8], audio [2,128], 27 attributes", flush=True)
    results = {}
    for n in args.sizes:
        print(f"{n} entries:", flush=True)
        results[n] = measure(n, Path(args.dir))
    sizes = sorted(results)
    header = "| what | " + " | ".join(f"{n:,}" for n in sizes) + " | growth | extrapolated 2 M |"
    print(header)
    print("|---" * (len(sizes) + 3) + "|")
    for label, op, key in ROWS:
        values = [value(results[n], op, key) for n in sizes]
        growth, extra = "", ""
        if len(sizes) >= 2 and values[-2] > 0 and values[-1] > 0:
            b = math.log(values[-1] / values[-2]) / math.log(sizes[-1] / sizes[-2])
            growth = f"N^{b:.2f}"
            extra = f"{values[-1] * (TARGET / sizes[-1]) ** max(b, 0):.3g}"
        print(f"| {label} | " + " | ".join(f"{v:.3g}" for v in values) + f" | {growth} | {extra} |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(n): r for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
