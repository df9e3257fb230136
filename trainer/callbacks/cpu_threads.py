"""CPU runs with automatic intra-op threads (train.cpu_threads=0, no OMP_NUM_THREADS): the choice made at start
(trainer/runtime/distributed.py's `cpu_threads`) is made again from what runs now, at a logging step every
`seconds`, so a run started beside other work takes the cores back once that work ends, and gives them up when
work arrives (each rank for itself; no collective)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from hylo.trainer.callbacks.base import Callback
from hylo.trainer.runtime.distributed import cpu_threads

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


class CpuThreads(Callback):
    def __init__(self, seconds: float = 30.0):
        self.seconds, self.active, self.last = seconds, False, 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        self.active = (trainer.device.type == "cpu" and trainer.cfg.train.cpu_threads == 0
                       and not os.environ.get("OMP_NUM_THREADS"))
        self.last = time.monotonic()

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not self.active or not trainer.is_log_step() or time.monotonic() - self.last < self.seconds:
            return
        self.last = time.monotonic()
        now = torch.get_num_threads()
        threads, why = cpu_threads(0, peer_threads=now)
        if threads != now:
            torch.set_num_threads(threads)
            trainer.say(f"[hylo] CPU: now {threads} intra-op thread(s) per rank ({why})")
