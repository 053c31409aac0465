"""Output directories: each belongs to one live run, and nothing already in one is overwritten or deleted.

* **Locks.** A run holds an exclusive ``flock`` on ``<dir>/.dflashtrain.lock`` (its output directory, and Hydra's
  run directory) for as long as it lives; a second run pointed at the same directory stops at start naming the
  holder. The kernel releases the lock when the holder dies, however it dies, so there are no stale locks.
* **Unique default directories.** ``${unique_dir:outputs/train/<time>}`` claims the directory with an atomic
  ``mkdir``; when another run claimed it in the same second, it takes ``<time>_1``, ``<time>_2``, … A command that
  only prints the config (``--cfg``, ``--info``, ``--help``) runs inside :func:`dry_composition` and claims nothing.
* **Hydra's own files.** :class:`RunDirGuard` (a Hydra callback) runs before Hydra writes ``.hydra/*.yaml``: in a
  directory that already holds a run it refuses, unless this launch resumes that run, whose files then go to
  ``.hydra/resume-<n>/`` beside the original ones.
* **A command that fails leaves nothing behind.** The directories a command created (a claimed run directory, an
  output directory that did not exist) are removed when it fails, if they hold nothing but its own bookkeeping
  (``.hydra/*.yaml``, ``<job>.log``, ``status.json``, the lock): never one holding a checkpoint, metrics, an export
  or another run's folder (a sweep's runs and their status.json stay for the report).
* **Another run's outputs.** :func:`claimed_output_dir` refuses a directory holding checkpoints, CSV metrics or
  TensorBoard events unless this run continues from one of its checkpoints.

Only the launcher's rank 0 locks and claims: the other ranks of the same run share its directories. Nothing here
imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write
from omegaconf.errors import OmegaConfBaseException

from dflashtrain.config.errors import ConfigError
from dflashtrain.export.atomic import remove_partials

LOCK_NAME = ".dflashtrain.lock"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# A run's outputs, relative to its output directory: a new run never writes beside them.
RUN_OUTPUTS = ("checkpoints/*.ckpt", "hpc_ckpt_*.ckpt", "csv/metrics.csv", "tensorboard/events.out.tfevents.*")

_held: Dict[str, int] = {}  # real path of a locked directory -> the open lock file descriptor
_dry = [False]  # inside dry_composition: directories are named, never created
_created: List[Path] = []  # directories this command created for its run (claimed, or locked where none was)
BOOKKEEPING = {LOCK_NAME, ".write_test", "status.json", ".hydra/config.yaml", ".hydra/hydra.yaml",
               ".hydra/overrides.yaml"}  # and <job name>.log: what a command writes before it produces anything


def launcher_rank() -> int:
    """This process's rank as the launcher (torchrun, srun, Lightning's own) set it; 0 for a single process."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


