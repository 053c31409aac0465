"""Config schemas (one place per default) and the checks that run before any weight is loaded.

YAML in ``conf/`` is composed by Hydra on top of these dataclasses, so an unknown key or a wrong type fails at
compose time with the key's name. Enum fields reject unknown names and list the valid ones. Range and
cross-group rules live in :func:`validate` and :func:`validate_against_target`; both raise :class:`ConfigError`,
whose message starts with the offending key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
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


DEFAULT_PREFIX_WEIGHT_BASE = 0.9  # vp_drafter: P(p) ∝ base^p; also what a null base means


@dataclass
class VPDrafterLossConfig:
    """D²SD variable-prefix drafter (SPEC §5)."""

    _target_: str = "dflashtrain.objectives.vp.VPDrafterObjective"
    prefix_weight_base: Optional[float] = DEFAULT_PREFIX_WEIGHT_BASE  # P(p) ∝ base^p; null means the default
    gamma: Optional[float] = 7.0  # decay from the first masked slot
    include_anchor_only: bool = False  # allow p = 1
    mask_mode: MaskMode = MaskMode.independent
    target: TargetKind = TargetKind.hard

    def validate(self) -> None:
        if self.prefix_weight_base is not None and not self.prefix_weight_base > 0:
            raise ConfigError("loss.prefix_weight_base",
                              f"must be > 0 (or null for {DEFAULT_PREFIX_WEIGHT_BASE}), got {self.prefix_weight_base}")
        if self.gamma is not None and self.gamma < 0:
            raise ConfigError("loss.gamma", f"must be >= 0 or null, got {self.gamma}")


@dataclass
class DSparkLossConfig:
    """DSpark: next-token convention, Markov-biased logits, CE + L1 to the target + confidence BCE (SPEC §6).

    conf/loss/dspark.yaml also sets model.drafter.markov_rank (the Markov head is part of this objective).
    """

    _target_: str = "dflashtrain.objectives.dspark.DSparkObjective"
    ce_alpha: float = 0.1  # hard CE on the data token
    l1_alpha: float = 0.9  # L1 between the drafter's and the target's distributions
    conf_alpha: float = 1.0  # confidence-head BCE; 0 = no confidence head
    gamma: Optional[float] = 4.0  # w_k = exp(-k/gamma), k >= 0; 0 or null: all weights 1
    mask_mode: MaskMode = MaskMode.cumulative

    def validate(self) -> None:
        for key in ("ce_alpha", "l1_alpha", "conf_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.ce_alpha == 0 and self.l1_alpha == 0:
            raise ConfigError("loss.ce_alpha", "ce_alpha and l1_alpha are both 0: nothing would train the drafter")
        if self.gamma is not None and self.gamma < 0:
            raise ConfigError("loss.gamma", f"must be >= 0 or null, got {self.gamma}")


def validate_heads(markov_rank: int, loss: Any) -> None:
    """The DSpark heads belong to the next-token objective: no Markov head elsewhere, no confidence head without W1."""
    if markov_rank < 0:
        raise ConfigError("model.drafter.markov_rank", f"must be >= 0 (0 = no Markov head), got {markov_rank}")
    is_dspark = isinstance(loss, DSparkLossConfig)
    if markov_rank > 0 and not is_dspark:
        name = next((n for n, schema in LOSS_SCHEMAS.items() if isinstance(loss, schema)), type(loss).__name__)
        raise ConfigError(
            "model.drafter.markov_rank",
            f"is {markov_rank}, but the Markov head is a DSpark head (next-token convention) and loss={name} uses the "
            "DFlash convention; use loss=dspark or model.drafter.markov_rank=0",
        )
    if is_dspark and loss.conf_alpha > 0 and markov_rank == 0:
        raise ConfigError(
            "model.drafter.markov_rank",
            f"must be > 0 while loss.conf_alpha={loss.conf_alpha} > 0: the confidence head reads W1[prev] of the "
            "Markov head; set a rank, or loss.conf_alpha=0 for no confidence head",
        )


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
    pad_to_multiple_of: int = 64  # batches are padded to a multiple of this length
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
class TauEvalConfig:
    """τ by greedy speculative decoding on a few held-out prompts (data.eval_path) during training: val/tau."""

    every_n_steps: int = 100  # 0 = off
    num_prompts: int = 8
    max_new_tokens: int = 32


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
    eval: TauEvalConfig = field(default_factory=TauEvalConfig)


@dataclass
class EvalConfig:
    """`dflashtrain-eval`: τ, acceptance and speedup of a drafter by speculative decoding (SPEC §8)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # target.path ??? = the checkpoint's recorded target
    data: DataConfig = field(default_factory=DataConfig)  # prompts: data.eval_path (a chat JSONL)
    ckpt_path: str = "latest"  # a training .ckpt; latest = newest outputs/train/*/checkpoints/last.ckpt
    drafter_dir: Optional[str] = None  # an exported DFlash directory, used instead of ckpt_path when set
    vp_drafter: Optional[str] = None  # a vp_drafter .ckpt or exported dir: D²SD decoding (greedy) with this second drafter
    d2sd_branches: int = 3  # D²SD: re-drafted candidate rows verified beside the main draft
    num_prompts: Optional[int] = 100  # null: every row of data.eval_path
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy; > 0: lossless speculative sampling
    seed: int = 0
    baseline: bool = True  # also decode with block size 1 (plain target) for speedup and tokens/s
    device: str = "auto"  # auto: cuda if available, else cpu
    output_dir: str = "${hydra:runtime.output_dir}"  # eval.json and tensorboard/


