"""Training checkpoints: finding them, reading their dflashtrain metadata, and rebuilding the drafter they hold.

A dflashtrain ``.ckpt`` is a Lightning checkpoint whose ``state_dict`` holds ``drafter.*`` (and, for families with
extra modules, ``heads.*``) and never the target, plus a ``dflashtrain`` entry (docs/architecture.md,
checkpoints): the drafter geometry, the family and its head options, the target's path, depth and vocabulary,
and the resolved config. Files are read with ``weights_only=True``: only tensors and plain values are unpickled.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from dflashtrain.config.errors import ConfigError
from dflashtrain.families import DraftingFamily, get_family
from dflashtrain.models.dflash import DrafterGeometry

# ckpt_path=latest: the most recently written last.ckpt of a run under the working directory: a single run's
# (outputs/train/<run>/) or a multirun's (multirun/<sweep dir>/<run>/, e.g. multirun/train/<time>/0_loss=dpace/).
LATEST_GLOBS = ("outputs/train/*/checkpoints/last.ckpt", "multirun/*/*/checkpoints/last.ckpt",
                "multirun/*/*/*/checkpoints/last.ckpt")
METADATA_KEY = "dflashtrain"


@dataclass
class LoadedDrafter:
    drafter: nn.Module  # in eval mode, fp32, on CPU
    heads: Optional[nn.Module]  # the family's extra modules (None: the family has none)
    family: DraftingFamily
    meta: Dict[str, Any]  # the checkpoint's dflashtrain metadata, plus global_step


def resolve_checkpoint(value: str, key: str = "ckpt_path") -> Path:
    """``latest`` -> the most recently modified ``last.ckpt`` of a run under the working directory (``LATEST_GLOBS``:
    outputs/train/<run>/ and multirun/<sweep dir>/<run>/); else the path."""
    if value == "latest":
        found = sorted((p for pattern in LATEST_GLOBS for p in Path.cwd().glob(pattern)),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(key, f"is 'latest' but no {LATEST_GLOBS[0]} (or multirun/…/checkpoints/last.ckpt) "
                                   f"exists under {Path.cwd()}; "
                                   "train first (make run) or give a path: ckpt_path=/path/to/last.ckpt")
        return found[-1]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(key, f"no checkpoint file at {value!r}")
    return path


def read_checkpoint(path: Path, key: str = "ckpt_path") -> Dict[str, Any]:
    """The whole checkpoint as a dict (tensors memory-mapped); ConfigError unless it is a dflashtrain checkpoint."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as error:  # not torch's zip format (a legacy save, a bare pickle): no mmap then
            if "mmap" not in str(error):
                raise
            with warnings.catch_warnings():  # "Detected pickle protocol": the refusal below says all there is
                warnings.simplefilter("ignore")
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # weights_only refused a global: unpickling it could run code
            raise ConfigError(key, f"refused {path}: it holds objects other than tensors and plain values (loading "
                                   "it could run code); a dflashtrain checkpoint never does") from None
        raise ConfigError(key, f"cannot read {path} as a dflashtrain checkpoint: not a torch checkpoint") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(key, f"cannot read {path} as a dflashtrain checkpoint: {reason}") from None
    meta = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "geometry" not in meta or "family" not in meta:
        raise ConfigError(key, f"{path} is not a dflashtrain training checkpoint (no '{METADATA_KEY}' metadata)")
    return checkpoint


def load_checkpoint(path: Path, key: str = "ckpt_path") -> LoadedDrafter:
    """A training .ckpt -> its drafter (and heads) in eval mode, fp32, on CPU."""
    checkpoint = read_checkpoint(path, key)
    meta = dict(checkpoint[METADATA_KEY], global_step=checkpoint.get("global_step"))
    family = get_family(meta["family"])
    state = checkpoint["state_dict"]
    drafter = family.build_drafter(DrafterGeometry(**meta["geometry"]), meta["head_options"])
    drafter.load_state_dict(_stripped(state, "drafter."), strict=True)
    heads = family.build_heads(meta["vocab_size"], meta["geometry"]["hidden_size"], meta["head_options"])
    if heads is not None:
        heads.load_state_dict(_stripped(state, "heads."), strict=True)
        heads.eval()
    return LoadedDrafter(drafter=drafter.eval(), heads=heads, family=family, meta=meta)


def _stripped(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
