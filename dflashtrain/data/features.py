"""Training from a feature cache (``data=cached``, written by ``dflashtrain-cache``; docs/data.md, feature cache).

A feature cache directory holds ``manifest.json`` and ``datasets`` Arrow shards (``shard-NNNNN.arrow``), one record
per sample: ``row`` (its ``file:N``), ``input_ids``, ``loss_mask``, ``tapped`` (the outputs of the tapped target
layers, ``[S, n·d]``) and, when the objective needs the target's distribution, ``final_hidden`` (``[S, d]``); the two
state columns are raw bytes of the stored dtype, rows major. The manifest records the target's identity (path and a
fingerprint of its config and weight files), layer ids, hidden size, dtype, precision, max length and the shards.

Training from it loads only the target's input embedding and LM head (:class:`CachedTarget`), and refuses a cache
whose manifest does not match the config, naming the mismatch, before any weight loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from dflashtrain.config.errors import ConfigError
from dflashtrain.models.target import DTYPES, TargetStates, load_target_config

FORMAT = "dflashtrain-features"
VERSION = 1
MANIFEST = "manifest.json"
STATE_COLUMNS = ("tapped", "final_hidden")
STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def target_fingerprint(path: str) -> str:
    """config.json, and every weight file's name, size and first and last 64 KiB (safetensors headers name every
    tensor; the tail differs between fine-tunes of one architecture)."""
    root = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update((root / "config.json").read_bytes())
    for weights in sorted([*root.glob("*.safetensors"), *root.glob("*.bin")]):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(65536))
            handle.seek(max(0, size - 65536))
            digest.update(handle.read(65536))
    return digest.hexdigest()


def read_manifest(directory: str) -> Dict[str, Any]:
    path = Path(directory, MANIFEST)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError("data.path", f"{directory} is not a feature cache written by dflashtrain-cache (no readable "
                                       f"{MANIFEST}: {getattr(error, 'strerror', None) or error})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError("data.path", f"{path} is not a dflashtrain-cache manifest (format {FORMAT} v{VERSION})")
    missing = [name for name in manifest.get("shards", []) if not Path(directory, name).is_file()]
    if missing or not manifest.get("shards"):
        raise ConfigError("data.path", f"the feature cache {directory} lacks shard {missing[0] if missing else 'files'}"
                                       "; write it again with dflashtrain-cache")
    manifest["directory"] = str(directory)
    return manifest


def check_manifest(manifest: Dict[str, Any], expected: Dict[str, Any]) -> None:
    """Each expected entry (manifest key -> (config key, value)) must match: one line naming the first mismatch."""
    for key, (config_key, value) in expected.items():
        if key == "final_hidden" and not manifest.get(key):
            raise ConfigError(config_key, f"the objective reads the target's distribution (its final hidden state), "
                                          f"which the feature cache {manifest['directory']} does not hold; write one "
                                          "with this loss (or cache.final_hidden=true)")
        if manifest.get(key) != value:
            raise ConfigError(config_key, f"is {value!r} but the feature cache {manifest['directory']} was written "
                                          f"with {key}={manifest.get(key)!r}; run dflashtrain-cache again for this "
                                          "config, or match it")


def expected_entries(cfg, layer_ids: List[int], needs_final: bool) -> Dict[str, Any]:
    """What a feature cache must record to train this config (manifest key -> (config key, value))."""
    path = cfg.model.target.path
    expected = {
        "target_fingerprint": ("model.target.path", target_fingerprint(path)),
        "layer_ids": ("model.drafter.target_layer_ids", list(layer_ids)),
        "target_dtype": ("model.target.dtype", str(getattr(cfg.model.target.dtype, "value", cfg.model.target.dtype))),
        "precision": ("trainer.precision", str(cfg.trainer.precision)),
        "max_length": ("data.max_length", int(cfg.data.max_length)),
    }
    if needs_final:
        expected["final_hidden"] = ("loss", True)  # KD and DSpark read the target's distribution
    return expected


def open_rows(directory: str, manifest: Dict[str, Any], min_supervised: int, summary):
    """The cache's samples as one memory-mapped Dataset; rows with fewer than ``min_supervised`` supervised tokens
    (a cache written for a smaller block) are dropped and counted."""
    from datasets import Dataset, concatenate_datasets

    shards = [Dataset.from_file(str(Path(directory, name))) for name in manifest["shards"]]
    dataset = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    summary.rows = len(dataset)
    keep = []
    for i, (where, supervised) in enumerate(zip(dataset["row"], dataset["num_supervised"])):
        if supervised >= min_supervised:
            keep.append(i)
        else:
            summary.drop("fewer than 2B supervised tokens", where)
    summary.kept = len(keep)
    summary.cache = f"feature cache {directory}"
    return dataset.select(keep) if len(keep) < len(dataset) else dataset


def decode_states(raw: bytes, length: int, width: int, dtype: torch.dtype) -> Tensor:
    """Stored bytes -> [length, width] of ``dtype``."""
    return torch.frombuffer(bytearray(raw), dtype=dtype).view(length, width)


def encode_states(states: Tensor) -> bytes:
    """[length, width] -> its bytes (bfloat16 through an int16 view: numpy has no bfloat16)."""
    states = states.detach().contiguous().cpu()
    if states.dtype == torch.bfloat16:
        states = states.view(torch.int16)
    return states.numpy().tobytes()


@dataclass
class FeatureLayout:
    """How to turn a record's state bytes back into tensors: column -> (width, dtype)."""

    widths: Dict[str, int]  # n·d for tapped, d for final_hidden
    dtypes: Dict[str, torch.dtype]

    @staticmethod
    def from_manifest(manifest: Dict[str, Any]) -> "FeatureLayout":
        hidden = manifest["hidden_size"]
        widths = {"tapped": hidden * len(manifest["layer_ids"])}
        if manifest["final_hidden"]:
            widths["final_hidden"] = hidden
        return FeatureLayout(widths, {k: STORED_DTYPES[manifest["feature_dtypes"][k]] for k in widths})


