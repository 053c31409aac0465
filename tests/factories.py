"""Objectives built the way a run builds them: from their schema, with every field explicit or the schema's default.

A schema default that depends on the rest of the config (the decay γ follows the block size) must be given.
"""

from __future__ import annotations

import dataclasses

from dflashtrain.config.losses import LOSS_SCHEMAS
from dflashtrain.objectives import build_objective


def make_objective(name: str, **fields):
    schema = LOSS_SCHEMAS[name]
    values = {}
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        values[f.name] = fields.pop(f.name, default)
        if isinstance(values[f.name], str) and values[f.name].startswith("${"):
            raise TypeError(f"{name}: give {f.name} (its schema default {default} needs the whole config)")
    if fields:
        raise TypeError(f"{name} has no fields {sorted(fields)}")
    return build_objective(schema(**values))


def make_module(drafter, target, objective, heads=None, num_anchors=3, chunk_blocks=2, optimizer=None,
                lr_factor=None, attention="auto", seed=0, max_length=128, shard=None):
    """A DraftModule wired as the training recipe wires it (the objective's family, explicit arguments)."""
    import torch

    from dflashtrain.families import get_family
    from dflashtrain.train.module import DraftModule

    return DraftModule(drafter=drafter, heads=heads, target=target, objective=objective,
                       family=get_family(objective.family), optimizer=optimizer or torch.optim.AdamW,
                       lr_factor=lr_factor or (lambda step: 1.0), num_anchors=num_anchors, chunk_blocks=chunk_blocks,
                       attention=attention, seed=seed, max_length=max_length, checkpoint_metadata={},
                       shard=shard)
