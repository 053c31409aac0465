"""The Objective protocol and the drafting-family registry: declared members are enforced, the step uses each of
them (a VP step differs from a DFlash step), and a new objective needs only its module, its YAML and its schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dflashtrain.data.blocks import make_blocks, sample_anchors
from dflashtrain.data.sampling import RowGenerators
from dflashtrain.families import family_names, get_family
from dflashtrain.objectives.protocol import ChunkLoss, check_objective
from dflashtrain.train.module import loss_numerator
from factories import make_module, make_objective

ROOT = Path(__file__).resolve().parents[1]


class Complete:
    name, family, label_offset = "complete", "dflash", 0
    needs_teacher = False
    coefficients = {"ce": 1.0}

    def __init__(self):
        from dflashtrain.objectives.protocol import Normalizer

        self.normalizer = Normalizer.weight

    def prepare_blocks(self, blocks, input_ids):
        return blocks

    def __call__(self, chunk):
        raise NotImplementedError

    def metrics(self, total, counts):
        return {}

    def coefficients_at(self, step, total_steps):
        return self.coefficients


@pytest.mark.parametrize("member", ["name", "family", "label_offset", "normalizer", "coefficients", "needs_teacher",
                                    "prepare_blocks", "metrics", "coefficients_at"])
def test_a_missing_member_is_an_error_naming_it(member):
    check_objective(Complete())
    cls = type("Incomplete", (), {k: v for k, v in vars(Complete).items() if k != member})
    objective = cls.__new__(cls)
    if member != "normalizer":
        Complete.__init__(objective)
    with pytest.raises(TypeError, match=member):
        check_objective(objective)


@pytest.mark.parametrize("attribute,value", [("normalizer", "weight"), ("label_offset", 2), ("coefficients", {}),
                                             ("coefficients", {"ce": 1}), ("needs_teacher", "no")])
def test_a_member_of_the_wrong_kind_is_an_error(attribute, value):
    objective = Complete()
    setattr(objective, attribute, value)
    with pytest.raises(TypeError, match=attribute):
        check_objective(objective)


def test_coefficients_must_name_exactly_the_loss_terms():
    """A forgotten coefficient would otherwise train on a term with α = 1 (or ignore it)."""
    total = ChunkLoss(terms={"ce": torch.tensor(2.0), "l1": torch.tensor(1.0)}, weight_sum=torch.tensor(1.0),
                      token_sum=torch.tensor(1.0), slot_weight_sum=torch.zeros(3))
    assert loss_numerator(total, {"ce": 0.5, "l1": 2.0}).item() == 3.0
    with pytest.raises(ValueError, match="l1"):
        loss_numerator(total, {"ce": 1.0})


def test_every_shipped_objective_fits_its_family():
    for name, fields in {"decay": {"gamma": 4.0}, "dpace": {}, "vp_drafter": {"gamma": 4.0}, "dspark": {}}.items():
        objective = make_objective(name, **fields)
        assert objective.family in family_names()
        assert get_family(objective.family).label_offset == objective.label_offset


def _batch(seed=0, batch=2, seq_len=40):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 50, (batch, seq_len), generator=gen)
    loss_mask = torch.ones(batch, seq_len, dtype=torch.long)
    loss_mask[:, :4] = 0
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": torch.ones_like(input_ids),
            "sample_ids": torch.arange(batch), "row_keys": list(range(batch))}


class _Geometry:
    block_size, mask_token_id = 8, 99


def test_a_vp_step_trains_on_visible_prefixes_and_a_dflash_step_does_not():
    """Through the module's own blocks_for: if it ignored prepare_blocks, VP would silently train plain DFlash."""
    drafter = torch.nn.Module()
    drafter.geometry = _Geometry()
    batch = _batch()
    dflash = make_module(drafter, None, make_objective("decay", gamma=4.0), num_anchors=6).blocks_for(batch)
    vp = make_module(drafter, None, make_objective("vp_drafter", gamma=4.0), num_anchors=6).blocks_for(batch)
    uniforms = RowGenerators(0, 0, batch["row_keys"], torch.device("cpu")).uniform(128)  # seed 0, epoch 0
    anchors, keep = sample_anchors(batch["loss_mask"], 6, uniforms=uniforms)
    plain = make_blocks(batch["input_ids"], batch["loss_mask"], anchors, keep, 8, 99, label_offset=0)
    assert torch.equal(dflash.input_ids, plain.input_ids) and torch.equal(dflash.drafted, plain.drafted)
    assert (dflash.input_ids[..., 1:] == 99).all()  # DFlash: the anchor, then MASK
    kept = vp.block_keep
    prefix = (~vp.drafted).long().cumprod(-1).sum(-1)[kept]  # p per kept block
    assert (prefix >= 2).all() and (prefix <= 7).all()
    shown = vp.input_ids[..., 1] != 99
    assert shown[kept].all()  # slot 1 is real (p >= 2) in every kept block
    ids = batch["input_ids"]
    for b, n in zip(*torch.nonzero(kept, as_tuple=True)):
        a, p = int(vp.anchor_positions[b, n]), int((~vp.drafted[b, n]).long().cumprod(-1).sum())
        real = ids[b, a:a + p].tolist()  # a prefix slot past the sequence stays MASK
        assert vp.input_ids[b, n, :p].tolist() == real + [99] * (p - len(real))
        assert (vp.input_ids[b, n, p:] == 99).all() and not vp.slot_valid[b, n, :p].any()


