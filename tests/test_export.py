"""Export to the DFlash HF directory (docs/export.md) and the checkpoint loaders behind `dflashtrain-eval`/`-export`:
exact names and config fields, exact load-back, refusal on a mismatch, ``ckpt_path=latest``, and both CLIs end to
end on a checkpoint written like a training run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3Config

import dflashtrain.export.hf as export_module
from dflashtrain.config.errors import ConfigError
from dflashtrain.export.checkpoint import load_checkpoint, resolve_checkpoint
from dflashtrain.export.hf import ExportCheckError, export, load_exported, reference_output
from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry

# The serving engines' tensor names (docs/export.md) for a 2-layer drafter, written out.
LAYER_NAMES = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight"]
SPEC_NAMES = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {f"layers.{i}.{n}" for i in (0, 1) for n in LAYER_NAMES}


def target_config(**overrides) -> Qwen3Config:
    fields = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                  eos_token_id=345, pad_token_id=343, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    return Qwen3Config(**{**fields, **overrides})


def write_checkpoint(path, target_dir, num_target_layers=4, seed=0, **meta_overrides):
    """A checkpoint shaped like a training run's: drafter.* state dict + the dflashtrain metadata."""
    torch.manual_seed(seed)
    geometry = DrafterGeometry(hidden_size=64, intermediate_size=96, num_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=5e5,
                               target_layer_ids=[0, 2], block_size=4, mask_token_id=347)
    drafter = DFlashDrafter(geometry)
    with torch.no_grad():  # norms away from 1, so a mix-up of norm weights would show
        for name, tensor in drafter.named_parameters():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
    meta = {"geometry": asdict(geometry), "num_target_layers": num_target_layers, "target_path": str(target_dir),
            "label_offset": 0, "family": "dflash", "head_options": {}, "objective": "decay", "vocab_size": 384,
            "config": {}, **meta_overrides}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"drafter.{k}": v for k, v in drafter.state_dict().items()},
                "dflashtrain": meta, "global_step": 7}, path)
    return path


@pytest.fixture
def target_dir(tmp_path):
    path = tmp_path / "target"
    target_config().save_pretrained(path)  # config.json only: export reads vocab_size and max positions
    return path


@pytest.fixture
def checkpoint(tmp_path, target_dir):
    return write_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", target_dir)


def test_export_writes_the_spec_format_and_loads_back_exactly(tmp_path, checkpoint):
    out = export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dflashtrain_export.json", "model.safetensors"]
    marker = json.loads((out / "dflashtrain_export.json").read_text())
    assert marker["files"] == ["config.json", "model.safetensors"] and marker["global_step"] == 7
    assert marker["checkpoint"] == str(checkpoint.resolve())
    assert not (tmp_path / "drafter.incomplete").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == SPEC_NAMES  # exactly: no embed_tokens, no lm_head, no prefix

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"target_layer_ids": [0, 2], "mask_token_id": 347}
    assert (config["block_size"], config["num_target_layers"], config["num_hidden_layers"]) == (4, 4, 2)
    assert (config["vocab_size"], config["max_position_embeddings"], config["hidden_size"]) == (384, 256, 64)
    assert config["tie_word_embeddings"] is False and config["intermediate_size"] == 96
    assert config["rope_theta"] == 5e5 and config["rope_parameters"]["rope_theta"] == 5e5
    hf = Qwen3Config.from_pretrained(out)  # a Qwen3 config transformers reads, with the drafter's depth
    assert hf.num_hidden_layers == 2 and hf.head_dim == 16 and hf.tie_word_embeddings is False

    original, loaded = load_checkpoint(checkpoint).drafter, load_exported(out).drafter
    assert asdict(loaded.geometry) == asdict(original.geometry)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(reference_output(loaded), reference_output(original))


def test_bfloat16_export_matches_the_checkpoint_cast_to_bfloat16(tmp_path, checkpoint):
    out = export(checkpoint, tmp_path / "bf16", None, "bfloat16", overwrite=False)
    exported = load_exported(out)
    loaded, config = exported.drafter, exported.config
    assert config["dtype"] == "bfloat16" and loaded.fc.weight.dtype == torch.bfloat16
    original = load_checkpoint(checkpoint).drafter
    assert torch.equal(loaded.fc.weight, original.fc.weight.to(torch.bfloat16))


@pytest.mark.parametrize("field,value", [("mask_token_id", 0), ("target_layer_ids", [1, 2])])
def test_export_refuses_a_wrong_dflash_config_and_leaves_nothing(tmp_path, checkpoint, monkeypatch, field, value):
    real = export_module.hf_config

    def wrong_config(*args, **kwargs):
        config = real(*args, **kwargs)
        config["dflash_config"][field] = value
        return config

    monkeypatch.setattr(export_module, "hf_config", wrong_config)
    with pytest.raises(ExportCheckError, match=f"dflash_config.{field}"):
        export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    assert not (tmp_path / "drafter").exists() and not (tmp_path / "drafter.incomplete").exists()


