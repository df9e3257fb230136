"""Everything optional in a run, as callbacks that decide their own timing (trainer/callbacks/base.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hylo.trainer.callbacks.base import Callback, Callbacks
from hylo.trainer.callbacks.checkpointing import CheckpointCallback
from hylo.trainer.callbacks.cpu_threads import CpuThreads
from hylo.trainer.callbacks.evaluation import EvalCallback
from hylo.trainer.callbacks.metrics import LossSpikeCallback, MetricsCallback
from hylo.trainer.callbacks.monitors import GradNormMonitor, LayerMonitor
from hylo.trainer.callbacks.preemption import PreemptionCallback
from hylo.trainer.callbacks.profiler import ProfilerCallback
from hylo.trainer.callbacks.progress import LogLines, ProgressBar

if TYPE_CHECKING:
    from hylo.trainer.config import Config

__all__ = ["Callback", "Callbacks", "default_callbacks"]


def default_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks a config asks for, in the order they run each step: metrics first (they read the step's
    timing), then what may stop the run, then saving, evaluation and the bar."""
    log = cfg.logging
    callbacks: list[Callback] = [
        MetricsCallback(),
        LossSpikeCallback(log.spike_zscore),
        LayerMonitor("sinks", log.sink_interval, "the attention-sink monitor (logging.sink_interval)",
                     n_queries=log.sink_queries, threshold=log.sink_threshold),
        LayerMonitor("states", log.layer_interval, "linear-state norms (logging.layer_interval)"),
        GradNormMonitor(log.layer_interval),
        PreemptionCallback(),
        CheckpointCallback(cfg.checkpoint.interval),
    ]
    if cfg.eval.interval:
        callbacks.append(EvalCallback(cfg.eval.interval))
    if cfg.profile.enabled:
        callbacks.append(ProfilerCallback(cfg.profile.start_step, cfg.profile.steps))
    callbacks.append(CpuThreads())
    callbacks.append(ProgressBar() if log.progress else LogLines())
    return callbacks
