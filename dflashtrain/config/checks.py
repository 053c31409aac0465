"""Checks that run before any weight is loaded: ranges, cross-group rules, and rules against the target's config.

Each raises :class:`~dflashtrain.config.errors.ConfigError` naming the key and what is allowed. ``validate`` runs
once per launch: the CLI calls it before importing Lightning; ``dflashtrain.train.recipe.run`` for programmatic use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dflashtrain.config.machine import uses_cuda, validate_machine
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.losses import LOSS_SCHEMAS
from dflashtrain.config.schema import DataKind, Strategy, SystemPromptPolicy, TrainConfig
from dflashtrain.families import family_checks


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
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
FSDP2_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP")  # train/parallelism.py: FSDP2_RESHARD_AFTER_FORWARD


def loss_name(cfg: DictConfig) -> str:
    """The loss=<name> option the config's loss node was composed from."""
    schema = OmegaConf.get_type(cfg.loss)
    names = {cls: name for name, cls in LOSS_SCHEMAS.items()}
    if schema not in names:
        raise ConfigError("loss", f"has no schema: a loss file starts with `defaults: [/schema/loss/<name>@_here_]`, "
                                  f"<name> one of {', '.join(LOSS_SCHEMAS)}")
    return names[schema]


def unknown_keys(node: Any, schema: Any, prefix: str) -> List[str]:
    """Keys of ``node`` that its dataclass ``schema`` does not declare, recursively (full dotted names).

    ``+group.key=value`` and overlay files can add keys to a typed node; a misspelt key would then be ignored.
    """
    if not (dataclasses.is_dataclass(schema) and OmegaConf.is_dict(node)):
        return []
    declared = {f.name: f for f in fields(schema)}
    found = []
    for key in node.keys():
        if key not in declared:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(node._get_node(key)) and not OmegaConf.is_missing(node, key):
            found += unknown_keys(node[key], OmegaConf.get_type(node, key), f"{prefix}{key}.")
    return found


def validate_structure(cfg: DictConfig) -> None:
    """No unknown key at any depth, no value left ``???``, and a loss node typed by one of the loss schemas."""
    known = {f.name for f in fields(TrainConfig)} | {"hydra"}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(str(key), f"unknown top-level key; valid: {', '.join(sorted(known - {'hydra'}))}")
    name = loss_name(cfg)
    for key in (k for k in cfg.keys() if k != "hydra"):
        schema = OmegaConf.get_type(cfg, key)
        extra = unknown_keys(cfg[key], schema, f"{key}.") if OmegaConf.is_dict(cfg._get_node(key)) else []
        if extra:
            owner = extra[0].rpartition(".")[0]
            valid = _field_names(_schema_at(cfg, owner))
            where = f" (loss={name})" if owner.startswith("loss") else ""
            raise ConfigError(extra[0], f"unknown key{where}; valid: {', '.join(valid)}")
    missing = []
    for key in (k for k in cfg.keys() if k != "hydra"):  # Hydra's node resolves only inside a running app
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif OmegaConf.is_config(cfg[key]):
            missing += sorted(OmegaConf.missing_keys(cfg[key]))  # full keys, e.g. model.target.path
    if missing:
        raise ConfigError(missing[0], "is required and has no default: set it on the command line (key=value)")


def check_finite(node: Any, prefix: str = "") -> None:
    """No nan or inf anywhere: every number of the config is finite (null is how a setting is switched off)."""
    if OmegaConf.is_dict(node):
        for key in node.keys():
            if key == "hydra" or OmegaConf.is_missing(node, key):
                continue
            try:
                value = node[key]
            except OmegaConfBaseException:  # an interpolation that resolves only inside the app (${hydra:...})
                continue
            check_finite(value, f"{prefix}{key}.")
    elif OmegaConf.is_list(node):
        for i, item in enumerate(node):
            check_finite(item, f"{prefix[:-1]}[{i}].")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(prefix[:-1], f"must be a finite number, got {node}")


def _schema_at(cfg: DictConfig, dotted: str) -> Any:
    parent, _, key = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.get_type(node, key)


