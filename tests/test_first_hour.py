"""A newcomer's first hour: a failed command leaves no run directory, ckpt_path=latest finds multirun runs, the
installed dependencies are inside pyproject's ranges, and the quiet console keeps what matters."""

from __future__ import annotations

import logging
import os
import sys
import time
import tomllib
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dflashtrain import cli
from dflashtrain.export.checkpoint import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_cli(entry: str, *args: str, cwd: Path, monkeypatch) -> int:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [entry, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        getattr(cli, entry)()
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.parametrize("entry, args", [("train", ["model.drafter.block_size=1"]),
                                         ("train", ["data.path=missing.jsonl"]),
                                         ("evaluate", ["ckpt_path=missing.ckpt"]),
                                         ("export", ["ckpt_path=missing.ckpt"])])
def test_a_command_that_fails_before_it_produced_anything_leaves_no_directory(entry, args, tmp_path, monkeypatch):
    assert run_cli(entry, *args, cwd=tmp_path, monkeypatch=monkeypatch) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_failed_command_keeps_what_is_of_value(tmp_path, monkeypatch):
    """Directories that existed before, and a run directory that holds anything but bookkeeping, stay."""
    (tmp_path / "outputs/train").mkdir(parents=True)
    kept = tmp_path / "outputs/train/earlier_run/checkpoints/last.ckpt"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    assert run_cli("train", "model.drafter.block_size=1", cwd=tmp_path, monkeypatch=monkeypatch) == 2
    assert sorted(p.name for p in (tmp_path / "outputs/train").iterdir()) == ["earlier_run"] and kept.is_file()

    from dflashtrain.train import outputs

    run_dir = tmp_path / "claimed"
    outputs.forget_created_dirs()
    outputs.claim_dir(str(run_dir))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra/config.yaml").write_text("{}")
    (run_dir / "train.log").write_text("log")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard/events.out.tfevents.1").write_bytes(b"x")  # a metric logged: of value
    assert outputs.remove_created_dirs() == [] and (run_dir / "train.log").is_file()


def test_latest_finds_the_newest_run_of_outputs_and_multirun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    single = tmp_path / "outputs/train/2026-01-01_00-00-00/checkpoints/last.ckpt"
    swept = tmp_path / "multirun/train/2026-01-02_00-00-00/1_loss=dpace/checkpoints/last.ckpt"
    recipe = tmp_path / "multirun/tiny_ablation/0_loss=decay/checkpoints/last.ckpt"
    for age, path in ((30, single), (20, swept), (10, recipe)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
    assert resolve_checkpoint("latest") == recipe
    recipe.unlink()
    assert resolve_checkpoint("latest") == swept
    os.utime(single, None)
    assert resolve_checkpoint("latest") == single


def test_installed_dependencies_are_inside_the_pinned_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(line)
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (requirement, installed)


def test_quiet_console_keeps_lightning_records_and_other_warnings(caplog):
    """Only Lightning's own console handler goes (Hydra's handlers print its records once), only the litlogger tip
    is dropped, only the LeafSpec deprecation is ignored."""
    import lightning.pytorch  # noqa: F401  (adds Lightning's handler)

    from dflashtrain.train.console import quiet_console

    quiet_console()
    assert not [h for h in logging.getLogger("lightning").handlers if type(h) is logging.StreamHandler]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["another deprecation"]


def test_the_default_job_is_the_one_the_readme_measures():
    """README (model): the default job trains D-PACE for 900 steps of batch 8, 32 anchors, lr 2.5e-3, block 8."""
    from hydra import compose, initialize_config_module

    from dflashtrain.config.checks import loss_name
    from dflashtrain.config.schema import register_configs

    register_configs()
    with initialize_config_module("dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=["paths.output_dir=unused"])
    assert loss_name(cfg) == "dpace" and cfg.optim.lr == 2.5e-3 and cfg.trainer.max_steps == 900
    assert (cfg.data.batch_size, cfg.data.num_anchors, cfg.model.drafter.block_size) == (8, 32, 8)
    readme = (REPO / "README.md").read_text()
    assert "trains D-PACE for 900 steps of\nbatch 8 with 32 anchors per sequence at lr 2.5e-3" in readme
