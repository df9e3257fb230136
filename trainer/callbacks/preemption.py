"""Preemption: SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) on any rank makes every rank save at the same step boundary
and exit 0; a second Ctrl-C stops at once.  Ranks whose launcher died (the torchrun agent was `kill -9`ed, so
they were re-parented: trainer/runtime/launcher_watch.py) stop and save the same way instead of training on as orphans.

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

from hylo.trainer.callbacks.base import Callback
from hylo.trainer.runtime.launcher_watch import launcher_died

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


class PreemptionWatcher:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        self.reason = "preempted"
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.flag:  # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            print("[hylo] interrupted: saving at the next step boundary (Ctrl-C again to stop at once)", flush=True)
        self.flag = True

    def requested(self) -> bool:
        """Whether any rank was signalled or lost its launcher (a collective: every rank must ask at the same
        step)."""
        if launcher_died() and not self.flag:
            self.flag, self.reason = True, "launcher died"
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
                why = "its launcher died" if self.watcher.reason == "launcher died" else "preempted"
                print(f"[hylo] {why}: saved step {trainer.step}; resume with checkpoint.resume=auto", flush=True)
