"""Optimizer steps of the real DraftModule under a Lightning strategy, for the equality tests (not a test file).

:func:`train_steps` builds the embedded tiny target, a 2-layer drafter (the same initial weights on every rank) and
the chat datamodule, trains ``steps`` optimizer steps and returns what the tests compare: the gradients of the last
step (full tensors; gathered from the shards under fsdp2) and the logged ``train/*`` values. It runs in the test
process for one process, and as a script under ``torch.distributed.run`` for several:

    python -m torch.distributed.run --nproc-per-node 2 tests/steps.py OUT.pt DATA.jsonl BATCH LAYOUT...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # factories, when run as a script

LOGGED_PER_PROCESS = ("train/step_time", "train/tokens_per_s")  # timing of the local batch, not a global value


def train_steps(data: str, strategy: str, batch_size: int, accumulate: int, steps: int = 1, loss: str = "decay",
                sharding: str = "FULL_SHARD", devices: int = 1) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    import lightning as L
    from omegaconf import OmegaConf

    from dflashtrain.assets import TINY_TARGET_DIR
    from dflashtrain.config.schema import DrafterConfig
    from dflashtrain.data.datamodule import ChatDataModule
    from dflashtrain.models.dflash import DFlashDecoderLayer, DFlashDrafter
    from dflashtrain.models.target import FrozenTarget, drafter_geometry, load_target_config, load_tokenizer
    from dflashtrain.train.parallelism import build_strategy, model_sharding
    from factories import make_module, make_objective

    path = str(TINY_TARGET_DIR)
    tokenizer = load_tokenizer(path)
    drafter_cfg = OmegaConf.structured(DrafterConfig(num_layers=2, block_size=8, target_layer_ids=[1, 3, 5], num_taps=3))
    geometry = drafter_geometry(load_target_config(path), drafter_cfg, tokenizer.mask_token_id)
    torch.manual_seed(0)  # the same drafter on every rank and in every run
    drafter = DFlashDrafter(geometry)
    target = FrozenTarget.load(path, "float32", geometry.target_layer_ids)
    parallelism = OmegaConf.create({"strategy": strategy, "sharding_strategy": sharding})
    objective = make_objective(loss, gamma=4.0) if loss != "dpace" else make_objective(loss)
    module = make_module(drafter, target, objective, num_anchors=8, chunk_blocks=2, shard=model_sharding(parallelism))
    datamodule = ChatDataModule(tokenizer, data, 128, 2 * geometry.block_size, batch_size, num_workers=0, shuffle=True,
                                on_bad_row="error", pad_to_multiple_of=16, seed=0)
    strategy = build_strategy(parallelism, "32-true", {DFlashDecoderLayer})
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                        accumulate_grad_batches=accumulate, gradient_clip_val=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=datamodule)
    grads = {}
    for name, parameter in module.named_parameters():  # every rank: gathering a shard is collective
        grad = parameter.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.detach().clone()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("train/") and k not in LOGGED_PER_PROCESS}
    return grads, metrics


def main(out: str, data: str, batch_size: str, *strategies: str) -> None:
    """Each strategy in turn (in the same processes); rank 0 saves {name: {"grads", "metrics"}} to ``out``."""
    import os

    import torch.distributed as dist

    results = {}
    for name in strategies:  # STRATEGY[:SHARDING][/K]: K accumulated micro-batches of BATCH / K rows
        layout, _, accumulate = name.partition("/")
        strategy, _, sharding = layout.partition(":")
        k = int(accumulate or 1)
        grads, metrics = train_steps(data, strategy, int(batch_size) // k, k, sharding=sharding or "FULL_SHARD",
                                     devices=int(os.environ["WORLD_SIZE"]))
        results[name] = {"grads": grads, "metrics": metrics}
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
