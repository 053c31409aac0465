"""The feature cache (dflashtrain-cache, data.kind=features): what it stores against its estimate, a training step
from it equal to the online step on the same batch and seed, only the embedding and head loaded, and a cache that
does not fit the config refused naming the mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_count_up_chats
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import register_configs
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.data.features import CachedTarget, check_manifest, decode_states, expected_entries, read_manifest
from dflashtrain.families import family_checks, get_family
from dflashtrain.models.target import FrozenTarget, drafter_geometry, load_target_config, load_tokenizer
from dflashtrain.objectives import build_objective
from dflashtrain.train import cache as cache_app
from dflashtrain.train.reduction import loss_numerator
from factories import make_module

register_configs()


def compose_cache(*overrides):
    """The dflashtrain-cache config (the training config plus cache.*), outside a running Hydra app."""
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("cache", overrides=["paths.output_dir=unused", *overrides])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_count_up_chats(tmp_path_factory.mktemp("data") / "train.jsonl", 10)


def write(tmp_path_factory, data, name, *overrides):
    out = tmp_path_factory.mktemp(name) / "features"
    cfg = compose_cache(f"data.path={data}", f"cache.output_dir={out}", "cache.batch_size=3", "cache.rows_per_shard=4",
                        *overrides)
    return cfg, cache_app.run(cfg), out


@pytest.fixture(scope="module")
def decay_cache(tmp_path_factory, data):
    return write(tmp_path_factory, data, "decay")


@pytest.fixture(scope="module")
def dspark_cache(tmp_path_factory, data):
    return write(tmp_path_factory, data, "dspark", "loss=dspark")


def test_manifest_shards_and_size_against_the_estimate(decay_cache, dspark_cache):
    cfg, manifest, out = decay_cache
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert manifest["shards"] == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]  # 4 + 4 + 2 rows
    assert manifest["rows"] == 10 and manifest["layer_ids"] == [1, 3, 5] and manifest["hidden_size"] == 128
    assert manifest["final_hidden"] is False and manifest["feature_dtypes"] == {"tapped": "float32"}
    assert manifest["target_dtype"] == "float32" and manifest["max_length"] == 128
    assert abs(manifest["bytes"] / manifest["bytes_estimate"] - 1) < 0.05
    assert manifest["bytes"] / manifest["tokens"] > 3 * 128 * 4  # the tapped states dominate: 1536 B per token
    _, with_final, _ = dspark_cache
    assert with_final["final_hidden"] is True and with_final["bytes"] > manifest["bytes"]
    assert not (out.parent / "features.incomplete").exists()


def test_stored_states_are_the_targets(decay_cache, data):
    cfg, manifest, out = decay_cache
    from datasets import Dataset

    record = Dataset.from_file(str(out / "shard-00000.arrow"))[1]
    target = FrozenTarget.load(cfg.model.target.path, "float32", manifest["layer_ids"])
    ids = torch.tensor([record["input_ids"]])
    online = target.states(ids, torch.ones_like(ids)).tapped[0]
    stored = decode_states(record["tapped"], len(record["input_ids"]), 384, torch.float32)
    torch.testing.assert_close(stored, online, rtol=1e-5, atol=1e-5)


def modules_and_batches(cfg, out, data):
    """(online module, cached module, online batch, cached batch): one drafter init, the same rows."""
    path = cfg.model.target.path
    tokenizer = load_tokenizer(path)
    geometry = drafter_geometry(load_target_config(path), cfg.model.drafter, tokenizer.mask_token_id)
    objective = build_objective(OmegaConf.to_object(cfg.loss))
    family = get_family(objective.family)
    heads_options = family_checks(family.name).head_options(cfg)
    torch.manual_seed(0)
    drafter = family.build_drafter(geometry, heads_options)
    heads = family.build_heads(load_target_config(path).vocab_size, geometry.hidden_size, heads_options)
    modules = []
    for target in (FrozenTarget.load(path, "float32", geometry.target_layer_ids),
                   CachedTarget.load(path, "float32", geometry.target_layer_ids)):
        copy = family.build_drafter(geometry, heads_options)
        copy.load_state_dict(drafter.state_dict())
        copy_heads = None
        if heads is not None:
            copy_heads = family.build_heads(load_target_config(path).vocab_size, geometry.hidden_size, heads_options)
            copy_heads.load_state_dict(heads.state_dict())
        modules.append(make_module(copy, target, objective, heads=copy_heads, num_anchors=16, chunk_blocks=4))
    batches = []
    for features in (None, read_manifest(str(out))):
        source = str(out) if features else str(data)
        datamodule = ChatDataModule(tokenizer, source, 128, 2 * geometry.block_size, 4, 0, True, "error", 16, 0,
                                    features=features)
        datamodule.setup()
        batches.append(next(iter(datamodule.train_dataloader())))
    return (*modules, *batches)


@pytest.mark.parametrize("which", ["decay_cache", "dspark_cache"])
def test_a_step_from_the_cache_equals_the_online_step(which, request, data):
    """Same batch (the same rows, anchors seeded by row key) and seed: the same loss terms and gradients, bitwise on
    CPU (the cache ran the target in batches of 3, the online step in one batch of 4, each padded its own way)."""
    cfg, manifest, out = request.getfixturevalue(which)
    online, cached, online_batch, cached_batch = modules_and_batches(cfg, out, data)
    assert online_batch["sample_ids"] == cached_batch["sample_ids"]
    assert online_batch["row_keys"] == cached_batch["row_keys"]
    losses = []
    for module, batch in ((online, online_batch), (cached, cached_batch)):
        total, _, _ = module.forward_loss(batch, chunk_blocks=4)
        loss = loss_numerator(total, module.objective.coefficients) / total.weight_sum  # the step's form
        loss.backward()
        losses.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (online_loss, online_grads), (cached_loss, cached_grads) = losses
    assert torch.equal(online_loss, cached_loss), (online_loss, cached_loss)
    assert online_grads.keys() == cached_grads.keys() and online_grads
    assert all(torch.equal(online_grads[n], cached_grads[n]) for n in online_grads)


def test_training_from_the_cache_loads_only_the_embedding_and_head(decay_cache, monkeypatch):
    cfg, manifest, _ = decay_cache
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the whole target was loaded")))
    cached = CachedTarget.load(cfg.model.target.path, "float32", [1, 3, 5])
    from safetensors.torch import load_file

    weights = load_file(f"{cfg.model.target.path}/model.safetensors")
    assert torch.equal(cached.embed_tokens.weight, weights["model.embed_tokens.weight"])
    assert torch.equal(cached.lm_head.weight, weights["lm_head.weight"])
    assert not hasattr(cached, "model")
    loaded = sum(p.numel() for p in [*cached.embed_tokens.parameters(), *cached.lm_head.parameters()])
    assert loaded == weights["model.embed_tokens.weight"].numel() + weights["lm_head.weight"].numel()


@pytest.mark.parametrize("overrides, key", [
    (["model.drafter.num_taps=2"], "model.drafter.target_layer_ids"),
    (["model.target.dtype=bfloat16"], "model.target.dtype"),
    (["trainer.precision=bf16-mixed"], "trainer.precision"),
    (["data.max_length=96"], "data.max_length"),
    (["loss=dspark"], "loss"),
])
def test_a_cache_that_does_not_fit_the_config_is_refused(decay_cache, overrides, key):
    _, _, out = decay_cache
    cfg = compose_cache("data.kind=features", f"data.path={out}", *overrides)
    tokenizer = load_tokenizer(cfg.model.target.path)
    geometry = drafter_geometry(load_target_config(cfg.model.target.path), cfg.model.drafter, tokenizer.mask_token_id)
    needs = build_objective(OmegaConf.to_object(cfg.loss)).needs_teacher
    with pytest.raises(ConfigError) as info:
        check_manifest(read_manifest(str(out)), expected_entries(cfg, geometry.target_layer_ids, needs))
    assert info.value.key == key
    assert "run dflashtrain-cache again" in str(info.value) or "write one with this loss" in str(info.value)


def test_a_cache_of_another_target_is_refused(decay_cache, random_target_dir):
    _, _, out = decay_cache
    cfg = compose_cache("data.kind=features", f"data.path={out}", f"model.target.path={random_target_dir}")
    with pytest.raises(ConfigError, match="^model.target.path: is '[0-9a-f]+' but the feature cache"):
        check_manifest(read_manifest(str(out)), expected_entries(cfg, [1, 3, 5], False))


def test_the_cache_app_never_writes_over_a_directory(tmp_path, data):
    (tmp_path / "features").mkdir()
    with pytest.raises(ConfigError, match="^cache.output_dir: .* exists"):
        cache_app.run(compose_cache(f"data.path={data}", f"cache.output_dir={tmp_path / 'features'}"))
    with pytest.raises(ConfigError, match="^cache.output_dir: is required"):
        cache_app.run(compose_cache(f"data.path={data}"))
    (tmp_path / "other.incomplete").mkdir()
    with pytest.raises(ConfigError, match="is not an interrupted dflashtrain-cache run"):
        cache_app.run(compose_cache(f"data.path={data}", f"cache.output_dir={tmp_path / 'other'}"))


def test_the_estimate_of_a_qwen3_8b_cache():
    """README: Qwen3-8B (d = 4096), 5 taps, bfloat16: 40 KiB per token, 48 KiB with the final hidden state."""
    taps = {"tapped": 5 * 4096}
    assert cache_app.estimate(1000, 0, taps, 2) == 1000 * (40 * 1024 + 5)
    assert cache_app.estimate(1000, 0, {**taps, "final_hidden": 4096}, 2) == 1000 * (48 * 1024 + 5)


def test_no_room_for_the_estimate_refuses_to_start(tmp_path, data, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"^cache.output_dir: the cache needs about .* has 1000 B free"):
        cache_app.run(compose_cache(f"data.path={data}", f"cache.output_dir={tmp_path / 'features'}"))
    assert not (tmp_path / "features").exists() and not (tmp_path / "features.incomplete").exists()


def test_a_bfloat16_cache_round_trips(tmp_path_factory, data):
    cfg, manifest, out = write(tmp_path_factory, data, "bf16", "model.target.dtype=bfloat16",
                               "trainer.precision=bf16-mixed")
    assert manifest["feature_dtypes"] == {"tapped": "bfloat16"} and manifest["target_dtype"] == "bfloat16"
    assert abs(manifest["bytes"] / manifest["bytes_estimate"] - 1) < 0.05
    tokenizer = load_tokenizer(cfg.model.target.path)
    datamodule = ChatDataModule(tokenizer, str(out), 128, 16, 4, 0, False, "error", 16, 0,
                                features=read_manifest(str(out)))
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    target = FrozenTarget.load(cfg.model.target.path, "bfloat16", manifest["layer_ids"])
    row = torch.tensor([datamodule.train_set[0]["input_ids"]])
    online = target.states(row, torch.ones_like(row)).tapped[0]
    assert batch["tapped"].dtype == torch.bfloat16
    torch.testing.assert_close(batch["tapped"][0, :row.shape[1]], online, rtol=2e-2, atol=2e-2)
    assert not batch["tapped"][0, row.shape[1]:].any()  # padding: zero states


def test_a_cache_with_a_missing_shard_is_refused(decay_cache, tmp_path):
    import shutil

    _, _, out = decay_cache
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "shard-00001.arrow").unlink()
    with pytest.raises(ConfigError, match="^data.path: the feature cache .* lacks shard shard-00001.arrow"):
        read_manifest(str(damaged))
