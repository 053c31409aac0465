"""Lightning strategies for the `parallelism` group, shaped by the measured facts in docs/fsdp.md.

The frozen target is never registered in the LightningModule, so it is outside every FSDP unit, every state dict
and every checkpoint; each rank holds its own replicated copy (the module places it on its device). Every strategy
writes the same checkpoint: one drafter-only Lightning ``.ckpt`` file with full (unsharded) weights and optimizer
state, which any strategy and any world size can resume (docs/fsdp.md, checkpoints).

* ``ddp``: a full drafter replica per rank (``DDPStrategy``).
* ``fsdp`` (GPU only): ``FSDPStrategy`` wrapping each drafter layer (a class of its own, so a class-based policy
  never catches target layers), ``use_orig_params`` and full state dicts.
* ``fsdp2``: ``ModelParallelStrategy``; :func:`shard_trainable` applies ``fully_shard`` to each drafter layer,
  then to the drafter and to the family's heads, over a 1-D mesh of all ranks.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Set, Type

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig
from torch import nn

from dflashtrain.config.schema import Strategy

# parallelism.sharding_strategy -> fully_shard's reshard_after_forward (fsdp2). FULL_SHARD frees each layer's
# gathered parameters after its forward (and gathers again for the backward); SHARD_GRAD_OP keeps them.
FSDP2_RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


# trainer.precision -> the dtype FSDP1 gathers parameters in. Gradients are reduced and buffers (RoPE's inv_freq)
# kept in fp32 (Lightning's own FSDP precision would reduce in bf16 and cast the buffers: docs/fsdp.md, fact 7).
FSDP_PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def fsdp_mixed_precision(precision: str):
    from torch.distributed.fsdp import MixedPrecision

    param_dtype = FSDP_PARAM_DTYPES.get(precision)
    if param_dtype is None:
        return None  # Lightning's default for the precision
    return MixedPrecision(param_dtype=param_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def build_strategy(parallelism: DictConfig, precision: str, layer_classes: Set[Type[nn.Module]]):
    """``layer_classes``: the drafter's decoder-layer classes (the family's), each one an FSDP unit."""
    strategy = Strategy(parallelism.strategy)
    if strategy == Strategy.fsdp:
        return FSDPStrategy(
            auto_wrap_policy=set(layer_classes),
            sharding_strategy=parallelism.sharding_strategy,
            state_dict_type="full",
            use_orig_params=True,
            mixed_precision=fsdp_mixed_precision(precision),
        )
    if strategy == Strategy.fsdp2:
        # Lightning's own mesh is (nodes, devices per node) for 2-D parallelism; shard_trainable builds a 1-D one.
        return ModelParallelStrategy(save_distributed_checkpoint=False)
    if strategy == Strategy.ddp:
        # The target is not a registered parameter, so no parameter goes unused; skip the costly search. Gradients
        # live in DDP's all-reduce buckets instead of a second copy (one fp32 copy of the drafter saved per rank).
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    return "auto"


def model_sharding(parallelism: DictConfig) -> Optional[Callable[..., None]]:
    """What ``DraftModule.configure_model`` applies: :func:`shard_trainable` under fsdp2, else nothing."""
    if Strategy(parallelism.strategy) != Strategy.fsdp2:
        return None
    return functools.partial(shard_trainable, sharding_strategy=parallelism.sharding_strategy)


def is_sharded(module: nn.Module) -> bool:
    """Whether fully_shard has been applied to ``module`` (its class is then FSDP2's wrapper of the original)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_trainable(drafter: nn.Module, heads: Optional[nn.Module], world_size: int, device: torch.device,
                    sharding_strategy: str) -> None:
    """fsdp2: ``fully_shard`` each drafter layer, then the drafter (fc, norms) and the heads, each a root of its own.

    The module calls the drafter and the heads directly, never their submodules, which a group may not be
    (docs/fsdp.md). Parameters stay fp32 (Lightning's autocast does mixed precision, as under ddp); gradients are
    reduce-scattered as the mean over ranks. Idempotent: Lightning may call ``configure_model`` more than once.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(drafter):
        return
    reshard = FSDP2_RESHARD_AFTER_FORWARD[sharding_strategy]
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("data_parallel",))
    for layer in drafter.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(drafter, mesh=mesh, reshard_after_forward=reshard)
    if heads is not None:
        fully_shard(heads, mesh=mesh, reshard_after_forward=reshard)
