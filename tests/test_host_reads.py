"""The step reads the device once per optimizer step (docs/architecture.md, host reads): from a batch's start to the
step's read (AccumulationWindow.close) no tensor value reaches the host, and the read is one copy.

On CPU nothing waits, so the reads are counted: every call that would make a GPU host wait (.item(), .tolist(),
bool()/float()/int() of a tensor, .cpu(), .numpy(), nonzero, boolean-mask indexing) except those of the values
logged, which are host copies from the step's read (Lightning reads them for its loggers). The two CPU-only conveniences
are switched off as on a GPU: the attention key groups (they read the anchors) and the chunked objective's contract
check (it reads the upstream gradient).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import write_count_up_chats
from dflashtrain.assets import TINY_TARGET_DIR
from dflashtrain.config.schema import register_configs
from dflashtrain.train import reduction
from dflashtrain.train.module import DraftModule
from dflashtrain.train.recipe import run

register_configs()
LOGGED = "_logged_host_value"  # set on the values DraftModule.log receives: host copies from the step's read
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
         "masked_select", "unique"}


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.active, self.reads = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name == "__getitem__" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        logged = bool(tensors) and all(getattr(t, LOGGED, False) for t in tensors)
        if self.active and not logged and (name in READS or bool_index):
            frames = [f for f in traceback.extract_stack(limit=30) if "/torch/" not in f.filename]
            self.reads.append(f"{name} at {frames[-2].filename.split('/')[-1]}:{frames[-2].lineno}")
        out = func(*args, **(kwargs or {}))
        if logged:  # what is computed from logged values only is on the host too
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    setattr(t, LOGGED, True)
        return out


@pytest.mark.parametrize("extra", [[], ["loss=dspark", "trainer.accumulate_grad_batches=2"]])
def test_nothing_is_read_before_the_steps_one_read(tmp_path, monkeypatch, extra):
    counter, per_step, copies = CountReads(), [], []  # reads before each step's read; in the read
    monkeypatch.setattr("dflashtrain.models.masks.key_groups", lambda *args: None)
    monkeypatch.setattr("dflashtrain.objectives.chunked.CHECK_ON_CPU", False)
    start, close = DraftModule.on_train_batch_start, reduction.AccumulationWindow.close

    def batch_start(module, batch, batch_idx):
        start(module, batch, batch_idx)
        counter.active = True

    def counted_close(window, *args, **kwargs):
        per_step.append(list(counter.reads))
        counter.reads = []  # still counting: the read itself
        try:
            return close(window, *args, **kwargs)
        finally:
            copies.append(list(counter.reads))
            counter.active, counter.reads = False, []

    log = DraftModule.log

    def tagged_log(module, name, value, *args, **kwargs):
        if isinstance(value, torch.Tensor):
            assert value.device.type == "cpu" and not value.requires_grad, name
            setattr(value, LOGGED, True)
        return log(module, name, value, *args, **kwargs)

    monkeypatch.setattr(DraftModule, "log", tagged_log)
    monkeypatch.setattr(DraftModule, "on_train_batch_start", batch_start)
    monkeypatch.setattr(reduction.AccumulationWindow, "close", counted_close)
    data = write_count_up_chats(tmp_path / "train.jsonl", 16)
    with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
        cfg = compose("train", overrides=[
            f"model.target.path={TINY_TARGET_DIR}", f"data.path={data}", f"paths.output_dir={tmp_path / 'out'}",
            "data.batch_size=4", "trainer.max_steps=3", "checkpoint.every_n_train_steps=100", "logger=none",
            "eval.every_n_steps=0", "trainer.enable_progress_bar=false", *extra])
    with counter:
        run(cfg)
    assert len(per_step) == 3 and per_step == [[], [], []], per_step
    for reads in copies:  # one copy first; what follows reads the host copy (e.g. float(D)), which waits for nothing
        names = [read.split(" ")[0] for read in reads]
        assert names[0] == "cpu" and names.count("cpu") == 1, reads
