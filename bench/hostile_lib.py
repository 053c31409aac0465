"""The harness of bench/hostile.py: the world the cases run in, running one case in process or in a subprocess,
judging its outcome, and the runners of the fault cases (signals from outside, kills, a small disk, a live run)."""


from __future__ import annotations

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
    (ROOT / "empty-dir").mkdir()
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
        outcome = Outcome("damaged", "bomb went off" if world.marker.exists() else f"changed: {changed[:3]}")
        world.marker.unlink(missing_ok=True)
    outcome.detail = f"[{time.perf_counter() - started:5.1f} s] {outcome.detail}"
    return outcome


def live_staging(staging: Path) -> Callable[[], None]:
    """An export in progress: its staging directory, marked with a live process (this one)."""
    def make() -> None:
        import socket

        staging.mkdir(parents=True)
        (staging / ".dflashtrain-staging").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return make


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