def test_export_refuses_when_a_tensor_does_not_survive(tmp_path, checkpoint, monkeypatch):
    real = export_module.save_file

    def corrupting_save(tensors, path, metadata=None):
        tensors = dict(tensors, **{"layers.1.mlp.up_proj.weight": tensors["layers.1.mlp.up_proj.weight"] * 1.001})
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(export_module, "save_file", corrupting_save)
    with pytest.raises(ExportCheckError, match="layers.1.mlp.up_proj.weight"):
        export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    assert not (tmp_path / "drafter").exists() and not (tmp_path / "drafter.incomplete").exists()


def test_export_refuses_a_bit_different_output(tmp_path, checkpoint, monkeypatch):
    real = export_module.reference_output
    calls = iter([0.0, 1e-7])  # the loaded drafter's output is compared first

    monkeypatch.setattr(export_module, "reference_output", lambda drafter: real(drafter) + next(calls))
    with pytest.raises(ExportCheckError, match="not bit-identical"):
        export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)


def test_export_config_errors_name_the_key(tmp_path, checkpoint, target_dir):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="^output_dir"):
        export(checkpoint, tmp_path / "full", None, "float32", overwrite=False)
    with pytest.raises(ConfigError, match="^dtype"):
        export(checkpoint, tmp_path / "d", None, "fp8", overwrite=False)
    with pytest.raises(ConfigError, match="^target_path"):
        export(checkpoint, tmp_path / "d", str(tmp_path / "nowhere"), "float32", overwrite=False)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ConfigError, match="^ckpt_path: .*not a dflashtrain"):
        load_checkpoint(tmp_path / "foreign.ckpt")