# ---------------------------------------------------------------------------------------------- locks
def lock_dir(directory: Path, key: str) -> bool:
    """Create ``directory`` and hold its lock for the life of this process. True if newly taken, False if this
    process holds it already. ConfigError naming ``key`` if it cannot be created or another live process holds it."""
    directory = Path(directory)
    try:
        existed = directory.is_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if not existed:
            _created.append(directory)
        real = os.path.realpath(directory)
        if real in _held or launcher_rank() != 0:
            return False
        fd = os.open(Path(real) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(key, f"cannot write to {directory}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(key, f"{directory} is in use by another live run ({holder}); two runs never share an "
                               "output directory: choose another one") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _held[real] = fd
    return True


def unlock_dir(directory: Path) -> None:
    """Release a lock this process holds (the lock file stays: deleting it would race with a new holder)."""
    fd = _held.pop(os.path.realpath(directory), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- run directories
def claim_dir(path: str) -> str:
    """The ``unique_dir`` resolver: ``path`` if this call creates it, else the first free ``path_<n>``. OmegaConf
    caches a resolver's value in the config (and in Hydra's copies of it), so a run claims once."""
    if launcher_rank() != 0 or _dry[0] or in_multirun():  # other ranks use rank 0's directory; a printed
        # config claims none; a sweep job runs in the sweep directory
        return path
    base = Path(path)
    try:
        _created.extend(reversed([p for p in base.parents if not p.is_dir()]))  # outermost first
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            candidate = base if n == 0 else base.with_name(f"{base.name}_{n}")
            try:
                candidate.mkdir()
                _created.append(candidate)
                break
            except FileExistsError:
                continue
    except OSError as error:
        raise ConfigError("hydra.run.dir", f"cannot create {base}: {error.strerror or error}") from None
    return str(candidate)


def in_multirun() -> bool:
    """Whether Hydra composes a multirun (hydra.run.dir is then unused: it must not be created)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def dry_composition() -> Iterator[None]:
    """A command that composes the config without running a job: default run directories are named, not made."""
    _dry[0] = True
    try:
        yield
    finally:
        _dry[0] = False


def in_dry_composition() -> bool:
    return _dry[0]


def holds_only_bookkeeping(directory: Path) -> bool:
    """Whether ``directory`` holds no file but what a command writes before it produces anything."""
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if path.is_dir() or relative in BOOKKEEPING or ("/" not in relative and relative.endswith(".log")):
            continue
        return False
    return True


def forget_created_dirs() -> None:
    _created.clear()


def remove_created_dirs() -> List[Path]:
    """After a failed command: remove the directories it created that hold only its bookkeeping; the removed ones."""
    removed = []
    for directory in reversed(_created):  # the innermost first
        if not (directory.is_dir() and holds_only_bookkeeping(directory)):
            continue
        unlock_dir(directory)
        entries = sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True)
        try:  # file by file, then rmdir: a directory something else wrote into meanwhile stays
            for path in entries:
                path.rmdir() if path.is_dir() else path.unlink()
            directory.rmdir()
            removed.append(directory)
        except OSError:
            pass
    _created.clear()
    return removed


def holds_run(directory: Path, subdir: str) -> bool:
    return (Path(directory) / subdir / "config.yaml").is_file()


class Refused(BaseException):
    """A refusal raised from a Hydra callback: Hydra turns a callback's Exception into a warning and goes on, so the
    ConfigError travels as the cause of this (the CLI reports the cause, one line, exit 2)."""


def refusing(method):
    def wrapped(self, config: DictConfig, **kwargs) -> None:
        try:
            method(self, config, **kwargs)
        except (ConfigError, OmegaConfBaseException) as error:
            raise Refused(str(error)) from error

    return wrapped


class RunDirGuard(Callback):
    """Hydra callback: refuse (or, when resuming that run, redirect) Hydra's files in a directory holding a run,
    and lock the run directory, all before Hydra writes anything there."""

    @refusing
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if launcher_rank() != 0:
            return
        run_dir = Path(str(config.hydra.run.dir))
        subdir = config.hydra.output_subdir
        if subdir is not None and holds_run(run_dir, subdir):
            if not resumes_into(config, run_dir):
                raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run ({subdir}/config.yaml); choose a "
                                                   "new hydra.run.dir, or resume that run with resume_from=<its "
                                                   "checkpoint>")
            n = next(n for n in itertools.count(1) if not holds_run(run_dir, f"{subdir}/resume-{n}"))
            with read_write(config.hydra):
                config.hydra.output_subdir = f"{subdir}/resume-{n}"
        lock_dir(run_dir, "hydra.run.dir")

    @refusing
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if launcher_rank() != 0:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir() and any(p.name != LOCK_NAME for p in sweep_dir.iterdir()):
            raise ConfigError("hydra.sweep.dir", f"{sweep_dir} already holds runs; choose a new hydra.sweep.dir")
        lock_dir(sweep_dir, "hydra.sweep.dir")


def resumes_into(config: DictConfig, run_dir: Path) -> bool:
    """Whether this launch continues the run in ``run_dir`` (resume_from=auto, or a checkpoint inside it)."""
    resume = config.get("resume_from")
    if resume is None:
        return False
    return resume == "auto" or Path(run_dir).resolve() in Path(resume).resolve().parents


# ---------------------------------------------------------------------------------------------- a run's outputs
def other_run_outputs(output_dir: Path) -> List[str]:
    return sorted(str(p.relative_to(output_dir)) for pattern in RUN_OUTPUTS for p in output_dir.glob(pattern))


@contextlib.contextmanager
def claimed_output_dir(output_dir: str, resume_from: Optional[Path]) -> Iterator[Path]:
    """Create and lock ``output_dir`` for the block, prove it writable, and refuse one holding another run's outputs
    unless this run continues from one of its checkpoints."""
    path = Path(output_dir)
    taken = lock_dir(path, "paths.output_dir")
    try:
        if launcher_rank() == 0:  # the other ranks of this run write nothing here
            check_run_outputs(path, resume_from)
        yield path
    finally:
        if taken:
            unlock_dir(path)


def check_run_outputs(path: Path, resume_from: Optional[Path]) -> None:
    try:
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
        (path / "checkpoints").mkdir(exist_ok=True)
    except OSError as error:
        raise ConfigError("paths.output_dir", f"cannot write to {path}: {error.strerror or error}") from None
    continuing = resume_from is not None and Path(resume_from).resolve().parent == (path / "checkpoints").resolve()
    found = other_run_outputs(path)
    if found and not continuing:
        shown = ", ".join(found[:3]) + (", …" if len(found) > 3 else "")
        raise ConfigError(
            "paths.output_dir",
            f"{path} already holds another run's outputs ({shown}); a new run never writes beside them: choose a "
            f"new paths.output_dir, or continue that run with resume_from={path / 'checkpoints'}/<name>.ckpt",
        )
    if continuing:
        remove_partials(path / "checkpoints")
