"""`--resume` after an interruption equals the uninterrupted run bit for bit (lr milestones inside the run, dropout in
the model, so the scheduler and every RNG state must come back), and a resume with other settings is refused."""

from __future__ import annotations

import pytest
import torch

from avepipe.errors import AvepipeError
from avepipe.train import DataPaths, TrainOptions, train
from tests.helpers import run_cli
from tests.test_train import synthetic_run  # noqa: F401 (fixture)

# DAM: dropout 0.1 in its self-attention; milestones [2, 3] fall inside the 4 epochs, after the interruption at 2.
TOML = """[model]
att_hidden = 32
lstm_hidden = 16
heads = 4
dropout = 0.3
[train]
lr_milestones = [2, 3]
lr_gamma = 0.5
"""


class Interrupted(Exception):
    pass


def interrupt_after(epoch: int):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise Interrupted
    return on_epoch


def options(out, config, **kw) -> TrainOptions:
    return TrainOptions("dam", "supervised", str(out), epochs=4, batch_size=8, device="cpu", config_file=str(config),
                        **kw)


def test_interrupted_resume_equals_the_uninterrupted_run(tmp_path, synthetic_run):  # noqa: F811
    features, annotations = synthetic_run
    paths = DataPaths(str(features), str(annotations))
    config = tmp_path / "dam.toml"
    config.write_text(TOML)
    straight = train(options(tmp_path / "a", config), paths)
    with pytest.raises(Interrupted):
        train(options(tmp_path / "b", config), paths, on_epoch=interrupt_after(2))
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 2 and saved["scheduler"]["last_epoch"] == 2
    if torch.cuda.is_available():  # the CUDA RNG is saved where there is one (dropout on the GPU draws from it)
        assert saved["cuda_rng"] is not None and len(saved["cuda_rng"]) == torch.cuda.device_count()
    else:
        assert saved["cuda_rng"] is None
    resumed = train(options(tmp_path / "b", config, resume=True), paths)
    keys = ("loss", "val_segment_accuracy", "test_segment_accuracy")
    assert [[h[k] for k in keys] for h in straight["history"]] == [[h[k] for k in keys] for h in resumed["history"]]
    for name in ("last.pt", "checkpoint.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.25)  # both milestones passed


def test_resume_with_other_settings_is_refused(tmp_path, synthetic_run):  # noqa: F811
    features, annotations = synthetic_run
    paths = DataPaths(str(features), str(annotations))
    config = tmp_path / "dam.toml"
    config.write_text(TOML)
    with pytest.raises(Interrupted):
        train(options(tmp_path / "b", config), paths, on_epoch=interrupt_after(1))
    other = tmp_path / "other.toml"
    other.write_text(TOML.replace("lr_milestones = [2, 3]", "lr_milestones = [3]"))
    for opts, words in ((options(tmp_path / "b", config, resume=True, lr=5e-4), "lr"),
                        (options(tmp_path / "b", other, resume=True), "lr_milestones"),
                        (options(tmp_path / "b", config, resume=True, seed=1), "seed")):
        with pytest.raises(AvepipeError, match=words):
            train(opts, paths)


@pytest.mark.parametrize("write", [3, 4])  # epoch 2's checkpoint writes (epoch 1 writes checkpoint.pt, then last.pt)
def test_a_kill_during_a_checkpoint_write_then_resume_equals_the_uninterrupted_run(tmp_path, synthetic_run,  # noqa: F811
                                                                                  write):
    features, annotations = synthetic_run
    config = tmp_path / "dam.toml"
    config.write_text(TOML)

    def run(out, *extra, fault=None):
        return run_cli("train", "--model", "dam", "--task", "supervised", "--features", features, "--annotations",
                       annotations, "--out", out, "--epochs", 4, "--batch-size", 8, "--device", "cpu", "--config",
                       config, *extra, env={"AVEPIPE_FAULT": fault} if fault else None)

    assert run(tmp_path / "a").returncode == 0
    killed = run(tmp_path / "b", fault=f"checkpoint-write:{write}")
    assert killed.returncode == -9, killed.stderr  # SIGKILL between the temporary file and its rename
    assert list((tmp_path / "b").glob(".*.pt.tmp*"))  # the interrupted write's temporary is there ...
    resumed = run(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not list((tmp_path / "b").glob(".*.tmp*"))  # ... and gone after the resumed run
    for name in ("last.pt", "checkpoint.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["progress"]["history"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["progress"]["history"]
    keys = ("loss", "val_segment_accuracy", "test_segment_accuracy")
    assert [[h[k] for k in keys] for h in a] == [[h[k] for k in keys] for h in b]
