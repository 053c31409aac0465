"""Export a trained drafter to the DFlash Hugging Face directory (SPEC §1.1), then prove it by loading it back.

    <dir>/config.json        Qwen3 config of the drafter + "architectures": ["DFlashDraftModel"], "block_size",
                             "num_target_layers", "dflash_config": {"target_layer_ids", "mask_token_id"},
                             "tie_word_embeddings": false; vocab_size and max_position_embeddings of the target
    <dir>/model.safetensors  exactly the drafter's parameter names (fc, hidden_norm, norm, layers.*): no embedding,
                             no lm_head (the target's are used)

A DSpark checkpoint (next-token convention, SPEC §6) exports as "architectures": ["DSparkDraftModel"] with
"dspark_config" {markov_rank, confidence_head, label_offset}, the head tensors markov_head.{embed,proj}.weight and
confidence_head.{weight,bias} beside the drafter's, and modeling_dspark.py, a self-contained loader.

The directory is written under ``<dir>.incomplete`` and moved into place only after the load-back check passed:
tensors and names identical, dflash_config equal to the checkpoint's, and a fixed input giving bit-identical
outputs. A wrong ``target_layer_ids`` or ``mask_token_id`` is the classic reason a served drafter accepts ≈ nothing.
Also here: finding and loading checkpoints (a training ``.ckpt`` or an exported directory) for the eval recipe.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from dflashtrain.config import ConfigError
from dflashtrain.models.dflash import DFlashDrafter, DrafterGeometry
from dflashtrain.models.heads import (
    EXPORT_ARCHITECTURE,
    MODELING_FILE,
    check_exported_heads,
    export_config,
    export_tensors,
    heads_from_checkpoint,
    is_head_tensor,
)
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.target import DTYPES, load_target_config

log = logging.getLogger(__name__)

ARCHITECTURE = "DFlashDraftModel"
WEIGHTS_FILE = "model.safetensors"
LATEST_GLOB = "outputs/train/*/checkpoints/last.ckpt"


class ExportCheckError(RuntimeError):
    """The exported directory does not reproduce the checkpoint's drafter; nothing was left in place."""


# ---------------------------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(value: str, key: str = "ckpt_path") -> Path:
    """``latest`` -> the newest outputs/train/*/checkpoints/last.ckpt under the working directory; else the path."""
    if value == "latest":
        found = sorted(Path.cwd().glob(LATEST_GLOB), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(key, f"is 'latest' but no {LATEST_GLOB} exists under {Path.cwd()}; train first "
                                   "(make run) or give a path: ckpt_path=/path/to/last.ckpt")
        return found[-1]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(key, f"no checkpoint file at {value!r}")
    return path


def read_checkpoint(path: Path, key: str = "ckpt_path") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """-> (drafter state dict without the ``drafter.`` prefix, the ``dflashtrain`` metadata)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # a Lightning checkpoint (trusted, ours)
    meta = checkpoint.get("dflashtrain") if isinstance(checkpoint, dict) else None
    if not meta or "geometry" not in meta:
        raise ConfigError(key, f"{path} is not a dflashtrain training checkpoint (no 'dflashtrain' metadata)")
    state = {k.removeprefix("drafter."): v for k, v in checkpoint["state_dict"].items() if k.startswith("drafter.")}
    # DSpark: label_offset 1 and the Markov/confidence heads (None for a DFlash checkpoint).
    return state, dict(meta, global_step=checkpoint.get("global_step"), dspark_heads=heads_from_checkpoint(checkpoint))


def load_checkpoint(path: Path, key: str = "ckpt_path") -> Tuple[DFlashDrafter, Dict[str, Any]]:
    """A training .ckpt -> (drafter in eval mode, fp32, on CPU; its metadata)."""
    state, meta = read_checkpoint(path, key)
    drafter = DFlashDrafter(DrafterGeometry(**meta["geometry"]))
    drafter.load_state_dict(state, strict=True)
    return drafter.eval(), meta


# ---------------------------------------------------------------------------------------------- HF format
def hf_config(geometry: DrafterGeometry, num_target_layers: int, target_config: Any, dtype: str) -> Dict[str, Any]:
    """The drafter's config.json: Qwen3 fields of the drafter (depth = drafter layers) plus the DFlash fields."""
    num_layers = geometry.num_layers
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": getattr(target_config, "bos_token_id", None),
        "eos_token_id": getattr(target_config, "eos_token_id", None),
        "pad_token_id": getattr(target_config, "pad_token_id", None),
        "head_dim": geometry.head_dim,
        "hidden_act": "silu",
        "hidden_size": geometry.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": geometry.intermediate_size,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": target_config.max_position_embeddings,
        "max_window_layers": num_layers,
        "num_attention_heads": geometry.num_attention_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": geometry.num_key_value_heads,
        "rms_norm_eps": geometry.rms_norm_eps,
        # Both spellings: transformers < 5 reads rope_theta, >= 5 reads rope_parameters.
        "rope_theta": geometry.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": geometry.rope_theta},
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": target_config.vocab_size,
        "dtype": dtype,
        "torch_dtype": dtype,
        "block_size": geometry.block_size,
        "num_target_layers": num_target_layers,
        "dflash_config": {
            "target_layer_ids": list(geometry.target_layer_ids),
            "mask_token_id": geometry.mask_token_id,
        },
    }