class CachedTarget:
    """The frozen target's embedding and LM head, and states read from the batch (a feature cache's records)."""

    def __init__(self, embed_tokens: nn.Module, lm_head: nn.Module, num_layers: int, layer_ids: List[int]):
        self.embed_tokens = embed_tokens.eval().requires_grad_(False)
        self.lm_head = lm_head.eval().requires_grad_(False)
        self.num_layers = num_layers
        self.layer_ids = list(layer_ids)

    @classmethod
    def load(cls, path: str, dtype: str, layer_ids: List[int]) -> "CachedTarget":
        """Only two tensors (one when tied) are read from the weight files; the rest of the model is never built."""
        from transformers import AutoModelForCausalLM

        config = load_target_config(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        names = {module: name for name, module in model.named_modules()}
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        wanted = {f"{names[embed]}.weight"}
        if head is not None and not getattr(config, "tie_word_embeddings", False):
            wanted |= {f"{names[head]}.{p}" for p, _ in head.named_parameters()}
        tensors = _read_tensors(Path(path), wanted)
        for module in (embed, head):
            prefix = names[module] + "."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if module is head and not state:  # tied: the head is the embedding
                state = {"weight": tensors[f"{names[embed]}.weight"]}
            module.to_empty(device="cpu")
            module.load_state_dict(state)
        return cls(embed, head, config.num_hidden_layers, layer_ids)

    def to(self, device) -> "CachedTarget":
        self.embed_tokens.to(device)
        self.lm_head.to(device)
        return self

    def batch_states(self, batch: Dict[str, Any]) -> TargetStates:
        return TargetStates(tapped=batch["tapped"], final_hidden=batch.get("final_hidden"))


def _read_tensors(root: Path, wanted: set) -> Dict[str, Tensor]:
    from safetensors import safe_open

    found: Dict[str, Tensor] = {}
    files = sorted(root.glob("*.safetensors"))
    for weights in files:
        with safe_open(str(weights), framework="pt") as handle:
            for name in wanted & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    if not files:  # PyTorch .bin checkpoints: loaded whole (weights_only), then only the wanted tensors are kept
        for weights in sorted(root.glob("*.bin")):
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            found.update({k: v for k, v in state.items() if k in wanted})
    missing = sorted(wanted - set(found))
    if missing:
        raise ConfigError("model.target.path", f"{root} has no tensor {missing[0]} in its weight files")
    return found
