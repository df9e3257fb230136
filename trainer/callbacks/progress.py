"""What rank 0 shows while training: a tqdm bar (logging.progress=true; the trainer's messages then go through
it), or one line per logging step (logging.progress=false, e.g. in a batch job's log).

Both show the loss averaged over the last ten log points (`train/loss_avg`, also in TensorBoard and
metrics.jsonl) beside the last one: one batch's loss swings by a nat or more on a mixed corpus, and a run's end
should not be judged by its last batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hylo.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


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
            self.bar.set_postfix(loss=f"{trainer.summary['avg_loss']:.4g}",
                                 last=f"{trainer.summary['last_loss']:.4g}",
                                 tok_s=f"{trainer.summary['tokens_per_sec']:,.0f}")
        self.bar.update(1)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            trainer.say = print


class LogLines(Callback):
    """logging.progress=false: one line per logging step instead of a bar."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        summary = trainer.summary
        if trainer.is_main and trainer.is_log_step() and "last_loss" in summary:
            print(f"[hylo] step {trainer.step}/{trainer.cfg.train.steps}: loss {summary['avg_loss']:.4g} (last "
                  f"{summary['last_loss']:.4g}), lr {summary['lr']:.2e}, {summary['tokens_per_sec']:,.0f} tokens/s",
                  flush=True)
