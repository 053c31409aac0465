"""A non-finite loss or gradient stops the run before the optimizer step, naming the step and the batch's sample ids,
and leaves a checkpoint of the last good weights; no checkpoint ever holds the bad step's weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import write_count_up_chats
from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.schema import register_configs
from dflashtrain.train.guards import NonFiniteLossError, unused_path
from dflashtrain.train.module import DraftModule
from dflashtrain.train.recipe import run

# Until the embedded tiny target is committed, its untrained stand-in (same tokenizer) is used.
TARGET = TINY_TARGET_DIR
register_configs()
BAD_STEP = 2  # global_step at which the loss (or gradient) turns non-finite: 2 good optimizer steps before it


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    return write_count_up_chats(path, 24)


def overrides(data: Path, out: Path, *extra: str):
    return [f"model.target.path={TARGET}", f"data.path={data}", f"paths.output_dir={out}", "trainer.max_steps=5",
            "checkpoint.every_n_train_steps=1", "data.batch_size=4", "logger=none", "eval.every_n_steps=0",
            "trainer.enable_progress_bar=false", *extra]


class Recorder:
    """Wraps DraftModule.training_step: snapshots the drafter and the batch's sample ids at each step, and breaks
    the loss (or its gradient) at BAD_STEP."""

    def __init__(self, monkeypatch, breaks: str):
        self.weights, self.sample_ids = {}, {}
        original = DraftModule.training_step

        def training_step(module, batch, batch_idx):
            step = module.global_step
            self.weights[step] = {k: v.detach().clone() for k, v in module.drafter.state_dict().items()}
            self.sample_ids[step] = list(batch["sample_ids"])
            loss = original(module, batch, batch_idx)
            if step == BAD_STEP and breaks == "loss":
                return loss * float("nan")
            if step == BAD_STEP and breaks == "gradient":
                loss.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite, its gradient not
            return loss

        monkeypatch.setattr(DraftModule, "training_step", training_step)


def drafter_state(checkpoint_path: Path):
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return checkpoint, {k.removeprefix("drafter."): v for k, v in checkpoint["state_dict"].items()
                        if k.startswith("drafter.")}


@pytest.mark.parametrize("breaks", ["loss", "gradient"])
def test_stops_before_the_bad_step_and_keeps_the_good_weights(data, tmp_path, monkeypatch, breaks):
    recorder = Recorder(monkeypatch, breaks)
    out = tmp_path / "out"
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=overrides(data, out))
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg)

    message = str(info.value)
    assert f"non-finite {breaks}" in message and f"at step {BAD_STEP}," in message and "\n" not in message
    assert f"sample ids {recorder.sample_ids[BAD_STEP]}" in message
    assert set(recorder.sample_ids) == {0, 1, BAD_STEP}  # nothing ran after the bad step

    saved = out / "checkpoints" / f"last-good-step{BAD_STEP:07d}.ckpt"
    assert str(saved) in message
    checkpoint, weights = drafter_state(saved)
    assert checkpoint["global_step"] == BAD_STEP
    good = recorder.weights[BAD_STEP]  # the weights the bad step started from
    assert weights.keys() == good.keys() and all(torch.equal(weights[k], good[k]) for k in good)

    # Every checkpoint in the directory is finite, and the one ModelCheckpoint wrote at BAD_STEP is untouched.
    names = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert f"step{BAD_STEP:07d}.ckpt" in names and f"step{BAD_STEP + 1:07d}.ckpt" not in names
    for name in names:
        _, state = drafter_state(out / "checkpoints" / name)
        assert all(torch.isfinite(v).all() for v in state.values()), name
    _, periodic = drafter_state(out / "checkpoints" / f"step{BAD_STEP:07d}.ckpt")
    assert all(torch.equal(periodic[k], good[k]) for k in good)


def test_a_checkpoint_is_never_overwritten(tmp_path):
    first = tmp_path / "last-good-step0000003.ckpt"
    assert unused_path(first) == first
    first.write_text("kept")
    second = unused_path(first)
    assert second.name == "last-good-step0000003-v1.ckpt"
    second.write_text("kept")
    assert unused_path(first).name == "last-good-step0000003-v2.ckpt"


def test_cli_diverging_run_exits_3_with_one_line(data, tmp_path):
    """A real divergence (lr 1e30, no clipping): one line naming step and samples, exit 3, a finite checkpoint."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-c", "from dflashtrain.cli import train; train()",
               *overrides(data, out, "optim.lr=1e30", "trainer.gradient_clip_val=null", "trainer.max_steps=20"),
               f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    found = re.match(r"dflashtrain: error: non-finite loss (nan|inf|-inf) at step (\d+), sample ids "
                     r"\[('train\.jsonl:\d+'(, )?)+\] \(file:N\); .* are in (\S+)$", last)
    assert found, last
    step, saved = int(found.group(2)), Path(found.group(5))
    assert saved == out / "checkpoints" / f"last-good-step{step:07d}.ckpt"
    checkpoint, weights = drafter_state(saved)
    assert checkpoint["global_step"] == step and all(torch.isfinite(v).all() for v in weights.values())
