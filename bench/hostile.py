"""Hostile inputs and faults against `dflashtrain`, `dflashtrain-eval` and `dflashtrain-export`, counted by outcome.

    python bench/hostile.py            # every case (in-process where the CLI path allows it, else a subprocess)
    python bench/hostile.py -k resume  # only cases whose name contains "resume"

Outcomes: **clean** (the expected exit status; on failure exactly one `dflashtrain:` line, last, no traceback),
**traceback**, **wrong** (another exit status, several or no error lines, an expected effect missing) and
**damaged** (a file that existed before the case changed or disappeared, or a pickle bomb went off). Each case runs
in a directory of its own; the files every case must leave alone (a finished run, an export, a models folder) are
fingerprinted around it. Single-threaded (OMP_NUM_THREADS=1, torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(tempfile.mkdtemp(prefix="dflashtrain-hostile-"))
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "eval.every_n_steps=0", "data.batch_size=4"]


@dataclass
class Case:
    name: str
    entry: str  # train | evaluate | export
    args: List[str]
    expect: int = 2
    key: str = ""  # the key the one error line must start with ("" = any)
    cwd: Optional[Path] = None
    check: Optional[Callable[[], str]] = None  # "" when the expected effect is there, else what is wrong
    runner: Optional[Callable[["Case", Path], tuple]] = None  # (exit status, stderr); default: in process


@dataclass
class Outcome:
    kind: str
    detail: str = ""


@dataclass
class World:
    """The files the cases read, and those no case may change."""

    data: Path = ROOT / "train.jsonl"
    run: Path = ROOT / "run"  # a finished 4-step decay run
    dspark_run: Path = ROOT / "dspark_run"
    export: Path = ROOT / "export"  # an export of run
    models: Path = ROOT / "models"  # somebody's folder of models
    bomb: Path = ROOT / "bomb.ckpt"
    bare_bomb: Path = ROOT / "bare.ckpt"
    marker: Path = ROOT / "EXPLODED"
    targets: Dict[str, Path] = field(default_factory=dict)

    @property
    def last(self) -> Path:
        return self.run / "checkpoints" / "last.ckpt"


class Bomb:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------- the world
def write_chats(path: Path, rows: int) -> None:
    lines = [{"messages": [{"role": "user", "content": f"Count up from {i} to {i + 20} ."},
                           {"role": "assistant", "content": " ".join(map(str, range(i, i + 21))) + " ."}]}
             for i in range(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def build_world() -> World:
    from transformers import BertConfig

    from dflashtrain.assets import TINY_TARGET_DIR

    world = World()
    write_chats(world.data, 32)
    write_chats(ROOT / "other.jsonl", 20)
    for name, args in (("run", []), ("dspark_run", ["loss=dspark"])):
        out = ROOT / name
        code, err = invoke("train", [f"data.path={world.data}", f"paths.output_dir={out}", f"hydra.run.dir={out}",
                                     "trainer.max_steps=4", "checkpoint.every_n_train_steps=2", "checkpoint.save_top_k=-1",
                                     *QUIET, *args], ROOT)
        assert code == 0, err
    code, err = invoke("export", [f"ckpt_path={world.last}", f"output_dir={world.export}"], ROOT)
    assert code == 0, err
    (world.models / "Qwen3-8B").mkdir(parents=True)
    (world.models / "Qwen3-8B" / "model.safetensors").write_bytes(b"somebody's weights")
    torch_save({"dflashtrain": {"geometry": {}, "family": "dflash"}, "payload": Bomb(world.marker)}, world.bomb)
    with open(world.bare_bomb, "wb") as handle:
        pickle.dump({"payload": Bomb(world.marker)}, handle, protocol=2)
    good = json.loads((TINY_TARGET_DIR / "config.json").read_text())
    for name in ("bert", "invalid_json", "list_json", "no_model_type", "no_weights", "missing_shard", "no_tokenizer",
                 "empty", "truncated_weights"):
        (ROOT / "targets" / name).mkdir(parents=True)
        world.targets[name] = ROOT / "targets" / name
    BertConfig().save_pretrained(world.targets["bert"])
    (world.targets["invalid_json"] / "config.json").write_text('{"model_type": "qwen3", ')
    (world.targets["list_json"] / "config.json").write_text("[]")
    (world.targets["no_model_type"] / "config.json").write_text(json.dumps({k: v for k, v in good.items()
                                                                            if k != "model_type"}))
    for name in ("no_weights", "missing_shard", "no_tokenizer", "truncated_weights"):
        (world.targets[name] / "config.json").write_text(json.dumps(good))
    for name in ("no_weights", "missing_shard", "truncated_weights"):
        for tokenizer_file in (p for p in TINY_TARGET_DIR.iterdir() if p.name not in ("model.safetensors",
                                                                                      "config.json")):
            shutil.copy(tokenizer_file, world.targets[name])
    (world.targets["missing_shard"] / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    (world.targets["no_tokenizer"] / "model.safetensors").write_bytes(b"")
    weights = (TINY_TARGET_DIR / "model.safetensors").read_bytes()
    (world.targets["truncated_weights"] / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    return world


def torch_save(obj, path: Path) -> None:
    import torch

    torch.save(obj, path)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def fingerprint(*roots: Path) -> Dict[str, str]:
    found = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".log")):
            if ".hydra" in path.parts or path.name == ".dflashtrain.lock":
                continue
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# ---------------------------------------------------------------------------------------------- running a case
def invoke(entry: str, args: List[str], cwd: Path) -> tuple:
    """A console script in process: (exit status, stderr). An exception that escapes is what a user would see as
    a traceback."""
    import dflashtrain.cli as cli

    previous = os.getcwd()
    os.chdir(cwd)
    sys.argv = [entry, *args]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            getattr(cli, entry)()
        return 0, stderr.getvalue()
    except SystemExit as exit_:
        return (exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)), stderr.getvalue()
    except BaseException as error:  # noqa: BLE001 - the point is to see it
        return None, stderr.getvalue() + f"\nTraceback: {type(error).__name__}: {error}"
    finally:
        os.chdir(previous)


def launch(entry: str, args: List[str], cwd: Path, preexec=None, env=None) -> tuple:
    command = [sys.executable, "-c", f"from dflashtrain.cli import {entry}; {entry}()", *args]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, timeout=900,
                            preexec_fn=preexec)
    return result.returncode, result.stderr


def judge(case: Case, code, stderr: str) -> Outcome:
    if code is None or "Traceback" in stderr:
        return Outcome("traceback", stderr.strip().splitlines()[-1] if stderr.strip() else "")
    lines = [line for line in stderr.splitlines() if line.startswith("dflashtrain: ")]
    if code != case.expect:
        return Outcome("wrong", f"exit {code}, expected {case.expect}: {lines[-1] if lines else stderr[-300:]}")
    if code > 0:  # a refusal or a stop: exactly one line, the last, naming the key
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if len(lines) != 1 or last != lines[0]:
            return Outcome("wrong", f"{len(lines)} dflashtrain lines: {lines}")
        body = lines[0].split(": ", 2)[2] if lines[0].count(": ") >= 2 else ""
        if not body.startswith(case.key):
            return Outcome("wrong", f"names another key than {case.key!r}: {lines[0]}")
    problem = case.check() if case.check else ""
    return Outcome("wrong", problem) if problem else Outcome("clean", lines[0] if lines else f"exit {code}")


def run_case(case: Case, world: World) -> Outcome:
    cwd = case.cwd or Path(tempfile.mkdtemp(dir=ROOT, prefix="case-"))
    protected = (world.run, world.dspark_run, world.export, world.models)
    before = fingerprint(*protected)
    started = time.perf_counter()
    code, stderr = case.runner(case, cwd) if case.runner else invoke(case.entry, case.args, cwd)
    outcome = judge(case, code, stderr)
    after = fingerprint(*protected)
    if after != before or world.marker.exists():
        changed = sorted(set(before) ^ set(after) | {p for p in before if before[p] != after.get(p)})
        outcome = Outcome("damaged", f"bomb went off" if world.marker.exists() else f"changed: {changed[:3]}")
        world.marker.unlink(missing_ok=True)
    outcome.detail = f"[{time.perf_counter() - started:5.1f} s] {outcome.detail}"
    return outcome


# ---------------------------------------------------------------------------------------------- the cases
def train_cases(world: World) -> List[Case]:
    base = [f"data.path={world.data}", *QUIET, "trainer.max_steps=2"]

    def bad(name: str, *args: str, key: str = "", expect: int = 2) -> Case:
        return Case(name, "train", [*base, *args], expect=expect, key=key)

    values = {
        "model.drafter.block_size": ["0", "1", "-3", "eight", "1.5"],
        "model.drafter.num_layers": ["0", "-1"],
        "model.drafter.num_taps": ["0", "99"],
        "model.drafter.target_layer_ids": ["[]", "[99,1,2]", "[-1,1,2]", "[1,1,1]", "[1,3,7]"],
        "model.drafter.mask_token_id": ["-1", "999999", "345"],
        "model.drafter.intermediate_size": ["0", "-5"],
        "model.drafter.logits_chunk_blocks": ["0"],
        "model.drafter.markov_rank": ["-1", "8"],
        "model.drafter.attention": ["fast", "flex"],
        "model.target.dtype": ["float64", "fp8", "bfloat16"],
        "data.max_length": ["0", "8", "1000000"],
        "data.num_anchors": ["0", "-1"],
        "data.batch_size": ["0", "-2", "1.5"],
        "data.num_workers": ["-1"],
        "data.pad_to_multiple_of": ["0", "-8"],
        "data.on_bad_row": ["ignore"],
        "data.shuffle": ["maybe"],
        "optim.lr": ["0", "-1", "nan", "inf", "fast"],
        "optim.weight_decay": ["-1", "nan"],
        "optim.betas": ["[0.9]", "[1.0,0.9]", "[0.9,nan]", "[-0.1,0.9]"],
        "optim.eps": ["0", "nan"],
        "optim.warmup_ratio": ["1.0", "-0.1", "nan"],
        "optim.min_lr_ratio": ["2", "nan"],
        "trainer.max_steps": ["0", "-5", "1.5"],
        "trainer.max_epochs": ["0", "-2"],
        "trainer.accelerator": ["tpu", "gpu", "mps"],
        "trainer.precision": ["bf16", "64-true", "bf16-true", "16-true", "64"],
        "trainer.gradient_clip_val": ["0", "-1", "nan", "inf"],
        "trainer.accumulate_grad_batches": ["0"],
        "trainer.log_every_n_steps": ["0"],
        "checkpoint.every_n_train_steps": ["0"],
        "checkpoint.save_top_k": ["-2"],
        "parallelism.devices": ["0", "[0]", "-1", "two"],
        "parallelism.num_nodes": ["0", "2"],
        "parallelism.sharding_strategy": ["FULL"],
        "seed": ["-1", "1099511627776"],
        "eval.every_n_steps": ["-1"],
        "eval.num_prompts": ["0"],
        "eval.max_new_tokens": ["0"],
        "loss.gamma": ["-1", "nan", "inf"],
        "loss.mask_mode": ["sometimes"],
        "loss.target": ["soft"],
    }
    cases = [bad(f"{key}={value}", f"{key}={value}", key=key.split("[")[0] if key != "model.target.dtype" else "")
             for key, options in values.items() for value in options]
    cases += [bad(f"loss=dpace {a}", "loss=dpace", a, key=a.split("=")[0])
              for a in ("loss.alpha=0", "loss.alpha=1.5", "loss.alpha=nan", "loss.mode=sometimes",
                        "loss.reduction=mean")]
    cases += [bad(f"loss=vp_drafter {a}", "loss=vp_drafter", a, key=a.split("=")[0])
              for a in ("loss.prefix_weight_base=0", "loss.prefix_weight_base=inf", "loss.prefix_weight_base=-1")]
    cases += [bad(f"loss=dspark {a}", "loss=dspark", *a.split(), key=a.split("=")[0])
              for a in ("loss.ce_alpha=-1", "loss.l1_alpha=nan", "loss.conf_alpha=inf",
                        "loss.ce_alpha=0 loss.l1_alpha=0", "model.drafter.markov_rank=0")]
    cases += [bad(name, *args, key=key) for name, args, key in [
        ("two taps listed, three asked for", ["model.drafter.target_layer_ids=[1,3]"], "model.drafter.num_taps"),
        ("unknown top-level key", ["+foo=1"], "foo"),
        ("unknown data key", ["data.bogus=1"], "data.bogus"),
        ("+ typo in data", ["+data.typo=1"], "data.typo"),
        ("+ typo in drafter", ["+model.drafter.typo=1"], "model.drafter.typo"),
        ("+ typo in loss", ["+loss.typo=1"], "loss.typo"),
        ("+ typo in optim", ["+optim.typo=1"], "optim.typo"),
        ("+ typo in trainer", ["+trainer.typo=1"], "trainer.typo"),
        ("nested _target_ in loss", ["+loss.foo._target_=builtins.print", "+loss.foo._args_=[X]"], "loss.foo"),
        ("a _target_ at the top", ["+_target_=os.system"], "_target_"),
        ("loss=plain", ["loss=plain"], "loss"),
        ("loss=null", ["loss=null"], "loss"),
        ("model=null", ["model=null"], "model"),
        ("data=nope", ["data=nope"], "data"),
        ("parallelism=nope", ["parallelism=nope"], "parallelism"),
        ("logger=wandb", ["logger=wandb"], "logger"),
        ("logger.name=wandb", ["logger.name=wandb"], "logger.name"),
        ("delete the target path", ["~model.target.path"], "model.target.path"),
        ("a malformed override", ["optim.lr=="], ""),
        ("fsdp on CPU", ["parallelism=fsdp", "trainer.accelerator=cpu"], "parallelism.strategy"),
        ("data.path missing", ["data.path=/nonexistent/train.jsonl"], "data.path"),
        ("data.path is a directory", [f"data.path={ROOT}"], "data.path"),
        ("data.path null", ["data.path=null"], "data.path"),
        ("data.eval_path missing", ["data.eval_path=/nonexistent.jsonl", "eval.every_n_steps=1"], "data.eval_path"),
        ("target path missing", ["model.target.path=/nonexistent"], "model.target.path"),
        ("target path is a file", [f"model.target.path={world.data}"], "model.target.path"),
    ]]
    cases += [bad(f"target dir: {name}", f"model.target.path={path}", key="model.target.path")
              for name, path in world.targets.items()]
    blocker = ROOT / "a_file"
    blocker.write_text("not a directory")
    cases += [bad("output dir under a file", f"paths.output_dir={blocker / 'out'}", key="paths.output_dir"),
              bad("hydra run dir under a file", f"hydra.run.dir={blocker / 'h'}", key="hydra.run.dir"),
              bad("output dir of a finished run", f"paths.output_dir={world.run}", key="paths.output_dir"),
              bad("hydra run dir of a finished run", f"hydra.run.dir={world.run}",
                  f"paths.output_dir={ROOT / 'elsewhere'}", key="hydra.run.dir")]
    return cases


def resume_cases(world: World) -> List[Case]:
    base = [f"data.path={world.data}", *QUIET]
    empty, jsonl, foreign, no_state = (ROOT / n for n in ("empty.ckpt", "rows.ckpt", "foreign.ckpt", "no_state.ckpt"))
    empty.write_bytes(b"")
    jsonl.write_bytes(world.data.read_bytes())
    import torch

    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    state = torch.load(world.last, map_location="cpu", weights_only=True)
    state.pop("optimizer_states")
    torch.save(state, no_state)

    def resume(name: str, path: Path, *args: str, key: str = "resume_from", expect: int = 2, out: str = "") -> Case:
        return Case(name, "train", [*base, "trainer.max_steps=6", f"resume_from={path}",
                                    f"paths.output_dir={out or ROOT / ('out-' + slug(name))}", *args],
                    expect=expect, key=key)

    return [
        resume("resume from a missing file", ROOT / "nope.ckpt"),
        resume("resume from a directory", ROOT),
        resume("resume from an empty file", empty),
        resume("resume from a JSONL file", jsonl),
        resume("resume from a pickle bomb", world.bomb),
        resume("resume from a bare pickle bomb", world.bare_bomb),
        resume("resume from a foreign checkpoint", foreign),
        resume("resume from weights without training state", no_state),
        resume("resume dspark as decay", world.dspark_run / "checkpoints" / "last.ckpt", key="loss"),
        resume("resume decay as dspark", world.last, "loss=dspark", key="loss"),
        resume("resume with another gamma", world.last, "loss.gamma=2", key="loss.gamma"),
        resume("resume with another batch size", world.last, "data.batch_size=2", key="data.batch_size"),
        resume("resume with another seed", world.last, "seed=3", key="seed"),
        resume("resume with another block size", world.last, "model.drafter.block_size=6",
               key="model.drafter.block_size"),
        resume("resume with other anchors", world.last, "data.num_anchors=4", key="data.num_anchors"),
        resume("resume with accumulation", world.last, "trainer.accumulate_grad_batches=2",
               key="trainer.accumulate_grad_batches"),
        resume("resume on other data", world.last, f"data.path={ROOT / 'other.jsonl'}", key="data.path"),
        resume("resume in place from an older step", world.run / "checkpoints" / "step0000002.ckpt",
               out=str(world.run)),
        Case("resume with a new lr (applied)", "train", [*base, "trainer.max_steps=5", f"resume_from={world.last}",
                                                         f"paths.output_dir={ROOT / 'out-new-lr'}", "optim.lr=1e-3"],
             expect=0),
        Case("resume_from=auto in a new directory", "train", [*base, "trainer.max_steps=2", "resume_from=auto",
                                                              f"paths.output_dir={ROOT / 'out-auto'}"], expect=0),
    ]


def eval_export_cases(world: World) -> List[Case]:
    garbage = ROOT / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    planted = ROOT / "planted"
    (planted / "outputs/train/x/checkpoints").mkdir(parents=True)
    shutil.copy(world.bomb, planted / "outputs/train/x/checkpoints/last.ckpt")
    nothing = ROOT / "nothing_here"
    nothing.mkdir()
    incomplete = ROOT / "drafter.incomplete"
    incomplete.mkdir()
    (incomplete / "keep.txt").write_text("not ours")
    dspark = world.dspark_run / "checkpoints" / "last.ckpt"
    short = ["num_prompts=2", "max_new_tokens=4", "baseline=false"]

    def ev(name: str, *args: str, key: str = "", expect: int = 2, cwd: Optional[Path] = None) -> Case:
        return Case(name, "evaluate", [*args, f"output_dir={ROOT / ('eval-' + slug(name))}"],
                    expect=expect, key=key, cwd=cwd)

    def ex(name: str, *args: str, key: str = "", expect: int = 2, cwd: Optional[Path] = None,
           check: Optional[Callable[[], str]] = None, setup: Optional[Callable[[], None]] = None) -> Case:
        if setup:
            setup()
        return Case(name, "export", list(args), expect=expect, key=key, cwd=cwd, check=check)

    def kept(path: Path, name: str) -> Callable[[], str]:
        return lambda: "" if (path / name).is_file() else f"{path / name} is gone"

    return [
        ev("eval ckpt missing", "ckpt_path=/nope.ckpt", key="ckpt_path"),
        ev("eval ckpt is a directory", f"ckpt_path={ROOT}", key="ckpt_path"),
        ev("eval ckpt is random bytes", f"ckpt_path={garbage}", key="ckpt_path"),
        ev("eval ckpt is a pickle bomb", f"ckpt_path={world.bomb}", key="ckpt_path"),
        ev("eval ckpt is a bare pickle bomb", f"ckpt_path={world.bare_bomb}", key="ckpt_path"),
        ev("eval latest, none there", key="ckpt_path", cwd=nothing),
        ev("eval latest finds a planted bomb", key="ckpt_path", cwd=planted),
        ev("eval vp_drafter bomb", f"ckpt_path={world.last}", f"vp_drafter={world.bomb}", key="vp_drafter"),
        ev("eval vp_drafter missing", f"ckpt_path={world.last}", "vp_drafter=/nope", key="vp_drafter"),
        ev("eval vp_drafter is a dspark drafter", f"ckpt_path={world.last}", f"vp_drafter={dspark}", *short,
           key="vp_drafter"),
        ev("eval vp_drafter with sampling", f"ckpt_path={world.last}", f"vp_drafter={world.last}",
           "temperature=0.5", key="temperature"),
        ev("eval d2sd_branches=0", f"ckpt_path={world.last}", f"vp_drafter={world.last}", "d2sd_branches=0",
           key="d2sd_branches"),
        ev("eval drafter_dir missing", "drafter_dir=/nope", "model.target.path=/nope", key="drafter_dir"),
        ev("eval drafter_dir without target", f"drafter_dir={world.export}", key="model.target.path"),
        ev("eval num_prompts=0", f"ckpt_path={world.last}", "num_prompts=0", key="num_prompts"),
        ev("eval num_prompts=-1", f"ckpt_path={world.last}", "num_prompts=-1", key="num_prompts"),
        ev("eval temperature=-1", f"ckpt_path={world.last}", "temperature=-1", key="temperature"),
        ev("eval max_new_tokens=0", f"ckpt_path={world.last}", "max_new_tokens=0", key="max_new_tokens"),
        ev("eval prompts missing", f"ckpt_path={world.last}", "data.eval_path=/nope.jsonl", key="data.eval_path"),
        ev("eval target missing", f"ckpt_path={world.last}", "model.target.path=/nope", key="model.target.path"),
        ev("eval unknown key", f"ckpt_path={world.last}", "bogus=1", key="bogus"),
        Case("eval output dir under a file", "evaluate", [f"ckpt_path={world.last}", *short,
                                                          f"output_dir={ROOT / 'a_file' / 'eval'}"], key="output_dir"),
        ev("eval device=tpu", f"ckpt_path={world.last}", "device=tpu", key="device"),
        ev("eval device=cuda:7", f"ckpt_path={world.last}", "device=cuda:7", key="device"),
        ev("eval prompts is a directory", f"ckpt_path={world.last}", f"data.eval_path={ROOT}", key="data.eval_path"),
        ev("eval a real checkpoint", f"ckpt_path={world.last}", *short, expect=0),
        ex("export ckpt missing", "ckpt_path=/nope.ckpt", f"output_dir={ROOT / 'x1'}", key="ckpt_path"),
        ex("export ckpt random bytes", f"ckpt_path={garbage}", f"output_dir={ROOT / 'x2'}", key="ckpt_path"),
        ex("export bare pickle bomb", f"ckpt_path={world.bare_bomb}", f"output_dir={ROOT / 'x3'}", key="ckpt_path"),
        ex("export pickle bomb", f"ckpt_path={world.bomb}", f"output_dir={ROOT / 'x4'}", key="ckpt_path"),
        ex("export latest, none there", key="ckpt_path", cwd=nothing),
        ex("export latest finds a planted bomb", key="ckpt_path", cwd=planted),
        ex("export over a models folder", f"ckpt_path={world.last}", f"output_dir={world.models}", "overwrite=true",
           key="output_dir", check=kept(world.models / "Qwen3-8B", "model.safetensors")),
        ex("export over its own checkpoints", f"ckpt_path={world.last}", f"output_dir={world.last.parent}",
           "overwrite=true", key="output_dir", check=kept(world.last.parent, "last.ckpt")),
        ex("export over a run directory", f"ckpt_path={world.last}", f"output_dir={world.run}", "overwrite=true",
           key="output_dir", check=kept(world.last.parent, "last.ckpt")),
        ex("export into a non-empty dir", f"ckpt_path={world.last}", f"output_dir={world.export}", key="output_dir"),
        ex("export onto a file", f"ckpt_path={world.last}", f"output_dir={ROOT / 'a_file'}", "overwrite=true",
           key="output_dir"),
        ex("export beside a foreign .incomplete", f"ckpt_path={world.last}", f"output_dir={ROOT / 'drafter'}",
           key="output_dir", check=kept(incomplete, "keep.txt")),
        ex("export beside a live export", f"ckpt_path={world.last}", f"output_dir={ROOT / 'busy'}", key="output_dir",
           setup=live_staging(ROOT / "busy.incomplete")),
        ex("export dtype=fp8", f"ckpt_path={world.last}", f"output_dir={ROOT / 'x5'}", "dtype=fp8", key="dtype"),
        ex("export target missing", f"ckpt_path={world.last}", f"output_dir={ROOT / 'x6'}", "target_path=/nope",
           key="target_path"),
        ex("export unknown key", f"ckpt_path={world.last}", "bogus=1", key="bogus"),
        ex("export a dspark checkpoint", f"ckpt_path={dspark}", f"output_dir={ROOT / 'x7'}", expect=0),
        ex("export twice into one new dir (2nd refused)", f"ckpt_path={world.last}", f"output_dir={ROOT / 'x7'}",
           key="output_dir"),
        ex("re-export over its own export", f"ckpt_path={dspark}", f"output_dir={ROOT / 'x7'}", "overwrite=true",
           "dtype=bfloat16", expect=0),
    ]


def live_staging(staging: Path) -> Callable[[], None]:
    """An export in progress: its staging directory, marked with a live process (this one)."""
    def make() -> None:
        import socket

        staging.mkdir(parents=True)
        (staging / ".dflashtrain-staging").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return make


def fault_cases(world: World) -> List[Case]:
    """Real processes: signals from outside, a full disk, a second live run, an export beside a live one."""
    base = [f"data.path={world.data}", *QUIET]
    cases = []
    for signame, code in (("SIGTERM", 143), ("SIGUSR1", 138), ("SIGINT", 130)):
        out = ROOT / f"signal-{signame}"
        cases.append(Case(f"{signame} from outside mid-run", "train",
                          [*base, f"paths.output_dir={out}", "trainer.max_steps=100000",
                           "checkpoint.every_n_train_steps=1"], expect=code, runner=signalled(signame, out),
                          check=lambda out=out: "" if loads(out / "checkpoints" / "last.ckpt") else "no last.ckpt"))
    out = ROOT / "sigterm-early"
    cases.append(Case("SIGTERM while the data is read", "train", [*base, f"paths.output_dir={out}"], expect=-15,
                      runner=signalled("SIGTERM", out, wait_for=None)))
    full = ROOT / "full-disk"
    cases.append(Case("full disk at the next checkpoint", "train",
                      [*base, f"paths.output_dir={full}", f"hydra.run.dir={full}", "trainer.max_steps=6",
                       "checkpoint.every_n_train_steps=1", f"resume_from={full / 'checkpoints' / 'last.ckpt'}"],
                      expect=5, key="checkpoint", runner=on_a_small_disk(world.run, full),
                      check=lambda: "" if all(loads(p) for p in (full / "checkpoints").glob("*.ckpt")) and not
                      list(full.rglob("*.partial-*")) else "a checkpoint does not load, or a partial file is left"))
    export_full = ROOT / "export-full"
    cases.append(Case("full disk during an export over a previous one", "export",
                      [f"ckpt_path={world.last}", f"output_dir={export_full / 'drafter'}", "overwrite=true"],
                      expect=5, key="output_dir", runner=on_a_small_disk(world.export, export_full / "drafter"),
                      check=lambda: "" if (export_full / "drafter" / "model.safetensors").is_file() else "export gone"))
    killed = ROOT / "killed"
    cases.append(Case("kill -9 mid-run, then resume_from=auto", "train",
                      [*base, f"paths.output_dir={killed}", "trainer.max_steps=6", "resume_from=auto"], expect=0,
                      runner=after_a_kill(base, killed),
                      check=lambda: "" if step(killed / "checkpoints" / "last.ckpt") == 6 else "not at step 6"))
    twice = ROOT / "twice"
    cases.append(Case("Ctrl-C twice", "train", [*base, f"paths.output_dir={twice}", "trainer.max_steps=100000",
                                                "checkpoint.every_n_train_steps=1"], expect=130, key="SIGINT",
                      runner=signalled("SIGINT", twice, repeat=True)))
    diverged = ROOT / "diverged"
    cases.append(Case("diverged at lr 1e30, then resume from last-good with a lower lr", "train",
                      [*base, f"paths.output_dir={diverged / 'again'}", "trainer.max_steps=30", "optim.lr=1e-3"],
                      expect=3, key="non-finite", runner=after_divergence(base, diverged)))  # its weights are huge
    no_last = ROOT / "no-last"
    cases.append(Case("save_last=false still saves the final step", "train",
                      [*base, f"paths.output_dir={no_last}", "trainer.max_steps=3", "checkpoint.save_last=false",
                       "checkpoint.every_n_train_steps=2"], expect=0, runner=in_a_subprocess,
                      check=lambda: "" if step(no_last / "checkpoints" / "step0000003.ckpt") == 3 else "no step 3"))
    epochs = ROOT / "one-epoch"
    cases.append(Case("max_epochs=1 ends with last.ckpt at the epoch's end", "train",
                      [*base, f"paths.output_dir={epochs}", "trainer.max_steps=100000", "trainer.max_epochs=1"],
                      expect=0, runner=in_a_subprocess,
                      check=lambda: "" if step(epochs / "checkpoints" / "last.ckpt") == 8 else "last.ckpt not step 8"))
    live = ROOT / "live"
    cases.append(Case("a second run on a live run's directory", "train",
                      [*base, f"paths.output_dir={live}", "trainer.max_steps=2"], key="paths.output_dir",
                      runner=beside_a_live_run(base, live)))
    return cases


def loads(path: Path) -> bool:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001
        return False


def step(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if path.is_file() else -1


def in_a_subprocess(case: Case, cwd: Path) -> tuple:
    return launch(case.entry, case.args, cwd)


def after_a_kill(base: List[str], out: Path):
    """kill -9 a run once it saved step 2, then run the case (which continues it)."""
    def run(case: Case, cwd: Path) -> tuple:
        first = subprocess.Popen([sys.executable, "-c", "from dflashtrain.cli import train; train()", *base,
                                  f"paths.output_dir={out}", "trainer.max_steps=6",
                                  "checkpoint.every_n_train_steps=2"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd=cwd)
        deadline = time.time() + 600
        while not (out / "checkpoints" / "step0000002.ckpt").exists() and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        first.kill()
        first.wait()
        return launch(case.entry, case.args, cwd)
    return run


def after_divergence(base: List[str], out: Path):
    """A run that diverges (exit 3, last-good checkpoint), then the case resumes from that checkpoint."""
    def run(case: Case, cwd: Path) -> tuple:
        code, stderr = launch("train", [*base, f"paths.output_dir={out}", "optim.lr=1e30", "trainer.max_steps=30",
                                        "trainer.gradient_clip_val=null"], cwd)
        good = sorted((out / "checkpoints").glob("last-good-step*.ckpt"))
        if code != 3 or not good:
            return code, stderr + "\nthe run meant to diverge did not"
        return launch(case.entry, [*case.args, f"resume_from={good[0]}"], cwd)
    return run


def signalled(signame: str, out: Path, wait_for: Optional[str] = "checkpoints/step0000001.ckpt", repeat=False):
    """Start the run, wait until ``wait_for`` exists (None: until it has started reading), then signal it (twice,
    50 ms apart, with ``repeat``)."""
    def run(case: Case, cwd: Path) -> tuple:
        command = [sys.executable, "-c", f"from dflashtrain.cli import {case.entry}; {case.entry}()", *case.args]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        environment.pop("HYDRA_FULL_ERROR", None)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                   env=environment)
        deadline = time.time() + 600
        target = out / wait_for if wait_for else out / ".dflashtrain.lock"
        while not target.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        process.send_signal(getattr(signal, signame))
        if repeat:
            time.sleep(0.05)
            process.send_signal(getattr(signal, signame))
        _, stderr = process.communicate(timeout=600)
        return process.returncode, stderr
    return run


def on_a_small_disk(source: Path, copy: Path):
    """Copy ``source`` to ``copy``, then run the case under a file-size limit of half its smallest big file."""
    def run(case: Case, cwd: Path) -> tuple:
        shutil.copytree(source, copy)
        size = min(p.stat().st_size for p in copy.rglob("*") if p.suffix in (".ckpt", ".safetensors"))

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
        return launch(case.entry, case.args, cwd, preexec=limit)
    return run


def beside_a_live_run(base: List[str], out: Path):
    def run(case: Case, cwd: Path) -> tuple:
        command = [sys.executable, "-c", "from dflashtrain.cli import train; train()", *base,
                   f"paths.output_dir={out}", "trainer.max_steps=100000", "checkpoint.every_n_train_steps=1"]
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
        deadline = time.time() + 600
        while not (out / "checkpoints" / "step0000001.ckpt").exists() and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        try:
            return launch(case.entry, case.args, cwd)
        finally:
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=600)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"building the world under {ROOT} ...", flush=True)
    world = build_world()
    cases = [c for c in train_cases(world) + resume_cases(world) + eval_export_cases(world) + fault_cases(world)
             if args.k in c.name]
    counts: Counter = Counter()
    for case in cases:
        outcome = run_case(case, world)
        counts[outcome.kind] += 1
        print(f"{outcome.kind:9s} {case.entry:8s} {case.name}: {outcome.detail}", flush=True)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{counts[k]} {k}" for k in ("clean", "traceback", "wrong",
                                                                          "damaged")))
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
