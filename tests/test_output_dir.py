"""Outputs: an unwritable output directory fails at start (before the tokenizer, data or weights), and no run ever
writes beside, overwrites or deletes another run's checkpoints.

Tests run as root, where file modes do not stop writes: "unwritable" here is a path under a regular file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import dflashtrain.train.recipe as train_module
from conftest import write_count_up_chats
from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import register_configs
from dflashtrain.train.outputs import claimed_output_dir
from dflashtrain.train.recipe import run

# Until the embedded tiny target is committed, its untrained stand-in (same tokenizer) is used.
TARGET = TINY_TARGET_DIR
register_configs()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_count_up_chats(path, 16)


def config(data: Path, out: Path, *extra: str):
    overrides = [f"model.target.path={TARGET}", f"data.path={data}", f"paths.output_dir={out}", "data.batch_size=4",
                 "checkpoint.every_n_train_steps=1", "logger=none", "eval.every_n_steps=0",
                 "trainer.enable_progress_bar=false", *extra]
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=overrides)


def fingerprints(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.ckpt"))}


def test_a_path_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for path in (blocker / "run", blocker):
        with pytest.raises(ConfigError) as info, claimed_output_dir(str(path), None):
            pass
        assert info.value.key == "paths.output_dir" and str(path) in str(info.value)


def test_unwritable_output_dir_fails_before_tokenizer_data_or_weights(data, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached after an unwritable output dir")

    for name in ("load_tokenizer", "ChatDataModule", "FrozenTarget"):
        monkeypatch.setattr(train_module, name, must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^paths\.output_dir: cannot write to .*a_file/run"):
        run(config(data, blocker / "run", "trainer.max_steps=1"))


def test_output_dir_rules(tmp_path):
    """Empty or absent: fine. Holding checkpoints: only a run resumed from one of them may continue there."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    with claimed_output_dir(str(out), None) as claimed:
        assert claimed == out and checkpoints.is_dir()
    (checkpoints / "last.ckpt").write_bytes(b"another run")
    elsewhere = tmp_path / "other.ckpt"
    elsewhere.write_bytes(b"")
    for resume in (None, elsewhere):
        with pytest.raises(ConfigError, match=r"^paths\.output_dir: .* already holds another run's outputs"):
            with claimed_output_dir(str(out), resume):
                pass
    with claimed_output_dir(str(out), checkpoints / "last.ckpt"):  # continuing that run
        pass
    assert (checkpoints / "last.ckpt").read_bytes() == b"another run"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write"), claimed_output_dir(str(blocker / "out"), None):
        pass


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory) -> Path:
    """A finished 2-step run: its output directory."""
    first = tmp_path_factory.mktemp("first")
    run(config(data, first, "trainer.max_steps=2"))
    return first


def test_no_run_touches_another_runs_checkpoints(data, first_run, tmp_path):
    first = first_run
    before = fingerprints(first / "checkpoints")
    assert {"last.ckpt", "step0000002.ckpt"} <= before.keys()

    # A new run pointed at the same directory is refused before it writes anything.
    with pytest.raises(ConfigError, match="already holds another run's outputs"):
        run(config(data, first, "trainer.max_steps=4"))
    assert fingerprints(first / "checkpoints") == before

    # A run resumed from the first one into its own directory (ModelCheckpoint restores the first run's
    # best_model_path from the checkpoint) writes only there.
    second = tmp_path / "second"
    run(config(data, second, "trainer.max_steps=3", f"resume_from={first / 'checkpoints' / 'last.ckpt'}"))
    assert fingerprints(first / "checkpoints") == before
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 3


def test_resume_with_another_geometry_is_refused_before_loading(data, first_run, tmp_path):
    first = first_run
    with pytest.raises(ConfigError, match=r"^model\.drafter\.block_size: is 6 but .* was trained with 8"):
        run(config(data, tmp_path / "second", "trainer.max_steps=2", "model.drafter.block_size=6",
                   f"resume_from={first / 'checkpoints' / 'last.ckpt'}"))
