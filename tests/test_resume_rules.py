"""A resume that changes a setting is refused or applied, never silently ignored; refusals come before any weight.

Refused: what makes it another run (objective, drafter shape, data order or position). Applied and logged: what can
take effect from the resumed step (optimizer settings, schedule length, clipping, precision, paths). Also refused:
a checkpoint without training state, and continuing in place from a step older than the directory's last.ckpt.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import dflashtrain.train.recipe as recipe
from conftest import write_count_up_chats
from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import register_configs
from dflashtrain.train.module import DraftModule
from dflashtrain.train.recipe import run

register_configs()


def config(data: Path, out: Path, *extra: str):
    overrides = [f"model.target.path={TINY_TARGET_DIR}", f"data.path={data}", f"paths.output_dir={out}",
                 "data.batch_size=4", "checkpoint.every_n_train_steps=1", "logger=none", "eval.every_n_steps=0",
                 "trainer.enable_progress_bar=false", "trainer.max_steps=2", *extra]
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_count_up_chats(tmp_path_factory.mktemp("data") / "train.jsonl", 16)


@pytest.fixture(scope="module")
def first(data, tmp_path_factory) -> Path:
    """A finished 2-step decay run: its output directory."""
    out = tmp_path_factory.mktemp("first")
    run(config(data, out, "checkpoint.save_top_k=-1"))  # keeps step0000001.ckpt too
    return out


@pytest.mark.parametrize("change,key", [
    (["loss=dspark"], "loss"),  # another objective family: it would be a state-dict traceback later
    (["loss.gamma=2"], "loss.gamma"),
    (["loss.target=kd"], "loss.target"),
    (["model.drafter.num_layers=3"], "model.drafter.num_layers"),
    (["data.shuffle=false"], "data.shuffle"),
    (["data.num_anchors=4"], "data.num_anchors"),
    (["seed=1"], "seed"),
    (["trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches"),
])
def test_a_change_that_makes_it_another_run_is_refused_before_any_weight(data, first, tmp_path, monkeypatch, change,
                                                                         key):
    monkeypatch.setattr(recipe, "FrozenTarget", None)  # loading the target would fail: nothing got that far
    with pytest.raises(ConfigError) as info:
        run(config(data, tmp_path / "second", "trainer.max_steps=3", *change,
                   f"resume_from={first / 'checkpoints' / 'last.ckpt'}"))
    assert info.value.key == key and "\n" not in str(info.value)
    assert not (tmp_path / "second").exists()


def test_a_checkpoint_without_training_state_is_refused(data, first, tmp_path):
    state = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del state["optimizer_states"]
    torch.save(state, tmp_path / "weights_only.ckpt")
    with pytest.raises(ConfigError, match="^resume_from: .* holds no training state"):
        run(config(data, tmp_path / "second", f"resume_from={tmp_path / 'weights_only.ckpt'}"))


def test_continuing_in_place_from_an_older_step_is_refused(data, first):
    with pytest.raises(ConfigError, match=r"^resume_from: .*step0000001\.ckpt is step 1 but .*last\.ckpt is step 2"):
        run(config(data, first, "trainer.max_steps=3", f"resume_from={first / 'checkpoints' / 'step0000001.ckpt'}"))


def test_changed_optimizer_settings_take_effect_and_are_logged(data, first, tmp_path, monkeypatch, caplog):
    """Lightning restores the checkpoint's lr into the optimizer and scheduler: a new optim.lr would be ignored."""
    seen = []
    original = DraftModule.training_step

    def training_step(module, batch, batch_idx):
        seen.append(module.optimizers().param_groups[0]["lr"])
        return original(module, batch, batch_idx)

    monkeypatch.setattr(DraftModule, "training_step", training_step)
    caplog.set_level(logging.WARNING, logger="dflashtrain.train.resume")
    run(config(data, tmp_path / "second", "trainer.max_steps=3", "optim.lr=1e-3", "optim.warmup_ratio=0",
               "optim.min_lr_ratio=1.0", f"resume_from={first / 'checkpoints' / 'last.ckpt'}"))
    assert seen == [pytest.approx(1e-3)]  # the constant schedule at the new lr, from the first resumed step
    text = caplog.text
    assert "optim.lr: 0.0025 -> 0.001 takes effect" in text and "trainer.max_steps: 2 -> 3 takes effect" in text


def test_what_a_resume_may_change(tmp_path):
    """The rule of each kind of key (the first that matches wins)."""
    from dflashtrain.train.resume import rule_for

    verdicts = {key: (rule_for(key) or ("free",))[0] for key in (
        "loss.gamma", "loss.ce_alpha", "model.drafter.block_size", "model.drafter.markov_rank", "seed",
        "data.batch_size", "data.shuffle", "trainer.accumulate_grad_batches", "optim.lr", "optim.betas",
        "trainer.max_steps", "trainer.gradient_clip_val", "trainer.precision", "model.target.path",
        "model.target.dtype", "data.path", "data.chat_template", "data.format", "model.drafter.attention", "model.drafter.logits_chunk_blocks",
        "logger.name", "checkpoint.every_n_train_steps", "eval.every_n_steps", "paths.output_dir", "resume_from")}
    assert {k for k, v in verdicts.items() if v == "refuse"} == {
        "loss.gamma", "loss.ce_alpha", "model.drafter.block_size", "model.drafter.markov_rank", "seed",
        "data.shuffle", "trainer.accumulate_grad_batches", "data.chat_template", "data.format"}
    assert {k for k, v in verdicts.items() if v == "free"} == {
        "logger.name", "checkpoint.every_n_train_steps", "eval.every_n_steps", "paths.output_dir", "resume_from"}


def test_the_data_position_only_continues_over_the_same_rows(tmp_path):
    from dflashtrain.train.resume import ResumePoint, check_resume_data

    point = ResumePoint(path=tmp_path / "last.ckpt", checkpoint={"ChatDataModule": {
        "epoch": 1, "batches_done": 3, "rows": 64, "global_batch_size": 8}, "global_step": 11})
    check_resume_data(point, 64)
    with pytest.raises(ConfigError, match="^data.path: gives 63 usable rows, the run .* had 64"):
        check_resume_data(point, 63)


def test_auto_resumes_from_the_newest_checkpoint(tmp_path):
    """kill -9 between a periodic save's two writes leaves stepN.ckpt newer than last.ckpt: auto takes the newer."""
    from dflashtrain.train.resume import newest_checkpoint

    def save(name, step):
        torch.save({"dflashtrain": {"geometry": {}, "family": "dflash"}, "global_step": step}, tmp_path / name)

    assert newest_checkpoint(tmp_path) is None
    save("last-good-step0000009.ckpt", 9)
    assert newest_checkpoint(tmp_path) is None  # never resumed from by itself
    save("last.ckpt", 4)
    save("step0000004.ckpt", 4)
    assert newest_checkpoint(tmp_path).name == "last.ckpt"
    save("step0000006.ckpt", 6)
    assert newest_checkpoint(tmp_path).name == "step0000006.ckpt"
