"""A bad configuration is refused before any weight loads, as one line naming the key; no key goes unread.

The target here is a directory holding only ``config.json``: a run that got as far as loading weights (or even the
tokenizer) would crash with a traceback, so "exit 2, one line, no traceback" also proves nothing was loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import dflashtrain
from dflashtrain.cli import one_line, user_error
from dflashtrain.config.checks import check_target_files, load_target_config, validate, validate_against_target
from dflashtrain.config.errors import ConfigError
from dflashtrain.config.losses import LOSS_SCHEMAS
from dflashtrain.config.schema import TrainConfig, register_configs
from dflashtrain.objectives import build_objective, objective_class

register_configs()
CONF = Path(__file__).resolve().parents[1] / "conf"
CLI = [sys.executable, "-c", "from dflashtrain.cli import train; train()"]

# A Qwen3 config like the tiny target's: 8 layers (taps 0..6), vocab 384, eos 345, 512 positions. No weights.
TARGET_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 128, "intermediate_size": 384,
    "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 384, "max_position_embeddings": 512, "bos_token_id": 343, "eos_token_id": 345,
    "pad_token_id": 343, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
CHAT = {"messages": [{"role": "user", "content": "Count up from 1 to 3 ."},
                     {"role": "assistant", "content": "Counting up from 1 to 3 : 1 2 3 ."}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(target dir with config.json only, a chat JSONL, a regular file to put paths under)."""
    root = tmp_path_factory.mktemp("bad_config")
    (root / "target").mkdir()
    (root / "target" / "config.json").write_text(json.dumps(TARGET_CONFIG))
    (root / "train.jsonl").write_text(json.dumps(CHAT) + "\n")
    return root


def base_overrides(inputs: Path, output_dir: Path):
    return [f"model.target.path={inputs / 'target'}", f"data.path={inputs / 'train.jsonl'}",
            f"paths.output_dir={output_dir}"]


def compose_train(overrides):
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=list(overrides))


def checks_before_weights(cfg) -> None:
    """What `dflashtrain.train.recipe.run` checks before it reads a tokenizer or a weight (the files check aside:
    this target has no weights)."""
    validate(cfg)
    validate_against_target(cfg, load_target_config(cfg.model.target.path))


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """These cases run as a lone process would: no torchrun / SLURM / MPI variables."""
    from dflashtrain.config.machine import LAUNCHERS

    for name in {v for variables in LAUNCHERS.values() for v in variables} | {"SLURM_NNODES"}:
        monkeypatch.delenv(name, raising=False)


