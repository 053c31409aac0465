"""Every shipped config composes strictly; unknown keys and bad values fail at compose time, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dflashtrain.config.errors import ConfigError
from dflashtrain.config.losses import LOSS_SCHEMAS
from dflashtrain.config.schema import register_configs
from dflashtrain.config.checks import validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "__pycache__")
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

# Group options whose required keys have no default (the user must give them).
REQUIRED = {
    ("model", "qwen3_8b"): ["model.target.path=/models/Qwen3-8B"],
    ("data", "chat_jsonl"): ["data.path=/data/train.jsonl"],
}

register_configs()


def compose_train(overrides=()):
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def resolved(cfg):
    """Resolve every interpolation, as a run would (the hydra node is only needed for output_dir)."""
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = "/tmp/unused"
    del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_the_package_ships_every_config():
    shipped = Path(__import__("dflashtrain.conf", fromlist=["x"]).__path__[0])
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == sorted(
        p.relative_to(CONF) for p in CONF.rglob("*.yaml")
    )


def test_default_composes_and_resolves():
    cfg = resolved(compose_train())
    assert cfg["model"]["name"] == "tiny" and cfg["data"]["name"] == "tiny_chat"
    assert OmegaConf.get_type(compose_train().loss) is LOSS_SCHEMAS["dpace"]  # the default objective
    assert resolved(compose_train(["loss=decay"]))["loss"]["gamma"] == 4.0  # the tiny model's B = 8 picks γ = 4
    assert Path(cfg["model"]["target"]["path"]).is_dir()


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    """Each option composes, resolves, and is the one chosen (its name, or for a loss its schema)."""
    composed = compose_train([f"{group}={option}", *REQUIRED.get((group, option), [])])
    if group == "loss":
        assert OmegaConf.get_type(composed.loss) is LOSS_SCHEMAS[option]
    cfg = resolved(composed)
    if group != "loss":
        assert cfg[group]["name"] == option


@pytest.mark.parametrize("block_size,gamma", [(16, 7.0), (10, 5.0), (8, 4.0), (12, 5.25)])
@pytest.mark.parametrize("loss", ["decay", "vp_drafter"])
def test_decay_gamma_follows_the_block_size_into_the_objective(loss, block_size, gamma):
    """The published γ per block size (docs/objectives.md), from the schema to the built objective."""
    from dflashtrain.objectives import build_objective

    cfg = compose_train([f"loss={loss}", f"model.drafter.block_size={block_size}"])
    assert build_objective(OmegaConf.to_object(cfg.loss)).gamma == gamma
    assert build_objective(OmegaConf.to_object(compose_train([f"loss={loss}", "loss.gamma=2"]).loss)).gamma == 2.0


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_composes(recipe):
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("# dflashtrain"), "a recipe's first comment is the command that runs it"
    # As `dflashtrain --config-dir recipes --config-name NAME` does: recipes/ joins the package's search path.
    overrides = ["hydra.searchpath=[pkg://dflashtrain.conf]", "model.target.path=/models/x", "data.path=/data/x.jsonl"]
    with initialize_config_dir(config_dir=str(recipe.parent), version_base=None):
        cfg = compose(recipe.stem, overrides=overrides, return_hydra_config=True)
    resolved(cfg)


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.bogus=1", "data.bogus"),
        ("model.drafter.block_size=eight", "model.drafter.block_size"),
        ("loss.mask_mode=sometimes", "loss.mask_mode"),
        ("loss.target=soft", "loss.target"),
        ("trainer.max_steps=1.5", "trainer.max_steps"),
        ("model.drafter.attention=cuda", "model.drafter.attention"),
    ],
)
def test_bad_values_fail_at_compose_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_unknown_objective_lists_valid_ones():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["loss=plain"])
    message = str(info.value)
    assert "loss/plain" in message and "decay" in message


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.drafter.block_size=1", "model.drafter.block_size"),
        ("data.num_anchors=0", "data.num_anchors"),
        ("loss.gamma=-1", "loss.gamma"),
        ("optim.lr=0", "optim.lr"),
        ("model.target.path=/nonexistent", "model.target.path"),
        ("data.path=/nonexistent.jsonl", "data.path"),
    ],
)
def test_validate_names_the_key(override, key):
    cfg = compose_train(["loss=decay", override] if override.startswith("loss.") else [override])  # decay's γ
    cfg.paths.output_dir = "/tmp/unused"
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
