"""The GPU paths on a fake CUDA runtime (tests/fake_cuda.py): CUDA's stream semantics simulated on the CPU.

The extract feed (batcher, the backbones' visual and audio calls, the writer), localize, the multi-device child and
training's RNG save/restore run here on ``cuda``, ``cuda:1`` alone and a multi-device child, with tiny stand-in
backbones, and must give what the CPU path gives, without waits the feed does not need. The first tests show that the
fake itself catches the mistakes it exists for (a missing wait, an event on the wrong stream, an early refill).
"""

from __future__ import annotations

import queue
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avepipe.backbones import extractor
from avepipe.backbones import weights as weights_mod
from avepipe.backbones.extractor import Backbones, resolve_precision
from avepipe.cache import FeatureCache
from avepipe.checkpoint import make_checkpoint
from avepipe.errors import DeviceWarning
from avepipe.extract import run_extract
from avepipe.localization import CheckpointLabeller
from avepipe.models import build_model
from avepipe.settings import ExtractConfig
from tests.fake_cuda import FakeCuda, to_tf32
from tests.helpers import make_clip

# -- the fake catches what it exists for -------------------------------------------------------------------------------


def test_the_fake_shows_stale_host_memory_until_a_wait_covers_the_copy():
    with FakeCuda(devices=2):
        device = torch.device("cuda:1")
        host = torch.full((4,), 3.0).pin_memory()
        on_device = host.to(device, non_blocking=True) * 2
        back = torch.empty(4, pin_memory=True)
        back.copy_(on_device, non_blocking=True)
        assert np.isnan(back.numpy()).all()  # read without a wait: stale
        wrong = torch.cuda.Event()
        wrong.record()  # the current device's stream (cuda:0): nothing of cuda:1 is covered
        wrong.synchronize()
        assert np.isnan(back.numpy()).all()
        right = torch.cuda.Event()
        right.record(torch.cuda.current_stream(device))
        right.synchronize()
        assert (back.numpy() == 6.0).all()


def test_the_fake_reads_a_pinned_source_when_the_stream_runs_and_orders_streams_only_by_waits():
    with FakeCuda(devices=1) as cuda:
        host = torch.full((3,), 1.0).pin_memory()
        on_device = host.to("cuda", non_blocking=True)
        host.fill_(5.0)  # refilled before the copy ran: the device gets the new values
        assert float(on_device.sum()) == 15.0
        assert cuda.syncs["d2h"] == 1  # float() of a device value is a host sync
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            copied = torch.full((3,), 7.0).pin_memory().to("cuda", non_blocking=True)
        assert torch.isnan(copied * 1).cpu().all()  # the default stream did not wait for the side stream
        torch.cuda.current_stream().wait_stream(side)
        assert (copied * 1).cpu().tolist() == [7.0, 7.0, 7.0]
        with pytest.raises(RuntimeError, match="same device"):
            copied + torch.ones(3)  # a device tensor with a CPU tensor


def test_the_fake_rounds_fp32_convolutions_to_tf32_where_torch_allows_it():
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    exact = F.conv2d(x, w)
    with FakeCuda(capability=(8, 0)):
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # torch's default for convolutions
        tf32 = F.conv2d(x.to("cuda"), w.to("cuda")).cpu()
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        try:
            ieee = F.conv2d(x.to("cuda"), w.to("cuda")).cpu()
        finally:
            torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert torch.equal(ieee, exact) and not torch.equal(tf32, exact)
    assert torch.equal(tf32, F.conv2d(to_tf32(x), to_tf32(w)))


# -- tiny stand-in backbones with the real interfaces ------------------------------------------------------------------

class TinyVGG(nn.Module):
    """uint8 [N, 224, 224, 3] -> float32 [N, 7, 7, 512], one convolution (so TF32 matters, as in VGG-19)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 512, 1)

    def forward(self, frames):
        x = F.avg_pool2d(frames.permute(0, 3, 1, 2).float(), 32)
        return F.relu(self.conv(x)).permute(0, 2, 3, 1)


class TinyVGGish(nn.Module):
    """log-mel [T, 96, 64] -> [T, 128]: a convolution and a fully connected layer (float32)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 4, 8, stride=8)
        self.fc = nn.Linear(4 * 12 * 8, 128)

    def forward(self, examples):
        return F.relu(self.fc(F.relu(self.conv(examples.unsqueeze(1))).flatten(1)))