# (overrides, the key the error must name). Compose-time errors (strict schema, enums, unknown options) and
# validate-time errors (ranges, contradictions between groups and with the target's config.json).
CASES = [
    (["data.bogus=1"], "data.bogus"),  # unknown key in a group
    (["+foo=1"], "foo"),  # unknown top-level key (the root is open to +key)
    (["model.drafter.block_size=eight"], "model.drafter.block_size"),  # wrong type
    (["trainer.max_steps=1.5"], "trainer.max_steps"),
    (["loss=plain"], "loss"),  # unknown objective
    (["loss=dpace", "loss.mode=sometimes"], "loss.mode"),  # unknown mode name
    (["loss.mask_mode=sometimes"], "loss.mask_mode"),
    (["data.on_bad_row=ignore"], "data.on_bad_row"),
    (["model.target.path=???"], "model.target.path"),  # missing model path
    (["model.target.path=/nonexistent"], "model.target.path"),
    (["data.path=/nonexistent.jsonl"], "data.path"),  # missing data
    (["model.drafter.block_size=1"], "model.drafter.block_size"),  # block size < 2
    (["data.num_anchors=0"], "data.num_anchors"),  # num_anchors < 1
    (["loss=decay", "loss.gamma=-1"], "loss.gamma"),  # negative γ (decay's; the default D-PACE ignores γ)
    (["data.max_length=15"], "data.max_length"),  # < 2·B (B = 8)
    (["data.max_length=1024"], "data.max_length"),  # beyond the target's 512 positions
    (["parallelism=fsdp", "trainer.accelerator=cpu"], "parallelism.strategy"),  # fsdp on CPU
    (["model.drafter.markov_rank=8"], "model.drafter.markov_rank"),  # a DSpark head with a DFlash objective
    (["loss=dspark", "model.drafter.markov_rank=0"], "model.drafter.markov_rank"),  # confidence head without W1
    (["loss=dpace", "loss.alpha=0"], "loss.alpha"),
    (["loss=vp_drafter", "loss.prefix_weight_base=0"], "loss.prefix_weight_base"),
    (["+loss.typo=1"], "loss.typo"),  # a `+` key inside a typed group is still unknown
    (["+data.typo=1"], "data.typo"),
    (["+model.drafter.typo=1"], "model.drafter.typo"),
    (["+loss.foo._target_=builtins.print", "+loss.foo._args_=[X]"], "loss.foo"),  # nothing is instantiated from keys
    (["model.drafter.mask_token_id=999"], "model.drafter.mask_token_id"),  # beyond the vocabulary (384)
    (["model.drafter.mask_token_id=345"], "model.drafter.mask_token_id"),  # the target's eos token
    (["model.drafter.target_layer_ids=[1,3,7]"], "model.drafter.target_layer_ids"),  # the last layer (post-norm)
    (["model.drafter.target_layer_ids=[1,3,3]"], "model.drafter.target_layer_ids"),  # a layer twice
    (["model.drafter.target_layer_ids=[1,3]"], "model.drafter.num_taps"),  # 2 ids but num_taps 3
    (["model.drafter.num_taps=7"], "model.drafter.num_taps"),  # the tap formula repeats layers on 8 layers
    (["model.drafter.intermediate_size=0"], "model.drafter.intermediate_size"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["trainer.precision=bf16"], "trainer.precision"),
    (["trainer.accelerator=tpu"], "trainer.accelerator"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["checkpoint.every_n_train_steps=0"], "checkpoint.every_n_train_steps"),
    (["parallelism.sharding_strategy=FULL"], "parallelism.sharding_strategy"),
    (["parallelism.devices=0"], "parallelism.devices"),
    (["logger.name=wandb"], "logger.name"),
    (["seed=-1"], "seed"),
    (["resume_from=/nonexistent.ckpt"], "resume_from"),
    # values that used to pass and then crash after the target loaded
    (["model.target.dtype=bfloat16"], "trainer.precision"),  # 32-true runs the drafter in fp32 beside a bf16 target
    (["trainer.precision=bf16-true"], "trainer.precision"),  # ... and bf16-true in bf16 beside an fp32 one
    (["trainer.precision=16-true", "model.target.dtype=bfloat16"], "trainer.precision"),
    (["trainer.precision=64-true"], "trainer.precision"),  # no float64 target dtype exists
    (["model.drafter.attention=flex", "trainer.accelerator=cpu"], "model.drafter.attention"),  # no CPU backward
    (["parallelism.devices=[0]", "trainer.accelerator=cpu"], "parallelism.devices"),  # ids name GPUs
    (["parallelism.devices=-1", "trainer.accelerator=cpu"], "parallelism.devices"),
    (["parallelism.num_nodes=2"], "parallelism.num_nodes"),  # no launcher: would wait forever for node 2
    (["optim.lr=nan"], "optim.lr"),  # nan passes every comparison
    (["optim.lr=inf"], "optim.lr"),
    (["optim.betas=[0.9,nan]"], "optim.betas[1]"),
    (["optim.eps=nan"], "optim.eps"),
    (["trainer.gradient_clip_val=nan"], "trainer.gradient_clip_val"),
    (["loss.gamma=nan"], "loss.gamma"),
    (["loss=vp_drafter", "loss.prefix_weight_base=inf"], "loss.prefix_weight_base"),
    (["loss=dspark", "loss.l1_alpha=nan"], "loss.l1_alpha"),
    (["loss=dpace", "loss.alpha=nan"], "loss.alpha"),
]
CLI_CASES = {"data.bogus=1", "loss=plain", "model.drafter.block_size=1", "model.drafter.markov_rank=8",
             "model.drafter.mask_token_id=999", "optim.lr=nan", "parallelism.num_nodes=2"}  # one of each kind
# (compose, validate, target, numbers, launcher), through the real CLI


def case_id(case):
    return " ".join(case[0])


