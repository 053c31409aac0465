"""Config schemas: the one place where every default lives.

YAML in ``conf/`` is composed by Hydra on top of these dataclasses, so an unknown key or a wrong type fails at
compose time with the key's name, and an enum field rejects an unknown name listing the valid ones. Option files
hold only what differs from these defaults; range and cross-group rules live in :mod:`dflashtrain.config.checks`.
The loss group's schemas (one per objective) are in :mod:`dflashtrain.config.losses`. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from dflashtrain.config.losses import LOSS_SCHEMAS, default_gamma


class AttentionBackend(str, Enum):
    auto = "auto"
    sdpa = "sdpa"
    flex = "flex"


class BadRowPolicy(str, Enum):
    skip = "skip"
    error = "error"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LoggerName(str, Enum):
    tensorboard = "tensorboard"
    csv = "csv"
    none = "none"


class Strategy(str, Enum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"  # Lightning FSDPStrategy (FSDP1), GPU only
    fsdp2 = "fsdp2"  # Lightning ModelParallelStrategy with fully_shard per drafter layer


# ---------------------------------------------------------------------------------------------- model
@dataclass
class TargetConfig:
    path: str = MISSING  # local Hugging Face directory (config, weights, tokenizer)
    dtype: DType = DType.float32


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
    markov_rank: int = 0  # dspark family only: low-rank bigram head rank; loss=dspark sets it
    compile: bool = False  # torch.compile each drafter layer for training (first steps compile; bench/RESULTS.md)
    sliding_window: Optional[int] = None  # null: attend to every earlier position; W >= block_size: the last W
    # dflash2 family only (docs/dflash2.md): the dynamic convolutions and the candidate selector
    conv_kernel_size: int = 2  # taps of the in-block convolution (1 = the current slot only)
    conv_group_size: int = 16  # channels sharing one dynamic kernel delta; divides the hidden size
    selector_rank: int = 256  # rank r of the bilinear edge score
    selector_top_k: int = 16  # K unary candidates the selector chooses among


@dataclass
class ModelConfig:
    name: str = MISSING
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)


# ---------------------------------------------------------------------------------------------- data
class DataKind(str, Enum):
    chat = "chat"  # conversations, tokenized here; the target runs at every step
    features = "features"  # a dflashtrain-cache directory: tokens and target states; the target's body never loads


class DataFormat(str, Enum):
    auto = "auto"  # per file, from its first row: `messages` or ShareGPT `conversations`
    messages = "messages"
    sharegpt = "sharegpt"


class SystemPromptPolicy(str, Enum):
    keep = "keep"  # the rows' system messages as they are
    drop = "drop"  # no system message
    default = "default"  # data.system_prompt where a row has none
    replace = "replace"  # data.system_prompt instead of the rows' own


@dataclass
class DataConfig:
    name: str = MISSING
    kind: DataKind = DataKind.chat
    path: Any = None  # a file, directory or glob, or a list of them (docs/data.md); data=cached: the cache directory
    eval_path: Optional[str] = None  # held-out prompts for val/tau during training
    format: DataFormat = DataFormat.auto
    chat_template: Optional[str] = None  # a Jinja file used instead of the tokenizer's chat template
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)  # template variables, e.g. enable_thinking
    system_prompt_policy: SystemPromptPolicy = SystemPromptPolicy.keep
    system_prompt: Optional[str] = None  # for system_prompt_policy default | replace
    max_length: int = 3072
    num_anchors: int = 512
    batch_size: int = 4
    num_workers: int = 0
    num_proc: Optional[int] = None  # tokenizing processes; null: one per core (at most 8) from 2000 rows on
    # the tokenized-data cache root; auto: $DFLASHTRAIN_CACHE_DIR, else ~/.cache/dflashtrain; null: no cache
    cache_dir: Optional[str] = "auto"
    shuffle: bool = True
    pad_to_multiple_of: int = 64  # batches are padded to a multiple of this length (fewer compiled shapes)
    on_bad_row: BadRowPolicy = BadRowPolicy.error


# ---------------------------------------------------------------------------------------------- run
@dataclass
class ParallelismConfig:
    name: str = "single"
    strategy: Strategy = Strategy.auto
    devices: Any = 1  # a count, -1 / auto (all), or a list of device ids
    num_nodes: int = 1
    # fsdp: FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD; fsdp2: FULL_SHARD | SHARD_GRAD_OP
    sharding_strategy: str = "FULL_SHARD"


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
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | ...
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.tensorboard


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = 500
    save_last: bool = True
    save_top_k: int = 1


@dataclass
class PathsConfig:
    output_dir: str = "${run_dir:}"


@dataclass
class TauEvalConfig:
    """τ by greedy speculative decoding on a few held-out prompts (data.eval_path) during training: val/tau."""

    every_n_steps: int = 100  # 0 = off
    num_prompts: int = 8
    max_new_tokens: int = 32


@dataclass
class FeatureCacheConfig:
    """`dflashtrain-cache`: the target's states for this config's data and taps, written once; `data=cached` trains
    from them (docs/data.md, feature cache). Read by dflashtrain-cache only."""

    output_dir: Optional[str] = None  # required by dflashtrain-cache; must not exist yet
    final_hidden: Optional[bool] = None  # null: stored when the objective needs the target's distribution (kd, dspark)
    batch_size: int = 8  # rows per target forward
    rows_per_shard: int = 512
    device: str = "auto"  # auto: cuda if available, else cpu


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
    resume_from: Optional[str] = None  # a .ckpt of a previous run; auto: the newest in <output_dir>/checkpoints
    eval: TauEvalConfig = field(default_factory=TauEvalConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


# ---------------------------------------------------------------------------------------------- regen
@dataclass
class RegenModelConfig:
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass
class RegenConfig:
    """`dflashtrain-regen`: every assistant turn of data.path regenerated by the target, written as a new dataset
    with a manifest; rerun with the same output_dir to resume (docs/data.md, regeneration)."""

    model: RegenModelConfig = field(default_factory=RegenModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = "${run_dir:}/data"
    batch_size: int = 16  # conversations generated together
    max_new_tokens: int = 1024  # per assistant turn; a turn cut here is kept and counted
    temperature: float = 0.0  # 0: greedy; > 0: sampling with top_p and top_k
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    thinking: Optional[bool] = None  # sets data.chat_template_kwargs.enable_thinking; null: the template's default
    num_rows: Optional[int] = None  # the first rows only; null: all
    rows_per_shard: int = 1000  # the unit of resumption
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu


# ---------------------------------------------------------------------------------------------- eval, export, report
@dataclass
class EvalTargetConfig:
    path: Optional[str] = None  # null: the target the checkpoint was trained with
    dtype: DType = DType.float32


@dataclass
class EvalModelConfig:
    target: EvalTargetConfig = field(default_factory=EvalTargetConfig)


@dataclass
class EvalDataConfig:
    eval_path: str = "${asset:tiny/data/heldout.jsonl}"  # chat JSONL; a prompt = the messages before the last answer
    on_bad_row: BadRowPolicy = BadRowPolicy.error


@dataclass
class EvalConfig:
    """`dflashtrain-eval`: τ, acceptance and speedup of a drafter by speculative decoding (docs/decoding.md)."""

    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    ckpt_path: str = "latest"  # a training .ckpt; latest = the newest last.ckpt under outputs/train/, multirun/
    drafter_dir: Optional[str] = None  # an exported drafter directory, used instead of ckpt_path when set
    vp_drafter: Optional[str] = None  # a vp_drafter .ckpt or exported dir: D²SD decoding (greedy) with this second drafter
    d2sd_branches: int = 3  # D²SD: re-drafted candidate rows verified beside the main draft
    num_prompts: Optional[int] = 100  # null: every row of data.eval_path
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy; > 0: lossless speculative sampling
    seed: int = 0
    baseline: bool = True  # also decode with block size 1 (plain target) for speedup and tokens/s
    device: str = "auto"  # auto: cuda if available, else cpu
    output_dir: str = "${run_dir:}"  # eval.json and tensorboard/


@dataclass
class ExportConfig:
    """`dflashtrain-export`: a training checkpoint -> the HF drafter directory (docs/export.md), verified by load-back."""

    ckpt_path: str = "latest"
    output_dir: str = "${run_dir:}/drafter"
    target_path: Optional[str] = None  # the target's HF directory (vocab_size); null: the checkpoint's recorded one
    dtype: DType = DType.float32  # bfloat16 for serving large drafters
    overwrite: bool = False


@dataclass
class ReportConfig:
    """`dflashtrain-report` and the report at the end of every multirun (`hydra.callbacks.report`, conf/train.yaml):
    the comparison table, CSV and plots of a sweep's runs, with real τ of each run's last checkpoint."""

    _target_: str = "dflashtrain.report.callback.SweepReport"  # the Hydra callback this node configures
    num_prompts: int = 16  # real τ: held-out prompts decoded per run (the first ones of the file)
    max_new_tokens: int = 64  # real τ: token budget per prompt
    eval_path: Optional[str] = None  # real τ: chat JSONL of held-out prompts; null: each run's data.eval_path
    tau: bool = True  # false: no decoding (the table keeps val/tau and the training metrics)
    device: str = "auto"  # real τ: auto = cuda if available, else cpu
    single_run: bool = False  # the callback also reports after a single run (not only after a multirun)


def register_configs() -> None:
    """Register schemas and the `asset`, `default_gamma`, `unique_dir` and `run_dir` resolvers. Idempotent."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="eval", node=EvalConfig)
    cs.store(group="schema", name="export", node=ExportConfig)
    cs.store(group="schema", name="report", node=ReportConfig)
    cs.store(group="schema", name="regen", node=RegenConfig)
    for name, schema in LOSS_SCHEMAS.items():
        cs.store(group="schema/loss", name=name, node=schema)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset_path)
    if not OmegaConf.has_resolver("default_gamma"):
        OmegaConf.register_new_resolver("default_gamma", default_gamma)
    if not OmegaConf.has_resolver("unique_dir"):  # default run directories: never shared, even within one second
        OmegaConf.register_new_resolver("unique_dir", _unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", _run_dir)


def _unique_dir(path: str) -> str:
    from dflashtrain.train.outputs import claim_dir

    return claim_dir(path)


def _run_dir() -> Optional[str]:
    """The job's output directory (Hydra's ``runtime.output_dir``). A command that only prints its config (``--cfg``,
    ``--info``: no job runs, Hydra never sets it) gets the run directory a run started now would take (named, not
    created), so ``--resolve`` prints it."""
    from hydra.core.hydra_config import HydraConfig

    from dflashtrain.train.outputs import in_dry_composition

    hydra_cfg = HydraConfig.get()
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    if output_dir is None and in_dry_composition():
        return str(hydra_cfg.run.dir)
    return output_dir


def _asset_path(relative: str) -> str:
    from dflashtrain.assets import TINY_DIR

    return str(TINY_DIR.parent / relative)
