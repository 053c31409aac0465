"""The README's workflow from a dataset to a drafter, as its commands run on the tiny default (offline):
regen -> cache -> train from the cache (and, for comparison, from the regenerated conversations) -> eval -> export.
Training from the cache logs the very losses the online run logs; a cache that does not fit is one line, exit 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv", "eval.every_n_steps=0"]


def cli(entry, *overrides, cwd):
    command = [sys.executable, "-c", f"from dflashtrain.cli import {entry}; {entry}()", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, env=env)
    return result, result.stdout + result.stderr


def losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [(row["step"], row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    regen, output = cli("regen", "num_rows=16", "rows_per_shard=8", "output_dir=data/regen",
                        f"hydra.run.dir={root / 'hydra_regen'}", cwd=root)
    assert regen.returncode == 0, output[-3000:]
    cache, cache_output = cli("cache", "data.path=data/regen", "cache.output_dir=data/features",
                              f"hydra.run.dir={root / 'hydra_cache'}", cwd=root)
    assert cache.returncode == 0, cache_output[-3000:]
    return root, output, cache_output


def test_regen_writes_a_complete_dataset(workflow):
    root, output, _ = workflow
    manifest = json.loads((root / "data/regen/manifest.json").read_text())
    assert manifest["complete"] and sorted(manifest["shards"]) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert "regenerating" in output  # the progress bar
    assert "regenerated" in output and "written 16" in output


def test_cache_prints_its_estimate_before_writing(workflow):
    root, _, output = workflow
    assert output.index("feature cache: 16 rows") < output.index("feature cache written")  # both on stdout
    assert (root / "data/features/manifest.json").is_file()


def test_training_from_the_cache_logs_the_online_losses_then_eval_and_export(workflow):
    """Both runs: the same seed, so the same batches and anchors; the target's states read or computed."""
    root, _, _ = workflow
    steps = ["trainer.max_steps=3", "data.batch_size=4", *QUIET]
    online, online_output = cli("train", "data.path=data/regen", "paths.output_dir=runs/online", *steps,
                                f"hydra.run.dir={root / 'hydra_online'}", cwd=root)
    assert online.returncode == 0, online_output[-3000:]
    assert "loaded from the tokenized cache" in online_output  # tokenized once, by dflashtrain-cache
    cached, cached_output = cli("train", "data.kind=features", "data.path=data/features",
                                "paths.output_dir=runs/cached", *steps, f"hydra.run.dir={root / 'hydra_cached'}",
                                cwd=root)
    assert cached.returncode == 0, cached_output[-3000:]
    assert "Loading weights" not in cached_output  # embedding and head only, never the whole target
    assert "feature cache data/features" in cached_output
    assert len(losses(root / "runs/online")) == 3 and losses(root / "runs/cached") == losses(root / "runs/online")

    # eval and export of a checkpoint trained from the cache (in process: their CLIs are tested in test_export.py)
    from hydra import compose, initialize_config_module

    from dflashtrain.export.checkpoint import resolve_checkpoint
    from dflashtrain.export.hf import export
    from dflashtrain.inference.evaluate import run

    checkpoint = root / "runs/cached/checkpoints/last.ckpt"
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("eval", overrides=[f"ckpt_path={checkpoint}", "num_prompts=2", "max_new_tokens=8",
                                         "baseline=false", f"output_dir={root / 'eval'}"])
    assert run(cfg)["prompts"] == 2
    export(resolve_checkpoint(str(checkpoint)), root / "drafter", None, "float32", False)
    assert (root / "drafter" / "model.safetensors").is_file()


def test_a_cache_that_does_not_fit_is_one_line_before_any_weight_loads(workflow):
    root, _, _ = workflow
    result, output = cli("train", "data=cached", "data.path=data/features", "data.max_length=128",
                         "model.drafter.num_taps=2", "paths.output_dir=runs/mismatch",
                         f"hydra.run.dir={root / 'hydra_mismatch'}", cwd=root)
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "dflashtrain: error: model.drafter.target_layer_ids: is [1, 5] but the feature cache data/features was "
        "written with layer_ids=[1, 3, 5]")
    assert "Loading weights" not in output
