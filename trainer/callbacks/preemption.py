"""Preemption: SIGTERM or SIGUSR1 on any rank makes every rank save at the same step boundary and exit 0.

Schedulers (SLURM, Kubernetes, torchrun's agent) send SIGTERM before killing a job; SLURM can send SIGUSR1 ahead of
the time limit (`#SBATCH --signal=USR1@120`).  The handler only sets a flag.  With one process the flag is read
every step; with several, the ranks agree through an all-reduce at logging steps only, where the host waits for
the device anyway, so polling adds no synchronisation to the other steps (a save then comes at most
logging.interval steps after the signal).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from trainer.engines import StepResult
    from trainer.trainer import Trainer


class PreemptionWatcher:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        """Whether any rank was signalled (a collective: every rank must ask at the same step)."""
        if not dist.is_initialized():
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class PreemptionCallback(Callback):
    """Asks the trainer to stop when signalled; the checkpoint callback (after this one) then saves the step."""

    def on_train_start(self, trainer: Trainer) -> None:
        self.watcher = PreemptionWatcher(trainer.device)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        poll = not dist.is_initialized() or trainer.is_log_step()
        if poll and self.watcher.requested():
            trainer.request_stop("preempted")

    def on_train_end(self, trainer: Trainer) -> None:
        self.watcher.close()
        if trainer.stop_reason == "preempted":
            trainer.checkpointer.wait()
            if trainer.is_main:
                print(f"[hylo] preempted: saved step {trainer.step}; resume with checkpoint.resume=auto", flush=True)
