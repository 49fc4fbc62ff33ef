#!/usr/bin/env python3
"""Mutation check: every one-line mutant of .ci/mutants.toml must make its tests fail.

Each mutant names a file, the exact text of one line (compared without its indentation, and it must occur exactly
once), the replacement (indented like the original), the test files that must catch it and optionally a ``-k``
expression. The repository's avepipe/, tests/, docs/, pyproject.toml and README.md are copied to temporary folders
(the working tree is never modified); in a copy, each mutant is applied, ``python -m pytest -x -q`` runs only its
tests, and the original line is put back. First every distinct test selection runs unmutated and must pass (a test
that already fails or errors would "kill" anything). A mutant counts as killed when pytest reports failing tests
(exit status 1) or runs past --timeout; any other status (collection or usage error) is an invalid mutant.

    python .ci/mutation_check.py [--mutants .ci/mutants.toml] [--jobs 2] [--only NAME ...] [--no-baseline]

``--no-baseline`` (what .ci/run uses) skips the unmutated runs: there the whole suite has just passed, in the same
environment, so every selection's tests are known to pass unmutated.

Prints one line per mutant and "N/N mutants killed"; exits non-zero on a survivor, an invalid mutant or a failing
baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("avepipe", "tests", "docs", "pyproject.toml", "README.md")


@dataclass
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: list[str]
    k: str | None = None
    line: int = 0
    indent: str = ""

    def selection(self) -> tuple[tuple[str, ...], str | None]:
        return tuple(self.tests), self.k


@dataclass
class Outcome:
    name: str
    status: str  # killed, timeout, survived, invalid
    seconds: float
    detail: str = ""
    extra: dict = field(default_factory=dict)


def load_mutants(path: Path) -> list[Mutant]:
    spec = tomllib.loads(path.read_text())
    mutants = [Mutant(**entry) for entry in spec["mutant"]]
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: duplicate mutant names")
    for m in mutants:
        source = (ROOT / m.file).read_text().splitlines()
        hits = [i for i, text in enumerate(source) if text.strip() == m.original.strip()]
        if len(hits) != 1:
            raise SystemExit(f"{path}: mutant {m.name!r}: the original line occurs {len(hits)} times in {m.file} "
                             f"(must be exactly once): {m.original.strip()!r}")
        if m.replacement.strip() == m.original.strip():
            raise SystemExit(f"{path}: mutant {m.name!r}: the replacement equals the original")
        for test in m.tests:
            if not (ROOT / test).is_file():
                raise SystemExit(f"{path}: mutant {m.name!r}: no test file {test}")
        m.line = hits[0]
        m.indent = source[hits[0]][: len(source[hits[0]]) - len(source[hits[0]].lstrip())]
    return mutants


def make_copy(parent: Path) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="mutants-", dir=parent))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, copy / name)
    return copy


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The copy's avepipe and tests, never the installed (editable) working tree; no stale bytecode between mutants;
    # one BLAS / OpenMP thread per pytest (several run side by side on few cores, and oversubscribed OpenMP threads
    # make small CPU kernels orders of magnitude slower).
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_pytest(copy: Path, tests: tuple[str, ...], k: str | None, timeout: float) -> tuple[int | None, str, float]:
    args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if k:
        args += ["-k", k]
    started = time.perf_counter()
    try:
        done = subprocess.run(args, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", time.perf_counter() - started
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Workers:
    """One private copy of the repository per worker thread."""

    def __init__(self, parent: Path):
        self.parent, self.local, self.lock, self.copies = parent, threading.local(), threading.Lock(), []

    def copy(self) -> Path:
        if not hasattr(self.local, "copy"):
            self.local.copy = make_copy(self.parent)
            with self.lock:
                self.copies.append(self.local.copy)
        return self.local.copy


def check_copy_is_imported(copy: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import avepipe, tests; print(avepipe.__file__)"], cwd=copy,
                           env=environment(copy), capture_output=True, text=True)
    if probe.returncode or not Path(probe.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy's avepipe is not the one imported: {probe.stdout.strip()} {probe.stderr.strip()}")


def baseline(workers: Workers, selection, timeout: float) -> tuple[tuple, int | None, str, float]:
    tests, k = selection
    code, output, seconds = run_pytest(workers.copy(), tests, k, timeout)
    return selection, code, output, seconds


def mutate(workers: Workers, mutant: Mutant, timeout: float) -> Outcome:
    copy = workers.copy()
    target = copy / mutant.file
    original = (ROOT / mutant.file).read_text()
    lines = original.splitlines(keepends=True)
    ending = lines[mutant.line][len(lines[mutant.line].rstrip("\r\n")):]
    lines[mutant.line] = mutant.indent + mutant.replacement.strip() + ending
    target.write_text("".join(lines))
    try:
        code, output, seconds = run_pytest(copy, tuple(mutant.tests), mutant.k, timeout)
    finally:
        target.write_text(original)
    if code is None:
        return Outcome(mutant.name, "timeout", seconds, f"ran past {timeout:.0f} s")
    if code == 1:
        return Outcome(mutant.name, "killed", seconds, last_line(output))
    if code == 0:
        return Outcome(mutant.name, "survived", seconds, last_line(output))
    return Outcome(mutant.name, "invalid", seconds, f"pytest exit {code}: {last_line(output)}\n{output[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / ".ci" / "mutants.toml")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--only", nargs="*", help="run only these mutants (by name)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated runs: only right after the whole suite passed in the same run "
                             "(.ci/run), where each selection's tests have just passed unmutated")
    args = parser.parse_args(argv)
    mutants = load_mutants(args.mutants)
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avepipe-mutation-") as tmp:
        workers = Workers(Path(tmp))
        check_copy_is_imported(workers.copy())
        selections = [] if args.no_baseline else list(dict.fromkeys(m.selection() for m in mutants))
        with ThreadPoolExecutor(args.jobs) as pool:
            failed_baselines = []
            for (tests, k), code, output, seconds in pool.map(lambda s: baseline(workers, s, args.timeout),
                                                              selections):
                label = " ".join(tests) + (f" -k {k!r}" if k else "")
                print(f"baseline {'ok  ' if code == 0 else 'FAIL'} {seconds:6.1f}s  {label}", flush=True)
                if code != 0:
                    failed_baselines.append(label)
                    print(output[-3000:] if code is not None else f"ran past {args.timeout:.0f} s", flush=True)
            if failed_baselines:
                print(f"{len(failed_baselines)} test selection(s) fail without any mutant: fix them first")
                return 2
            outcomes = []
            for outcome in pool.map(lambda m: mutate(workers, m, args.timeout), mutants):
                mark = {"killed": "killed  ", "timeout": "killed  ", "survived": "SURVIVED", "invalid": "INVALID "}
                print(f"{mark[outcome.status]} {outcome.seconds:6.1f}s  {outcome.name}: {outcome.detail}", flush=True)
                outcomes.append(outcome)
    killed = sum(o.status in ("killed", "timeout") for o in outcomes)
    elapsed = time.perf_counter() - started
    print(f"{killed}/{len(outcomes)} mutants killed ({elapsed:.0f} s, {args.jobs} jobs)")
    survivors = [o.name for o in outcomes if o.status == "survived"]
    invalid = [o.name for o in outcomes if o.status == "invalid"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    if invalid:
        print("invalid (fix the mutant): " + ", ".join(invalid))
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