@pytest.fixture()
def tiny_backbones(monkeypatch):
    monkeypatch.setattr(extractor, "load_vgg19", lambda path, map_location=None: TinyVGG().to(map_location))
    monkeypatch.setattr(extractor.vggish_mod, "load_vggish", lambda path, pca=None: TinyVGGish())
    monkeypatch.setattr(extractor.vggish_mod, "make_vggish_state_dict", lambda seed=0: TinyVGGish().state_dict())


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Five short clips: 13 seconds in all, more than five batches of two seconds (the double buffer turns over)."""
    folder = tmp_path_factory.mktemp("gpu-clips")
    return [make_clip(folder / f"c{i}.mp4", seconds, size="96x64", freq=300 + 90 * i,
                      pattern="testsrc2" if i % 2 else "rgbtestsrc")
            for i, seconds in enumerate([3.0, 2.0, 4.0, 1.0, 3.0])]


def extract_config(device: str, **kw) -> ExtractConfig:
    return ExtractConfig(device=device, vgg19_weights=weights_mod.RANDOM, vggish_weights=weights_mod.RANDOM,
                         batch_size=32, workers=2, **kw)


def features(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    with FeatureCache(cache, "r") as reader:
        return {vid: (reader.get(vid).visual, reader.get(vid).audio, reader.get(vid).attrs) for vid in reader.ids()}


@pytest.fixture()
def cpu_features(tiny_backbones, clips, tmp_path) -> dict:
    report = run_extract(clips, tmp_path / "cpu.h5", extract_config("cpu", precision="fp32"))
    assert len(report.done) == len(clips)
    return features(tmp_path / "cpu.h5")


def run_on_fake(cuda: FakeCuda, clips, cache: Path, config: ExtractConfig):
    """``run_extract`` with the backbones' loading (its one-off uploads) left out of the counted host syncs."""
    def load():
        backbones = Backbones(config, torch.device(config.device))
        cuda.syncs.clear()
        cuda.sync_log.clear()
        return backbones
    return run_extract(clips, cache, config, load_backbones=load)


def assert_same_features(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for vid, (visual, audio, _) in expected.items():
        np.testing.assert_array_equal(actual[vid][0], visual, err_msg=vid)
        np.testing.assert_array_equal(actual[vid][1], audio, err_msg=vid)


# -- row 1: the events of the extract feed are on the stream of the device that does the work -------------------------

@pytest.mark.parametrize("device,count", [("cuda", 1), ("cuda:1", 2), ("cuda:0", 2)])
def test_row1_extract_on_one_cuda_device_gives_the_cpu_features(tiny_backbones, clips, cpu_features, tmp_path,
                                                                device, count):
    with FakeCuda(devices=count, capability=(7, 5)) as cuda:  # pre-Ampere: no TF32 question here (row 3)
        report = run_on_fake(cuda, clips, tmp_path / "gpu.h5", extract_config(device, precision="fp32"))
        touched = set(cuda.contexts)
    assert len(report.done) == len(clips) and not report.failed
    assert_same_features(features(tmp_path / "gpu.h5"), cpu_features)
    assert touched == {torch.device(device).index or 0}  # no stray context on cuda:0 for a run on cuda:1


def test_row1_multi_device_child_on_cuda_1_gives_the_cpu_features(tiny_backbones, clips, cpu_features, tmp_path):
    from avepipe.multi_device import _device_main

    events: queue.Queue = queue.Queue()
    with FakeCuda(devices=2, capability=(7, 5)) as cuda:
        _device_main(1, [str(p) for p in clips], str(tmp_path / "shard.h5"), extract_config("cuda:1", precision="fp32"),
                     None, events)
        touched = set(cuda.contexts)
    messages = []
    while not events.empty():
        messages.append(events.get())
    assert [m.kind for m in messages if m.kind != "event"] == ["report"], [m.text for m in messages]
    assert_same_features(features(tmp_path / "shard.h5"), cpu_features)
    assert touched == {1}


# -- row 3: fp32 means fp32 (no TF32), and the cache says so ----------------------------------------------------------

def test_row3_fp32_on_an_ampere_gpu_equals_cpu_fp32_and_the_cache_records_the_math(tiny_backbones, clips,
                                                                                    cpu_features, tmp_path):
    with FakeCuda(devices=1, capability=(8, 0)) as cuda:
        run_on_fake(cuda, clips, tmp_path / "gpu.h5", extract_config("cuda", precision="fp32"))
    got = features(tmp_path / "gpu.h5")
    assert_same_features(got, cpu_features)  # TF32 would drift ~1e-4 relative: not equal
    assert all(attrs["precision"] == "fp32" and attrs["fp32_math"] == "ieee" for _, _, attrs in got.values())
    assert all(attrs["fp32_math"] == "ieee" for _, _, attrs in cpu_features.values())


# -- row 4: the feed never waits for the device except for results it needs -------------------------------------------

def test_row4_the_extract_feed_makes_no_implicit_host_syncs(tiny_backbones, clips, cpu_features, tmp_path):
    with FakeCuda(devices=1) as cuda:
        report = run_on_fake(cuda, clips, tmp_path / "gpu.h5", extract_config("cuda", precision="fp32"))
        syncs = dict(cuda.syncs)
    assert len(report.done) == len(clips)
    # Every wait is on an event of a result the feed needs; VGGish's log-mel upload and its embeddings' download
    # are asynchronous like the visual path (a pageable upload or a .cpu() would wait for the batch in flight).
    assert syncs == {}, syncs
    assert_same_features(features(tmp_path / "gpu.h5"), cpu_features)


# -- row 5: localize moves results to the host once per video ----------------------------------------------------------

SMALL = {"visual_dim": 512, "audio_dim": 128, "att_hidden": 32, "lstm_hidden": 16}


def _checkpoint(tmp_path: Path, name: str = "avel") -> Path:
    torch.manual_seed(0)
    model = build_model(name, "supervised", SMALL)
    ckpt = make_checkpoint(model, name=name, task="supervised", direction=None, config={"model": SMALL, "train": {}},
                           class_names=["Bell", "Dog", "Car", "background"], feature_spec={}, metrics={}, seed=0)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_row5_localize_reads_the_device_once_per_video(tmp_path):
    path = _checkpoint(tmp_path)
    g = torch.Generator().manual_seed(1)
    reads = {}
    for seconds in (25, 61):
        visual = torch.randn(seconds, 7, 7, 512, generator=g).numpy()
        audio = torch.randn(seconds, 128, generator=g).numpy()
        expected = CheckpointLabeller(path, torch.device("cpu")).label(visual, audio)
        with FakeCuda(devices=2) as cuda:
            labeller = CheckpointLabeller(path, torch.device("cuda:1"))
            cuda.sync_places.clear()
            records = labeller.label(visual, audio)
            places = dict(cuda.sync_places)
        assert [asdict(r) for r in records] == [asdict(r) for r in expected]
        # The labels, probabilities and top-3 of every second come back in one read (was ~5 per second) ...
        assert sum(n for (kind, where), n in places.items() if where.startswith("avepipe/labeller")
                   and kind == "d2h") == 1, places
        reads[seconds] = sum(places.values())
    # ... and nothing else grows with the video: one forward of all windows (the model's own mask checks and the
    # LSTM's lengths are per forward).
    assert reads[25] == reads[61], reads


# -- row 6: --precision auto is bf16 only where the GPU computes bf16 natively -----------------------------------------

@pytest.mark.parametrize("capability,expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), None),
                                                 ((7, 0), None), ((6, 1), None)])
