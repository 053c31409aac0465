"""Rules against the machine a run starts on: the accelerator and devices it names exist, the precision fits the
target's dtype, and several nodes are asked for only under a launcher that starts them.

Lightning would find each of these out later, after the data is tokenized and the target loaded, as a traceback
(or, for ``num_nodes > 1`` without a launcher, by waiting forever for nodes that never come). Each raises
:class:`~dflashtrain.config.errors.ConfigError` naming the key. torch is imported only to ask what hardware exists.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from dflashtrain.config.errors import ConfigError

# "<n>-true" runs everything in one dtype, and the frozen target is not converted by Lightning: it must already be
# stored in that dtype (model.target.dtype). Mixed precisions autocast and take a target of any dtype.
TRUE_PRECISION_DTYPES = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16", "64-true": None}

# Launchers that start one process per node, and the variables by which each is seen.
LAUNCHERS = {
    "torchrun": ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    "srun (SLURM)": ("SLURM_NTASKS", "SLURM_PROCID"),
    "MPI": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "PMI": ("PMI_SIZE", "PMI_RANK"),
    "LSF": ("LSB_JOBID", "JSM_NAMESPACE_RANK"),
    "Lightning (one command per node)": ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"),
}


def check_precision(precision: str, target_dtype: str) -> None:
    dtype = TRUE_PRECISION_DTYPES.get(precision, "mixed")
    if dtype is None:
        raise ConfigError("trainer.precision", f"{precision} needs a float64 target, and model.target.dtype offers "
                                               "float32, bfloat16 or float16; use 32-true, bf16-mixed or 16-mixed")
    if dtype != "mixed" and dtype != target_dtype:
        raise ConfigError("trainer.precision", f"{precision} runs the drafter in {dtype} but model.target.dtype is "
                                               f"{target_dtype}: set model.target.dtype={dtype}, or use a mixed "
                                               "precision (bf16-mixed, 16-mixed), which takes a target of any dtype")


def uses_cuda(accelerator: str) -> bool:
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_accelerator(accelerator: str) -> None:
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", f"{accelerator} asked for, but no CUDA device is visible "
                                                 f"(torch {torch.__version__}); use auto or cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator", "mps asked for, but this machine has no MPS device; use auto or cpu")


def check_devices(devices: Any, accelerator: str) -> None:
    """Device ids and counts that exist on the accelerator the run will use."""
    if accelerator == "mps":
        return
    if not uses_cuda(accelerator):
        if not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
            raise ConfigError("parallelism.devices", f"on CPU it is a process count >= 1 (or auto), got "
                                                     f"{_shown(devices)}; device ids and -1 name GPUs")
        return
    import torch

    available = torch.cuda.device_count()
    ids = list(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else None
    if ids is not None and any(not 0 <= i < available for i in ids):
        raise ConfigError("parallelism.devices", f"{ids} names a GPU that does not exist: ids 0..{available - 1}")
    if isinstance(devices, int) and devices > available:
        raise ConfigError("parallelism.devices", f"{devices} GPUs asked for, {available} visible")


def _shown(devices: Any) -> str:
    return str(OmegaConf.to_container(devices)) if OmegaConf.is_config(devices) else repr(devices)


def launcher_of(environ: Mapping[str, str]) -> Optional[str]:
    for name, variables in LAUNCHERS.items():
        if all(v in environ for v in variables):
            return name
    return None


def check_nodes(num_nodes: int, devices: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Several nodes only under a launcher, with a process count that matches what it started."""
    if num_nodes == 1:
        return
    launcher = launcher_of(environ)
    if launcher is None:
        raise ConfigError("parallelism.num_nodes", f"is {num_nodes}, but no multi-node launcher is visible (no "
                                                   "torchrun, srun, MPI or LSF variables, nor MASTER_ADDR, "
                                                   "MASTER_PORT and NODE_RANK): start one process per node with "
                                                   "torchrun or srun; without one the run would wait forever for "
                                                   "the other nodes")
    nodes = environ.get("SLURM_NNODES") if launcher.startswith("srun") else None
    if nodes is not None and nodes.isdigit() and int(nodes) != num_nodes:
        raise ConfigError("parallelism.num_nodes", f"is {num_nodes}, but SLURM allocated {nodes} nodes")
    started = {"torchrun": "WORLD_SIZE", "srun (SLURM)": "SLURM_NTASKS"}.get(launcher)
    count = environ.get(started, "") if started else ""
    if count.isdigit() and isinstance(devices, int) and int(count) != num_nodes * devices:
        raise ConfigError("parallelism.num_nodes", f"{num_nodes} nodes x {devices} devices = "
                                                   f"{num_nodes * devices} processes, but the launcher started "
                                                   f"{started}={count} (one process per device)")


def validate_machine(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    check_precision(trainer.precision, str(getattr(cfg.model.target.dtype, "value", cfg.model.target.dtype)))
    check_accelerator(trainer.accelerator)
    check_devices(cfg.parallelism.devices, trainer.accelerator)
    check_nodes(cfg.parallelism.num_nodes, cfg.parallelism.devices)
    if str(getattr(cfg.model.drafter.attention, "value", cfg.model.drafter.attention)) == "flex" \
            and not uses_cuda(trainer.accelerator):
        raise ConfigError("model.drafter.attention", "flex has no backward pass on CPU; use auto (flex on CUDA, "
                                                     "SDPA elsewhere) or sdpa")
