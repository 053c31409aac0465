"""The training recipe, top to bottom: check the config, build the parts, fit.

Every check that can fail runs before any weight is loaded or any output is written.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from dflashtrain.config import ConfigError
from dflashtrain.checks import validate, validate_against_target
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.guards import NonFiniteGuard, check_checkpoint_dir, check_resume_matches
from dflashtrain.models.dflash import DFlashDrafter
from dflashtrain.models.heads import DSparkHeads
from dflashtrain.module import DraftModule, warmup_cosine
from dflashtrain.parallelism import build_strategy
from dflashtrain.target import (
    FrozenTarget,
    drafter_geometry,
    load_target_config,
    load_tokenizer,
    resolve_mask_token_id,
)

log = logging.getLogger(__name__)


def check_output_dir(output_dir: str) -> Path:
    """Fail at start, not at the first save, if outputs cannot be written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError("paths.output_dir", f"cannot write to {output_dir}: {error.strerror or error}") from None
    return path


def build_loggers(cfg: DictConfig, output_dir: Path) -> List[Any]:
    if cfg.logger.name == "tensorboard":
        return [TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="")]
    if cfg.logger.name == "csv":
        return [CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    return []


def build_tau_eval(cfg: DictConfig, tokenizer) -> List[L.Callback]:
    """val/tau by speculative decoding every eval.every_n_steps steps, on data.eval_path prompts (if any)."""
    if cfg.eval.every_n_steps == 0 or cfg.data.eval_path is None:
        return []
    from dflashtrain.callbacks import TauEvalCallback
    from dflashtrain.evaluate import read_prompts, stop_token_ids

    return [TauEvalCallback(
        prompts=read_prompts(cfg.data.eval_path, tokenizer, cfg.eval.num_prompts, cfg.data.on_bad_row),
        stop_token_ids=stop_token_ids(tokenizer, cfg.model.target.path),
        every_n_steps=cfg.eval.every_n_steps,
        max_new_tokens=cfg.eval.max_new_tokens,
    )]


def run(cfg: DictConfig) -> Dict[str, float]:
    """Train a drafter as the config says; returns the last logged metrics."""
    validate(cfg)
    target_config = load_target_config(cfg.model.target.path)
    validate_against_target(cfg, target_config)
    output_dir = check_output_dir(cfg.paths.output_dir)
    checkpoint_dir = check_checkpoint_dir(output_dir / "checkpoints", cfg.resume_from)
    tokenizer = load_tokenizer(cfg.model.target.path)
    mask_token_id = resolve_mask_token_id(cfg.model.drafter.mask_token_id, tokenizer, target_config.vocab_size)
    geometry = drafter_geometry(target_config, cfg.model.drafter, mask_token_id)
    if cfg.resume_from is not None:
        check_resume_matches(cfg.resume_from, asdict(geometry))
    objective = instantiate(cfg.loss, _convert_="object")
    L.seed_everything(cfg.seed, workers=True)

    block_size = cfg.model.drafter.block_size
    datamodule = ChatDataModule(
        tokenizer=tokenizer,
        path=cfg.data.path,
        max_length=cfg.data.max_length,
        min_supervised_tokens=2 * block_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        shuffle=cfg.data.shuffle,
        on_bad_row=cfg.data.on_bad_row,
        pad_to_multiple_of=cfg.data.pad_to_multiple_of,
    )
    datamodule.setup("fit")  # tokenize now: bad rows fail before the target is loaded

    target = FrozenTarget.load(cfg.model.target.path, cfg.model.target.dtype, geometry.target_layer_ids)
    drafter = DFlashDrafter(geometry)
    markov_rank = cfg.model.drafter.markov_rank
    uses_confidence = bool(getattr(objective, "uses_confidence", False))
    heads = None  # DSpark's Markov (and confidence) heads, beside the drafter
    if markov_rank > 0:
        heads = DSparkHeads(target_config.vocab_size, geometry.hidden_size, markov_rank, uses_confidence)
    optim = cfg.optim
    module = DraftModule(
        drafter=drafter,
        target=target,
        objective=objective,
        optimizer=functools.partial(
            torch.optim.AdamW, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
        ),
        lr_factor=warmup_cosine(cfg.trainer.max_steps, optim.warmup_ratio, optim.min_lr_ratio),
        num_anchors=cfg.data.num_anchors,
        chunk_blocks=cfg.model.drafter.logits_chunk_blocks,
        attention=cfg.model.drafter.attention,
        heads=heads,
        checkpoint_metadata={
            "geometry": asdict(geometry),
            "num_target_layers": target_config.num_hidden_layers,
            "target_path": os.path.abspath(cfg.model.target.path),
            "label_offset": objective.label_offset,  # 0 DFlash convention, 1 next-token (DSpark)
            "heads": {"markov_rank": markov_rank, "confidence_head": heads is not None and uses_confidence},
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        },
    )
    log.info("drafter: %.2fM trainable parameters, taps %s, mask token %d",
             sum(p.numel() for p in module.trainable_parameters()) / 1e6, geometry.target_layer_ids, mask_token_id)

    trainer = L.Trainer(
        default_root_dir=str(output_dir),
        max_steps=cfg.trainer.max_steps,
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        strategy=build_strategy(cfg),
        devices=cfg.parallelism.devices,
        num_nodes=cfg.parallelism.num_nodes,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        deterministic=cfg.trainer.deterministic,
        logger=build_loggers(cfg, output_dir),
        callbacks=[
            ModelCheckpoint(
                dirpath=str(checkpoint_dir),
                filename="step{step:07d}",
                auto_insert_metric_name=False,
                every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                save_last=cfg.checkpoint.save_last,
                save_top_k=cfg.checkpoint.save_top_k,
                monitor="step",
                mode="max",
            ),
            NonFiniteGuard(checkpoint_dir),  # stops on a NaN/inf loss or gradient before it reaches the weights
            *build_tau_eval(cfg, tokenizer),
        ],
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume_from)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished at step %d: %s", trainer.global_step,
             ", ".join(f"{k}={metrics[k]:.4f}" for k in ("train/loss", "train/acc", "train/tau_est") if k in metrics))
    return metrics
