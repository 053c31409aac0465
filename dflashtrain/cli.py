"""Console entry points. Each is a Hydra app over the configs shipped in the package (``dflashtrain.conf``).

An error the user must fix prints one line, ``dflashtrain: error: <key>: <what is allowed>``, without a traceback:
exit status 2 for a bad configuration (compose errors included) or a bad data row, 3 for a run stopped on a
non-finite loss, 4 for an export whose load-back check failed, 5 for a multirun in which some run did not complete
(its report has the run's row), 6 for an output that could not be written (disk full, read-only; what was written
before is intact). A run stopped by a signal prints one line naming its resumable checkpoint and exits 128 + the
signal (143 SIGTERM, 138 SIGUSR1, 130 SIGINT / Ctrl-C). Anything else is a bug and keeps its traceback (as does
everything with ``HYDRA_FULL_ERROR=1``). In a multirun a failed run does not end the sweep: its error is printed
(or logged with its traceback), its status.json records it, and the next job starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
from typing import Callable, Iterator, Optional

# Nothing may come from a hub, ever: make transformers and datasets fail fast instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import hydra  # noqa: E402
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from dflashtrain.config.checks import validate  # noqa: E402
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.schema import register_configs  # noqa: E402
from dflashtrain.data.rows import BadRowError  # noqa: E402  (light: importing it loads no torch)
from dflashtrain.export.atomic import OutputWriteError  # noqa: E402  (light too)
from dflashtrain.report.jobs import in_multirun, recorded_run  # noqa: E402  (light too)
from dflashtrain.train.outputs import (  # noqa: E402  (light too)
    dry_composition,
    forget_created_dirs,
    remove_created_dirs,
)

register_configs()

CONFIG_PATH = "pkg://dflashtrain.conf"
CONFIG_EXIT, DIVERGED_EXIT, EXPORT_CHECK_EXIT, SWEEP_FAILED_EXIT, WRITE_EXIT = 2, 3, 4, 5, 6
INTERRUPT_EXIT = 128 + signal.SIGINT


def raised_in_hydra(error: BaseException) -> bool:
    """A ValueError Hydra raises while composing (e.g. ``loss=null``) is a bad command line, not a bug."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and trace.tb_frame.f_globals.get("__name__", "").startswith("hydra.")


def exit_code(error: BaseException) -> Optional[int]:
    """2 config or data, 3 diverged, 4 export check, 6 write failed, 128 + signal stopped; None: a bug."""
    if isinstance(error, (ConfigError, BadRowError, ConfigCompositionException, OverrideParseException,
                          OmegaConfBaseException)) or (isinstance(error, ValueError) and raised_in_hydra(error)):
        return CONFIG_EXIT
    if isinstance(error, OutputWriteError):
        return WRITE_EXIT
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPT_EXIT
    modules = sys.modules  # these exist once training (or export) has started
    guards, export, stop = (modules.get(f"dflashtrain.{m}") for m in ("train.guards", "export.hf", "train.preemption"))
    if guards is not None and isinstance(error, guards.NonFiniteLossError):
        return DIVERGED_EXIT
    if export is not None and isinstance(error, export.ExportCheckError):
        return EXPORT_CHECK_EXIT
    if stop is not None and isinstance(error, stop.Preempted):
        return stop.exit_status(error.signum)
    if stop is not None and isinstance(error, stop.Interrupted):
        return INTERRUPT_EXIT
    return None


def user_error(error: BaseException) -> Optional[BaseException]:
    """The error itself or the first of its causes that is the user's to fix (Hydra wraps them), else None."""
    while error is not None:
        if exit_code(error) is not None:
            return error
        error = error.__cause__
    return None


