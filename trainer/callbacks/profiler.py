"""profile.enabled: a torch.profiler window over steps [start, start + steps), written for TensorBoard's
profiler plugin; and, on GPU, an allocation snapshot when the run runs out of memory."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hylo.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from hylo.trainer.trainer import Trainer


class ProfilerCallback(Callback):
    def __init__(self, start: int, steps: int):
        self.start, self.stop = start, start + steps
        self.profiler = None

    def on_step_start(self, trainer: Trainer) -> None:
        if trainer.step == self.start:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            cuda = [ProfilerActivity.CUDA] if trainer.device.type == "cuda" else []
            handler = tensorboard_trace_handler(str(trainer.run_dir / "tb" / "profile"),
                                                worker_name=f"rank{trainer.dims.rank}")
            self.profiler = profile(activities=[ProfilerActivity.CPU, *cuda], record_shapes=True,
                                    profile_memory=True, on_trace_ready=handler)
            self.profiler.__enter__()
        elif trainer.step == self.stop:
            self.close()

    def on_train_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


@contextlib.contextmanager
def oom_snapshot(enabled: bool, device: torch.device, path: Path):
    """On GPU: record allocation history, and if the body runs out of memory dump it to `path` (open it at
    https://pytorch.org/memory_viz) before re-raising."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.memory._dump_snapshot(str(path))
        print(f"[hylo] out of memory: allocation snapshot written to {path} (view it at "
              "https://pytorch.org/memory_viz); lower train.micro_batch_size or train.seq_len", flush=True)
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
