"""No checkpoint path runs code: a pickle bomb given to any entry point is refused, one line naming it, before
anything else happens; real checkpoints load with ``weights_only=True`` (so does Lightning's own resume load).

The entry points are called as the console scripts are (``dflashtrain.cli.<entry>()`` on an argv), in process.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import dflashtrain
import dflashtrain.cli as cli
from dflashtrain.export.checkpoint import read_checkpoint
from test_export import write_checkpoint


class Bomb:
    """Unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def bombs(tmp_path):
    """(a torch zip checkpoint with dflashtrain-looking metadata, a bare pickle), and the marker they would create."""
    marker = tmp_path / "EXPLODED"
    zipped, bare = tmp_path / "bomb.ckpt", tmp_path / "bare.ckpt"
    torch.save({"dflashtrain": {"geometry": {}, "family": "dflash"}, "state_dict": {}, "global_step": 1,
                "payload": Bomb(marker)}, zipped)
    with open(bare, "wb") as handle:
        pickle.dump({"payload": Bomb(marker)}, handle, protocol=2)
    with pytest.raises(Exception):  # the bombs are real: an unsafe load would run them
        torch.load(zipped, weights_only=True)
    return zipped, bare, marker


def console(entry: str, *args: str, monkeypatch, capsys, cwd: Path):
    """Run a console script in process: (exit status, its one error line)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [entry, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as info:
        getattr(cli, entry)()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dflashtrain: ")]
    assert len(errors) == 1, errors
    return info.value.code, errors[0]


def test_read_checkpoint_refuses_both_kinds_of_bomb(bombs):
    zipped, bare, marker = bombs
    for path in (zipped, bare):
        with pytest.raises(dflashtrain.config.errors.ConfigError, match=f"^ckpt_path: .*{path.name}"):
            read_checkpoint(path)
    assert not marker.exists()


def test_a_bomb_on_every_entry_point_is_refused_and_never_runs(bombs, tmp_path, random_target_dir, tiny_data,
                                                                monkeypatch, capsys):
    zipped, bare, marker = bombs
    real = write_checkpoint(tmp_path / "real" / "last.ckpt", random_target_dir)
    planted = tmp_path / "planted"
    (planted / "outputs/train/2026-01-01_00-00-00/checkpoints").mkdir(parents=True)
    (planted / "outputs/train/2026-01-01_00-00-00/checkpoints/last.ckpt").write_bytes(zipped.read_bytes())
    cases = [
        ("train", [f"resume_from={zipped}", f"data.path={tiny_data}", f"paths.output_dir={tmp_path / 'out'}"],
         "resume_from", tmp_path),
        ("train", [f"resume_from={bare}", f"data.path={tiny_data}", f"paths.output_dir={tmp_path / 'out'}"],
         "resume_from", tmp_path),
        ("evaluate", [f"ckpt_path={zipped}"], "ckpt_path", tmp_path),
        ("evaluate", [f"ckpt_path={real}", f"vp_drafter={zipped}"], "vp_drafter", tmp_path),
        ("evaluate", [], "ckpt_path", planted),  # ckpt_path=latest finds the planted file
        ("export", [f"ckpt_path={bare}"], "ckpt_path", tmp_path),
        ("export", [], "ckpt_path", planted),
    ]
    for entry, args, key, cwd in cases:
        code, line = console(entry, *args, monkeypatch=monkeypatch, capsys=capsys, cwd=cwd)
        assert code == 2 and line.startswith(f"dflashtrain: error: {key}: "), (entry, args, line)
        assert not marker.exists(), (entry, args)
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before the output directory was touched


def test_no_loader_in_the_package_unpickles_freely():
    """Every torch.load in dflashtrain passes weights_only=True (Lightning's resume goes through SafeCheckpointIO)."""
    root = Path(dflashtrain.__file__).parent
    loads = 0
    for path in root.rglob("*.py"):
        for call in path.read_text().split("torch.load(")[1:]:
            loads += 1
            assert "weights_only=True" in call.split(")\n")[0], f"{path}: torch.load without weights_only=True"
    assert loads >= 3  # export/checkpoint.py (twice), train/checkpoint_io.py


def test_lightnings_resume_load_is_weights_only_whatever_it_is_asked(bombs, tmp_path):
    from dflashtrain.train.checkpoint_io import SafeCheckpointIO

    zipped, _, marker = bombs
    with pytest.raises(pickle.UnpicklingError):
        SafeCheckpointIO().load_checkpoint(zipped, weights_only=False)
    assert not marker.exists()
