"""Everything a lent GPU must measure, in one command: one JSON and one markdown summary in the folder it is given.

    python bench/gpu_check.py OUT_DIR              # on a CUDA machine: at most ~8 minutes on one H100/H200
    python bench/gpu_check.py OUT_DIR --dry-run    # anywhere: tiny sizes on the CPU, the GPU checks on the fake
                                                   # CUDA runtime of tests/fake_cuda.py (CI runs this: it never rots)

1. ``nvidia-smi``, torch, the device and its compute capability.
2. The real counterparts of the fake-runtime tests (tests/test_gpu_path.py), each on ``cuda:0`` and on ``cuda:1`` when
   present: the extract feed's event ordering (double-buffered batches through ``Batcher`` against the same weights
   on the CPU, VGG-19 and VGGish), fp32 without TF32 against CPU fp32, TF32 / bf16 / fp16 drift, and ``train
   --resume`` on CUDA (interrupted + resumed against straight, loss by loss).
3. ``bench/extract_throughput.py``: 16 workers on 16 ten-second clips against the decode bound.
4. ``bench/train_epoch.py``: one AVE-sized epoch per model.
5. ``bench/localize_latency.py``: cold and warm ``localize`` latency.

Random VGG-19 / VGGish weights of the real architectures throughout (speed and numerical drift do not depend on the
values). The figures go into docs/benchmarks.md by hand, with the date, the machine and this command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avepipe.backbones import weights as weights_mod  # noqa: E402
from avepipe.backbones.extractor import Backbones  # noqa: E402
from avepipe.extract import Batcher  # noqa: E402
from avepipe.settings import ExtractConfig  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 difference |a - b| / |b|."""
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


@contextlib.contextmanager
def runtime(dry_run: bool, devices: int):
    """The real CUDA runtime, or under --dry-run the fake one with tiny stand-in backbones of the same interfaces."""
    if not dry_run:
        yield
        return
    from avepipe.backbones import extractor
    from tests.fake_cuda import FakeCuda
    from tests.test_gpu_path import TinyVGG, TinyVGGish

    saved = extractor.load_vgg19, extractor.vggish_mod.load_vggish, extractor.vggish_mod.make_vggish_state_dict
    extractor.load_vgg19 = lambda path, map_location=None: TinyVGG().to(map_location)
    extractor.vggish_mod.load_vggish = lambda path, pca=None: TinyVGGish()
    extractor.vggish_mod.make_vggish_state_dict = lambda seed=0: TinyVGGish().state_dict()
    try:
        with FakeCuda(devices=devices, capability=(9, 0)):
            yield
    finally:
        extractor.load_vgg19, extractor.vggish_mod.load_vggish, extractor.vggish_mod.make_vggish_state_dict = saved


def backbones_on(device: str, precision: str = "fp32") -> Backbones:
    config = ExtractConfig(device=device, precision=precision, vgg19_weights=weights_mod.RANDOM,
                           vggish_weights=weights_mod.RANDOM)
    return Backbones(config, torch.device(device))


