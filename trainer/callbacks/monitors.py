"""Looking inside the layers during training, each on its own interval:

  LayerMonitor("sinks")    attention layers' sink statistics (sinks/layer{i}/...), every logging.sink_interval
  LayerMonitor("states")   TNL/BASED final linear-state norms (states/layer{i}/...), every logging.layer_interval
  GradNormMonitor          per-layer gradient norms (grads/layer{i}), every logging.layer_interval

Layer monitors use one mechanism for every layer type: on a due step a forward hook is put on each mixer whose
`monitor_group` matches; the hook hands the mixer's input to `mixer.monitor(...)` (the statistics are the
mixer's own business, models/mixer.py) and removes itself, so activation checkpointing's recompute does not run
it twice.  Under context parallelism the mixers reduce their partial statistics over the CP group with the
`reduce` they are given, so the numbers are the whole sequence's.  With document masking the hook also hands over
the forward's documents (`cu_seqlens`, and each token's document and position in it), so the statistics see the
same documents the forward did.  A monitor that cannot run under this run's
settings says so once at the start.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from hylo.kernels.varlen import document_view
from hylo.models.mixer import Mixer
from hylo.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def refuse_once(what: str, why: str) -> None:
    warnings.warn(f"{what} is off for this run: {why}", stacklevel=2)


class LayerMonitor(Callback):
    def __init__(self, group: str, interval: int, what: str, **settings):
        self.group, self.interval, self.what, self.settings = group, interval, what, settings
        self.mixers: list[Mixer] = []
        self.handles: list = []
        self.collected: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        mixers = [m for m in trainer.model.modules() if isinstance(m, Mixer) and m.monitor_group == self.group]
        if not self.interval or not mixers:
            return
        if trainer.compiled:
            if trainer.is_main:
                refuse_once(self.what, "train.compile=on compiles the blocks, and a compiled block does not run "
                                       "forward hooks added later; set train.compile=off (or auto) to monitor")
            return
        self.mixers = mixers
        self.reduce = trainer.cp_reduce
        # where this rank's tokens sit in a row (context parallelism) and the row length: packed rows follow
        # each other, so a token's place in the packed sequence is row * seq_len + its place in the row
        self.seq_len = trainer.cfg.train.seq_len
        self.row_positions = None if trainer.positions is None else trainer.positions.cpu()

    def on_step_start(self, trainer: Trainer) -> None:
        if self.mixers and trainer.step % self.interval == 0:
            self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.mixers]

    def _hook(self, mixer: Mixer, args, kwargs, output) -> None:
        self.handles[self.mixers.index(mixer)].remove()  # once per step: not again in a recompute
        x, positions = args[0], args[1]
        cu_seqlens = kwargs.get("cu_seqlens")
        documents = None
        if cu_seqlens is not None:
            rows = int(cu_seqlens[-1]) // self.seq_len
            in_row = torch.arange(self.seq_len) if self.row_positions is None else self.row_positions
            packed = (torch.arange(rows)[:, None] * self.seq_len + in_row[None]).reshape(-1)
            documents = document_view(cu_seqlens, packed)
        with torch.no_grad():
            self.collected.update(mixer.monitor(x.detach(), positions, self.reduce, documents=documents,
                                                **self.settings))

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.collected:
            trainer.log({tag: float(value) for tag, value in self.collected.items()})
            self.collected = {}


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


class GradNormMonitor(Callback):
    def __init__(self, interval: int):
        self.interval = interval
        self.enabled = bool(interval)

    def on_train_start(self, trainer: Trainer) -> None:
        if self.enabled and not trainer.engine.exposes_gradients:
            self.enabled = False
            if trainer.is_main:
                refuse_once("per-layer gradient norms (logging.layer_interval)",
                            f"train.engine={trainer.engine.name} applies the optimizer step before its gradients "
                            "can be read; linear-state norms are still logged")

    def wants_gradients(self, trainer: Trainer) -> bool:
        return self.enabled and trainer.step % self.interval == 0

    def on_gradients(self, trainer: Trainer, model: nn.Module) -> None:
        trainer.log(layer_grad_norms(model, trainer.cfg.model.n_layers))
