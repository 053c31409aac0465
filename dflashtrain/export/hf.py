"""Export a trained drafter to the Hugging Face directory the serving engines load (docs/export.md), then prove it
by loading it back.

    <dir>/config.json        Qwen3 config of the drafter + "architectures": [<the family's>], "block_size",
                             "num_target_layers", "dflash_config": {"target_layer_ids", "mask_token_id"},
                             "tie_word_embeddings": false, "is_causal": false; vocab_size and
                             max_position_embeddings of the target; a sliding window as "layer_types",
                             "sliding_window", "use_sliding_window" and dflash_config "use_swa"/"swa_window_size";
                             plus the family's fields (DSpark: "markov_rank", …; DFlash2: dflash_config entries)
    <dir>/model.safetensors  exactly the drafter's parameter names (fc, hidden_norm, norm, layers.*), plus the
                             family's head tensors; no embedding, no lm_head (the target's are used)
    <dir>/<family files>     e.g. DSpark's self-contained modeling_dspark.py

    <dir>/dflashtrain_export.json   the marker: its files, the checkpoint and step (export/directory.py)

The directory is written under ``<dir>.incomplete`` and moved into place only after the load-back check passed:
tensor names and values identical, every config field equal to the checkpoint's, and a fixed input giving
bit-identical outputs. A wrong ``target_layer_ids`` or ``mask_token_id`` is the classic reason a served drafter
accepts ≈ nothing. ``overwrite=true`` replaces only a previous export (recognised by its marker).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import DType
from dflashtrain.export.atomic import OutputWriteError
from dflashtrain.export.checkpoint import LoadedDrafter, load_checkpoint
from dflashtrain.export.directory import check_output_dir, make_staging, publish
from dflashtrain.families import DraftingFamily, family_for_architecture
from dflashtrain.models.dflash import DrafterGeometry
from dflashtrain.models.masks import AnchorAttentionMask
from dflashtrain.models.target import DTYPES, load_target_config

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


class ExportCheckError(RuntimeError):
    """The exported directory does not reproduce the checkpoint's drafter; nothing was left in place."""


# ---------------------------------------------------------------------------------------------- HF format
def hf_config(geometry: DrafterGeometry, num_target_layers: int, target_config: Any, dtype: str,
              family: DraftingFamily, head_options: Dict[str, Any]) -> Dict[str, Any]:
    """The drafter's config.json: Qwen3 fields of the drafter (depth = drafter layers), the DFlash fields, the
    sliding window in the fields both engines read, and what the family adds (its architecture name and fields;
    its ``dflash_config`` entries join the DFlash ones)."""
    num_layers = geometry.num_layers
    window = geometry.sliding_window
    family_fields = family.export_config(head_options)
    dflash_config = {
        "target_layer_ids": list(geometry.target_layer_ids),
        "mask_token_id": geometry.mask_token_id,
        **({"use_swa": True, "swa_window_size": window} if window is not None else {}),  # vLLM reads these first
        **family_fields.pop("dflash_config", {}),
    }
    return {
        "architectures": [family.architecture],
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
        "layer_types": ["full_attention" if window is None else "sliding_attention"] * num_layers,
        "max_position_embeddings": target_config.max_position_embeddings,
        "max_window_layers": num_layers,
        "num_attention_heads": geometry.num_attention_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": geometry.num_key_value_heads,
        "rms_norm_eps": geometry.rms_norm_eps,
        # Both spellings: transformers < 5 reads rope_theta, >= 5 reads rope_parameters.
        "rope_theta": geometry.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": geometry.rope_theta},
        "sliding_window": window,
        "use_sliding_window": window is not None,
        "is_causal": False,  # the block attends bidirectionally; engines make sliding layers causal without it
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": target_config.vocab_size,
        "dtype": dtype,
        "torch_dtype": dtype,
        "block_size": geometry.block_size,
        "num_target_layers": num_target_layers,
        "dflash_config": dflash_config,
        **family_fields,
    }


def geometry_from_hf_config(config: Dict[str, Any]) -> DrafterGeometry:
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    sliding = "sliding_attention" in (config.get("layer_types") or [])
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
        sliding_window=config["sliding_window"] if sliding else None,
    )


@dataclass
class ExportedDrafter:
    drafter: nn.Module  # eval mode, in the stored dtype, on CPU
    heads: Optional[nn.Module]
    family: DraftingFamily
    config: Dict[str, Any]  # config.json


def load_exported(directory: Path) -> ExportedDrafter:
    """An exported directory -> its drafter and heads (the family is read from ``architectures``)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    family = family_for_architecture((config.get("architectures") or [None])[0])
    tensors = load_file(str(directory / WEIGHTS_FILE))
    state = {k: v for k, v in tensors.items() if not family.is_head_tensor(k)}
    options = family.options_from_export(config)
    drafter = family.build_drafter(geometry_from_hf_config(config), options).to(next(iter(state.values())).dtype)
    drafter.load_state_dict(state, strict=True)
    heads = family.heads_from_export(tensors, config)
    return ExportedDrafter(drafter=drafter.eval(), heads=heads, family=family, config=config)


# ---------------------------------------------------------------------------------------------- the check
@torch.no_grad()
def reference_output(drafter: nn.Module, seed: int = 0) -> torch.Tensor:
    """The drafter's training forward on a fixed random input: 2 blocks (anchors 3 and 9) over 16 context states."""
    g = drafter.geometry
    generator = torch.Generator().manual_seed(seed)
    dtype = drafter.fc.weight.dtype
    seq_len, block = 16, g.block_size
    tapped = torch.randn(1, seq_len, len(g.target_layer_ids) * g.hidden_size, generator=generator).to(dtype)
    embeds = torch.randn(1, 2 * block, g.hidden_size, generator=generator).to(dtype)
    anchors = torch.tensor([[3, 9]])
    positions = (anchors.unsqueeze(-1) + torch.arange(block)).view(1, -1)
    mask = AnchorAttentionMask.build(anchors, torch.ones_like(anchors, dtype=torch.bool), seq_len, block, False,
                                     sliding_window=g.sliding_window)
    return drafter(embeds, tapped, positions, mask)


