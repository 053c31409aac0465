"""The CLI end to end on the embedded tiny default: trains, logs to TensorBoard, checkpoints without the target,
resumes; the target never receives a gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-c", "from dflashtrain.cli import train; train()"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def run_cli(*overrides, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*CLI, *overrides], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dflashtrain.assets import TINY_TRAIN_JSONL

    out = tmp_path_factory.mktemp("run")
    data = out / "train.jsonl"
    data.write_text("".join(open(TINY_TRAIN_JSONL).readlines()[:96]))
    result = run_cli(f"paths.output_dir={out}", f"data.path={data}", "trainer.max_steps=4",
                     "checkpoint.every_n_train_steps=2", "data.batch_size=8", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, data


def test_writes_tensorboard_events_and_checkpoints(trained):
    out, _ = trained
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_logged_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/ce", "train/acc", "train/acc_k/1", "train/tau_est", "train/tau_cumprod",
                "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time"):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    assert all(1.0 <= s.value <= 8.0 for s in events.Scalars("train/tau_est"))  # B = 8: at most 7 drafts + bonus


def test_checkpoint_holds_no_target_weights(trained):
    out, _ = trained
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.startswith("drafter.") for k in keys)
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)
    assert "fc.weight" in {k.removeprefix("drafter.") for k in keys}
    meta = checkpoint["dflashtrain"]
    assert meta["geometry"]["target_layer_ids"] == [1, 3, 5] and meta["geometry"]["block_size"] == 8
    assert checkpoint["global_step"] == 4


def test_resume_continues_the_step_count(trained, tmp_path):
    out, data = trained
    result = run_cli(f"paths.output_dir={tmp_path}", f"data.path={data}", "trainer.max_steps=6",
                     f"resume_from={out / 'checkpoints' / 'last.ckpt'}", "data.batch_size=8", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6


def test_runs_from_another_directory_on_a_target_saved_to_disk(random_target_dir, tiny_data, tmp_path):
    """The real-model path: any local HF directory, through from_pretrained; cwd is irrelevant."""
    result = run_cli(f"model.target.path={random_target_dir}", f"data.path={tiny_data}", "trainer.max_steps=2",
                     "model.drafter.target_layer_ids=[0,2]", "model.drafter.num_taps=2",
                     f"paths.output_dir={tmp_path / 'out'}", "data.batch_size=4", *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()


def test_target_gets_no_gradient_and_is_not_optimized(random_target_dir, tiny_data):
    from dflashtrain.config.schema import DrafterConfig
    from dflashtrain.data.datamodule import ChatDataModule
    from dflashtrain.models.dflash import DFlashDrafter
    from dflashtrain.models.target import FrozenTarget, drafter_geometry, load_target_config, load_tokenizer
    from factories import make_module, make_objective
    from omegaconf import OmegaConf

    path = str(random_target_dir)
    tokenizer = load_tokenizer(path)
    drafter_cfg = OmegaConf.structured(DrafterConfig(num_layers=1, block_size=4, target_layer_ids=[0, 2], num_taps=2))
    geometry = drafter_geometry(load_target_config(path), drafter_cfg, tokenizer.mask_token_id)
    target = FrozenTarget.load(path, "float32", geometry.target_layer_ids)
    module = make_module(DFlashDrafter(geometry), target, make_objective("decay", gamma=4.0), num_anchors=8,
                         chunk_blocks=4)
    data = ChatDataModule(tokenizer, str(tiny_data), 128, 8, 4, num_workers=0, shuffle=True, on_bad_row="error",
                          pad_to_multiple_of=1, seed=0)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    total, _, _ = module.forward_loss(batch, chunk_blocks=4)
    (sum(total.terms.values()) / total.weight_sum).backward()
    assert all(p.grad is None for p in target.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.drafter.parameters())
    assert not any(name.startswith("target") for name, _ in module.named_parameters())
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.drafter.parameters()}