# ---------------------------------------------------------------------------------------------- a fifth objective
TOY_MODULE = '''"""Objective ``toy``: the DFlash loss with linearly decreasing slot weights w_k = 1 / k (a test's objective)."""

from dflashtrain.objectives.protocol import Normalizer, constant_coefficients, no_metrics, unchanged_blocks
from dflashtrain.objectives.slots import slot_cross_entropy, supervision_mask, weighted_sums
from dflashtrain.objectives.weights import first_drafted_offsets


class ToyObjective:
    name = "toy"
    family = "dflash"
    label_offset = 0
    normalizer = Normalizer.weight
    coefficients = {"ce": 1.0}
    needs_teacher = False
    prepare_blocks = staticmethod(unchanged_blocks)
    metrics = staticmethod(no_metrics)
    coefficients_at = constant_coefficients

    def __init__(self, mask_mode):
        self.mask_mode = mask_mode

    def __call__(self, chunk):
        weights = 1.0 / (first_drafted_offsets(chunk.drafted).clamp(min=0) + 1).float()
        mask = supervision_mask(chunk.valid, chunk.drafted, self.mask_mode)
        return weighted_sums({"ce": slot_cross_entropy(chunk.logits, chunk.labels)}, weights, mask)
'''
TOY_SCHEMA = '''

@dataclass
class ToyLossConfig:
    """Toy: w_k = 1 / k."""

    objective: ClassVar[str] = "dflashtrain.objectives.toy:ToyObjective"
    mask_mode: MaskMode = MaskMode.independent

    def validate(self) -> None:
        pass


'''


def test_a_fifth_objective_trains_from_the_cli_with_only_its_module_yaml_and_schema(tmp_path):
    """A copy of the package plus exactly three changes: objectives/toy.py, conf/loss/toy.yaml, and the loss
    schema (its dataclass and one registry line in config/losses.py). Nothing in train/, families/ or the module is touched."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "dflashtrain", source / "dflashtrain", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", source / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "dflashtrain" / "objectives" / "toy.py").write_text(TOY_MODULE)
    (source / "conf" / "loss" / "toy.yaml").write_text("defaults:\n  - /schema/loss/toy@_here_\n  - _self_\n")
    schema_file = source / "dflashtrain" / "config" / "losses.py"
    schema = schema_file.read_text()
    registry = "LOSS_SCHEMAS: Dict[str, Type[Any]] = {\n"
    assert registry in schema
    schema = schema.replace(registry, registry + '    "toy": ToyLossConfig,\n')
    schema = schema.replace("\n# loss=<name> -> its schema.", TOY_SCHEMA + "# loss=<name> -> its schema.")
    schema_file.write_text(schema)

    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dflashtrain", "loss=toy", "trainer.max_steps=2", "eval.every_n_steps=0",
         "trainer.enable_progress_bar=false", "logger=none", f"paths.output_dir={tmp_path / 'out'}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "objective toy (family dflash): mask_mode independent" in log, log[-2000:]
    assert f"{source}/dflashtrain" in subprocess.run(
        [sys.executable, "-c", "import dflashtrain; print(dflashtrain.__file__)"], capture_output=True, text=True,
        env=env, cwd=tmp_path).stdout  # the copy ran, not the installed package
    checkpoint = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["dflashtrain"]["objective"] == "toy" and checkpoint["global_step"] == 2