def geometry_from_hf_config(config: Dict[str, Any]) -> DrafterGeometry:
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    return DrafterGeometry(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=float(rope_theta),
        target_layer_ids=list(config["dflash_config"]["target_layer_ids"]),
        block_size=config["block_size"],
        mask_token_id=config["dflash_config"]["mask_token_id"],
    )


def load_exported(directory: Path) -> Tuple[DFlashDrafter, Dict[str, Any]]:
    """An exported DFlash (or DSpark) directory -> (drafter in eval mode, in the stored dtype, on CPU; config.json).

    A DSpark directory's head tensors are left out here: :func:`dflashtrain.models.heads.heads_from_export`."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("architectures") not in ([ARCHITECTURE], [EXPORT_ARCHITECTURE]):
        raise ValueError(f"{directory}: architectures is {config.get('architectures')}, expected "
                         f"[{ARCHITECTURE!r}] or [{EXPORT_ARCHITECTURE!r}]")
    state = {k: v for k, v in load_file(str(directory / WEIGHTS_FILE)).items() if not is_head_tensor(k)}
    drafter = DFlashDrafter(geometry_from_hf_config(config)).to(next(iter(state.values())).dtype)
    drafter.load_state_dict(state, strict=True)
    return drafter.eval(), config


# ---------------------------------------------------------------------------------------------- the check
@torch.no_grad()
def reference_output(drafter: DFlashDrafter, seed: int = 0) -> torch.Tensor:
    """The drafter's training forward on a fixed random input: 2 blocks (anchors 3 and 9) over 16 context states."""
    g = drafter.geometry
    generator = torch.Generator().manual_seed(seed)
    dtype = drafter.fc.weight.dtype
    seq_len, block = 16, g.block_size
    tapped = torch.randn(1, seq_len, len(g.target_layer_ids) * g.hidden_size, generator=generator).to(dtype)
    embeds = torch.randn(1, 2 * block, g.hidden_size, generator=generator).to(dtype)
    anchors = torch.tensor([[3, 9]])
    positions = (anchors.unsqueeze(-1) + torch.arange(block)).view(1, -1)
    mask = AnchorAttentionMask.build(anchors, torch.ones_like(anchors, dtype=torch.bool), seq_len, block, False)
    return drafter(embeds, tapped, positions, mask)


