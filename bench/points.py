"""The points of bench/step.py that are about one part of the step: the LM head on flattened rows, the host
synchronisations per step of the real trainer (GPU), and flex vs dense attention (GPU)."""

from __future__ import annotations

import collections
import tempfile
import warnings
from typing import Callable, Dict, List

import lightning as L
import torch
from torch import nn

from geometry import CPU, Geometry, make_inputs
from measure import interleaved, ratio
from ours import OurStep
from dflashtrain.models.target import head_logits

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def head_point(report, g: Geometry, device, repeats: int, warmup: int) -> None:
    """lm_head forward + backward on one chunk [b, c, B, d] sliced from [b, N, B, d]: flattened rows (one GEMM) vs
    nn.Linear on the slice (which ATen runs as b·c small batched matmuls)."""
    gen = torch.Generator().manual_seed(0)
    lm_head = nn.Linear(g.hidden, g.vocab, bias=False).requires_grad_(False).to(device)
    hidden = torch.randn(g.batch, g.anchors, g.block, g.hidden, generator=gen).to(device)

    def run(fn: Callable) -> Callable[[], None]:
        def step() -> None:
            h = hidden.detach().requires_grad_(True)
            fn(h[:, : g.chunk]).float().logsumexp(-1).sum().backward()
        return step

    times = interleaved({"flat": run(lambda h: head_logits(h, lm_head)), "slice": run(lm_head)}, repeats, warmup,
                        device)
    report(f"| lm_head on flattened rows / on the slice | {g.describe()} | {ratio(times['flat'], times['slice'])} | "
           "forward + backward of one chunk |")


def trainer_reads(report, device, steps: int, every: int) -> None:
    """The real trainer (`dflashtrain`'s fit on the tiny default, target included) for ``steps`` steps: the host
    synchronisations per step CUDA reports (torch.cuda.set_sync_debug_mode). GPU only."""
    if device.type != "cuda":
        return
    from hydra import compose, initialize_config_module

    from dflashtrain.config.schema import register_configs
    from dflashtrain.train.recipe import run

    register_configs()
    per_step: List[int] = []
    where: collections.Counter = collections.Counter()
    events: List[str] = []

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            per_step.append(len(events))

    original_init = L.Trainer.__init__

    def with_steps(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Steps()]
        original_init(self, *args, **kwargs)

    L.Trainer.__init__ = with_steps
    out = tempfile.mkdtemp(prefix="bench_reads_")
    overrides = [f"paths.output_dir={out}", f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={every}",
                 "logger=none", "eval.every_n_steps=0", "checkpoint.every_n_train_steps=100000"]
    try:
        with initialize_config_module(config_module="dflashtrain.conf", version_base=None):
            cfg = compose("train", overrides=overrides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(cfg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        events += [f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
                   if "synchroniz" in str(w.message)]
    finally:
        L.Trainer.__init__ = original_init
    per_step.append(len(events))
    counts = [b - a for a, b in zip(per_step[:-1], per_step[1:])]
    for event in events[per_step[0]:]:
        where[event] += 1
    top = "; ".join(f"{n}× {e.replace(str(ROOT) + '/', '')}" for e, n in where.most_common(6))
    report(f"| trainer step CUDA synchronisations | tiny default, {steps} steps, log every {every} | "
           f"{counts} per step | {top} |")


def flex_point(report, g: Geometry, device, repeats: int, warmup: int) -> None:
    """Flex attention (BlockMask) vs dense SDPA mask, dflashtrain's whole step (GPU only: flex has no CPU backward)."""
    inputs = make_inputs(g, device)
    flex = OurStep(g.with_(attention="flex"), inputs, "decay")
    dense = OurStep(g.with_(attention="sdpa"), inputs, "decay", drafter_state=flex.module.drafter.state_dict())
    times = interleaved({"flex": flex, "dense": dense}, repeats, warmup, device)
    report(f"| flex / dense attention | {g.describe()} | {ratio(times['flex'], times['dense'])} | |")


def extra_points(device, repeats: int, warmup: int) -> Dict[str, Callable]:
    points: Dict[str, Callable] = {
        "head-v8192": lambda rep: head_point(rep, CPU, device, repeats, warmup),
        "head-v32768": lambda rep: head_point(rep, CPU.with_(vocab=32768), device, repeats, warmup),
        "host-reads": lambda rep: trainer_reads(rep, device, steps=12, every=5),
    }
    if device.type == "cuda":
        mid = CPU.with_(hidden=2048, heads=16, kv_heads=4, head_dim=128, intermediate=6144, vocab=32768,
                        seq_len=2048, anchors=256, bf16=True)
        points["gpu-flex"] = lambda rep: flex_point(rep, mid, device, repeats, warmup)
    return points