def _field_names(schema: Any) -> List[str]:
    return [f.name for f in fields(schema)] if dataclasses.is_dataclass(schema) else []


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
    parallelism = cfg.parallelism
    sharding = FSDP2_SHARDING if parallelism.strategy == Strategy.fsdp2 else SHARDING_STRATEGIES
    _one_of("parallelism.sharding_strategy", parallelism.sharding_strategy, sharding)
    devices = cfg.parallelism.devices
    if not (devices == "auto" or devices == -1 or (isinstance(devices, int) and devices >= 1)
            or (OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) for d in devices))):
        raise ConfigError("parallelism.devices", f"must be auto, -1, a count >= 1 or a list of ids; got {devices!r}")
    one_device = devices == 1 or (OmegaConf.is_list(devices) and len(devices) == 1)
    if parallelism.strategy == Strategy.auto and not (one_device and parallelism.num_nodes == 1):
        raise ConfigError("parallelism.devices" if not one_device else "parallelism.num_nodes",
                          "parallelism=single runs one process on one device; use parallelism=ddp (or fsdp2, fsdp) "
                          "for more")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("optim.betas", f"must be two values in [0, 1), got {betas}")
    _positive("optim.eps", cfg.optim.eps)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError("seed", f"must be in [0, 2**32), got {cfg.seed}")
    if cfg.resume_from not in (None, "auto") and not os.path.isfile(cfg.resume_from):
        raise ConfigError("resume_from", f"file not found: {cfg.resume_from} (auto: resume from the newest "
                                         "checkpoint in <paths.output_dir>/checkpoints, if any)")


def validate(cfg: DictConfig) -> None:
    """Range and cross-group rules that need no weights. Raises ConfigError naming the key."""
    validate_structure(cfg)
    check_finite(cfg)
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
    if drafter.sliding_window is not None and drafter.sliding_window < drafter.block_size:
        raise ConfigError("model.drafter.sliding_window", f"must be null (no window) or >= model.drafter.block_size "
                                                          f"= {drafter.block_size}, got {drafter.sliding_window}")
    if not Path(cfg.model.target.path, "config.json").is_file():  # its contents: load_target_config, before weights
        raise ConfigError("model.target.path", f"no Hugging Face model directory (config.json) at "
                                               f"{cfg.model.target.path!r}")

    validate_data(cfg.data, drafter.block_size)

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

    if cfg.parallelism.strategy == Strategy.fsdp and not uses_cuda(cfg.trainer.accelerator):
        raise ConfigError("parallelism.strategy", "fsdp needs GPUs (trainer.accelerator=gpu); on CPU use "
                                                  "parallelism=fsdp2 (sharded) or parallelism=ddp")
    _validate_run(cfg)
    validate_machine(cfg)
    OmegaConf.to_object(cfg.loss).validate()
    name = loss_name(cfg)
    family_checks(objective_family(cfg)).check(cfg, name)


# apply_chat_template's own arguments: a template variable of one of these names would collide with them
RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def validate_data(data: DictConfig, block_size: int) -> None:
    """The data group: values, files, and the formatting options (docs/data.md)."""
    from dflashtrain.data import sources  # light: no torch

    _positive("data.num_anchors", data.num_anchors)
    _positive("data.batch_size", data.batch_size)
    _positive("data.num_workers", data.num_workers, strict=False)
    _positive("data.pad_to_multiple_of", data.pad_to_multiple_of)
    if data.num_proc is not None:
        _at_least("data.num_proc", data.num_proc, 1)
    if data.max_length < 2 * block_size:
        raise ConfigError("data.max_length", f"must be >= 2 * model.drafter.block_size = {2 * block_size}")
    if data.kind == DataKind.features:
        if not isinstance(data.path, str) or not Path(data.path, "manifest.json").is_file():
            raise ConfigError("data.path", f"data=cached needs the directory dflashtrain-cache wrote (with "
                                           f"manifest.json); got {data.path!r}")
        return
    if isinstance(data.path, str) and Path(data.path, "manifest.json").is_file() and any(
            Path(data.path).glob("shard-*.arrow")):
        raise ConfigError("data.path", f"{data.path} is a feature cache (dflashtrain-cache): train from it with "
                                       "data=cached")
    try:
        sources.resolve(OmegaConf.to_container(data.path) if OmegaConf.is_list(data.path) else data.path)
    except sources.SourceError as error:
        raise ConfigError("data.path", str(error)) from None
    if data.chat_template is not None and not os.path.isfile(data.chat_template):
        raise ConfigError("data.chat_template", f"file not found: {data.chat_template} (a Jinja chat template)")
    for key in data.chat_template_kwargs:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise ConfigError(f"data.chat_template_kwargs.{key}", "is an argument dflashtrain sets itself, not a "
                                                                 "template variable")
    policy, prompt = data.system_prompt_policy, data.system_prompt
    if policy in (SystemPromptPolicy.default, SystemPromptPolicy.replace) and not (prompt or "").strip():
        raise ConfigError("data.system_prompt", f"is required by data.system_prompt_policy={policy.value}")
    if policy in (SystemPromptPolicy.keep, SystemPromptPolicy.drop) and prompt is not None:
        raise ConfigError("data.system_prompt", f"is set but data.system_prompt_policy={policy.value} ignores it; "
                                                "use default (where a row has none) or replace")


