"""Real τ of a run: greedy speculative decoding of held-out prompts with the run's last checkpoint.

The decoding is the `dflashtrain-eval` recipe itself (dflashtrain/inference/evaluate.py, docs/decoding.md), run with
``baseline=false`` and its result kept in ``<run dir>/report_tau/`` (eval.json and TensorBoard scalars ``eval/*``).
A later report reuses it while the checkpoint (path, size, modification time) and the settings are unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from dflashtrain.report.runs import Run, last_checkpoint

log = logging.getLogger(__name__)
TAU_DIR = "report_tau"
REQUEST_FILE = "request.json"


@dataclass
class Tau:
    value: Optional[float]  # mean over rounds of (accepted + 1); None when not measured (see note)
    prompts: int  # prompts decoded
    step: Optional[int]  # the checkpoint's global step
    note: Optional[str] = None  # why there is no value


def real_tau(run: Run, eval_path: Optional[str], num_prompts: int, max_new_tokens: int, device: str) -> Tau:
    """τ of the run's last checkpoint on the first ``num_prompts`` prompts of ``eval_path`` (each run's own
    data.eval_path when None). A run without a checkpoint or prompts gets a note instead of a value."""
    eval_path = eval_path or run.eval_path
    checkpoint = last_checkpoint(run.path)
    if checkpoint is None:
        return Tau(None, 0, None, "no checkpoint")
    if eval_path is None:
        return Tau(None, 0, None, "no held-out prompts (data.eval_path is null): give --eval-path")
    output = run.path / TAU_DIR
    stat = checkpoint.stat()
    request = {"ckpt_path": str(checkpoint.resolve()), "ckpt_size": stat.st_size, "ckpt_mtime": stat.st_mtime,
               "eval_path": str(Path(eval_path).resolve()), "num_prompts": num_prompts,
               "max_new_tokens": max_new_tokens, "device": device}
    report = _cached(output, request)
    if report is None:
        started = time.perf_counter()
        try:
            report = _decode(request, output)
        except Exception as error:  # noqa: BLE001 - one run's τ failing must not stop the report of the others
            from dflashtrain.cli import one_line, user_error

            reported = user_error(error)
            if reported is None:
                log.exception("τ of %s failed", run.path)
            return Tau(None, 0, None, "τ failed: " + one_line(reported if reported is not None else error))
        (output / REQUEST_FILE).write_text(json.dumps(request, indent=2) + "\n")
        log.info("τ %.3f: %s, step %s, %d prompts (%.1f s)", report["tau"], run.path, report.get("global_step"),
                 report["prompts"], time.perf_counter() - started)
    return Tau(float(report["tau"]), int(report["prompts"]), report.get("global_step"))


def _decode(request: Dict[str, Any], output: Path) -> Dict[str, Any]:
    from dflashtrain.config.schema import EvalConfig
    from dflashtrain.inference.evaluate import run as evaluate

    cfg = OmegaConf.structured(EvalConfig)
    cfg.merge_with({
        "ckpt_path": request["ckpt_path"], "data": {"eval_path": request["eval_path"]},
        "num_prompts": request["num_prompts"], "max_new_tokens": request["max_new_tokens"], "device": request["device"],
        "temperature": 0.0, "baseline": False, "output_dir": str(output),
    })
    with contextlib.redirect_stdout(io.StringIO()):  # its summary lines: the report prints its own table
        return evaluate(cfg)


def _cached(output: Path, request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    try:
        if json.loads((output / REQUEST_FILE).read_text()) == request:
            return json.loads((output / "eval.json").read_text())
    except (OSError, ValueError):
        pass
    return None
