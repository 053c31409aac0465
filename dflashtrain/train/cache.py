"""The ``dflashtrain-cache`` app, top to bottom: run the target once over a training config's data and write a feature
cache that ``data=cached`` trains from (docs/data.md, feature cache; the format is in data/features.py).

The config is the training config, the same overrides as the run that will train from the cache, plus ``cache.*``:
checks -> tokenized rows (the tokenized cache applies) -> the storage estimate, printed and checked against the free
disk space -> the target -> one forward per ``cache.batch_size`` rows (under the run's autocast for ``*-mixed``
precision, so the states are those training would compute) -> shards written into ``<output_dir>.incomplete``, the
manifest last, then renamed to ``output_dir``. An existing ``output_dir`` is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dflashtrain.config.checks import validate, validate_against_target
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import DataKind
from dflashtrain.data.datamodule import ChatCollator, ChatDataModule
from dflashtrain.data.features import FORMAT, MANIFEST, VERSION, encode_states, target_fingerprint
from dflashtrain.models.target import (
    DTYPES,
    FrozenTarget,
    drafter_geometry,
    load_target_config,
    load_tokenizer,
    resolve_mask_token_id,
)
from dflashtrain.objectives import build_objective

log = logging.getLogger(__name__)
INCOMPLETE_MARKER = "INCOMPLETE"  # inside <output_dir>.incomplete: ours to replace after an interruption
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return ""


def check_cache_config(cfg: DictConfig) -> Path:
    """cache.* values and the output directory, before any weight loads. -> the output directory."""
    cache = cfg.cache
    if cfg.data.kind != DataKind.chat:
        raise ConfigError("data.kind", "dflashtrain-cache reads conversations (data.kind=chat), not a feature cache")
    if cache.output_dir is None:
        raise ConfigError("cache.output_dir", "is required: the directory to write the feature cache to")
    for key in ("batch_size", "rows_per_shard"):
        if cache[key] < 1:
            raise ConfigError(f"cache.{key}", f"must be >= 1, got {cache[key]}")
    if cache.device not in ("auto", "cpu") and not cache.device.startswith("cuda"):
        raise ConfigError("cache.device", f"must be auto, cpu or cuda[:N]; got {cache.device!r}")
    out = Path(cache.output_dir)
    if out.exists():
        raise ConfigError("cache.output_dir", f"{out} exists; a feature cache is written to a new directory")
    partial = out.with_name(out.name + ".incomplete")
    if partial.exists() and not (partial / INCOMPLETE_MARKER).is_file():
        raise ConfigError("cache.output_dir", f"{partial} exists and is not an interrupted dflashtrain-cache run; "
                                              "move it away")
    return out


def estimate(num_tokens: int, num_rows: int, widths: Dict[str, int], itemsize: int) -> int:
    """Bytes of the shards: the states, input_ids (int32) and loss_mask (int8) of every token, and ~64 B per row."""
    return num_tokens * (sum(widths.values()) * itemsize + 5) + 64 * num_rows


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Check the config, then write the feature cache; returns its manifest."""
    validate(cfg)
    return write_cache(cfg)


