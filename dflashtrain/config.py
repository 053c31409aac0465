"""Config schemas (one place per default) and the checks that run before any weight is loaded.

YAML in ``conf/`` is composed by Hydra on top of these dataclasses, so an unknown key or a wrong type fails at
compose time with the key's name. Enum fields reject unknown names and list the valid ones. Range and
cross-group rules live in :func:`validate` and :func:`validate_against_target`; both raise :class:`ConfigError`,
whose message starts with the offending key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class MaskMode(str, Enum):
    independent = "independent"
    cumulative = "cumulative"


class TargetKind(str, Enum):
    hard = "hard"
    kd = "kd"


class AttentionBackend(str, Enum):
    auto = "auto"
    sdpa = "sdpa"
    flex = "flex"


class DPaceMode(str, Enum):
    full = "full"
    cumulative = "cumulative"
    continuation = "continuation"


class Reduction(str, Enum):
    weighted_mean = "weighted_mean"
    per_sequence = "per_sequence"
    per_token = "per_token"


class BadRowPolicy(str, Enum):
    skip = "skip"
    error = "error"


# ---------------------------------------------------------------------------------------------- model
@dataclass
class TargetConfig:
    path: str = MISSING  # local Hugging Face directory (config, weights, tokenizer)
    dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class DrafterConfig:
    num_layers: int = 5
    block_size: int = 16
    target_layer_ids: Optional[List[int]] = None  # null: the default tap formula over num_taps
    num_taps: int = 5
    mask_token_id: Optional[int] = None  # null: tokenizer's mask token, else first unused embedding row
    intermediate_size: Optional[int] = None  # null: the target's
    attention: AttentionBackend = AttentionBackend.auto  # auto: flex on CUDA, SDPA elsewhere
    logits_chunk_blocks: int = 64  # blocks per lm_head + loss chunk (memory), per sequence
    markov_rank: int = 0  # DSpark low-rank bigram head; 0 = none


@dataclass
class ModelConfig:
    name: str = MISSING
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)


# ---------------------------------------------------------------------------------------------- loss
@dataclass
class DecayLossConfig:
    """DFlash: exponentially decaying slot weights (SPEC §3)."""

    _target_: str = "dflashtrain.objectives.decay.DecayObjective"
    gamma: Optional[float] = 7.0  # 0 or null: all weights 1
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        if self.gamma is not None and self.gamma < 0:
            raise ConfigError("loss.gamma", f"must be >= 0 or null, got {self.gamma}")


@dataclass
class DPaceLossConfig:
    """D-PACE: detached confidence-derived slot weights (SPEC §4)."""

    _target_: str = "dflashtrain.objectives.dpace.DPaceObjective"
    alpha: float = 0.5
    mode: DPaceMode = DPaceMode.full
    reduction: Reduction = Reduction.weighted_mean
    gamma: Optional[float] = None  # ignored under dpace; a value set here only triggers a warning
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError("loss.alpha", f"must be in (0, 1], got {self.alpha}")
        if self.gamma is not None:
            import warnings

            warnings.warn(f"loss.gamma={self.gamma} is ignored under loss=dpace (weights come from confidences)")


@dataclass
class VPDrafterLossConfig:
    """D²SD variable-prefix drafter (SPEC §5)."""

    _target_: str = "dflashtrain.objectives.vp.VPDrafterObjective"
    prefix_weight_base: Optional[float] = 0.9  # P(p) ∝ base^p; null means 0.9
    gamma: Optional[float] = 7.0  # decay from the first masked slot
    include_anchor_only: bool = False  # allow p = 1
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        if self.prefix_weight_base is not None and not self.prefix_weight_base > 0:
            raise ConfigError("loss.prefix_weight_base", f"must be > 0 (or null for 0.9), got {self.prefix_weight_base}")
        if self.gamma is not None and self.gamma < 0:
            raise ConfigError("loss.gamma", f"must be >= 0 or null, got {self.gamma}")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    path: Optional[str] = None  # chat JSONL with a `messages` list per row
    eval_path: Optional[str] = None  # held-out prompts for τ evaluation
    max_length: int = 128
    num_anchors: int = 512
    batch_size: int = 4
    num_workers: int = 0
    shuffle: bool = True
    on_bad_row: BadRowPolicy = BadRowPolicy.error


# ---------------------------------------------------------------------------------------------- run
@dataclass
class ParallelismConfig:
    name: str = "single"
    strategy: str = "auto"  # auto | ddp | fsdp
    devices: Any = 1
    num_nodes: int = 1
    sharding_strategy: str = "FULL_SHARD"  # fsdp only: FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD


@dataclass
class OptimConfig:
    lr: float = 6e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_epochs: int = -1
    accelerator: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    name: str = "tensorboard"  # tensorboard | csv | none


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 500
    save_last: bool = True
    save_top_k: int = 1


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Any = MISSING  # each conf/loss/*.yaml brings its own schema
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    resume_from: Optional[str] = None  # a .ckpt written by a previous run


LOSS_SCHEMAS = {"decay": DecayLossConfig, "dpace": DPaceLossConfig, "vp_drafter": VPDrafterLossConfig}


def register_configs() -> None:
    """Register schemas and the `asset` resolver. Idempotent."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    for name, schema in LOSS_SCHEMAS.items():
        cs.store(group="schema/loss", name=name, node=schema)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset_path)
    if not OmegaConf.has_resolver("default_gamma"):
        OmegaConf.register_new_resolver("default_gamma", default_gamma)