def check_export(original: LoadedDrafter, directory: Path, vocab_size: int) -> None:
    """Load ``directory`` back and compare it with the checkpoint it came from (``original``, already in the export
    dtype): config fields, head options, tensor names and values, and a fixed input's output. Raises
    ExportCheckError naming every difference."""
    family, meta = original.family, original.meta
    expected_tensors = {**original.drafter.state_dict(), **family.export_tensors(original.heads)}
    stored = load_file(str(directory / WEIGHTS_FILE))
    problems = []
    if set(stored) != set(expected_tensors):
        problems.append(f"weight names differ: extra {sorted(set(stored) - set(expected_tensors))}, "
                        f"missing {sorted(set(expected_tensors) - set(stored))}")
    config = json.loads((directory / "config.json").read_text())
    geometry = meta["geometry"]
    expected = {
        "architectures": [family.architecture],
        "dflash_config.target_layer_ids": geometry["target_layer_ids"],
        "dflash_config.mask_token_id": geometry["mask_token_id"],
        "block_size": geometry["block_size"],
        "num_target_layers": meta["num_target_layers"],
        "num_hidden_layers": geometry["num_layers"],
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "sliding_window": geometry.get("sliding_window"),
        "dflash_config.swa_window_size": geometry.get("sliding_window"),
        "is_causal": False,
    }
    for name, want in expected.items():
        got = config
        for part in name.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if got != want:
            problems.append(f"{name} is {got!r}, checkpoint has {want!r}")
    read_options = family.options_from_export(config)
    served = {k: v for k, v in meta["head_options"].items() if k not in family.training_options}
    if read_options != served:
        problems.append(f"{family.name} options read back {read_options} != the checkpoint's {served} "
                        f"(config.json {family.export_config(read_options)})")
    if problems:
        raise ExportCheckError(f"export check failed for {directory}: " + "; ".join(problems))
    loaded = load_exported(directory)
    if asdict(loaded.drafter.geometry) != asdict(original.drafter.geometry):
        problems.append(f"geometry read back {asdict(loaded.drafter.geometry)} != {asdict(original.drafter.geometry)}")
    else:
        loaded_tensors = {**loaded.drafter.state_dict(), **family.export_tensors(loaded.heads)}
        changed = sorted(n for n, t in loaded_tensors.items() if not torch.equal(t, expected_tensors[n]))
        if changed:
            problems.append(f"tensors differ after the round trip: {changed}")
        elif not torch.equal(reference_output(loaded.drafter), reference_output(original.drafter)):
            problems.append("the loaded drafter's output on a fixed input is not bit-identical to the checkpoint's")
    if problems:
        raise ExportCheckError(f"export check failed for {directory}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- the recipe
def export(ckpt_path: Path, output_dir: Path, target_path: Optional[str], dtype: str, overwrite: bool) -> Path:
    """Checkpoint -> verified drafter directory at output_dir. Config errors are raised before anything is written;
    only a previous export is ever replaced (export/directory.py)."""
    if str(getattr(dtype, "value", dtype)) not in DTYPES:
        raise ConfigError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
    dtype = DType(dtype).value
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    loaded = load_checkpoint(ckpt_path)
    meta = loaded.meta
    target_path = target_path or meta["target_path"]
    if not Path(target_path, "config.json").is_file():
        raise ConfigError("target_path", f"no target config.json at {target_path!r} (needed for vocab_size); "
                                         "pass target_path=/path/to/target")
    target_config = load_target_config(target_path)
    loaded.drafter = loaded.drafter.to(DTYPES[dtype])
    loaded.heads = loaded.heads.to(DTYPES[dtype]) if loaded.heads is not None else None
    family = loaded.family
    config = hf_config(loaded.drafter.geometry, meta["num_target_layers"], target_config, dtype, family,
                       meta["head_options"])

    staging = make_staging(output_dir)
    try:
        tensors = {name: t.detach().contiguous() for name, t in loaded.drafter.state_dict().items()}
        tensors.update(family.export_tensors(loaded.heads))
        write_files(staging, config, tensors, family)
        check_export(loaded, staging, target_config.vocab_size)
        provenance = {"checkpoint": str(Path(ckpt_path).resolve()), "global_step": meta.get("global_step"),
                      "dtype": dtype}
        publish(staging, output_dir, provenance)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s, %d tensors, %s, taps %s, mask token %d); load-back check passed",
             ckpt_path, output_dir, family.architecture, len(tensors), dtype,
             config["dflash_config"]["target_layer_ids"], config["dflash_config"]["mask_token_id"])
    return output_dir


def write_files(staging: Path, config: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                family: DraftingFamily) -> None:
    """config.json, model.safetensors and the family's files; a failed write (disk full, …) is one line."""
    try:
        for extra in family.export_files:
            shutil.copy(extra, staging / extra.name)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise OutputWriteError("output_dir", f"cannot write {staging}: {reason}; nothing was exported, the output "
                                             "directory is unchanged") from None
