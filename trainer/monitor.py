"""Training insight beyond the loss: per-layer gradient norms, linear-attention state norms, loss-spike flags,
a torch.profiler window and, on GPU, a memory snapshot when a step runs out of memory."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_grad_norms(model: nn.Module, n_layers: int) -> dict[str, float]:
    """grads/layer{i} (every parameter of block i) and grads/embed_and_head, after backward, before the step.

    Works for plain, DDP and FSDP2 models: sharded (DTensor) gradients contribute their local shards' squares,
    summed over ranks."""
    squares = torch.zeros(n_layers + 1, dtype=torch.float64)
    sharded = False
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad
        if hasattr(grad, "to_local"):
            grad, sharded = grad.to_local(), True
        match = _BLOCK.search(name)
        squares[int(match.group(1)) if match else n_layers] += grad.detach().double().pow(2).sum().cpu()
    if sharded and dist.is_initialized():
        dist.all_reduce(squares)
    norms = squares.sqrt().tolist()
    out = {f"grads/layer{i}": norms[i] for i in range(n_layers)}
    out["grads/embed_and_head"] = norms[n_layers]
    return out


def request_state_monitor(model: nn.Module) -> None:
    """Ask every linear-attention layer (TNL, BASED) to record its final state's norm in its next forward."""
    for module in model.modules():
        if hasattr(module, "state_norms"):
            module.monitor_state = True


def collect_state_norms(model: nn.Module) -> dict[str, float]:
    """states/layer{i}/norm (mean over heads and batch) and .../max_head from the layers that recorded one."""
    scalars = {}
    for module in model.modules():
        norms = getattr(module, "state_norms", None)
        if norms is not None:
            scalars[f"states/layer{module.layer_idx}/norm"] = float(norms.mean())
            scalars[f"states/layer{module.layer_idx}/max_head"] = float(norms.max())
            module.state_norms = None
    return scalars


class LossSpikes:
    """Flags a step whose loss exceeds the running mean by `zscore` running standard deviations (EMA, after a
    warm-up of 20 steps).  Spiking steps do not move the statistics, so a run of spikes stays flagged."""

    def __init__(self, zscore: float, decay: float = 0.98, warmup: int = 20):
        self.zscore, self.decay, self.warmup = zscore, decay, warmup
        self.mean, self.var, self.seen = 0.0, 0.0, 0

    def update(self, loss: float) -> float | None:
        """The step's z-score when it is a spike, else None."""
        if self.zscore <= 0 or not math.isfinite(loss):
            return None
        if self.seen >= self.warmup:
            z = (loss - self.mean) / max(math.sqrt(self.var), 1e-3)
            if z > self.zscore:
                return z
        self.seen += 1
        if self.seen == 1:
            self.mean = loss
        delta = loss - self.mean
        self.mean += (1 - self.decay) * delta
        self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.seen = state["mean"], state["var"], state["seen"]


class ProfileWindow:
    """torch.profiler over steps [start, start + steps), written for TensorBoard's profiler plugin."""

    def __init__(self, enabled: bool, start: int, steps: int, out_dir: Path, rank: int, device: torch.device):
        self.enabled, self.start, self.stop = enabled, start, start + steps
        self.out_dir, self.rank, self.device = out_dir, rank, device
        self.profiler = None

    def step(self, step: int) -> None:
        """Call at the start of each step."""
        if not self.enabled:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True,
                                    on_trace_ready=tensorboard_trace_handler(str(self.out_dir),
                                                                             worker_name=f"rank{self.rank}"))
            self.profiler.__enter__()
        elif step == self.stop:
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