# Published decay γ per block size (SPEC §3); other sizes scale B = 16's γ linearly.
PUBLISHED_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    return PUBLISHED_GAMMA.get(int(block_size), round(7.0 * int(block_size) / 16, 2))


def _asset_path(relative: str) -> str:
    from dflashtrain.assets import TINY_DIR

    return str(TINY_DIR.parent / relative)


# ---------------------------------------------------------------------------------------------- checks
def _positive(key: str, value: float, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(key, f"must be {'> 0' if strict else '>= 0'}, got {value}")


def _cuda_requested(accelerator: str) -> bool:
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def validate(cfg: DictConfig) -> None:
    """Range and cross-group rules that need no weights. Raises ConfigError naming the key."""
    drafter = cfg.model.drafter
    if drafter.block_size < 2:
        raise ConfigError("model.drafter.block_size", f"must be >= 2 (an anchor plus drafts), got {drafter.block_size}")
    _positive("model.drafter.num_layers", drafter.num_layers)
    _positive("model.drafter.num_taps", drafter.num_taps)
    _positive("model.drafter.logits_chunk_blocks", drafter.logits_chunk_blocks)
    if drafter.target_layer_ids is not None and len(drafter.target_layer_ids) == 0:
        raise ConfigError("model.drafter.target_layer_ids", "must list at least one layer, or be null")
    if cfg.model.target.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError("model.target.dtype", f"must be float32, bfloat16 or float16, got {cfg.model.target.dtype}")
    target_path = cfg.model.target.path
    if not Path(target_path, "config.json").is_file():
        raise ConfigError("model.target.path", f"no Hugging Face model directory (config.json) at {target_path!r}")

    data = cfg.data
    _positive("data.num_anchors", data.num_anchors)
    _positive("data.batch_size", data.batch_size)
    _positive("data.num_workers", data.num_workers, strict=False)
    if data.max_length < 2 * drafter.block_size:
        raise ConfigError("data.max_length", f"must be >= 2 * model.drafter.block_size = {2 * drafter.block_size}")
    if data.path is None:
        raise ConfigError("data.path", "is required: a chat JSONL file with a `messages` list per row")
    if not os.path.isfile(data.path):
        raise ConfigError("data.path", f"file not found: {data.path}")

    _positive("optim.lr", cfg.optim.lr)
    _positive("optim.weight_decay", cfg.optim.weight_decay, strict=False)
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError("optim.warmup_ratio", f"must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    _positive("trainer.max_steps", cfg.trainer.max_steps)
    if cfg.trainer.gradient_clip_val is not None:
        _positive("trainer.gradient_clip_val", cfg.trainer.gradient_clip_val)

    if cfg.logger.name not in ("tensorboard", "csv", "none"):
        raise ConfigError("logger.name", f"must be tensorboard, csv or none, got {cfg.logger.name}")
    if cfg.parallelism.strategy not in ("auto", "ddp", "fsdp"):
        raise ConfigError("parallelism.strategy", f"must be auto, ddp or fsdp, got {cfg.parallelism.strategy}")
    if cfg.parallelism.strategy == "fsdp" and not _cuda_requested(cfg.trainer.accelerator):
        raise ConfigError("parallelism.strategy", "fsdp needs GPUs (trainer.accelerator=gpu); use single or ddp on CPU")
    OmegaConf.to_object(cfg.loss).validate()


def validate_against_target(cfg: DictConfig, target_config: Any) -> None:
    """Rules that need the target's config.json (read without loading weights)."""
    num_layers = target_config.num_hidden_layers
    ids = cfg.model.drafter.target_layer_ids
    if ids is not None:
        for i in ids:
            if not 0 <= i < num_layers - 1:
                raise ConfigError(
                    "model.drafter.target_layer_ids",
                    f"layer {i} is outside [0, {num_layers - 2}] (the target has {num_layers} layers; "
                    "the last one is never tapped because its HF hidden state is post-norm)",
                )
    elif num_layers < 2:
        raise ConfigError("model.target.path", f"the target needs >= 2 layers to be tapped, has {num_layers}")
    mask_id = cfg.model.drafter.mask_token_id
    if mask_id is not None and not 0 <= mask_id < target_config.vocab_size:
        raise ConfigError(
            "model.drafter.mask_token_id",
            f"{mask_id} is not a row of the target embedding [0, {target_config.vocab_size - 1}]",
        )
