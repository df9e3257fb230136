"""The callback contract: everything optional in a run hooks into the loop here and decides its own timing.

The loop (trainer/trainer.py) calls, in order:
  on_train_start(trainer)                      once, after resuming
  on_step_start(trainer)                       trainer.step is the step about to run
  on_gradients(trainer, model)                 between backward and the optimizer step, only when the callback
                                               `wants_gradients` this step and the engine `exposes_gradients`
  on_step_end(trainer, result)                 result: StepResult (loss, grad_norm, stepped)
  on_train_end(trainer)                        once, also after a stop (preemption)
A callback with `state_key` is saved in every checkpoint's trainer_state.json under that key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


class Callback:
    state_key: str | None = None

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer) -> None: ...

    def wants_gradients(self, trainer: Trainer) -> bool:
        return False

    def on_gradients(self, trainer: Trainer, model: nn.Module) -> None: ...

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callbacks(list):
    """The run's callbacks, called in list order."""

    def __init__(self, callbacks: Iterable[Callback]):
        super().__init__(callbacks)

    def on_train_start(self, trainer: Trainer) -> None:
        for cb in self:
            cb.on_train_start(trainer)

    def on_step_start(self, trainer: Trainer) -> None:
        for cb in self:
            cb.on_step_start(trainer)

    def gradient_hook(self, trainer: Trainer) -> Callable[[nn.Module], None] | None:
        """What the engine calls between backward and the optimizer step this step (None: nobody asked)."""
        wanted = [cb for cb in self if cb.wants_gradients(trainer)]
        if not wanted:
            return None

        def hook(model: nn.Module) -> None:
            for cb in wanted:
                cb.on_gradients(trainer, model)
        return hook

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        for cb in self:
            cb.on_step_end(trainer, result)

    def on_train_end(self, trainer: Trainer) -> None:
        for cb in self:
            cb.on_train_end(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self if cb.state_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self:
            if cb.state_key and cb.state_key in state:
                cb.load_state_dict(state[cb.state_key])
