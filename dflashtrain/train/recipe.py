"""The training recipe, top to bottom: check the config, build the parts, fit.

Every check that can fail runs before any weight is loaded or any output is written. ``run`` validates and fits;
the CLI, which has validated already (before importing torch), calls ``fit``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from dflashtrain.config.checks import validate, validate_against_target
from dflashtrain.config.schema import ConfigError, LoggerName
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.families import family_checks, get_family
from dflashtrain.models.dflash import compile_layers
from dflashtrain.models.target import (
    FrozenTarget,
    drafter_geometry,
    load_target_config,
    load_tokenizer,
    resolve_mask_token_id,
)
from dflashtrain.objectives import build_objective
from dflashtrain.train.guards import NonFiniteGuard, check_checkpoint_dir, check_resume_matches
from dflashtrain.train.module import DraftModule, warmup_cosine
from dflashtrain.train.parallelism import build_strategy

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
    if cfg.logger.name == LoggerName.tensorboard:
        return [TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="")]
    if cfg.logger.name == LoggerName.csv:
        return [CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    return []


def build_tau_eval(cfg: DictConfig, tokenizer) -> List[L.Callback]:
    """val/tau by speculative decoding every eval.every_n_steps steps, on data.eval_path prompts (if any)."""
    if cfg.eval.every_n_steps == 0 or cfg.data.eval_path is None:
        return []
    from dflashtrain.data.prompts import read_prompts, stop_token_ids
    from dflashtrain.train.callbacks import TauEvalCallback

    return [TauEvalCallback(
        prompts=read_prompts(cfg.data.eval_path, tokenizer, cfg.eval.num_prompts, cfg.data.on_bad_row),
        stop_token_ids=stop_token_ids(tokenizer, cfg.model.target.path),
        every_n_steps=cfg.eval.every_n_steps,
        max_new_tokens=cfg.eval.max_new_tokens,
    )]


def adamw(params, *, lr: float, betas: tuple, eps: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per step; it can skip a step on the device, train/host.py) where the parameters'
    device supports it, else the default implementation."""
    params = list(params)
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # a device without fused kernels
            pass
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_factory(cfg: DictConfig) -> Callable[..., torch.optim.Optimizer]:
    """The run's optimizer, built once the parameters are on their device (DraftModule.configure_optimizers).

    Not fused under ``16-mixed``: Lightning cannot clip the gradients of an optimizer that unscales them itself.
    """
    optim = cfg.optim
    return functools.partial(adamw, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=cfg.trainer.precision != "16-mixed")


def run(cfg: DictConfig) -> Dict[str, float]:
    """Check the config, then train a drafter as it says; returns the last logged metrics."""
    validate(cfg)
    return fit(cfg)


def fit(cfg: DictConfig) -> Dict[str, float]:
    """Train a drafter from a validated config; returns the last logged metrics."""
    target_config = load_target_config(cfg.model.target.path)
    validate_against_target(cfg, target_config)
    output_dir = check_output_dir(cfg.paths.output_dir)
    checkpoint_dir = check_checkpoint_dir(output_dir / "checkpoints", cfg.resume_from)
    tokenizer = load_tokenizer(cfg.model.target.path)
    mask_token_id = resolve_mask_token_id(cfg.model.drafter.mask_token_id, tokenizer, target_config.vocab_size)
    geometry = drafter_geometry(target_config, cfg.model.drafter, mask_token_id)
    if cfg.resume_from is not None:
        check_resume_matches(cfg.resume_from, asdict(geometry))
    objective = build_objective(OmegaConf.to_object(cfg.loss))
    family = get_family(objective.family)
    head_options = family_checks(family.name).head_options(cfg)
    L.seed_everything(cfg.seed, workers=True)

    data = cfg.data
    datamodule = ChatDataModule(
        tokenizer=tokenizer,
        path=data.path,
        max_length=data.max_length,
        min_supervised_tokens=2 * geometry.block_size,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        shuffle=data.shuffle,
        on_bad_row=data.on_bad_row,
        pad_to_multiple_of=data.pad_to_multiple_of,
        seed=cfg.seed,
    )
    datamodule.setup("fit")  # tokenize now: bad rows fail before the target is loaded

    target = FrozenTarget.load(cfg.model.target.path, cfg.model.target.dtype, geometry.target_layer_ids)
    optim = cfg.optim
    drafter = family.build_drafter(geometry, head_options)
    if cfg.model.drafter.compile:
        compile_layers(drafter)
    module = DraftModule(
        drafter=drafter,
        heads=family.build_heads(target_config.vocab_size, geometry.hidden_size, head_options),
        target=target,
        objective=objective,
        family=family,
        optimizer=optimizer_factory(cfg),
        lr_factor=warmup_cosine(cfg.trainer.max_steps, optim.warmup_ratio, optim.min_lr_ratio),
        num_anchors=data.num_anchors,
        chunk_blocks=cfg.model.drafter.logits_chunk_blocks,
        attention=cfg.model.drafter.attention,
        seed=cfg.seed,
        max_length=data.max_length,
        checkpoint_metadata={
            "geometry": asdict(geometry),
            "family": family.name,
            "head_options": head_options,
            "objective": objective.name,
            "label_offset": objective.label_offset,
            "num_target_layers": target_config.num_hidden_layers,
            "vocab_size": target_config.vocab_size,
            "target_path": os.path.abspath(cfg.model.target.path),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        },
    )
    log.info("drafter: %.2fM trainable parameters, taps %s, mask token %d",
             sum(p.numel() for p in module.trainable_parameters()) / 1e6, geometry.target_layer_ids, mask_token_id)
    loss_settings = OmegaConf.to_container(cfg.loss, resolve=True, enum_to_str=True)
    log.info("objective %s (family %s): %s", objective.name, family.name,  # e.g. D-PACE's reduction, stated once
             ", ".join(f"{key} {value}" for key, value in loss_settings.items()))

    trainer = L.Trainer(
        default_root_dir=str(output_dir),
        max_steps=cfg.trainer.max_steps,
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        strategy=build_strategy(cfg.parallelism),
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
        use_distributed_sampler=False,  # the datamodule shards global batches itself (data/sampling.py)
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume_from)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished at step %d: %s", trainer.global_step,
             ", ".join(f"{k}={metrics[k]:.4f}" for k in ("train/loss", "train/acc", "train/tau_est") if k in metrics))
    return metrics
