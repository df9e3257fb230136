"""A tqdm bar on rank 0 (logging.progress); while it runs, the trainer's messages go through it.

The bar shows the logged loss smoothed over the last ten log points (`loss`) beside the last one (`last`): one
batch's loss swings by a nat or more on a mixed corpus, and a run's end should not be judged by its last batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hylo.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


class ProgressBar(Callback):
    WINDOW = 10  # log points averaged for the bar's loss

    def __init__(self):
        self.bar = None
        self.recent: list[float] = []

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
            self.recent = (self.recent + [trainer.summary["last_loss"]])[-self.WINDOW:]
            self.bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.3f}",
                                 last=f"{trainer.summary['last_loss']:.3f}",
                                 tok_s=f"{trainer.summary['tokens_per_sec']:,.0f}")
        self.bar.update(1)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            trainer.say = print