def objective_family(cfg: DictConfig) -> str:
    """The drafting family the configured objective trains (declared by its class)."""
    from dflashtrain.objectives import objective_class

    return objective_class(OmegaConf.get_type(cfg.loss)).family


# ---------------------------------------------------------------------------------------------- the target directory
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# What the drafter reads from the target's config (docs/architecture.md, geometry): a decoder-only causal LM with
# RMSNorm and grouped-query attention, the Qwen3 / Llama layout.
TARGET_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "rms_norm_eps", "vocab_size")


def check_target_config_file(path: str, key: str) -> dict:
    """``<path>/config.json`` exists and is a JSON object naming a model_type; returns it."""
    config_file = Path(path, "config.json")
    if not config_file.is_file():
        raise ConfigError(key, f"no Hugging Face model directory (config.json) at {path!r}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(key, f"{config_file} is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(key, f"{config_file} is not a Hugging Face model config (no model_type)")
    return config


def load_target_config(path: str, key: str = "model.target.path") -> Any:
    """The target's config as transformers reads it, refused unless it is a decoder-only LM the drafter can tap."""
    raw = check_target_config_file(path, key)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - whatever transformers cannot read is this directory's problem
        raise ConfigError(key, f"transformers cannot read {path}/config.json: {str(error).splitlines()[0]}") from None
    missing = [name for name in TARGET_FIELDS if getattr(config, name, None) is None]
    if raw["model_type"] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or missing or config.is_encoder_decoder:
        lacking = f" (no {', '.join(missing)})" if missing else ""
        raise ConfigError(key, f"{path} holds a {raw['model_type']} model{lacking}; the target must be a "
                               "decoder-only causal LM with RMSNorm and grouped-query attention (Qwen3, Llama, …)")
    return config


def check_target_files(path: str, key: str = "model.target.path") -> None:
    """Weights (and every shard an index names) and a tokenizer are there, before anything is loaded."""
    directory = Path(path)
    present = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise ConfigError(key, f"{path} has no weights ({', '.join(WEIGHT_FILES)})")
    if present[0].endswith(".index.json"):
        try:
            shards = set(json.loads((directory / present[0]).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConfigError(key, f"{directory / present[0]} is not a weight index: {error}") from None
        absent = sorted(s for s in shards if not (directory / s).is_file())
        if absent:
            raise ConfigError(key, f"{present[0]} lists shards that are missing: {', '.join(absent[:3])}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(key, f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")


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
        from dflashtrain.models.target import default_layer_ids  # the tap formula (docs/architecture.md)

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
    family_checks(objective_family(cfg)).check_against_target(cfg, target_config)
    max_positions = getattr(target_config, "max_position_embeddings", None)
    if max_positions is not None and cfg.data.max_length > max_positions:
        raise ConfigError("data.max_length", f"{cfg.data.max_length} exceeds the target's max_position_embeddings "
                                             f"{max_positions}")
