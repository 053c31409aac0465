"""A training run's own record of how it ended (``<run dir>/status.json``), and where its DDP ranks run in a sweep.

``status.json``, written by global rank 0 when the run starts (if its folder exists: Hydra makes a job's folder, a
``paths.output_dir`` elsewhere is made by the run once its checks pass) and again when it ends::

    {"status": "running" | "completed" | "failed" | "interrupted", "exit_code": 0 | 1 | 2 | 3 | ... | null,
     "error": "<one line>" | null, "started": "<ISO time>", "ended": "<ISO time>" | null, "wall_s": float | null,
     "pid": int, "host": str}

A run killed outright (SIGKILL, out of memory, a lost node) never writes its end and stays ``running``: the report
shows it as incomplete unless its process is still alive on this host. Exit codes are the CLI's (dflashtrain/cli.py):
2 a configuration or data error, 3 diverged, 1 anything else.

This module is imported by the training entry points, so it imports neither torch nor matplotlib.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

STATUS_FILE = "status.json"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
# Overrides Lightning's DDP launcher adds to a child's command line itself (and the one that makes a multirun).
CHILD_SET_BY_LIGHTNING = ("hydra.run.dir", "hydra.job.name", "hydra.output_subdir", "hydra.mode")
# What Lightning's launcher sets in the launching process's own environment. Left set, LOCAL_RANK tells the next
# job's launcher that the processes were started externally, and it waits forever for ranks it never starts.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_global_rank_zero() -> bool:
    """True unless a launcher (Lightning, torchrun, SLURM, jsrun) says this process is another rank."""
    return all(os.environ.get(name, "0") in ("0", "") for name in RANK_VARIABLES)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def read_status(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's status.json, or None if it has none (or an unreadable one)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and "status" in status else None


def write_status(run_dir: Path, status: Dict[str, Any]) -> None:
    """Atomically (a reader never sees half a file), into an existing run directory only: a run never creates its
    output folder before its checks pass, and one that cannot be written is left to the run's output check."""
    path = Path(run_dir) / STATUS_FILE
    if not path.parent.is_dir():
        return
    try:
        partial = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(status, indent=2) + "\n")
        partial.replace(path)
    except OSError:
        pass


def ending(error: BaseException) -> Dict[str, Any]:
    """How a run that raised ``error`` ended: status, exit code and one line."""
    from dflashtrain.cli import exit_code, one_line, user_error  # the CLI owns the codes; imported once training ran

    if isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt):
        return {"status": "interrupted", "exit_code": 130, "error": "interrupted (Ctrl-C)"}
    if type(error).__name__ == "SIGTERMException":  # Lightning's, on SIGTERM: a SystemExit without a code
        return {"status": "interrupted", "exit_code": 143, "error": "stopped by SIGTERM"}
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
        return {"status": "failed", "exit_code": code, "error": f"exited with status {code}"}
    reported = user_error(error)
    if reported is not None:
        return {"status": "failed", "exit_code": exit_code(reported), "error": one_line(reported)}
    lines = [line for line in str(error).splitlines() if line.strip()]
    return {"status": "failed", "exit_code": 1, "error": f"{type(error).__name__}: {lines[-1] if lines else ''}"}


@contextlib.contextmanager
def recorded_run(output_dir: str) -> Iterator[None]:
    """Record the run in ``<output_dir>/status.json``: running now; completed, failed or interrupted at the end.

    A run refused before it trained (a configuration error: the folder is another run's, a resume that would rewind
    it, ...) leaves the record of the run already in that folder as it was. Errors propagate unchanged. In a Hydra multirun job it also makes Lightning's DDP children run this
    job, in this job's folder (:func:`ddp_children_run_this_job`).
    """
    record = is_global_rank_zero()
    previous = read_status(Path(output_dir)) if record else None  # another run's record there, if any
    started = time.time()
    status: Dict[str, Any] = {"status": "running", "exit_code": None, "error": None, "started": _iso(started),
                              "ended": None, "wall_s": None, "pid": os.getpid(), "host": socket.gethostname()}
    if record:
        write_status(Path(output_dir), status)
    outcome: Dict[str, Any] = {"status": "completed", "exit_code": 0, "error": None}
    refused = False
    try:
        with ddp_children_run_this_job():
            yield
    except BaseException as error:
        outcome = ending(error)
        refused = getattr(error, "key", None) is not None  # a ConfigError: refused before anything was trained
        raise
    finally:
        ended = time.time()
        if record and refused and previous is not None:
            write_status(Path(output_dir), previous)
        elif record:
            write_status(Path(output_dir), {**status, **outcome, "ended": _iso(ended), "wall_s": ended - started})


@contextlib.contextmanager
def ddp_children_run_this_job() -> Iterator[None]:
    """In a multirun job, the child ranks Lightning launches for DDP train this job, in this job's folder.

    Lightning starts each child rank by re-running ``sys.argv`` (in a sweep: ``-m`` and every swept value) with
    ``hydra.run.dir`` set to the Hydra run dir (unused in a sweep). For the job's duration ``sys.argv`` is this job's
    own command line (its config, its overrides, no ``-m``) and the run dir is the job's folder, so a child neither
    re-runs the sweep nor writes elsewhere. Afterwards the process group is closed and the launcher's environment
    variables are restored, so the next job launches and forms its own ranks.
    """
    if not in_multirun():
        yield
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, read_write

    hydra_cfg = HydraConfig.get()
    # unresolved: resolving ${unique_dir:...} would claim (create) a run directory the sweep never uses
    saved_argv, saved_dir = sys.argv, OmegaConf.to_container(hydra_cfg.run, resolve=False)["dir"]
    saved_environment = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    sys.argv = [sys.argv[0], *job_command_line(hydra_cfg)]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = saved_dir
        distributed = sys.modules.get("torch.distributed")
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def job_command_line(hydra_cfg: Any) -> List[str]:
    """The arguments that compose this job's config in a single run: config dir and name, then its overrides."""
    arguments = []
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":  # --config-dir
            arguments.append(f"--config-dir={source.path}")
    arguments.append(f"--config-name={hydra_cfg.job.config_name}")
    arguments += list(hydra_cfg.overrides.task)
    arguments += [o for o in hydra_cfg.overrides.hydra if o.split("=", 1)[0].lstrip("+~") not in CHILD_SET_BY_LIGHTNING]
    return arguments


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")
