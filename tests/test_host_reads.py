"""The step's host reads (dflashtrain/train/host.py): none between host-read steps, empty and non-finite steps skipped
on the device by the fused optimizer, the guard acting at the next read with the weights the bad step started from."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import write_count_up_chats
from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.schema import register_configs
from dflashtrain.train.guards import NonFiniteLossError
from dflashtrain.train.host import HostReadCounter, StepHealth, to_host
from dflashtrain.train.module import DraftModule
from dflashtrain.train.recipe import adamw, run

register_configs()
EVERY = 3  # the host-read cadence a GPU run with log_every_n_steps=3 has, forced here on CPU


def identity(t):
    return t


def test_to_host_is_one_copy_that_keeps_names_and_shapes():
    values = {"a": torch.tensor(2.5), "b": torch.arange(6).view(2, 3), "c": torch.tensor(True)}
    with HostReadCounter() as counter:
        host = to_host(values)
    assert counter.calls == ["cpu"]
    assert host["a"].item() == 2.5 and host["b"].tolist() == [[0, 1, 2], [3, 4, 5]] and host["c"].item() == 1.0


def test_health_skips_from_the_first_bad_step_on_and_empty_steps_alone():
    health, finite = StepHealth(), torch.tensor(1.0)
    skips = []
    for step, (loss, norm, den) in enumerate([(1.0, finite, 2.0), (1.0, finite, 0.0), (1.0, finite, 3.0),
                                              (float("nan"), finite, 3.0), (1.0, finite, 3.0)]):
        health.saw_loss(torch.tensor(loss))
        health.saw_denominator(torch.tensor(den))
        skips.append(bool(health.end_step(step, norm, True, identity)))
    assert skips == [False, True, False, True, True]  # step 1 empty; step 3 bad and every step after it
    values = {k: v.item() for k, v in health.device_values().items()}
    assert values["first_bad"] == 3 and values["bad_was_loss"] and values["bad_here"] and values["empty_steps"] == 1
    assert values["bad_loss"] != values["bad_loss"]  # nan


def test_health_checks_the_gradient_only_when_asked():
    health = StepHealth()
    health.saw_loss(torch.tensor(1.0))
    assert not bool(health.end_step(0, torch.tensor(float("inf")), False, identity))  # a GradScaler's business
    assert bool(health.end_step(1, torch.tensor(float("inf")), True, identity))
    assert health.first_bad.item() == 1 and not health.bad_was_loss.item()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_count_up_chats(tmp_path / "train.jsonl", 24)


def _cfg(data: Path, out: Path, *extra: str):
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=[
            f"model.target.path={TINY_TARGET_DIR}", f"data.path={data}", f"paths.output_dir={out}", "data.batch_size=4",
            f"trainer.log_every_n_steps={EVERY}", "checkpoint.every_n_train_steps=100", "logger=none",
            "eval.every_n_steps=0", "trainer.enable_progress_bar=false", *extra])


def _force_gpu_cadence(monkeypatch):
    """The GPU policy on CPU: host reads every EVERY steps (and the last), device-side skips in between, and the
    attention mask a GPU builds (the CPU key groups read the anchors, which costs nothing only on CPU)."""
    monkeypatch.setattr(DraftModule, "host_read_every", lambda self, optimizer: EVERY)
    monkeypatch.setattr("dflashtrain.models.masks.key_groups", lambda *args: None)


def test_steps_between_host_reads_read_nothing(data, tmp_path, monkeypatch):
    _force_gpu_cadence(monkeypatch)
    starts = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            starts.append(len(counter.calls))

    original = L.Trainer.__init__
    monkeypatch.setattr(L.Trainer, "__init__", lambda self, *a, **k: original(
        self, *a, **{**k, "callbacks": [*k.get("callbacks", []), Steps()]}))
    counter = HostReadCounter()
    with counter:
        run(_cfg(data, tmp_path / "out", "trainer.max_steps=7"))
    starts.append(len(counter.calls))
    per_step = [b - a for a, b in zip(starts, starts[1:])]
    assert len(per_step) == 7
    reads = [s for s, n in enumerate(per_step) if n]
    assert reads == [2, 5, 6], per_step  # steps 2 and 5 (every 3rd) and the last; nothing anywhere else


def test_a_bad_step_between_reads_is_skipped_on_the_device_and_reported_at_the_read(data, tmp_path, monkeypatch):
    _force_gpu_cadence(monkeypatch)
    weights, ids = {}, {}
    original = DraftModule.training_step

    def training_step(module, batch, batch_idx):
        step = module.global_step
        weights[step] = {k: v.detach().clone() for k, v in module.drafter.state_dict().items()}
        ids[step] = batch["sample_ids"].tolist()
        loss = original(module, batch, batch_idx)
        return loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(DraftModule, "training_step", training_step)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as info:
        run(_cfg(data, out, "trainer.max_steps=9"))
    message = str(info.value)
    assert "non-finite loss nan at step 3," in message and f"sample ids {ids[3]}" in message
    assert "steps 3..4 were skipped on the device" in message and sorted(weights) == [0, 1, 2, 3, 4, 5]
    saved = torch.load(out / "checkpoints" / "last-good-step0000003.ckpt", map_location="cpu", weights_only=False)
    state = {k.removeprefix("drafter."): v for k, v in saved["state_dict"].items() if k.startswith("drafter.")}
    assert all(torch.equal(state[k], weights[3][k]) for k in weights[3])  # untouched since step 3 started
    assert not all(torch.equal(weights[3][k], weights[2][k]) for k in weights[3])  # step 2 did train


def test_an_empty_step_is_skipped_by_the_fused_optimizer(caplog):
    """A global batch without a supervised slot: zero loss, no optimizer update at all, a counted warning."""
    from factories import make_module, make_objective
    from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
    from dflashtrain.models.target import TargetStates

    g = DrafterGeometry(hidden_size=16, intermediate_size=32, num_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, target_layer_ids=[0],
                        block_size=4, mask_token_id=19)
    embed, head = torch.nn.Embedding(20, 16).requires_grad_(False), torch.nn.Linear(16, 20).requires_grad_(False)

    class Target:
        embed_tokens, lm_head = embed, head

        def states(self, input_ids, attention_mask):
            return TargetStates(tapped=torch.randn(*input_ids.shape, 16), final_hidden=torch.randn(*input_ids.shape, 16))

        def to(self, device):
            return self

    module = make_module(DFlashDrafter(g), Target(), make_objective("decay", gamma=4.0), num_anchors=3, chunk_blocks=2,
                         optimizer=lambda params: adamw(params, lr=0.1, betas=(0.9, 0.95), eps=1e-8,
                                                        weight_decay=0.1, fused=True))
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, max_steps=100)
    module.log = lambda *args, **kwargs: None
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]

    def step(loss_mask):
        batch = {"input_ids": torch.randint(0, 19, (2, 12)), "loss_mask": loss_mask,
                 "attention_mask": torch.ones(2, 12, dtype=torch.long), "row_keys": [0, 1]}
        total, counts, _ = module.forward_loss(batch, module.chunk_blocks)
        loss = module.reduce(total, 2)
        module.accumulate(loss, total, counts)
        module.on_before_backward(loss)
        loss.backward()
        module.configure_gradient_clipping(optimizer, 1.0, "norm")
        optimizer.step()
        optimizer.zero_grad()
        return loss

    step(torch.ones(2, 12, dtype=torch.long))  # a normal step: the weights move
    before = {k: v.clone() for k, v in module.drafter.state_dict().items()}
    state_steps = [s["step"].item() for s in optimizer.state.values()]
    with caplog.at_level(logging.WARNING):
        loss = step(torch.zeros(2, 12, dtype=torch.long))
    assert loss.item() == 0.0
    assert all(torch.equal(before[k], v) for k, v in module.drafter.state_dict().items())  # not even weight decay
    assert [s["step"].item() for s in optimizer.state.values()] == state_steps
    assert module.skipped_empty_steps == 1 and "no supervised slot" in caplog.text


def test_the_run_builds_fused_adamw_except_under_16_mixed(data, tmp_path):
    from dflashtrain.train.recipe import optimizer_factory

    params = [torch.nn.Parameter(torch.randn(3))]
    assert optimizer_factory(_cfg(data, tmp_path))(params).defaults["fused"]
    assert not optimizer_factory(_cfg(data, tmp_path, "trainer.precision=16-mixed"))(params).defaults["fused"]


def test_model_drafter_compile_compiles_every_layer_and_keeps_the_names(data, tmp_path, monkeypatch):
    """The flag reaches the drafter (the compiled run itself is measured in bench/RESULTS.md: it takes minutes)."""
    from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry, compile_layers

    g = DrafterGeometry(hidden_size=16, intermediate_size=32, num_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, target_layer_ids=[0],
                        block_size=4, mask_token_id=19)
    drafter = DFlashDrafter(g)
    names = list(drafter.state_dict())
    compile_layers(drafter)
    assert list(drafter.state_dict()) == names
    assert all(layer._compiled_call_impl is not None for layer in drafter.layers)

    compiled = []
    monkeypatch.setattr("dflashtrain.train.recipe.compile_layers", lambda d: compiled.append(d) or d)
    run(_cfg(data, tmp_path / "a", "trainer.max_steps=1"))
    assert compiled == []
    run(_cfg(data, tmp_path / "b", "trainer.max_steps=1", "model.drafter.compile=true"))
    assert len(compiled) == 1 and isinstance(compiled[0], DFlashDrafter)
