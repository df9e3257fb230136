"""Periodic evaluation of eval.tasks (held-out perplexity by position, MQAR, passkey) every eval.interval steps
and at the last step; its time stays out of tokens/s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hylo.trainer.callbacks.base import Callback
from hylo.trainer.config import held_out_data
from hylo.trainer.evaluation.evaluate import eval_batches, run_eval_tasks

if TYPE_CHECKING:
    from hylo.trainer.engines import StepResult
    from hylo.trainer.trainer import Trainer


class EvalCallback(Callback):
    def __init__(self, interval: int):
        self.interval = interval
        self.ppl_batches = None
        self.ppl_sources = None  # a mixture's eval data: the source of each row

    def on_train_start(self, trainer: Trainer) -> None:
        ev, cfg = trainer.cfg.eval, trainer.cfg
        if "ppl" in ev.tasks:
            source, _ = held_out_data(cfg, ev.data_path)
            batches, self.ppl_sources = eval_batches(source, trainer.tokenizer, ev.seq_len or cfg.train.seq_len,
                                                     ev.batch_size, ev.batches, trainer.dims.dp_rank, trainer.dims.dp)
            self.ppl_batches = [b.to(trainer.device) for b in batches]

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not (trainer.step % self.interval == 0 or trainer.is_last_step()):
            return
        trainer.check_finite()
        trainer.model.eval()
        scalars = run_eval_tasks(trainer.model, trainer.cfg, trainer.tokenizer, trainer.device, self.ppl_batches,
                                 trainer.positions, trainer.logger, trainer.step, autocast=trainer.engine.autocast,
                                 ppl_sources=self.ppl_sources)
        trainer.model.train()
        trainer.log(scalars)
        trainer.say(f"[hylo] step {trainer.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                                                                  if k.count("/") == 1))
