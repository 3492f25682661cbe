"""Per-step plumbing inside a worker: progress (and a live preview) for the caller, and an interrupt every rank
agrees on."""
from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from .errors import JobInterrupted


class StepControl:
    """Called by each rank after every sampling step.

    An interrupt request reaches the ranks at slightly different moments, so at every step the ranks take the
    maximum of their flags (one 4-byte all-reduce): all of them stop after the same step and no rank is left
    waiting in a collective for a peer that has quit.
    """

    def __init__(self, distributed: bool, device: str = "cpu"):
        self._distributed = distributed
        self._device = device  # NCCL reduces only device tensors
        self._interrupt = threading.Event()
        self.step = 0
        self.total = 0
        self.preview: tuple[int, Any] | None = None  # (step, payload): the latest step's preview, if the job makes them
        self.first_step_at: float | None = None  # perf_counter when the job's first step ended

    def start(self, total: int) -> None:
        self._interrupt.clear()
        self.step, self.total, self.preview, self.first_step_at = 0, total, None, None

    def request_interrupt(self) -> None:
        self._interrupt.set()

    def after_step(self, step: int, preview: Any = None) -> None:
        if preview is not None:
            self.preview = (step, preview)  # set before the step, so a reader never sees a step without its preview
        self.step = step
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        flag = torch.tensor([1 if self._interrupt.is_set() else 0], dtype=torch.int32, device=self._device)
        if self._distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise JobInterrupted(f"interrupted after step {step} of {self.total}")
