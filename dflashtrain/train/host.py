"""What the host reads from the device during training, and when (docs/architecture.md, host reads).

On a GPU every read of a device value (``.item()``, ``.tolist()``, ``bool(tensor)``, boolean-mask indexing) makes
the host wait until the device has finished everything queued so far, so the next step cannot be queued behind
the current one. The step therefore keeps its decisions on the device (an empty or non-finite step is skipped by
the fused optimizer itself, see :class:`StepHealth`) and reads values in ONE transfer (:func:`to_host`) on host-read
steps only: every step on CPU, where a read costs nothing; every ``trainer.log_every_n_steps`` steps (and the last)
on a GPU whose optimizer can skip a step on the device; every step otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten


HOST_COPY = "_dflashtrain_host_copy"  # marks the tensors to_host made (HostReadCounter does not count reading them)


def to_host(values: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """One device -> host copy of many tensors: name -> tensor (any shape) -> name -> CPU fp32 tensor, same shape."""
    if not values:
        return {}
    flat = torch.cat([v.detach().reshape(-1).to(torch.float32) for v in values.values()]).cpu()
    out, start = {}, 0
    for name, value in values.items():
        out[name] = flat[start:start + value.numel()].view(value.shape)
        setattr(out[name], HOST_COPY, True)
        start += value.numel()
    return out


class StepHealth:
    """Device-side flags of the current optimizer step and of the run, read by the host only on host-read steps.

    * loss_bad / grad_bad: a non-finite loss (any micro-batch) or gradient in this step;
    * empty: every micro-batch of this step had no supervised slot in the global batch;
    * first_bad: the first step with a non-finite loss or gradient (−1: none). Sticky: from that step on, every step
      is skipped on the device until the host reads it and stops the run, so the weights stay those that step
      started from.
    """

    def __init__(self):
        self.first_bad: Optional[Tensor] = None  # long scalar
        self.bad_was_loss: Optional[Tensor] = None  # bool scalar: the first bad step's loss was non-finite
        self.bad_here: Optional[Tensor] = None  # bool scalar: the first bad step was bad on this rank
        self.bad_norm: Optional[Tensor] = None  # the first bad step's gradient norm
        self.loss_bad: Optional[Tensor] = None  # bool scalar, this step
        self.loss_sum: Optional[Tensor] = None  # this step's micro-batch losses, summed
        self.bad_loss: Optional[Tensor] = None  # the first bad step's loss (sum over micro-batches)
        self.empty: Optional[Tensor] = None  # bool scalar, this step
        self.empty_steps: Optional[Tensor] = None  # long scalar: empty steps since the last host read

    def saw_loss(self, loss: Tensor) -> None:
        loss = loss.detach().float().sum()
        bad = ~torch.isfinite(loss)
        self.loss_bad = bad if self.loss_bad is None else self.loss_bad | bad
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss  # nan or ±inf once one is

    def saw_denominator(self, global_den: Tensor) -> None:
        empty = global_den <= 0
        self.empty = empty if self.empty is None else self.empty & empty

    def end_step(self, step: int, grad_norm: Tensor, check_grad: bool, reduce_max: Callable[[Tensor], Tensor]
                 ) -> Tensor:
        """Fold this step into the run flags; returns skip [bool scalar]: a bad step so far, or this one empty.

        ``check_grad`` False (under a GradScaler, which skips inf gradients itself) checks the loss only.
        ``reduce_max`` takes the maximum over ranks (a device collective; identity on one process), so every rank
        skips, and later stops, at the same steps. Resets the step's flags.
        """
        device = grad_norm.device
        false = torch.zeros((), dtype=torch.bool, device=device)
        loss_bad = self.loss_bad if self.loss_bad is not None else false
        empty = self.empty if self.empty is not None else false  # global already (den is all-reduced)
        bad_here = loss_bad | (~torch.isfinite(grad_norm) if check_grad else false)
        bad = reduce_max(bad_here.float()) > 0
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
            self.bad_was_loss, self.bad_here = false, false
            self.bad_norm, self.bad_loss = torch.zeros((), device=device), torch.zeros((), device=device)
            self.empty_steps = torch.zeros_like(self.first_bad)
        new = bad & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_was_loss = torch.where(new, loss_bad, self.bad_was_loss)
        self.bad_here = torch.where(new, bad_here, self.bad_here)
        self.bad_norm = torch.where(new, grad_norm.float(), self.bad_norm)
        if self.loss_sum is not None:
            self.bad_loss = torch.where(new, self.loss_sum, self.bad_loss)
        self.empty_steps = self.empty_steps + (empty & ~bad).long()
        self.loss_bad = self.loss_sum = self.empty = None
        return (self.first_bad >= 0) | empty

    def device_values(self) -> Dict[str, Tensor]:
        return {"first_bad": self.first_bad, "bad_was_loss": self.bad_was_loss, "bad_here": self.bad_here,
                "bad_norm": self.bad_norm, "bad_loss": self.bad_loss, "empty_steps": self.empty_steps}

    def read(self) -> None:
        """After a host read: the empty steps were reported."""
        self.empty_steps = torch.zeros_like(self.empty_steps)


@dataclass
class StepReport:
    """What the host learnt at a host-read step (before its optimizer step)."""

    step: int
    first_bad: int  # −1: no non-finite loss or gradient so far
    bad_was_loss: bool
    bad_here: bool  # False: another rank had the non-finite value
    bad_norm: float  # the first bad step's gradient norm
    bad_loss: float  # and its loss
    empty_steps: int  # steps since the last read whose global batch had no supervised slot (skipped)


class StepClock:
    """Wall time of each training batch, without making the host wait for the device.

    On CUDA, events recorded on the stream at batch start and end; the elapsed time of a batch is read once the
    host has synchronized anyway (at the next host read), so :meth:`previous` gives the last *finished* batch.
    Elsewhere ``time.perf_counter``.
    """

    def __init__(self):
        self._start: Optional[object] = None
        self._finished: Optional[tuple] = None  # (start, end, tokens) of the last finished batch
        self._tokens: Optional[Tensor] = None

    def start(self, device: torch.device, tokens: Tensor) -> None:
        self._tokens = tokens
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is None:
            return
        if isinstance(self._start, float):
            end: object = time.perf_counter()
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        self._finished, self._start = (self._start, end, self._tokens), None

    def previous_tokens(self) -> Optional[Tensor]:
        return None if self._finished is None else self._finished[2]

    def previous(self) -> Optional[float]:
        """Seconds of the last finished batch (call after a host read on CUDA), or None before the first."""
        if self._finished is None:
            return None
        start, end, _ = self._finished
        if isinstance(start, float):
            return max(end - start, 1e-9)
        return max(start.elapsed_time(end) / 1e3, 1e-9)


class HostReadCounter(torch.overrides.TorchFunctionMode):
    """Counts, inside a ``with`` block, the tensor calls that read a value on the host (on a GPU each is a host
    synchronisation): ``.item()``, ``.tolist()``, ``bool()``/``float()``/``int()`` of a tensor, ``.cpu()``,
    ``.numpy()``, ``nonzero`` and boolean-mask indexing (data-dependent shapes). On CPU, where nothing waits, it
    shows where a GPU would (tests/test_host_reads.py, bench/step.py). Tensors computed only from :func:`to_host`'s
    copies are host tensors on a GPU too: reading them is not counted."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
             "masked_select", "unique", "__repr__", "__format__"}

    def __init__(self):
        super().__init__()
        self.calls: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, Tensor)]
        on_host = bool(tensors) and all(getattr(t, HOST_COPY, False) for t in tensors)
        if not on_host and (name in self.READS or (name == "__getitem__" and len(args) > 1
                                                     and _has_bool_index(args[1]))):
            self.calls.append(name)
        out = func(*args, **(kwargs or {}))
        if on_host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    setattr(t, HOST_COPY, True)
        return out


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)