def check_feed(device: str, seconds: int) -> dict:
    """The extract feed's batches (two pinned buffers, asynchronous copies, events) against the same weights on the
    CPU in float32: visual per-second means and VGGish embeddings."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (seconds, 16, 224, 224, 3), generator=g, dtype=torch.uint8).numpy()
    examples = torch.randn(seconds, 96, 64, generator=g).numpy()
    backbones = backbones_on(device)
    got: dict[int, np.ndarray] = {}
    batcher = Batcher(backbones, 2, lambda vid, second, features: got.__setitem__(second, features.copy()))
    for second in range(seconds):
        batcher.add("clip", second, frames[second])
    batcher.flush()
    audio = backbones.audio_async(examples).get()
    vgg, vggish = copy.deepcopy(backbones.vgg19).to("cpu").float(), copy.deepcopy(backbones.vggish).to("cpu")
    with torch.inference_mode():
        visual_cpu = vgg(torch.from_numpy(frames.reshape(-1, 224, 224, 3))).reshape(seconds, 16, 7, 7, 512).mean(1)
        audio_cpu = vggish(torch.from_numpy(examples))
    visual = np.stack([got[s] for s in range(seconds)])
    result = {"device": device, "seconds": seconds, "visual_rel_diff": rel(visual, visual_cpu.numpy()),
              "audio_rel_diff": rel(audio, audio_cpu.numpy())}
    result["ok"] = bool(np.isfinite(visual).all() and result["visual_rel_diff"] < 1e-4
                        and result["audio_rel_diff"] < 1e-4)
    return result


def check_drift(device: str, frames_count: int) -> dict:
    """pool5 of one batch: fp32 without TF32, with TF32, bf16 and fp16 autocast, each against CPU float32."""
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (frames_count, 224, 224, 3), generator=g, dtype=torch.uint8)
    backbones = backbones_on(device)
    with torch.inference_mode():
        reference = copy.deepcopy(backbones.vgg19).to("cpu").float()(frames).numpy()
    out = {"device": device}
    modes = [("fp32", None, "ieee"), ("tf32", None, "tf32"), ("bf16", torch.bfloat16, "ieee"),
             ("fp16", torch.float16, "ieee")]
    for name, dtype, conv in modes:
        torch.backends.cudnn.conv.fp32_precision = conv
        try:
            autocast = torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None)
            with torch.inference_mode(), autocast:
                value = backbones.vgg19(frames.to(device)).float().cpu().numpy()
        finally:
            torch.backends.cudnn.conv.fp32_precision = "ieee"
        out[f"{name}_rel_diff"] = rel(value, reference)
    return out


def check_resume(device: str, videos: int) -> dict:
    """``train`` on the device: 3 epochs straight against 2 + resume, loss by loss."""
    from avepipe.train import DataPaths, TrainOptions, train
    from tests.test_train import synthetic_task

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = DataPaths(*map(str, synthetic_task(root, videos)))
        straight = train(TrainOptions("avel", "supervised", str(root / "a"), epochs=3, batch_size=8, device=device),
                         paths)
        train(TrainOptions("avel", "supervised", str(root / "b"), epochs=2, batch_size=8, device=device), paths)
        resumed = train(TrainOptions("avel", "supervised", str(root / "b"), epochs=3, batch_size=8, device=device,
                                     resume=True), paths)
    a, b = [h["loss"] for h in straight["history"]], [h["loss"] for h in resumed["history"]]
    diff = max(abs(x - y) for x, y in zip(a, b))
    return {"device": device, "losses_straight": a, "losses_resumed": b, "max_abs_diff": diff, "ok": diff < 1e-4}


def run_bench(name: str, args: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {timeout:.0f} s)", 124
    return {"command": f"python bench/{name} {' '.join(args)}", "exit_code": code,
            "seconds": round(time.perf_counter() - start, 1), "output": output.strip()[-4000:]}


def environment(dry_run: bool) -> dict:
    smi = shutil.which("nvidia-smi")
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda_build": torch.version.cuda, "dry_run": dry_run,
           "nvidia_smi": subprocess.run([smi], capture_output=True, text=True).stdout if smi else "(no nvidia-smi)"}
    if not dry_run and torch.cuda.is_available():
        env["devices"] = [{"name": torch.cuda.get_device_name(i), "capability": torch.cuda.get_device_capability(i)}
                          for i in range(torch.cuda.device_count())]
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check {'(dry run, CPU, fake CUDA runtime)' if env['dry_run'] else ''}", "",
             f"{env['date']} · {env['host']} · {env['cpus']} CPUs · torch {env['torch']} (CUDA {env['cuda_build']})",
             "", "```", env["nvidia_smi"].strip(), "```", "", "## Checks", "",
             "| check | device | figures | ok |", "|---|---|---|---|"]
    for check in report["checks"]:
        figures = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()
                            if k not in ("name", "device", "ok", "losses_straight", "losses_resumed"))
        lines.append(f"| {check['name']} | {check.get('device', '')} | {figures} | {check.get('ok', '')} |")
    lines += ["", "## Benchmarks", ""]
    for bench in report["benchmarks"]:
        lines += [f"### `{bench['command']}` (exit {bench['exit_code']}, {bench['seconds']} s)", "", "```",
                  bench["output"], "```", ""]
    lines.append(f"Total: {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (the fake CUDA runtime)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; use --dry-run on a machine without one", file=sys.stderr)
        return 2
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    count = 2 if args.dry_run else torch.cuda.device_count()
    devices = ["cuda:0"] + (["cuda:1"] if count > 1 else [])
    media = os.environ.get("AVEPIPE_TEST_MEDIA", str(ROOT.parent / "shared" / "media"))
    report: dict = {"environment": environment(args.dry_run), "checks": [], "benchmarks": []}
    with runtime(args.dry_run, count):
        for device in devices:
            for name, check, size in (("extract feed vs CPU fp32", check_feed, 6),
                                      ("pool5 drift vs CPU fp32", check_drift, 4 if args.dry_run else 16)):
                started_check = time.perf_counter()
                try:
                    result = check(device, size)
                except Exception as exc:  # noqa: BLE001 - recorded, the other checks go on
                    result = {"device": device, "error": f"{type(exc).__name__}: {exc}", "ok": False}
                result["seconds"] = round(time.perf_counter() - started_check, 1)
                report["checks"].append({"name": name, **result})
        try:
            result = check_resume("cuda:0", 48 if args.dry_run else 480)
        except Exception as exc:  # noqa: BLE001
            result = {"device": "cuda:0", "error": f"{type(exc).__name__}: {exc}", "ok": False}
        report["checks"].append({"name": "train --resume vs straight", **result})
    if args.dry_run:
        benches = [("extract_throughput.py", ["--clips", "2", "--seconds", "2", "--workers", "2", "--device", "cpu",
                                              "--null-backbone", "--clip-dir", str(args.out / "clips")], 240),
                   ("train_epoch.py", ["--videos", "48", "--device", "cpu", "--models", "avel", "--epochs", "1"], 240),
                   ("localize_latency.py", ["--video", os.path.join(media, "sample_1s.mp4"), "--device", "cpu",
                                            "--repeats", "1"], 240)]
    else:
        benches = [("extract_throughput.py", ["--clips", "16", "--workers", "16", "--device", "cuda",
                                              "--clip-dir", str(args.out / "clips")], 200),
                   ("train_epoch.py", ["--videos", "4143", "--device", "cuda", "--epochs", "1"], 150),
                   ("localize_latency.py", ["--device", "cuda", "--repeats", "3"], 60)]
    for name, bench_args, timeout in benches:
        report["benchmarks"].append(run_bench(name, bench_args, timeout))
    report["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [c["name"] for c in report["checks"] if not c.get("ok", True)]
    failed += [b["command"] for b in report["benchmarks"] if b["exit_code"] != 0]
    if failed:
        print("gpu_check: failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