def write_cache(cfg: DictConfig) -> Dict[str, Any]:
    """From a validated config: tokenize, estimate, run the target, write; returns the manifest."""
    out = check_cache_config(cfg)
    target_config = load_target_config(cfg.model.target.path)
    validate_against_target(cfg, target_config)
    tokenizer = load_tokenizer(cfg.model.target.path)
    mask_token_id = resolve_mask_token_id(cfg.model.drafter.mask_token_id, tokenizer, target_config.vocab_size)
    geometry = drafter_geometry(target_config, cfg.model.drafter, mask_token_id)
    objective = build_objective(OmegaConf.to_object(cfg.loss))
    final = objective.needs_teacher if cfg.cache.final_hidden is None else bool(cfg.cache.final_hidden)
    data = ChatDataModule.from_config(cfg.data, tokenizer, 2 * geometry.block_size, cfg.seed)
    data.setup()
    rows = data.train_set
    num_tokens = sum(len(ids) for ids in rows["input_ids"])
    hidden = target_config.hidden_size
    widths = {"tapped": hidden * len(geometry.target_layer_ids), **({"final_hidden": hidden} if final else {})}
    dtype = DTYPES[cfg.model.target.dtype.value]
    expected = estimate(num_tokens, len(rows), widths, torch.finfo(dtype).bits // 8)
    log.warning("feature cache: %d rows, %d tokens x (%d taps x %d%s) x %s ~ %s -> %s", len(rows), num_tokens,
                len(geometry.target_layer_ids), hidden, " + final hidden" if final else "",
                cfg.model.target.dtype.value, human_bytes(expected), out)
    parent = next(p for p in [out.resolve(), *out.resolve().parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < expected:
        raise ConfigError("cache.output_dir", f"the cache needs about {human_bytes(expected)}, {parent} has "
                                              f"{human_bytes(free)} free")

    partial = out.with_name(out.name + ".incomplete")
    shutil.rmtree(partial, ignore_errors=True)  # only ever an interrupted run of ours (checked above)
    partial.mkdir(parents=True)
    (partial / INCOMPLETE_MARKER).write_text("dflashtrain-cache is writing this directory\n")
    device = _device(cfg.cache.device)
    target = FrozenTarget.load(cfg.model.target.path, cfg.model.target.dtype.value, geometry.target_layer_ids)
    target.to(device)
    shards, feature_dtypes = write_shards(target, rows, data.collator(), widths, cfg.cache, partial, device,
                                         AUTOCAST.get(str(cfg.trainer.precision)))
    manifest = {
        "format": FORMAT, "version": VERSION, "target_path": os.path.abspath(cfg.model.target.path),
        "target_fingerprint": target_fingerprint(cfg.model.target.path), "hidden_size": hidden,
        "num_target_layers": target_config.num_hidden_layers, "vocab_size": target_config.vocab_size,
        "layer_ids": list(geometry.target_layer_ids), "target_dtype": cfg.model.target.dtype.value,
        "precision": str(cfg.trainer.precision), "feature_dtypes": feature_dtypes, "max_length": cfg.data.max_length,
        "final_hidden": final, "rows": len(rows), "tokens": num_tokens, "shards": shards,
        "bytes_estimate": expected, "data": {"path": data.summary.path, "summary": str(data.summary)},
    }
    manifest["bytes"] = sum(os.path.getsize(partial / name) for name in shards)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (partial / INCOMPLETE_MARKER).unlink()
    os.replace(partial, out)
    log.warning("feature cache written: %s in %d shards (%.2f x the estimate, %.0f B per token) -> %s",
                human_bytes(manifest["bytes"]), len(shards), manifest["bytes"] / max(expected, 1),
                manifest["bytes"] / max(num_tokens, 1), out)
    return manifest


@torch.no_grad()
def write_shards(target: FrozenTarget, rows, collate: ChatCollator, widths: Dict[str, int], cache: DictConfig,
                 directory: Path, device: torch.device, autocast_dtype) -> tuple:
    """Every row's states -> Arrow shards of ``cache.rows_per_shard`` rows. -> (shard names, column -> dtype name)."""
    from datasets import Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"row": Value("string"), "input_ids": List(Value("int32")), "loss_mask": List(Value("int8")),
                         "num_supervised": Value("int32"), **{name: Value("large_binary") for name in widths}})
    columns = ["row", "input_ids", "loss_mask", "index"]
    names, stored = [], {}
    bar = tqdm(total=len(rows), desc="caching features", unit="rows")
    for first in range(0, len(rows), cache.rows_per_shard):
        name = f"shard-{len(names):05d}.arrow"
        writer = ArrowWriter(features=features, path=str(directory / name), writer_batch_size=cache.batch_size)
        for start in range(first, min(first + cache.rows_per_shard, len(rows)), cache.batch_size):
            stop = min(start + cache.batch_size, first + cache.rows_per_shard, len(rows))
            batch_rows = rows.select_columns(columns).select(range(start, stop)).to_list()
            batch = collate(batch_rows)
            ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with context:
                states = target.states(ids, attention)
            tensors = {"tapped": states.tapped, "final_hidden": states.final_hidden}
            stored = stored or {key: str(tensors[key].dtype).removeprefix("torch.") for key in widths}
            for i, row in enumerate(batch_rows):
                n = len(row["input_ids"])
                writer.write({"row": row["row"], "input_ids": row["input_ids"], "loss_mask": row["loss_mask"],
                              "num_supervised": int(sum(row["loss_mask"])),
                              **{key: encode_states(tensors[key][i, :n]) for key in widths}})
            bar.update(stop - start)
        writer.finalize()
        names.append(name)
    bar.close()
    return names, stored
