"""Step time of ``loss=dpace`` against ``loss=decay`` (SPEC §4 reports ≈ 2.3 % extra training time; goal ≤ 1.03).

    python bench/bench_dpace.py [--target PATH] [--data PATH] [--repeats 40] [hydra overrides ...]

One step = DraftModule.forward_loss (target under no_grad -> blocks -> drafter -> chunked lm_head + objective)
+ the global reduction + backward. Both objectives run in ONE process on the same module (same drafter weights),
the same batch and the same anchors (the RNG is re-seeded before each step); repetitions are interleaved with the
order alternating, so drift in machine load hits both. Prints the median of the per-repetition ratios
dpace/decay. Defaults to the embedded tiny target and data (the default run's config).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import lightning as L
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from dflashtrain.config.checks import validate
from dflashtrain.config.schema import register_configs
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.families import get_family
from dflashtrain.models.dflash import DFlashDrafter
from dflashtrain.models.target import FrozenTarget, drafter_geometry, load_target_config, load_tokenizer, resolve_mask_token_id
from dflashtrain.objectives import build_objective
from dflashtrain.train.module import DraftModule

OBJECTIVES = ("decay", "dpace")


def compose_config(loss: str, overrides: List[str]) -> DictConfig:
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose(config_name="train", overrides=[f"loss={loss}", "paths.output_dir=/tmp/bench_dpace", *overrides])
    validate(cfg)
    return cfg


def build_module(cfg: DictConfig, objective, device: torch.device) -> DraftModule:
    """The training module as `dflashtrain` builds it (the objective is swapped later), with a CPU/GPU trainer."""
    target_config = load_target_config(cfg.model.target.path)
    tokenizer = load_tokenizer(cfg.model.target.path)
    mask_id = resolve_mask_token_id(cfg.model.drafter.mask_token_id, tokenizer, target_config.vocab_size)
    geometry = drafter_geometry(target_config, cfg.model.drafter, mask_id)
    target = FrozenTarget.load(cfg.model.target.path, cfg.model.target.dtype, geometry.target_layer_ids)
    module = DraftModule(drafter=DFlashDrafter(geometry), heads=None, target=target, objective=objective,
                         family=get_family(objective.family), optimizer=None, lr_factor=None,
                         num_anchors=cfg.data.num_anchors, chunk_blocks=cfg.model.drafter.logits_chunk_blocks,
                         attention=cfg.model.drafter.attention, seed=cfg.seed, max_length=cfg.data.max_length,
                         checkpoint_metadata={})
    module.to(device)
    module.target.to(device)
    module.trainer = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    return module, tokenizer


def first_batch(cfg: DictConfig, tokenizer, device: torch.device) -> Dict[str, torch.Tensor]:
    data = ChatDataModule(tokenizer=tokenizer, path=cfg.data.path, max_length=cfg.data.max_length,
                          min_supervised_tokens=2 * cfg.model.drafter.block_size, batch_size=cfg.data.batch_size,
                          num_workers=0, shuffle=False, on_bad_row=cfg.data.on_bad_row,
                          pad_to_multiple_of=cfg.data.pad_to_multiple_of, seed=cfg.seed)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}


def timed_step(module: DraftModule, batch: Dict[str, torch.Tensor], seed: int) -> float:
    module.drafter.zero_grad(set_to_none=True)
    module.seed = seed  # the same anchors for both objectives (they are drawn from the seed and the row)
    sync = torch.cuda.synchronize if module.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    total, _, _ = module.forward_loss(batch, module.chunk_blocks)
    module.reduce(total, batch["input_ids"].shape[0]).backward()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="local HF target directory (default: the embedded tiny target)")
    parser.add_argument("--data", help="chat JSONL (default: the config's data.path)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data.batch_size=8 loss.alpha=0.3")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    overrides = list(args.overrides)
    overrides += [f"model.target.path={args.target}"] if args.target else []
    overrides += [f"data.path={args.data}"] if args.data else []
    configs = {name: compose_config(name, overrides) for name in OBJECTIVES}
    objectives = {name: build_objective(OmegaConf.to_object(cfg.loss)) for name, cfg in configs.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    module, tokenizer = build_module(configs["decay"], objectives["decay"], device)
    batch = first_batch(configs["decay"], tokenizer, device)

    times: Dict[str, List[float]] = {name: [] for name in OBJECTIVES}
    for rep in range(args.warmup + args.repeats):
        order = OBJECTIVES if rep % 2 == 0 else OBJECTIVES[::-1]
        for name in order:
            module.objective = objectives[name]
            elapsed = timed_step(module, batch, args.seed + rep)
            if rep >= args.warmup:
                times[name].append(elapsed)
    ratios = [d / c for d, c in zip(times["dpace"], times["decay"])]
    shape = "x".join(map(str, batch["input_ids"].shape))
    print(f"device {device}, target {configs['decay'].model.target.path}, batch {shape}, "
          f"anchors {module.num_anchors}, block {module.drafter.geometry.block_size}, {args.repeats} repeats")
    for name in OBJECTIVES:
        print(f"{name:6s} median step {1e3 * statistics.median(times[name]):8.2f} ms")
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"median ratio dpace/decay: {statistics.median(ratios):.4f} (goal <= 1.03; "
          f"quartiles {quartiles[0]:.4f}..{quartiles[2]:.4f})")


if __name__ == "__main__":
    main()