@dataclass
class ExportConfig:
    """`dflashtrain-export`: a training checkpoint -> the DFlash HF directory (SPEC §1.1), verified by load-back."""

    ckpt_path: str = "latest"
    output_dir: str = "${hydra:runtime.output_dir}/drafter"
    target_path: Optional[str] = None  # the target's HF directory (vocab_size); null: the checkpoint's recorded one
    dtype: str = "float32"  # float32 | bfloat16 | float16 (bfloat16 for serving large drafters)
    overwrite: bool = False


LOSS_SCHEMAS = {
    "decay": DecayLossConfig,
    "dpace": DPaceLossConfig,
    "vp_drafter": VPDrafterLossConfig,
    "dspark": DSparkLossConfig,
}


def register_configs() -> None:
    """Register schemas and the `asset` resolver. Idempotent."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="eval", node=EvalConfig)
    cs.store(group="schema", name="export", node=ExportConfig)
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


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


def validate_structure(cfg: DictConfig) -> None:
    """No unknown top-level key, no value left ``???``, and a loss node typed by its schema and aimed at its class.

    The root node is open to ``+key=...`` and to overlay files, so a misspelt group would otherwise be ignored; an
    untyped loss node, or a ``_target_`` that is not its schema's, would train an objective the config does not name.
    """
    known = {f.name for f in fields(TrainConfig)} | {"hydra"}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(str(key), f"unknown top-level key; valid: {', '.join(sorted(known - {'hydra'}))}")
    missing = []
    for key in (k for k in cfg.keys() if k != "hydra"):  # Hydra's node resolves only inside a running app
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif OmegaConf.is_config(cfg[key]):
            missing += sorted(OmegaConf.missing_keys(cfg[key]))  # full keys, e.g. model.target.path
    if missing:
        raise ConfigError(missing[0], "is required and has no default: set it on the command line (key=value)")
    schema = OmegaConf.get_type(cfg.loss)
    names = {cls: name for name, cls in LOSS_SCHEMAS.items()}
    if schema not in names:
        raise ConfigError("loss", f"has no schema: a loss file starts with `defaults: [/schema/loss/<name>@_here_]`, "
                                  f"<name> one of {', '.join(LOSS_SCHEMAS)}")
    if cfg.loss._target_ != schema._target_:
        raise ConfigError("loss._target_", f"must be {schema._target_} under the {names[schema]} schema; choose "
                                           f"the objective with loss=<name> ({', '.join(LOSS_SCHEMAS)})")


def _validate_run(cfg: DictConfig) -> None:
    """Trainer, checkpoint, parallelism and resume values (Lightning would take most of them silently)."""
    trainer = cfg.trainer
    _one_of("trainer.accelerator", trainer.accelerator, ACCELERATORS)
    _one_of("trainer.precision", trainer.precision, PRECISIONS)
    _at_least("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, 1)
    _at_least("trainer.log_every_n_steps", trainer.log_every_n_steps, 1)
    if trainer.max_epochs == 0 or trainer.max_epochs < -1:
        raise ConfigError("trainer.max_epochs", f"must be -1 (no limit) or >= 1, got {trainer.max_epochs}")
    _at_least("checkpoint.every_n_train_steps", cfg.checkpoint.every_n_train_steps, 1)
    _at_least("checkpoint.save_top_k", cfg.checkpoint.save_top_k, -1)
    _at_least("parallelism.num_nodes", cfg.parallelism.num_nodes, 1)
    _one_of("parallelism.sharding_strategy", cfg.parallelism.sharding_strategy, SHARDING_STRATEGIES)
    devices = cfg.parallelism.devices
    if not (devices == "auto" or devices == -1 or (isinstance(devices, int) and devices >= 1)
            or (OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) for d in devices))):
        raise ConfigError("parallelism.devices", f"must be auto, -1, a count >= 1 or a list of ids; got {devices!r}")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("optim.betas", f"must be two values in [0, 1), got {betas}")
    _positive("optim.eps", cfg.optim.eps)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError("seed", f"must be in [0, 2**32), got {cfg.seed}")
    if cfg.resume_from is not None and not os.path.isfile(cfg.resume_from):
        raise ConfigError("resume_from", f"file not found: {cfg.resume_from}")


def _cuda_requested(accelerator: str) -> bool:
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def validate(cfg: DictConfig) -> None:
    """Range and cross-group rules that need no weights. Raises ConfigError naming the key."""
    validate_structure(cfg)
    drafter = cfg.model.drafter
    if drafter.block_size < 2:
        raise ConfigError("model.drafter.block_size", f"must be >= 2 (an anchor plus drafts), got {drafter.block_size}")
    _positive("model.drafter.num_layers", drafter.num_layers)
    _positive("model.drafter.num_taps", drafter.num_taps)
    _positive("model.drafter.logits_chunk_blocks", drafter.logits_chunk_blocks)
    ids = drafter.target_layer_ids
    if ids is not None and (len(ids) == 0 or len(set(ids)) != len(ids)):
        raise ConfigError("model.drafter.target_layer_ids", f"must list distinct layers, or be null; got {list(ids)}")
    if ids is not None and len(ids) != drafter.num_taps:
        raise ConfigError("model.drafter.num_taps", f"is {drafter.num_taps} but model.drafter.target_layer_ids "
                                                    f"lists {len(ids)} layers; make them agree")
    if drafter.mask_token_id is not None:
        _at_least("model.drafter.mask_token_id", drafter.mask_token_id, 0)
    if drafter.intermediate_size is not None:
        _positive("model.drafter.intermediate_size", drafter.intermediate_size)
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
    _positive("eval.every_n_steps", cfg.eval.every_n_steps, strict=False)
    _positive("eval.num_prompts", cfg.eval.num_prompts)
    _positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    if cfg.eval.every_n_steps > 0 and cfg.data.eval_path is not None and not os.path.isfile(cfg.data.eval_path):
        raise ConfigError("data.eval_path", f"file not found: {cfg.data.eval_path} (eval.every_n_steps=0: no val/tau)")

    if cfg.logger.name not in ("tensorboard", "csv", "none"):
        raise ConfigError("logger.name", f"must be tensorboard, csv or none, got {cfg.logger.name}")
    if cfg.parallelism.strategy not in ("auto", "ddp", "fsdp"):
        raise ConfigError("parallelism.strategy", f"must be auto, ddp or fsdp, got {cfg.parallelism.strategy}")
    if cfg.parallelism.strategy == "fsdp" and not _cuda_requested(cfg.trainer.accelerator):
        raise ConfigError("parallelism.strategy", "fsdp needs GPUs (trainer.accelerator=gpu); use single or ddp on CPU")
    _validate_run(cfg)
    loss = OmegaConf.to_object(cfg.loss)
    loss.validate()
    validate_heads(drafter.markov_rank, loss)


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
    else:
        from dflashtrain.target import default_layer_ids  # the tap formula of SPEC §1

        taps = cfg.model.drafter.num_taps
        formula = default_layer_ids(num_layers, taps)
        if len(set(formula)) != taps or not all(0 <= i < num_layers - 1 for i in formula):
            raise ConfigError("model.drafter.num_taps", f"{taps} taps do not fit a target of {num_layers} layers "
                                                        f"(formula gives {formula}); use fewer or set target_layer_ids")
    mask_id = cfg.model.drafter.mask_token_id
    if mask_id is not None and not 0 <= mask_id < target_config.vocab_size:
        raise ConfigError(
            "model.drafter.mask_token_id",
            f"{mask_id} is not a row of the target embedding [0, {target_config.vocab_size - 1}]",
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        special = getattr(target_config, name, None)
        if mask_id is not None and mask_id in (special if isinstance(special, list) else [special]):
            raise ConfigError("model.drafter.mask_token_id", f"{mask_id} is the target's {name}; MASK must be a row "
                                                             "no real token uses (null picks one)")
    max_positions = getattr(target_config, "max_position_embeddings", None)
    if max_positions is not None and cfg.data.max_length > max_positions:
        raise ConfigError("data.max_length", f"{cfg.data.max_length} exceeds the target's max_position_embeddings "
                                             f"{max_positions}")
