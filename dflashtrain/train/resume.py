"""Resuming a run: exactly, or not at all.

A resumed run repeats the uninterrupted run's steps bit for bit (on CPU): the checkpoint holds the weights, the
optimizer and scheduler, Lightning's loop counters (step, logging step), the data position (the DataModule's
epoch and global batches done, docs/architecture.md), the python / numpy / torch / CUDA random states
(:class:`ResumeState`) and the val/tau history; anchors and prefixes need no state, each row's draws come from its
own generator seeded by (seed, epoch, row).

Before anything else happens the checkpoint is read with ``weights_only=True`` (memory-mapped) and refused unless it
is a dflashtrain training checkpoint (:func:`load_resume_point`). Its recorded config is then compared with this
one (:func:`check_resume_config`): a change that makes it another run (objective, drafter shape, data order or
position) is refused naming the key; one that can take effect from the resumed step (lr and the other optimizer
settings, the schedule length, clipping, precision, paths) is applied and logged. Nothing is silently ignored.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dflashtrain.config.errors import ConfigError
from dflashtrain.export.checkpoint import METADATA_KEY, read_checkpoint

log = logging.getLogger(__name__)

TRAINING_STATE = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step")
DATA_STATE = "ChatDataModule"  # Lightning stores a DataModule's state under its class name

SHAPE = "the drafter's shape is fixed by its weights"
OBJECTIVE = "another objective (or objective setting) would continue weights and optimizer state made for this one"
DATA = "the order, position and anchors of the remaining batches depend on it"
# First matching rule wins: (key or "group." prefix, "refuse" | "apply"). Keys matching none (logging, checkpoint
# cadence, evaluation, output paths) may change freely.
RESUME_RULES: List[Tuple[str, str, str]] = [
    ("model.drafter.attention", "apply", ""),
    ("model.drafter.logits_chunk_blocks", "apply", ""),
    ("model.drafter.", "refuse", SHAPE),
    ("loss.", "refuse", OBJECTIVE),
    ("seed", "refuse", DATA),
    ("data.batch_size", "apply", ""),  # another global batch continues at its first untrained row (datamodule)
    ("data.max_length", "refuse", DATA),
    ("data.num_anchors", "refuse", DATA),
    ("data.shuffle", "refuse", DATA),
    ("data.on_bad_row", "refuse", DATA),
    ("trainer.accumulate_grad_batches", "refuse", DATA),
    ("optim.", "apply", ""),
    ("trainer.max_steps", "apply", ""),
    ("trainer.max_epochs", "apply", ""),
    ("trainer.gradient_clip_val", "apply", ""),
    ("trainer.precision", "apply", ""),
    ("trainer.deterministic", "apply", ""),
    ("model.target.", "apply", ""),
    ("data.path", "apply", ""),
    ("data.pad_to_multiple_of", "apply", ""),
    ("data.eval_path", "apply", ""),
    ("data.num_workers", "apply", ""),
    ("data.num_proc", "apply", ""),
    ("data.cache_dir", "apply", ""),
    ("data.", "refuse", DATA),  # the format, chat template, system prompt: they change the tokens
    ("parallelism.strategy", "apply", ""),
    ("parallelism.sharding_strategy", "apply", ""),
]
RESCHEDULES = ("optim.", "trainer.max_steps")  # changes that ResumeState applies to the restored optimizer


@dataclass
class ResumePoint:
    path: Path  # absolute
    checkpoint: Dict[str, Any]  # memory-mapped
    applied: List[str] = field(default_factory=list)  # the changed keys that take effect, "key: old -> new"

    @property
    def meta(self) -> Dict[str, Any]:
        return self.checkpoint[METADATA_KEY]

    @property
    def step(self) -> int:
        return int(self.checkpoint["global_step"])

    @property
    def reschedule(self) -> bool:
        return any(change.startswith(RESCHEDULES) for change in self.applied)


def newest_checkpoint(directory: Path) -> Optional[Path]:
    """The latest step among ``last.ckpt`` and ``stepNNNNNNN.ckpt`` in ``directory`` (a kill between the two
    writes of a periodic save leaves the step file newer); last-good checkpoints are never picked by themselves."""
    steps = {p: int(p.stem[4:]) for p in directory.glob("step*.ckpt") if p.stem[4:].isdigit()}
    last = directory / "last.ckpt"
    if last.is_file():
        steps[last] = int(read_checkpoint(last, "resume_from").get("global_step", -1))
    return max(steps, key=lambda p: (steps[p], p == last)) if steps else None


def resume_path(cfg: DictConfig) -> Optional[Path]:
    """The checkpoint to resume from: resume_from, or for ``auto`` the newest in <paths.output_dir>/checkpoints."""
    if cfg.resume_from is None:
        return None
    if cfg.resume_from == "auto":
        newest = newest_checkpoint(Path(cfg.paths.output_dir, "checkpoints"))
        return newest.resolve() if newest is not None else None
    return Path(cfg.resume_from).resolve()


def load_resume_point(cfg: DictConfig) -> Optional[ResumePoint]:
    """Read the resume checkpoint safely and refuse anything but a whole dflashtrain training checkpoint."""
    path = resume_path(cfg)
    if path is None:
        if cfg.resume_from == "auto":
            log.info("resume_from=auto: no checkpoint in %s yet, starting a new run",
                     Path(cfg.paths.output_dir, "checkpoints"))
        return None
    if cfg.resume_from == "auto":
        log.info("resume_from=auto: resuming from %s", path)
    checkpoint = read_checkpoint(path, "resume_from")
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    if missing:
        raise ConfigError("resume_from", f"{path} holds no training state ({', '.join(missing)} missing): it can "
                                         "be evaluated or exported, not resumed")
    return ResumePoint(path=path, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------- config
def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def rule_for(key: str) -> Optional[Tuple[str, str, str]]:
    """(verdict, why, the rule's key or prefix) of the first rule matching ``key``."""
    for prefix, verdict, why in RESUME_RULES:
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return verdict, why, prefix
    return None


def check_resume_config(cfg: DictConfig, point: ResumePoint, loss_name: str, family: str) -> None:
    """Refuse a change that makes this another run; record (and log) those that take effect from the resumed step."""
    meta = point.meta
    if meta.get("objective") != loss_name or meta.get("family") != family:
        raise ConfigError("loss", f"{point.path} trained loss={meta.get('objective')} (family {meta.get('family')}); "
                                  f"this config gives loss={loss_name} (family {family}); resume with "
                                  f"loss={meta.get('objective')}, or start a new run")
    saved = flatten(meta.get("config") or {})
    current = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    changed = [key for key in set(saved) | set(current) if saved.get(key, "<unset>") != current.get(key, "<unset>")]
    order = {prefix: i for i, (prefix, _, _) in enumerate(RESUME_RULES)}  # a root cause (block size) before its
    for key in sorted((k for k in changed if rule_for(k)), key=lambda k: (order[rule_for(k)[2]], k)):  # effects (γ)
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        verdict = rule_for(key)
        if verdict[0] == "refuse":
            raise ConfigError(key, f"is {new} but {point.path} was trained with {old}: {verdict[1]}; resume with "
                                   f"{key}={old}, or start a new run")
        point.applied.append(f"{key}: {old} -> {new}")
    for change in point.applied:
        log.warning("resume from step %d: %s takes effect from here", point.step, change)


def check_resume_geometry(point: ResumePoint, geometry: Dict[str, Any], sources: Dict[str, str]) -> None:
    """The checkpoint's drafter geometry must equal the one this config and target give."""
    for name, value in point.meta["geometry"].items():
        if name in geometry and geometry[name] != value:
            source = sources.get(name, "the target (model.target.path)")
            raise ConfigError("resume_from", f"{point.path} holds a drafter with {name}={value}, this config gives "
                                             f"{geometry[name]} (from {source}); resume with the config the "
                                             "checkpoint was trained with")


def check_resume_data(point: ResumePoint, rows: int) -> None:
    """The data position (global batches of an epoch) only means the same thing over the same rows. Another global
    batch size (more or fewer processes) continues at the first untrained row, with a warning (data/datamodule.py)."""
    state = point.checkpoint.get(DATA_STATE) or {}
    if "rows" in state and int(state["rows"]) != rows:
        raise ConfigError("data.path", f"gives {rows} usable rows, the run in {point.path} had {state['rows']}: its "
                                       "data position cannot be continued on other data; start a new run")


def check_no_rewind(point: ResumePoint, checkpoint_dir: Path) -> None:
    """Continuing in the checkpoint's own directory from an older step would overwrite later checkpoints there."""
    last = checkpoint_dir / "last.ckpt"
    if point.path.parent != checkpoint_dir.resolve() or not last.is_file() or last.resolve() == point.path:
        return
    later = int(read_checkpoint(last, "resume_from").get("global_step", 0))
    if later > point.step:
        raise ConfigError("resume_from", f"{point.path} is step {point.step} but {last} is step {later}: continuing "
                                         "in that directory would overwrite the later checkpoints; resume from "
                                         "last.ckpt, or into a new paths.output_dir")


# ---------------------------------------------------------------------------------------------- the callback
def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Carries what a checkpoint needs beyond Lightning's own state, and applies a resumed run's changed settings.

    * saves and restores the random states (python, numpy, torch, CUDA);
    * moves the data sampler to each new epoch (Lightning only reaches samplers it can find, not ours);
    * after a resume whose optimizer settings or schedule changed, puts them into the restored optimizer and
      scheduler (which would otherwise keep the checkpoint's values).
    """

    def __init__(self, optim: DictConfig, lr_factor: Callable[[int], float], reschedule: bool):
        self.optim = optim
        self.lr_factor = lr_factor
        self.reschedule = reschedule

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "rng" in state:
            set_rng_state(state["rng"])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(trainer.current_epoch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.reschedule:
            return
        optim = self.optim
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        for group in trainer.optimizers[0].param_groups:
            group.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                         initial_lr=optim.lr, lr=optim.lr * self.lr_factor(scheduler.last_epoch))
        scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
        scheduler._last_lr = [group["lr"] for group in trainer.optimizers[0].param_groups]
        log.warning("resume: lr %.4g at step %d (optim.lr %.4g on the recomputed schedule)",
                    scheduler._last_lr[0], trainer.global_step, optim.lr)
