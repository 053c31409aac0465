"""Timing (interleaved, with medians and spread), peak memory and host-synchronisation counts for bench/step.py."""

from __future__ import annotations

import statistics
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"  # bench/step.py --clock: "cpu" counts only the cycles this process got (a shared machine's load
# then barely moves it; with one thread it is the step's compute time), "wall" is elapsed time (always on a GPU)


def interleaved(steps: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
                ) -> Dict[str, List[float]]:
    """Seconds per call of each step, the steps taking turns within every repetition (the order rotating), so that
    a change in machine load hits all of them alike. The first ``warmup`` repetitions are not kept."""
    clock = CLOCKS["wall" if device.type == "cuda" else CLOCK]
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(warmup + repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            synchronize(device)
            start = clock()
            steps[name]()
            synchronize(device)
            if rep >= warmup:
                times[name].append(clock() - start)
    return times


@dataclass
class Ratio:
    """ours/theirs from the per-repetition ratios of one interleaved run."""

    median: float
    low: float  # first quartile
    high: float  # third quartile
    ours_ms: float  # median step times
    theirs_ms: float
    best: float  # fastest ours / fastest theirs: the least disturbed repetitions

    def __str__(self) -> str:
        return (f"{self.median:.3f} (quartiles {self.low:.3f}..{self.high:.3f}; best {self.best:.3f}; "
                f"{self.ours_ms:.1f} ms vs {self.theirs_ms:.1f} ms)")


def ratio(ours: Sequence[float], theirs: Sequence[float]) -> Ratio:
    per_rep = [a / b for a, b in zip(ours, theirs)]
    quartiles = statistics.quantiles(per_rep, n=4) if len(per_rep) > 1 else [per_rep[0]] * 3
    return Ratio(statistics.median(per_rep), quartiles[0], quartiles[2], 1e3 * statistics.median(ours),
                 1e3 * statistics.median(theirs), min(ours) / min(theirs))


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the storages created inside the ``with`` block (forward
    and backward, CPU included: the autograd engine runs CPU work on the calling thread). Storages made before the
    block, such as weights and the inputs, are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: Dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of ``fn`` above what was allocated before it: the CUDA allocator's peak, else PeakLiveBytes."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakLiveBytes() as tracker:
        fn()
    return tracker.peak


def cuda_syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations CUDA reports (torch.cuda.set_sync_debug_mode) while ``fn`` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