def one_line(error: BaseException) -> str:
    """A Hydra, OmegaConf or dflashtrain error as one line that starts with the key."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; valid: {', '.join(error.options)}"
    if isinstance(error, KeyboardInterrupt):
        return "SIGINT: interrupted; every file already written is whole (nothing partial is left)"
    if isinstance(error, ValueError) and raised_in_hydra(error):
        group = next((arg.partition("=")[0] for arg in sys.argv[1:] if re.fullmatch(r"\w+=(null|None|)", arg)), "")
        return f"{group}: a config group takes an option name ({error})" if group else f"command line: {error}"
    cause = error.__cause__ if isinstance(error, ConfigCompositionException) else error
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(cause.msg).splitlines()[0])
        if message.startswith(f"{cause.full_key}: "):
            return message
        schema = getattr(cause, "object_type", None)
        if message.startswith("Key ") and dataclasses.is_dataclass(schema):
            fields = ", ".join(f.name for f in dataclasses.fields(schema) if not f.name.startswith("_"))
            message = f"unknown key; valid: {fields}"
        elif message.startswith("Key ") and schema is dict:  # a free-form mapping, e.g. data.chat_template_kwargs
            message = f"a new key of a mapping: add it with a leading +, as +{cause.full_key}=<value>"
        return f"{cause.full_key}: {message}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines)


@contextlib.contextmanager
def reported_errors(sweep_goes_on: bool = False) -> Iterator[None]:
    """A user error raised in the block prints one line and exits with its status; anything else propagates.

    With ``sweep_goes_on`` (a multirun job) nothing but a signal leaves the block: the line is printed, or a bug's
    traceback logged, and the sweep goes on to its next job. A signal (preemption, Ctrl-C) stops the whole sweep.
    """
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - re-raised unless it is the user's to fix (or a Ctrl-C)
        if isinstance(error, (SystemExit, GeneratorExit)):
            raise
        reported = user_error(error)
        stopped = reported is not None and exit_code(reported) > 128
        if sweep_goes_on and not stopped:
            if reported is None:
                logging.getLogger("dflashtrain").exception("this run failed; the sweep goes on")
            else:
                print(f"dflashtrain: error: {one_line(reported)} (this run failed; the sweep goes on)", file=sys.stderr)
            return
        if reported is None:
            raise
        code = exit_code(reported)
        print(f"dflashtrain: {'stopped' if stopped else 'error'}: {one_line(reported)}", file=sys.stderr)
        sys.exit(code)


def prints_only(argv: list) -> bool:
    """Whether Hydra will only print (``--cfg``, ``--info``, ``--help``, ``--hydra-help``) and run no job."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # a malformed flag: Hydra reports it itself
        return False
    return bool(args.cfg or args.info or args.help or args.hydra_help)


def console_entry(app: Callable[[], None]) -> Callable[[], None]:
    """Wrap a Hydra app so that a compose error is reported as one line too (the app reports its own errors).

    Hydra prints compose errors itself, over several lines; with ``HYDRA_FULL_ERROR=1`` it raises them instead.
    """

    def main() -> None:
        forget_created_dirs()
        try:
            with dry_composition() if prints_only(sys.argv[1:]) else contextlib.nullcontext():
                if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's full tracebacks
                    return app()
                os.environ["HYDRA_FULL_ERROR"] = "1"
                try:
                    with reported_errors():
                        app()
                finally:  # called again in the same process, it must behave the same
                    os.environ.pop("HYDRA_FULL_ERROR", None)
        except BaseException as error:  # a failed command leaves no empty run directory (train/outputs.py)
            if not (isinstance(error, SystemExit) and error.code in (0, None)):
                remove_created_dirs()
            raise
        finally:
            forget_created_dirs()

    main.__doc__ = app.__doc__
    return main


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> None:
    """`dflashtrain [overrides]`: train a drafter."""
    # Inside the app: Hydra would add its own line to an error that leaves it. status.json records how the run ends.
    with reported_errors(sweep_goes_on=in_multirun()), recorded_run(cfg.paths.output_dir):
        validate(cfg)  # a bad value fails here, before Lightning is even imported
        from dflashtrain.train.recipe import fit

        fit(cfg)


train = console_entry(_train)


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="eval")
def _evaluate(cfg: DictConfig) -> None:
    """`dflashtrain-eval [overrides]`: τ, acceptance and speedup of a trained drafter by speculative decoding."""
    with reported_errors():
        from dflashtrain.inference.evaluate import run

        run(cfg)


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="export")
def _export(cfg: DictConfig) -> None:
    """`dflashtrain-export [overrides]`: a training checkpoint -> the HF drafter directory, checked by load-back."""
    with reported_errors():
        from pathlib import Path

        from dflashtrain.export.checkpoint import resolve_checkpoint
        from dflashtrain.export.hf import export

        export(resolve_checkpoint(cfg.ckpt_path), Path(cfg.output_dir), cfg.target_path, cfg.dtype, cfg.overwrite)


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="regen")
def _regen(cfg: DictConfig) -> None:
    """`dflashtrain-regen [overrides]`: every assistant turn of a dataset regenerated by the target."""
    with reported_errors():
        from dflashtrain.inference.regen import run

        try:
            run(cfg)
        except KeyboardInterrupt:
            print(f"dflashtrain: interrupted: the shards written are kept; rerun the same command to resume "
                  f"({cfg.output_dir})", file=sys.stderr)
            sys.exit(130)


@hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="cache")
def _cache(cfg: DictConfig) -> None:
    """`dflashtrain-cache [overrides]`: the target's states for a training config's data, for data=cached."""
    with reported_errors():
        validate(cfg)  # a bad value fails here, before torch is imported
        from dflashtrain.train.cache import write_cache

        write_cache(cfg)


evaluate = console_entry(_evaluate)
export = console_entry(_export)
regen = console_entry(_regen)
cache = console_entry(_cache)


def report() -> None:
    """`dflashtrain-report DIR...`: compare runs: table (Markdown, CSV), plots, real τ (docs/report.md)."""
    with reported_errors():
        from dflashtrain.report.app import main

        main(sys.argv[1:])
