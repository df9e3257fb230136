"""When to save: every checkpoint.interval steps, at the last step, and when the run is asked to stop
(preemption); a background save is finalised at the next step boundary that finds it done."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hylo.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


class CheckpointCallback(Callback):
    def __init__(self, interval: int):
        self.interval = interval
        self.saved_step: int | None = None

    def due(self, trainer: Trainer) -> bool:
        return bool(self.interval) and (trainer.step % self.interval == 0 or trainer.is_last_step())

    def on_step_start(self, trainer: Trainer) -> None:
        trainer.checkpointer.poll()

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.due(trainer) or (trainer.stop_reason is not None and self.saved_step != trainer.step):
            trainer.check_finite()  # never save the weights of a diverged step
            path = trainer.checkpointer.save(trainer.step, trainer.model, trainer.engine.optimizer,
                                             trainer.checkpoint_state())
            self.saved_step = trainer.step
            trainer.say(f"[hylo] {'saving' if trainer.cfg.checkpoint.async_save else 'saved'} checkpoint {path}")

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.checkpointer.wait()