def test_row6_auto_precision_follows_the_gpu(capability, expected):
    with FakeCuda(devices=2, capability=capability):
        assert resolve_precision("auto", torch.device("cuda:1")) is expected
        assert resolve_precision("bf16", torch.device("cuda")) is torch.bfloat16  # asked for: given, documented slow
    assert resolve_precision("auto", torch.device("cpu")) is None


# -- rows 2 and 5 in training: RNG states for the devices present, loss read once per epoch ---------------------------

from tests.test_train import synthetic_run  # noqa: E402,F401 (fixture)


def test_row2_resume_with_fewer_gpus_restores_the_states_it_can_and_warns(tmp_path, synthetic_run):  # noqa: F811
    from avepipe.train import DataPaths, TrainOptions, train

    features_path, annotations = synthetic_run
    paths = DataPaths(str(features_path), str(annotations))
    with FakeCuda(devices=2):
        train(TrainOptions("avel", "supervised", str(tmp_path / "run"), epochs=1, batch_size=8, device="cuda:1"),
              paths)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(saved["cuda_rng"]) == 2
    with FakeCuda(devices=1) as cuda, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(TrainOptions("avel", "supervised", str(tmp_path / "run"), epochs=2, batch_size=8,
                                     device="cuda", resume=True), paths)
        restored = cuda.rng[0]
    assert len(metrics["history"]) == 2
    assert torch.equal(restored, saved["cuda_rng"][0])
    messages = [str(w.message) for w in caught if issubclass(w.category, DeviceWarning)]
    assert len(messages) == 1 and "2 CUDA devices" in messages[0] and "1" in messages[0], messages


def test_row5_training_reads_the_loss_once_per_epoch(tmp_path, synthetic_run):  # noqa: F811
    from avepipe.train import DataPaths, TrainOptions, train

    features_path, annotations = synthetic_run
    paths = DataPaths(str(features_path), str(annotations))
    expected = train(TrainOptions("avel", "supervised", str(tmp_path / "cpu"), epochs=2, batch_size=4, device="cpu"),
                     paths)
    in_train = {}
    for batch_size in (4, 16):  # 8 or 2 steps per epoch
        with FakeCuda(devices=1) as cuda:
            metrics = train(TrainOptions("avel", "supervised", str(tmp_path / f"gpu{batch_size}"), epochs=2,
                                         batch_size=batch_size, device="cuda"), paths)
            in_train[batch_size] = {where: n for (kind, where), n in cuda.sync_places.items()
                                    if where.startswith("avepipe/train.py") and kind == "d2h"}
        if batch_size == 4:
            assert [h["loss"] for h in metrics["history"]] == pytest.approx(
                [h["loss"] for h in expected["history"]], rel=1e-5)
    # The training loop's own reads do not depend on the number of steps (was a float(loss) per step and an
    # isfinite read per parameter)
    assert in_train[4] == in_train[16], in_train