def fingerprint(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_a_previous_export(tmp_path, checkpoint, target_dir):
    """A models folder, the run's own checkpoints, an export with a file added: refused, untouched. A previous export
    (its marker lists exactly its files): replaced, whole."""
    models = tmp_path / "models"
    (models / "Qwen3-8B").mkdir(parents=True)
    (models / "Qwen3-8B" / "model.safetensors").write_bytes(b"weights")
    previous = export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    added = export(checkpoint, tmp_path / "added", None, "float32", overwrite=False)
    (added / "README.md").write_text("mine")
    for foreign, reason in [(models, "is not a dflashtrain export"), (checkpoint.parent, "is not a dflashtrain export"),
                            (added, "holds files that are not part of its export")]:
        before = fingerprint(foreign)
        with pytest.raises(ConfigError, match=f"^output_dir: .*{reason}"):
            export(checkpoint, foreign, None, "float32", overwrite=True)
        assert fingerprint(foreign) == before and not (foreign.parent / f"{foreign.name}.incomplete").exists()
    stamp = (previous / "config.json").stat().st_mtime_ns
    export(checkpoint, previous, None, "bfloat16", overwrite=True)
    assert json.loads((previous / "config.json").read_text())["dtype"] == "bfloat16"
    assert (previous / "config.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["added", "drafter", "models", "run", "target"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        export(checkpoint, a_file, None, "float32", overwrite=True)


def test_an_incomplete_directory_is_removed_only_when_it_is_a_dead_exports(tmp_path, checkpoint, monkeypatch):
    from dflashtrain.export.directory import STAGING_MARKER

    staging = tmp_path / "drafter.incomplete"
    staging.mkdir()
    (staging / "notes.txt").write_text("someone else's")
    with pytest.raises(ConfigError, match="not a dflashtrain staging directory"):
        export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    assert (staging / "notes.txt").read_text() == "someone else's"
    (staging / "notes.txt").unlink()
    import socket

    (staging / STAGING_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live export: this process
    with pytest.raises(ConfigError, match="being written by another export"):
        export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (staging / STAGING_MARKER).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")  # a crashed export's
    out = export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    assert (out / "config.json").is_file() and not staging.exists()


def test_a_full_disk_during_export_is_one_line_and_changes_nothing(tmp_path, checkpoint, monkeypatch):
    from dflashtrain.export.atomic import OutputWriteError

    previous = export(checkpoint, tmp_path / "drafter", None, "float32", overwrite=False)
    before = fingerprint(previous)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_file", full_disk)
    with pytest.raises(OutputWriteError, match=r"^output_dir: cannot write .*No space left on device; nothing was "
                                               r"exported, the output directory is unchanged$"):
        export(checkpoint, previous, None, "float32", overwrite=True)
    assert fingerprint(previous) == before and not (tmp_path / "drafter.incomplete").exists()
    from dflashtrain.cli import exit_code

    assert exit_code(OutputWriteError("output_dir", "x")) == 6


def test_latest_is_the_newest_last_ckpt_under_the_working_directory(tmp_path, target_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^ckpt_path: is 'latest' but no outputs/train"):
        resolve_checkpoint("latest")
    older = write_checkpoint(tmp_path / "outputs/train/2026-01-02_00-00-00/checkpoints/last.ckpt", target_dir)
    newer = write_checkpoint(tmp_path / "outputs/train/2026-01-01_00-00-00/checkpoints/last.ckpt", target_dir)
    os.utime(older, (time.time() - 60, time.time() - 60))
    assert resolve_checkpoint("latest").samefile(newer)
    with pytest.raises(ConfigError, match="^ckpt_path: no checkpoint file"):
        resolve_checkpoint("missing.ckpt")


def test_a_failed_export_check_exits_4():
    from dflashtrain.cli import exit_code

    assert exit_code(ExportCheckError("x")) == 4


# ---------------------------------------------------------------------------------------------- CLIs end to end
def run_cli(entry, *overrides, cwd):
    command = [sys.executable, "-c", f"from dflashtrain.cli import {entry}; {entry}()", *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_export_and_eval_clis_with_no_arguments_after_a_run(tmp_path, random_target_dir):
    """As after `make run`: a run's last.ckpt under ./outputs/train, then `dflashtrain-export` and `dflashtrain-eval`
    with no checkpoint argument; eval reads the target recorded in the checkpoint and the held-out prompts."""
    from dflashtrain.assets import TINY_HELDOUT_JSONL

    config = Qwen3Config.from_pretrained(random_target_dir)
    ckpt = write_checkpoint(tmp_path / "outputs/train/2026-01-01_00-00-00/checkpoints/last.ckpt", random_target_dir,
                            num_target_layers=config.num_hidden_layers)
    exported = run_cli("export", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    (drafter_dir,) = (tmp_path / "outputs/export").glob("*/drafter")
    assert json.loads((drafter_dir / "config.json").read_text())["vocab_size"] == config.vocab_size

    evaluated = run_cli("evaluate", "num_prompts=3", "max_new_tokens=12", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "tau = " in evaluated.stdout and "accepted  0:" in evaluated.stdout and "speedup" in evaluated.stdout
    (report_path,) = (tmp_path / "outputs/eval").glob("*/eval.json")
    report = json.loads(report_path.read_text())
    assert report["prompts"] == 3 and report["block_size"] == 4 and report["ckpt_path"] == str(ckpt.resolve())
    histogram, rounds = report["histogram"], report["rounds"]
    assert sum(histogram) == rounds and len(report["accept_rate"]) == 3
    assert report["tau"] == pytest.approx(sum((n + 1) * count for n, count in enumerate(histogram)) / rounds)
    assert report["greedy_mismatches"] == 0
    assert report["speedup"] == pytest.approx(report["baseline_seconds"] / report["seconds"])
    assert list(report_path.parent.glob("tensorboard/events.out.tfevents.*"))
    assert report["eval_path"] == str(TINY_HELDOUT_JSONL)

    # An exported directory, sampling at T > 0, no baseline: in process (the CLI path is the one above).
    from hydra import compose, initialize_config_module

    from dflashtrain.config.schema import register_configs
    from dflashtrain.inference.evaluate import run

    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("eval", overrides=[f"drafter_dir={drafter_dir}", f"model.target.path={random_target_dir}",
                                         "num_prompts=2", "max_new_tokens=8", "temperature=0.8", "baseline=false",
                                         f"output_dir={tmp_path / 'from_dir'}"])
    sampled = run(cfg)
    assert sampled["drafter_dir"] == str(drafter_dir) and sampled["temperature"] == 0.8 and "speedup" not in sampled
    assert (tmp_path / "from_dir" / "eval.json").is_file()


# ---------------------------------------------------------------------------------------------- val/tau callback
def test_tau_callback_logs_every_n_steps_once(monkeypatch):
    from dflashtrain.train.callbacks import TauEvalCallback

    callback = TauEvalCallback(prompts=[[1, 2]], stop_token_ids=[0], every_n_steps=100, max_new_tokens=4)
    monkeypatch.setattr(callback, "measure", lambda module: 2.5)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    module = SimpleNamespace(drafter=None, target=None)
    for step in (0, 99, 100, 100, 150, 200):  # 100 twice: micro-batches of one accumulated step
        callback.on_train_batch_end(SimpleNamespace(global_step=step, loggers=[logger]), module, None, None, 0)
    assert logged == [(100, {"val/tau": 2.5}), (200, {"val/tau": 2.5})]
    assert callback.history == [(100, 2.5), (200, 2.5)]


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["eval", "export"])
def test_eval_and_export_configs_compose_with_defaults_that_need_no_arguments(name):
    from hydra import compose, initialize_config_module

    from dflashtrain.config.schema import register_configs

    register_configs()
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose(name, overrides=[])
        assert cfg.ckpt_path == "latest"
        if name == "eval":  # the target defaults to the checkpoint's; the held-out prompts to the tiny set
            assert cfg.model.target.path is None and cfg.temperature == 0.0
            assert cfg.data.eval_path.endswith("heldout.jsonl")
            assert compose(name, overrides=["model.target.path=/models/x"]).model.target.path == "/models/x"
        with pytest.raises(Exception, match="no_such_key"):
            compose(name, overrides=["no_such_key=1"])
