"""Training metrics at logging steps (train/loss, lr, grad_norm, tokens/s, MFU, GPU memory) and loss-spike flags.

Per step nothing leaves the device: the loss accumulates in a device tensor and is read (one host
synchronisation) only at logging steps, where the non-finite check also runs."""

from __future__ import annotations

import math
import resource
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hylo.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


def mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:
            value /= dist.get_world_size()
    return value.item()


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
GPU_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """FLOP/s one device can do: the config's value, a table for known GPUs, or a measured fp32 matmul on CPU."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 312e12
    n, reps = 1024, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


class MetricsCallback(Callback):
    """Every logging.interval steps, the first step and the last: the window's mean loss over the steps that were
    applied (and over all ranks), the learning rate, the last gradient norm, tokens/s and MFU over the window's
    own step time (checkpoint saves and evaluations are left out), and peak GPU memory."""

    AVERAGED = 10  # log points in train/loss_avg (the progress bar's `loss`)

    def on_train_start(self, trainer: Trainer) -> None:
        self.peak = peak_flops(trainer.device, trainer.cfg.logging.peak_tflops) * trainer.dims.world
        self.tokens_per_step = trainer.cfg.train.batch_size * trainer.cfg.train.seq_len
        self.loss_sum = torch.zeros((), device=trainer.device)
        self.loss_steps = self.window_steps = 0
        self.window_time = 0.0
        self.source_counts: dict[str, int] | None = None  # a mixture's sequences per source at the last log
        self.recent: list[float] = []  # the last AVERAGED log points' losses: train/loss_avg

    def _mixture(self, trainer: Trainer) -> dict[str, float]:
        """data/tokens/<source> (cumulative) and data/share/<source> (over the last log interval) of a mixture."""
        state = getattr(trainer.loader, "state_dict", dict)().get("packer", {})
        if state.get("kind") != "mixture":
            return {}
        counts, seq_len = state["counts"], trainer.cfg.train.seq_len
        before = self.source_counts or dict.fromkeys(counts, 0)
        drawn = {n: c - before.get(n, 0) for n, c in counts.items()}
        total = max(sum(drawn.values()), 1)
        self.source_counts = dict(counts)
        return {**{f"data/tokens/{n}": c * seq_len for n, c in counts.items()},
                **{f"data/share/{n}": d / total for n, d in drawn.items()}}

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if result.stepped:
            self.loss_sum += result.loss
            self.loss_steps += 1
        self.window_steps += 1
        if not trainer.is_log_step():
            self.window_time += time.perf_counter() - trainer.step_started
            return
        trainer.check_finite()
        mean_loss = mean_over_ranks(self.loss_sum / max(self.loss_steps, 1))  # the host waits for the device here
        self.window_time += time.perf_counter() - trainer.step_started
        tokens_per_sec = self.window_steps * self.tokens_per_step / max(self.window_time, 1e-9)
        self.recent = (self.recent + [mean_loss])[-self.AVERAGED:]
        scalars = {
            "train/loss": mean_loss,
            # one batch's loss swings by a nat or more on a mixed corpus: the trend is the mean of the last few
            "train/loss_avg": sum(self.recent) / len(self.recent),
            "train/lr": trainer.scheduler.get_last_lr()[0],
            "train/grad_norm": float(result.grad_norm),
            "train/tokens_per_sec": tokens_per_sec,
            "train/mfu": trainer.flops_per_token * tokens_per_sec / self.peak,
        }
        if trainer.device.type == "cuda":
            scalars["train/mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        else:  # the process's peak resident memory (Linux reports KiB), so CPU runs show memory settings too
            scalars["train/mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        scalars.update(self._mixture(trainer))
        if trainer.objective is not None:  # distillation's terms: distill/kl, distill/lm, distill/align/<i>
            scalars.update({name: mean_over_ranks(value) for name, value in trainer.objective.scalars().items()})
        trainer.log(scalars)
        trainer.summary.setdefault("first_loss", mean_loss)
        trainer.summary["last_loss"] = mean_loss
        trainer.summary["avg_loss"] = scalars["train/loss_avg"]
        trainer.summary["lr"] = scalars["train/lr"]
        trainer.summary["tokens_per_sec"] = tokens_per_sec
        self.loss_sum.zero_()
        self.loss_steps = self.window_steps = 0
        self.window_time = 0.0


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


class LossSpikeCallback(Callback):
    """logging.spike_zscore: rank 0's per-step losses are kept on the device and run through `LossSpikes` at
    logging steps (and before a checkpoint takes the detector's state), flagged as train/loss_spike_zscore."""

    state_key = "loss_spikes"

    def __init__(self, zscore: float):
        self.spikes = LossSpikes(zscore)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.trainer: Trainer | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.spikes.zscore > 0 and trainer.is_main:
            self.pending.append((trainer.step, result.loss))
        if trainer.is_log_step():
            self.flush()

    def flush(self) -> None:
        values = torch.stack([loss for _, loss in self.pending]).tolist() if self.pending else []
        for (step, _), value in zip(self.pending, values, strict=True):
            z = self.spikes.update(value)
            if z is not None and self.trainer is not None:
                self.trainer.log({"train/loss_spike_zscore": z}, step=step)
                self.trainer.say(f"[hylo] step {step}: loss spike ({z:.1f} std devs above the running mean)")
        self.pending.clear()

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return self.spikes.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state)
