"""Training engines: `train.engine` picks one; each owns the step and its checkpoint format and declares what it
can do (trainer/engines/base.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from hylo.trainer.engines.base import Engine, StepResult, capability_problem
from hylo.trainer.engines.deepspeed_engine import DeepSpeedEngine
from hylo.trainer.engines.torch_engine import TorchEngine, use_bf16

if TYPE_CHECKING:
    from hylo.trainer.config import Config

__all__ = ["ENGINES", "Engine", "StepResult", "build_engine", "engine_problem", "use_bf16"]

ENGINES: dict[str, type[Engine]] = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}


def engine_problem(cfg: Config) -> str | None:
    """Why `train.engine` cannot run this config (by its declared capabilities), or None."""
    return capability_problem(ENGINES[cfg.train.engine], cfg)


def build_engine(model: nn.Module, cfg: Config, world: int, micro: int, accum: int, device: torch.device) -> Engine:
    """`train.engine`'s engine around a plain (possibly context-parallel, checkpointed, compiled) model."""
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, micro, accum, bf16=use_bf16(cfg, device))
    return TorchEngine(model, cfg, world, device)
