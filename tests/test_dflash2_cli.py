"""DFlash2 as a user runs it: `dflashtrain loss=dflash2` on the tiny default (metrics, val/tau), `dflashtrain-eval` on
its checkpoint and on its export, and the export itself: the DFlash2DraftModel names and fields, a load-back check
that covers the convolutions and the selector, and never the DFlash architecture name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from test_train_e2e import QUIET, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dflashtrain.assets import TINY_TRAIN_JSONL

    out = tmp_path_factory.mktemp("dflash2")
    data = out / "train.jsonl"
    data.write_text("".join(open(TINY_TRAIN_JSONL).readlines()[:64]))
    result = run_cli("loss=dflash2", f"paths.output_dir={out}", f"data.path={data}", "trainer.max_steps=3",
                     "eval.every_n_steps=3", "eval.num_prompts=2", "eval.max_new_tokens=8", "data.batch_size=4",
                     "model.drafter.selector_rank=16", "loss.selector_warmup_ratio=0.5", *QUIET)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_trains_and_logs_the_selector_metrics_and_val_tau(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard")).Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    for tag in ("ce", "selector_ce", "selector_acc", "gold_in_topk", "selector_tau_est", "acc", "tau_est"):
        assert f"train/{tag}" in last, f"train/{tag} not logged"
    assert 0 <= last["train/selector_acc"] <= last["train/gold_in_topk"] <= 1
    assert 1 <= last["val/tau"] <= 8  # B = 8: 7 drafts + the bonus token at most
    # warmup 0.5 of 3 steps: the selector weight is 0 at steps 0 and 1, then 1; the loss adds it exactly
    alphas = [s.value for s in events.Scalars("train/coefficient/selector_ce")]
    assert alphas == [0.0, 0.0, 1.0]
    assert last["train/loss"] == pytest.approx(last["train/ce"] + last["train/selector_ce"], rel=1e-4)
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = checkpoint["dflashtrain"]
    assert meta["family"] == "dflash2" and meta["head_options"] == {
        "conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 16, "selector_top_k": 16,
        "selector_stop_gradient": False}
    assert checkpoint["state_dict"]["heads.successor_codebook"].shape == (384, 16)
    assert checkpoint["state_dict"]["drafter.layers.1.mlp_conv.base_kernel"].shape == (2, 2, 128)


def test_export_names_fields_and_load_back(trained, tmp_path):
    from dflashtrain.export.checkpoint import load_checkpoint
    from dflashtrain.export.hf import export, load_exported, reference_output

    ckpt = trained / "checkpoints" / "last.ckpt"
    out = export(ckpt, tmp_path / "drafter", None, "float32", overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlash2DraftModel"]
    assert config["dflash_config"] == {"target_layer_ids": [1, 3, 5], "mask_token_id": 347, "conv_kernel_size": 2,
                                       "conv_group_size": 16, "selector_rank": 16, "selector_top_k": 16}
    assert "selector_stop_gradient" not in json.dumps(config)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        assert weights.get_slice("candidate_selector.predecessor_codebook").get_shape() == [384, 16]
        assert weights.get_slice("layers.0.attention_conv.kernel_projection.weight").get_shape() == [2 * 2 * 8, 128]
    assert {"candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook",
            "candidate_selector.hidden_projection.weight"} <= names  # codebooks without ".weight"
    for i in (0, 1):
        for conv in ("attention_conv", "mlp_conv"):
            assert {f"layers.{i}.{conv}.base_kernel", f"layers.{i}.{conv}.kernel_projection.weight"} <= names
    loaded, original = load_exported(out), load_checkpoint(ckpt)
    assert loaded.family.name == "dflash2"
    assert torch.equal(reference_output(loaded.drafter), reference_output(original.drafter))
    for name, tensor in original.heads.state_dict().items():
        assert torch.equal(loaded.heads.state_dict()[name], tensor), name


def test_export_check_covers_the_selector_and_refuses_the_dflash_name(trained, tmp_path, monkeypatch):
    import dflashtrain.export.hf as export_module

    ckpt = trained / "checkpoints" / "last.ckpt"
    real_save = export_module.save_file

    def corrupting_save(tensors, path, metadata=None):
        name = "candidate_selector.successor_codebook"
        real_save(dict(tensors, **{name: tensors[name] + 1e-3}), path, metadata=metadata)

    monkeypatch.setattr(export_module, "save_file", corrupting_save)
    with pytest.raises(export_module.ExportCheckError, match="candidate_selector.successor_codebook"):
        export_module.export(ckpt, tmp_path / "a", None, "float32", overwrite=False)
    monkeypatch.setattr(export_module, "save_file", real_save)

    real_config = export_module.hf_config

    def as_dflash(*args, **kwargs):
        return dict(real_config(*args, **kwargs), architectures=["DFlashDraftModel"])

    monkeypatch.setattr(export_module, "hf_config", as_dflash)
    with pytest.raises(export_module.ExportCheckError, match="architectures"):
        export_module.export(ckpt, tmp_path / "b", None, "float32", overwrite=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_reports_tau_for_the_checkpoint_and_its_export_alike(trained, tmp_path):
    from hydra import compose, initialize_config_module

    from dflashtrain.assets import TINY_TARGET_DIR
    from dflashtrain.config.schema import register_configs
    from dflashtrain.export.hf import export
    from dflashtrain.inference.evaluate import run

    out = export(trained / "checkpoints" / "last.ckpt", tmp_path / "drafter", None, "float32", overwrite=False)
    register_configs()
    sources = [[f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"],
               [f"drafter_dir={out}", f"model.target.path={TINY_TARGET_DIR}"]]
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        reports = [run(compose("eval", overrides=[*source, "num_prompts=2", "max_new_tokens=10",
                                                  f"output_dir={tmp_path / str(n)}"]))
                   for n, source in enumerate(sources)]
        sampled = run(compose("eval", overrides=[*sources[1], "num_prompts=2", "max_new_tokens=8", "temperature=0.7",
                                                 "baseline=false", f"output_dir={tmp_path / 'sampled'}"]))
    for report in reports:
        assert report["decoding"] == "dflash2" and report["block_size"] == 8 and 1 <= report["tau"] <= 8
        assert report["greedy_mismatches"] == 0  # the selector's drafts are verified losslessly
    assert reports[0]["tau"] == reports[1]["tau"] and reports[0]["histogram"] == reports[1]["histogram"]
    assert sampled["temperature"] == 0.7 and 1 <= sampled["tau"] <= 8