@pytest.mark.parametrize("overrides,key", CASES, ids=[case_id(c) for c in CASES])
def test_bad_value_is_refused_naming_the_key(inputs, tmp_path, overrides, key):
    """In-process: the error is a ConfigError (or a compose error) whose one-line form starts with the key."""
    with pytest.raises((ConfigError, ConfigCompositionException)) as info:
        checks_before_weights(compose_train([*base_overrides(inputs, tmp_path / "out"), *overrides]))
    line = one_line(user_error(info.value))
    assert line.startswith(key) and "\n" not in line, line
    if isinstance(info.value, ConfigError):
        assert info.value.key == key
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,key", [c for c in CASES if c[0][0] in CLI_CASES],
                         ids=[case_id(c) for c in CASES if c[0][0] in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(inputs, tmp_path, overrides, key):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([*CLI, *base_overrides(inputs, out), f"hydra.run.dir={tmp_path / 'hydra'}", *overrides],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dflashtrain: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"dflashtrain: error: {key}"), result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not out.exists()  # nothing written: no output dir, so no checkpoint


def test_hydra_full_error_shows_hydras_own_traceback(inputs, tmp_path, monkeypatch):
    import dflashtrain.cli as cli

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dflashtrain", *base_overrides(inputs, tmp_path / "out"), "data.bogus=1"])
    with pytest.raises(ConfigCompositionException, match="data.bogus"):  # raised, not reduced to one line
        cli.train()


def test_cli_refuses_a_null_config_group_in_one_line(inputs, tmp_path):
    """`loss=null` fails inside Hydra's composition with a ValueError: still one line naming the group, exit 2."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([*CLI, *base_overrides(inputs, tmp_path / "out"), f"hydra.run.dir={tmp_path / 'h'}",
                             "loss=null"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("dflashtrain: error: loss: a config group takes an option")


def test_hardware_that_is_not_there_is_refused(inputs, tmp_path, monkeypatch):
    """As on a machine without GPUs, and on one with two: accelerators, device ids and counts that do not exist."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for overrides, key in [(["trainer.accelerator=gpu"], "trainer.accelerator"),
                           (["trainer.accelerator=cuda"], "trainer.accelerator"),
                           (["trainer.accelerator=mps"], "trainer.accelerator"),
                           (["parallelism.devices=[0]"], "parallelism.devices"),
                           (["model.drafter.attention=flex"], "model.drafter.attention")]:
        with pytest.raises(ConfigError) as info:
            validate(compose_train([*base_overrides(inputs, tmp_path), *overrides]))
        assert info.value.key == key, (overrides, info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices in ("[0,2]", "3"):
        with pytest.raises(ConfigError, match="^parallelism.devices"):
            validate(compose_train([*base_overrides(inputs, tmp_path), "trainer.accelerator=gpu", "parallelism=ddp",
                                    f"parallelism.devices={devices}", "trainer.precision=bf16-mixed"]))
    validate(compose_train([*base_overrides(inputs, tmp_path), "trainer.accelerator=gpu", "parallelism=ddp",
                            "parallelism.devices=[0,1]", "model.drafter.attention=flex"]))


def test_several_nodes_need_a_launcher_that_started_them(inputs, tmp_path, monkeypatch):
    from dflashtrain.config.machine import check_nodes

    with pytest.raises(ConfigError, match="no multi-node launcher"):
        check_nodes(2, 8, environ={})
    check_nodes(2, 8, environ={"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16"})  # torchrun, 2 x 8
    with pytest.raises(ConfigError, match="WORLD_SIZE=8"):
        check_nodes(2, 8, environ={"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8"})
    check_nodes(2, 4, environ={"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_NNODES": "2"})  # srun
    with pytest.raises(ConfigError, match="SLURM allocated 1 nodes"):
        check_nodes(2, 4, environ={"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_NNODES": "1"})
    check_nodes(2, 1, environ={"MASTER_ADDR": "head", "MASTER_PORT": "29500", "NODE_RANK": "1"})  # one command/node


@pytest.fixture(scope="module")
def target_dirs(tmp_path_factory):
    """Directories that are not a usable target, each for one reason."""
    from transformers import BertConfig

    root = tmp_path_factory.mktemp("targets")
    good = dict(TARGET_CONFIG)
    dirs = {name: root / name for name in ("bert", "invalid_json", "a_list", "no_model_type", "no_weights",
                                            "missing_shard", "no_tokenizer")}
    for path in dirs.values():
        path.mkdir()
    BertConfig().save_pretrained(dirs["bert"])
    (dirs["invalid_json"] / "config.json").write_text('{"model_type": "qwen3",')
    (dirs["a_list"] / "config.json").write_text("[1, 2]")
    (dirs["no_model_type"] / "config.json").write_text(json.dumps({k: v for k, v in good.items() if k != "model_type"}))
    for name in ("no_weights", "missing_shard", "no_tokenizer"):
        (dirs[name] / "config.json").write_text(json.dumps(good))
    (dirs["no_weights"] / "tokenizer.json").write_text("{}")
    (dirs["missing_shard"] / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    (dirs["no_tokenizer"] / "model.safetensors").write_bytes(b"")
    return dirs


@pytest.mark.parametrize("name,reason", [("bert", "holds a bert model"), ("invalid_json", "not valid JSON"),
                                         ("a_list", "no model_type"), ("no_model_type", "no model_type"),
                                         ("no_weights", "has no weights"), ("missing_shard", "shards that are missing"),
                                         ("no_tokenizer", "has no tokenizer")])
def test_a_target_directory_that_cannot_work_is_refused_before_loading(target_dirs, name, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        load_target_config(str(target_dirs[name]))
        check_target_files(str(target_dirs[name]))
    assert info.value.key == "model.target.path" and "\n" not in str(info.value)


def test_cli_refuses_a_bert_target_in_one_line(inputs, target_dirs, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([*CLI, *base_overrides(inputs, tmp_path / "out"), f"hydra.run.dir={tmp_path / 'h'}",
                             f"model.target.path={target_dirs['bert']}"], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("dflashtrain: error: model.target.path: ")
    assert "bert" in result.stderr.strip().splitlines()[-1]


def test_valid_base_passes_the_checks(inputs, tmp_path):
    """The base every case starts from is itself valid, for each objective (so each case fails for its reason)."""
    for loss in LOSS_SCHEMAS:
        checks_before_weights(compose_train([*base_overrides(inputs, tmp_path), f"loss={loss}"]))


# ------------------------------------------------------------------------------------ no key goes unread
def test_every_loss_schema_field_is_a_constructor_argument():
    """build_objective passes every schema field to the objective class: a field the class stopped taking fails the
    build, and a constructor argument without a field would be a second default (not allowed: no defaults)."""
    for name, schema in LOSS_SCHEMAS.items():
        objective = objective_class(schema)
        signature = inspect.signature(objective.__init__)
        parameters = set(signature.parameters) - {"self"}
        fields = {f.name for f in dataclasses.fields(schema)}
        assert fields == parameters, f"loss={name}: schema {sorted(fields)} vs {objective.__name__}{sorted(parameters)}"
        defaults = [p for p in parameters if signature.parameters[p].default is not inspect.Parameter.empty]
        assert not defaults, f"{objective.__name__} has defaults of its own for {defaults}: the schema holds them"
        assert objective.name == name


def test_every_loss_file_is_typed_by_its_schema(inputs, tmp_path):
    files = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
    assert files == sorted(LOSS_SCHEMAS)
    for name in files:
        cfg = compose_train([*base_overrides(inputs, tmp_path), f"loss={name}"])
        assert OmegaConf.get_type(cfg.loss) is LOSS_SCHEMAS[name]
        objective = build_objective(OmegaConf.to_object(cfg.loss))
        assert type(objective) is objective_class(LOSS_SCHEMAS[name]) and objective.name == name


def test_a_stale_schema_field_fails_the_build():
    """The mechanism the two tests above rely on: a field the objective does not take is an error."""
    stale_schema = dataclasses.make_dataclass("Stale", [("prefix_weight_base", float, 0.9)],
                                              bases=(LOSS_SCHEMAS["decay"],))
    with pytest.raises(TypeError, match="prefix_weight_base"):
        build_objective(stale_schema(gamma=4.0))


def schema_leaves(cls, prefix=()):
    """Every leaf key of a schema dataclass, as a tuple path (loss excluded: checked against its class)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_leaves(hints[f.name], (*prefix, f.name))
        elif f.name != "loss":
            yield (*prefix, f.name)


def attribute_reads():
    """(owner identifier, attribute) for every `x.attr` in the package outside the schema (code only, no strings)."""
    reads = set()
    for path in Path(dflashtrain.__file__).parent.rglob("*.py"):
        if path.name == "schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                reads.add((name, node.attr))
    return reads


LABELS = {"model.name", "data.name", "parallelism.name"}  # name the chosen option; saved with the config


def is_read(path, reads) -> bool:
    parent = path[-2] if len(path) > 1 else "cfg"
    return any(attr == path[-1] and parent in owner for owner, attr in reads)


def test_every_schema_key_is_read_by_the_code():
    """A key no code reads is a setting that silently does nothing; `cfg.data.max_length`, `drafter_cfg.num_taps`
    and `optim.lr` count as reads of data.max_length, model.drafter.num_taps and optim.lr."""
    reads = attribute_reads()
    unread = [".".join(p) for p in schema_leaves(TrainConfig) if not is_read(p, reads)]
    assert sorted(unread) == sorted(LABELS), f"unread keys: {unread}"


def test_every_shipped_yaml_key_is_a_schema_key(inputs, tmp_path):
    """Strict composition, shown once per group file: its keys all exist in the schema (or compose would fail)."""
    leaves = {".".join(p) for p in schema_leaves(TrainConfig)}
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("loss", "__pycache__")):
        for option in sorted(group_dir.glob("*.yaml")):
            cfg = compose_train([*base_overrides(inputs, tmp_path), f"{group_dir.name}={option.stem}"])
            node = OmegaConf.to_container(cfg[group_dir.name])
            keys = {f"{group_dir.name}.{k}" for k in flatten(node)}
            assert keys <= leaves, f"{option}: {sorted(keys - leaves)}"


def flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"
