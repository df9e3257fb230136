"""A tqdm bar on rank 0 (logging.progress); while it runs, the trainer's messages go through it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from trainer.engines import StepResult
    from trainer.trainer import Trainer


class ProgressBar(Callback):
    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.step, desc="train", dynamic_ncols=True)
        trainer.say = self.bar.write

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.bar is None:
            return
        if trainer.is_log_step() and "last_loss" in trainer.summary:
            self.bar.set_postfix(loss=f"{trainer.summary['last_loss']:.3f}",
                                 tok_s=f"{trainer.summary['tokens_per_sec']:,.0f}")
        self.bar.update(1)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            trainer.say = print
