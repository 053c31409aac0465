"""Lightning strategies for the `parallelism` group, shaped by the measured facts in docs/fsdp.md.

The frozen target is never registered in the LightningModule, so it is outside every FSDP unit, every
state dict and every checkpoint; each rank holds its own replicated copy. FSDP wraps each drafter layer (a
class of its own, so a class-based policy never catches target layers) and saves full state dicts, which a
drafter-only checkpoint can resume from.
"""

from __future__ import annotations

from typing import Set, Type

from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import DictConfig
from torch import nn

from dflashtrain.config.schema import Strategy


def build_strategy(parallelism: DictConfig, layer_classes: Set[Type[nn.Module]]):
    """``layer_classes``: the drafter's decoder-layer classes (the family's), each one an FSDP unit."""
    strategy = Strategy(parallelism.strategy)
    if strategy == Strategy.fsdp:
        return FSDPStrategy(
            auto_wrap_policy=set(layer_classes),
            sharding_strategy=parallelism.sharding_strategy,
            state_dict_type="full",
            use_orig_params=True,
        )
    if strategy == Strategy.ddp:
        # The target is not a registered parameter, so no parameter goes unused; skip the costly search.
        return DDPStrategy(find_unused_parameters=False)
    return "auto"
