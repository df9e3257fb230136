"""Preemption: SIGTERM or SIGUSR1 on any rank makes every rank save at the next step boundary and exit 0.

Schedulers (SLURM, Kubernetes, torchrun's agent) send SIGTERM before killing a job; SLURM can send SIGUSR1 ahead of
the time limit (`#SBATCH --signal=USR1@120`).  The handler only sets a flag; the training loop asks `requested()`
once per step, which all-reduces the flag so that every rank stops at the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionWatcher:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        self.previous = {}
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        if not dist.is_initialized():
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
