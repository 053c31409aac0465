"""dflashtrain's training step at a bench geometry, run through the module's own methods (the code `dflashtrain`
runs), with the target's states precomputed (the target is outside the measured step, as for the peer)."""

from __future__ import annotations

import contextlib
from dataclasses import MISSING, fields
from typing import Dict, Optional

import lightning as L
import torch

from geometry import Geometry, Inputs
from dflashtrain.config.losses import LOSS_SCHEMAS, default_gamma
from dflashtrain.families import get_family
from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
from dflashtrain.models.target import TargetStates
from dflashtrain.objectives import build_objective
from dflashtrain.train.reduction import AccumulationWindow
from dflashtrain.train.module import DraftModule, warmup_cosine
from dflashtrain.train.recipe import adamw

OBJECTIVES = ("decay", "dpace", "vp_drafter", "dspark")


class PrecomputedTarget:
    """The part of FrozenTarget the module uses, serving fixed states: the target forward is not measured."""

    def __init__(self, inputs: Inputs):
        self.inputs = inputs

    embed_tokens = property(lambda self: self.inputs.embed)
    lm_head = property(lambda self: self.inputs.lm_head)

    def states(self, input_ids, attention_mask) -> TargetStates:
        return TargetStates(tapped=self.inputs.tapped, final_hidden=self.inputs.final_hidden)

    def batch_states(self, batch) -> TargetStates:
        return self.states(batch["input_ids"], batch["attention_mask"])

    def to(self, device) -> "PrecomputedTarget":
        return self


def drafter_geometry(g: Geometry, inputs: Inputs) -> DrafterGeometry:
    return DrafterGeometry(hidden_size=g.hidden, intermediate_size=g.intermediate, num_layers=g.layers,
                           num_attention_heads=g.heads, num_key_value_heads=g.kv_heads, head_dim=g.head_dim,
                           rms_norm_eps=1e-6, rope_theta=g.rope_theta, target_layer_ids=inputs.target_layer_ids,
                           block_size=g.block, mask_token_id=inputs.mask_token_id)


def objective_for(name: str, g: Geometry):
    """The objective as a run builds it from its schema defaults (γ from the block size where it follows it)."""
    schema = LOSS_SCHEMAS[name]
    values = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(schema)}
    if isinstance(values.get("gamma"), str):  # the ${default_gamma:...} interpolation
        values["gamma"] = default_gamma(g.block)
    return build_objective(schema(**values))


class OurStep:
    """One optimizer step of dflashtrain: forward_loss -> reduce -> backward -> grad norm once, clip, device-side
    skip -> fused AdamW, as DraftModule's Lightning hooks run it (without the Lightning loop around it)."""

    def __init__(self, g: Geometry, inputs: Inputs, objective: str = "decay", drafter_state: Optional[Dict] = None,
                 chunk: Optional[int] = None, compile_layers: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        self.g, self.inputs, self.device = g, inputs, inputs.input_ids.device
        geometry = drafter_geometry(g, inputs)
        objective_obj = objective_for(objective, g)
        family = get_family(objective_obj.family)
        options = {"markov_rank": g.markov_rank, "confidence_head": True} if family.name == "dspark" else {}
        drafter = DFlashDrafter(geometry)
        if drafter_state is not None:
            drafter.load_state_dict(drafter_state)
        if compile_layers:
            from dflashtrain.models.dflash import compile_layers as compile_drafter

            compile_drafter(drafter)
        heads = family.build_heads(g.vocab, g.hidden, options)
        self.module = DraftModule(
            drafter=drafter, heads=heads, target=PrecomputedTarget(inputs), objective=objective_obj, family=family,
            optimizer=lambda params: adamw(params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                           fused=True),
            lr_factor=warmup_cosine(1000, 0.04, 0.0), num_anchors=g.anchors, chunk_blocks=chunk or g.chunk,
            attention=g.attention, seed=seed, max_length=g.seq_len, checkpoint_metadata={}, shard=None)
        self.module.to(self.device)
        self.module.trainer = L.Trainer(accelerator=self.device.type, devices=1, logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False,
                                        enable_model_summary=False, max_steps=10 ** 9)
        self.module.log = lambda *args, **kwargs: None  # no Lightning loop here: the metrics are made, not logged
        optim = self.module.configure_optimizers()
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.module.trainer.strategy.optimizers = [self.optimizer]  # what the step's logging reads (the lr)
        self.batch = inputs.batch()

    def autocast(self):
        if not self.g.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def __call__(self) -> torch.Tensor:
        module = self.module
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            total, counts, _ = module.forward_loss(self.batch, module.chunk_blocks)
            module.add_to_step(tokens=self.batch["attention_mask"].sum())
            loss = module.reduce(total, self.g.batch, counts)
        module.on_before_backward(loss)
        loss.backward()
        module.finish_step()  # the step's one host read, the gradient factor, the (discarded) logs
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)  # Lightning's clipping, as in a run
        self.optimizer.step()
        self.scheduler.step()
        module.report = None
        return loss.detach()

    def loss_only(self, anchors=None) -> torch.Tensor:
        """The loss of the current weights (no step), for the agreement check against the peer."""
        with torch.no_grad(), self.autocast():
            total, _, _ = self.module.forward_loss(self.batch, self.module.chunk_blocks)
            loss = self.module.reduce(total, self.g.batch)
        self.module.window = AccumulationWindow()  # a measurement, not a micro-batch of a step
        return loss