def check_export(original: DFlashDrafter, directory: Path, meta: Dict[str, Any], vocab_size: int) -> None:
    """Load ``directory`` back and compare with ``original`` (already in the export dtype). Raises ExportCheckError."""
    loaded, config = load_exported(directory)
    problems = []
    heads = meta.get("dspark_heads")
    expected_names = set(original.state_dict()) | (set(export_tensors(heads)) if heads is not None else set())
    stored = load_file(str(directory / WEIGHTS_FILE))
    stored_names = set(stored)
    if stored_names != expected_names:
        problems.append(f"weight names differ: extra {sorted(stored_names - expected_names)}, "
                        f"missing {sorted(expected_names - stored_names)}")
    geometry = meta["geometry"]
    expected_fields = {
        "dflash_config.target_layer_ids": (config["dflash_config"].get("target_layer_ids"), geometry["target_layer_ids"]),
        "dflash_config.mask_token_id": (config["dflash_config"].get("mask_token_id"), geometry["mask_token_id"]),
        "block_size": (config.get("block_size"), geometry["block_size"]),
        "num_target_layers": (config.get("num_target_layers"), meta["num_target_layers"]),
        "num_hidden_layers": (config.get("num_hidden_layers"), geometry["num_layers"]),
        "vocab_size": (config.get("vocab_size"), vocab_size),
        "tie_word_embeddings": (config.get("tie_word_embeddings"), False),
    }
    problems += [f"{name} is {got!r}, checkpoint has {want!r}" for name, (got, want) in expected_fields.items()
                 if got != want]
    if meta.get("label_offset", 0) == 1:  # DSpark: config fields and head tensors
        problems += check_exported_heads(stored, config, heads, **meta["heads"])
    if asdict(loaded.geometry) != asdict(original.geometry):
        problems.append(f"geometry read back {asdict(loaded.geometry)} != {asdict(original.geometry)}")
    else:
        original_state = original.state_dict()
        changed = [n for n, t in loaded.state_dict().items() if not torch.equal(t, original_state[n])]
        if changed:
            problems.append(f"tensors differ after the round trip: {changed}")
        elif not torch.equal(reference_output(loaded), reference_output(original)):
            problems.append("the loaded drafter's output on a fixed input is not bit-identical to the checkpoint's")
    if problems:
        raise ExportCheckError(f"export check failed for {directory}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- the recipe
def export(ckpt_path: Path, output_dir: Path, target_path: str | None, dtype: str, overwrite: bool) -> Path:
    """Checkpoint -> verified DFlash directory at output_dir. Config errors are raised before anything is written."""
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError("output_dir", f"{output_dir} exists and is not empty; pick another or set overwrite=true")
    drafter, meta = load_checkpoint(ckpt_path)
    target_path = target_path or meta["target_path"]
    if not Path(target_path, "config.json").is_file():
        raise ConfigError("target_path", f"no target config.json at {target_path!r} (needed for vocab_size); "
                                         "pass target_path=/path/to/target")
    target_config = load_target_config(target_path)
    drafter = drafter.to(DTYPES[dtype])
    heads = meta["dspark_heads"] = meta["dspark_heads"].to(DTYPES[dtype]) if meta["dspark_heads"] else None

    staging = output_dir.with_name(output_dir.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        config = hf_config(drafter.geometry, meta["num_target_layers"], target_config, dtype)
        tensors = {name: t.detach().contiguous() for name, t in drafter.state_dict().items()}
        if meta.get("label_offset", 0) == 1:  # DSpark: heads, config fields and the loader that reads them
            config.update(export_config(**meta["heads"]))
            tensors.update(export_tensors(heads) if heads is not None else {})
            shutil.copy(MODELING_FILE, staging / MODELING_FILE.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        check_export(drafter, staging, meta, target_config.vocab_size)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    log.info("exported %s -> %s (%d tensors, %s, taps %s, mask token %d); load-back check passed",
             ckpt_path, output_dir, len(tensors), dtype, config["dflash_config"]["target_layer_ids"],
             config["dflash_config"]["mask_token_id"])
    return output_dir
