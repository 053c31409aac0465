"""Every command of the README's ```bash blocks, as a user types it, so the README cannot drift from the code.

Placeholders are replaced by what the test saves: ``/models/Qwen3-8B`` by a Qwen3-8B config.json (no weights: the
commands that need it are composed and validated, not run), ``/data/...`` by small chat files in those formats,
``<run>`` and ``<time>`` by the run and export this test made. One short training run (``make run`` with
``trainer.max_steps`` shortened) is shared by the commands that read a run: they run for real, with
``num_prompts``/``max_new_tokens`` shortened where they decode. Every other command is composed with its own
overrides and validated as the CLI validates it before any weight loads; GPU and multi-node commands are validated
without the checks of this machine's devices.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import OmegaConf

from dflashtrain import cli
from dflashtrain.assets import TINY_DIR, TINY_HELDOUT_JSONL, TINY_TARGET_DIR
from dflashtrain.config import checks
from dflashtrain.config.schema import register_configs

register_configs()
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TRAIN_JSONL = TINY_DIR / "data" / "train.jsonl"
SHORT_TRAIN = ["trainer.max_steps=4", "eval.every_n_steps=2", "eval.num_prompts=2", "eval.max_new_tokens=8"]
SHORT_DECODE = ["num_prompts=2", "max_new_tokens=8"]
ENTRIES = {"dflashtrain": "train", "dflashtrain-eval": "evaluate", "dflashtrain-export": "export",
           "dflashtrain-regen": "regen", "dflashtrain-cache": "cache", "dflashtrain-report": "report"}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# Commands run for real against the shared run (the rest are composed and validated). Keyed by the README's text.
RUN = {"dflashtrain-eval", "dflashtrain-eval ckpt_path=outputs/train/<run>/checkpoints/last.ckpt temperature=0.7",
       "dflashtrain-eval drafter_dir=outputs/export/<time>/drafter model.target.path=dflashtrain/assets/tiny/target",
       "dflashtrain-export",
       "dflashtrain-export ckpt_path=outputs/train/<run>/checkpoints/last.ckpt output_dir=/models/my-dflash "
       "dtype=bfloat16",
       "dflashtrain-report outputs/train/A outputs/train/B -o cmp"}
GPU = ("parallelism=fsdp ", "parallelism.devices=8")  # validated without this machine's device checks


def readme_commands() -> List[List[str]]:
    """The words of each command of every ```bash block: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


COMMANDS = readme_commands()


def substituted(words: List[str], names: Dict[str, str]) -> List[str]:
    pattern = re.compile("|".join(re.escape(key) for key in sorted(names, key=len, reverse=True)))
    return [pattern.sub(lambda match: names[match.group(0)], word) for word in words]


def write_inputs(root: Path) -> Dict[str, str]:
    """What the README's placeholders stand for, written under ``root`` (also the commands' working directory)."""
    rows = TRAIN_JSONL.read_text().splitlines()[:64]
    models = root / "models"
    (models / "Qwen3-8B").mkdir(parents=True)
    (models / "Qwen3-8B" / "config.json").write_text(json.dumps(QWEN3_8B))
    data = root / "data_root"
    for name in ("train.jsonl", "x.jsonl", "regenerated.jsonl", "nemotron/part-0.jsonl"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("\n".join(rows) + "\n")
    shutil.copy(TINY_HELDOUT_JSONL, data / "mt_bench.jsonl")
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in json.loads(row)["messages"]]} for row in rows]
    (data / "sharegpt.json").write_text(json.dumps(sharegpt))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([json.loads(row) for row in rows])
    for parquet in (data / "ultrachat/part-0.parquet", root / "data/ultrachat/data/train_sft-0.parquet"):
        parquet.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, parquet)
    for regenerated in ("data/ultrachat-qwen3", "data/regen"):  # dflashtrain-regen's output (composed only)
        (root / regenerated).mkdir(parents=True)
        (root / regenerated / "part-00000.jsonl").write_text("\n".join(rows) + "\n")
    for features in ("data/ultrachat-qwen3-features", "data/features"):  # dflashtrain-cache's (composed only)
        (root / features).mkdir(parents=True)
        (root / features / "manifest.json").write_text("{}")
    shutil.copy(Path(TINY_TARGET_DIR) / "chat_template.jinja", root / "qwen3_thinking.jinja")
    return {"/models/Qwen3-8B": str(models / "Qwen3-8B"), "/models/": f"{models}/", "/data/": f"{data}/",
            "dflashtrain/assets/tiny/target": str(TINY_TARGET_DIR)}


def console(entry: str, words: List[str], cwd: Path, monkeypatch) -> None:
    """A console script in process, as its entry point runs it; it must end with status 0."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [entry, *words])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        getattr(cli, ENTRIES[entry])()
    except SystemExit as stop:
        assert stop.code in (0, None), f"{entry} {shlex.join(words)} exited {stop.code}"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """`make run` (shortened) as a subprocess in a fresh directory: its console, its run directory."""
    root = tmp_path_factory.mktemp("readme")
    names = write_inputs(root)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([str(Path(sys.executable).with_name("dflashtrain")), *SHORT_TRAIN], cwd=root,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (run_dir,) = (root / "outputs/train").iterdir()
    names["<run>"] = run_dir.name
    return root, names, run_dir, result.stdout, result.stderr


def test_make_run_prints_each_line_once_a_step_bar_and_where_everything_went(session):
    root, _, run_dir, stdout, stderr = session
    console_text = stdout + stderr
    for line in ("Seed set to 0", "GPU available: False"):
        assert console_text.count(line) == 1, line  # Lightning's own handler would print it a second time
    assert "litlogger" not in console_text and "LeafSpec" not in console_text
    assert "Epoch" not in console_text and re.search(r"train: 100%.*\| 4/4 ", stderr), stderr[-2000:]
    assert "past_key_values" not in console_text  # val/tau decodes through the non-deprecated cache API
    relative = f"outputs/train/{run_dir.name}"
    expected = [f"run finished at step 4 in {relative}", f"last checkpoint  {relative}/checkpoints/last.ckpt",
                "final metrics    train/loss", f"dflashtrain-eval ckpt_path={relative}/checkpoints/last.ckpt",
                f"dflashtrain-export ckpt_path={relative}/checkpoints/last.ckpt output_dir={relative}/drafter",
                "tensorboard --logdir outputs"]
    for line in expected:
        assert stdout.count(line) == 1 and line in (run_dir / "train.log").read_text(), line
    assert "val/tau" in stdout.split("final metrics")[1].splitlines()[0]
    assert (run_dir / "checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(words)[:100] for words in COMMANDS])
def test_readme_command(words, session, monkeypatch, tmp_path):
    root, names, run_dir, _, _ = session
    command = " ".join(words)
    program, args = words[0], words[1:]
    if program == "make":
        makefile = (REPO / "Makefile").read_text()
        assert f"\n{args[0]}:" in makefile, command
        if args == ["run"]:  # what the shared session ran (shortened); see the test above
            assert "$(BIN)/dflashtrain $(ARGS)" in makefile
        return
    if program == "source":  # the venv `make install` creates
        assert args == [".venv/bin/activate"] and "VENV ?= .venv" in (REPO / "Makefile").read_text()
        return
    if program == "bash":  # the benchmark environment: a network install of the peer, never run by the tests
        script = (REPO / "bench/env.sh").read_text()
        assert args == ["bench/env.sh"] and "VENV=bench/.venv" in script and '--no-deps "specforge==0.2.0"' in script
        return
    if program == "bench/.venv/bin/python":  # bench/env.sh's interpreter; the script's command line under this one
        result = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:], "--help"], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0 and "--points" in result.stdout, result.stderr[-2000:]
        return
    assert program in ENTRIES, f"a README command the test does not know: {command}"
    if command in RUN:
        run_for_real(program, args, root, names, run_dir, monkeypatch)
        return
    validate_composed(program, substituted(args, names), root, tmp_path, command, monkeypatch)


def run_for_real(program, args, root, names, run_dir, monkeypatch) -> None:
    if "outputs/export/<time>/drafter" in " ".join(args) or program == "dflashtrain-export":
        ensure_export(root, names, monkeypatch)
        if program == "dflashtrain-export" and not args:  # that was it
            return
    words = substituted(args, names)
    if program == "dflashtrain-report":
        shutil.copytree(run_dir, root / "outputs/train/B", dirs_exist_ok=True)
        names.update({"outputs/train/A": f"outputs/train/{run_dir.name}"})
        words = substituted(args, names) + ["--num-prompts", "2", "--max-new-tokens", "8"]
    elif program == "dflashtrain-eval":
        words += SHORT_DECODE
    if program == "dflashtrain-export" and "output_dir=" in " ".join(words):
        target = Path(next(w for w in words if w.startswith("output_dir=")).split("=", 1)[1])
        shutil.rmtree(target, ignore_errors=True)
    console(program, words, root, monkeypatch)
    if program == "dflashtrain-export":
        exported = Path(next(w for w in words if w.startswith("output_dir=")).split("=", 1)[1])
        assert oct((exported / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    if program == "dflashtrain-eval":  # eval.log carries the τ summary
        newest = max((root / "outputs/eval").iterdir(), key=lambda p: p.stat().st_mtime)
        assert "tau = " in (newest / "eval.log").read_text()


def ensure_export(root: Path, names: Dict[str, str], monkeypatch) -> None:
    """`dflashtrain-export` with no argument, once: the export the README's drafter_dir example names."""
    if "<time>" in names:
        return
    console("dflashtrain-export", [], root, monkeypatch)
    (export_dir,) = (root / "outputs/export").iterdir()
    names["<time>"] = export_dir.name
    assert {oct(p.stat().st_mode & 0o777) for p in (export_dir / "drafter").iterdir()} == {"0o644"}
    assert oct((export_dir / "drafter").stat().st_mode & 0o777) == "0o755"


def validate_composed(program: str, words: List[str], root: Path, tmp_path: Path, command: str,
                      monkeypatch) -> None:
    """Compose the command's config with its own overrides and run the CLI's checks that need no weights."""
    monkeypatch.chdir(root)
    if any(marker in command + " " for marker in GPU):
        monkeypatch.setattr(checks, "validate_machine", lambda cfg: None)
        monkeypatch.setattr(checks, "uses_cuda", lambda accelerator: True)
    if program == "dflashtrain-report":  # the sweep the tiny_ablation command above writes its report in
        (sweep_dir,) = words
        recipe = compose_train(["--config-dir", "recipes", "--config-name", "tiny_ablation"], tmp_path,
                               with_hydra=True)
        assert recipe.hydra.sweep.dir == sweep_dir, command
        return
    if program == "dflashtrain-export":
        from dflashtrain.export.checkpoint import resolve_checkpoint

        with initialize_config_module("dflashtrain.conf", version_base=None):
            cfg = compose("export", overrides=words)
        assert resolve_checkpoint(cfg.ckpt_path).is_file() and cfg.output_dir.startswith(str(root)), command
        return
    if program == "dflashtrain-eval":
        from dflashtrain.inference.evaluate import validate_eval

        with initialize_config_module("dflashtrain.conf", version_base=None):
            cfg = compose("eval", overrides=[*words, f"output_dir={tmp_path}"])
        validate_eval(cfg)
        return
    if program in ("dflashtrain-regen", "dflashtrain-cache"):
        with initialize_config_module("dflashtrain.conf", version_base=None):
            extra = "paths.output_dir" if program == "dflashtrain-cache" else "output_dir"
            cfg = compose(program.split("-")[1], overrides=[*words, f"{extra}={tmp_path / 'out'}"])
        OmegaConf.resolve(cfg)
        if program == "dflashtrain-cache":
            checks.validate(cfg)
        return
    for overrides in sweep_points(words):
        cfg = compose_train(overrides, tmp_path)
        checks.validate(cfg)
        target = checks.load_target_config(cfg.model.target.path)
        checks.validate_against_target(cfg, target)


def sweep_points(words: List[str]) -> List[List[str]]:
    """``-m a=x,y b=z`` -> [[a=x, b=z], [a=y, b=z]]; without -m the overrides themselves."""
    if "-m" not in words:
        return [words]
    words = [w for w in words if w != "-m"]
    points = [[]]
    for word in words:
        key, _, value = word.partition("=")
        choices = [f"{key}={v}" for v in value.split(",")] if "," in value and "[" not in value else [word]
        points = [point + [choice] for point in points for choice in choices]
    return points


def compose_train(words: List[str], tmp_path: Path, with_hydra: bool = False):
    config_dir, config_name, overrides = None, "train", []
    iterator = iter(words)
    for word in iterator:
        if word == "--config-dir":
            config_dir = REPO / next(iterator)
        elif word == "--config-name":
            config_name = next(iterator)
        else:
            overrides.append(word)
    overrides.append(f"paths.output_dir={tmp_path / 'out'}")
    if config_dir is None:
        with initialize_config_module("dflashtrain.conf", version_base=None):
            return compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name, overrides=["hydra.searchpath=[pkg://dflashtrain.conf]", *overrides],
                       return_hydra_config=with_hydra)


RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("entry, config", [("dflashtrain", []), ("dflashtrain-eval", []), ("dflashtrain-export", []),
                                           *[("dflashtrain", ["--config-dir", str(REPO / "recipes"),
                                                              "--config-name", name]) for name in RECIPES]],
                         ids=["train", "eval", "export", *RECIPES])
def test_cfg_job_resolve_prints_the_run_directory_and_creates_nothing(entry, config, tmp_path, monkeypatch, capsys):
    """`--cfg job --resolve` (the command table): output directories resolve to where a run started now would
    write; a command that only prints claims no directory."""
    console(entry, [*config, "--cfg", "job", "--resolve"], tmp_path, monkeypatch)
    printed = OmegaConf.create(capsys.readouterr().out)
    output_dir = printed.paths.output_dir if entry == "dflashtrain" else printed.output_dir
    kind = {"dflashtrain": "train", "dflashtrain-eval": "eval", "dflashtrain-export": "export"}[entry]
    assert re.fullmatch(rf"outputs/{kind}/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d(/drafter)?", output_dir), output_dir
    assert list(tmp_path.iterdir()) == []
