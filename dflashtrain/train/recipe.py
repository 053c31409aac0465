"""The training recipe, top to bottom: check the config, build the parts, fit.

Every check that can fail runs before any weight is loaded; nothing is written before the output directory is
locked and known to hold no other run's outputs. ``run`` validates and fits; the CLI, which has validated already
(before importing torch), calls ``fit``. A stop signal ends the fit with :class:`Preempted` after a checkpoint
(train/preemption.py); a resume is read and checked first (train/resume.py).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError

from dflashtrain.config.checks import (
    check_target_files,
    load_target_config,
    loss_name,
    validate,
    validate_against_target,
)
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import DataKind
from dflashtrain.data.chat import ChatFormat
from dflashtrain.data.datamodule import ChatDataModule
from dflashtrain.data.features import CachedTarget, check_manifest, expected_entries, read_manifest
from dflashtrain.families import family_checks, get_family
from dflashtrain.models.dflash import compile_layers
from dflashtrain.models.target import FrozenTarget, drafter_geometry, load_tokenizer, resolve_mask_token_id
from dflashtrain.objectives import build_objective
from dflashtrain.report.jobs import recorded_run
from dflashtrain.train.checkpoint_io import SafeCheckpointIO
from dflashtrain.train.console import quiet_console, step_progress_bar
from dflashtrain.train.guards import GEOMETRY_SOURCES, NonFiniteGuard
from dflashtrain.train.loggers import build_loggers
from dflashtrain.train.module import DraftModule, warmup_cosine
from dflashtrain.train.outputs import claimed_output_dir
from dflashtrain.train.parallelism import build_strategy, model_sharding
from dflashtrain.train.preemption import Preempted, SaveOnStop, requeue_slurm_job
from dflashtrain.train.resume import (
    ResumePoint,
    ResumeState,
    check_no_rewind,
    check_resume_config,
    check_resume_data,
    check_resume_geometry,
    load_resume_point,
)
from dflashtrain.train.summary import final_metrics, log_summary

log = logging.getLogger(__name__)


def build_tau_eval(cfg: DictConfig, tokenizer) -> List[L.Callback]:
    """val/tau by speculative decoding every eval.every_n_steps steps, on data.eval_path prompts (if any)."""
    if cfg.eval.every_n_steps == 0 or cfg.data.eval_path is None:
        return []
    if cfg.data.kind == DataKind.features:
        log.warning("val/tau is off: it decodes with the whole target, which training from a feature cache does not "
                    "load; measure checkpoints with dflashtrain-eval")
        return []
    from dflashtrain.data.prompts import read_prompts, stop_token_ids
    from dflashtrain.train.callbacks import TauEvalCallback

    return [TauEvalCallback(
        prompts=read_prompts(cfg.data.eval_path, tokenizer, cfg.eval.num_prompts, cfg.data.on_bad_row,
                             ChatFormat.from_config(cfg.data)),
        stop_token_ids=stop_token_ids(tokenizer, cfg.model.target.path),
        every_n_steps=cfg.eval.every_n_steps,
        max_new_tokens=cfg.eval.max_new_tokens,
    )]


def adamw(params, *, lr: float, betas: tuple, eps: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where the parameters'
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
    with recorded_run(cfg.paths.output_dir):  # <output_dir>/status.json: how the run ended, for the report
        validate(cfg)
        return fit(cfg)


def fit(cfg: DictConfig) -> Dict[str, float]:
    """Train a drafter from a validated config; returns the last logged metrics.

    Order: the resume checkpoint (read safely, before anything else), the target's config and files, the resume
    comparison, the output directory (locked), the tokenizer and data, the Trainer; only then the target's weights.
    """
    quiet_console()
    resume = load_resume_point(cfg)
    target_config = load_target_config(cfg.model.target.path)
    validate_against_target(cfg, target_config)
    check_target_files(cfg.model.target.path)
    objective = build_objective(OmegaConf.to_object(cfg.loss))
    family = get_family(objective.family)
    if resume is not None:
        check_resume_config(cfg, resume, loss_name(cfg), family.name)
    with claimed_output_dir(cfg.paths.output_dir, resume.path if resume else None) as output_dir:
        return train(cfg, output_dir, resume, target_config, objective, family)


def train(cfg: DictConfig, output_dir: Path, resume: Optional[ResumePoint], target_config: Any, objective: Any,
          family: Any) -> Dict[str, float]:
    checkpoint_dir = output_dir / "checkpoints"
    if resume is not None:
        check_no_rewind(resume, checkpoint_dir)
    tokenizer = checked("tokenizer", load_tokenizer, cfg.model.target.path)
    mask_token_id = resolve_mask_token_id(cfg.model.drafter.mask_token_id, tokenizer, target_config.vocab_size)
    geometry = drafter_geometry(target_config, cfg.model.drafter, mask_token_id)
    if resume is not None:
        check_resume_geometry(resume, asdict(geometry), GEOMETRY_SOURCES)
    head_options = family_checks(family.name).head_options(cfg)
    L.seed_everything(cfg.seed, workers=True)

    data = cfg.data
    features = None
    if data.kind == DataKind.features:  # a feature cache: checked against this config before any weight loads
        features = read_manifest(data.path)
        check_manifest(features, expected_entries(cfg, geometry.target_layer_ids, objective.needs_teacher))
    datamodule = ChatDataModule.from_config(data, tokenizer, 2 * geometry.block_size, cfg.seed, features)
    datamodule.setup("fit")  # tokenize now: bad rows fail before the target is loaded
    if resume is not None:
        check_resume_data(resume, len(datamodule.train_set))

    optim = cfg.optim
    lr_factor = warmup_cosine(cfg.trainer.max_steps, optim.warmup_ratio, optim.min_lr_ratio)
    drafter = family.build_drafter(geometry, head_options)
    if cfg.model.drafter.compile:
        compile_layers(drafter)
    checkpoint_cfg = cfg.checkpoint
    stop = SaveOnStop(checkpoint_dir, checkpoint_cfg.every_n_train_steps, checkpoint_cfg.save_last,
                      checkpoint_cfg.save_top_k)
    callbacks = [
        NonFiniteGuard(checkpoint_dir),  # stops on a NaN/inf loss or gradient before it reaches the weights
        ResumeState(optim, lr_factor, reschedule=resume is not None and resume.reschedule),
        stop,  # a resumable checkpoint at the final step and on SIGTERM / SIGUSR1 / SIGINT
        *build_tau_eval(cfg, tokenizer),
        *step_progress_bar(cfg.trainer.enable_progress_bar),  # k/max_steps (train/console.py)
    ]
    trainer = build_trainer(cfg, output_dir, resume, callbacks, {type(layer) for layer in drafter.layers})

    load_target = CachedTarget.load if features is not None else FrozenTarget.load  # the cache: embedding + head
    target = checked("weights", load_target, cfg.model.target.path, cfg.model.target.dtype,
                     geometry.target_layer_ids)
    module = DraftModule(
        drafter=drafter,
        heads=family.build_heads(target_config.vocab_size, geometry.hidden_size, head_options),
        target=target,
        objective=objective,
        family=family,
        optimizer=optimizer_factory(cfg),
        lr_factor=lr_factor,
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
        shard=model_sharding(cfg.parallelism),
    )
    log.info("drafter: %.2fM trainable parameters, taps %s, mask token %d",
             sum(p.numel() for p in module.trainable_parameters()) / 1e6, geometry.target_layer_ids, mask_token_id)
    loss_settings = OmegaConf.to_container(cfg.loss, resolve=True, enum_to_str=True)
    log.info("objective %s (family %s): %s", objective.name, family.name,  # e.g. D-PACE's reduction, stated once
             ", ".join(f"{key} {value}" for key, value in loss_settings.items()))

    fit_until_stopped(trainer, module, datamodule, resume, stop)
    metrics = final_metrics(trainer)
    log_summary(output_dir, trainer.global_step, stop.saved, metrics, cfg.logger.name, trainer.is_global_zero)
    return metrics


def build_trainer(cfg: DictConfig, output_dir: Path, resume: Optional[ResumePoint], callbacks: List[Any],
                  layer_classes: set) -> L.Trainer:
    """The Lightning Trainer: atomic, weights-only checkpoint I/O; periodic checkpoints; the loggers. Sharded
    strategies wrap each of ``layer_classes`` (the drafter's decoder layers)."""
    checkpoint_cfg = cfg.checkpoint
    periodic = ModelCheckpoint(
        dirpath=str(output_dir / "checkpoints"),
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=checkpoint_cfg.every_n_train_steps,
        save_last=checkpoint_cfg.save_last,
        save_top_k=checkpoint_cfg.save_top_k,
        monitor="step",
        mode="max",
    )
    return L.Trainer(
        default_root_dir=str(output_dir),
        max_steps=cfg.trainer.max_steps,
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        strategy=build_strategy(cfg.parallelism, cfg.trainer.precision, layer_classes),
        devices=cfg.parallelism.devices,
        num_nodes=cfg.parallelism.num_nodes,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        deterministic=cfg.trainer.deterministic,
        logger=build_loggers(cfg, output_dir, resume.step if resume else None),
        plugins=[SafeCheckpointIO()],
        callbacks=[periodic, *callbacks],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the datamodule shards global batches itself (data/sampling.py)
        enable_model_summary=False,
    )


def fit_until_stopped(trainer: L.Trainer, module: DraftModule, datamodule: ChatDataModule,
                      resume: Optional[ResumePoint], stop: SaveOnStop) -> None:
    """trainer.fit; a stop signal ends it with Preempted once its checkpoint is saved (requeued under SLURM)."""
    # Lightning looks for a resumable *dataloader*; the DataModule restores the data position (data/sampling.py).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    stop.install()  # from here on a signal saves a checkpoint instead of killing the run mid-step
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None, weights_only=True)
    except SIGTERMException:  # Lightning's own SIGTERM stop (a signal that came before training started)
        stop.stopped_by = stop.stopped_by or signal.SIGTERM
    finally:
        stop.restore()
    if stop.stopped_by is not None:
        requeue = requeue_slurm_job() if stop.stopped_by == signal.SIGUSR1 and trainer.is_global_zero else ""
        raise Preempted(stop.stopped_by, trainer.global_step, stop.saved, requeue)


def checked(what: str, load: Callable[..., Any], path: str, *args: Any) -> Any:
    """Load the target's tokenizer or weights; a directory they cannot be read from is one line naming it."""
    try:
        return load(path, *args)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError("model.target.path", f"cannot load the target's {what} from {path}: {reason}") from None
